"""Reusable analyses behind ``mishax-py demo``: induction heads, head ablations, SAE features.

Every function takes the :class:`~mishax_py.InstrumentedModel` ``im`` first (pure helpers on
already-computed tensors do not), then plain tensors; none draws figures, writes files or
formats prose -- :mod:`mishax_py.zoo.demo` runs them and :mod:`mishax_py.zoo.report` renders
what they measured. Conventions:

* ``ids [n, T]`` token ids; ``targets [n, T]`` the token to predict at each position (the
  next token); ``mask [n, T]`` bool, True where a prediction is scored (``tasks.TaskBatch``
  gives all three as ``input_ids``, ``targets``, ``target_mask``).
* A head is ``(layer, head)``; per-head grids are ``[n_layers, n_heads]`` (query heads).
* Induction prompts are ``[bos] s1..sL s1..sL``: ``offset`` (1 with a BOS token, else 0)
  tokens, then a sequence of ``L = half`` tokens and its repeat.

The direct-logit-attribution functions know one fact of the Gemma family: the final norm
multiplies by ``(1 + w)``. They read the unembedding from ``im.model.get_output_embeddings()``
and the final norm from ``im.model.get_decoder().norm``.

Why one file of over 500 lines: it is a flat library of about 25 small functions (most under
30 lines, half of each being its docstring stating what, why and shapes) that share these
conventions and private helpers; the two groups (heads: scores, search, ablations; SAE
features: attribution, contexts, edits) are marked by section comments.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, cast

import torch

from mishax_py.devices import materialised_weight

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from mishax_py.instrumented import InstrumentedModel
    from mishax_py.interventions import Ablate
    from mishax_py.studies.result import PatchingResult
    from saes import SAE

__all__ = [
    "ActivatingContext",
    "Head",
    "HeadAblationTest",
    "InductionHeadSearch",
    "ablate_heads",
    "ablation_vs_control",
    "accuracy",
    "all_heads",
    "direct_logit_attribution",
    "feature_clamp_predictions",
    "feature_logit_lens",
    "final_norm_scale",
    "find_induction_heads",
    "head_ablation_accuracy",
    "head_patterns",
    "mean_logprob",
    "n_heads",
    "other_head_sets",
    "prefix_matching_scores",
    "previous_token_scores",
    "promoted_tokens",
    "random_active_mask",
    "sae_activations",
    "sae_site",
    "select_heads",
    "single_head_ablation",
    "spliced_accuracy",
    "top_activating_contexts",
    "top_k_mask",
    "unembedding_directions",
]

Head = tuple[int, int]  # (layer, query head)


# ------------------------------------------------------------------------------- basics
def _hf(im: InstrumentedModel) -> PreTrainedModel:
    """``im.model`` as the Hugging Face model it is."""
    return cast("PreTrainedModel", im.model)


def _config(im: InstrumentedModel) -> PretrainedConfig:
    """The text decoder's config (a multimodal Gemma 3's ``text_config``)."""
    return _hf(im).config.get_text_config()


def n_heads(im: InstrumentedModel) -> int:
    """Number of query heads per layer (``config.num_attention_heads``)."""
    return int(_config(im).num_attention_heads)


def sae_site(sae: SAE) -> str:
    """The site ``sae`` reads (``ValueError`` when it has none)."""
    if sae.site is None:
        raise ValueError(f"{type(sae).__name__} has no site: load it with site=... or set sae.site")
    return sae.site


def all_heads(im: InstrumentedModel) -> list[Head]:
    """Every ``(layer, head)`` of the model, layer-major."""
    return [(layer, h) for layer in range(im.n_layers) for h in range(n_heads(im))]


def accuracy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of scored positions whose greedy prediction is the target.

    Args:
        logits: ``[n, T, vocab]``.
        targets: ``[n, T]`` the token to predict at each position.
        mask: ``[n, T]`` bool, the scored positions (0 scored positions give 0.0).
    """
    hits = (logits.argmax(-1) == targets.to(logits.device)) & mask.to(logits.device)
    return float(hits.sum()) / max(int(mask.sum()), 1)


def mean_logprob(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of the target over the scored positions, a 0-dim tensor (differentiable).

    Shapes as in :func:`accuracy`; the log-softmax is taken in float32.
    """
    lp = torch.log_softmax(logits.float(), -1).gather(-1, targets.to(logits.device).unsqueeze(-1)).squeeze(-1)
    return lp[mask.to(logits.device)].mean()


def _patterns(im: InstrumentedModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """Attention probabilities per layer, each ``[n, n_heads, q_pos, k_pos]`` float32."""
    sites = [f"blocks.{layer}.attn.pattern" for layer in range(im.n_layers)]
    with torch.no_grad():
        _, cache = im.run_with_cache(ids, sites=sites)
    return [cache[s].float() for s in sites]


def _halves(half: int | torch.Tensor, n: int) -> torch.Tensor:
    """``[n]`` long half-lengths from an int or a per-row tensor."""
    h = torch.as_tensor(half, dtype=torch.long).flatten()
    if h.numel() == 1:
        h = h.expand(n)
    if h.numel() != n:
        raise ValueError(f"half has {h.numel()} entries for {n} prompts")
    return h


# ---------------------------------------------------------------------- head scores
def prefix_matching_scores(
    im: InstrumentedModel, ids: torch.Tensor, half: int | torch.Tensor, *, offset: int = 1
) -> torch.Tensor:
    """Each head's prefix-matching score on repeated-sequence prompts, ``[n_layers, n_heads]``.

    What: the attention paid from the second occurrence of ``s_j`` (position ``offset + L + j - 1``)
    to the token right after its first occurrence, ``s_{j+1}`` (position ``offset + j``), averaged
    over ``j = 1..L-1`` within a prompt, then over prompts. Why: that is the signature of an
    induction head (Olsson et al. 2022): it looks back for the current token and attends to what
    followed it, which is what it then copies. Values are in ``[0, 1]``.

    Args:
        ids: ``[n, T]`` prompts ``[bos] s1..sL s1..sL`` (right padding allowed).
        half: ``L``, an int or ``[n]`` per prompt (``L >= 2``).
        offset: tokens before ``s1`` (1 with a BOS token, 0 without).
    """
    ids = torch.as_tensor(ids)
    n, T = ids.shape
    L = _halves(half, n)
    if int(L.min()) < 2 or int((offset + 2 * L).max()) > T:
        raise ValueError(f"need 2 <= half and offset + 2*half <= {T} (got half {L.tolist()}, offset {offset})")
    j = torch.arange(1, int(L.max()))  # [J]
    valid = j[None, :] < L[:, None]  # [n, J]
    q = (offset + L[:, None] + j[None, :] - 1).where(valid, torch.zeros_like(valid, dtype=torch.long))
    k = (offset + j[None, :]).expand(n, -1).where(valid, torch.zeros_like(valid, dtype=torch.long))
    rows = torch.arange(n)[:, None].expand_as(q)
    weight = valid.float() / (L[:, None] - 1).float()  # per-prompt mean over j
    out = []
    for pat in _patterns(im, ids):
        vals = pat[rows, :, q, k]  # [n, J, heads]
        out.append((vals * weight[..., None].to(vals.device)).sum(1).mean(0))
    return torch.stack(out).cpu()


def previous_token_scores(
    im: InstrumentedModel, ids: torch.Tensor, *, lengths: torch.Tensor | None = None, start: int = 1
) -> torch.Tensor:
    """Each head's previous-token score, ``[n_layers, n_heads]``.

    What: the attention from position ``p`` to ``p - 1``, averaged over ``p = start .. length-1``
    within a prompt, then over prompts. Why: previous-token heads write "my previous token was
    x" into each position, which induction heads in later layers match against (the first half
    of the induction circuit). Values are in ``[0, 1]``.

    Args:
        ids: ``[n, T]`` token ids.
        lengths: ``[n]`` real tokens per prompt (default ``T``: no padding).
        start: first query position scored (``>= 1``; e.g. 2 to skip the first token after BOS,
            whose previous token is BOS itself).
    """
    ids = torch.as_tensor(ids)
    n, T = ids.shape
    lens = torch.full((n,), T, dtype=torch.long) if lengths is None else torch.as_tensor(lengths).long().flatten()
    if start < 1 or int(lens.min()) <= start or int(lens.max()) > T:
        raise ValueError(f"need 1 <= start < length <= {T} (start {start}, lengths {lens.tolist()})")
    p = torch.arange(T)
    valid = (p[None, :] >= start) & (p[None, :] < lens[:, None])  # [n, T]
    weight = valid.float() / valid.sum(1, keepdim=True).float()
    prev = (p - 1).clamp_min(0)
    out = []
    for pat in _patterns(im, ids):
        vals = pat[:, :, p, prev]  # [n, heads, T]
        out.append((vals * weight[:, None, :].to(vals.device)).sum(-1).mean(0))
    return torch.stack(out).cpu()


def head_patterns(im: InstrumentedModel, ids: torch.Tensor, heads: Sequence[Head]) -> torch.Tensor:
    """Attention maps of the given heads, ``[n, len(heads), q_pos, k_pos]`` (float32, CPU).

    For looking at heads (figures); queries are rows, keys are columns.
    """
    layers = sorted({layer for layer, _ in heads})
    with torch.no_grad():
        _, cache = im.run_with_cache(ids, sites=[f"blocks.{layer}.attn.pattern" for layer in layers])
    return torch.stack([cache[f"blocks.{layer}.attn.pattern"][:, h].float().cpu() for layer, h in heads], 1)


def select_heads(scores: torch.Tensor, threshold: float) -> list[Head]:
    """Heads whose score is at least ``threshold``, highest first (ties: lower layer, then head).

    ``scores``: ``[n_layers, n_heads]`` (e.g. patching recovery or prefix-matching scores).
    NaN scores are never selected.
    """
    picked = [(float(scores[layer, h]), layer, h) for layer in range(scores.shape[0])
              for h in range(scores.shape[1]) if float(scores[layer, h]) >= threshold]  # fmt: skip
    return [(layer, h) for _, layer, h in sorted(picked, key=lambda t: (-t[0], t[1], t[2]))]


# ------------------------------------------------------------------ finding the heads
@dataclass
class InductionHeadSearch:
    """What :func:`find_induction_heads` measured.

    Attributes:
        heads: the named heads (recovery >= ``threshold``), highest recovery first; empty when
            the clean-corrupt gap is at most ``min_gap``.
        recovery: ``[n_layers, n_heads]`` fraction of the clean-corrupt gap each head's patch recovers.
        patching: the raw per-head patching result (``values``, ``clean``, ``corrupt``).
        gap: clean minus corrupt metric (nats of mean log-probability).
        threshold, min_gap: the criteria used.
    """

    heads: list[Head]
    recovery: torch.Tensor
    patching: PatchingResult
    gap: float
    threshold: float
    min_gap: float

    @property
    def reason(self) -> str | None:
        """Why no head was named: ``"gap"`` (model does not separate clean from corrupt),
        ``"threshold"`` (no head recovers enough), or ``None`` when heads were named."""
        if self.heads:
            return None
        return "gap" if not self.gap > self.min_gap else "threshold"


def find_induction_heads(
    im: InstrumentedModel,
    clean_ids: torch.Tensor,
    corrupt_ids: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    threshold: float = 0.2,
    min_gap: float = 0.25,
    batch_size: int | None = None,
    progress: bool = False,
) -> InductionHeadSearch:
    """Name the heads that carry induction by activation patching each head's ``attn.z``.

    What: for every head, its ``attn.z`` output (all positions) is patched from the clean run
    (``[bos] A A``) into the corrupt run (``[bos] B A``); the metric is the mean log-probability
    of the correct next token (:func:`mean_logprob`) on the scored positions of the repeat. A head
    is named when its patch recovers at least ``threshold`` of the clean-corrupt gap. Why: only
    the clean prompt lets the model predict the repeat, so the heads that restore the prediction
    are the ones moving the earlier copy's information. When the gap is at most ``min_gap`` nats,
    recoveries would only be noise divided by a tiny gap, so no head is named.

    Args:
        clean_ids, corrupt_ids: ``[n, T]`` aligned prompts.
        targets, mask: ``[n, T]`` the clean next tokens and the scored positions.
        threshold: the recovery a head needs; min_gap: the smallest gap that names heads.
        batch_size, progress: passed to ``activation_patching``.
    """
    from mishax_py.studies import activation_patching

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return mean_logprob(logits, targets, mask)

    res = activation_patching(im, clean_ids, corrupt_ids, metric, site="attn.z", by="head",
                              batch_size=batch_size, progress=progress)  # fmt: skip
    recovery = res.normalized()
    gap = float(res.clean - res.corrupt)
    heads = select_heads(recovery, threshold) if gap > min_gap else []
    return InductionHeadSearch(heads, recovery, res, gap, threshold, min_gap)


# ------------------------------------------------------------------------ ablations
def ablate_heads(heads: Iterable[Head]) -> dict[str, Ablate]:
    """Interventions zero-ablating ``heads`` at ``attn.z``: ``{"blocks.L.attn.z": Ablate(heads=[...])}``."""
    from mishax_py.interventions import Ablate

    by_layer: dict[int, list[int]] = {}
    for layer, h in heads:
        by_layer.setdefault(int(layer), []).append(int(h))
    return {f"blocks.{layer}.attn.z": Ablate(heads=sorted(set(hs))) for layer, hs in sorted(by_layer.items())}


def head_ablation_accuracy(
    im: InstrumentedModel,
    ids: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    head_sets: Sequence[Sequence[Head]],
    *,
    batch_size: int | None = None,
) -> list[float]:
    """Accuracy (:func:`accuracy`) with each set of heads zero-ablated at ``attn.z``, one float per set.

    What: zeroing a head's ``attn.z`` removes everything it writes to the residual stream. Why:
    a head is necessary for a behaviour when removing it breaks the behaviour. The sets run as
    one batched ``im.sweep``; an empty set gives the unablated accuracy.
    """
    variants = [ablate_heads(hs) for hs in head_sets]
    if not variants:
        return []
    with torch.no_grad():
        out = im.sweep(ids, variants, metric=lambda lg: accuracy(lg, targets, mask), batch_size=batch_size,
                       progress=False)  # fmt: skip
    return [float(x) for x in out]


def other_head_sets(others: Sequence[Head], k: int, n: int, seed: int) -> list[list[Head]]:
    """Up to ``n`` distinct sets of ``k`` heads from ``others`` (each sorted): every combination when
    there are at most ``n``, else ``n`` seeded random draws. Empty when ``k == 0`` or ``k > len(others)``."""
    others = list(others)
    if k == 0 or k > len(others):
        return []
    if math.comb(len(others), k) <= n:
        return [list(c) for c in itertools.combinations(others, k)]
    g = torch.Generator().manual_seed(seed)
    draws: list[list[Head]] = []
    while len(draws) < n:
        pick = sorted(others[i] for i in torch.randperm(len(others), generator=g)[:k].tolist())
        if pick not in draws:
            draws.append(pick)
    return draws


@dataclass
class HeadAblationTest:
    """Accuracy with some heads ablated against the same number of other heads ablated.

    Attributes:
        heads: the heads tested.
        baseline: accuracy with nothing ablated.
        ablated: accuracy with ``heads`` ablated.
        control_sets: sets of ``len(heads)`` other heads (the control).
        control_accuracies: accuracy with each control set ablated.
    """

    heads: list[Head]
    baseline: float
    ablated: float
    control_sets: list[list[Head]] = field(default_factory=list)
    control_accuracies: list[float] = field(default_factory=list)

    @property
    def control_mean(self) -> float:
        """Mean control accuracy (NaN without controls)."""
        a = self.control_accuracies
        return sum(a) / len(a) if a else float("nan")

    @property
    def control_min(self) -> float:
        """Lowest control accuracy (NaN without controls)."""
        return min(self.control_accuracies, default=float("nan"))


def ablation_vs_control(
    im: InstrumentedModel,
    ids: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    heads: Sequence[Head],
    *,
    n_controls: int = 10,
    seed: int = 0,
    batch_size: int | None = None,
) -> HeadAblationTest:
    """Accuracy with ``heads`` zero-ablated vs with as many other heads ablated.

    What: the baseline accuracy, the accuracy with ``heads`` ablated, and with each of up to
    ``n_controls`` sets of ``len(heads)`` other heads ablated (:func:`other_head_sets`, seeded).
    Why: a drop only says the heads matter if ablating as many random heads does not drop
    accuracy as much. All sets run in one sweep.
    """
    heads = [(int(layer), int(h)) for layer, h in heads]
    others = [h for h in all_heads(im) if h not in heads]
    controls = other_head_sets(others, len(heads), n_controls, seed)
    accs = head_ablation_accuracy(im, ids, targets, mask, [[], heads, *controls], batch_size=batch_size)
    return HeadAblationTest(heads, accs[0], accs[1], controls, accs[2:])


def single_head_ablation(
    im: InstrumentedModel,
    ids: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Accuracy with each head zero-ablated alone, ``[n_layers, n_heads]``.

    Why: shows which single heads are necessary; redundant heads (several doing the same job)
    each leave accuracy intact even when ablating them together breaks it.
    """
    accs = head_ablation_accuracy(im, ids, targets, mask, [[h] for h in all_heads(im)], batch_size=batch_size)
    return torch.tensor(accs).reshape(im.n_layers, n_heads(im))


# ---------------------------------------------------------------------- SAE features
def sae_activations(im: InstrumentedModel, sae: SAE, ids: torch.Tensor) -> torch.Tensor:
    """The SAE's feature activations on ``ids``, ``[n, T, d_sae]``: ``sae.encode`` of its ``sae.site``."""
    site = sae_site(sae)
    with torch.no_grad():
        _, cache = im.run_with_cache(ids, sites=[site])
        return sae.encode(cache[site])


def _final_norm(im: InstrumentedModel) -> tuple[torch.Tensor, float]:
    """The final norm's weight ``w`` (the norm multiplies by ``1 + w``) and its ``eps``."""
    norm = getattr(_hf(im).get_decoder(), "norm", None)
    if not isinstance(norm, torch.nn.Module) or not isinstance(getattr(norm, "weight", None), torch.Tensor):
        raise TypeError(f"{type(im.model).__name__} has no final norm with a weight at get_decoder().norm")
    return materialised_weight(norm).float(), float(getattr(norm, "eps", 1e-6))


def unembedding_directions(im: InstrumentedModel, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Residual-stream directions read by the logits, with the final norm's gain folded in.

    Returns ``(1 + w_norm) * (W_U[t] - mean_v W_U[v])`` for each target ``t``: ``[..., d_model]``
    for ``targets [...]``, or ``[vocab, d_model]`` for every token when ``targets`` is ``None``.
    A residual vector ``x``'s de-meaned logit for ``t`` (before the final soft-cap) is
    ``scale * x · direction[t]`` where ``scale = 1 / rms(x_final)`` (:func:`final_norm_scale`).
    De-meaning over the vocabulary removes what raises every logit alike (softmax ignores it).
    """
    W_U = materialised_weight(_hf(im).get_output_embeddings()).float()  # loaded where accelerate offloads it
    gain = 1.0 + _final_norm(im)[0].to(W_U.device)
    mean = W_U.mean(0)
    rows = W_U if targets is None else W_U[targets.to(W_U.device)]
    return (rows - mean) * gain


def final_norm_scale(im: InstrumentedModel, ids: torch.Tensor) -> torch.Tensor:
    """``[n, T]``: ``1 / rms`` the final norm divides the last layer's output by, ``rsqrt(mean(x²) + eps)``."""
    site = f"blocks.{im.n_layers - 1}.resid_post"
    with torch.no_grad():
        _, cache = im.run_with_cache(ids, sites=[site])
    x = cache[site].float()
    eps = _final_norm(im)[1]
    return torch.rsqrt(x.pow(2).mean(-1) + eps)


def _decoder(im: InstrumentedModel, sae: SAE) -> torch.Tensor:
    W_dec = sae.W_dec.detach().float()
    d_model = int(_config(im).hidden_size)
    if W_dec.shape[-1] != d_model:
        raise ValueError(
            f"the SAE at {sae.site} decodes to {W_dec.shape[-1]} dims, not the residual stream's {d_model}: direct "
            "logit attribution needs an SAE whose output is added to the residual stream (resid, attn_out, "
            "mlp_out, transcoders)"
        )
    return W_dec


def direct_logit_attribution(
    im: InstrumentedModel,
    sae: SAE,
    features: torch.Tensor,
    targets: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each feature's direct contribution to the de-meaned logit of ``targets``, ``[..., d_sae]``.

    What: ``f_i * scale * W_dec[i] · u[target]`` with ``u`` from :func:`unembedding_directions`
    (final-norm gain folded in, de-meaned over the vocabulary): the part of the target's logit
    written by feature ``i`` through the residual stream directly, skipping later layers. Why:
    the features with the largest attribution at a position are the ones that carry the answer
    there. With ``scale = final_norm_scale(im, ids)`` the attributions are in logits: for an SAE
    at the last layer's output they sum, with the bias and error terms, to the target's
    de-meaned logit before the final soft-cap. Without it (``scale=None``, i.e. 1) they are
    that up to a positive per-position factor, which does not change their ranking.

    Args:
        sae: an SAE whose decoder writes the residual stream (``d_out == d_model``).
        features: ``[..., d_sae]`` activations (``sae.encode`` of its site).
        targets: ``[...]`` token per position.
        scale: ``[...]`` per-position ``1 / rms`` of the final norm.
    """
    dirs = unembedding_directions(im, targets)  # [..., d_model]
    W_dec = _decoder(im, sae).to(dirs.device)
    attr = features.float() * torch.einsum("...m,dm->...d", dirs, W_dec)
    return attr if scale is None else attr * scale.float()[..., None].to(attr.device)


def feature_logit_lens(im: InstrumentedModel, sae: SAE) -> torch.Tensor:
    """``[d_sae, vocab]``: how each feature's decoder direction moves every de-meaned logit, per unit activation.

    ``W_dec @ unembedding_directions(im).T`` (final-norm gain folded in, up to its per-position
    scale). Why: the tokens a feature promotes most are what it writes about.
    """
    U = unembedding_directions(im)
    return _decoder(im, sae).to(U.device) @ U.T


def promoted_tokens(im: InstrumentedModel, sae: SAE, features: Sequence[int], k: int = 3) -> torch.Tensor:
    """``[len(features), k]`` token ids each feature's decoder direction promotes most (:func:`feature_logit_lens`)."""
    lens = feature_logit_lens(im, sae)[list(features)]
    return lens.topk(k, -1).indices.cpu()


class ActivatingContext(NamedTuple):
    """Where a feature fired: its ``activation`` at position ``pos`` of prompt ``row``."""

    activation: float
    row: int
    pos: int


def top_activating_contexts(
    im: InstrumentedModel,
    sae: SAE,
    ids: torch.Tensor,
    features: Sequence[int],
    *,
    k: int = 3,
    mask: torch.Tensor | None = None,
) -> list[list[ActivatingContext]]:
    """The ``k`` (prompt, position) pairs where each feature is most active, per feature.

    What: the SAE is run on ``ids`` (:func:`sae_activations`); for each feature, the positions
    with the largest activation, highest first; positions where it does not fire (activation
    <= 0) are left out, so a list may be shorter than ``k``. Why: what a feature responds to is
    read off the contexts that excite it most.

    Args:
        ids: ``[n, T]`` prompts.
        features: feature indices.
        mask: ``[n, T]`` bool, the positions eligible (e.g. no padding); default all.

    Returns:
        One list of :class:`ActivatingContext` per feature, in the order of ``features``.
    """
    acts = sae_activations(im, sae, ids)[..., list(features)].float().cpu()  # [n, T, F]
    if mask is not None:
        acts = acts.masked_fill(~mask.bool().cpu()[..., None], float("-inf"))
    T = acts.shape[1]
    flat = acts.flatten(0, 1)  # [n*T, F]
    top = flat.topk(min(k, flat.shape[0]), 0)
    out: list[list[ActivatingContext]] = []
    for col in range(len(features)):
        ctx = [ActivatingContext(float(v), j // T, j % T)
               for v, j in zip(top.values[:, col].tolist(), top.indices[:, col].tolist(), strict=True) if v > 0]
        out.append(ctx)  # fmt: skip
    return out


def top_k_mask(scores: torch.Tensor, k: int, where: torch.Tensor) -> torch.Tensor:
    """``[..., d]`` bool: the ``k`` largest entries of ``scores [..., d]`` at each position where ``where [...]``."""
    m = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(k, -1).indices, True)
    return m & where[..., None].to(m.device)


def random_active_mask(
    features: torch.Tensor,
    k: int,
    where: torch.Tensor,
    *,
    exclude: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[..., d_sae]`` bool: ``k`` random active features (``> 0``) per position where ``where [...]``.

    The control for ablating chosen features: as many features, active at the same positions,
    picked uniformly among the active ones not in ``exclude`` (fewer where fewer are active).
    """
    active = features > 0
    noise = torch.rand(features.shape, generator=generator) * active.cpu()
    if exclude is not None:
        noise[exclude.cpu()] = 0.0
    m = torch.zeros_like(noise, dtype=torch.bool).scatter_(-1, noise.topk(k, -1).indices, True)
    return (m.to(features.device) & where[..., None].to(features.device) & active & (noise > 0).to(features.device))


def spliced_accuracy(
    im: InstrumentedModel,
    sae: SAE,
    ids: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    ablate: torch.Tensor | None = None,
    keep_error: bool = True,
) -> tuple[float, float]:
    """``(accuracy, mean log-prob)`` with the SAE spliced in at its site, the ``ablate`` features zeroed.

    What: the site's value is replaced by the SAE's reconstruction (plus the error term when
    ``keep_error``, so only the edit changes the run) after zeroing the features where
    ``ablate [n, T, d_sae]`` is True. Why: if the features that carry the answer are ablated,
    the model should fail where ablating as many other active features does not. Uses
    ``saes.Splice``, so ``sae`` must read and write the same site (not a transcoder).
    """
    import saes

    def zero(f: torch.Tensor) -> torch.Tensor:
        assert ablate is not None
        return f.masked_fill(ablate.to(f.device), 0.0)

    with torch.no_grad():
        logits = im.run(ids, interventions={sae_site(sae): saes.Splice(sae, edit=zero if ablate is not None else None,
                                                                  keep_error=keep_error)})  # fmt: skip
    return accuracy(logits, targets, mask), float(mean_logprob(logits, targets, mask))


def feature_clamp_predictions(
    im: InstrumentedModel, sae: SAE, ids: torch.Tensor, feature: int, value: float, position: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy predictions at ``position`` without and with ``feature`` clamped to ``value`` there, ``[n]`` each.

    What: ``saes.Splice`` with ``FeatureClamp([feature], value, positions=[position])`` (error
    term kept). Why: if the feature's decoder writes "predict token t", clamping it high should
    make the model output ``t``; comparing the two predictions measures that causally.
    """
    import saes

    edit = saes.FeatureClamp([feature], value, positions=[position])
    with torch.no_grad():
        before = im.run(ids)[:, position].argmax(-1)
        after = im.run(ids, interventions={sae_site(sae): saes.Splice(sae, edit=edit)})[:, position].argmax(-1)
    return before.cpu(), after.cpu()
