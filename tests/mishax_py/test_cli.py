"""The mishax-py command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mishax_py.cli import main
from tests.helpers import make_model


def test_sites_on_the_builtin_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sites"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].startswith("Gemma 2: 4 layers, d_model 256")
    assert lines[-1] == f"{1 + 4 * 21 + 2} sites"
    assert any(line.startswith("blocks.3.attn.pattern") and "[batch, 4, pos, key_pos]" in line for line in lines)
    assert any(line.startswith("blocks.0.attn.k ") and "[batch, pos, 2, 64]" in line for line in lines)


def test_sites_on_a_local_checkpoint_with_filter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_model().save_pretrained(tmp_path / "ckpt")
    assert main(["sites", "--model", str(tmp_path / "ckpt"), "--filter", "blocks.*.hook_resid_post"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("Gemma 2: 2 layers, d_model 32")
    assert [line.split()[0] for line in lines[1:-1]] == ["blocks.0.resid_post", "blocks.1.resid_post"]


def test_missing_model_path_says_what_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="neither a bundled model nor a local folder|Download a checkpoint"):
        main(["sites", "--model", str(tmp_path / "nope")])


def test_console_script_entry_point_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "mishax_py.cli", "sites", "--filter", "logits"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "logits" in done.stdout and "1 sites" in done.stdout
