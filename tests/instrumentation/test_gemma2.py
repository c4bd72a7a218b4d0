"""Gemma 2 instrumentation: bit-identity when idle, every site once, values against independent math."""

from __future__ import annotations

import importlib.util
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers.models.gemma2.modeling_gemma2 as modeling_gemma2
from transformers import LlamaConfig, LlamaForCausalLM

import instrumentation.gemma2 as g2
from mishax_py import InstrumentedModel, PatchError, UnknownSiteError
from mishax_py.ast_patcher import ModuleASTPatcher
from mishax_py.interventions import Hook
from mishax_py.runtime import active_context
from tests.helpers import REPO_ROOT, make_model

TARGETS = list(g2.PATCHES)


def _innermost(target: str):
    obj = modeling_gemma2
    for part in target.split("."):
        obj = getattr(obj, part)
    while hasattr(obj, "__wrapped__"):
        obj = obj.__wrapped__
    return obj


def test_idle_is_bit_identical_across_install_cycles(ids: torch.Tensor) -> None:
    g2.uninstall()
    originals = {t: _innermost(t).__code__ for t in TARGETS}
    model = make_model()  # created before install(): must be instrumented too
    with torch.no_grad():
        ref = model(ids).logits
        im = g2.instrument(model)
        assert g2.installed()
        assert all(_innermost(t).__code__ is not originals[t] for t in TARGETS)
        assert torch.equal(model(ids).logits, ref)
        assert torch.equal(im.run(ids), ref)
        for _ in range(2):
            g2.uninstall()
            assert all(_innermost(t).__code__ is originals[t] for t in TARGETS)
            assert torch.equal(model(ids).logits, ref)
            g2.install()
            assert torch.equal(model(ids).logits, ref)
        # an instrumented run with caching changes nothing either
        logits, cache = im.run_with_cache(ids)
        assert torch.equal(logits, ref) and len(cache) == len(im.site_names())


def test_instrument_is_idempotent_and_runs_after_uninstall_are_refused(tiny_model, ids: torch.Tensor) -> None:
    """Issue 13 B3: after ``uninstall()`` no run re-patches transformers behind the user's back; each raises,
    naming ``install()``, leaves nothing installed and no run active; ``install()``/``instrument()`` resume."""
    im = g2.instrument(tiny_model)
    assert g2.instrument(tiny_model) is im
    with torch.no_grad():
        ref = tiny_model(ids).logits
    g2.uninstall()
    attempts = {
        "run": lambda: im.run(ids),
        "run_with_cache": lambda: im.run_with_cache(ids, sites="blocks.0.resid_post"),
        "intervene": lambda: im.intervene({}).__enter__(),
        "sweep": lambda: im.sweep(ids, [{}]),
        "walk": lambda: list(im.walk(ids)),
    }
    try:
        for name, attempt in attempts.items():
            with pytest.raises(RuntimeError, match=r"uninstall\(\) was called.*instrumentation\.gemma2\.install\(\) "
                                                   r"or instrument\(model\)"):
                attempt()
            assert not g2.installed(), name
            assert active_context() is None, name
        with torch.no_grad():
            assert torch.equal(tiny_model(ids).logits, ref)  # the plain model is clean
    finally:
        assert g2.instrument(tiny_model) is im  # instrument() installs again, explicitly
    assert g2.installed()
    _, cache = im.run_with_cache(ids, sites="blocks.0.resid_post")
    assert "blocks.0.resid_post" in cache
    g2.uninstall()
    g2.install()
    assert torch.equal(im.run(ids), ref)


def test_every_site_fires_once_in_catalogue_order(tiny_im: InstrumentedModel, ids: torch.Tensor) -> None:
    fired: list[str] = []
    tiny_im.run(ids, interventions={"*": Hook(lambda v, ev: fired.append(ev.site))})
    assert fired == tiny_im.site_names()
    n = tiny_im.n_layers
    assert len(fired) == 1 + 21 * n + 2  # embed, 21 per layer, ln_final and logits
    assert len(set(fired)) == len(fired)


def test_shapes_match_site_info(tiny_im: InstrumentedModel, ids: torch.Tensor) -> None:
    _, cache = tiny_im.run_with_cache(ids)
    b, p = ids.shape
    for name in tiny_im.site_names():
        info = tiny_im.site_info(name)
        assert tuple(cache[name].shape) == info.concrete_shape(b, p), name
        assert cache[name].dtype == info.dtype, name
    assert tiny_im.site_info("blocks.1.attn.k").shape == ("batch", "pos", 2, 8)
    assert tiny_im.site_info("blocks.0.ln2_normalized").dtype == torch.float32
    assert "Gemma2Attention.forward" in tiny_im.site_info("blocks.0.attn.q").where


def test_values_agree_with_independent_computations(tiny_im: InstrumentedModel, ids: torch.Tensor) -> None:
    model = tiny_im.model
    cfg = model.config
    with torch.no_grad():
        hf = model(ids, output_hidden_states=True)
        logits, c = tiny_im.run_with_cache(ids)
    n = cfg.num_hidden_layers
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c["embed"], model.model.embed_tokens.weight[ids] * cfg.hidden_size**0.5, **tol)
    for L in range(n):
        b = f"blocks.{L}"
        layer = model.model.layers[L]
        attn, mlp = layer.self_attn, layer.mlp
        if L < n - 1:
            assert torch.equal(c[f"{b}.resid_post"], hf.hidden_states[L + 1])
        torch.testing.assert_close(c[f"{b}.resid_pre"], hf.hidden_states[L], **tol)
        # o_proj(z) == attn_out_pre_norm
        z = c[f"{b}.attn.z"]
        torch.testing.assert_close(attn.o_proj(z.flatten(-2)), c[f"{b}.attn_out_pre_norm"], **tol)
        # pattern rows sum to 1, and pattern = softmax(scores)
        pat = c[f"{b}.attn.pattern"]
        torch.testing.assert_close(pat.sum(-1), torch.ones_like(pat.sum(-1)), **tol)
        torch.testing.assert_close(pat, torch.softmax(c[f"{b}.attn.scores"], -1), **tol)
        # residual arithmetic
        torch.testing.assert_close(c[f"{b}.resid_mid"], c[f"{b}.resid_pre"] + c[f"{b}.attn_out"], **tol)
        torch.testing.assert_close(c[f"{b}.resid_post"], c[f"{b}.resid_mid"] + c[f"{b}.mlp_out"], **tol)
        # norms: RMSNorm with (1 + w), in fp32
        def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            xf = x.float()
            return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * (1 + w.float())

        torch.testing.assert_close(c[f"{b}.ln1"], rms(c[f"{b}.resid_pre"], layer.input_layernorm.weight), **tol)
        torch.testing.assert_close(
            c[f"{b}.attn_out"], rms(c[f"{b}.attn_out_pre_norm"], layer.post_attention_layernorm.weight), **tol
        )
        ln2_expected = rms(c[f"{b}.resid_mid"], layer.pre_feedforward_layernorm.weight)
        torch.testing.assert_close(c[f"{b}.ln2"], ln2_expected, **tol)
        torch.testing.assert_close(
            c[f"{b}.ln2_normalized"] * (1 + layer.pre_feedforward_layernorm.weight), c[f"{b}.ln2"], **tol
        )
        # projections per head, RoPE, attention output
        q = attn.q_proj(c[f"{b}.ln1"]).view(*ids.shape, cfg.num_attention_heads, cfg.head_dim)
        k = attn.k_proj(c[f"{b}.ln1"]).view(*ids.shape, cfg.num_key_value_heads, cfg.head_dim)
        v = attn.v_proj(c[f"{b}.ln1"]).view(*ids.shape, cfg.num_key_value_heads, cfg.head_dim)
        torch.testing.assert_close(c[f"{b}.attn.q"], q, **tol)
        torch.testing.assert_close(c[f"{b}.attn.k"], k, **tol)
        torch.testing.assert_close(c[f"{b}.attn.v"], v, **tol)
        pos = torch.arange(ids.shape[1])[None]
        cos, sin = model.model.rotary_emb(q, pos)
        rq, rk = modeling_gemma2.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        torch.testing.assert_close(c[f"{b}.attn.rot_q"], rq.transpose(1, 2), **tol)
        torch.testing.assert_close(c[f"{b}.attn.rot_k"], rk.transpose(1, 2), **tol)
        # scores: scaled by query_pre_attn_scalar, soft-capped at 50, causal (+ sliding window on even layers)
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        kk = rk.repeat_interleave(group, dim=1)
        raw = rq @ kk.transpose(-1, -2) * cfg.query_pre_attn_scalar**-0.5
        capped = torch.tanh(raw / cfg.attn_logit_softcapping) * cfg.attn_logit_softcapping
        i = torch.arange(ids.shape[1])
        allowed = i[None, :] <= i[:, None]
        if cfg.layer_types[L] == "sliding_attention":
            allowed &= (i[:, None] - i[None, :]) < cfg.sliding_window
        torch.testing.assert_close(torch.softmax(capped.masked_fill(~allowed, float("-inf")), -1), pat, **tol)
        vv = v.transpose(1, 2).repeat_interleave(group, dim=1)
        torch.testing.assert_close(c[f"{b}.attn.z"], (pat @ vv).transpose(1, 2), **tol)
        # MLP
        torch.testing.assert_close(c[f"{b}.mlp.pre"], mlp.gate_proj(c[f"{b}.ln2"]), **tol)
        torch.testing.assert_close(c[f"{b}.mlp.pre_linear"], mlp.up_proj(c[f"{b}.ln2"]), **tol)
        gelu = F.gelu(c[f"{b}.mlp.pre"], approximate="tanh")
        torch.testing.assert_close(c[f"{b}.mlp.post"], gelu * c[f"{b}.mlp.pre_linear"], **tol)
        torch.testing.assert_close(c[f"{b}.mlp_out_pre_norm"], mlp.down_proj(c[f"{b}.mlp.post"]), **tol)
    # the last layer's output is resid_post, and hidden_states[-1] is the final norm of it
    torch.testing.assert_close(c["ln_final"], hf.hidden_states[-1], **tol)
    torch.testing.assert_close(c["ln_final"], rms(c[f"blocks.{n - 1}.resid_post"], model.model.norm.weight), **tol)
    cap = cfg.final_logit_softcapping
    torch.testing.assert_close(c["logits"], torch.tanh(model.lm_head(c["ln_final"]) / cap) * cap, **tol)
    assert torch.equal(c["logits"], logits)


def test_replacing_values_changes_downstream_as_the_math_says(tiny_im: InstrumentedModel, ids: torch.Tensor) -> None:
    model = tiny_im.model
    with torch.no_grad():
        # zero the attention output of layer 0: resid_mid == resid_pre exactly
        _, c = tiny_im.run_with_cache(ids, interventions={"blocks.0.attn_out": lambda v: torch.zeros_like(v)})
        assert torch.equal(c["blocks.0.resid_mid"], c["blocks.0.resid_pre"])
        # a fixed mlp_out X: resid_post = resid_mid + X
        x = torch.randn(*ids.shape, 32)
        _, c = tiny_im.run_with_cache(ids, interventions={"blocks.1.mlp_out": lambda v: x})
        torch.testing.assert_close(c["blocks.1.resid_post"], c["blocks.1.resid_mid"] + x, atol=1e-6, rtol=0)
        # scale ln_final: logits follow through lm_head and the soft-cap
        logits = tiny_im.run(ids, interventions={"ln_final": lambda v: 2 * v})
        _, clean = tiny_im.run_with_cache(ids, sites="ln_final")
        cap = model.config.final_logit_softcapping
        expected = torch.tanh(model.lm_head(2 * clean["ln_final"]) / cap) * cap
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        # a per-head edit of z: zeroing head 1 of layer 1 equals o_proj of the edited z
        def drop_head(v: torch.Tensor) -> torch.Tensor:
            v = v.clone()
            v[:, :, 1] = 0
            return v

        _, c = tiny_im.run_with_cache(ids, interventions={"blocks.1.attn.z": drop_head})
        assert torch.all(c["blocks.1.attn.z"][:, :, 1] == 0)
        torch.testing.assert_close(
            c["blocks.1.attn_out_pre_norm"], model.model.layers[1].self_attn.o_proj(c["blocks.1.attn.z"].flatten(-2))
        )
        # editing the pattern of a transposed-layout site (rot_k) reaches the scores
        _, c = tiny_im.run_with_cache(ids, interventions={"blocks.0.attn.rot_k": lambda v: torch.zeros_like(v)})
        scores = c["blocks.0.attn.scores"]
        finite = scores > -1e30
        assert torch.all(scores[finite] == 0)


def test_a_list_of_interventions_composes_in_order(tiny_im: InstrumentedModel, ids: torch.Tensor) -> None:
    with torch.no_grad():
        _, c = tiny_im.run_with_cache(
            ids, sites="blocks.0.resid_post",
            interventions={"blocks.0.resid_post": [lambda v: v + 1, lambda v: v * 3]},
        )
        _, clean = tiny_im.run_with_cache(ids, sites="blocks.0.resid_post")
    torch.testing.assert_close(c["blocks.0.resid_post"], (clean["blocks.0.resid_post"] + 1) * 3)


def test_gradients_flow_through_hooks_and_reach_cached_values(tiny_im: InstrumentedModel, ids: torch.Tensor) -> None:
    w = torch.tensor(1.5, requires_grad=True)
    logits = tiny_im.run(ids, interventions={"logits": Hook(lambda v: v * w)})
    logits.sum().backward()
    with torch.no_grad():
        plain = tiny_im.run(ids)
    torch.testing.assert_close(w.grad, plain.sum(), rtol=1e-5, atol=1e-4)

    # grad=True: cached values receive .grad; compare with autograd.grad through a Hook
    logits, cache = tiny_im.run_with_cache(ids, sites=["blocks.0.resid_post", "blocks.1.attn.rot_q"], grad=True)
    logits[:, -1].logsumexp(-1).sum().backward()
    captured: dict[str, torch.Tensor] = {}
    for site in ["blocks.0.resid_post", "blocks.1.attn.rot_q"]:

        def grab(v: torch.Tensor, *, _site: str = site) -> torch.Tensor:
            captured[_site] = v
            return v

        out = tiny_im.run(ids, interventions={site: grab})
        (g,) = torch.autograd.grad(out[:, -1].logsumexp(-1).sum(), captured[site])
        assert cache[site].grad is not None, site
        torch.testing.assert_close(cache[site].grad, g, atol=1e-6, rtol=1e-5)
    # grad=False stores detached values
    _, cache = tiny_im.run_with_cache(ids, sites="blocks.0.resid_post")
    assert not cache["blocks.0.resid_post"].requires_grad


def test_aliases_globs_and_unknown_names(tiny_im: InstrumentedModel, ids: torch.Tensor) -> None:
    assert tiny_im.resolve("blocks.*.resid_post") == ["blocks.0.resid_post", "blocks.1.resid_post"]
    assert tiny_im.resolve("blocks.0.hook_resid_post") == ["blocks.0.resid_post"]
    assert tiny_im.resolve("blocks.1.ln2.hook_normalized") == ["blocks.1.ln2_normalized"]
    assert tiny_im.resolve("blocks.0.attn.hook_*")[0] == "blocks.0.attn.q"
    _, cache = tiny_im.run_with_cache(ids, sites=["blocks.*.hook_resid_post"])
    assert list(cache) == ["blocks.0.resid_post", "blocks.1.resid_post"]
    assert torch.equal(cache["blocks.0.hook_resid_post"], cache["blocks.0.resid_post"])
    with pytest.raises(UnknownSiteError) as err:
        tiny_im.run(ids, interventions={"blocks.0.resid_pots": lambda v: v})
    assert "blocks.0.resid_post" in str(err.value)
    with pytest.raises(UnknownSiteError, match="blocks.0.attn.z"):
        tiny_im.site_info("blocks.0.attn.zz")


# The catalogue of one layer as recorded before its aliases came from mishax_py.naming's table:
# (kind, TransformerLens alias suffix or None), in forward order.
LAYER_ALIASES = [
    ("resid_pre", "hook_resid_pre"), ("ln1", None), ("attn.q", "attn.hook_q"), ("attn.k", "attn.hook_k"),
    ("attn.v", "attn.hook_v"), ("attn.rot_q", "attn.hook_rot_q"), ("attn.rot_k", "attn.hook_rot_k"),
    ("attn.scores", "attn.hook_attn_scores"), ("attn.pattern", "attn.hook_pattern"), ("attn.z", "attn.hook_z"),
    ("attn_out_pre_norm", None), ("attn_out", "hook_attn_out"), ("resid_mid", "hook_resid_mid"),
    ("ln2_normalized", "ln2.hook_normalized"), ("ln2", None), ("mlp.pre", "mlp.hook_pre"),
    ("mlp.pre_linear", "mlp.hook_pre_linear"), ("mlp.post", "mlp.hook_post"), ("mlp_out_pre_norm", None),
    ("mlp_out", "hook_mlp_out"), ("resid_post", "hook_resid_post"),
]


def test_catalogue_names_and_aliases_are_unchanged(tiny_im: InstrumentedModel) -> None:
    expected = [("embed", "hook_embed")]
    for layer in range(2):
        expected += [(f"blocks.{layer}.{kind}", None if tl is None else f"blocks.{layer}.{tl}")
                     for kind, tl in LAYER_ALIASES]
    expected += [("ln_final", None), ("logits", None)]
    got = [(name, tiny_im.site_info(name).alias) for name in tiny_im.site_names()]
    assert got == expected
    for name, alias in expected:  # each alias resolves back to its site
        if alias is not None:
            assert tiny_im.resolve(alias) == [name]
    assert tiny_im.family.frozen_norms == [
        ("blocks.0.resid_pre", "blocks.0.ln1"), ("blocks.0.attn_out_pre_norm", "blocks.0.attn_out"),
        ("blocks.0.resid_mid", "blocks.0.ln2_normalized"), ("blocks.1.resid_pre", "blocks.1.ln1"),
        ("blocks.1.attn_out_pre_norm", "blocks.1.attn_out"), ("blocks.1.resid_mid", "blocks.1.ln2_normalized"),
        ("blocks.1.resid_post", "ln_final"),
    ]


def test_generate_inside_intervene_uses_the_kv_cache(tiny_im: InstrumentedModel) -> None:
    model = tiny_im.model
    prompt = torch.tensor([[2, 5, 9, 13, 7]])
    steer = torch.randn(32) * 3
    edit = {"blocks.0.resid_post": lambda v: v + steer}
    with torch.no_grad():
        with tiny_im.intervene(edit):
            out = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        plain = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        seq = prompt
        for _ in range(6):  # greedy, full recompute, same edit at every position
            nxt = tiny_im.run(seq, interventions=edit)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)
    assert not torch.equal(out, plain)  # the edit mattered


def test_left_padded_batches(tiny_im: InstrumentedModel) -> None:
    a = torch.tensor([5, 9, 13, 7, 21, 30])
    b = torch.tensor([8, 11, 40])
    batch = torch.stack([a, torch.cat([torch.zeros(3, dtype=torch.long), b])])
    mask = torch.stack([torch.ones(6, dtype=torch.long), torch.tensor([0, 0, 0, 1, 1, 1])])
    with torch.no_grad():
        logits, cache = tiny_im.run_with_cache(batch, sites="blocks.1.resid_post", attention_mask=mask)
        la, ca = tiny_im.run_with_cache(a, sites="blocks.1.resid_post")
        lb, cb = tiny_im.run_with_cache(b, sites="blocks.1.resid_post")
    torch.testing.assert_close(logits[0], la[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1, 3:], lb[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache["blocks.1.resid_post"][1, 3:], cb["blocks.1.resid_post"][0], atol=1e-5, rtol=1e-5)


def test_threads_get_their_own_interventions_and_caches(tiny_im: InstrumentedModel, ids: torch.Tensor) -> None:
    with torch.no_grad():
        expected_zero = tiny_im.run(ids, interventions={"blocks.0.mlp_out": lambda v: v * 0})
        expected_plain = tiny_im.run(ids)
    barrier = threading.Barrier(2)
    results: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []

    def slow_hook(v: torch.Tensor) -> torch.Tensor:
        barrier.wait(timeout=10)  # both threads are inside a run at the same time
        return v

    def worker(name: str, extra: dict) -> None:
        try:
            with torch.no_grad():
                results[name] = tiny_im.run(ids, interventions={"blocks.0.resid_pre": slow_hook, **extra})
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [
        threading.Thread(target=worker, args=("zero", {"blocks.0.mlp_out": lambda v: v * 0})),
        threading.Thread(target=worker, args=("plain", {})),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert torch.equal(results["zero"], expected_zero)
    assert torch.equal(results["plain"], expected_plain)


def test_a_failing_intervention_leaves_the_model_clean(tiny_im: InstrumentedModel, ids: torch.Tensor) -> None:
    with torch.no_grad():
        ref = tiny_im.run(ids)
        with pytest.raises(ValueError, match=r"blocks.0.resid_post.*\(2, 10, 3\).*\(2, 10, 32\)"):
            tiny_im.run(ids, interventions={"blocks.0.resid_post": lambda v: v[..., :3]})
        def boom(v: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            tiny_im.run(ids, interventions={"blocks.1.mlp.post": Hook(boom)})
        assert torch.equal(tiny_im.model(ids).logits, ref)


def _non_eager_model():
    model = make_model()
    model.set_attn_implementation("flex_attention")  # Gemma 2 here supports eager, flex and flash
    assert model.config._attn_implementation == "flex_attention"
    return model


def test_non_eager_models_are_switched_with_a_warning() -> None:
    model = _non_eager_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        im = g2.instrument(model)
    assert any("eager" in str(w.message) for w in caught)
    assert im.model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="eager"):
        g2.instrument(_non_eager_model(), switch_to_eager=False)


def test_non_gemma2_model_is_a_clear_error() -> None:
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(TypeError, match="Gemma2ForCausalLM.*LlamaForCausalLM"):
        g2.instrument(llama)


def test_a_patch_that_no_longer_matches_raises_patch_error(tmp_path: Path) -> None:
    # A modified copy of the target module, as a future transformers release might look.
    source = Path(modeling_gemma2.__file__).read_text()
    changed = source.replace(
        "down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))",
        "gate = self.act_fn(self.gate_proj(x))\n        down_proj = self.down_proj(gate * self.up_proj(x))",
    )
    assert changed != source
    path = tmp_path / "modeling_gemma2_changed.py"
    path.write_text(changed)
    name = "transformers.models.gemma2.modeling_gemma2_changed"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        with pytest.raises(PatchError) as err:
            ModuleASTPatcher(module, g2.PATCHES).install()
        msg = str(err.value)
        assert "Gemma2MLP.forward" in msg and "self.down_proj(self.act_fn(self.gate_proj(x))" in msg
        assert "gate = self.act_fn" in msg  # shows the source it looked in
    finally:
        sys.modules.pop(name, None)


def test_dependency_range_is_the_verified_releases() -> None:
    """pyproject's transformers range admits every verified release and nothing newer than the newest one."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    pyproject = REPO_ROOT / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "transformers"]
    verified = sorted(Version(v) for v in g2.VERIFIED_TRANSFORMERS)
    assert all(req.specifier.contains(v) for v in verified), (str(req.specifier), verified)
    newest = verified[-1]
    assert not req.specifier.contains(Version(f"{newest.major}.{newest.minor + 1}.0")), str(req.specifier)
