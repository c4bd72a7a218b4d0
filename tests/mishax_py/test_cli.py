"""The mishax-py command line: the bundled model by default, one-line user errors (status 2), quiet bars."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

import mishax_py.cli as cli
from mishax_py.cli import main
from mishax_py.zoo.models import model_path
from tests.helpers import make_gemma3, make_model, needs_model


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The command's stderr, which must be exactly one line starting ``mishax-py: `` (and stdout empty)."""
    out, err = capsys.readouterr()
    assert out == "", out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mishax-py: "), err
    return lines[0]


@needs_model
def test_sites_defaults_to_the_bundled_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sites"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "Gemma 2: 4 layers, d_model 64, 4 heads (2 kv) × d_head 16, d_mlp 256, vocab 133"
    assert lines[-1] == f"{1 + 4 * 21 + 2} sites"
    assert any(line.startswith("blocks.3.attn.pattern") and "[batch, 4, pos, key_pos]" in line for line in lines)
    assert any(line.startswith("blocks.0.attn.k ") and "[batch, pos, 2, 16]" in line for line in lines)
    assert main(["sites", "--model", "gemma2-tiny", "--filter", "logits"]) == 0
    assert "[batch, pos, 133]" in capsys.readouterr().out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Gemma 2 checkpoint folder (saved before any test captures stderr)."""
    path = tmp_path_factory.mktemp("cli") / "ckpt"
    make_model().save_pretrained(path)
    return path


def test_sites_on_a_local_checkpoint_with_filter(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sites", "--model", str(ckpt), "--filter", "blocks.*.hook_resid_post"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("Gemma 2: 2 layers, d_model 32")
    assert [line.split()[0] for line in lines[1:-1]] == ["blocks.0.resid_post", "blocks.1.resid_post"]


@pytest.mark.parametrize(("pattern", "says"), [
    ("hook_z", "'blocks.*.hook_z'"),  # a per-layer TransformerLens name without its layer
    ("blocks.9.*", "no layer 9; it has layers 0-1"),
    ("blocks.2.attn.z", "no layer 2; it has layers 0-1"),
    ("resid_pst", "closest: blocks.1.resid_post"),
])
def test_a_filter_matching_no_site_is_one_line(ckpt: Path, capsys: pytest.CaptureFixture[str], pattern: str,
                                               says: str) -> None:
    assert main(["sites", "--model", str(ckpt), "--filter", pattern]) == 2
    line = one_error_line(capsys)
    assert repr(pattern) in line and says in line, line


def test_sites_on_a_gemma3_checkpoint_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--model DIR`` of a ``Gemma3ForCausalLM`` folder: loaded as Gemma 3 and instrumented by
    ``instrumentation.gemma3`` (its own sites listed), through the zoo's dispatch by ``model_type``."""
    ckpt = tmp_path / "gemma3"
    make_gemma3(seed=3).save_pretrained(ckpt)
    capsys.readouterr()
    assert main(["sites", "--model", str(ckpt), "--filter", "blocks.*.attn.q_normed"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Gemma 3: 6 layers, d_model 32, 4 heads (2 kv) × d_head 8, d_mlp 48, vocab 64"
    assert [line.split()[0] for line in lines[1:-1]] == [f"blocks.{i}.attn.q_normed" for i in range(6)]
    assert lines[-1] == "6 sites"
    assert main(["sites", "--model", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "blocks.5.attn.k_normed" in out and "blocks.0.attn.rot_q" in out


def test_sites_on_a_multimodal_gemma3_checkpoint_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A ``Gemma3ForConditionalGeneration`` folder (model_type ``gemma3``): the text decoder's sites."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    text = make_gemma3(seed=4).config
    text.vocab_size = 300
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
                       boi_token_index=297, eoi_token_index=298)
    ckpt = tmp_path / "gemma3-mm"
    Gemma3ForConditionalGeneration(cfg).eval().save_pretrained(ckpt)
    capsys.readouterr()
    assert main(["sites", "--model", str(ckpt), "--filter", "blocks.2.attn.*_normed"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Gemma 3: 6 layers, d_model 32, 4 heads (2 kv) × d_head 8, d_mlp 48, vocab 300"
    assert [line.split()[0] for line in lines[1:-1]] == ["blocks.2.attn.q_normed", "blocks.2.attn.k_normed"]


def test_an_unsupported_model_type_names_it_and_the_supported_ones(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = _folder(tmp_path, "llama")
    (path / "model.safetensors").write_text("unused")
    assert main(["sites", "--model", str(path)]) == 2
    line = one_error_line(capsys)
    assert "model_type 'llama'" in line and all(t in line for t in ("'gemma2'", "'gemma3_text'", "'gemma3'")), line


def _folder(tmp_path: Path, kind: str) -> Path:
    """A ``--model`` value that is not a usable Gemma 2 checkpoint folder, of the given kind."""
    path = tmp_path / kind
    if kind == "missing":
        return path
    if kind == "file":
        path.write_text("not a folder")
        return path
    path.mkdir()
    if kind == "no-config":
        return path
    if kind == "bad-json":
        (path / "config.json").write_text("{not json")
    elif kind == "llama":
        (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    else:
        shutil.copy(model_path("gemma2-tiny") / "config.json", path / "config.json")
        if kind == "corrupt-weights":
            (path / "model.safetensors").write_text("garbage")
    return path


@pytest.mark.parametrize(("kind", "says"), [
    ("missing", "neither a bundled model (gemma2-tiny, gemma3-tiny) nor a folder; download a checkpoint with "
                "`hf download "),
    ("file", "is a file"),
    ("no-config", "has no config.json"),
    ("bad-json", "is not readable JSON"),
    ("llama", "holds a llama model"),
    ("no-weights", "has config.json but no weights"),
])
def test_model_paths_are_checked_before_anything_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch, kind: str, says: str) -> None:
    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cli, "load_model", no_loading)
    monkeypatch.setattr("mishax_py.zoo.demo.run_demo", no_loading)
    path = _folder(tmp_path, kind)
    for command in (["sites", "--model", str(path)], ["demo", "--out", str(tmp_path / "out"), "--model", str(path)]):
        assert main(command) == 2
        line = one_error_line(capsys)
        assert repr(str(path)) in line and says in line, line
        assert "huggingface-cli" not in line


def test_a_checkpoint_that_fails_to_load_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _folder(tmp_path, "corrupt-weights")
    assert main(["sites", "--model", str(path)]) == 2
    assert "could not be loaded (SafetensorError" in one_error_line(capsys)


@pytest.mark.parametrize("argv", [[], ["sites", "--bogus"], ["demo", "--out"], ["frobnicate"]])
def test_argument_errors_are_one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert main(argv) == 2
    assert "--help" in one_error_line(capsys)


def test_demo_out_that_is_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "report").write_text("")
    assert main(["demo", "--out", str(tmp_path / "report")]) == 2
    assert "--out" in one_error_line(capsys)


def test_hints_name_a_command_of_the_installed_huggingface_hub() -> None:
    scripts = {ep.name for ep in importlib.metadata.distribution("huggingface_hub").entry_points
               if ep.group == "console_scripts"}
    assert cli.DOWNLOAD_HINT.startswith("`hf download ") and "hf" in scripts


@needs_model
def test_no_progress_silences_every_bar(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal the weight-loading bar shows; ``--no-progress`` leaves stderr empty and restores the process's
    transformers bar setting afterwards (the demo's run: tests/mishax_py/zoo/test_demo.py)."""
    monkeypatch.setattr(cli, "_on_terminal", lambda: True)
    assert main(["sites", "--filter", "logits"]) == 0
    assert "Loading weights" in capsys.readouterr().err
    assert main(["sites", "--filter", "logits", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    assert hf_logging.is_progress_bar_enabled()


@needs_model
def test_console_script_entry_point_runs(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "mishax_py.cli", "sites", "--filter", "logits"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "logits" in done.stdout and "1 sites" in done.stdout
    assert done.stderr == ""  # no bar when stderr is not a terminal
    # a user error in a fresh process: status 2, one line, no traceback
    done = subprocess.run([sys.executable, "-m", "mishax_py.cli", "sites", "--model", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("mishax-py: --model "), done.stderr
