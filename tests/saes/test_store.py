"""saes.store: resuming a collection only with the settings it was made with, a collection killed with
SIGKILL and resumed equal to an uninterrupted one, unreadable shards named."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from instrumentation import gemma2 as g2
from mishax_py import InstrumentedModel
from saes.store import ActivationStore, StoreError, collect_activations
from tests.helpers import REPO_ROOT, make_model

pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU ops: see conftest.one_thread

SITE = "blocks.1.resid_post"


def batches(n: int = 6, seed: int = 0) -> list[torch.Tensor]:
    """``n`` batches of token ids ``[4, 9]`` (ids 4..63)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 64, (4, 9), generator=g) for _ in range(n)]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of ``folder`` (name -> bytes)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def interrupted_at(data: list[torch.Tensor], stop: int) -> Iterator[torch.Tensor]:
    """The batches up to ``stop``, then an exception (an interrupted collection)."""
    for i, b in enumerate(data):
        if i == stop:
            raise KeyboardInterrupt
        yield b


def partial_store(im: InstrumentedModel, folder: Path, **kw: object) -> dict[str, bytes]:
    """A collection interrupted after 2 written shards (4 batches; shard_rows=60); its files."""
    with pytest.raises(KeyboardInterrupt):
        collect_activations(im, interrupted_at(batches(), 5), SITE, folder, shard_rows=60, progress=False, **kw)
    store = ActivationStore(folder)
    assert not store.complete and len(store.shards) == 2 and store.meta["batches_done"] == 4
    return snapshot(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"drop_bos": False}, r"'drop_bos' differs: the store has True, this call asks for False"),
        ({"dtype": torch.float16}, r"'dtype' differs: the store has 'float32', this call asks for 'float16'"),
        ({"site": "blocks.0.resid_post"}, r"'site' differs: the store holds activations of 'blocks.1.resid_post', "
                                          r"this call asks for 'blocks.0.resid_post'"),  # fmt: skip
        ({"model": "other"}, r"'model' differs: the store has Gemma2ForCausalLM \(weights sha256 [0-9a-f]{12}\), "
                             r"this call's model is Gemma2ForCausalLM \(weights sha256 [0-9a-f]{12}\)"),  # fmt: skip
        ({"batches": "other"}, r"'batches' differ: the first 4 batches .* are not the ones the store was collected "
                               r"from"),  # fmt: skip
        ({"batches": "fewer"}, r"'batches' differ: the store already holds 4 batches, this call's batches end "
                               r"after 3"),  # fmt: skip
    ],
)
def test_resume_with_other_settings_is_refused(tiny_im: InstrumentedModel, tmp_path: Path, change: dict,
                                               message: str) -> None:  # fmt: skip
    """Resuming with another drop_bos, dtype, site, model or other batches is refused with the setting and both
    values, and nothing in the store changes (before: float16 shards appended to float32 ones, meta.json
    rewritten with rows of the other setting)."""
    folder = tmp_path / "acts"
    before = partial_store(tiny_im, folder)
    im, site, data = tiny_im, SITE, batches()
    kw: dict[str, object] = {}
    if "model" in change:
        im = g2.instrument(make_model(seed=1))
    elif "site" in change:
        site = change["site"]
    elif change.get("batches") == "other":
        data = batches(seed=5)
    elif change.get("batches") == "fewer":
        data = data[:3]
    else:
        kw = change
    with pytest.raises(StoreError, match=message):
        collect_activations(im, data, site, folder, shard_rows=60, progress=False, **kw)
    assert snapshot(folder) == before


def test_stores_without_a_record_of_a_setting_are_refused(tiny_im: InstrumentedModel, tmp_path: Path) -> None:
    """A store whose meta.json lacks a setting (written by an older version) is not resumed blindly."""
    folder = tmp_path / "acts"
    partial_store(tiny_im, folder)
    meta = json.loads((folder / "meta.json").read_text())
    del meta["model"]
    (folder / "meta.json").write_text(json.dumps(meta))
    before = snapshot(folder)
    with pytest.raises(StoreError, match=r"meta\.json does not record 'model'"):
        collect_activations(tiny_im, batches(), SITE, folder, shard_rows=60, progress=False)
    assert snapshot(folder) == before


def test_same_settings_resume_and_a_complete_store_is_returned_unchanged(tiny_im: InstrumentedModel,
                                                                         tmp_path: Path) -> None:  # fmt: skip
    folder = tmp_path / "acts"
    partial_store(tiny_im, folder)
    store = collect_activations(tiny_im, batches(), SITE, folder, shard_rows=60, progress=False)
    assert store.complete and store.n_rows == 6 * 4 * 8 and store.dtype == torch.float32 and store.drop_bos
    done = snapshot(folder)
    again = collect_activations(tiny_im, batches(), SITE, folder, shard_rows=60, progress=False)
    assert again.n_rows == store.n_rows and snapshot(folder) == done


def test_unreadable_shards_are_named(tiny_im: InstrumentedModel, tmp_path: Path) -> None:
    """A truncated, missing or reshaped shard raises StoreError naming the shard file (before: a bare
    SafetensorError with no file name)."""
    folder = tmp_path / "acts"
    store = collect_activations(tiny_im, batches(), SITE, folder, shard_rows=60, progress=False)
    shard1 = folder / store.shards[1]
    full = shard1.read_bytes()
    shard1.write_bytes(full[: len(full) // 2])
    for read in (lambda: store.load_shard(1), store.load_all, lambda: list(store.iter_batches(16, shuffle=False))):
        with pytest.raises(StoreError, match=r"acts/shard_00001\.safetensors: .*(truncated|corrupt)"):
            read()
    shard1.unlink()
    with pytest.raises(StoreError, match=r"shard_00001\.safetensors: .*missing"):
        store.load_shard(1)
    from safetensors.torch import save_file

    save_file({"activations": torch.zeros(5, 32)}, str(shard1))
    with pytest.raises(StoreError, match=r"shard_00001\.safetensors: holds \[5, 32\], meta\.json says \[\d+, 32\]"):
        store.load_shard(1)


_COLLECT_CHILD = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from instrumentation import gemma2 as g2
from saes import files
from saes.store import collect_activations
from tests.helpers import make_model

folder, kill_at = sys.argv[1], sys.argv[2]
g = torch.Generator().manual_seed(0)
data = [torch.randint(4, 64, (4, 9), generator=g) for _ in range(9)]

def killing():
    for i, b in enumerate(data):
        if kill_at == "batch" and i == 5:  # 2 shards written, batch 4 buffered: SIGKILL
            os.kill(os.getpid(), signal.SIGKILL)
        yield b

if kill_at == "meta":  # SIGKILL after the 2nd shard file is in place, before meta.json lists it
    replace, n = os.replace, []
    def replace_then_die(src, dst):
        if str(dst).endswith("meta.json") and len(n) == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if str(dst).endswith("meta.json"):
            n.append(dst)
        replace(src, dst)
    files.os.replace = replace_then_die

collect_activations(g2.instrument(make_model()), killing(), "blocks.1.resid_post", folder, shard_rows=60,
                    progress=False)
print("FINISHED")
"""


@pytest.mark.parametrize("kill_at", ["batch", "meta"])
def test_killed_collection_resumes_without_loss_or_duplicates(tiny_im: InstrumentedModel, tmp_path: Path,
                                                              kill_at: str) -> None:  # fmt: skip
    """A multi-shard collection killed with SIGKILL (mid-shard, or between a shard's file and meta.json) and
    resumed holds exactly the rows of an uninterrupted collection, in order."""
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(4, 64, (4, 9), generator=g) for _ in range(9)]
    folder = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", _COLLECT_CHILD, str(folder), kill_at], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -9 and "FINISHED" not in proc.stdout, proc.stderr
    killed = ActivationStore(folder)
    assert not killed.complete and len(killed.shards) >= 1
    resumed = collect_activations(tiny_im, data, SITE, folder, shard_rows=60, progress=False)
    whole = collect_activations(tiny_im, data, SITE, tmp_path / "whole", shard_rows=60, progress=False)
    assert resumed.complete and resumed.n_rows == whole.n_rows == 9 * 4 * 8
    assert resumed.shards == whole.shards
    assert torch.equal(resumed.load_all(), whole.load_all())
    assert not list(folder.glob("*.tmp"))  # a killed write's temporary file is cleaned up on resume
