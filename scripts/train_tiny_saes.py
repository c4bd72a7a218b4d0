#!/usr/bin/env python
"""Train the SAEs and transcoders shipped with the bundled tiny Gemma 2 (``mishax_py.zoo.load_saes``).

What it trains (all JumpReLU, Gemma Scope recipe via :mod:`saes.train`):

* residual-stream SAEs on ``blocks.L.resid_post`` for ``--res-layers`` (default 1, right after
  the induction heads, and 3, the last layer's output);
* transcoders ``blocks.L.ln2_normalized -> blocks.L.mlp_out`` for ``--tc-layers`` (default
  every layer, so attribution graphs replace every MLP).

Data: activations of the bundled model on a mix of the tasks it was trained on
(``mishax_py.zoo.tasks``: induction and key-value recall prompts, lengths drawn per batch,
no padding), collected with :func:`saes.train.collect_activations` into activation stores
(BOS dropped). A held-out set drawn from other seeds gives the numbers recorded in the
registry: L0, FVU, dead features, and the delta LM loss when the reconstruction replaces
the site (``keep_error=False``) -- the increase in next-token cross-entropy on the tasks'
scored targets (the tokens the model can predict) -- plus the task accuracies when spliced.

Deviations from the Gemma Scope recipe, for a 64-wide model trained for 2000 steps instead of
billions of tokens: learning rate 5e-3 (not 7e-5), θ initialised at 0.02 and kernel bandwidth
ε = 0.01 (not 0.001 / 0.001: with inputs scaled to unit mean squared norm, a 64-dim model's
pre-activations are ~6x larger than a 2304-dim one's, and with ε = 0.001 the thresholds barely
move in 2000 steps), and λ steered towards a target L0 (``TrainConfig.target_l0``).

Transcoders are trained here with the same pieces (the JumpReLU / Heaviside straight-through
estimators of :mod:`saes.train`, λ warm-up, Adam β = (0, 0.999), unit-norm decoder rows)
since :func:`saes.train.train_sae` fits SAEs (input == output). Their inputs and targets
are scaled to unit mean squared norm during training and the scales are folded back in
afterwards, so the saved file follows the plain Gemma Scope formula on raw activations.

Output: ``<out>/<name>/params.npz`` in Gemma Scope's layout (``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_out]``, ``b_enc``, ``b_dec``, ``threshold``; float32) and
``<out>/registry.json``. Everything is seeded and single-process; a few minutes on 2 cores.

Usage::

    python scripts/train_tiny_saes.py                          # writes mishax_py/zoo/data/gemma2-tiny-saes/
    python scripts/train_tiny_saes.py --out /tmp/s --steps 300 # quick try
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import instrumentation.gemma2 as g2  # noqa: E402
import saes  # noqa: E402
from mishax_py.zoo import tasks  # noqa: E402
from mishax_py.zoo.models import model_path  # noqa: E402
from saes.base import Transcoder, init_tied  # noqa: E402
from saes.train import (  # noqa: E402
    HeavisideFunction,
    JumpReLUFunction,
    TrainConfig,
    collect_activations,
    evaluate,
    train_sae,
)

MODEL = "gemma2-tiny"
DEFAULT_OUT = ROOT / "mishax_py" / "zoo" / "data" / f"{MODEL}-saes"
TRAIN_SEED_OFFSET = 2_000_003  # data seeds differ from the model's training data and every eval seed
HELDOUT_SEED_OFFSET = 3_000_017


# ------------------------------------------------------------------------------------ data
def task_batches(n_batches: int, rows: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n_batches`` unpadded batches alternating induction / recall prompts (lengths drawn per batch).

    Each item is ``{"input_ids": [rows, T], "attention_mask": [rows, T], "labels": [rows, T]}``.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        if i % 2 == 0:
            b = tasks.induction_batch(rows, seq_len=int(torch.randint(4, 25, (1,), generator=g)), generator=g)
        else:
            b = tasks.recall_batch(rows, n_pairs=int(torch.randint(2, 25, (1,), generator=g)), generator=g)
        out.append({"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels})
    return out


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(summed cross-entropy, count) of ``logits [B, T, V]`` on the scored ``labels`` (HF convention)."""
    lg = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    tg = labels[:, 1:].reshape(-1)
    keep = tg != tasks.IGNORE_INDEX
    loss = torch.nn.functional.cross_entropy(lg[keep], tg[keep], reduction="sum")
    return float(loss), int(keep.sum())


def collect(im: Any, batches: list[dict[str, torch.Tensor]], site: str, folder: Path) -> torch.Tensor:
    """Activations of ``site`` over ``batches`` via an activation store; ``[tokens, d]`` (BOS dropped)."""
    store = collect_activations(im, batches, site, folder / site, total=len(batches), progress=False)
    return store.load_all()


# ------------------------------------------------------------------------------ transcoders
@dataclass
class TCConfig:
    """Hyper-parameters of :func:`train_transcoder` (mirrors :class:`saes.train.TrainConfig`)."""

    d_sae: int
    steps: int
    batch_size: int = 1024
    lr: float = 5e-3
    lr_warmup_steps: int = 100
    lr_decay_frac: float = 0.2
    l0_coefficient: float = 1e-3
    lambda_warmup_steps: int | None = None
    target_l0: float | None = None
    bandwidth: float = 0.01
    theta_init: float = 0.02
    seed: int = 0


def train_transcoder(x: torch.Tensor, y: torch.Tensor, cfg: TCConfig, site: str, output_site: str) -> Transcoder:
    """Fit a JumpReLU transcoder ``x [n, d_in] -> y [n, d_out]`` (scaled training, folded on return).

    Training: ``x_s = s_in x``, ``y_s = s_out y`` with unit mean squared norms;
    ``pre = x_s W_enc + b_enc``, ``f = JumpReLU_θ(pre)``, ``y_hat = f W_dec + b_dec``,
    loss ``||y_s - y_hat||² + λ L0`` (λ warmed up linearly, optionally steered to ``target_l0``),
    decoder rows unit norm. Folding expresses features in units of ``y``:
    ``W_enc' = (s_in/s_out) W_enc``, ``b_enc' = b_enc/s_out``, ``θ' = θ/s_out``, ``b_dec' = b_dec/s_out``.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    d_in, d_out = x.shape[1], y.shape[1]
    s_in = 1.0 / math.sqrt(float(x.pow(2).sum(-1).mean()))
    s_out = 1.0 / math.sqrt(float(y.pow(2).sum(-1).mean()))
    proto = init_tied(Transcoder(d_in, cfg.d_sae, d_out=d_out), generator=g)
    W_enc = torch.nn.Parameter(proto.W_enc.detach().clone())
    b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae))
    W_dec = torch.nn.Parameter(proto.W_dec.detach().clone())
    b_dec = torch.nn.Parameter((y.mean(0) * s_out).clone())
    log_theta = torch.nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.theta_init)))
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec, log_theta], lr=cfg.lr, betas=(0.0, 0.999))
    lam_warm = cfg.lambda_warmup_steps or max(1, cfg.steps // 10)
    decay_start = int(cfg.steps * (1 - cfg.lr_decay_frac))
    lam, l0_ema = cfg.l0_coefficient, None
    n = x.shape[0]
    perm = torch.randperm(n, generator=g)
    cursor = 0
    for step in range(cfg.steps):
        if cursor + cfg.batch_size > n:
            perm, cursor = torch.randperm(n, generator=g), 0
        idx = perm[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        xb, yb = x[idx] * s_in, y[idx] * s_out
        lr = cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup_steps)
        if step >= decay_start:
            lr *= (cfg.steps - step) / max(1, cfg.steps - decay_start)
        for group in opt.param_groups:
            group["lr"] = lr
        theta = log_theta.exp()
        pre = xb @ W_enc + b_enc
        f = JumpReLUFunction.apply(pre, theta, cfg.bandwidth)
        l0 = HeavisideFunction.apply(pre, theta, cfg.bandwidth).sum(-1).mean()
        y_hat = f @ W_dec + b_dec
        warm = min(1.0, (step + 1) / lam_warm)
        loss = (yb - y_hat).pow(2).sum(-1).mean() + warm * lam * l0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # keep decoder rows on the unit sphere
            W_dec.grad -= (W_dec.grad * W_dec).sum(-1, keepdim=True) * W_dec
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        l0_now = float(l0.detach())
        l0_ema = l0_now if l0_ema is None else 0.98 * l0_ema + 0.02 * l0_now
        if cfg.target_l0 is not None and warm >= 1.0:
            lam *= math.exp(0.01 * math.tanh(math.log(max(l0_ema, 1e-3) / cfg.target_l0)))
    tc = Transcoder(d_in, cfg.d_sae, d_out=d_out, site=site, output_site=output_site)
    with torch.no_grad():
        tc.W_enc.copy_(W_enc * (s_in / s_out))
        tc.b_enc.copy_(b_enc / s_out)
        tc.W_dec.copy_(W_dec)
        tc.b_dec.copy_(b_dec / s_out)
        tc.threshold.copy_(log_theta.exp() / s_out)
    return tc.requires_grad_(False).eval()


# ------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def spliced_task_metrics(im: Any, batches: list[dict[str, torch.Tensor]], interventions: Any) -> dict[str, float]:
    """Task cross-entropy (scored targets) and accuracies with ``interventions`` active (``None``: clean)."""
    loss_sum, count = 0.0, 0
    hits = {"induction": [0, 0], "recall": [0, 0]}
    for i, b in enumerate(batches):
        ids, labels = b["input_ids"], b["labels"]
        logits = im.run(ids, interventions=interventions)
        s, c = task_loss(logits, labels)
        loss_sum, count = loss_sum + s, count + c
        pred = logits[:, :-1].argmax(-1)
        tg = labels[:, 1:]
        keep = tg != tasks.IGNORE_INDEX
        h = hits["induction" if i % 2 == 0 else "recall"]
        h[0] += int((pred[keep] == tg[keep]).sum())
        h[1] += int(keep.sum())
    return {
        "task_loss": loss_sum / max(count, 1),
        "induction_accuracy": hits["induction"][0] / max(hits["induction"][1], 1),
        "recall_accuracy": hits["recall"][0] / max(hits["recall"][1], 1),
    }


def save_npz(sae: Any, path: Path) -> str:
    """Write Gemma Scope's ``params.npz`` (five float32 arrays); returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: getattr(sae, k).detach().cpu().float().numpy() for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
    arrays["threshold"] = sae.threshold.detach().cpu().float().numpy()
    np.savez(path, **arrays)
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=None, help="Gemma 2 checkpoint (default: the bundled model)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-batches", type=int, default=160, help="prompt batches for training activations")
    p.add_argument("--heldout-batches", type=int, default=24, help="prompt batches for the registry numbers")
    p.add_argument("--rows", type=int, default=64, help="prompts per batch")
    p.add_argument("--res-layers", type=int, nargs="*", default=[1, 3])
    p.add_argument("--tc-layers", type=int, nargs="*", default=[0, 1, 2, 3])
    p.add_argument("--res-d-sae", type=int, default=512)
    p.add_argument("--tc-d-sae", type=int, default=512)
    p.add_argument("--res-l0", type=float, default=16.0, help="target L0 of the residual SAEs")
    p.add_argument("--tc-l0", type=float, default=20.0, help="target L0 of the transcoders")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--bandwidth", type=float, default=0.01, help="ε of the STE rectangle kernel")
    p.add_argument("--theta-init", type=float, default=0.02, help="initial JumpReLU threshold (scaled units)")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    model_dir = args.model_dir or model_path(MODEL)
    from transformers import Gemma2ForCausalLM

    model = Gemma2ForCausalLM.from_pretrained(model_dir, attn_implementation="eager", local_files_only=True).eval()
    im = g2.instrument(model)
    train = task_batches(args.train_batches, args.rows, args.seed + TRAIN_SEED_OFFSET)
    held = task_batches(args.heldout_batches, args.rows, args.seed + HELDOUT_SEED_OFFSET)
    clean = spliced_task_metrics(im, held, None)
    print(f"clean held-out: {json.dumps({k: round(v, 4) for k, v in clean.items()})}", flush=True)

    entries: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tiny_saes_") as tmp:
        tmpdir = Path(tmp)

        def acts(site: str, which: str) -> torch.Tensor:
            return collect(im, train if which == "train" else held, site, tmpdir / which)

        for layer in args.res_layers:
            site = f"blocks.{layer}.resid_post"
            name = f"res-L{layer}"
            x, x_held = acts(site, "train"), acts(site, "held")
            cfg = TrainConfig(
                d_sae=args.res_d_sae, l0_coefficient=1e-3, lr=args.lr, lr_warmup_steps=100, lr_decay_frac=0.2,
                batch_size=args.batch_size, steps=args.steps, target_l0=args.res_l0, b_dec_init="mean",
                bandwidth=args.bandwidth, theta_init=args.theta_init, seed=args.seed, site=site,
            )  # fmt: skip
            ts = time.time()
            sae = train_sae(x, cfg).sae
            stats = evaluate(sae, x_held)
            spl = spliced_task_metrics(im, held, saes.splice(sae, keep_error=False))
            sha = save_npz(sae, args.out / name / "params.npz")
            entry = {
                "name": name, "kind": "sae", "architecture": "jumprelu", "site": site, "output_site": site,
                "d_in": sae.d_in, "d_sae": sae.d_sae, "l0": stats["l0"], "fvu": stats["fvu"],
                "dead_fraction": stats["dead_fraction"], "train_seconds": round(time.time() - ts, 1),
            }  # fmt: skip
            entries.append(_finish(entry, clean, spl, sha, name))

        for layer in args.tc_layers:
            site, out_site = f"blocks.{layer}.ln2_normalized", f"blocks.{layer}.mlp_out"
            name = f"transcoder-L{layer}"
            x, y = acts(site, "train"), acts(out_site, "train")
            x_held, y_held = acts(site, "held"), acts(out_site, "held")
            cfg_tc = TCConfig(d_sae=args.tc_d_sae, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                              target_l0=args.tc_l0, bandwidth=args.bandwidth, theta_init=args.theta_init,
                              seed=args.seed)  # fmt: skip
            ts = time.time()
            tc = train_transcoder(x, y, cfg_tc, site, out_site)
            stats = evaluate(tc, (x_held, y_held))
            spl = spliced_task_metrics(im, held, saes.splice(tc, keep_error=False))
            sha = save_npz(tc, args.out / name / "params.npz")
            entry = {
                "name": name, "kind": "transcoder", "architecture": "jumprelu", "site": site, "output_site": out_site,
                "d_in": tc.d_in, "d_sae": tc.d_sae, "l0": stats["l0"], "fvu": stats["fvu"],
                "dead_fraction": stats["dead_fraction"],
                "train_seconds": round(time.time() - ts, 1),
            }  # fmt: skip
            entries.append(_finish(entry, clean, spl, sha, name))

    registry = {
        "model": MODEL,
        "format": "gemma_scope_npz",
        "description": (
            "JumpReLU SAEs and transcoders for the bundled tiny Gemma 2, trained on its task data "
            "(mixed induction + key-value recall prompts). Numbers measured on held-out prompts: "
            "l0 = mean active features per token, fvu = fraction of variance unexplained (of the output "
            "site for transcoders), delta_lm_loss = increase of the next-token cross-entropy on the "
            "scored task targets when the site is replaced by the reconstruction."
        ),
        "train_command": "python scripts/train_tiny_saes.py",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "train_tokens": int(sum(int(b["attention_mask"][:, 1:].sum()) for b in train)),
        "heldout_tokens": int(sum(int(b["attention_mask"][:, 1:].sum()) for b in held)),
        "clean": clean,
        "saes": entries,
        "total_seconds": round(time.time() - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "registry.json").write_text(json.dumps(registry, indent=2) + "\n")
    print(f"wrote {len(entries)} SAEs to {args.out} in {registry['total_seconds']}s")


def _finish(entry: dict[str, Any], clean: dict[str, float], spl: dict[str, float], sha: str, name: str) -> dict:
    """Add the spliced-run numbers and the file's path/hash to a registry entry; print a line."""
    entry.update({
        "path": f"{name}/params.npz",
        "sha256": sha,
        "lm_loss_clean": clean["task_loss"],
        "lm_loss_spliced": spl["task_loss"],
        "delta_lm_loss": spl["task_loss"] - clean["task_loss"],
        "induction_accuracy_spliced": spl["induction_accuracy"],
        "recall_accuracy_spliced": spl["recall_accuracy"],
    })
    print(
        f"{name:16s} {entry['site']:26s} d_sae {entry['d_sae']:5d}  L0 {entry['l0']:6.2f}  FVU {entry['fvu']:.4f}  "
        f"dead {entry['dead_fraction']:.2f}  ΔLM {entry['delta_lm_loss']:+.4f}  "
        f"acc ind {spl['induction_accuracy']:.3f} rec {spl['recall_accuracy']:.3f}  ({entry['train_seconds']}s)",
        flush=True,
    )
    return entry


if __name__ == "__main__":
    main()
