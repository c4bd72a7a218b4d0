"""Acceptance (issue #14, point 1): models dispatched with accelerate give the undispatched model's results.

Two dispatched copies of one random 3-layer Gemma 2 (saved once to a temporary folder), both with some
layers' weights on disk (``offload_folder``: on the ``meta`` device between forwards, loaded by
accelerate's hooks for each forward):

* ``device_map``: ``from_pretrained(folder, device_map=..., offload_folder=...)`` with the embeddings
  (tied to the unembedding), layer 1, layer 2 and the final norm on disk, layer 0 on the CPU -- the
  worst case for code that asks ``next(model.parameters()).device`` where ids go, or reads the
  unembedding directly (attribution graphs, direct logit attribution);
* ``auto``: ``accelerate.infer_auto_device_map(model, max_memory={"cpu": ...})`` with a budget small
  enough to force the later layers to disk, loaded by ``accelerate.load_checkpoint_and_dispatch``.

Every public entry point is compared with the undispatched model (<= 1e-5 in fp32; the numbers are in
fact bit-identical on the CPU): run, run_with_cache (and ``cache_device=``), each intervention kind,
an SAE splice, im.sweep, activation patching (both engines), path patching, each attribution method,
a feature circuit, a transcoder attribution graph, the walk, generation, replacement runs and the zoo's
direct-logit code; a random Gemma 3 dispatched the same way for run, cache and studies. Last, the model
split by ``accelerate.dispatch_model`` over three simulated devices (:mod:`mishax_py.devicecheck`), with
SAEs, transcoders and steering vectors left on the CPU: every value must follow the site it meets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from accelerate import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch
from transformers import Gemma2ForCausalLM, Gemma3ForCausalLM

import instrumentation.gemma2 as g2
import instrumentation.gemma3 as g3
import saes
from mishax_py import InstrumentedModel
from mishax_py.circuits import attribution_graph, feature_circuit
from mishax_py.devices import execution_device, input_device, materialised_weight
from mishax_py.interventions import Ablate, Clamp, Hook, Patch, Steer
from mishax_py.studies import activation_patching, attribution_patching, path_patching, path_patching_by_head
from tests.helpers import make_gemma3, make_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

TOL = dict(rtol=0.0, atol=1e-5)
N_LAYERS = 3
EXPLICIT_MAP = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk",
                "model.layers.2": "disk", "model.norm": "disk", "model.rotary_emb": "cpu", "lm_head": "disk"}


def offloaded(model: torch.nn.Module) -> set[str]:
    """Names of the parameters on the meta device (offloaded by accelerate)."""
    return {n for n, p in model.named_parameters() if p.device.type == "meta"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, InstrumentedModel]:
    """``{"reference", "device_map", "auto"}``: the undispatched model and its two dispatched copies."""
    folder = tmp_path_factory.mktemp("gemma2")
    ref = make_model(seed=0, num_hidden_layers=N_LAYERS)
    ref.save_pretrained(folder)
    explicit = Gemma2ForCausalLM.from_pretrained(folder, device_map=EXPLICIT_MAP, offload_folder=folder / "offload",
                                                 attn_implementation="eager").eval()
    size = sum(p.numel() * p.element_size() for p in ref.parameters())
    device_map = infer_auto_device_map(ref, max_memory={"cpu": int(0.6 * size)},
                                       no_split_module_classes=ref._no_split_modules)
    assert set(device_map.values()) == {"cpu", "disk"}, device_map  # a real split, some of it on disk
    with init_empty_weights():
        auto = Gemma2ForCausalLM(ref.config)
    auto.tie_weights()
    auto = load_checkpoint_and_dispatch(auto, str(folder), device_map=device_map,
                                        offload_folder=str(folder / "offload_auto")).eval()
    for m in (explicit, auto):
        assert offloaded(m), "the fixture must offload some weights to disk"
    assert "model.embed_tokens.weight" in offloaded(explicit)
    return {"reference": g2.instrument(ref), "device_map": g2.instrument(explicit), "auto": g2.instrument(auto)}


@pytest.fixture(scope="module")
def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(4, 64, (2, 8), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = 7
    corrupt[:, 5] = torch.randint(4, 64, (2,), generator=g)
    return clean, corrupt


def metric(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, 5] - logits[:, -1, 9]).mean()


def random_(module: torch.nn.Module, seed: int, std: float = 0.3) -> Any:
    """``module`` with every parameter redrawn from N(0, std) (random SAEs and transcoders), frozen."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module.requires_grad_(False)


def same(models: dict[str, InstrumentedModel], fn: Callable[[InstrumentedModel], Any]) -> None:
    """``fn(im)`` on each dispatched model equals ``fn`` on the reference (tensors, results, dicts, tuples)."""
    want = fn(models["reference"])
    for name in ("device_map", "auto"):
        close(fn(models[name]), want, name)


def close(got: Any, want: Any, where: str) -> None:
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            close(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            close(a, b, f"{where}[{i}]")
    elif isinstance(want, (int, float)):
        assert got == pytest.approx(want, abs=1e-5), where
    else:
        a, b = torch.as_tensor(got), torch.as_tensor(want)
        assert a.device.type != "meta", f"{where}: a result on the meta device"
        torch.testing.assert_close(a.detach(), b.detach(), **TOL, msg=lambda m: f"{where}: {m}")


# -- the device helpers on a dispatched model --------------------------------------------------------
def test_the_helpers_never_answer_meta(models):
    """Where ids go, where the model computes, and a weight read directly: real devices and data even
    though the embeddings/unembedding live on disk (the parameters say ``meta``)."""
    im, ref = models["device_map"], models["reference"]
    assert next(im.model.parameters()).device.type == "meta"
    assert input_device(im) == execution_device(im) == torch.device("cpu")
    head = im.model.get_output_embeddings()
    assert head.weight.device.type == "meta"
    torch.testing.assert_close(materialised_weight(head), ref.model.get_output_embeddings().weight.detach())
    assert head.weight.device.type == "meta"  # loaded for the read only
    norm = im.model.model.layers[1].input_layernorm
    torch.testing.assert_close(materialised_weight(norm), ref.model.model.layers[1].input_layernorm.weight.detach())
    with pytest.raises(TypeError, match="no tensor 'bias'"):
        materialised_weight(norm, "bias")


# -- runs, caches, interventions -------------------------------------------------------------------
@torch.no_grad()
def test_run_and_cache(models, prompts):
    clean, _ = prompts
    same(models, lambda im: im.run(clean))
    same(models, lambda im: dict(im.run_with_cache(clean)[1]))
    same(models, lambda im: dict(im.run_with_cache(clean, sites="blocks.*.attn.z", cache_device="cpu")[1]))


def test_cache_device_moves_every_value_as_it_is_recorded(models, prompts):
    """``cache_device``: each value lands there when recorded (the meta device shows the move on a CPU-only
    machine: the model still computes on the CPU and its logits are unchanged); not with ``grad=True``."""
    clean, _ = prompts
    for name in ("reference", "device_map"):
        im = models[name]
        with torch.no_grad():
            logits, cache = im.run_with_cache(clean, sites=["blocks.*.resid_post", "blocks.1.attn.pattern"],
                                              cache_device="meta")
            want_logits, want = models["reference"].run_with_cache(clean, sites=["blocks.*.resid_post",
                                                                                 "blocks.1.attn.pattern"])
        assert logits.device.type == "cpu"
        torch.testing.assert_close(logits, want_logits, **TOL)
        assert list(cache) == list(want)
        for k, v in cache.items():
            assert v.device.type == "meta" and v.shape == want[k].shape, k
        with pytest.raises(ValueError, match="grad=True, cache_device='cpu'"):
            im.run_with_cache(clean, sites="blocks.0.resid_post", grad=True, cache_device="cpu")


@torch.no_grad()
def test_every_intervention_kind(models, prompts):
    clean, corrupt = prompts
    _, source = models["reference"].run_with_cache(clean)
    sae = random_(saes.ReLUSAE(32, 24, site="blocks.1.resid_mid"), seed=3)
    vector = torch.randn(32, generator=torch.Generator().manual_seed(4))
    kinds = {
        "ablate": {"blocks.1.attn.z": Ablate(heads=[1, 3])},
        "ablate mean": {"blocks.2.mlp.post": Ablate(mean=source)},
        "clamp": {"blocks.1.mlp.post": Clamp(1.5, index=[3, 7])},
        "patch": {"blocks.1.resid_pre": Patch(source, positions=[2, 5])},
        "patch tensor": {"blocks.2.attn.v": Patch(source["blocks.2.attn.v"], heads=[0])},
        "steer": {"blocks.2.resid_post": Steer(vector, scale=2.0, positions=-1)},
        "hook": {"blocks.1.mlp_out": Hook(lambda v: v * 0.5)},
        "splice": {sae.site: saes.Splice(sae, edit=saes.FeatureClamp([2], 3.0))},
    }
    for kind, interventions in kinds.items():
        want = models["reference"].run(corrupt, interventions=interventions)
        assert not torch.allclose(want, models["reference"].run(corrupt)), kind  # each edit changes the logits
        for name in ("device_map", "auto"):
            close(models[name].run(corrupt, interventions=interventions), want, f"{name}: {kind}")
    same(models, lambda im: dict(im.run_with_cache(corrupt, sites=[f"{sae.site}.sae.features"],
                                                   interventions={sae.site: saes.Splice(sae)})[1]))


@torch.no_grad()
def test_sweep(models, prompts):
    clean, _ = prompts
    variants = [{"blocks.1.attn.z": Ablate(heads=[h])} for h in range(4)] + [{"blocks.2.resid_pre": Ablate()}]
    same(models, lambda im: im.sweep(clean, variants, metric=metric))
    same(models, lambda im: im.sweep(clean, variants[:2]))  # the logits of each variant


# -- studies ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["packed", "rows"])
def test_activation_patching(models, prompts, engine):
    clean, corrupt = prompts
    same(models, lambda im: activation_patching(im, clean, corrupt, metric, site="resid_pre", engine=engine))
    same(models, lambda im: activation_patching(im, clean, corrupt, metric, site="attn.z", by="head", engine=engine))


def test_path_patching(models, prompts):
    clean, corrupt = prompts
    same(models, lambda im: path_patching_by_head(im, clean, corrupt, metric, receivers=[(2, 0, "q"), (2, 1, "k")]))
    same(models, lambda im: path_patching(im, clean, corrupt, metric, senders=[(0, 1), "blocks.1.mlp_out"],
                                          receivers=[(2, 1, "v")], freeze_mlps=True))


@pytest.mark.parametrize("method", ["atp", "atp*", "atp-layer", "ig", "ig-input"])
def test_attribution(models, prompts, method):
    clean, corrupt = prompts
    same(models, lambda im: attribution_patching(im, clean, corrupt, metric, site="attn.z", by="head", method=method))
    same(models, lambda im: attribution_patching(im, clean, corrupt, metric, site="resid_pre", method=method))


# -- circuits --------------------------------------------------------------------------------------
def test_feature_circuit(models, prompts):
    clean, corrupt = prompts
    sae_list = [random_(saes.ReLUSAE(32, 24, site="blocks.0.resid_post"), seed=5),
                random_(saes.ReLUSAE(32, 24, site="blocks.1.resid_mid"), seed=6)]

    def circuit(im):
        c = feature_circuit(im, clean, corrupt, metric, saes=sae_list, top_k=6)
        return c.effects, c.error_effects, c.metric_clean, c.metric_patch, c.nodes, c.edges

    want = circuit(models["reference"])
    assert want[5], "the circuit has edges"
    for name in ("device_map", "auto"):
        got = circuit(models[name])
        close(got[:4], want[:4], name)
        assert got[4] == want[4] and got[5].keys() == want[5].keys(), name
        close(list(got[5].values()), list(want[5].values()), name)


def test_attribution_graph(models, prompts):
    """The graph reads the unembedding directly (``get_output_embeddings()``; on disk in ``device_map``)."""
    clean, _ = prompts
    tcs = {layer: random_(saes.Transcoder(32, 24, d_out=32, site=f"blocks.{layer}.ln2_normalized",
                                          output_site=f"blocks.{layer}.mlp_out", activation="relu"), seed=7 + layer)
           for layer in range(N_LAYERS)}

    def graph(im):
        g = attribution_graph(im, clean[0], tcs, batch_size=32)
        return g.adjacency, g.bias, g.features, g.activations, g.logit_tokens, g.logit_values, g.error_norms

    same(models, graph)


def test_walk_generation_replacement_and_weight_readers(models, prompts):
    """The Mishax loop, generation under ``im.intervene``, several attribution grids at once, the replacement
    model's run, and the zoo's direct-logit code (it reads the unembedding and the final norm directly)."""
    from mishax_py.circuits import replacement_interventions
    from mishax_py.studies import attribution_patching_sites
    from mishax_py.zoo.analyses import final_norm_scale, unembedding_directions

    clean, corrupt = prompts

    def walk(im):
        with im.walk(clean) as w:
            for site, value in w:
                if site == "blocks.1.mlp_out":
                    w.replace(value * 0)
        return w.output

    def generate(im):
        with im.intervene({"blocks.2.resid_post": Steer(torch.ones(32), scale=1.0, positions="new")}):
            return im.model.generate(clean[:1], max_new_tokens=4, do_sample=False)

    tcs = {1: random_(saes.Transcoder(32, 24, d_out=32, site="blocks.1.ln2_normalized", output_site="blocks.1.mlp_out",
                                      activation="relu"), seed=8)}
    same(models, walk)
    same(models, generate)
    same(models, lambda im: {k: torch.as_tensor(v) for k, v in attribution_patching_sites(
        im, clean, corrupt, metric, sites={"attn.z": "head", "mlp_out": "pos"}).items()})
    same(models, lambda im: im.run(clean[:1], interventions=replacement_interventions(im, clean[:1], tcs,
                                                                                      clamps=[(1, 3, 2, 0.0)])))
    same(models, lambda im: (unembedding_directions(im), final_norm_scale(im, clean)))


# -- Gemma 3 ---------------------------------------------------------------------------------------
def test_gemma3_dispatched(tmp_path, prompts):
    """A random Gemma 3 with its embeddings and its global-attention layer on disk: run, cache, a study."""
    ref = make_gemma3(seed=0)
    ref.save_pretrained(tmp_path)
    device_map = {"model.embed_tokens": "disk", "model.norm": "disk", "model.rotary_emb": "cpu",
                  "lm_head": "disk", **{f"model.layers.{i}": ("disk" if i in (1, 5) else "cpu") for i in range(6)}}
    dispatched = Gemma3ForCausalLM.from_pretrained(tmp_path, device_map=device_map, offload_folder=tmp_path / "off",
                                                   attn_implementation="eager").eval()
    assert "model.layers.5.self_attn.q_norm.weight" in offloaded(dispatched)
    pair = {"reference": g3.instrument(ref), "device_map": g3.instrument(dispatched)}
    clean, corrupt = prompts
    want = {"logits": pair["reference"].run(clean).detach(),
            "cache": dict(pair["reference"].run_with_cache(clean, sites="blocks.5.*")[1]),
            "patching": activation_patching(pair["reference"], clean, corrupt, metric, site="attn.z", by="head"),
            "atp": attribution_patching(pair["reference"], clean, corrupt, metric, site="resid_pre")}
    im = pair["device_map"]
    close(im.run(clean), want["logits"], "gemma3 run")
    close(dict(im.run_with_cache(clean, sites="blocks.5.*", cache_device="cpu")[1]), want["cache"], "gemma3 cache")
    close(activation_patching(im, clean, corrupt, metric, site="attn.z", by="head"), want["patching"], "gemma3")
    close(attribution_patching(im, clean, corrupt, metric, site="resid_pre"), want["atp"], "gemma3 atp")


# -- a model split over several devices ------------------------------------------------------------
SPLIT_MAP = {"model.embed_tokens": "sim:0", "model.rotary_emb": "sim:0", "lm_head": "sim:0", "model.layers.0": "sim:0",
             "model.layers.1": "sim:1", "model.layers.2": "sim:2", "model.norm": "sim:2"}


def test_a_model_split_over_three_devices(models, prompts):
    """Layers on three (simulated: :mod:`mishax_py.devicecheck`, CUDA's device rules on the CPU) devices,
    dispatched by ``accelerate.dispatch_model``: each layer's values live on its device, so every tensor
    the library makes or is given (masks, indices, patch sources, steering vectors and SAEs left on the
    CPU) must follow the value it meets; the results equal the reference's (the attribution graph's with
    transcoders on the CPU too)."""
    from accelerate import dispatch_model

    from mishax_py import devicecheck

    ref = models["reference"]
    clean, corrupt = prompts
    _, source = ref.run_with_cache(clean)
    sae_list = [random_(saes.ReLUSAE(32, 24, site="blocks.0.resid_post"), seed=5),
                random_(saes.ReLUSAE(32, 24, site="blocks.1.resid_mid"), seed=6)]
    vector = torch.randn(32, generator=torch.Generator().manual_seed(4))
    tcs = {layer: random_(saes.Transcoder(32, 24, d_out=32, site=f"blocks.{layer}.ln2_normalized",
                                          output_site=f"blocks.{layer}.mlp_out", activation="relu"), seed=7 + layer)
           for layer in range(N_LAYERS)}
    checks: dict[str, Callable[[InstrumentedModel], Any]] = {
        "run": lambda im: im.run(clean),
        "cache": lambda im: dict(im.run_with_cache(clean, sites="blocks.*.resid_post")[1]),
        "cache_device": lambda im: dict(im.run_with_cache(clean, sites="blocks.*.attn.z", cache_device="cpu")[1]),
        "interventions": lambda im: im.run(corrupt, interventions={
            "blocks.1.attn.z": Ablate(heads=[1]), "blocks.2.resid_pre": Patch(source, positions=[2]),
            "blocks.2.mlp.post": Clamp(1.0, index=[3]), "blocks.2.resid_post": Steer(vector, scale=2.0),
            sae_list[1].site: saes.Splice(sae_list[1])}),
        "sweep": lambda im: im.sweep(clean, [{"blocks.1.attn.z": Ablate(heads=[h])} for h in range(4)], metric=metric),
        "packed": lambda im: activation_patching(im, clean, corrupt, metric, site="resid_pre"),
        "rows": lambda im: activation_patching(im, clean, corrupt, metric, site="attn.z", by="head", engine="rows"),
        "path": lambda im: path_patching_by_head(im, clean, corrupt, metric, receivers=[(2, 0, "q")]),
        **{m: (lambda im, m=m: attribution_patching(im, clean, corrupt, metric, site="attn.z", by="head", method=m))
           for m in ("atp", "atp*", "atp-layer", "ig", "ig-input")},
        "feature circuit": lambda im: feature_circuit(im, clean, corrupt, metric, saes=sae_list,
                                                      top_k=6).error_effects,
        "graph": lambda im: attribution_graph(im, clean[0], tcs, batch_size=32).adjacency,
    }
    want = {name: fn(ref) for name, fn in checks.items()}
    with devicecheck.simulated():
        model = dispatch_model(make_model(seed=0, num_hidden_layers=N_LAYERS), device_map=SPLIT_MAP,
                               main_device="sim:0")
        im = g2.instrument(model)
        assert {p.device.index for p in model.parameters()} == {0, 1, 2}
        for name, fn in checks.items():
            close(to_cpu(fn(im)), want[name], f"split: {name}")


def to_cpu(x: Any) -> Any:
    """Results as CPU tensors (a simulated device's tensors unwrapped), through dicts and results."""
    from mishax_py import devicecheck

    if isinstance(x, dict):
        return {k: to_cpu(v) for k, v in x.items()}
    t = torch.as_tensor(x).detach()
    return devicecheck.unwrap(t.cpu()) if t.device.type != "cpu" else t


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")
def test_on_a_gpu_with_cpu_and_disk_offload(models, prompts, tmp_path):
    """The real case: layers on the GPU, one offloaded to the CPU and one to disk (both loaded onto the GPU
    for their forward); a cache recorded into host memory (``cache_device="cpu"``); studies and a graph."""
    ref = models["reference"]
    ref.model.save_pretrained(tmp_path)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "lm_head": 0, "model.layers.0": 0,
                  "model.layers.1": "cpu", "model.layers.2": "disk", "model.norm": 0}
    model = Gemma2ForCausalLM.from_pretrained(tmp_path, device_map=device_map, offload_folder=tmp_path / "off",
                                              attn_implementation="eager").eval()
    im = g2.instrument(model)
    clean, corrupt = prompts
    assert input_device(im).type == "cuda" and offloaded(model)
    tol = dict(rtol=1e-4, atol=1e-4)  # GPU kernels vs the CPU's
    with torch.no_grad():
        logits, cache = im.run_with_cache(clean, sites="blocks.*.resid_post", cache_device="cpu")
        want_logits, want = ref.run_with_cache(clean, sites="blocks.*.resid_post")
    assert logits.device.type == "cuda" and {v.device.type for v in cache.values()} == {"cpu"}
    torch.testing.assert_close(logits.cpu(), want_logits, **tol)
    for k in want:
        torch.testing.assert_close(cache[k], want[k], **tol)
    tcs = {layer: random_(saes.Transcoder(32, 24, d_out=32, site=f"blocks.{layer}.ln2_normalized",
                                          output_site=f"blocks.{layer}.mlp_out", activation="relu"), seed=7 + layer)
           for layer in range(N_LAYERS)}  # left on the CPU: they follow the sites
    for fn in (lambda m: attribution_patching(m, clean, corrupt, metric, site="attn.z", by="head", method="atp*"),
               lambda m: activation_patching(m, clean, corrupt, metric, site="resid_pre"),
               lambda m: attribution_graph(m, clean[0], tcs, batch_size=32).adjacency):
        torch.testing.assert_close(torch.as_tensor(fn(im)).cpu(), torch.as_tensor(fn(ref)), **tol)
