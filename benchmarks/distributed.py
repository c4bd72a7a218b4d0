"""Studies across processes: an activation-patching grid split over N processes vs 1 process, in the same run.

    python benchmarks/distributed.py                        # 1 process, then 2 processes (gloo, spawned here)
    python benchmarks/distributed.py --nproc 4 --quick      # 4 processes, a 4-layer model (smoke test)
    torchrun --nproc-per-node 2 benchmarks/distributed.py   # N ranks started by torchrun (NCCL on CUDA, else gloo)
    python benchmarks/distributed.py --no-training          # the patching grid only

The grid: ``activation_patching(site="resid_pre")`` by layer x position on a seeded random Gemma 2
(``benchmarks/common.py``: 12 layers, d_model 768, 32 tokens; ``--quick``: 4 layers, d_model 256, 16
tokens), with the worst-case prompt pair (every position differs, so every patch runs). The baseline is
the same call in one process, outside ``mishax_py.distributed.split()``; the split run times the call
inside ``split()`` on every rank (from a barrier to a barrier: the slowest rank's time). The script checks
that every rank's grid equals the single-process one (1e-5) and prints both times and the speed-up, and
each process's CPU time in the grid (the work each rank does, which the load of other jobs does not change).

Started plainly, it measures the baseline itself (one process, ``--threads`` threads: default 1; with
``--threads-baseline`` the ratio is also printed against one process with as many threads as there are
processes) and then spawns ``--nproc`` processes on a gloo group (one thread each). Under ``torchrun`` each rank takes
``LOCAL_RANK``'s GPU when CUDA is available (NCCL), rank 0 measures the baseline while the others wait.
On one machine the processes share its cores: with 2 processes on 2 cores the speed-up is bounded by 2
and by the load of other jobs (the load average is printed).

SAE training across processes is measured by ``benchmarks/distributed_training.py``: when that file
exists, its ``sae_training(args)`` runs after the grid (``args`` as parsed here, plus ``rank``,
``world_size``, ``device`` and ``torchrun``; started plainly it is called once, in this process, with no
process group; under ``torchrun`` on every rank, with the group initialised).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from common import build, describe, machine, prompt_pairs  # noqa: E402 - benchmarks/ is on sys.path as a script
from safetensors.torch import load_file, save_file

import instrumentation.gemma2 as g2
import mishax_py.distributed as mdist
from mishax_py.studies.activation_patching import activation_patching

SPECS = {
    "full": dict(layers=12, d_model=768, heads=12, kv_heads=4, d_head=64, d_mlp=3072, vocab=512, pos=32),
    "quick": dict(layers=4, d_model=256, heads=4, kv_heads=2, d_head=64, d_mlp=1024, vocab=512, pos=16),
}


def grid(args: argparse.Namespace, device: torch.device) -> tuple[Any, Any]:
    """The model and a function running the patching grid once (its values [layers, pos])."""
    spec = SPECS["quick" if args.quick else "full"]
    im = g2.instrument(build(spec).to(device))
    clean, worst, _ioi, metric = prompt_pairs(spec)
    clean, worst = clean.to(device), worst.to(device)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return activation_patching(im, clean, worst, metric, site="resid_pre").values.float().cpu()

    run()  # warm-up
    return im, run


def timed(run: Any, repeats: int, barrier: Any = None) -> tuple[float, float, torch.Tensor]:
    """The median wall time of ``repeats`` runs (between barriers when ``barrier`` is given), the median CPU
    time of this process in the run itself (its work: what the split divides, whatever the load), and the
    last result."""
    times, cpus, out = [], [], torch.empty(0)
    for _ in range(repeats):
        if barrier is not None:
            barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        out = run()
        cpus.append(time.process_time() - c0)
        if barrier is not None:
            barrier()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], sorted(cpus)[len(cpus) // 2], out


def single(args: argparse.Namespace, threads: int, device: torch.device) -> tuple[float, float, torch.Tensor]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, run = grid(args, device)
        return timed(run, args.repeats)
    finally:
        torch.set_num_threads(before)


def split_ranks(args: argparse.Namespace, device: torch.device) -> tuple[float, float, torch.Tensor]:
    """Inside an initialised group: the split grid's time (the slowest rank's), this rank's CPU time and result."""
    _, run = grid(args, device)
    barrier = dist.barrier
    with mdist.split():
        run()  # warm-up inside the split (the collectives' first use)
        return timed(run, args.repeats, barrier)


def _spawned(rank: int, args: argparse.Namespace, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.nproc)
    try:
        t, cpu, values = split_ranks(args, torch.device("cpu"))
        save_file({"time": torch.tensor(t), "cpu": torch.tensor(cpu), "values": values},
                  str(Path(folder) / f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def report(t1: float, t1n: float | None, tn: float, n: int, ref: torch.Tensor, outs: list[torch.Tensor],
           cpu1: float, cpus: list[float]) -> None:
    err = max(float((o - ref).abs().max()) for o in outs)
    print(f"CPU time of the grid: 1 process {cpu1:.3f} s; per rank " + ", ".join(f"{c:.3f}" for c in cpus)
          + f" s (the busiest rank does {max(cpus) / cpu1:.2f} of the work: {cpu1 / max(cpus):.2f}x less)")
    print(f"1 process: {t1:.3f} s" + (f" (1 thread); {t1n:.3f} s ({n} threads)" if t1n is not None else ""))
    print(f"{n} processes (split): {tn:.3f} s; every rank's grid = 1 process's (max |diff| {err:.1e})")
    print(f"speed-up {n} processes vs 1: {t1 / tn:.2f}x" + (f" (vs 1 process on {n} threads: {t1n / tn:.2f}x)"
                                                           if t1n is not None else ""))
    sys.stdout.flush()
    assert err <= 1e-5, f"split results differ by {err}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _training_hook(args: argparse.Namespace) -> Any:
    """``sae_training`` of ``benchmarks/distributed_training.py`` when that file exists, else ``None``."""
    if args.no_training or not (Path(__file__).parent / "distributed_training.py").is_file():
        return None
    from distributed_training import sae_training  # type: ignore[import-not-found]

    return sae_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 4-layer model")
    parser.add_argument("--nproc", type=int, default=2, help="processes to spawn when not under torchrun")
    parser.add_argument("--threads", type=int, default=1, help="threads of the 1-process baseline (default 1)")
    parser.add_argument("--threads-baseline", action="store_true",
                        help="also time 1 process on --nproc threads (slow on a loaded machine: OpenMP spins)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (the median is printed)")
    parser.add_argument("--no-patching", action="store_true", help="skip the patching grid (SAE training only)")
    parser.add_argument("--no-training", action="store_true", help="skip SAE training (distributed_training.py)")
    args = parser.parse_args()
    spec = SPECS["quick" if args.quick else "full"]
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    wall = time.perf_counter()
    if torchrun:
        cuda = torch.cuda.is_available()
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(1)
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, n = dist.get_rank(), dist.get_world_size()
        if rank == 0:
            print(f"machine: {machine()}; {n} ranks ({dist.get_backend()}), device {device}")
            print(f"model: {describe(spec)}; grid resid_pre [layers, pos], worst-case prompt pair")
        try:
            if not args.no_patching:
                t1 = cpu1 = ref = None
                if rank == 0:
                    t1, cpu1, ref = single(args, torch.get_num_threads(), device)
                dist.barrier()
                tn, cpu, values = split_ranks(args, device)
                outs = [torch.empty_like(values, device=device) for _ in range(n)]
                dist.all_gather(outs, values.to(device))
                cpus = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(n)]
                dist.all_gather(cpus, torch.tensor([cpu], dtype=torch.float64, device=device))
                if rank == 0:
                    assert t1 is not None and cpu1 is not None and ref is not None
                    report(t1, None, tn, n, ref, [o.cpu() for o in outs], cpu1, [float(c) for c in cpus])
            hook = _training_hook(args)
            if hook is not None:
                hook(argparse.Namespace(**vars(args), rank=rank, world_size=n, device=device, torchrun=True))
        finally:
            dist.destroy_process_group()
    else:
        print(f"machine: {machine()}")
        print(f"model: {describe(spec)}; grid resid_pre [layers, pos], worst-case prompt pair")
        cpu = torch.device("cpu")
        if not args.no_patching:
            t1, cpu1, ref = single(args, args.threads, cpu)
            t1n = single(args, args.nproc, cpu)[0] if args.threads_baseline and args.nproc != args.threads else None
            with tempfile.TemporaryDirectory() as folder:
                torch.multiprocessing.start_processes(_spawned, args=(args, _free_port(), folder), nprocs=args.nproc,
                                                      join=True, start_method="spawn")
                got = [load_file(str(Path(folder) / f"rank{r}.safetensors")) for r in range(args.nproc)]
            tn = max(float(g["time"]) for g in got)
            report(t1, t1n, tn, args.nproc, ref, [g["values"] for g in got], cpu1, [float(g["cpu"]) for g in got])
        hook = _training_hook(args)
        if hook is not None:
            hook(argparse.Namespace(**vars(args), rank=0, world_size=1, device=torch.device("cpu"), torchrun=False))
        print(f"load avg at the end: {os.getloadavg()[0]:.2f}; total wall time {time.perf_counter() - wall:.0f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
