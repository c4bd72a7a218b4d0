"""The active split: which share of a study's work this process runs, and how the shares come back together.

``with split():`` makes a :class:`Split` of torch.distributed's default process group (or of ``group``)
active for the code inside it, in a ``ContextVar`` (so each thread / async task has its own). Studies
ask :func:`active_split` whether one is active; outside ``split()`` it returns ``None`` and they run
exactly as before (one ``ContextVar`` read, no torch.distributed call). Inside, a study enumerates its
work items (variants, patches, replicas, prompts) in the same order on every rank and calls

* :meth:`Split.map` ``(n, compute, what=)``: this rank runs ``compute(indices)`` on its share of the
  ``n`` items (:meth:`Split.share`: items ``rank, rank + world, ...``, so every rank gets a similar mix
  of cheap and dear items of a grid ordered by layer) and returns a tensor ``[len(indices), *S]``; every
  rank receives the whole ``[n, *S]``, item ``i`` from the rank that ran it;
* :meth:`Split.gather` ``(compute)``: every rank's tensor (partial sums a study then adds in rank order);
* :meth:`Split.map_bytes` ``(n, compute, what=)``: the same for items serialised to bytes (graphs).

The shares run with the split switched off (:func:`unsplit`), so a study that calls another splittable
routine inside its share (a patching grid's sweep) does not split again. Results travel as raw bytes in
``uint8`` tensors through ``all_gather`` into preallocated buffers padded to the largest share (shares can
differ in size), with a fixed-size ``int64`` header per rank (status, dtype, shape, size) gathered first:
nothing is pickled, and the values arrive bit for bit. With NCCL the buffers live on this rank's current
CUDA device, with gloo (or MPI) on the CPU. A rank whose share raises still takes part in the header
exchange and re-raises its error; every other rank then raises a ``RuntimeError`` naming it, so no rank
waits forever in a collective for a rank that failed.

Every rank must make the same calls in the same order (the studies do: their plans depend only on their
arguments). Results equal a single process's up to float reassociation: a rank batches fewer items per
forward, and sums split between ranks (integrated gradients) are added in another order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Share", "Split", "active_split", "split", "unsplit"]

#: dtypes a result tensor may have (their index is the code in the header).
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)
#: the most dimensions a gathered tensor may have.
_MAX_DIMS = 8
_OK, _FAILED = 0, 1


@dataclass(frozen=True)
class Share:
    """One share this rank took: ``indices`` of the ``n`` items of ``what`` (a study's work list)."""

    what: str
    n: int
    indices: tuple[int, ...]


@dataclass
class Split:
    """The ranks of a process group splitting work; see the module docs.

    Attributes:
        rank: this process's rank in ``group``.
        world_size: the group's size.
        group: the torch.distributed process group (``None``: the default group).
        shares: every share this rank took inside the ``split()`` block, in order (what each rank ran).
    """

    rank: int
    world_size: int
    group: Any = None
    shares: list[Share] = field(default_factory=list)

    def share(self, n: int, what: str) -> list[int]:
        """This rank's items of ``n``: ``rank, rank + world_size, ...`` (recorded in :attr:`shares`)."""
        mine = list(range(self.rank, n, self.world_size))
        self.shares.append(Share(what, n, tuple(mine)))
        return mine

    def owner(self, i: int) -> int:
        """The rank that runs item ``i`` (of any ``n``)."""
        return i % self.world_size

    def map(self, n: int, compute: Callable[[list[int]], torch.Tensor], *, what: str) -> torch.Tensor:
        """Run ``compute`` on this rank's share of ``n`` items; every rank gets the whole result.

        Args:
            n: the number of items (the same on every rank).
            compute: ``compute(indices) -> [len(indices), *S]``, item ``indices[k]``'s result in row ``k``;
                run with the split switched off (:func:`unsplit`). With no items it may return any
                tensor with 0 rows.
            what: a name for the items (in :attr:`shares` and in errors).

        Returns:
            ``[n, *S]`` on the device of this rank's result, row ``i`` from :meth:`owner` ``(i)``.
        """
        mine = self.share(n, what)

        def run() -> torch.Tensor:
            local = compute(mine)
            if not isinstance(local, torch.Tensor) or local.ndim == 0 or local.shape[0] != len(mine):
                got = tuple(local.shape) if isinstance(local, torch.Tensor) else type(local).__name__
                raise ValueError(f"{what}: rank {self.rank} computed {got} for its {len(mine)} item(s); "
                                 f"expected a tensor with {len(mine)} rows")
            return local

        parts, device = self._exchange(run, what)
        shaped = [p for p in parts if p.shape[0] > 0]
        if not shaped:
            return parts[self.rank]
        rest, dtype = shaped[0].shape[1:], shaped[0].dtype
        for r, p in enumerate(parts):
            if p.shape[0] > 0 and (p.shape[1:] != rest or p.dtype != dtype):
                raise ValueError(f"{what}: rank {r} computed rows of {tuple(p.shape[1:])} {p.dtype}, another rank "
                                 f"{tuple(rest)} {dtype}; every item must give one shape and dtype")
        out = torch.empty((n, *rest), dtype=dtype, device=device)
        for r, p in enumerate(parts):
            if p.shape[0]:
                out[r::self.world_size] = p.to(device)
        return out

    def gather(self, compute: Callable[[], torch.Tensor], *, what: str) -> list[torch.Tensor]:
        """Every rank's ``compute()`` (run with the split off), in rank order, on this rank's result device."""
        parts, device = self._exchange(compute, what)
        return [p.to(device) for p in parts]

    def map_bytes(self, n: int, compute: Callable[[list[int]], Sequence[bytes]], *, what: str) -> list[bytes]:
        """:meth:`map` for items serialised to bytes: ``compute(indices)`` gives one ``bytes`` per index; every
        rank gets all ``n``, in item order."""
        mine = self.share(n, what)

        def run() -> torch.Tensor:
            blobs = list(compute(mine))
            if len(blobs) != len(mine):
                raise ValueError(f"{what}: rank {self.rank} serialised {len(blobs)} item(s), expected {len(mine)}")
            lengths = torch.tensor([len(b) for b in blobs], dtype=torch.int64)
            body = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8) if any(blobs) else \
                torch.empty(0, dtype=torch.uint8)
            return torch.cat([lengths.view(torch.uint8), body])

        parts, _ = self._exchange(run, what)
        out: list[bytes] = [b""] * n
        for r, p in enumerate(parts):
            items = list(range(r, n, self.world_size))
            data = p.cpu().numpy().tobytes()
            lengths = torch.frombuffer(bytearray(data[:8 * len(items)]), dtype=torch.int64).tolist() if items else []
            at = 8 * len(items)
            for i, length in zip(items, lengths, strict=True):
                out[i] = data[at:at + length]
                at += length
        return out

    # -- the one collective ----------------------------------------------------------------------
    def _exchange(self, compute: Callable[[], torch.Tensor], what: str) -> tuple[list[torch.Tensor], torch.device]:
        """Every rank's ``compute()`` (bit for bit) and the device this rank's result had.

        Two ``all_gather`` calls: a fixed-size ``int64`` header per rank (status, dtype code, ndim, bytes,
        shape), then each rank's bytes as ``uint8`` padded to the largest. A rank whose ``compute`` raised
        sends status failed and re-raises; the others raise a ``RuntimeError`` naming it.
        """
        import torch.distributed as dist

        error: BaseException | None = None
        local: torch.Tensor | None = None
        try:
            with unsplit():
                local = compute()
            if local.dtype not in _DTYPES:
                raise TypeError(f"{what}: cannot gather a {local.dtype} tensor across ranks (use one of {_DTYPES})")
            if local.ndim > _MAX_DIMS:
                raise ValueError(f"{what}: cannot gather a tensor of {local.ndim} dims across ranks "
                                 f"(at most {_MAX_DIMS})")
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
            error = e
        comm = _comm_device(self.group)
        header = torch.zeros(4 + _MAX_DIMS, dtype=torch.int64)
        flat = torch.empty(0, dtype=torch.uint8)
        if error is not None or local is None:
            header[0] = _FAILED
        else:
            flat = local.detach().contiguous().reshape(-1).view(torch.uint8)
            header[1], header[2], header[3] = _DTYPES.index(local.dtype), local.ndim, flat.numel()
            header[4:4 + local.ndim] = torch.tensor(local.shape, dtype=torch.int64)
        headers = [torch.empty_like(header, device=comm) for _ in range(self.world_size)]
        dist.all_gather(headers, header.to(comm), group=self.group)
        table = [h.cpu() for h in headers]
        failed = [r for r, h in enumerate(table) if int(h[0]) == _FAILED]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"{what}: rank(s) {failed} of {self.world_size} failed their share (their error is "
                               f"raised there); rank {self.rank} stops too")
        assert local is not None
        size = max(int(h[3]) for h in table)
        buffers = [torch.empty(size, dtype=torch.uint8, device=comm) for _ in range(self.world_size)]
        if size:
            mine = torch.zeros(size, dtype=torch.uint8, device=comm)
            mine[:flat.numel()] = flat.to(comm)
            dist.all_gather(buffers, mine, group=self.group)
        parts = []
        for r, h in enumerate(table):
            if r == self.rank:
                parts.append(local.detach())
                continue
            dtype, ndim, nbytes = _DTYPES[int(h[1])], int(h[2]), int(h[3])
            shape = [int(d) for d in h[4:4 + ndim]]
            parts.append(buffers[r][:nbytes].clone().view(dtype).view(shape))
        return parts, local.device


_ACTIVE: ContextVar[Split | None] = ContextVar("mishax_py_split", default=None)


def active_split() -> Split | None:
    """The :class:`Split` active here (inside ``split()``), or ``None`` (studies then run whole)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def split(group: Any = None) -> Iterator[Split]:
    """Split the work of the studies run inside this block across the ranks of a process group.

    Inside it, ``im.sweep``, ``activation_patching`` (both engines), ``attribution_patching`` (the parts of
    each method that split), ``path_patching_by_head`` and ``mishax_py.circuits.attribution_graphs`` each run
    their share of the work on every rank of ``group`` (default: torch.distributed's default group) and
    every rank returns the whole result, equal to a single process's up to float reassociation.

    The process group must be initialised first (``torch.distributed.init_process_group``, as ``torchrun``
    or ``accelerate launch`` set it up); without one this raises a ``RuntimeError`` before the block runs
    (a single process needs no ``split()``). Yields the :class:`Split` (rank, world size, and the shares
    this rank took).
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "mishax_py.distributed.split() needs an initialised torch.distributed process group: launch the "
            "script with torchrun (or accelerate launch) and call torch.distributed.init_process_group() "
            "first; a single process needs no split()"
        )
    sp = Split(dist.get_rank(group), dist.get_world_size(group), group)
    token = _ACTIVE.set(sp)
    try:
        yield sp
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def unsplit() -> Iterator[None]:
    """Switch the active split off inside this block (a rank running its share runs inner calls whole)."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _comm_device(group: Any) -> torch.device:
    """Where the collective's buffers live: this rank's CUDA device for NCCL, else the CPU (gloo, MPI)."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
