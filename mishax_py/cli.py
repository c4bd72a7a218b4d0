"""The ``mishax-py`` command line.

``mishax-py sites [--model PATH]``: print the site catalogue (name, shape, dtype,
where in the HF code, TransformerLens alias) of a Gemma 2 model — by default a
built-in small random one, so it works offline on a fresh install.

``mishax-py demo [--out DIR] [--model PATH]``: the end-to-end study on the bundled
trained model (see ``mishax_py.zoo.demo``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def builtin_random_gemma2(seed: int = 0):  # -> Gemma2ForCausalLM
    """A small random-weight Gemma 2 (4 layers, d_model 256, GQA 4/2 heads, sliding window 16)."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        sliding_window=16,
        max_position_embeddings=512,
        attn_implementation="eager",  # type: ignore[call-arg]  # taken by PretrainedConfig's **kwargs
    )
    return Gemma2ForCausalLM(config).eval()


def load_model(path: str | None):  # -> Gemma2ForCausalLM
    """The model for a CLI command: built-in random (None), a bundled zoo name, or a local checkpoint folder
    (through :func:`mishax_py.zoo.models.load_checkpoint`, the one loader the demo uses too)."""
    if path is None:
        return builtin_random_gemma2()
    from mishax_py.zoo.models import load_checkpoint

    try:
        return load_checkpoint(path, tokenizer=False)[0]
    except FileNotFoundError as e:
        raise SystemExit(f"mishax-py: --model {e}") from None


def cmd_sites(args: argparse.Namespace) -> int:
    import instrumentation.gemma2 as g2

    model = load_model(args.model)
    im = g2.instrument(model)
    cfg = model.config
    print(
        f"Gemma 2: {cfg.num_hidden_layers} layers, d_model {cfg.hidden_size}, {cfg.num_attention_heads} heads "
        f"({cfg.num_key_value_heads} kv) × d_head {cfg.head_dim}, d_mlp {cfg.intermediate_size}, vocab {cfg.vocab_size}"
    )
    names = im.site_names() if args.filter is None else im.site_names(args.filter)
    for name in names:
        print(im.site_info(name))
    print(f"{len(names)} sites")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from mishax_py.zoo.demo import run_demo
    except ImportError as e:  # pragma: no cover - only before the demo lands
        raise SystemExit(f"mishax-py demo is not available in this build: {e}") from e
    try:
        run_demo(out=args.out, model=args.model, progress=not args.no_progress)
    except FileNotFoundError as e:
        raise SystemExit(f"mishax-py demo: {e}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mishax-py", description="Look inside Gemma 2 and change what it computes.")
    sub = parser.add_subparsers(dest="command", required=True)
    sites = sub.add_parser("sites", help="print the site catalogue with shapes")
    sites.add_argument("--model", default=None, help="bundled model name or local Gemma 2 checkpoint folder "
                       "(default: a built-in small random Gemma 2)")
    sites.add_argument("--filter", default=None, help="only sites matching this name, alias or glob")
    sites.set_defaults(func=cmd_sites)
    demo = sub.add_parser("demo", help="run the end-to-end study on the bundled model and write a report")
    demo.add_argument("--out", default="mishax_demo", help="report folder (default: ./mishax_demo)")
    demo.add_argument("--model", default=None, help="a local Gemma 2 checkpoint folder (default: the bundled model)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
