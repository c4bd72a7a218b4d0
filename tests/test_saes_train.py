"""saes.train: STE gradients, folding, recovery of known sparse directions, activation store, eval."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import saes
from mishax_py import InstrumentedModel
from saes.train import (
    ActivationStore,
    HeavisideFunction,
    JumpReLUFunction,
    TrainConfig,
    collect_activations,
    evaluate,
    fold_scaling,
    train_sae,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Small CPU ops run far faster on one intra-op thread on a shared 2-core machine; restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
