"""SAE training across processes: data-parallel and layers-on-ranks vs 1 process, in the same run.

    python benchmarks/distributed_training.py                      # 1 process, then 2 (gloo, spawned here)
    python benchmarks/distributed_training.py --nproc 2 --quick    # smaller SAEs (smoke test)
    torchrun --nproc-per-node 2 benchmarks/distributed_training.py  # ranks started by torchrun (NCCL on CUDA)

``benchmarks/distributed.py`` calls :func:`sae_training` after its patching grid.

Two measurements, each checked before it is timed:

1. ``train_sae(x, cfg, parallel="data")``: a JumpReLU SAE (Gemma Scope recipe; CPU: d_in 256,
   d_sae 2048, global batch 1024, 20 steps; ``--quick``: d_in 64, d_sae 512, batch 512; CUDA: d_in 2304,
   d_sae 16384, batch 4096, Gemma Scope 2B residual widths) on every rank vs the same call in one process.
   The parameters must equal the single-process ones up to fp32 reduction order: the largest difference
   within 1e-3 of the parameter's largest value (JumpReLU's threshold makes a rounding-level change flip
   a feature on a token now and then; 1.5e-4 seen at these sizes, 2e-7 at the tests' sizes).
2. ``train_saes({...}, cfg, parallel="layers")``: one SAE per rank (as many jobs as ranks) vs the same jobs
   trained one after another in one process; results must be bit-identical on CPU.

The split runs are timed on every rank between barriers (the slowest rank's time); medians of
``--repeats`` runs after a warm-up. Started plainly, the baseline is one process with ``--threads`` threads
(default 1), also printed against one process with as many threads as there are processes; on one machine
the processes share its cores (2 processes on 2 cores: a speed-up bounded by 2 and by the load of other jobs;
the load average is printed).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

_HERE = os.path.dirname(os.path.abspath(__file__))

SIZES = {
    "cpu": dict(d_in=256, d_sae=2048, batch=1024, steps=20),
    "quick": dict(d_in=64, d_sae=512, batch=512, steps=20),
    "cuda": dict(d_in=2304, d_sae=16384, batch=4096, steps=20),
}


def saes_train() -> ModuleType:
    """:mod:`saes.train`, also when this folder (which holds the ``saes.py`` benchmark script) comes first on
    ``sys.path`` (run as a script, or imported by ``distributed.py``)."""
    mod = sys.modules.get("saes")
    if mod is not None and not hasattr(mod, "__path__"):  # the benchmark script, not the package
        del sys.modules["saes"]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    sys.path.insert(0, os.path.dirname(_HERE))
    try:
        import saes.train
    finally:
        sys.path[:] = saved
    return saes.train


def setup(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, int], Any, torch.Tensor]:
    """Sizes, the training config and the data ``[batch * steps, d_in]`` (the same on every rank: seeded)."""
    train = saes_train()
    size = SIZES["cuda" if device.type == "cuda" else "quick" if args.quick else "cpu"]
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(4 * size["d_in"], size["d_in"], generator=g)
    active = torch.rand(size["batch"] * size["steps"], dirs.shape[0], generator=g) < 8 / dirs.shape[0]
    x = (active * torch.rand(active.shape, generator=g)) @ dirs
    cfg = train.TrainConfig(d_sae=size["d_sae"], batch_size=size["batch"], steps=size["steps"], lr=1e-3,
                            lr_warmup_steps=5, scale_batches=2, device=str(device))  # fmt: skip
    return size, cfg, x


CPU_TIMES: list[float] = []  # this process's median CPU seconds per timed call, in call order


def timed(run: Any, repeats: int, sync: bool) -> tuple[float, Any]:
    """The median wall time of ``repeats`` runs after one warm-up (between barriers when ``sync``), and the
    last result; the median CPU time of this process (all its threads) goes to ``CPU_TIMES``: on a shared,
    oversubscribed machine the work a process does is steadier than its wall time."""
    out = run()
    times, cpu = [], []
    for _ in range(repeats):
        if sync:
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        out = run()
        if sync:
            dist.barrier()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    CPU_TIMES.append(sorted(cpu)[len(cpu) // 2])
    return sorted(times)[len(times) // 2], out


def single(args: argparse.Namespace, threads: int, device: torch.device, world: int
           ) -> tuple[float, float, Any, dict[str, Any]]:  # fmt: skip
    """One process: the data-parallel job's time and result, the ``world`` layer jobs' time and results."""
    train = saes_train()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, cfg, x = setup(args, device)
        t_data, res = timed(lambda: train.train_sae(x, cfg), args.repeats, False)
        jobs = {f"layer{i}": x.roll(i, 1) for i in range(world)}
        t_layers, layers = timed(lambda: train.train_saes(jobs, cfg), args.repeats, False)
        return t_data, t_layers, res, layers
    finally:
        torch.set_num_threads(before)


def ranks(args: argparse.Namespace, device: torch.device) -> tuple[float, float, Any, dict[str, Any]]:
    """Inside an initialised group: the data-parallel and layers-on-ranks times (slowest rank) and results."""
    train = saes_train()
    world = dist.get_world_size()
    _, cfg, x = setup(args, device)
    t_data, res = timed(lambda: train.train_sae(x, cfg, parallel="data"), args.repeats, True)
    jobs = {f"layer{i}": x.roll(i, 1) for i in range(world)}
    t_layers, layers = timed(lambda: train.train_saes(jobs, cfg, parallel="layers"), args.repeats, True)
    return t_data, t_layers, res, layers


def params(res: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.detach().cpu().contiguous() for k, v in res.sae.named_parameters()}


def compare(ref: Any, ref_layers: dict[str, Any], got: dict[str, torch.Tensor]) -> tuple[float, float, bool]:
    """The data-parallel result's largest parameter difference relative to that parameter's largest magnitude,
    the largest relative norm of a parameter's difference, and whether the layers are equal."""
    pairs = [(got[f"data.{k}"], v) for k, v in params(ref).items()]
    rel = max(float((g - v).abs().max() / v.abs().max().clamp_min(1e-30)) for g, v in pairs)
    norm = max(float((g - v).norm() / v.norm().clamp_min(1e-30)) for g, v in pairs)
    same = all(torch.equal(got[f"{name}.{k}"], v) for name, r in ref_layers.items() for k, v in params(r).items())
    return rel, norm, same


def report(size: dict[str, int], n: int, t1: tuple[float, float], t1n: tuple[float, float] | None,
           tn: tuple[float, float], diff: tuple[float, float], same: bool, device: torch.device) -> None:  # fmt: skip
    print(f"SAE training: JumpReLU d_in {size['d_in']}, d_sae {size['d_sae']}, global batch {size['batch']}, "
          f"{size['steps']} steps, fp32, {device}")  # fmt: skip
    for i, what in enumerate(("data-parallel (1 SAE)", f"layers on ranks ({n} SAEs)")):
        line = f"  {what}: 1 process {t1[i]:.3f} s"
        if t1n is not None:
            line += f" ({n} threads: {t1n[i]:.3f} s)"
        line += f"; {n} processes {tn[i]:.3f} s; speed-up {t1[i] / tn[i]:.2f}x"
        if t1n is not None:
            line += f" (vs {n} threads: {t1n[i] / tn[i]:.2f}x)"
        print(line)
    exact = "bit-identical" if same else "DIFFERENT"
    rel, norm = diff
    print(f"  data-parallel parameters vs 1 process (fp32 reduction order): largest difference / largest value "
          f"{rel:.1e} (limit 1e-3), |difference| / |parameter| {norm:.1e}; layers on ranks vs 1 process: {exact}")
    sys.stdout.flush()
    assert rel < 1e-3, f"data-parallel result differs by {rel}"
    assert same or device.type == "cuda", "layers-on-ranks results differ from training each alone"


def _spawned(rank: int, args: argparse.Namespace, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.nproc)
    try:
        t_data, t_layers, res, layers = ranks(args, torch.device("cpu"))
        out = {"t_data": torch.tensor(t_data), "t_layers": torch.tensor(t_layers),
               "cpu": torch.tensor(CPU_TIMES[-2:]), **params(res, "data.")}
        for name, r in layers.items():
            out.update(params(r, f"{name}."))
        save_file(out, str(Path(folder) / f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sae_training(args: argparse.Namespace) -> None:
    """Measure and print the speed-ups (module docs).

    ``args``: ``quick``, ``nproc``, ``threads``, ``repeats``; and ``rank``, ``world_size``, ``device``,
    ``torchrun``. With ``torchrun`` (a group initialised, called on every rank) rank 0 measures the
    one-process baseline while the others wait, then every rank trains; otherwise (called once, no group)
    this process measures the baseline and spawns ``nproc`` gloo processes.
    """
    device = torch.device(getattr(args, "device", "cpu"))
    if getattr(args, "torchrun", False):
        rank, n = dist.get_rank(), dist.get_world_size()
        size = setup(args, device)[0]
        base = None
        if rank == 0:
            base = single(args, torch.get_num_threads(), device, n)
        dist.barrier()
        t_data, t_layers, res, layers = ranks(args, device)
        if rank == 0:
            assert base is not None
            got = params(res, "data.")
            for name, r in layers.items():
                got.update(params(r, f"{name}."))
            rel, norm, same = compare(base[2], base[3], got)
            report(size, n, (base[0], base[1]), None, (t_data, t_layers), (rel, norm), same, device)
        return
    n = int(args.nproc)
    size = setup(args, device)[0]
    t1 = single(args, int(args.threads), device, n)
    cpu1 = CPU_TIMES[-2:]
    t1n = single(args, n, device, n) if n != int(args.threads) else None
    with tempfile.TemporaryDirectory() as folder:
        torch.multiprocessing.start_processes(_spawned, args=(args, _free_port(), folder), nprocs=n, join=True,
                                              start_method="spawn")  # fmt: skip
        got = [load_file(str(Path(folder) / f"rank{r}.safetensors")) for r in range(n)]
    tn = (max(float(g["t_data"]) for g in got), max(float(g["t_layers"]) for g in got))
    rels, norms, sames = zip(*(compare(t1[2], t1[3], g) for g in got), strict=True)
    report(size, n, (t1[0], t1[1]), None if t1n is None else (t1n[0], t1n[1]), tn, (max(rels), max(norms)),
           all(sames), device)
    for i, what in enumerate(("data-parallel", "layers on ranks")):
        busiest = max(float(g["cpu"][i]) for g in got)
        print(f"  {what}: CPU seconds, 1 process ({args.threads} thread(s)) {cpu1[i]:.3f} s; busiest of {n} "
              f"processes {busiest:.3f} s; work per process {cpu1[i] / busiest:.2f}x less")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller SAEs")
    parser.add_argument("--nproc", type=int, default=2, help="processes to spawn when not under torchrun")
    parser.add_argument("--threads", type=int, default=1, help="threads of the 1-process baseline (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (the median is printed)")
    args = parser.parse_args()
    wall = time.perf_counter()
    load = os.getloadavg()[0]
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        cuda = torch.cuda.is_available()
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(1)
        dist.init_process_group("nccl" if cuda else "gloo")
        try:
            if dist.get_rank() == 0:
                print(f"{dist.get_world_size()} ranks ({dist.get_backend()}), device {device}, load avg {load:.2f}")
            sae_training(argparse.Namespace(**vars(args), rank=dist.get_rank(), world_size=dist.get_world_size(),
                                            device=device, torchrun=True))  # fmt: skip
        finally:
            dist.destroy_process_group()
    else:
        from common import machine  # benchmarks/ is on sys.path as a script

        print(f"machine: {machine()}")
        sae_training(argparse.Namespace(**vars(args), rank=0, world_size=1, device=torch.device("cpu"),
                                        torchrun=False))  # fmt: skip
        print(f"load avg at the end: {os.getloadavg()[0]:.2f}; total wall time {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()
