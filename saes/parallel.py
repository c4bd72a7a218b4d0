"""SAE work across processes: the few torch.distributed collectives that training and collection use.

Training and collection run across the ranks of torch.distributed's default process group, as
``torchrun`` or ``accelerate launch`` start it (gloo on CPU, NCCL on GPU); this package starts and
manages no process itself. The entry points take one keyword:

* ``saes.train.train_sae(data, cfg, parallel="data")``: data-parallel. Every rank passes the same
  data and config; each takes its contiguous slice of every global batch of ``cfg.batch_size``
  rows, and the gradients are summed across ranks with the loss divided by the global batch size,
  so each step is the single-process step on the same global batch (the Gemma Scope recipe
  unchanged: scaling, ``b_dec`` init, decoder renormalisation, λ warm-up, Adam β = (0, 0.999)),
  equal up to fp32 reduction order. Only rank 0 writes checkpoints; on resume rank 0 reads the
  newest one and sends it to every rank (no shared file system needed).
* ``saes.train.train_saes({"blocks.3.resid_post": x3, ...}, cfg, parallel="layers")``: several SAEs
  (e.g. one per layer); job ``i`` in the mapping's order is trained by rank ``i % world_size``
  (any number per rank), and every rank returns every result (the owner sends it).
* ``saes.store.collect_activations(..., parallel="data")``: rank ``r`` of ``n`` collects its
  contiguous block of the batches into ``path/rank{r}-of-{n}/``; ``ActivationStore(path)`` reads
  the union, rank 0's rows first (the single-process order).

Without an initialised process group (or with one rank) each of them is the plain single-process
call. Launch, e.g.::

    torchrun --nproc-per-node 2 train.py          # in train.py: dist.init_process_group("gloo")

Functions here are what :mod:`saes.train` and :mod:`saes.store` need: the rank and world size,
the device collectives run on, summing, broadcasting JSON and tensors, a check that every rank
holds the same value, and the contiguous block of items a rank owns.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "PARALLEL_MODES",
    "all_reduce_sum",
    "barrier",
    "block",
    "broadcast_json",
    "broadcast_tensors",
    "check_same",
    "comm_device",
    "rank_world",
]

#: the values of the ``parallel=`` keyword (``None``: this process does everything).
PARALLEL_MODES = ("data", "layers")


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of torch.distributed's default group; ``(0, 1)`` when none is initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def comm_device() -> torch.device:
    """The device collectives run on: the current CUDA device for NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over every rank, in place, and return it (nothing to do with one rank).

    ``t`` on the collective device (:func:`comm_device`) and contiguous is reduced where it lies; otherwise
    through a copy there."""
    import torch.distributed as dist

    if rank_world()[1] == 1:
        return t
    device = comm_device()
    if t.device == device and t.is_contiguous():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t
    buf = t.detach().to(device).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    with torch.no_grad():
        t.copy_(buf)
    return t


def barrier() -> None:
    """Wait for every rank (nothing with one rank)."""
    import torch.distributed as dist

    if rank_world()[1] > 1:
        dist.barrier()


def broadcast_json(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s JSON-serialisable ``obj`` on every rank (sent as UTF-8 bytes: no pickle).

    Other ranks' ``obj`` is ignored (pass ``None``).
    """
    import torch.distributed as dist

    rank, world = rank_world()
    if world == 1:
        return obj
    device = comm_device()
    data = json.dumps(obj).encode() if rank == src else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if rank == src
           else torch.empty(int(size.item()), dtype=torch.uint8, device=device))  # fmt: skip
    if buf.numel():
        dist.broadcast(buf, src)
    return obj if rank == src else json.loads(buf.cpu().numpy().tobytes().decode())


def broadcast_tensors(tensors: Mapping[str, torch.Tensor] | None, src: int = 0,
                      device: torch.device | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Rank ``src``'s ``{name: tensor}`` on every rank (on ``device``, default: where ``src`` has them for
    ``src``, the CPU elsewhere). Names, shapes and dtypes go as JSON first, then one broadcast per tensor."""
    import torch.distributed as dist

    rank, world = rank_world()
    if world == 1:
        assert tensors is not None
        return dict(tensors)
    header = broadcast_json(
        {k: [list(t.shape), str(t.dtype).removeprefix("torch.")] for k, t in tensors.items()}
        if rank == src and tensors is not None else None, src)  # fmt: skip
    cdev = comm_device()
    out: dict[str, torch.Tensor] = {}
    for name, (shape, dtype) in header.items():
        if rank == src:
            assert tensors is not None
            t = tensors[name]
            buf = t.detach().to(cdev).contiguous()
            dist.broadcast(buf, src)
            out[name] = t if device is None else t.to(device)
        else:
            buf = torch.empty(shape, dtype=getattr(torch, dtype), device=cdev)
            dist.broadcast(buf, src)
            out[name] = buf.to(device or torch.device("cpu"))
    return out


def check_same(what: str, value: str) -> None:
    """Raise on every rank unless every rank passed the same ``value`` (compared by SHA-256).

    Raises:
        ValueError: naming ``what``, the ranks that differ from rank 0 and this rank's value.
    """
    import torch.distributed as dist

    rank, world = rank_world()
    if world == 1:
        return
    device = comm_device()
    digest = torch.tensor(list(hashlib.sha256(value.encode()).digest()), dtype=torch.uint8, device=device)
    everyone = [torch.empty_like(digest) for _ in range(world)]
    dist.all_gather(everyone, digest)
    differ = [r for r, d in enumerate(everyone) if not torch.equal(d, everyone[0])]
    if differ:
        raise ValueError(
            f"{what} must be the same on every rank, but rank(s) {differ} differ from rank 0; "
            f"this rank ({rank}) has: {value[:2000]}"
        )


def block(n: int, rank: int, world: int) -> range:
    """The contiguous block of ``range(n)`` that rank ``rank`` of ``world`` owns: ``[n r / w, n (r+1) / w)``
    (sizes differ by at most one; blocks in rank order concatenate to ``range(n)``)."""
    return range(n * rank // world, n * (rank + 1) // world)
