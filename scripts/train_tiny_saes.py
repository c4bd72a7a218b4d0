#!/usr/bin/env python
"""Train the SAEs and transcoders shipped with the bundled tiny models (``mishax_py.zoo.load_saes``).

``--model gemma2-tiny`` (default) or ``--model gemma3-tiny``. What it trains (all JumpReLU,
Gemma Scope recipe via :mod:`saes.train`):

* residual-stream SAEs on ``blocks.L.resid_post`` for ``--res-layers`` (gemma2-tiny: 1, right
  after the induction heads, and 3, the last layer's output; gemma3-tiny: 1, after the
  previous-token heads, and 5, the global layer holding the induction heads and the last);
* transcoders ``-> blocks.L.mlp_out`` for ``--tc-layers`` (default every layer, so attribution
  graphs replace every MLP), reading where each release reads: ``blocks.L.ln2_normalized`` for
  Gemma 2 (Gemma Scope) and ``blocks.L.ln2`` (the pre-feedforward norm's output, gain applied)
  for Gemma 3 (Gemma Scope 2).

Data: activations of the bundled model on a mix of the tasks it was trained on
(``mishax_py.zoo.tasks``: induction and key-value recall prompts, lengths drawn per batch,
no padding), every site the SAEs read or write cached in one forward per batch (BOS dropped,
as :func:`saes.train.collect_activations` does; one pass instead of one per site). A held-out
set drawn from other seeds gives the numbers recorded in the
registry: L0, FVU, dead features, and the delta LM loss when the reconstruction replaces
the site (``keep_error=False``) -- the increase in next-token cross-entropy on the tasks'
scored targets (the tokens the model can predict) -- plus the task accuracies when spliced.

Deviations from the Gemma Scope recipe, for a 64-wide model trained for 2000 steps (1000 for
gemma3-tiny's eight SAEs, to fit ~15 minutes on a shared 2-core machine) instead of
billions of tokens: learning rate 5e-3 (not 7e-5), θ initialised at 0.02 and kernel bandwidth
ε = 0.01 (not 0.001 / 0.001: with inputs scaled to unit mean squared norm, a 64-dim model's
pre-activations are ~6x larger than a 2304-dim one's, and with ε = 0.001 the thresholds barely
move in 2000 steps), and λ steered towards a target L0 (``TrainConfig.target_l0``).

Transcoders are trained here with the same pieces (the JumpReLU / Heaviside straight-through
estimators of :mod:`saes.train`, λ warm-up, Adam β = (0, 0.999), unit-norm decoder rows)
since :func:`saes.train.train_sae` fits SAEs (input == output). Their inputs and targets
are scaled to unit mean squared norm during training and the scales are folded back in
afterwards, so the saved file follows the plain Gemma Scope formula on raw activations.

Output, gemma2-tiny: ``<out>/<name>/params.npz`` in Gemma Scope's layout (``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_out]``, ``b_enc``, ``b_dec``, ``threshold``; float32). gemma3-tiny: Gemma Scope
2's layout (:mod:`saes.gemma_scope_2`), one folder per SAE,
``resid_post/layer_{L}_width_{d_sae}_l0_{label}/`` and ``transcoder/layer_{L}_width_{d_sae}_l0_{label}/``,
each holding ``params.safetensors`` (``w_enc [d_in, d_sae]``, ``w_dec [d_sae, d_out]``, ``b_enc``,
``b_dec``, ``threshold``; float32) and ``config.json`` (``architecture: "jump_relu"``,
``hf_hook_point_in``/``_out`` naming the transformers modules, ``affine_connection: false``,
``model_name``, ``width``, ``l0``); the width label is the plain number (the release's ``16k``...
are for 16384 and up) and ``l0_small`` is the release's label for its lowest-L0 set. Both write
``<out>/registry.json``. Everything is seeded and single-process; a few minutes on 2 cores (gemma3-tiny:
777 s with ``--threads 1`` while six other jobs shared the 2 cores; on a busy machine pass ``--threads 1``:
two threads then wait on each other and each forward took 20x the CPU time).

Usage::

    python scripts/train_tiny_saes.py                          # writes mishax_py/zoo/data/gemma2-tiny-saes/
    python scripts/train_tiny_saes.py --model gemma3-tiny --threads 1   # writes .../gemma3-tiny-saes/
    python scripts/train_tiny_saes.py --out /tmp/s --steps 300 # quick try
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import saes  # noqa: E402
from mishax_py.zoo import tasks  # noqa: E402
from mishax_py.zoo.models import DATA_DIR, instrument, load_checkpoint  # noqa: E402
from saes.base import Transcoder, init_tied  # noqa: E402
from saes.train import (  # noqa: E402
    HeavisideFunction,
    JumpReLUFunction,
    TrainConfig,
    evaluate,
    train_sae,
)

TRAIN_SEED_OFFSET = 2_000_003  # data seeds differ from the model's training data and every eval seed
HELDOUT_SEED_OFFSET = 3_000_017


@dataclass(frozen=True)
class Setup:
    """What a bundled model's SAE set is: default layers, where transcoders read, and the file layout.

    Attributes:
        res_layers: layers of the residual SAEs (``blocks.L.resid_post``).
        tc_layers: layers of the transcoders (``-> blocks.L.mlp_out``).
        tc_input: the site kind transcoders read (``ln2_normalized``: Gemma Scope; ``ln2``: Gemma Scope 2).
        layout: ``"gemma_scope_npz"`` (``<name>/params.npz``) or ``"gemma_scope_2"`` (``<kind>/layer_...`` folders
            with ``params.safetensors`` + ``config.json``).
        family: the model family's name in the registry's description.
        steps: default training steps per SAE (gemma3-tiny: 1000, half of gemma2-tiny's, so that its eight SAEs
            train within ~15 minutes on a shared 2-core machine).
    """

    res_layers: tuple[int, ...]
    tc_layers: tuple[int, ...]
    tc_input: str
    layout: str
    family: str
    steps: int


SETUPS: dict[str, Setup] = {
    "gemma2-tiny": Setup((1, 3), (0, 1, 2, 3), "ln2_normalized", "gemma_scope_npz", "Gemma 2", 2000),
    "gemma3-tiny": Setup((1, 5), (0, 1, 2, 3, 4, 5), "ln2", "gemma_scope_2", "Gemma 3", 1000),
}
#: our site kind -> the transformers module a Gemma Scope 2 ``hf_hook_point_*`` names (``{layer}`` filled in);
#: the inverse of the table in :mod:`saes.gemma_scope_2` (the loader maps these back: checked on every write).
GS2_HOOK_POINTS = {
    "resid_post": "model.layers.{layer}.output",
    "ln2": "model.layers.{layer}.pre_feedforward_layernorm.output",
    "mlp_out": "model.layers.{layer}.post_feedforward_layernorm.output",
}
GS2_L0_LABEL = "small"  # the release's label of its lowest-L0 set (small / medium / big)


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


@torch.no_grad()
def collect(im: Any, batches: list[dict[str, torch.Tensor]], sites: list[str]) -> dict[str, torch.Tensor]:
    """Activations of every site in ``sites`` over ``batches``, one forward per batch: ``{site: [tokens, d]}``
    (BOS and masked positions dropped, the rows :func:`saes.train.collect_activations` would store)."""
    out: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    for b in batches:
        mask = b["attention_mask"].bool()
        _, cache = im.run_with_cache(b["input_ids"], sites=sites, attention_mask=b["attention_mask"])
        keep = mask.clone()
        keep[:, 0] = False
        for s in sites:
            v = cache[s]
            out[s].append(v.reshape(*v.shape[:2], -1)[keep].float().clone())
    return {s: torch.cat(v) for s, v in out.items()}


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


def gs2_folder(kind: str, layer: int, d_sae: int) -> str:
    """The Gemma Scope 2 folder name (relative): ``resid_post/layer_5_width_512_l0_small``, ``transcoder/...``."""
    return f"{kind}/layer_{layer}_width_{d_sae}_l0_{GS2_L0_LABEL}"


def save_gs2(sae: Any, folder: Path, *, layer: int, reads: str, writes: str, model: str, l0: float) -> str:
    """Write one Gemma Scope 2 folder: ``params.safetensors`` (``w_enc [d_in, d_sae]``, ``w_dec [d_sae, d_out]``,
    ``b_enc``, ``b_dec``, ``threshold``; float32) and ``config.json`` (``hf_hook_point_in``/``_out`` from our site
    kinds ``reads``/``writes``, ``GS2_HOOK_POINTS``). Reloads it with ``saes.load`` and checks the sites it infers
    and the tensors. Returns the sha256 of ``params.safetensors``.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    names = {"w_enc": "W_enc", "w_dec": "W_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold"}
    tensors = {k: getattr(sae, v).detach().cpu().float().contiguous() for k, v in names.items()}
    save_file(tensors, str(folder / "params.safetensors"))
    cfg = {
        "architecture": "jump_relu",
        "hf_hook_point_in": GS2_HOOK_POINTS[reads].format(layer=layer),
        "hf_hook_point_out": GS2_HOOK_POINTS[writes].format(layer=layer),
        "affine_connection": False,
        "model_name": model,
        "width": int(sae.d_sae),
        "l0": round(float(l0), 2),
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    back = saes.load(folder)
    want_in, want_out = f"blocks.{layer}.{reads}", f"blocks.{layer}.{writes}"
    got_out = getattr(back, "output_site", None) or back.site
    if (back.site, got_out) != (want_in, want_out) or not torch.equal(back.W_dec, tensors["w_dec"]):
        raise RuntimeError(f"{folder}: reloaded as {back.site} -> {got_out}, wrote {want_in} -> {want_out}")
    return hashlib.sha256((folder / "params.safetensors").read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(SETUPS), default="gemma2-tiny",
                   help="the bundled model whose SAEs to train (layers, transcoder input and file layout follow it)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="a checkpoint of the same family to read instead (default: the bundled model's folder)")
    p.add_argument("--out", type=Path, default=None, help="default mishax_py/zoo/data/<model>-saes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-batches", type=int, default=160, help="prompt batches for training activations")
    p.add_argument("--heldout-batches", type=int, default=24, help="prompt batches for the registry numbers")
    p.add_argument("--rows", type=int, default=64, help="prompts per batch")
    p.add_argument("--res-layers", type=int, nargs="*", default=None, help="default 1 3 (gemma2) / 1 5 (gemma3)")
    p.add_argument("--tc-layers", type=int, nargs="*", default=None, help="default every layer")
    p.add_argument("--res-d-sae", type=int, default=512)
    p.add_argument("--tc-d-sae", type=int, default=512)
    p.add_argument("--res-l0", type=float, default=16.0, help="target L0 of the residual SAEs")
    p.add_argument("--tc-l0", type=float, default=20.0, help="target L0 of the transcoders")
    p.add_argument("--steps", type=int, default=None, help="default 2000 (gemma2-tiny) / 1000 (gemma3-tiny)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--bandwidth", type=float, default=0.01, help="ε of the STE rectangle kernel")
    p.add_argument("--theta-init", type=float, default=0.02, help="initial JumpReLU threshold (scaled units)")
    args = p.parse_args(argv)
    setup = SETUPS[args.model]
    if args.res_layers is None:
        args.res_layers = list(setup.res_layers)
    if args.tc_layers is None:
        args.tc_layers = list(setup.tc_layers)
    if args.steps is None:
        args.steps = setup.steps
    out_dir: Path = args.out or DATA_DIR / f"{args.model}-saes"

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    model = load_checkpoint(str(args.model_dir or args.model), tokenizer=False)[0]
    im = instrument(model)  # instrumentation.gemma2 / .gemma3 by config.model_type
    gs2 = setup.layout == "gemma_scope_2"
    train = task_batches(args.train_batches, args.rows, args.seed + TRAIN_SEED_OFFSET)
    held = task_batches(args.heldout_batches, args.rows, args.seed + HELDOUT_SEED_OFFSET)
    clean = spliced_task_metrics(im, held, None)
    print(f"clean held-out: {json.dumps({k: round(v, 4) for k, v in clean.items()})}", flush=True)

    entries: list[dict[str, Any]] = []
    sites = [f"blocks.{layer}.resid_post" for layer in args.res_layers]
    sites += [f"blocks.{layer}.{kind}" for layer in args.tc_layers for kind in (setup.tc_input, "mlp_out")]
    collected = {"train": collect(im, train, sites), "held": collect(im, held, sites)}
    print(f"collected {len(sites)} sites in {time.time() - t0:.0f}s", flush=True)

    def acts(site: str, which: str) -> torch.Tensor:
        return collected[which][site]

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
        if gs2:
            rel = gs2_folder("resid_post", layer, sae.d_sae)
            sha = save_gs2(sae, out_dir / rel, layer=layer, reads="resid_post", writes="resid_post",
                           model=args.model, l0=stats["l0"])  # fmt: skip
        else:
            rel = f"{name}/params.npz"
            sha = save_npz(sae, out_dir / rel)
        entry = {
            "name": name, "kind": "sae", "architecture": "jumprelu", "site": site, "output_site": site,
            "d_in": sae.d_in, "d_sae": sae.d_sae, "l0": stats["l0"], "fvu": stats["fvu"],
            "dead_fraction": stats["dead_fraction"], "train_seconds": round(time.time() - ts, 1),
        }  # fmt: skip
        entries.append(_finish(entry, clean, spl, sha, name, rel))

    for layer in args.tc_layers:
        site, out_site = f"blocks.{layer}.{setup.tc_input}", f"blocks.{layer}.mlp_out"
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
        if gs2:
            rel = gs2_folder("transcoder", layer, tc.d_sae)
            sha = save_gs2(tc, out_dir / rel, layer=layer, reads=setup.tc_input, writes="mlp_out",
                           model=args.model, l0=stats["l0"])  # fmt: skip
        else:
            rel = f"{name}/params.npz"
            sha = save_npz(tc, out_dir / rel)
        entry = {
            "name": name, "kind": "transcoder", "architecture": "jumprelu", "site": site, "output_site": out_site,
            "d_in": tc.d_in, "d_sae": tc.d_sae, "l0": stats["l0"], "fvu": stats["fvu"],
            "dead_fraction": stats["dead_fraction"],
            "train_seconds": round(time.time() - ts, 1),
        }  # fmt: skip
        entries.append(_finish(entry, clean, spl, sha, name, rel))

    registry = {
        "model": args.model,
        "format": setup.layout,
        "description": (
            f"JumpReLU SAEs and transcoders for the bundled tiny {setup.family}, trained on its task data "
            "(mixed induction + key-value recall prompts). Numbers measured on held-out prompts: "
            "l0 = mean active features per token, fvu = fraction of variance unexplained (of the output "
            "site for transcoders), delta_lm_loss = increase of the next-token cross-entropy on the "
            "scored task targets when the site is replaced by the reconstruction."
        ),
        "train_command": "python scripts/train_tiny_saes.py"
                         + ("" if args.model == "gemma2-tiny" else f" --model {args.model}")
                         + ("" if args.threads == 2 else f" --threads {args.threads}"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "train_tokens": int(sum(int(b["attention_mask"][:, 1:].sum()) for b in train)),
        "heldout_tokens": int(sum(int(b["attention_mask"][:, 1:].sum()) for b in held)),
        "clean": clean,
        "saes": entries,
        "total_seconds": round(time.time() - t0, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "registry.json").write_text(json.dumps(registry, indent=2) + "\n")
    print(f"wrote {len(entries)} SAEs to {out_dir} in {registry['total_seconds']}s")


def _finish(
    entry: dict[str, Any], clean: dict[str, float], spl: dict[str, float], sha: str, name: str, path: str
) -> dict:
    """Add the spliced-run numbers and the file's path (relative to the registry) and hash to a registry
    entry; print a line."""
    entry.update({
        "path": path,
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
