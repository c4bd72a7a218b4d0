"""saes.train, saes.store, saes.evaluation: STE gradients, folding, recovery of known sparse directions,
activation store, eval."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import saes
from mishax_py import InstrumentedModel
from saes.evaluation import evaluate
from saes.store import ActivationStore, collect_activations
from saes.train import (
    CheckpointError,
    HeavisideFunction,
    JumpReLUFunction,
    TrainConfig,
    TrainResult,
    fold_scaling,
    train_sae,
)
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU ops: see conftest.one_thread


def synthetic(n: int, d_in: int = 64, n_dirs: int = 128, k: int = 4, seed: int = 0):
    """``x = Σ_i a_i d_i`` over known unit directions ``d_i``; each active with prob ``k/n_dirs``,
    magnitudes uniform in [0.5, 1.5]. Returns (x [n, d_in], directions [n_dirs, d_in], true L0)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_dirs, d_in, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    active = torch.rand(n, n_dirs, generator=g) < k / n_dirs
    coef = active * (0.5 + torch.rand(n, n_dirs, generator=g))
    return coef @ dirs, dirs, active.sum(1).float().mean().item()


def test_ste_gradients_match_spec() -> None:
    """The autograd Functions give exactly the SPEC §4 pseudo-derivatives (rectangle kernel, ε)."""
    eps = 0.001
    theta = torch.tensor([0.5, 0.2, 1.0], dtype=torch.float64, requires_grad=True)
    z = torch.tensor(
        [[0.5004, 0.1, 1.2], [0.4997, 0.2003, 0.9999], [0.7, 0.19951, 1.0006]],
        dtype=torch.float64,
        requires_grad=True,
    )
    g = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0], [4.0, 1.0, -2.0]], dtype=torch.float64)
    out = JumpReLUFunction.apply(z, theta, eps)
    assert torch.equal(out, z * (z > theta))
    out.backward(g)
    K = ((z - theta).abs() < eps / 2).double()  # K(u) = 1 for |u| < 1/2, u = (z - θ)/ε
    assert K.sum() == 5  # several entries inside the window, several outside
    assert torch.allclose(z.grad, (z > theta).double() * g)
    assert torch.allclose(theta.grad, (-(theta / eps) * K * g).sum(0))

    z.grad, theta.grad = None, None
    h = HeavisideFunction.apply(z, theta, eps)
    assert torch.equal(h, (z > theta).double())
    h.backward(g)
    assert torch.equal(z.grad, torch.zeros_like(z))
    assert torch.allclose(theta.grad, (-(1 / eps) * K * g).sum(0))


def test_fold_scaling_gives_plain_inference_formula() -> None:
    """Training parameterisation (scaled input, b_dec subtracted) == folded plain formula / s."""
    torch.manual_seed(0)
    d_in, d_sae, s = 12, 30, 0.37
    W_enc, W_dec = torch.randn(d_in, d_sae), torch.randn(d_sae, d_in)
    b_enc, b_dec, theta = torch.randn(d_sae), torch.randn(d_in), torch.rand(d_sae)
    x = torch.randn(50, d_in) * 3
    pre = (s * x - b_dec) @ W_enc + b_enc
    f = pre * (pre > theta)
    x_hat_scaled = f @ W_dec + b_dec
    p = fold_scaling(W_enc, b_enc, W_dec, b_dec, theta, s)
    sae = saes.JumpReLUSAE(d_in, d_sae)
    with torch.no_grad():
        for k, v in p.items():
            getattr(sae, k).copy_(v)
    with torch.no_grad():
        assert torch.allclose(sae.encode(x), f / s, atol=1e-5)
        assert torch.allclose(sae(x), x_hat_scaled / s, atol=1e-5)


def test_fold_scaling_for_transcoders_gives_plain_inference_formula() -> None:
    """Transcoder training parameterisation (x scaled by s_x, target by s_y, skip) == folded Transcoder / s_y."""
    torch.manual_seed(1)
    d_in, d_out, d_sae, s_x, s_y = 10, 7, 24, 0.37, 2.9
    W_enc, W_dec, W_skip = torch.randn(d_in, d_sae), torch.randn(d_sae, d_out), torch.randn(d_in, d_out)
    b_enc, b_dec, theta = torch.randn(d_sae), torch.randn(d_out), torch.rand(d_sae)
    x = torch.randn(50, d_in) * 3
    pre = (s_x * x) @ W_enc + b_enc
    f = pre * (pre > theta)
    y_hat_scaled = f @ W_dec + b_dec + (s_x * x) @ W_skip
    p = fold_scaling(W_enc, b_enc, W_dec, b_dec, theta, s_x, output_scale=s_y, W_skip=W_skip)
    tc = saes.Transcoder(d_in, d_sae, d_out=d_out, skip=True)
    with torch.no_grad():
        for k, v in p.items():
            getattr(tc, k).copy_(v)
        assert torch.allclose(tc.encode(x), f / s_y, atol=1e-5)
        assert torch.allclose(tc(x), y_hat_scaled / s_y, atol=1e-5)
    with pytest.raises(ValueError, match="output_scale"):
        fold_scaling(W_enc, b_enc, W_dec, b_dec, theta, s_x, W_skip=W_skip)


def synthetic_transcoder(n: int, d_in: int = 48, d_out: int = 40, n_feat: int = 64, k: int = 3, seed: int = 0):
    """Known sparse features, each with an input and an output direction: feature ``i`` active with
    probability ``k/n_feat`` at magnitude ``a_i`` in [0.5, 1.5]; ``x = Σ a_i in_i + noise``,
    ``y = 3 Σ a_i out_i``. Returns (x [n, d_in], y [n, d_out], output directions, true L0)."""
    g = torch.Generator().manual_seed(seed)
    dirs_in = torch.randn(n_feat, d_in, generator=g)
    dirs_in /= dirs_in.norm(dim=1, keepdim=True)
    dirs_out = torch.randn(n_feat, d_out, generator=g)
    dirs_out /= dirs_out.norm(dim=1, keepdim=True)
    active = torch.rand(n, n_feat, generator=g) < k / n_feat
    coef = active * (0.5 + torch.rand(n, n_feat, generator=g))
    x = coef @ dirs_in + 0.01 * torch.randn(n, d_in, generator=g)
    return x, coef @ dirs_out * 3.0, dirs_out, active.sum(1).float().mean().item()


@pytest.mark.parametrize("architecture,skip", [("jumprelu", False), ("topk", True)])
def test_transcoder_training_predicts_the_target(architecture: str, skip: bool) -> None:
    """train_sae(x, cfg, target=y) learns a Transcoder x -> y: held-out FVU far below 1, output directions found,
    and evaluate() on the folded transcoder agrees with the formula on raw activations."""
    x, y, dirs_out, true_l0 = synthetic_transcoder(24_000, seed=2)
    jump = architecture == "jumprelu"
    cfg = TrainConfig(d_sae=128, architecture=architecture, k=None if jump else 4, l0_coefficient=0.05,
                      lr=2e-2 if jump else 1e-2, lr_warmup_steps=30, lr_decay_frac=0.2, batch_size=512,
                      steps=400 if jump else 300, lambda_warmup_steps=100, seed=0, skip=skip,
                      site="blocks.0.ln2_normalized", output_site="blocks.0.mlp_out")  # fmt: skip
    res = train_sae(x[:20_000], cfg, target=y[:20_000])
    tc = res.sae
    assert isinstance(tc, saes.Transcoder) and (tc.d_in, tc.d_out, tc.d_sae) == (48, 40, 128)
    assert tc.activation_kind == architecture and (tc.W_skip is not None) == skip
    assert tc.site == "blocks.0.ln2_normalized" and tc.output_site == "blocks.0.mlp_out"
    assert res.output_scale == pytest.approx(1 / math.sqrt(y[:4096].pow(2).sum(1).mean().item()), rel=0.05)
    ev = evaluate(tc, (x[20_000:], y[20_000:]))
    held_x, held_y = x[20_000:], y[20_000:]
    fvu = float(((tc(held_x) - held_y) ** 2).sum() / ((held_y - held_y.mean(0)) ** 2).sum())
    best_cos = (dirs_out @ torch.nn.functional.normalize(tc.W_dec, dim=1).T).max(1).values
    print(f"{architecture} transcoder: FVU {fvu:.3f}, L0 {ev['l0']:.2f} (true {true_l0:.2f}), "
          f"mean best cos {best_cos.mean():.3f}")
    assert ev["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert fvu < 0.2
    assert abs(ev["l0"] - true_l0) <= 0.3 * true_l0 if jump else ev["l0"] <= 4
    if skip:  # the (here nearly linear) map is shared with the skip, so the decoder need not hold it
        assert float(tc.W_skip.abs().max()) > 0.1
    else:
        assert best_cos.mean() > 0.9


def test_transcoder_training_errors() -> None:
    x, y, _, _ = synthetic_transcoder(512)
    with pytest.raises(ValueError, match=r"target must be \[n, d_out\]"):
        train_sae(x, TrainConfig(d_sae=16, steps=2), target=y[:-1])
    with pytest.raises(ValueError, match="skip=True is a transcoder option"):
        train_sae(x, TrainConfig(d_sae=16, steps=2, skip=True))


@pytest.mark.slow
def test_jumprelu_recovers_known_directions() -> None:
    """Gemma Scope recipe on synthetic data: dictionary ≈ true directions, L0 ≈ true L0."""
    x, dirs, true_l0 = synthetic(60_000, seed=0)
    cfg = TrainConfig(d_sae=256, l0_coefficient=0.02, lr=2e-2, lr_warmup_steps=50, lr_decay_frac=0.2,
                      batch_size=512, steps=500, lambda_warmup_steps=125, seed=0)  # fmt: skip
    assert (cfg.bandwidth, cfg.theta_init, cfg.betas) == (0.001, 0.001, (0.0, 0.999))  # the recipe's
    res = train_sae(x, cfg)
    sae = res.sae
    assert isinstance(sae, saes.JumpReLUSAE)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae), atol=1e-5)  # unit rows
    assert res.scale == pytest.approx(1 / math.sqrt(x[:4096].pow(2).sum(1).mean().item()), rel=0.05)
    best_cos = (dirs @ sae.W_dec.T).max(1).values
    ev = evaluate(sae, x[:20_000])
    print(
        f"JumpReLU: mean best cos {best_cos.mean():.4f} (min {best_cos.min():.3f}); L0 {ev['l0']:.2f} "
        f"vs true {true_l0:.2f}; FVU {ev['fvu']:.3f}; dead {ev['dead_features']:.0f}"
    )
    assert best_cos.mean() >= 0.9
    assert abs(ev["l0"] - true_l0) <= 0.2 * true_l0
    assert ev["fvu"] < 0.25
    # the folded SAE runs on raw activations (no scaling, no b_dec subtraction)
    assert not sae.apply_b_dec_to_input and sae.metadata["input_scale"] == res.scale


@pytest.mark.slow
def test_topk_recovers_known_directions() -> None:
    x, dirs, true_l0 = synthetic(40_000, seed=1)
    res = train_sae(x, TrainConfig(d_sae=256, architecture="topk", k=4, lr=1e-2, lr_warmup_steps=30,
                                   batch_size=512, steps=300, seed=1))  # fmt: skip
    sae = res.sae
    assert isinstance(sae, saes.TopKSAE) and sae.k == 4
    best_cos = (dirs @ sae.W_dec.T).max(1).values
    ev = evaluate(sae, x[:10_000])
    print(f"TopK: mean best cos {best_cos.mean():.4f}; L0 {ev['l0']:.2f} vs true {true_l0:.2f}")
    assert best_cos.mean() >= 0.9
    assert abs(ev["l0"] - true_l0) <= 0.2 * true_l0


def test_train_config_errors_and_target_l0() -> None:
    x, _, _ = synthetic(4096, d_in=16, n_dirs=32, k=2)
    with pytest.raises(ValueError, match="needs 0 < k"):
        train_sae(x, TrainConfig(d_sae=32, architecture="topk"))
    with pytest.raises(ValueError, match=r"\[n, d_in\]"):
        train_sae(x[None], TrainConfig(d_sae=32))
    res = train_sae(x, TrainConfig(d_sae=32, lr=1e-2, steps=40, batch_size=256, target_l0=3.0, log_every=10))
    assert len(res.history) >= 4 and res.history[-1]["step"] == 39
    assert res.sae.W_enc.requires_grad is False


def test_collect_store_resume_and_evaluate(tiny_im: InstrumentedModel, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(4, 64, (4, 9), generator=g) for _ in range(6)]
    site = "blocks.1.resid_post"
    store_dir = tmp_path / "acts"

    class Interrupt(Exception):
        pass

    def interrupted() -> Iterator[torch.Tensor]:
        for i, b in enumerate(batches):
            if i == 5:  # batch 4 was buffered but not yet written: it is redone on resume
                raise Interrupt
            yield b

    with pytest.raises(Interrupt):
        collect_activations(tiny_im, interrupted(), site, store_dir, shard_rows=60, progress=False)
    partial = ActivationStore(store_dir)
    assert not partial.complete and len(partial.shards) == 2 and partial.meta["batches_done"] == 4
    store = collect_activations(tiny_im, batches, site, store_dir, shard_rows=60, progress=False)
    assert store.complete and store.site == site and store.d_in == 32
    assert store.n_rows == 6 * 4 * 8  # position 0 (BOS) dropped
    with torch.no_grad():
        _, cache = tiny_im.run_with_cache(torch.cat(batches), sites=[site])
    want = cache[site][:, 1:].reshape(6, 4 * 8, 32).reshape(-1, 32)
    assert torch.allclose(store.load_all(), want, atol=1e-6)
    assert json.loads((store_dir / "meta.json").read_text())["complete"] is True
    assert sum(b.shape[0] for b in store.iter_batches(50, seed=1)) == store.n_rows

    z_store = collect_activations(
        tiny_im, batches[:2], "blocks.0.attn.hook_z", tmp_path / "z", progress=False
    )
    assert z_store.site == "blocks.0.attn.z" and z_store.d_in == 32  # 4 heads x 8, head-major
    with pytest.raises(ValueError, match="holds activations of 'blocks.1.resid_post'"):
        collect_activations(tiny_im, batches, "blocks.0.resid_post", store_dir, progress=False)

    res = train_sae(store, TrainConfig(d_sae=64, lr=1e-2, steps=30, batch_size=64, l0_coefficient=1e-3))
    sae = res.sae
    assert sae.site == site
    ev = evaluate(sae, store, im=tiny_im, ids=torch.cat(batches[:2]))
    assert set(ev) >= {"l0", "fvu", "dead_features", "dead_fraction", "delta_lm_loss", "lm_loss_clean"}
    assert 0 <= ev["dead_fraction"] <= 1 and ev["fvu"] >= 0
    assert ev["delta_lm_loss"] == pytest.approx(ev["lm_loss_spliced"] - ev["lm_loss_clean"])
    folder = sae.save(tmp_path / "trained")
    assert torch.equal(saes.load(folder)(store.load_shard(0)), sae(store.load_shard(0)))

    # transcoders: evaluated on (input, output) pairs, spliced with a TranscoderSplice
    from saes.base import init_tied

    tc = init_tied(saes.Transcoder(32, 48, site="blocks.0.ln2_normalized", output_site="blocks.0.mlp_out"))
    ids2 = torch.cat(batches[:2])
    with torch.no_grad():
        _, c = tiny_im.run_with_cache(ids2, sites=[tc.site, tc.output_site])
    x_in, y_out = c[tc.site].reshape(-1, 32), c[tc.output_site].reshape(-1, 32)
    ev_tc = evaluate(tc, (x_in, y_out), im=tiny_im, ids=ids2)
    y_hat = tc(x_in).detach()
    want_fvu = (y_out - y_hat).pow(2).sum() / (y_out - y_out.mean(0)).pow(2).sum()
    assert ev_tc["fvu"] == pytest.approx(want_fvu.item(), rel=1e-4)
    assert "delta_lm_loss" in ev_tc
    with pytest.raises(ValueError, match="needs a pair"):
        evaluate(tc, x_in)


def test_transcoder_on_a_model_splices_and_saves(tiny_im: InstrumentedModel, tmp_path: Path) -> None:
    """A transcoder trained on ln2_normalized -> mlp_out of a real (random) Gemma 2: held-out FVU below the
    mean predictor's, the spliced model's loss is reported, and it round-trips through save/load."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 64, (64, 12), generator=g)
    x_site, y_site = "blocks.1.ln2_normalized", "blocks.1.mlp_out"
    with torch.no_grad():
        _, cache = tiny_im.run_with_cache(ids, sites=[x_site, y_site])
    x, y = cache[x_site].reshape(-1, 32), cache[y_site].reshape(-1, 32)
    train, held = slice(0, 640), slice(640, None)
    cfg = TrainConfig(d_sae=128, l0_coefficient=0.01, lr=1e-2, lr_warmup_steps=20, batch_size=128, steps=300,
                      site=x_site, output_site=y_site)
    tc = train_sae(x[train], cfg, target=y[train]).sae
    ev = evaluate(tc, (x[held], y[held]), im=tiny_im, ids=ids[:8])
    print(f"model transcoder: held-out FVU {ev['fvu']:.3f}, L0 {ev['l0']:.1f}, delta LM loss {ev['delta_lm_loss']:.4f}")
    assert ev["fvu"] < 0.6 and ev["l0"] < 64  # measured 0.40 at L0 29 (a random MLP is not sparse)
    assert ev["delta_lm_loss"] == pytest.approx(ev["lm_loss_spliced"] - ev["lm_loss_clean"])
    folder = tc.save(tmp_path / "tc")
    loaded = saes.load(folder)
    assert isinstance(loaded, saes.Transcoder) and loaded.output_site == y_site
    assert torch.allclose(loaded(x[held]), tc(x[held]), atol=1e-6)


# ------------------------------------------------------------------ checkpoints
_TRAIN_CHILD = """
import json, os, random, signal, sys
import numpy as np
import torch
torch.set_num_threads(1)
from torch.optim.optimizer import register_optimizer_step_post_hook
from safetensors.torch import load_file
from saes.store import ActivationStore
from saes.train import TrainConfig, train_sae

args = json.loads(sys.argv[1])
tensors = load_file(args["data"]) if args.get("data") else {}
data = ActivationStore(args["store"]) if args.get("store") else tensors["x"]
torch.manual_seed(123); random.seed(1); np.random.seed(2)
steps = [0]
def kill_after_steps(opt, a, kw):
    steps[0] += 1
    if steps[0] == args["kill_after"]:
        os.kill(os.getpid(), signal.SIGKILL)
register_optimizer_step_post_hook(kill_after_steps)
if args.get("kill_in_write"):  # SIGKILL while the checkpoint of this step is written, before its rename
    replace = os.replace
    def replace_or_die(src, dst):
        if str(dst).endswith("step_%08d" % args["kill_in_write"]):
            os.kill(os.getpid(), signal.SIGKILL)
        replace(src, dst)
    os.replace = replace_or_die
train_sae(data, TrainConfig(**args["config"]), target=tensors.get("y"))
print("FINISHED")
"""


def _kill_and_resume(tmp_path: Path, data: torch.Tensor | ActivationStore, cfg: TrainConfig, *, kill_after: int,
                     target: torch.Tensor | None = None, kill_in_write: int | None = None) -> TrainResult:  # fmt: skip
    """Train in a subprocess that SIGKILLs itself after ``kill_after`` optimiser steps (or inside the
    checkpoint write of step ``kill_in_write``), then resume here; return the resumed result."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    args: dict = {"config": asdict(cfg), "kill_after": kill_after, "kill_in_write": kill_in_write}
    if isinstance(data, ActivationStore):
        args["store"] = str(data.path)
    else:
        tensors = {"x": data} if target is None else {"x": data, "y": target}
        save_file(tensors, str(tmp_path / "data.safetensors"))
        args["data"] = str(tmp_path / "data.safetensors")
    proc = subprocess.run([sys.executable, "-c", _TRAIN_CHILD, json.dumps(args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -9 and "FINISHED" not in proc.stdout, proc.stderr[-3000:]
    assert cfg.checkpoint_dir is not None and any(Path(cfg.checkpoint_dir).glob("step_*")), "no checkpoint"
    torch.manual_seed(999), random.seed(9), np.random.seed(9)  # the checkpoint's RNG states replace these
    return train_sae(data, cfg, target=target)


def _assert_same_training(resumed: TrainResult, whole: TrainResult) -> None:
    for name, p in whole.sae.named_parameters():
        assert torch.equal(getattr(resumed.sae, name), p), name
    assert resumed.scale == whole.scale and resumed.output_scale == whole.output_scale
    assert resumed.history == whole.history
    assert resumed.sae.metadata == whole.sae.metadata


def _train_cfg(tmp_path: Path, **kw: object) -> TrainConfig:
    base: dict = dict(d_sae=32, lr=1e-2, steps=40, batch_size=64, scale_batches=4, lr_warmup_steps=5,
                      lr_decay_frac=0.2, log_every=5, b_dec_init="mean", checkpoint_dir=str(tmp_path / "ckpt"),
                      checkpoint_every=10)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("case", "kill_after", "kill_in_write", "resumed_from"),
    [
        ("jumprelu", 25, None, 20),  # resumes in the first pass over the data (2048 rows, 32 batches)
        ("topk", 35, None, 30),  # resumes in the second pass
        ("jumprelu", 40, 20, 10),  # killed inside the 2nd checkpoint's write: resumes from the 1st
        ("transcoder", 25, None, 20),
    ],
)
def test_training_killed_with_sigkill_and_resumed_is_bit_identical(
    tmp_path: Path, case: str, kill_after: int, kill_in_write: int | None, resumed_from: int
) -> None:
    """A run killed with SIGKILL after at least one checkpoint and started again with the same checkpoint_dir
    ends with exactly (torch.equal, CPU) the parameters, scales and history of an uninterrupted run, and the
    global RNGs (torch, random, numpy) continue as after the uninterrupted run."""
    x, _, _ = synthetic(2048, d_in=16, n_dirs=32, k=3, seed=7)
    target = None
    kw: dict = {"target_l0": 3.0}
    if case == "topk":
        kw = {"architecture": "topk", "k": 4}
    elif case == "transcoder":
        w = torch.randn(16, 24, generator=torch.Generator().manual_seed(1))
        target, kw = torch.relu(x @ w), {"skip": True, "l0_coefficient": 0.01}
    cfg = _train_cfg(tmp_path, **kw)
    torch.manual_seed(123), random.seed(1), np.random.seed(2)
    whole = train_sae(x, replace(cfg, checkpoint_dir=None), target=target)
    after_whole = (torch.rand(3).tolist(), random.random(), float(np.random.rand()))
    resumed = _kill_and_resume(tmp_path, x, cfg, kill_after=kill_after, target=target, kill_in_write=kill_in_write)
    assert resumed.start_step == resumed_from
    _assert_same_training(resumed, whole)
    assert (torch.rand(3).tolist(), random.random(), float(np.random.rand())) == after_whole
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_00000040"]  # older and .tmp removed


def test_training_on_a_store_killed_and_resumed_is_bit_identical(tiny_im: InstrumentedModel, tmp_path: Path) -> None:
    """The same for a 4-shard activation store: the resumed run skips to its place in the pass without
    reading the shards before it."""
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(4, 64, (8, 9), generator=g) for _ in range(16)]
    store = collect_activations(tiny_im, data, "blocks.1.resid_post", tmp_path / "acts", shard_rows=300,
                                progress=False)  # fmt: skip
    assert len(store.shards) == 4 and store.n_rows == 1024  # 16 batches of 64 rows per pass
    cfg = _train_cfg(tmp_path, target_l0=3.0)
    torch.manual_seed(123), random.seed(1), np.random.seed(2)
    whole = train_sae(store, replace(cfg, checkpoint_dir=None))
    resumed = _kill_and_resume(tmp_path, store, cfg, kill_after=25)  # checkpoint 20: pass 2, batch 8
    assert resumed.start_step == 20
    _assert_same_training(resumed, whole)


def test_checkpoints_are_safetensors_and_json_and_refuse_another_config(tmp_path: Path) -> None:
    """A checkpoint holds only safetensors and JSON (no pickle); a finished run started again returns its
    result without training; another config or other data is refused, naming the key and both values."""
    x, _, _ = synthetic(1024, d_in=16, n_dirs=32, k=3, seed=8)
    cfg = _train_cfg(tmp_path, steps=20)
    first = train_sae(x, cfg)
    (step_dir,) = (tmp_path / "ckpt").iterdir()
    assert step_dir.name == "step_00000020"
    names = sorted(p.name for p in step_dir.iterdir())
    assert names == ["state.json", "tensors.safetensors"]
    state = json.loads((step_dir / "state.json").read_text())
    assert state["step"] == 20 and state["config"]["lr"] == 0.01 and "data_position" in state
    from safetensors.torch import load_file

    keys = set(load_file(str(step_dir / "tensors.safetensors")))
    assert {"model.W_enc", "model.log_theta", "rng.torch_cpu", "rng.generator"} <= keys
    assert any(k.startswith("optimizer.") and k.endswith(".exp_avg_sq") for k in keys)

    again = train_sae(x, cfg)
    assert again.start_step == 20
    _assert_same_training(again, first)

    with pytest.raises(CheckpointError, match=r"made with lr=0\.01, this run has lr=0\.02"):
        train_sae(x, replace(cfg, lr=0.02))
    with pytest.raises(CheckpointError, match=r"made with architecture='jumprelu', this run has architecture='topk'"):
        train_sae(x, replace(cfg, architecture="topk", k=3))
    with pytest.raises(CheckpointError, match=r"'data' differs"):
        train_sae(x + 1, cfg)
    with pytest.raises(CheckpointError, match=r"'target' differs"):
        train_sae(x, replace(cfg, skip=False), target=x)
    assert train_sae(x, replace(cfg, progress=True, checkpoint_every=7)).start_step == 20  # neither changes results
    with pytest.raises(ValueError, match="checkpoint_every must be a positive"):
        train_sae(x, replace(cfg, checkpoint_every=0))
