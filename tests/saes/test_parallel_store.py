"""saes.store across processes (2 gloo ranks started by the test): each rank collects its block of the
batches into its own part; a collection with one rank killed (SIGKILL) mid-part and both restarted loses and
duplicates nothing (the union equals a single-process collection, row for row, in order); another world
size, another number of batches, or a single-process call on a multi-rank store are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import saes.store
from mishax_py import InstrumentedModel
from saes.store import ActivationStore, StoreError, collect_activations
from tests.helpers import run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU ops: see conftest.one_thread

SITE = "blocks.1.resid_post"
N_BATCHES = 9  # rank 0: batches 0-3 (2 shards of 64 rows), rank 1: batches 4-8

_CHILD = """
import os, signal, sys
from datetime import timedelta
import torch
torch.set_num_threads(1)
import torch.distributed as dist
from instrumentation import gemma2 as g2
from saes.store import collect_activations
from tests.helpers import make_model

dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()
folder, kill = sys.argv[1], sys.argv[2] == "kill"
g = torch.Generator().manual_seed(0)
data = [torch.randint(4, 64, (4, 9), generator=g) for _ in range(int(sys.argv[3]))]

def killing():
    for i, b in enumerate(data):
        if kill and rank == 1 and i == 7:  # rank 1's 4th batch: its 1st shard written, the 3rd batch buffered
            os.kill(os.getpid(), signal.SIGKILL)
        yield b

store = collect_activations(g2.instrument(make_model()), killing(), "blocks.1.resid_post", folder, shard_rows=60,
                            total=len(data), progress=False, parallel="data")
print("FINISHED", store.n_rows, store.complete)
"""


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(4, 64, (4, 9), generator=g) for _ in range(N_BATCHES)]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_killed_multi_rank_collection_resumes_without_loss_or_duplicates(tiny_im: InstrumentedModel,
                                                                        tmp_path: Path) -> None:  # fmt: skip
    """Rank 1 SIGKILLed inside its part (rank 0 finishes its own); both restarted: rank 0's part is kept as it
    was, rank 1 resumes, and the union (rank 0's rows, then rank 1's) is exactly a single-process collection.
    Then: another world size, another number of batches and a single-process call are refused, naming both
    values, and nothing changes."""
    folder = tmp_path / "acts"
    first = run_ranks(_CHILD, 2, str(folder), "kill", str(N_BATCHES), timeout=240)
    assert first[1].returncode == -9 and "FINISHED" not in first[1].stdout, first[1].stderr[-3000:]
    assert "FINISHED" not in first[0].stdout  # it waited for rank 1 at the end, then saw it gone
    top = json.loads((folder / "meta.json").read_text())
    assert top["layout"] == "ranks" and top["world_size"] == 2 and top["batches"] == N_BATCHES
    assert top["parts"] == ["rank0-of-2", "rank1-of-2"]
    part0, part1 = ActivationStore(folder / "rank0-of-2"), ActivationStore(folder / "rank1-of-2")
    assert part0.complete and part0.meta["batches_done"] == 4 and len(part0.shards) == 2
    assert not part1.complete and part1.meta["batches_done"] == 2 and len(part1.shards) == 1
    killed = ActivationStore(folder)
    assert not killed.complete and killed.n_rows == 6 * 32
    rank0_files = {k: v for k, v in files(folder).items() if k.startswith("rank0-of-2/")}

    second = run_ranks(_CHILD, 2, str(folder), "resume", str(N_BATCHES), timeout=240)
    for rank, proc in enumerate(second):
        assert proc.returncode == 0, f"rank {rank}:\n{proc.stderr[-3000:]}"
        assert f"FINISHED {N_BATCHES * 32} True" in proc.stdout
    union = ActivationStore(folder)
    whole = collect_activations(tiny_im, batches(), SITE, tmp_path / "whole", shard_rows=60, progress=False)
    assert union.complete and union.n_rows == whole.n_rows == N_BATCHES * 4 * 8
    assert union.shards == ["rank0-of-2/shard_00000.safetensors", "rank0-of-2/shard_00001.safetensors",
                            "rank1-of-2/shard_00000.safetensors", "rank1-of-2/shard_00001.safetensors",
                            "rank1-of-2/shard_00002.safetensors"]  # fmt: skip
    assert torch.equal(union.load_all(), whole.load_all())  # no row lost or stored twice, in order
    assert {k: v for k, v in files(folder).items() if k.startswith("rank0-of-2/")} == rank0_files
    assert not list(folder.rglob("*.tmp"))
    assert sum(b.shape[0] for b in union.iter_batches(50, seed=1)) == union.n_rows  # readers see the union

    before = files(folder)
    with pytest.raises(StoreError, match=r"setting 'world_size' differs: the store was collected by 2 ranks "
                                         r"\(rank0-of-2, rank1-of-2\), this call runs in one process"):  # fmt: skip
        collect_activations(tiny_im, batches(), SITE, folder, shard_rows=60, progress=False)
    for rank_world, total, message in [
        ((0, 3), N_BATCHES, r"'world_size' differs: the store was collected by 2 ranks \(rank0-of-2, rank1-of-2\), "
                            r"this run has 3; resume with 2 ranks"),  # fmt: skip
        ((1, 2), N_BATCHES - 1, r"'batches' differs: the store splits 9 batches over its ranks, this call has 8"),
    ]:
        with pytest.MonkeyPatch.context() as mp:  # what a rank of another group would see
            mp.setattr(saes.store, "rank_world", lambda rw=rank_world: rw)
            with pytest.raises(StoreError, match=message):
                collect_activations(tiny_im, batches(), SITE, folder, shard_rows=60, progress=False, total=total,
                                    parallel="data")  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:  # a multi-rank run into a single-process store
        mp.setattr(saes.store, "rank_world", lambda: (0, 2))
        with pytest.raises(StoreError, match=r"collected by one process, this run has 2 ranks"):
            collect_activations(tiny_im, batches(), SITE, tmp_path / "whole", progress=False, parallel="data")
        with pytest.raises(ValueError, match=r"pass total= \(the number of batches\) or a sized sequence"):
            collect_activations(tiny_im, iter(batches()), SITE, tmp_path / "new", progress=False, parallel="data")
    assert files(folder) == before


def test_parallel_collection_without_a_process_group_is_the_plain_call(tiny_im: InstrumentedModel,
                                                                        tmp_path: Path) -> None:  # fmt: skip
    plain = collect_activations(tiny_im, batches()[:3], SITE, tmp_path / "a", progress=False)
    alone = collect_activations(tiny_im, batches()[:3], SITE, tmp_path / "b", progress=False, parallel="data")
    assert files(tmp_path / "a") == files(tmp_path / "b") and alone.n_rows == plain.n_rows
    with pytest.raises(ValueError, match=r"parallel must be None or 'data', got 'layers'"):
        collect_activations(tiny_im, batches(), SITE, tmp_path / "c", progress=False, parallel="layers")
