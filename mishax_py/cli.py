"""The ``mishax-py`` command line.

``mishax-py sites [--model NAME|DIR] [--filter PATTERN] [--no-progress]``: print the site
catalogue (name, shape, dtype, where in the HF code, TransformerLens alias) of a Gemma 2 or Gemma 3
model: by default the bundled trained ``gemma2-tiny`` (offline, so it works on a fresh install).
Checkpoint folders are loaded and instrumented by their ``config.json`` ``model_type``
(:data:`mishax_py.zoo.models.INSTRUMENTATION`: ``gemma2``, ``gemma3_text``, ``gemma3``).

``mishax-py demo [--out DIR] [--model NAME|DIR] [--no-progress]``: the end-to-end study on the
bundled trained model (see ``mishax_py.zoo.demo``).

A mistake the user can fix (a bad argument, a ``--model`` that is not a Gemma 2 / Gemma 3 checkpoint
folder, a ``--filter`` that matches no site) prints one line on stderr, ``mishax-py: ...``, and
exits with status 2 (as argparse does for a bad option). ``--model`` is checked from the file
system and its ``config.json`` before anything loads. Progress bars follow the library's rule
(:mod:`mishax_py.progress`): shown when stderr is a terminal; ``--no-progress`` silences every
one, transformers' weight-loading bar and huggingface_hub's included.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["EXIT_USAGE", "UsageError", "main"]

#: Exit status of a user error (argparse's).
EXIT_USAGE = 2
#: The model ``mishax-py sites`` and ``mishax-py demo`` use without ``--model``.
DEFAULT_MODEL = "gemma2-tiny"
#: How to get a checkpoint folder: the installed huggingface_hub's command (``hf``; ``huggingface-cli`` is gone).
DOWNLOAD_HINT = "`hf download google/gemma-2-2b --local-dir DIR`"
# weight files from_pretrained reads (one is enough)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


class UsageError(Exception):
    """A mistake in the command line; its message is the one line printed after ``mishax-py: ``."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block): raised as :class:`UsageError`."""

    def error(self, message: str) -> NoReturn:
        sub = self.prog.removeprefix("mishax-py").strip()
        raise UsageError(f"{sub + ': ' if sub else ''}{message} (see `{self.prog} --help`)")


def check_model(value: str | None) -> str:
    """The ``--model`` value checked before anything loads: a bundled name, or a Gemma 2 / Gemma 3 checkpoint folder.

    Returns the name or path to load (``DEFAULT_MODEL`` for ``None``).

    Raises:
        UsageError: an unknown name or missing path, a file, a folder without ``config.json`` or
            weights, a config that is not JSON or of a ``model_type`` the zoo does not load; the message says
            what to pass (and names the supported ``model_type`` values).
    """
    from mishax_py.zoo.models import FAMILY_LABELS, INSTRUMENTATION, MODELS, supported_model_types

    if value is None or value in MODELS:
        return value or DEFAULT_MODEL
    path = Path(value)
    bundled = ", ".join(MODELS)
    if not path.exists():
        raise UsageError(f"--model {value!r} is neither a bundled model ({bundled}) nor a folder; download a "
                         f"checkpoint with {DOWNLOAD_HINT} and pass DIR")
    if not path.is_dir():
        raise UsageError(f"--model {value!r} is a file; pass the checkpoint folder that holds config.json and the "
                         "weights")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise UsageError(f"--model {value!r} has no config.json: not a Hugging Face checkpoint folder (download one "
                         f"with {DOWNLOAD_HINT})")
    try:
        cfg: Any = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"--model {value!r}: {cfg_path} is not readable JSON ({_one_line(e)})") from None
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type not in INSTRUMENTATION:
        families = " and ".join(dict.fromkeys(FAMILY_LABELS.values()))
        raise UsageError(f"--model {value!r} holds a {model_type or 'untyped'} model (config.json model_type "
                         f"{model_type!r}); mishax-py instruments {families} (model_type "
                         f"{supported_model_types()})")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise UsageError(f"--model {value!r} has config.json but no weights ({', '.join(_WEIGHT_FILES)})")
    return value


def _one_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (or its type)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def load_model(name_or_path: str):  # -> Gemma2ForCausalLM | Gemma3ForCausalLM | Gemma3ForConditionalGeneration
    """Load a model :func:`check_model` accepted, through :func:`mishax_py.zoo.models.load_checkpoint` (the
    loader the demo uses too); a checkpoint that still fails to load is a :class:`UsageError`."""
    from safetensors import SafetensorError

    from mishax_py.zoo.models import load_checkpoint

    try:
        return load_checkpoint(name_or_path, tokenizer=False)[0]
    except (OSError, ValueError, TypeError, KeyError, SafetensorError) as e:  # a broken or incompatible checkpoint
        raise UsageError(f"--model {name_or_path!r} could not be loaded ({type(e).__name__}: {_one_line(e)})") from None


def _filter_error(im: Any, pattern: str, n_layers: int) -> UsageError:
    """What to say when ``--filter pattern`` matches no site of a model with ``n_layers`` layers."""
    from mishax_py.sites import UnknownSiteError

    m = re.match(r"blocks\.(\d+)(\.|$)", pattern)
    if m and int(m.group(1)) >= n_layers:
        return UsageError(f"--filter {pattern!r}: the model has no layer {m.group(1)}; it has layers 0-{n_layers - 1} "
                          f"(e.g. 'blocks.{n_layers - 1}.*')")
    if not pattern.startswith("blocks."):
        try:
            im.site_names(f"blocks.*.{pattern}")
        except UnknownSiteError:
            pass
        else:
            return UsageError(f"--filter {pattern!r} is a per-layer site: name the layer, e.g. 'blocks.0.{pattern}', "
                              f"or all {n_layers} with 'blocks.*.{pattern}'")
    pool = list(im.site_names()) + list(im.catalogue.alias_to_name)
    close = difflib.get_close_matches(pattern, pool, n=4, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    return UsageError(f"--filter {pattern!r} matches no site{hint} (names, TransformerLens aliases and globs such as "
                      "'blocks.*.resid_post' work; `mishax-py sites` lists them all)")


def cmd_sites(args: argparse.Namespace) -> int:
    from mishax_py.sites import UnknownSiteError
    from mishax_py.zoo.models import FAMILY_LABELS, instrument

    model = load_model(check_model(args.model))
    im = instrument(model)  # instrumentation.gemma2 / .gemma3 by config.model_type
    d = im.family.dims
    try:
        names = im.site_names() if args.filter is None else im.site_names(args.filter)
    except UnknownSiteError:
        raise _filter_error(im, args.filter, d.n_layers) from None
    print(
        f"{FAMILY_LABELS[model.config.model_type]}: {d.n_layers} layers, d_model {d.d_model}, {d.n_heads} heads "
        f"({d.n_kv_heads} kv) × d_head {d.d_head}, d_mlp {d.d_mlp}, vocab {d.vocab}"
    )
    for name in names:
        print(im.site_info(name))
    print(f"{len(names)} sites")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    model = None if args.model is None else check_model(args.model)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} is a file; pass a folder for the report")
    from mishax_py.zoo.demo import run_demo

    try:
        run_demo(out=out, model=model, progress=args.progress)
    except FileNotFoundError as e:  # bundled files missing, or the checkpoint went away
        raise UsageError(f"demo: {_one_line(e)}") from None
    return 0


def _on_terminal() -> bool:
    """Whether stderr is a terminal (where progress bars go)."""
    return sys.stderr.isatty()


@contextlib.contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    """With ``show=False``, transformers' and huggingface_hub's tqdm bars (weight loading, downloads) are off
    for the command, and restored afterwards."""
    if show:
        yield
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    transformers_on, hub_on = hf_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # transformers' switch turns huggingface_hub's off too
    try:
        yield
    finally:
        if transformers_on:
            hf_logging.enable_progress_bar()  # and huggingface_hub's on
        if hub_on:
            hub_utils.enable_progress_bars()
        elif transformers_on:
            hub_utils.disable_progress_bars()


_NO_PROGRESS_HELP = "no progress bars, weight loading's included (default: bars when stderr is a terminal)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mishax-py", description="Look inside Gemma 2 and Gemma 3 and change what they compute.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sites = sub.add_parser("sites", help="print the site catalogue with shapes")
    sites.add_argument("--model", default=None, help=f"bundled model name or local Gemma 2 / Gemma 3 checkpoint folder "
                       f"(default: the bundled trained {DEFAULT_MODEL})")
    sites.add_argument("--filter", default=None, help="only sites matching this name, alias or glob")
    sites.add_argument("--no-progress", action="store_true", help=_NO_PROGRESS_HELP)
    sites.set_defaults(func=cmd_sites)
    demo = sub.add_parser("demo", help="run the end-to-end study on the bundled model and write a report")
    demo.add_argument("--out", default="mishax_demo", help="report folder (default: ./mishax_demo)")
    demo.add_argument("--model", default=None, help=f"bundled model name or local Gemma 2 / Gemma 3 checkpoint folder "
                      f"(default: the bundled {DEFAULT_MODEL})")
    demo.add_argument("--no-progress", action="store_true", help=_NO_PROGRESS_HELP)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns its exit status (``EXIT_USAGE`` after printing a user error's one line)."""
    try:
        args = build_parser().parse_args(argv)
        args.progress = not args.no_progress and _on_terminal()
        with _progress_bars(args.progress):
            return int(args.func(args))
    except UsageError as e:
        print(f"mishax-py: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mishax-py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
