"""Acceptance (issue #14, point 2): every public entry point is device-correct, checked without a GPU.

The model, the inputs, the SAEs and the transcoders live on the simulated device ``sim``
(:mod:`mishax_py.devicecheck`: CPU tensors that report ``sim:0`` and refuse the mixed-device ops CUDA
refuses), so any tensor the library makes without the value's device (``torch.zeros(n)`` instead of
``torch.zeros(n, device=x.device)``, a CPU mask, a CPU constant) raises ``DeviceMismatchError`` naming the
op. The entry points: the ``InstrumentedModel`` methods, every intervention kind, execution, every study
and attribution method, feature circuits, attribution graphs and replacement runs, SAEs of every kind
(encode/decode, splices, feature edits, the torch kernels, a few training steps, evaluation) and the cheap
zoo analyses, on a random Gemma 2 (and a random Gemma 3 for a subset). Results are also compared with the
plain CPU run (the simulator computes on the CPU, so they are equal). SAEs and transcoders left on the CPU
must work with a device model too.

Each test runs for every placement of :data:`PLACEMENTS`: the model on ``sim:0``; the model dispatched by
accelerate over two simulated GPUs (``sim:0`` and ``sim:1``, :data:`SPLIT_MAP`), where values must move to
the device of the layer they meet; and, with ``pytest -m gpu`` on a CUDA machine, the model on a real GPU
(skipped elsewhere, with the one reason "needs a CUDA device"; ``scripts/gpu_check.sh`` runs them).

:func:`test_every_public_name_is_exercised_or_excused` keeps the list complete: every name in the public
``__all__`` of ``mishax_py``'s and ``saes``' packages, the family modules and the entry-point modules
listed in :data:`ENTRY_MODULES`, and every public attribute of ``InstrumentedModel``, is either exercised
here (:func:`covers`) or excused with a reason in :data:`EXCUSED`; a new entry point fails it until it is
one or the other. :func:`test_the_check_catches_a_planted_device_bug` shows the check has teeth.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import instrumentation.gemma2 as g2
import instrumentation.gemma3 as g3
import mishax_py
import saes
from mishax_py import InstrumentedModel, devicecheck
from mishax_py.circuits import (
    ablate_complement,
    attribution_graph,
    attribution_graphs,
    estimate_graph_memory,
    feature_circuit,
    graph_to_html,
    load_graph_json,
    render_graph,
    replacement_interventions,
)
from mishax_py.devicecheck import DeviceMismatchError, SimTensor
from mishax_py.execution import default_batch_size, stacked_sweep, sweep
from mishax_py.interventions import Ablate, Clamp, Hook, Patch, Steer, as_intervention_list
from mishax_py.interventions.selection import Selector
from mishax_py.studies import (
    activation_patching,
    attribution_patching,
    attribution_patching_sites,
    check_attribution,
    path_patching,
    path_patching_by_head,
    plot,
    site_gradients,
)
from mishax_py.studies.attribution import pearson
from saes import train as sae_train
from tests.helpers import make_gemma3, make_model, two_position_metric

pytestmark = pytest.mark.usefixtures("one_thread")

ENTRY_MODULES = ["saes.train", "saes.evaluation"]  # modules whose __all__ count as entry points too

COVERED: dict[str, str] = {}  # public name -> the test that runs it on the simulated device


def covers(*names: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Record that the decorated test runs ``names`` (qualified: ``mishax_py.studies.path_patching``)."""

    def deco(fn: Callable[..., None]) -> Callable[..., None]:
        for n in names:
            COVERED[n] = fn.__name__
        return fn

    return deco


def on_sim(t: torch.Tensor) -> bool:
    return isinstance(t, SimTensor) and t.device.type == "sim"


def assert_on(dev: torch.device, *ts: Any) -> None:
    """Each tensor is on ``dev`` (a sim device: a :class:`SimTensor` on it)."""
    for t in ts:
        ok = on_sim(t) if dev.type == "sim" else isinstance(t, torch.Tensor) and t.device.type == dev.type
        assert ok, f"expected a tensor on {dev}, got {type(t).__name__} on {getattr(t, 'device', None)}"


def assert_on_sim(*ts: Any) -> None:
    assert_on(torch.device("sim", 0), *ts)


def move(obj: Any, dev: torch.device | None) -> Any:
    """A module or tensor on ``dev`` (``None``: left on the CPU); sim devices through :func:`devicecheck.place`."""
    if dev is None:
        return obj
    return devicecheck.place(obj, dev) if dev.type == "sim" else obj.to(dev)


def assert_matches(got: torch.Tensor, want: torch.Tensor, dev: torch.device, atol: float = 1e-6) -> None:
    """``got`` (on ``dev``) equals the CPU's ``want``: to ``atol`` on the simulator (CPU arithmetic), to float32
    rounding on a GPU (other kernels, other summation orders)."""
    got = got.detach().cpu()
    if dev.type == "sim":
        torch.testing.assert_close(got, want, rtol=0.0, atol=atol)
    else:
        torch.testing.assert_close(got, want, rtol=1e-3, atol=max(atol, 1e-4))


def assert_finite(*ts: Any) -> None:
    """Study results may come back on the model's device or on the CPU (small grids); either is fine."""
    for t in ts:
        assert torch.isfinite(torch.as_tensor(t).cpu()).all()


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def sim() -> Iterator[torch.device]:
    """Every test runs inside the simulator."""
    with devicecheck.simulated() as dev:
        yield dev


@pytest.fixture(scope="module")
def ref_im() -> InstrumentedModel:
    """The plain CPU model (the same weights as :func:`im`), for equality checks."""
    return g2.instrument(make_model(seed=0))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# where the model lives: "sim" (sim:0), "split" (layer 0, the embeddings and the unembedding on sim:0, layer 1 and
# the final norm on sim:1: a model dispatched over two GPUs by accelerate), "cuda" (a real GPU: pytest -m gpu)
PLACEMENTS = ["sim", "split", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]
SPLIT_MAP = {
    "model.embed_tokens": "sim:0",
    "model.rotary_emb": "sim:0",
    "model.layers.0": "sim:0",
    "model.layers.1": "sim:1",
    "model.norm": "sim:1",
    "lm_head": "sim:0",
}


@pytest.fixture(scope="module", params=PLACEMENTS)
def placement(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def one_device_only(placement: str) -> None:
    """Tests whose subject does not depend on the model's split run on one device only (time)."""
    if placement == "split":
        pytest.skip("the same on one device")


@pytest.fixture(scope="module")
def dev(placement: str) -> torch.device:
    """The device the inputs go to (the model's first): ``sim:0``, or a real GPU."""
    with devicecheck.simulated():
        return torch.device("cuda", 0) if placement == "cuda" else devicecheck.device(0)


def placed(model: torch.nn.Module, placement: str, dev: torch.device) -> torch.nn.Module:
    """``model`` on ``dev``, or dispatched over sim:0 and sim:1 by accelerate (``placement == "split"``)."""
    if placement != "split":
        return move(model, dev)
    from accelerate import dispatch_model

    return dispatch_model(model, device_map=SPLIT_MAP, main_device="sim:0")


@pytest.fixture(scope="module")
def im(placement: str, dev: torch.device) -> InstrumentedModel:
    """A random 2-layer Gemma 2 whose parameters and buffers are on ``dev`` (or split, see :data:`PLACEMENTS`)."""
    with devicecheck.simulated():
        return g2.instrument(placed(make_model(seed=0), placement, dev))


@pytest.fixture(scope="module")
def im3(placement: str, dev: torch.device) -> InstrumentedModel:
    """A random 2-layer Gemma 3 on ``dev`` (QK-norm, sliding layer), or split."""
    with devicecheck.simulated():
        return g3.instrument(placed(make_gemma3(seed=1, n_layers=2), placement, dev))


@pytest.fixture(scope="module")
def cpu_pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(4, 64, (2, 8), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(4, 64, (2,), generator=g)
    return clean, corrupt


@pytest.fixture(scope="module")
def pair(cpu_pair: tuple[torch.Tensor, torch.Tensor], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    with devicecheck.simulated():
        return cpu_pair[0].to(dev), cpu_pair[1].to(dev)


def metric(logits: torch.Tensor) -> torch.Tensor:
    return two_position_metric(logits)


def random_sae(
    kind: str, site: str, dev: torch.device | None, d: int = 32, d_sae: int = 48, seed: int = 0, **kw: Any
) -> saes.SAE:
    """A random SAE of ``kind`` on ``site`` whose features fire on a good share of positions, on ``dev``."""
    g = torch.Generator().manual_seed(seed)
    cls = {"jumprelu": saes.JumpReLUSAE, "relu": saes.ReLUSAE, "topk": saes.TopKSAE}[kind]
    sae = cls(d, d_sae, site=site, **({"k": 6} if kind == "topk" else {}), **kw)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, d_sae, generator=g) / d**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d, generator=g) / d_sae**0.5)
        if kind == "jumprelu":
            sae.threshold.fill_(0.05)
    return move(sae.requires_grad_(False), dev)


def random_transcoder(layer: int, dev: torch.device | None, seed: int = 0, skip: bool = False) -> saes.Transcoder:
    """A random ReLU transcoder ``blocks.L.ln2_normalized -> blocks.L.mlp_out`` on ``dev``."""
    g = torch.Generator().manual_seed(seed)
    tc = saes.Transcoder(
        32,
        40,
        d_out=32,
        site=f"blocks.{layer}.ln2_normalized",
        output_site=f"blocks.{layer}.mlp_out",
        activation="relu",
        skip=skip,
    )
    with torch.no_grad():
        tc.W_enc.copy_(torch.randn(32, 40, generator=g) / 32**0.5)
        tc.W_dec.copy_(torch.randn(40, 32, generator=g) * 0.05)
        tc.b_enc.fill_(-0.1)
        if skip:
            tc.W_skip.copy_(torch.randn(32, 32, generator=g) * 0.01)
    tc.requires_grad_(False)
    return move(tc, dev)


# -- the simulator itself ----------------------------------------------------------------------------


@covers("mishax_py.devicecheck")
def test_the_simulator_follows_cudas_device_rules(sim: torch.device) -> None:
    x = torch.randn(3, 4).to(sim)
    assert_on_sim(x, x + 1, x * torch.tensor(2.0), x[torch.tensor([0, 2])], torch.zeros(2, device=x.device))
    assert_on_sim(torch.tensor([1.0], device=sim), x.new_zeros(2), torch.arange(3, device=sim))
    assert not isinstance(x.cpu(), SimTensor) and x.cpu().device.type == "cpu"
    y = x.clone()
    y[torch.tensor([1])] = 0.0  # CPU indices are fine, as on CUDA
    y[0] = torch.ones(4)  # a copy between devices is fine
    assert_on_sim(y)
    for bad in (
        lambda: x + torch.zeros(4),
        lambda: torch.cat([x, torch.zeros(1, 4)]),
        lambda: torch.where(torch.ones(3, 4, dtype=torch.bool), x, 0.0),
        lambda: torch.zeros(5)[torch.tensor([0]).to(sim)],
        lambda: x.numpy(),
        lambda: torch.randn(2, device=sim, generator=torch.Generator()),
    ):
        with pytest.raises(DeviceMismatchError):
            bad()
    with pytest.raises(DeviceMismatchError, match=r"aten\.add\.Tensor mixes sim:0 and cpu"):
        x + torch.zeros(3, 4)


# -- the instrumented model -------------------------------------------------------------------------------


@covers(
    "mishax_py.InstrumentedModel",
    "InstrumentedModel.run",
    "InstrumentedModel.run_with_cache",
    "InstrumentedModel.forward",
    "mishax_py.ActivationCache",
    "instrumentation.gemma2.instrument",
)
def test_run_and_caches(
    dev: torch.device, im: InstrumentedModel, ref_im: InstrumentedModel, pair: Any, cpu_pair: Any
) -> None:
    clean, _ = pair
    logits = im.run(clean)
    assert_on(dev, logits)
    assert_matches(logits, ref_im.run(cpu_pair[0]), dev, atol=0.0)
    _, cache = im.run_with_cache(clean)
    assert_on(dev, *cache.values())
    _, cpu_cache = ref_im.run_with_cache(cpu_pair[0])
    for k in cpu_cache:
        assert_matches(cache[k], cpu_cache[k], dev, atol=0.0)
    logits, cache = im.run_with_cache(clean, sites=["blocks.*.resid_post", "blocks.1.attn.hook_pattern"], grad=True)
    metric(logits).backward()
    assert_on(dev, cache["blocks.1.resid_post"].grad)
    assert_on(dev, im.forward(clean))
    with torch.no_grad():
        im.run(clean.cpu())  # ids on the CPU are moved to the model's device, as users pass them
        _, on_cpu = im.run_with_cache(clean, sites=["blocks.*.resid_post"], cache_device="cpu")
    assert all(type(v) is torch.Tensor and v.device.type == "cpu" for v in on_cpu.values())
    assert_matches(on_cpu["blocks.1.resid_post"], cpu_cache["blocks.1.resid_post"], dev)


@covers(
    "InstrumentedModel.intervene",
    "InstrumentedModel.sweep",
    "InstrumentedModel.walk",
    "mishax_py.execution.sweep",
    "mishax_py.execution.stacked_sweep",
    "mishax_py.execution.default_batch_size",
    "mishax_py.execution.Walker",
)
def test_intervene_generate_sweep_walk(dev: torch.device, im: InstrumentedModel, pair: Any) -> None:
    clean, _ = pair
    vec = torch.randn(32).to(dev)
    with torch.no_grad(), im.intervene({"blocks.0.resid_post": Steer(vec, scale=2.0, positions="new")}):
        out = im.model.generate(clean[:, :5], max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert_on(dev, out)
    variants = [{"blocks.0.attn.z": Ablate(heads=[h])} for h in range(4)]
    with torch.no_grad():
        eff = im.sweep(clean, variants, metric=metric)
        assert_on(dev, eff)
        assert len(sweep(im, clean, variants, metric)) == 4
        assert_on(dev, stacked_sweep(im, clean, variants, metric))
    assert_on(dev, im.sweep(clean, variants[:2], metric=metric, grad=True))
    assert default_batch_size(im, 2, 8) >= 1
    with torch.no_grad(), im.walk(clean) as w:
        for site, value in w:
            assert_on(dev, value)
            if site == "blocks.1.mlp_out":
                w.replace(value * 0)
    assert_on(dev, w.output)


@covers(
    "mishax_py.interventions.Ablate",
    "mishax_py.interventions.Clamp",
    "mishax_py.interventions.Patch",
    "mishax_py.interventions.Steer",
    "mishax_py.interventions.Hook",
    "mishax_py.interventions.as_intervention_list",
    "mishax_py.interventions.SelectiveEdit",
    "mishax_py.interventions.Intervention",
)
def test_every_intervention_kind(dev: torch.device, im: InstrumentedModel, pair: Any) -> None:
    clean, corrupt = pair
    with torch.no_grad():
        _, cache = im.run_with_cache(clean)
        kinds: list[dict[str, Any]] = [
            {"blocks.0.attn.z": Ablate(heads=[1, 3])},
            {"blocks.0.attn.z": Ablate(mean=cache, heads=[0], positions=[1, 2])},
            {"blocks.1.resid_pre": Ablate(mean=cache, mean_over_positions=True)},
            {"blocks.1.mlp.post": Ablate(resample=True, index=[3, 5])},
            {"blocks.1.mlp.post": Clamp(0.5, index=[7], positions=-1)},
            {"blocks.1.mlp.post": Clamp(torch.tensor(2.0).to(dev), rows=[0])},
            {"blocks.1.resid_pre": Patch(cache, positions=[4])},
            {"blocks.1.resid_pre": Patch(cache["blocks.1.resid_pre"], rows=[1])},
            {"blocks.1.resid_pre": Patch(cache, positions=[[1], [2, 3]])},  # per-row positions
            {"blocks.1.resid_pre": Patch(cache, positions=slice(2, None))},
            {"blocks.1.attn.pattern": Patch(cache, heads=[2])},
            {"blocks.0.resid_post": Steer(torch.randn(32).to(dev), scale=4.0, positions=-1)},
            {"blocks.0.resid_post": Steer(torch.randn(32).to(dev), scale=torch.tensor(2.0).to(dev))},
            {"blocks.1.attn.z": Steer(torch.randn(8).to(dev), heads=[0])},
            {"blocks.0.mlp_out": Hook(lambda v: v * 0)},
            {"blocks.0.mlp_out": as_intervention_list([Clamp(1.0, index=[0]), Hook(lambda v: v + 1)])},
        ]
        for ivs in kinds:
            assert_on(dev, im.run(corrupt, interventions=ivs))


def test_user_values_on_the_cpu_meet_a_device_model(dev: torch.device, im: InstrumentedModel, pair: Any) -> None:
    """Patch sources, steering vectors, clamp values and masks given on the CPU move to the site's device."""
    clean, corrupt = pair
    with torch.no_grad():
        _, cache = im.run_with_cache(clean, sites=["blocks.1.resid_pre"])
        src = cache["blocks.1.resid_pre"].cpu()
        for ivs in (
            {"blocks.1.resid_pre": Patch(src, positions=[4])},
            {"blocks.0.resid_post": Steer(torch.randn(32), positions=-1)},
            {"blocks.1.mlp.post": Clamp(torch.tensor([2.0, 3.0]), index=[1, 2])},
            {"blocks.1.resid_pre": Ablate(mean=src.mean(0))},
        ):
            assert_on(dev, im.run(corrupt, interventions=ivs))


# -- studies -----------------------------------------------------------------------------------------


@covers("mishax_py.studies.activation_patching", "mishax_py.studies.PatchingResult", "mishax_py.studies.plot")
def test_activation_patching_both_engines(
    dev: torch.device, im: InstrumentedModel, ref_im: InstrumentedModel, pair: Any, cpu_pair: Any, tmp_path: Path
) -> None:
    clean, corrupt = pair
    with torch.no_grad():
        packed = activation_patching(im, clean, corrupt, metric, site="resid_pre", engine="packed", progress=False)
        rows = activation_patching(im, clean, corrupt, metric, site="attn.z", by="head", engine="rows", progress=False)
        noise = activation_patching(im, clean, corrupt, metric, site="mlp_out", direction="noise", progress=False)
        activation_patching(
            im,
            clean,
            corrupt,
            metric,
            site="attn.z",
            by="head_pos",
            positions=[2, 3],
            layers=[1],
            interventions={"blocks.0.attn.z": Ablate(heads=[0])},
            progress=False,
        )
        want = activation_patching(ref_im, *cpu_pair, metric, site="resid_pre", engine="packed", progress=False)
    assert_matches(torch.as_tensor(packed), torch.as_tensor(want), dev)
    assert_finite(rows, noise)
    packed.plot(tmp_path / "a.png")
    plot(rows, tmp_path / "b.png")
    packed.argmax(), packed.topk(2), (packed - packed).abs().max(), packed.tolist()


@covers("mishax_py.studies.path_patching", "mishax_py.studies.path_patching_by_head")
def test_path_patching(dev: torch.device, im: InstrumentedModel, pair: Any) -> None:
    clean, corrupt = pair
    with torch.no_grad():
        path_patching(im, clean, corrupt, metric, senders=[(0, 1), (0, 2)], receivers=["blocks.1.resid_post"])
        path_patching(im, clean, corrupt, metric, senders=[(0, 1)], receivers=[(1, 2, "q")], freeze_mlps=True)
        res = path_patching_by_head(
            im, clean, corrupt, metric, receivers=[(1, 0, "v")], receiver_positions=[[5], [6]], progress=False
        )
    assert_finite(res)


@covers(
    "mishax_py.studies.attribution_patching",
    "mishax_py.studies.AttributionResult",
    "mishax_py.studies.attribution.AttributionResult",
    "mishax_py.studies.attribution.attribution_patching",
    "mishax_py.studies.attribution.pearson",
)
@pytest.mark.parametrize(
    ("method", "site", "by"),
    [
        ("atp", "attn.z", "head"),
        ("atp*", "attn.k", "head"),
        ("atp*", "attn.pattern", "head"),
        ("atp-layer", "resid_pre", "pos"),
        ("atp-layer", "attn.q", "head"),
        ("ig", "mlp_out", "pos"),
        ("ig-input", "resid_pre", "pos"),
    ],
)
def test_attribution_patching_every_method(
    dev: torch.device,
    im: InstrumentedModel,
    ref_im: InstrumentedModel,
    pair: Any,
    cpu_pair: Any,
    method: str,
    site: str,
    by: str,
) -> None:
    clean, corrupt = pair
    kw: dict[str, Any] = {"steps": 3} if method.startswith("ig") else {}
    res = attribution_patching(im, clean, corrupt, metric, site=site, by=by, method=method, progress=False, **kw)
    assert_finite(res.values)
    want = attribution_patching(ref_im, *cpu_pair, metric, site=site, by=by, method=method, progress=False, **kw)
    assert_matches(res.values, want.values, dev, atol=1e-5)
    assert pearson(res.values, res.values) == pytest.approx(1.0)
    res.top(3), res.worst_case()


@covers(
    "mishax_py.studies.attribution_patching_sites",
    "mishax_py.studies.check_attribution",
    "mishax_py.studies.site_gradients",
    "mishax_py.studies.AttributionCheck",
    "mishax_py.studies.attribution.AttributionCheck",
    "mishax_py.studies.attribution.AttributionResults",
    "mishax_py.studies.attribution.SiteGradients",
    "mishax_py.studies.attribution.attribution_patching_sites",
    "mishax_py.studies.attribution.check_attribution",
    "mishax_py.studies.attribution.site_gradients",
)
def test_attribution_sites_check_and_gradients(
    dev: torch.device, im: InstrumentedModel, pair: Any, tmp_path: Path
) -> None:
    clean, corrupt = pair
    grids = attribution_patching_sites(
        im, clean, corrupt, metric, sites={"attn.z": "head", "mlp_out": "pos", "resid_pre": "pos"}
    )
    assert_finite(*(g.values for g in grids.values()))
    grids.plot(tmp_path)
    est = attribution_patching(im, clean, corrupt, metric, site="attn.z", by="head", progress=False)
    chk = check_attribution(im, clean, corrupt, metric, result=est, k=2, n_random=2)
    str(chk)
    sites = ["blocks.0.resid_post", "blocks.1.attn.z"]
    with torch.no_grad():
        _, toward = im.run_with_cache(corrupt, sites=sites)
    for method in ("atp", "ig"):
        g = site_gradients(
            im,
            clean,
            metric,
            sites,
            method=method,
            steps=2,
            progress=False,
            toward=dict(toward.items()) if method == "ig" else None,
        )
        assert_on(
            dev,
            *[t for t in g if isinstance(t, torch.Tensor)],
            *[v for part in g if isinstance(part, dict) for v in part.values()],
        )


# -- circuits ---------------------------------------------------------------------------------------------


@covers(
    "mishax_py.circuits.feature_circuit",
    "mishax_py.circuits.FeatureCircuit",
    "mishax_py.circuits.SAELike",
    "mishax_py.circuits.ablate_complement",
)
@pytest.mark.parametrize("method", ["atp", "ig"])
def test_feature_circuit(dev: torch.device, im: InstrumentedModel, pair: Any, method: str) -> None:
    clean, corrupt = pair
    sae_list = [
        random_sae("jumprelu", "blocks.0.resid_post", dev, seed=1),
        random_sae("topk", "blocks.1.mlp_out", dev, seed=2),
    ]
    direction = "noise" if method == "atp" else "denoise"
    c = feature_circuit(
        im, clean, corrupt, metric, saes=sae_list, top_k=3, method=method, steps=2, progress=False, direction=direction
    )
    assert_on(dev, *c.effects.values())
    c.evaluate(im, metric, clean)
    with torch.no_grad():
        im.run(clean, interventions=ablate_complement(c, c.nodes[:3]))
    feature_circuit(im, clean, None, metric, saes=sae_list[:1], ablation="mean", top_k=2, edges=False, progress=False)


@pytest.fixture(scope="module")
def transcoders(dev: torch.device) -> list[saes.Transcoder]:
    with devicecheck.simulated():
        return [random_transcoder(0, dev, seed=0), random_transcoder(1, dev, seed=1, skip=True)]


@covers(
    "mishax_py.circuits.attribution_graph",
    "mishax_py.circuits.AttributionGraph",
    "mishax_py.circuits.attribution_graphs",
    "mishax_py.circuits.estimate_graph_memory",
    "mishax_py.circuits.DEFAULT_MAX_FEATURE_NODES",
    "mishax_py.circuits.TranscoderLike",
    "mishax_py.circuits.replacement_interventions",
    "mishax_py.circuits.render_graph",
    "mishax_py.circuits.graph_to_html",
    "mishax_py.circuits.load_graph_json",
)
def test_attribution_graph_and_replacement(
    dev: torch.device,
    im: InstrumentedModel,
    ref_im: InstrumentedModel,
    pair: Any,
    cpu_pair: Any,
    transcoders: list[saes.Transcoder],
    tmp_path: Path,
) -> None:
    ids = pair[0][:1]
    graph = attribution_graph(im, ids, transcoders, progress=False)
    assert graph.completeness_error() <= 1e-4
    assert estimate_graph_memory(im, ids, transcoders).total > 0
    capped = attribution_graph(im, ids, transcoders, max_feature_nodes=6, batch_size=4, progress=False)
    assert capped.n_features <= 6 and capped.completeness_error() <= 1e-4  # features ranked by influence
    cpu_tcs = [random_transcoder(0, None, seed=0), random_transcoder(1, None, seed=1, skip=True)]
    want = attribution_graph(ref_im, cpu_pair[0][:1], cpu_tcs, progress=False)
    assert_matches(graph.adjacency, want.adjacency, dev, atol=1e-5)
    target = graph.logit_index(0)
    graph.ablation_effects(target), graph.clamp_effect(0, 0.0), graph.top_sources(target), graph.node_influence()
    graph.to_json(tmp_path / "g.json")
    load_graph_json(tmp_path / "g.json")
    render_graph(graph, tmp_path / "g.png")
    graph_to_html(graph, tmp_path / "g.html")
    assert len(attribution_graphs(im, [ids, pair[1][1:, :6]], transcoders, progress=False)) == 2
    with torch.no_grad():
        layer, pos, feat = (int(v) for v in graph.features[0])
        for kw in ({}, {"freeze_attention": False, "freeze_norms": False}):
            out = im.run(
                ids, interventions=replacement_interventions(im, ids, transcoders, [(layer, pos, feat, 0.0)], **kw)
            )
            assert_on(dev, out)


# -- SAEs -------------------------------------------------------------------------------------------


@covers(
    "saes.SAE",
    "saes.JumpReLUSAE",
    "saes.ReLUSAE",
    "saes.TopKSAE",
    "saes.Transcoder",
    "saes.Splice",
    "saes.TranscoderSplice",
    "saes.splice",
    "saes.FeatureAblate",
    "saes.FeatureClamp",
    "saes.FeatureSteer",
    "saes.FeatureEdit",
)
@pytest.mark.parametrize("kind", ["jumprelu", "relu", "topk"])
def test_sae_kinds_splices_and_edits(dev: torch.device, im: InstrumentedModel, pair: Any, kind: str) -> None:
    clean, _ = pair
    sae = random_sae(kind, "blocks.1.resid_post", dev)
    x = torch.randn(2, 8, 32).to(dev)
    f = sae.encode(x)
    assert_on(dev, f, sae.decode(f), sae(x))
    with saes.kernels.backend("torch"):
        assert_on(dev, sae.encode(x))
        for mode in ("sparse", "dense"):
            sae.decode_mode = mode
            assert_on(dev, sae.decode(f))
        sae.decode_mode = "auto"
    site = sae.site
    with torch.no_grad():
        for edit in (
            None,
            saes.FeatureAblate([1, 2]),
            saes.FeatureClamp([3], 5.0, positions=[2]),
            saes.FeatureSteer([4], 2.0),
            saes.FeatureClamp([5, 6], torch.tensor([1.0, 2.0])),
        ):
            logits, cache = im.run_with_cache(
                clean, sites=[f"{site}.sae.features"], interventions={site: saes.Splice(sae, edit=edit)}
            )
            assert_on(dev, logits, cache[f"{site}.sae.features"])
        assert_on(dev, im.run(clean, interventions=saes.splice(sae, keep_error=False)))
        tc = random_transcoder(0, dev, skip=True)
        assert_on(dev, im.run(clean, interventions={tc.site: saes.TranscoderSplice(tc, edit=saes.FeatureAblate([0]))}))


def test_cpu_dictionaries_meet_a_device_model(dev: torch.device, im: InstrumentedModel, pair: Any) -> None:
    """SAEs and transcoders left on the CPU work with a model on the device (their values move to the site's)."""
    clean, corrupt = pair
    sae = random_sae("jumprelu", "blocks.1.resid_post", None)
    tcs = [random_transcoder(0, None, seed=0), random_transcoder(1, None, seed=1)]
    with torch.no_grad():
        assert_on(dev, im.run(clean, interventions={sae.site: saes.Splice(sae, edit=saes.FeatureAblate([1]))}))
        assert_on(dev, im.run(clean[:1], interventions=replacement_interventions(im, clean[:1], tcs)))
    feature_circuit(im, clean, corrupt, metric, saes=[sae], top_k=2, progress=False)
    assert attribution_graph(im, clean[:1], tcs, progress=False).completeness_error() <= 1e-4


@covers("saes.CrossLayerTranscoder", "saes.CLTSplice")
def test_cross_layer_transcoder(dev: torch.device, im: InstrumentedModel, pair: Any) -> None:
    clt = saes.CrossLayerTranscoder(2, 32, 40, input_kind="ln2_normalized", skip=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        clt.threshold.fill_(0.02)
    move(clt.requires_grad_(False), dev)
    x = torch.randn(2, 8, 32).to(dev)
    f = {L: clt.encode(x, L) for L in clt.layers}
    assert_on(dev, *f.values(), clt.decode(f, 1), *clt(dict.fromkeys(clt.layers, x)).values())
    with torch.no_grad():
        for keep_error in (True, False):
            splice = saes.CLTSplice(
                clt, {0: saes.FeatureAblate([1, 2]), 1: saes.FeatureClamp([0], 1.0)}, keep_error=keep_error
            )
            assert_on(dev, im.run(pair[0], interventions=splice.interventions()))


@covers("saes.save_saelens", "saes.load")
def test_sae_files_round_trip_from_the_device(placement: str, dev: torch.device, tmp_path: Path) -> None:
    one_device_only(placement)
    sae = random_sae("jumprelu", "blocks.1.resid_post", dev)
    saes.save_saelens(sae, tmp_path / "sae")
    back = saes.load(tmp_path / "sae", device=str(dev))
    assert_on(dev, back.W_enc)
    assert torch.equal(back.W_enc.cpu(), sae.W_enc.cpu())


@covers(
    "saes.train.train_sae",
    "saes.train.train_saes",
    "saes.train.TrainConfig",
    "saes.train.TrainResult",
    "saes.train.evaluate",
    "saes.train.lm_loss",
    "saes.train.collect_activations",
    "saes.train.ActivationStore",
    "saes.evaluation.evaluate",
    "saes.evaluation.lm_loss",
    "saes.train.fold_scaling",
    "saes.train.JumpReLUFunction",
    "saes.train.HeavisideFunction",
)
@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_training_and_evaluation_on_the_device(
    placement: str, dev: torch.device, im: InstrumentedModel, pair: Any, arch: str, tmp_path: Path
) -> None:
    one_device_only(placement)
    clean, _ = pair
    x = torch.randn(256, 32)
    cfg = sae_train.TrainConfig(
        d_sae=48,
        architecture=arch,
        k=6 if arch == "topk" else None,
        batch_size=64,
        steps=4,
        lr_warmup_steps=1,
        scale_batches=2,
        device=str(dev),
        seed=0,
        checkpoint_dir=str(tmp_path / "ckpt"),
        checkpoint_every=2,
    )
    res = sae_train.train_sae(x, cfg)
    assert_on(dev, res.sae.W_enc)
    y = torch.randn(256, 32)
    sae_train.train_sae(x, sae_train.TrainConfig(**{**cfg.__dict__, "checkpoint_dir": None, "skip": True}), target=y)
    sae_train.train_saes({"a": x}, sae_train.TrainConfig(**{**cfg.__dict__, "checkpoint_dir": None}))
    store = sae_train.collect_activations(im, [clean], "blocks.1.resid_post", tmp_path / "store", progress=False)
    sae_train.train_sae(store, sae_train.TrainConfig(**{**cfg.__dict__, "checkpoint_dir": None, "batch_size": 4}))
    sae = random_sae("jumprelu", "blocks.1.resid_post", dev)
    stats = sae_train.evaluate(sae, x.to(dev), im=im, ids=clean)
    assert all(isinstance(v, float) for v in stats.values())
    assert_on(dev, sae_train.lm_loss(im.run(clean), clean))


# -- Gemma 3 ---------------------------------------------------------------------------------------


@covers("instrumentation.gemma3.instrument")
def test_gemma3_subset(dev: torch.device, im3: InstrumentedModel, pair: Any) -> None:
    clean, corrupt = pair
    with torch.no_grad():
        _, cache = im3.run_with_cache(clean)
        assert_on(dev, *cache.values())
        activation_patching(im3, clean, corrupt, metric, site="resid_pre", progress=False)
    attribution_patching(
        im3, clean, corrupt, metric, site="attn.q_normed", by="head", method="atp-layer", progress=False
    )
    attribution_patching(im3, clean, corrupt, metric, site="attn.k", by="head", method="atp*", progress=False)
    tcs = []
    for layer in range(2):
        tc = random_transcoder(layer, dev, seed=layer)
        tc.site = f"blocks.{layer}.ln2"
        tcs.append(tc)
    graph = attribution_graph(im3, clean[:1], tcs, progress=False)
    assert graph.completeness_error() <= 1e-4


# -- the zoo's cheap analyses ------------------------------------------------------------------------


@covers("mishax_py.zoo.load", "mishax_py.zoo.load_saes")
def test_zoo_model_and_analyses_on_the_device(placement: str, dev: torch.device) -> None:
    one_device_only(placement)
    from mishax_py.zoo import analyses, load, load_saes, tasks
    from tests.helpers import BUNDLED

    if not BUNDLED:
        pytest.skip("bundled gemma2-tiny weights are not in this build")
    model, _ = load("gemma2-tiny")
    zim = g2.instrument(move(model, dev))
    sae = move(next(iter(load_saes("gemma2-tiny").values())), dev)
    ids = torch.randint(4, 60, (2, 12), generator=torch.Generator().manual_seed(0)).to(dev)
    # the task batches are made on the CPU, as the demo makes them
    clean, corrupt = tasks.induction_clean_corrupt(4, seq_len=8, seed=3)
    targets, mask = clean.targets, clean.target_mask
    with torch.no_grad():
        analyses.prefix_matching_scores(zim, ids, 5)
        f = analyses.sae_activations(zim, sae, ids)
        analyses.feature_logit_lens(zim, sae)
        analyses.promoted_tokens(zim, sae, [0, 1])
        analyses.head_patterns(zim, ids, [(0, 0), (1, 1)])
        analyses.top_activating_contexts(zim, sae, ids, [0, 1], k=2)
        analyses.direct_logit_attribution(zim, sae, f[:, -1], ids[:, -1])
        analyses.head_ablation_accuracy(zim, clean.input_ids, targets, mask, [[(1, 0)], [(0, 1), (1, 2)]])
        analyses.spliced_accuracy(zim, sae, clean.input_ids, targets, mask)
        analyses.feature_clamp_predictions(zim, sae, ids, 3, 5.0, 4)
    analyses.find_induction_heads(zim, clean.input_ids, corrupt.input_ids, targets, mask)


# -- completeness and the planted bug ---------------------------------------------------------------


EXCUSED: dict[str, str] = {
    "mishax_py.ModuleASTPatcher": "rewrites Python source; makes no tensors",
    "mishax_py.Replace": "a source snippet; no tensors",
    "mishax_py.PatchError": "an exception",
    "mishax_py.UnknownSiteError": "an exception",
    "mishax_py.SiteInfo": "site metadata (shapes, names); no tensors",
    "mishax_py.SiteEvent": "passed to every handler in the runs above",
    "mishax_py.tag": "called by the patched model code in every run above",
    "mishax_py.interventions.EmptySelectionWarning": "a warning",
    "mishax_py.interventions.IndexLike": "a type alias",
    "mishax_py.interventions.InterventionLike": "a type alias",
    "mishax_py.interventions.Interventions": "a type alias",
    "mishax_py.interventions.Positions": "selector helper; exercised by positions= in the intervention test",
    "mishax_py.interventions.PositionsLike": "a type alias",
    "mishax_py.zoo.MODELS": "a table of names",
    "mishax_py.zoo.SAE_MODELS": "a table of names",
    "saes.SAEFetchError": "an exception",
    "mishax_py.distributed.Share": "needs a torch.distributed process group (split() raises without one): run "
    "across processes by the distributed tests",
    "mishax_py.distributed.Split": "as Share",
    "mishax_py.distributed.active_split": "as Share",
    "mishax_py.distributed.split": "as Share",
    "mishax_py.distributed.unsplit": "as Share",
    "saes.SAEFileError": "an exception",
    "saes.train.CheckpointError": "an exception",
    "InstrumentedModel.add_handler": "low-level: every study and sweep above registers its handlers through it",
    "InstrumentedModel.context": "low-level: every run above makes one",
    "InstrumentedModel.plan": "low-level: every run above plans its interventions through it",
    "InstrumentedModel.layer_site": "names only",
    "InstrumentedModel.n_layers": "a number",
    "InstrumentedModel.resolve": "names only",
    "InstrumentedModel.site_info": "metadata only",
    "InstrumentedModel.site_names": "names only",
    "InstrumentedModel.tokenizer": "text in, ids out on the CPU; ids are moved by run (test_run_and_caches)",
    "instrumentation.gemma2.PATCHES": "source snippets",
    "instrumentation.gemma2.VERIFIED_TRANSFORMERS": "a version range",
    "instrumentation.gemma2.Gemma2Family": "used by instrument() above",
    "instrumentation.gemma2.install": "source patching; no tensors",
    "instrumentation.gemma2.installed": "source patching; no tensors",
    "instrumentation.gemma2.patcher": "source patching; no tensors",
    "instrumentation.gemma2.uninstall": "source patching; no tensors",
    "instrumentation.gemma3.PATCHES": "source snippets",
    "instrumentation.gemma3.VERIFIED_TRANSFORMERS": "a version range",
    "instrumentation.gemma3.Gemma3Family": "used by instrument() above",
    "instrumentation.gemma3.build_catalogue": "site metadata; used by instrument() above",
    "instrumentation.gemma3.install": "source patching; no tensors",
    "instrumentation.gemma3.installed": "source patching; no tensors",
    "instrumentation.gemma3.patcher": "source patching; no tensors",
    "instrumentation.gemma3.uninstall": "source patching; no tensors",
}


def public_names() -> set[str]:
    """Every public entry point: the ``__all__`` of each package of ``mishax_py`` and ``saes``, of the family
    modules and of :data:`ENTRY_MODULES`, and the public attributes of ``InstrumentedModel``."""
    mods = ["instrumentation.gemma2", "instrumentation.gemma3", *ENTRY_MODULES]
    for top in (mishax_py, saes):
        mods.append(top.__name__)
        mods += [m.name for m in pkgutil.walk_packages(top.__path__, top.__name__ + ".") if m.ispkg]
    names = {f"{m}.{n}" for m in mods for n in getattr(importlib.import_module(m), "__all__", [])}
    names |= {f"InstrumentedModel.{n}" for n in dir(InstrumentedModel) if not n.startswith("_")}
    names.add("mishax_py.devicecheck")
    return names


def test_every_public_name_is_exercised_or_excused() -> None:
    public = public_names()
    missing = sorted(public - COVERED.keys() - EXCUSED.keys())
    assert not missing, f"public names neither run on the simulated device here nor excused: {missing}"
    stale = sorted((COVERED.keys() | EXCUSED.keys()) - public)
    assert not stale, f"names listed here that are no longer public: {stale}"


def test_the_check_catches_a_planted_device_bug(
    dev: torch.device,
    im: InstrumentedModel,
    ref_im: InstrumentedModel,
    pair: Any,
    cpu_pair: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A position mask made without the value's device (``torch.zeros(n, dtype=torch.bool)``, the
    ``device=dev`` forgotten) inside the intervention code fails the check, naming the op; the same
    code passes on the CPU, where every test but this one would have missed it."""
    real = Selector.build

    def planted(self: Selector, value: torch.Tensor, scope: Any) -> Any:
        sel = real(self, value, scope)
        if sel.mask is None:
            return sel
        bug = torch.zeros(sel.mask.shape, dtype=torch.bool)  # the bug: no device=value.device
        return replace(sel, mask=bug | sel.mask.cpu())

    monkeypatch.setattr(Selector, "build", planted)
    edit = {"blocks.1.resid_pre": Clamp(0.0, positions=[1])}
    with torch.no_grad():
        assert not torch.equal(ref_im.run(cpu_pair[1], interventions=edit), ref_im.run(cpu_pair[1]))  # CPU: passes
        # a real GPU raises its own error: "Expected all tensors to be on the same device ..."
        want = (
            (DeviceMismatchError, r"aten\.where\.self mixes (cpu and sim:\d|sim:\d and cpu)")
            if dev.type == "sim"
            else (RuntimeError, "same device")
        )
        with pytest.raises(want[0], match=want[1]):
            im.run(pair[1], interventions=edit)
