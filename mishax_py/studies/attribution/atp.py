"""Attribution patching: gradient estimates of activation patching, for every element at once.

Activation patching runs the model once per patched element (a layer and position, a
head, ...) and reads the metric. Attribution patching (AtP; Nanda 2022, Syed et al.
2023) replaces each of those runs by the first-order Taylor estimate

    metric(patched) - metric(target)  ~=  (a_source - a_target) . d metric / d a |_target

so one forward pass per input and *one* backward pass give the estimate for every
element of every layer. The conventions follow :func:`mishax_py.studies.patching.activation_patching`:

* ``direction="denoise"`` (default): clean activations are patched into the corrupt
  run; the target run is the corrupt one, where the gradient is taken.
* ``direction="noise"``: corrupt activations are patched into the clean run.
* The result is a :class:`~mishax_py.studies.patching.PatchingResult` (an :class:`AttributionResult`):
  ``values`` estimates what activation patching returns, the metric of each patched run
  (``target metric + estimated change``); ``effects`` is the estimated change alone,
  ``clean``/``corrupt`` the metrics of the two unpatched runs, ``normalized()`` the
  fraction of the way to the source run.
* The metric maps the logits ``[batch, pos, vocab]`` of the whole batch to a scalar
  (typically a mean over rows); a patch applies to every row at once, so an estimate
  sums the per-row products (a batch is one experiment, as in activation patching).

Shapes of ``values`` (``n_layers`` = the layers attributed, default all):

=========================================================  ==========  =============================
site                                                       ``by``      ``values``
=========================================================  ==========  =============================
resid_pre/resid_mid/resid_post/attn_out/mlp_out (any       ``"pos"``   ``[n_layers, n_pos]``
``[batch, pos, d]`` site: ln1, mlp.post, ...)              ``"layer"`` ``[n_layers]``
attn.q/k/v/rot_q/rot_k/z (``[batch, pos, head, d_head]``)  ``"head"``  ``[n_layers, n_heads]``
                                                           ``"head_pos"`` ``[n_layers, n_heads, n_pos]``
                                                           ``"pos"``   ``[n_layers, n_pos]``
attn.scores/pattern (``[batch, head, q_pos, k_pos]``;      same as above, ``pos`` = the query position
``head_pos`` patches one query row of one head)
=========================================================  ==========  =============================

``k``/``v``/``rot_k`` have ``n_kv_heads`` heads (GQA). ``by="head"`` patches a head at
every position; ``by="head_pos"`` one head at one position.

Methods
-------
``method="atp"``
    Plain AtP (the formula above).
``method="atp*"`` (Kramár et al. 2024, "AtP*")
    AtP with the two fixes of the paper, each also available alone (``qk_fix=True``,
    ``graddrop=True`` with ``method="atp"``):

    *QK fix* (attention saturation): for nodes that act on the attention scores
    (``attn.q``, ``attn.k``, ``attn.rot_q``, ``attn.rot_k``, ``attn.scores``) the
    change of the attention *pattern* is computed exactly -- the softmax is recomputed
    for the patched queries/keys -- and only the map from the pattern to the metric is
    linearised: ``sum (pattern' - pattern) . d metric / d pattern``. Patching the key at
    position ``t`` changes column ``t`` of every query row; each row's new softmax is
    computed in closed form from the row's other probabilities (exclusive prefix/suffix
    sums in float64, so saturated rows stay exact). The scores are recomputed from the
    cached rotated queries/keys as ``softcap * tanh(scale * q.k / softcap)`` with the
    model config's ``query_pre_attn_scalar``/``head_dim`` and ``attn_logit_softcapping``;
    the recomputation is checked against the cached ``attn.scores`` and a mismatch
    raises (the fix then does not apply to that model).

    *GradDrop* (cancellation): for every layer ``l`` a backward pass in which the
    gradient through layer ``l``'s contributions to the residual stream (its
    ``attn_out`` and ``mlp_out``) is set to zero, giving estimates ``I_l``. The paper's
    score (their eq. 11) is ``c = 1/(L-1) * sum_l |I_l|`` -- a non-negative *magnitude*
    of the effect, used to rank nodes (a layer that cannot carry a node's effect, one
    upstream of it, gives ``|I_l| = |AtP|``). With ``graddrop=True`` that score is
    ``score``; ``values``/``effects`` stay the signed ordinary (QK-fixed) estimate,
    every ``I_l`` is in ``graddrop`` (``[n_model_layers, ...]``), and
    :meth:`AttributionResult.worst_case` gives per element the largest-magnitude signed
    estimate among AtP and all ``I_l`` (to flag possible false negatives).
    The ``L`` backward passes are batched: the target input is replicated ``L + 1``
    times and row-group ``l`` drops layer ``l`` (chunked by ``batch_size``).
``method="atp-layer"``
    AtP with each element's patch run *exactly* through the first decoder layer whose
    attention reads it (its own layer for ``resid_pre``, ``ln1`` and the attention
    internals up to ``pattern``; the next layer for ``attn.z`` and everything after it),
    and linearised only from that layer's ``resid_post`` on:
    ``(r'_stop - r_stop) . d metric / d r_stop |_target``. The attention softmax and the
    MLP nearest the element -- where a patched token's effect is an AND of several inputs
    (induction: a token restored alone at layer 0 changes what the previous-token head
    writes at the *next* position) or saturates -- are then exact. Past the last layer the
    estimate is exact patching. Cost: one decoder layer per element (replicas of the batch
    started from the target run's cached ``resid_pre`` and stopped at ``resid_post``, in
    chunks of ``batch_size`` rows; elements equal in both runs are skipped) on top of AtP's
    passes: about ``n_layers / 2`` times less compute than exact patching. Details in
    :mod:`mishax_py.studies.attribution.layer`.
    Like every gradient estimate taken at the target run, it cannot see an effect
    through a metric that is saturated *there* (noising from a run where the answer has
    probability ~1); use ``"ig"`` for that.
``method="ig"``, ``steps=k``
    Integrated gradients along the straight line from the target activation to the
    source activation, separately for each layer's site (the rest of the model runs
    normally, so the estimate accounts for everything downstream):
    ``(a_s - a_t) . mean_k d metric / d a |_{a_t + alpha_k (a_s - a_t)}`` with midpoint
    ``alpha_k = (k + 1/2) / steps``. Summed over a layer's whole site it converges to the
    exact effect of patching that whole site (completeness). All ``n_layers * steps``
    interpolations run as one batch (chunked by ``batch_size`` rows).
``method="ig-input"``, ``steps=k``
    Integrated gradients along one path for every layer at once (the node form of
    EAP-IG, Hanna et al. 2024): the token embeddings (the ``embed`` site, all positions)
    move on the straight line from the target run's to the source run's, and the gradient
    is read at each attributed site along that path:
    ``(a_s - a_t) . mean_k d metric / d a |_{run with embed = e_t + alpha_k (e_s - e_t)}``.
    ``steps`` forward/backward passes in total instead of ``n_layers * steps``; for the
    layer-0 ``resid_pre`` (the embeddings themselves) it is the same estimate as ``"ig"``.
    On ``gemma2-tiny`` it tracks exact patching like ``"ig"`` (``benchmarks/RESULTS.md``).

Performance and memory: AtP is two forward passes and one backward pass whatever the
number of elements. Only the requested sites are kept (plus ``rot_q``/``rot_k``/
``scores``/``pattern`` for the QK fix). GradDrop, IG and atp-layer replicate the batch; the
replicas run in chunks of at most ``batch_size`` rows (default: 8 x the input batch; 32 x
for atp-layer, whose replicas run one layer without gradients),
so memory is bounded by ``batch_size`` rows whatever ``steps`` and the depth. The QK
fix works layer by layer and head-chunk by head-chunk in float64, its ``[batch, heads,
q, k]`` temporaries bounded by ``attribution_qk.MAX_CHUNK_ELEMENTS``. Long runs show a progress bar
(``progress=True``/``False``; default: on a terminal only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mishax_py.execution.forward import forward_with, repeat_rows
from mishax_py.inputs import as_ids
from mishax_py.runtime import SiteEvent
from mishax_py.studies.attribution.layer import StopForward, element_masks, patch_elements, stop_layer, stopper
from mishax_py.studies.attribution.qk import ScoreFn, check_scores, qk_fix_layer
from mishax_py.studies.patching import BY_ALIASES, Metric, PatchingResult, plot, prompt_pair

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel, Interventions

__all__ = ["AttributionResult", "attribution_patching", "attribution_patching_sites", "site_gradients", "site_kind"]

METHODS = ("atp", "atp*", "atp-layer", "ig", "ig-input")
_IG_METHODS = ("ig", "ig-input")
DIRECTIONS = {"denoise": "denoise", "noise": "noise", "denoising": "denoise", "noising": "noise"}
_QK_SITES = ("attn.q", "attn.k", "attn.rot_q", "attn.rot_k", "attn.scores")


@dataclass(repr=False)
class AttributionResult(PatchingResult):
    """Estimated activation-patching results of one site across layers.

    A :class:`~mishax_py.studies.patching.PatchingResult` (same ``values``/``axes``/``labels``/``site``/
    ``direction``/``clean``/``corrupt``, ``normalized()``, and :func:`mishax_py.studies.patching.plot`
    draws it) with the estimate's details:

    Attributes:
        values: estimates of the patched runs' metric, ``[n_layers, ...]`` (see the module
            docs for shapes): ``target metric + effects``.
        effects: the estimated change ``metric(patched) - metric(target run)``.
        method: ``"atp"``, ``"atp*"``, ``"atp-layer"``, ``"ig"`` or ``"ig-input"``.
        by: the patching granularity (``"pos"``, ``"layer"``, ``"head"``, ``"head_pos"``).
        layers: the model layers along the first axis.
        sites: the canonical site names, one per layer.
        qk_fix: whether the QK fix was applied.
        steps: IG steps (``None`` for AtP).
        graddrop: with GradDrop, ``[n_model_layers, *values.shape]``: the estimated effect
            with the gradient through layer ``l``'s residual contributions dropped.
        score: a non-negative importance per element: the AtP* GradDrop score
            ``1/(L-1) sum_l |graddrop[l]|`` with GradDrop, else ``|effects|``.
        positions: the patched token positions (absolute), in the order of the position axis
            (with ``by="head"``/``"layer"``: the positions patched together).
        under_interventions: whether the runs were made under ``interventions=``.
        interventions: those interventions (kept so that checks can rerun under them).
    """

    effects: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    method: str = "atp"
    by: str = "pos"
    layers: list[int] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    qk_fix: bool = False
    steps: int | None = None
    graddrop: torch.Tensor | None = None
    score: torch.Tensor | None = None
    positions: list[int] = field(default_factory=list)
    under_interventions: bool = False
    interventions: Any = field(default=None, repr=False, compare=False)

    @property
    def target_metric(self) -> float:
        """The metric of the run patched into (corrupt when denoising)."""
        return self.corrupt if self.direction == "denoise" else self.clean

    def worst_case(self) -> torch.Tensor:
        """Per element, the signed effect estimate of largest magnitude among AtP and every GradDrop variant.

        Without GradDrop this is ``effects``.
        """
        if self.graddrop is None:
            return self.effects
        allv = torch.cat([self.effects[None], self.graddrop])
        idx = allv.abs().argmax(0, keepdim=True)
        return allv.gather(0, idx)[0]

    def top(self, k: int = 10) -> list[tuple[tuple[str, ...], float]]:
        """The ``k`` elements of largest ``score``, as ``((label per axis), estimated effect)``."""
        score = self.score if self.score is not None else self.effects.abs()
        k = min(k, score.numel())
        out = []
        for i in score.flatten().topk(k).indices.tolist():
            coords = []
            rem = i
            for d in reversed(score.shape):
                coords.append(rem % d)
                rem //= d
            coords.reverse()
            labels = tuple(self.labels[a][c] for a, c in zip(self.axes, coords, strict=True))
            out.append((labels, float(self.effects.flatten()[i])))
        return out

    def plot(self, path: str, title: str | None = None, **kwargs: Any) -> str:
        """Write a heatmap PNG of ``values`` (``normalized=True`` for the normalised metric); returns the path."""
        return plot(self, path, title or f"{self.method} {self.direction}: {self.site} by {self.by}", **kwargs)

    def __repr__(self) -> str:
        dims = ", ".join(f"{a}={n}" for a, n in zip(self.axes, self.values.shape, strict=True))
        return (f"AttributionResult({self.method}, {self.site!r}, {self.direction}, [{dims}], clean={self.clean:.4g}, "
                f"corrupt={self.corrupt:.4g})")


# -- site bookkeeping ---------------------------------------------------------------------


def site_kind(dims: Sequence[int | str]) -> str:
    """``"stream"`` for ``[batch, pos, d]``, ``"head"`` for ``[batch, pos, head, d_head]``,
    ``"map"`` for ``[batch, head, q_pos, k_pos]`` sites; raises for anything else."""
    dims = tuple(dims)
    if len(dims) == 3 and dims[:2] == ("batch", "pos") and isinstance(dims[2], int):
        return "stream"
    if len(dims) == 4 and dims[:2] == ("batch", "pos") and all(isinstance(d, int) for d in dims[2:]):
        return "head"
    if len(dims) == 4 and dims[0] == "batch" and isinstance(dims[1], int) and dims[2:] == ("pos", "key_pos"):
        return "map"
    raise ValueError(f"sites of shape {dims} are not supported by attribution patching")


_BY = {"stream": ("pos", "layer"), "head": ("head", "head_pos", "pos", "layer"), "map": ("head", "head_pos", "pos",
                                                                                       "layer")}
_DEFAULT_BY = {"stream": "pos", "head": "head", "map": "head"}


def _normalise_site(site: str) -> str:
    for prefix in ("blocks.*.", "blocks.L."):
        if site.startswith(prefix):
            return site[len(prefix):]
    if site.startswith("blocks."):
        raise ValueError(
            f"site {site!r}: give the site within a block (e.g. 'resid_pre', 'attn.z') and choose layers with "
            "layers=[...]"
        )
    return site


def _check_direction_and_metric(direction: str, metric: Any) -> str:
    """The canonical direction (``"denoise"``/``"noise"``); clear errors for a bad direction or metric."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'denoise' (clean into corrupt) or 'noise', got {direction!r}")
    if not callable(metric):
        raise TypeError(f"metric must be a function of the logits, got {type(metric).__name__}")
    return DIRECTIONS[direction]


def _check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    out = list(range(n_layers)) if layers is None else [int(L) for L in layers]
    if not out or any(not 0 <= L < n_layers for L in out) or len(set(out)) != len(out):
        raise ValueError(f"layers must be distinct layer indices in [0, {n_layers}), got {out}")
    return out


def _site_plan(im: InstrumentedModel, site: str, by: Any, layers: Sequence[int]
               ) -> tuple[str, list[str], tuple[int | str, ...], str, str]:
    """``(canonical within-block name, site per layer, dims, kind, by)`` for a site and a ``by``."""
    site = _normalise_site(site)
    names = _layer_sites(im, site, layers)
    dims = tuple(im.site_info(names[0]).dims)
    kind = site_kind(dims)
    key = tuple(by) if isinstance(by, list) else by
    by = _DEFAULT_BY[kind] if by is None else BY_ALIASES.get(key)
    if by not in _BY[kind]:
        raise ValueError(f"by={key!r} is not available for site {site!r} (shape {dims}); choose one of {_BY[kind]}")
    return names[0].split(".", 2)[2], names, dims, kind, by


def _labels(axes: tuple[str, ...], layers: Sequence[int], dims: Sequence[int | str], kind: str,
            pos_list: Sequence[int], pos_labels: Sequence[str] | None) -> dict[str, list[str]]:
    labels: dict[str, list[str]] = {"layer": [str(L) for L in layers]}
    if "head" in axes:
        labels["head"] = [str(h) for h in range(int(dims[2] if kind == "head" else dims[1]))]
    if "pos" in axes:
        labels["pos"] = list(pos_labels) if pos_labels is not None else [str(p) for p in pos_list]
    return labels


def _layer_sites(im: InstrumentedModel, site: str, layers: Sequence[int]) -> list[str]:
    names = []
    for L in layers:
        resolved = im.resolve(f"blocks.{L}.{site}")
        if len(resolved) != 1:
            raise ValueError(f"site {site!r} matches {len(resolved)} sites in layer {L}: {resolved}")
        names.append(resolved[0])
    return names


def _reduce(x: torch.Tensor, kind: str, by: str) -> torch.Tensor:
    """Sum an elementwise product ``[batch, ...]`` (site layout) to the ``by`` granularity."""
    if by == "layer":
        return x.sum()
    if kind == "stream":  # by pos
        return x.sum((0, 2))
    if kind == "head":
        if by == "head":
            return x.sum((0, 1, 3))
        if by == "head_pos":
            return x.sum((0, 3)).transpose(0, 1)
        return x.sum((0, 2, 3))  # pos
    # map [batch, head, q, k]
    if by == "head":
        return x.sum((0, 2, 3))
    if by == "head_pos":
        return x.sum((0, 3))
    return x.sum((0, 1, 3))


def _mask_pos(x: torch.Tensor, kind: str, pos_mask: torch.Tensor) -> torch.Tensor:
    """Zero the entries of a site-layout tensor outside the patched positions (query rows for maps)."""
    if bool(pos_mask.all()):
        return x
    shape = [1] * x.ndim
    axis = 2 if kind == "map" else 1
    shape[axis] = -1
    return x * pos_mask.view(shape).to(x.dtype)


def _dims(by: str) -> tuple[str, ...]:
    return {"pos": ("layer", "pos"), "head": ("layer", "head"), "head_pos": ("layer", "head", "pos"),
            "layer": ("layer",)}[by]


# -- running the model with raw handlers --------------------------------------------------

Handler = Callable[[torch.Tensor, SiteEvent], torch.Tensor]


def _check_metric_value(m: Any) -> torch.Tensor:
    if not isinstance(m, torch.Tensor):
        raise TypeError(
            f"metric must return a scalar torch.Tensor computed from the logits (differentiable), got "
            f"{type(m).__name__}"
        )
    if m.numel() != 1:
        raise ValueError(
            f"metric must return a scalar, got a tensor of shape {tuple(m.shape)}; reduce it (e.g. .mean()) "
            "over the batch"
        )
    return m.reshape(())


def _metric_per_replica(metric: Metric, logits: torch.Tensor, batch: int, need_grad: bool) -> torch.Tensor:
    """The metric of each ``batch``-row replica of ``logits``, as a ``[n_replicas]`` tensor."""
    reps = logits.shape[0] // batch
    vals = []
    for r in range(reps):
        m = _check_metric_value(metric(logits[r * batch:(r + 1) * batch]))
        if need_grad and not m.requires_grad:
            raise ValueError(
                "metric(logits) does not depend differentiably on the logits (no gradient); compute it with "
                "torch operations on the logits you are given"
            )
        vals.append(m)
    return torch.stack(vals)


def _progress(total: int, desc: str, progress: bool | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=(None if progress is None else not progress), leave=False)


# -- the public entry point -------------------------------------------------------------------


def attribution_patching(
    im: InstrumentedModel,
    clean_ids: Any,
    corrupt_ids: Any,
    metric: Metric,
    site: str = "resid_pre",
    by: str | None = None,
    *,
    method: str = "atp",
    direction: str = "denoise",
    qk_fix: bool | None = None,
    graddrop: bool | None = None,
    steps: int = 16,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    pos_labels: Sequence[str] | None = None,
    batch_size: int | None = None,
    interventions: Interventions | None = None,
    progress: bool | None = None,
    **hf_kwargs: Any,
) -> AttributionResult:
    """Estimate activation patching of ``site`` at every layer (and position/head) from gradients.

    Args:
        im: the instrumented model.
        clean_ids, corrupt_ids: token ids ``[batch, pos]`` of the same shape.
        metric: ``metric(logits [batch, pos, vocab]) -> scalar tensor``, differentiable.
        site: a site within a block: ``"resid_pre"``, ``"resid_mid"``, ``"resid_post"``,
            ``"attn_out"``, ``"mlp_out"``, ``"attn.z"``, ``"attn.q"``, ``"attn.k"``,
            ``"attn.v"``, ``"attn.pattern"``, ... (TransformerLens suffixes such as
            ``"hook_resid_pre"`` work too).
        by: ``"pos"`` (default for ``[batch, pos, d]`` sites), ``"head"`` (default for
            per-head sites and attention maps), ``"head_pos"`` or ``"layer"``.
        method: ``"atp"``, ``"atp*"`` (QK fix + GradDrop), ``"atp-layer"`` (each element's
            own layer exact, first order after), ``"ig"`` (each layer's site interpolated on
            its own) or ``"ig-input"`` (one path: the input embeddings interpolated; see the
            module docs).
        direction: ``"denoise"`` (clean patched into corrupt; gradient on the corrupt
            run) or ``"noise"`` (corrupt into clean; gradient on the clean run).
        qk_fix: recompute the attention softmax exactly for query/key/score sites
            (default: on for ``"atp*"`` on those sites).
        graddrop: AtP* GradDrop (default: on for ``"atp*"``); see the module docs.
        steps: integrated-gradients steps (``method="ig"``/``"ig-input"``).
        layers: the layers to attribute (default: all), in the order of the result's first axis.
        positions: the positions to patch (default all; negative counts from the end). With
            ``by="head"``/``"layer"`` these positions are patched together.
        pos_labels: tick labels of the position axis, one per patched position.
        batch_size: most rows per forward for the replicated GradDrop/IG/atp-layer batches
            (default ``8 * batch``; ``32 * batch`` for ``"atp-layer"``, whose replicas run one
            layer without gradients).
        interventions: applied in every run first (e.g. an ablation you study under).
        progress: show progress bars (default: on a terminal, for multi-chunk work).
        **hf_kwargs: passed to the model (e.g. ``attention_mask``).

    Returns:
        :class:`AttributionResult`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    direction = _check_direction_and_metric(direction, metric)
    clean, corrupt = prompt_pair(im, clean_ids, corrupt_ids)
    n_layers = im.n_layers
    layers = _check_layers(layers, n_layers)
    batch, T = clean.shape
    pos_list = list(range(T)) if positions is None else [int(p) + T if int(p) < 0 else int(p) for p in positions]
    if not pos_list or any(not 0 <= p < T for p in pos_list) or len(set(pos_list)) != len(pos_list):
        raise ValueError(f"positions must be distinct positions in [-{T}, {T}), got {positions}")
    if pos_labels is not None and len(pos_labels) != len(pos_list):
        raise ValueError(f"pos_labels has {len(pos_labels)} labels for {len(pos_list)} positions")
    short, names, dims, kind, by = _site_plan(im, site, by, layers)
    qk_kind = {"attn.q": "q", "attn.rot_q": "q", "attn.k": "k", "attn.rot_k": "k", "attn.scores": "scores"}.get(short)
    star = method == "atp*"
    if qk_fix is None:
        qk_fix = star and qk_kind is not None
    if qk_fix and qk_kind is None:
        raise ValueError(f"qk_fix applies to query/key/score sites {_QK_SITES}, not {site!r}")
    if qk_fix and method not in ("atp", "atp*"):
        raise ValueError(f"qk_fix is an AtP correction; it does not combine with method={method!r}")
    if graddrop is None:
        graddrop = star
    if graddrop and method not in ("atp", "atp*"):
        raise ValueError(f"graddrop is an AtP correction; it does not combine with method={method!r}")
    if method in _IG_METHODS and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if batch_size is not None and batch_size < batch:
        raise ValueError(f"batch_size ({batch_size}) must be at least the input batch ({batch})")
    batch_size = batch_size or (32 if method == "atp-layer" else 8) * batch  # atp-layer: one layer, no grad
    pos_mask = torch.zeros(T, dtype=torch.bool, device=clean.device)
    pos_mask[pos_list] = True

    source, target = (clean, corrupt) if direction == "denoise" else (corrupt, clean)
    grid = _Grid(kind=kind, by=by, names=names, batch=batch, batch_size=batch_size, pos_mask=pos_mask,
                 interventions=interventions, hf=hf_kwargs, progress=progress)
    gd = None
    if method == "ig":
        effects, m_tgt, m_src = _ig(im, source, target, metric, grid, steps=steps)
    elif method == "ig-input":
        effects, m_tgt, m_src = _ig_input(im, source, target, metric, grid, steps=steps)
    elif method == "atp-layer":
        effects, m_tgt, m_src = _atp_layer(im, source, target, metric, grid, short, layers)
    else:
        effects, gd, m_tgt, m_src = _atp(im, source, target, metric, grid,
                                         qk_kind=qk_kind if qk_fix else None, graddrop=graddrop)
    axes = _dims(by)
    if "pos" in axes:  # keep the patched positions only, in the order given
        index = torch.tensor(pos_list, device=effects.device)
        effects = effects.index_select(len(axes) - 1, index)
        if gd is not None:
            gd = gd.index_select(len(axes), index)
    score = gd.abs().sum(0) / max(1, n_layers - 1) if gd is not None else effects.abs()
    labels = _labels(axes, layers, dims, kind, pos_list, pos_labels)
    clean_m, corrupt_m = (m_src, m_tgt) if direction == "denoise" else (m_tgt, m_src)
    effects = effects.detach().float().cpu()
    return AttributionResult(
        values=effects + m_tgt, axes=axes, labels=labels, site=short, direction=direction, clean=clean_m,
        corrupt=corrupt_m, effects=effects, method=method, by=by, layers=layers, sites=names, qk_fix=bool(qk_fix),
        steps=steps if method in _IG_METHODS else None, graddrop=None if gd is None else gd.detach().float().cpu(),
        score=score.detach().float().cpu(), positions=pos_list, under_interventions=bool(interventions),
        interventions=interventions or None,
    )


def attribution_patching_sites(
    im: InstrumentedModel,
    clean_ids: Any,
    corrupt_ids: Any,
    metric: Metric,
    sites: Mapping[str, Any] | Sequence[str],
    *,
    direction: str = "denoise",
    layers: Sequence[int] | None = None,
    interventions: Interventions | None = None,
    **hf_kwargs: Any,
) -> dict[str, AttributionResult]:
    """Plain AtP for several sites at once: one source forward, one target forward and one backward.

    Equal to :func:`attribution_patching` with ``method="atp"`` for each site (the gradient of one
    backward pass is read at every site), for the cost of one call: e.g. every head's ``attn.z``,
    every ``mlp_out`` and every ``resid_pre`` position together.

    Args:
        sites: site kinds, ``["attn.z", "mlp_out"]`` (default granularity each), or a mapping
            ``{"attn.z": "head", "resid_pre": "pos"}`` to choose ``by`` per site.
        direction, layers, interventions, **hf_kwargs: as for :func:`attribution_patching`.

    Returns:
        ``{site: AttributionResult}`` in the order given (keys as given).
    """
    direction = _check_direction_and_metric(direction, metric)
    clean, corrupt = prompt_pair(im, clean_ids, corrupt_ids)
    spec = dict(sites) if isinstance(sites, Mapping) else dict.fromkeys(sites)
    if not spec:
        raise ValueError("attribution_patching_sites needs at least one site")
    layers = _check_layers(layers, im.n_layers)
    plans = {key: _site_plan(im, key, by, layers) for key, by in spec.items()}
    all_names = list(dict.fromkeys(n for plan in plans.values() for n in plan[1]))
    source, target = (clean, corrupt) if direction == "denoise" else (corrupt, clean)
    src_store, m_src = _plain_run(im, source, metric, all_names, interventions, hf_kwargs)
    tgt_values, grads, m_tgt = site_gradients(im, target, metric, all_names, interventions=interventions, **hf_kwargs)
    clean_m, corrupt_m = (m_src, m_tgt) if direction == "denoise" else (m_tgt, m_src)
    positions = list(range(clean.shape[1]))
    out: dict[str, AttributionResult] = {}
    for key, (short, names, dims, kind, by) in plans.items():
        effects = torch.stack([
            _reduce((src_store[n] - tgt_values[n]).float() * grads[n], kind, by) for n in names
        ]).detach().float().cpu()
        axes = _dims(by)
        out[key] = AttributionResult(
            values=effects + m_tgt, axes=axes, labels=_labels(axes, layers, dims, kind, positions, None), site=short,
            direction=direction, clean=clean_m, corrupt=corrupt_m, effects=effects, method="atp", by=by,
            layers=layers, sites=names, score=effects.abs(), positions=positions,
            under_interventions=bool(interventions), interventions=interventions or None,
        )
    return out


@dataclass(frozen=True)
class _Grid:
    """What one attribution_patching call attributes and how it runs (shared by the AtP and IG paths).

    ``names``: the site per attributed layer; ``kind``/``by``: the site kind and granularity;
    ``batch``: rows of one run; ``batch_size``: most rows per forward of replicated runs;
    ``pos_mask``: ``[pos]`` the patched positions; ``hf``: model kwargs.
    """

    kind: str
    by: str
    names: list[str]
    batch: int
    batch_size: int
    pos_mask: torch.Tensor
    interventions: Interventions | None
    hf: Mapping[str, Any]
    progress: bool | None


def _keeper(store: dict[str, torch.Tensor], name: str) -> Handler:
    """A handler storing the site's value (detached) under ``name``, leaving it unchanged."""
    def h(value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        store[name] = value.detach()
        return value

    return h


# -- AtP (with QK fix and GradDrop) -------------------------------------------------------------


def _atp(
    im: InstrumentedModel,
    source: torch.Tensor,
    target: torch.Tensor,
    metric: Metric,
    grid: _Grid,
    *,
    qk_kind: str | None,
    graddrop: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, float, float]:
    """Returns (signed estimate [n_layers, ...], GradDrop estimates [L, n_layers, ...] or None, m_tgt, m_src)."""
    kind, by, names, batch, batch_size = grid.kind, grid.by, grid.names, grid.batch, grid.batch_size
    pos_mask, interventions, hf, progress = grid.pos_mask, grid.interventions, grid.hf, grid.progress
    # what to record: the site itself, or for the QK fix the attention internals
    if qk_kind is None:
        src_sites = {n: n for n in names}
        grad_sites = list(names)
        tgt_keep: list[str] = []
    else:
        def sib(n: str, s: str) -> str:
            return n.rsplit(".", 1)[0] + "." + s if ".attn." in n else n

        per_layer = {n: {s: sib(n, s) for s in ("rot_q", "rot_k", "scores", "pattern")} for n in names}
        needed = ("scores",) if qk_kind == "scores" else ("rot_q", "rot_k")
        src_sites = {per_layer[n][s]: per_layer[n][s] for n in names for s in needed}
        grad_sites = [per_layer[n]["pattern"] for n in names]
        tgt_keep = [per_layer[n][s] for n in names for s in ("rot_q", "rot_k", "scores")]

    # 1. source run: activations only
    src_store, m_src = _plain_run(im, source, metric, src_sites, interventions, hf)

    # 2. target run(s) with gradients: replica 0 is plain, replica 1 + l drops layer l's gradient
    drop_layers = list(range(im.n_layers)) if graddrop else []
    n_rep = 1 + len(drop_layers)
    per_chunk = max(1, batch_size // batch)
    results: list[torch.Tensor] = []  # per replica: [n_layers, ...]
    m_tgt = float("nan")
    bar = _progress(n_rep, "attribution (GradDrop replicas)", progress if n_rep > per_chunk else False)
    score_fn = ScoreFn(im) if qk_kind in ("q", "k") else None
    checked = False
    for r0 in range(0, n_rep, per_chunk):
        reps = list(range(r0, min(n_rep, r0 + per_chunk)))
        ids = target.repeat(len(reps), 1)
        hfr = repeat_rows(hf, batch, len(reps))
        handlers: list[tuple[str, Handler]] = []
        for i, r in enumerate(reps):
            if r == 0:
                continue
            rows = torch.zeros(len(reps) * batch, dtype=torch.bool, device=ids.device)
            rows[i * batch:(i + 1) * batch] = True
            for part in ("attn_out", "mlp_out"):
                try:
                    drop_site = im.resolve(f"blocks.{drop_layers[r - 1]}.{part}")[0]
                except KeyError as e:
                    raise ValueError(f"GradDrop needs the site blocks.L.{part} (a layer's residual contribution): "
                                     f"{e}") from None
                handlers.append((drop_site, _dropper(rows)))
        store: dict[str, torch.Tensor] = {}
        for n in dict.fromkeys(grad_sites + tgt_keep):
            handlers.append((n, _grad_recorder(store, n)))
        with torch.enable_grad():
            logits = forward_with(im, ids, handlers, interventions, hfr)
            ms = _metric_per_replica(metric, logits, batch, need_grad=True)
            grads = torch.autograd.grad(ms.sum(), [store[n] for n in grad_sites], allow_unused=True)
        if r0 == 0:
            m_tgt = float(ms[0].detach())
        gmap = {n: (g if g is not None else torch.zeros_like(store[n])).detach() for n, g in zip(grad_sites, grads,
                                                                                                 strict=True)}
        for i, _r in enumerate(reps):
            rs = slice(i * batch, (i + 1) * batch)
            per_layer_vals = []
            for n in names:
                if qk_kind is None:
                    delta = _mask_pos((src_store[n] - store[n].detach()[rs]).float(), kind, pos_mask)
                    per_layer_vals.append(_reduce(delta * gmap[n][rs].float(), kind, by))
                else:
                    sites = per_layer[n]
                    tgt = {s: store[sites[s]].detach()[rs] for s in ("rot_q", "rot_k", "scores")}
                    src = {s: src_store[sites[s]] for s in needed}
                    n_kv = tgt["rot_k"].shape[2]
                    n_rep_kv = tgt["rot_q"].shape[2] // n_kv
                    if score_fn is not None and not checked:
                        check_scores(score_fn, sites["scores"], tgt["rot_q"], tgt["rot_k"], tgt["scores"], n_rep_kv)
                    per_layer_vals.append(
                        qk_fix_layer(qk_kind, by, score_fn, n_rep_kv, tgt, src, gmap[sites["pattern"]][rs],
                                      pos_mask).float()
                    )
            checked = True
            results.append(torch.stack(per_layer_vals))
        del logits, store, grads, gmap
        bar.update(len(reps))
    bar.close()
    signed = results[0]
    gd = torch.stack(results[1:]) if graddrop else None
    return signed, gd, m_tgt, m_src


def _atp_layer(
    im: InstrumentedModel,
    source: torch.Tensor,
    target: torch.Tensor,
    metric: Metric,
    grid: _Grid,
    short: str,
    layers: Sequence[int],
) -> tuple[torch.Tensor, float, float]:
    """AtP with each element's patch run exactly through one decoder layer (``mishax_py.studies.attribution.layer``).

    Returns (signed estimate [n_layers, ...], m_tgt, m_src).
    """
    n_layers, batch = im.n_layers, grid.batch
    stops = [stop_layer(short, L) for L in layers]
    post = {s: f"blocks.{s}.resid_post" for s in set(stops) if s < n_layers}
    starts = {L: f"blocks.{L}.resid_pre" for L in layers}
    src_store, m_src = _plain_run(im, source, metric, grid.names, grid.interventions, grid.hf)
    # the target run: values where replicas start and patch, the metric's gradient where they stop
    store, grad_at, m_tgt = site_gradients(im, target, metric, list(dict.fromkeys([*starts.values(), *grid.names,
                                                                                   *post.values()])),
                                           interventions=grid.interventions, **grid.hf)
    per_chunk = max(1, grid.batch_size // batch)
    plans = []
    for n, L, s in zip(grid.names, layers, stops, strict=True):
        masks, index, out_shape = element_masks(grid.kind, grid.by, tuple(store[n].shape[1:]), grid.pos_mask)
        differs = (src_store[n] != store[n]).any(0)  # an element equal in both runs has effect 0
        changed = (masks & differs).flatten(1).any(1)
        plans.append((n, L, s, masks[changed], index[changed], out_shape))
    total = sum(len(p[4]) for p in plans)
    bar = _progress(total, "attribution (exact layer per element)", grid.progress if total > per_chunk else False)
    out = []
    for n, L, s, masks, index, out_shape in plans:
        est = torch.zeros(len(index))
        for e0 in range(0, len(index), per_chunk):
            chunk = masks[e0:e0 + per_chunk]
            e = chunk.shape[0]
            start = store[starts[L]].repeat(e, *([1] * (store[starts[L]].ndim - 1)))
            hs: list[tuple[str, Handler]] = [(starts[L], lambda value, event, start=start: start.to(value.dtype)),
                                             (n, patch_elements(chunk, src_store[n]))]
            reached: dict[str, torch.Tensor] = {}
            if s < n_layers:
                hs.append((post[s], stopper(reached, post[s])))
            with torch.no_grad():
                try:
                    logits = forward_with(im, target.repeat(e, 1), hs, grid.interventions,
                                      repeat_rows(grid.hf, batch, e), start_layer=L)
                except StopForward:
                    logits = None
            if logits is None:
                delta = reached[post[s]].float().view(e, batch, *grad_at[post[s]].shape[1:]) - store[post[s]].float()
                est[e0:e0 + e] = (delta * grad_at[post[s]]).flatten(1).sum(1).cpu()
            else:  # the element's stop layer is past the last one: the patched run is exact
                est[e0:e0 + e] = _metric_per_replica(metric, logits, batch, need_grad=False).float().cpu() - m_tgt
            bar.update(e)
        flat = torch.zeros(math.prod(out_shape))
        flat[index.cpu()] = est
        out.append(flat.view(out_shape))
    bar.close()
    return torch.stack(out), m_tgt, m_src


def _dropper(rows: torch.Tensor) -> Handler:
    """Zero the gradient flowing back through this site for batch ``rows`` (values unchanged)."""

    def h(value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        shape = [-1] + [1] * (value.ndim - 1)
        return torch.where(rows.view(shape), value.detach(), value)

    return h


def _grad_recorder(store: dict[str, torch.Tensor], name: str) -> Handler:
    """Keep the site's value in the graph so ``autograd.grad`` can be taken with respect to it."""

    def h(value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        if not value.requires_grad:
            value = value.detach().requires_grad_(True)
        store[name] = value
        return value

    return h


# -- integrated gradients ------------------------------------------------------------------------


def _plain_run(im: InstrumentedModel, ids: torch.Tensor, metric: Metric, sites: Iterable[str],
               interventions: Interventions | None, hf: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], float]:
    """One run without gradients: its (detached) values at ``sites`` and its metric."""
    store: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        logits = forward_with(im, ids, [(n, _keeper(store, n)) for n in sites], interventions, hf)
        return store, float(_check_metric_value(metric(logits)))


def _two_runs(im: InstrumentedModel, source: torch.Tensor, target: torch.Tensor, metric: Metric, grid: _Grid,
              sites: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float, float]:
    """The source and target runs without gradients: their values at ``sites`` and their metrics."""
    src_store, m_src = _plain_run(im, source, metric, sites, grid.interventions, grid.hf)
    tgt_store, m_tgt = _plain_run(im, target, metric, sites, grid.interventions, grid.hf)
    return src_store, tgt_store, m_src, m_tgt


def _ig_estimate(grid: _Grid, src_store: Mapping[str, torch.Tensor], tgt_store: Mapping[str, torch.Tensor],
                 mean_grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(a_s - a_t) . mean gradient`` per element (patched positions only), ``[n_layers, ...]``."""
    vals = []
    for n in grid.names:
        delta = _mask_pos((src_store[n] - tgt_store[n]).float(), grid.kind, grid.pos_mask)
        vals.append(_reduce(delta * mean_grads[n], grid.kind, grid.by))
    return torch.stack(vals)


def _ig(
    im: InstrumentedModel,
    source: torch.Tensor,
    target: torch.Tensor,
    metric: Metric,
    grid: _Grid,
    *,
    steps: int,
) -> tuple[torch.Tensor, float, float]:
    """IG with each layer's site interpolated on its own. Returns (estimate [n_layers, ...], m_tgt, m_src)."""
    names = grid.names
    src_store, tgt_store, m_src, m_tgt = _two_runs(im, source, target, metric, grid, names)
    toward = {n: tgt_store[n] + _mask_pos(src_store[n] - tgt_store[n], grid.kind, grid.pos_mask) for n in names}
    mean_grads = _ig_gradients(im, target, metric, names, tgt_store, toward, steps=steps, batch=grid.batch,
                               batch_size=grid.batch_size, interventions=grid.interventions, hf=grid.hf,
                               progress=grid.progress)
    return _ig_estimate(grid, src_store, tgt_store, mean_grads), m_tgt, m_src


def _ig_input(
    im: InstrumentedModel,
    source: torch.Tensor,
    target: torch.Tensor,
    metric: Metric,
    grid: _Grid,
    *,
    steps: int,
) -> tuple[torch.Tensor, float, float]:
    """IG along the input path: interpolate ``embed``, read the gradient at every site in ``grid.names``.

    Returns (signed estimate [n_layers, ...], m_tgt, m_src).
    """
    names, batch, batch_size = grid.names, grid.batch, grid.batch_size
    if "embed" not in im.site_names():
        raise ValueError("method='ig-input' interpolates the token embeddings, but this model has no 'embed' site")
    src_store, tgt_store, m_src, m_tgt = _two_runs(im, source, target, metric, grid, [*names, "embed"])
    e_tgt = tgt_store["embed"]
    e_delta = src_store["embed"] - e_tgt
    alphas = [(k + 0.5) / steps for k in range(steps)]
    per_chunk = max(1, batch_size // batch)
    grad_sum = {n: torch.zeros_like(tgt_store[n], dtype=torch.float32) for n in names}
    bar = _progress(steps, "integrated gradients (input path)", grid.progress if steps > per_chunk else False)
    for a0 in range(0, steps, per_chunk):
        chunk = alphas[a0:a0 + per_chunk]
        ids = target.repeat(len(chunk), 1)
        interp = torch.cat([e_tgt + a * e_delta for a in chunk])
        store: dict[str, torch.Tensor] = {}
        handlers: list[tuple[str, Handler]] = [("embed", lambda value, event, interp=interp: interp.to(value.dtype))]
        handlers += [(n, _grad_recorder(store, n)) for n in names]
        with torch.enable_grad():
            logits = forward_with(im, ids, handlers, grid.interventions, repeat_rows(grid.hf, batch, len(chunk)))
            ms = _metric_per_replica(metric, logits, batch, need_grad=True)
            grads = torch.autograd.grad(ms.sum(), [store[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads, strict=True):
            if g is not None:
                grad_sum[n] += g.detach().float().view(len(chunk), batch, *g.shape[1:]).sum(0)
        del logits, grads, store
        bar.update(len(chunk))
    bar.close()
    return _ig_estimate(grid, src_store, tgt_store, {n: grad_sum[n] / steps for n in names}), m_tgt, m_src


def _ig_gradients(
    im: InstrumentedModel,
    target: torch.Tensor,
    metric: Metric,
    names: Sequence[str],
    start: Mapping[str, torch.Tensor],
    toward: Mapping[str, torch.Tensor],
    *,
    steps: int,
    batch: int,
    batch_size: int,
    interventions: Interventions | None,
    hf: Mapping[str, Any],
    progress: bool | None,
) -> dict[str, torch.Tensor]:
    """Per site, the metric's gradient averaged over ``start + alpha (toward - start)`` (midpoint alphas).

    Each site is interpolated on its own (the rest of the model runs normally on ``target``);
    all ``len(names) * steps`` interpolations are replicas of the batch, run ``batch_size``
    rows at a time. Returns ``{site: mean gradient}`` (float32, the site's shape).
    """
    alphas = [(k + 0.5) / steps for k in range(steps)]
    jobs = [(li, a) for li in range(len(names)) for a in alphas]  # one replica of the batch each
    per_chunk = max(1, batch_size // batch)
    grad_sum = [torch.zeros_like(start[n], dtype=torch.float32) for n in names]
    bar = _progress(len(jobs), "integrated gradients", progress if len(jobs) > per_chunk else False)
    for j0 in range(0, len(jobs), per_chunk):
        chunk = jobs[j0:j0 + per_chunk]
        ids = target.repeat(len(chunk), 1)
        hfr = repeat_rows(hf, batch, len(chunk))
        leaves: list[tuple[int, torch.Tensor]] = []
        handlers: list[tuple[str, Handler]] = []
        by_site: dict[int, list[int]] = {}
        for i, (li, _a) in enumerate(chunk):
            by_site.setdefault(li, []).append(i)
        for li, reps in by_site.items():
            n = names[li]
            delta = toward[n] - start[n]
            interp = torch.cat([start[n] + chunk[i][1] * delta for i in reps]).requires_grad_(True)
            rows = torch.cat([torch.arange(i * batch, (i + 1) * batch) for i in reps]).to(ids.device)
            leaves.append((li, interp))
            handlers.append((n, _replacer(rows, interp)))
        with torch.enable_grad():
            logits = forward_with(im, ids, handlers, interventions, hfr)
            ms = _metric_per_replica(metric, logits, batch, need_grad=True)
            grads = torch.autograd.grad(ms.sum(), [leaf for _, leaf in leaves], allow_unused=True)
        for (li, leaf), g in zip(leaves, grads, strict=True):
            if g is not None:
                grad_sum[li] += g.detach().float().view(-1, batch, *leaf.shape[1:]).sum(0)
        del logits, grads, leaves
        bar.update(len(chunk))
    bar.close()
    return {n: grad_sum[i] / steps for i, n in enumerate(names)}


def site_gradients(
    im: InstrumentedModel,
    ids: Any,
    metric: Metric,
    sites: Sequence[str],
    *,
    method: str = "atp",
    toward: Mapping[str, torch.Tensor] | None = None,
    steps: int = 10,
    batch_size: int | None = None,
    interventions: Interventions | None = None,
    progress: bool | None = None,
    **hf_kwargs: Any,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """Values of ``sites`` on ``ids`` and the metric's gradient there (the building block of AtP and IG).

    ``method="atp"``: the gradient at the run's own values (one forward, one backward).
    ``method="ig"``: per site, the gradient averaged over ``steps`` midpoints of the line from
    the site's value to ``toward[site]`` (same shape), the rest of the model running normally.

    Returns:
        ``(values, gradients, metric)``: ``{site: [batch, ...] detached value}``,
        ``{site: gradient (float32)}`` and the metric of the unmodified run.
    """
    ids = as_ids(ids, im.model)
    names = im.resolve(list(sites))
    if method not in ("atp", "ig"):
        raise ValueError(f"method must be 'atp' or 'ig', got {method!r}")
    batch = ids.shape[0]
    store: dict[str, torch.Tensor] = {}
    with torch.enable_grad():
        logits = forward_with(im, ids, [(n, _grad_recorder(store, n)) for n in names], interventions, hf_kwargs)
        m = _metric_per_replica(metric, logits, batch, need_grad=method == "atp")[0]
        if method == "atp":
            grads = torch.autograd.grad(m, [store[n] for n in names], allow_unused=True)
    values = {n: store[n].detach() for n in names}
    if method == "atp":
        gmap = {n: (g.detach().float() if g is not None else torch.zeros_like(values[n], dtype=torch.float32))
                for n, g in zip(names, grads, strict=True)}
        return values, gmap, float(m.detach())
    if toward is None:
        raise ValueError("method='ig' needs toward={site: the value to integrate toward}")
    for n in names:
        if n not in toward or tuple(toward[n].shape) != tuple(values[n].shape):
            got = None if n not in toward else tuple(toward[n].shape)
            raise ValueError(f"toward[{n!r}] must have the site's shape {tuple(values[n].shape)}, got {got}")
    gmap = _ig_gradients(im, ids, metric, names, values, {n: toward[n].to(values[n].dtype) for n in names},
                         steps=steps, batch=batch, batch_size=batch_size or 8 * batch, interventions=interventions,
                         hf=hf_kwargs, progress=progress)
    return values, gmap, float(m.detach())


def _replacer(rows: torch.Tensor, interp: torch.Tensor) -> Handler:
    def h(value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        return value.index_put((rows,), interp.to(value.dtype))

    return h
