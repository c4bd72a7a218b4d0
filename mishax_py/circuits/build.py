"""Building a transcoder attribution graph (the circuit-tracer method, Ameisen et al. 2025).

The *local replacement model* of a prompt replaces every MLP by its transcoder (reading the
family's MLP input, e.g. ``blocks.L.ln2_normalized``, writing its MLP output ``blocks.L.mlp_out``)
plus an *error node* holding what the transcoder misses at each (layer, position), and freezes
the attention patterns and the scales of the normalisations the family lists
(``im.family.frozen_norms``) at their values on the prompt. With those fixed, the replacement
model is *linear* in the feature activations, error nodes and token embeddings, so every node's
pre-activation splits exactly into direct contributions:

* a feature node ``(L, p, i)`` with activation ``a`` contributes ``a * W_dec[i]`` to the MLP
  output of layer ``L`` at position ``p``;
* an error node ``(L, p)`` contributes the transcoder's error vector there;
* a token node ``p`` contributes the embedding site's value at ``p``;
* targets are feature *pre-activations* ``x . W_enc[:, i] + b_enc[i]`` and logit nodes
  (the pre-soft-cap logit of a token minus the mean logit, as circuit-tracer does).

The direct attribution (an *edge*) from a source to a target is the source's output
vector dotted with the gradient of the target with respect to that output, taken in the
frozen model with the gradient stopped at every transcoder output (so only paths through
attention value/output circuits, frozen norms, residual connections and transcoder skip
connections count -- never through another feature). Completeness then holds exactly:
for every target, ``sum of incoming edges + bias == its value`` where ``bias`` collects
the constants (encoder bias, the decoder biases of earlier transcoders carried along the
linear paths). ``AttributionGraph.completeness_error()`` reports the largest violation.

How it runs (batched backward passes): the prompt is replicated ``batch_size`` times and
run once through the frozen replacement model, keeping the graph; then each backward pass
seeds a different target in every row (the gradient of a feature pre-activation is its
encoder column at its position; of a logit node, the de-meaned unembedding row at the last
position), so one backward yields ``batch_size`` rows of the adjacency matrix. Memory is
bounded by ``batch_size`` copies of the prompt's activations plus the ``[batch_size, pos,
d_model]`` gradients of one layer at a time: lower ``batch_size`` for long prompts.

How the model is frozen, using only canonical sites: a norm ``y = norm(x)`` between the
sites ``x`` and ``y`` of a pair in ``im.family.frozen_norms`` is replaced for autograd by
``y.detach() + (x - x.detach()) * c`` with ``c = y / x`` (the norm's gain times its frozen
scale; exact in value). Attention patterns are detached at ``attn.pattern``. A layer without a
transcoder keeps its MLP output as a single error node per position.

The ``<bos>`` position (``zero_bos``): circuit-tracer zeroes every feature and error vector at
position 0 (it makes position 0 a special token, prepending one when the prompt has none), because
the first position carries outsized norms and many features that explain nothing about the prompt.
Zeroed, position 0 has no feature nodes and its error nodes have no edges; only its token node
stays, and what the zeroed nodes wrote there moves into the targets' ``bias`` (a constant, as in
the frozen replacement model nothing upstream changes it), so completeness still holds and every
other edge is unchanged. By default (``zero_bos=None``) the graph does this exactly when the prompt
starts with the BOS id, read from ``bos_token_id=`` or else the tokenizer's ``bos_token_id``
(this package reads no model config), so a ``<bos>`` prompt gives circuit-tracer's graph;
``zero_bos=False`` keeps position 0's features and error nodes (every node of the local
replacement model), ``zero_bos=True`` zeroes position 0 whatever token it holds.

Leading template positions (``zero_positions``): an instruction-tuned prompt starts with chat-template
tokens (``<bos><start_of_turn>user\n``) that are ordinary tokens to every study, but whose features,
like the ``<bos>``'s, mostly explain the template and not the prompt. circuit-tracer offers to zero
them too; ``zero_positions=n`` zeroes the first ``n`` positions and ``zero_positions=slice(a, b)``
any range, by the same rule as the ``<bos>`` (no feature nodes, error nodes without edges, their
output a constant of the targets; completeness holds and every edge between the other nodes is
unchanged). It adds to ``zero_bos``: the zeroed set is their union, listed in
``graph.settings["zero_positions"]``.

Checking claims: :meth:`AttributionGraph.clamp_effect` is exact in the replacement model
(:func:`mishax_py.circuits.replacement.replacement_interventions` runs it, with clamps) up to
features switching on or off. The real model can disagree where the frozen parts matter: on
the bundled ``gemma2-tiny``'s confident recall answer the final norm rescales a change along
the dominant answer direction away, so real ablations move the logit ~10x less than the graph
says and sometimes the other way (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from mishax_py.circuits.dictionaries import TranscoderLike
from mishax_py.circuits.graph import AttributionGraph
from mishax_py.circuits.prune import compute_influence, normalise_rows
from mishax_py.circuits.transcoders import (
    TranscoderMap,
    Transcoders,
    skip_term,
    transcoder_features,
    transcoder_map,
    transcoder_output,
)
from mishax_py.inputs import Ids, as_ids
from mishax_py.progress import progress_bar
from mishax_py.runtime import Handler, SiteEvent, activate

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel

__all__ = ["TokenDecoder", "attribution_graph", "norm_scale"]


class TokenDecoder(Protocol):
    """What the graph uses of a tokenizer: the string of a token id or of the whole prompt (a Hugging Face
    tokenizer is one; its ``decode`` is typed to return a list of strings for a batch of sequences, joined
    here if it does). Its ``bos_token_id``, where it has one, decides the default ``zero_bos``."""

    def decode(self, token_ids: list[int], /) -> str | list[str]: ...


def norm_scale(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``c = y / x`` elementwise (0 where ``x`` is 0): a norm's output as a fixed scale of its input."""
    return torch.where(x != 0, y / torch.where(x != 0, x, torch.ones_like(x)), torch.zeros_like(x))


@dataclass
class _PromptState:
    """One plain forward of the prompt (batch row 0, float32 unless noted).

    Attributes:
        last_logits: ``[vocab]`` the logits at the last position.
        embed: ``[pos, d_model]`` the embedding site's value (the token nodes' outputs).
        ln_final: ``[pos, d_model]`` the final norm's output (model dtype).
        feats: ``{layer: (pre-activations, activations)}`` ``[pos, d_sae]`` each.
        errors: ``{layer: [pos, d_model]}`` MLP output minus what the transcoder writes (the whole
            MLP output for a layer without one).
    """

    last_logits: torch.Tensor
    embed: torch.Tensor
    ln_final: torch.Tensor
    feats: dict[int, tuple[torch.Tensor, torch.Tensor]]
    errors: dict[int, torch.Tensor]


@torch.no_grad()
def _prompt_state(im: InstrumentedModel, ids: torch.Tensor, tcs: TranscoderMap) -> _PromptState:
    """One plain forward: features, pre-activations, error vectors, embeddings, final-norm output."""
    out_kind = im.family.mlp_output_kind
    mlp_outs = [im.layer_site(layer, out_kind) for layer in range(im.n_layers)]
    logits, cache = im.run_with_cache(ids, sites=["embed", "ln_final", *mlp_outs, *[s for _, s in tcs.values()]])
    feats, errors = {}, {}
    for layer in range(im.n_layers):
        y = cache[mlp_outs[layer]][0].float()
        if layer not in tcs:
            errors[layer] = y
            continue
        tc, site = tcs[layer]
        x = cache[site][0]
        pre, f = transcoder_features(tc, x)
        errors[layer] = y - transcoder_output(tc, f, x)
        feats[layer] = (pre, f)
    return _PromptState(logits[0, -1].float(), cache["embed"][0].float(), cache["ln_final"][0], feats, errors)


def _zeroed_positions(zero_bos: bool, zero_positions: int | slice | None, n_pos: int) -> list[int]:
    """The sorted positions whose features and error vectors the graph zeroes (``{0}`` for ``zero_bos``).

    Raises:
        ValueError: ``zero_positions`` a negative int or more than ``n_pos``.
        TypeError: ``zero_positions`` neither an int nor a slice.
    """
    picked = {0} if zero_bos else set()
    if zero_positions is None:
        return sorted(picked)
    if isinstance(zero_positions, slice):
        return sorted(picked | set(range(n_pos)[zero_positions]))
    if isinstance(zero_positions, bool) or not isinstance(zero_positions, int):
        raise TypeError(f"zero_positions must be an int (the first n positions) or a slice, "
                        f"got {zero_positions!r}")
    if not 0 <= zero_positions <= n_pos:
        raise ValueError(f"zero_positions={zero_positions} must lie in [0, {n_pos}] (the prompt has {n_pos} positions)")
    return sorted(picked | set(range(zero_positions)))


def _zero_positions(st: _PromptState, tcs: TranscoderMap, n_layers: int, positions: list[int]) -> torch.Tensor:
    """Zero the feature activations and error vectors at ``positions`` in ``st`` (circuit-tracer's ``<bos>`` rule).

    Returns ``[n_layers, len(positions), d_model]``: what they wrote to each layer's MLP output at
    those positions (the activations times their decoder rows, plus the error vectors), which the
    graph keeps as a constant of its targets.
    """
    out = torch.stack([st.errors[layer][positions].clone() for layer in range(n_layers)])
    for layer in range(n_layers):
        if layer in st.feats:
            pre, f = st.feats[layer]
            out[layer] += f[positions] @ tcs[layer][0].W_dec.detach().float()
            f = f.clone()
            f[positions] = 0
            st.feats[layer] = (pre, f)
        st.errors[layer] = st.errors[layer].clone()
        st.errors[layer][positions] = 0
    return out


# -- the handlers of the frozen forward --------------------------------------------------------
def _freeze_norm(stash: dict[str, torch.Tensor], src: str) -> Handler:
    """Autograd sees ``y = c * x`` with ``c = y / x`` frozen (value unchanged)."""

    def h(y: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        x = stash[src]
        xd = x.detach().to(y.dtype)
        return y.detach() + (x.to(y.dtype) - xd) * norm_scale(xd, y.detach())

    return h


def _stash(stash: dict[str, torch.Tensor], name: str, leaf: bool = False) -> Handler:
    def h(v: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        if leaf:
            v = v.detach().requires_grad_(True)
        stash[name] = v
        return v

    return h


def _replace_mlp(stash: dict[str, torch.Tensor], layer: int, tc: TranscoderLike | None, in_name: str | None
                 ) -> Handler:
    """The MLP output becomes a leaf (the sources' outputs are constants); only a skip connection passes gradient."""

    def h(v: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        leaf = v.detach().requires_grad_(True)
        stash[f"mlp{layer}"] = leaf
        skip = None if tc is None or in_name is None else skip_term(tc, stash[in_name])
        if skip is not None:
            skip = skip.to(v.dtype)
            return leaf + (skip - skip.detach())
        return leaf

    return h


def _detach(v: torch.Tensor, event: SiteEvent) -> torch.Tensor:
    return v.detach()


def _frozen_forward(im: InstrumentedModel, ids: torch.Tensor, tcs: TranscoderMap, rows: int
                    ) -> dict[str, torch.Tensor]:
    """Run ``rows`` copies of the prompt through the frozen replacement model, keeping the autograd graph.

    Returns the stash the backward passes read: ``"embed"`` (the leaf the token nodes are),
    ``"mlp{L}"`` (the leaf each MLP output is), the transcoders' input sites and ``"ln_final"``
    (where targets are seeded), each ``[rows, pos, ...]``.
    """
    T = ids.shape[1]
    stash: dict[str, torch.Tensor] = {}
    handlers: list[tuple[str, Handler]] = [("embed", _stash(stash, "embed", leaf=True))]
    for x_site, y_site in im.family.frozen_norms:  # registered first: a site's stash below sees the frozen value
        handlers += [(x_site, _stash(stash, x_site)), (y_site, _freeze_norm(stash, x_site))]
    for layer in range(im.n_layers):
        tc, in_site = tcs.get(layer, (None, None))
        handlers.append((im.layer_site(layer, "attn.pattern"), _detach))
        if in_site is not None:
            handlers.append((in_site, _stash(stash, in_site)))
        handlers.append((im.layer_site(layer, im.family.mlp_output_kind), _replace_mlp(stash, layer, tc, in_site)))
    handlers.append(("ln_final", _stash(stash, "ln_final")))
    ctx = im.context(None, batch=rows, pos=T)
    for name, h in handlers:
        im.add_handler(ctx, name, h)
    with torch.enable_grad(), activate(ctx):
        im.forward(ids.expand(rows, T).contiguous())
    return stash


def _unembedding(im: InstrumentedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W_U [vocab, d_model] float32, bias [vocab] or None)``: the linear map from the final norm to the logits.

    Read from ``model.get_output_embeddings()`` (the unembedding module of a Hugging Face causal LM).
    """
    get = getattr(im.model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"attribution_graph reads the unembedding from model.get_output_embeddings(); "
                        f"{type(im.model).__name__} has none")
    bias = getattr(head, "bias", None)
    return head.weight.detach().float(), None if bias is None else bias.detach()


def attribution_graph(
    im: InstrumentedModel,
    ids: Ids,
    transcoders: Transcoders,
    *,
    tokenizer: TokenDecoder | None = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    logit_tokens: Sequence[int] | None = None,
    max_feature_nodes: int | None = None,
    batch_size: int = 64,
    progress: bool | None = None,
    zero_bos: bool | None = None,
    bos_token_id: int | None = None,
    zero_positions: int | slice | None = None,
) -> AttributionGraph:
    """Build the attribution graph of one prompt (see the module docs).

    A single-prompt analysis, not a clean/corrupt study: it explains the model's own next-token
    logits on ``ids``.

    Args:
        im: the instrumented model.
        ids: the prompt, token ids ``[pos]`` or ``[1, pos]``.
        transcoders: ``{layer: transcoder}`` or a list of transcoders with ``site`` (an MLP
            input kind of the family, e.g. ``blocks.L.ln2_normalized``) and ``output_site``
            (its MLP output, ``blocks.L.mlp_out``). Layers without one keep their whole MLP
            output as error nodes.
        tokenizer: optional, for token strings, the prompt string (its ``decode`` of the whole
            prompt) and the BOS id (its ``bos_token_id``).
        max_n_logits, desired_logit_prob: logit nodes are the most probable next tokens
            until their probabilities add up to ``desired_logit_prob`` (at most ``max_n_logits``).
        logit_tokens: explicit logit-node tokens instead (the first is the target logit).
        max_feature_nodes: compute rows for at most this many features, chosen greedily
            by their current influence on the logits (circuit-tracer's strategy); default: all.
        batch_size: targets per backward pass (rows of the replicated forward).
        progress: a bar over the adjacency rows (``None``: on a terminal, for long work; see
            :mod:`mishax_py.progress`).
        zero_bos: zero the features and error vectors at position 0, as circuit-tracer does
            (module docs). ``None`` (default): when the prompt starts with the BOS id; ``True``:
            always; ``False``: never. The choice is ``graph.settings["zero_bos"]``.
        bos_token_id: the BOS id for ``zero_bos=None`` (default: ``tokenizer.bos_token_id``;
            with neither, nothing is zeroed).
        zero_positions: also zero these positions by the same rule, e.g. a chat template's leading
            tokens (module docs): an int ``n`` for the first ``n`` positions, or a slice of
            positions. Added to ``zero_bos``'s position 0; the zeroed positions are
            ``graph.settings["zero_positions"]``.

    Raises:
        ValueError: a batch of prompts, ``batch_size < 1``, transcoders that do not fit the
            model's MLPs, ``logit_tokens`` outside the vocabulary, ``zero_positions`` a negative
            int or longer than the prompt.
        TypeError: ``zero_positions`` neither an int nor a slice.
    """
    ids = as_ids(ids, im)
    if ids.shape[0] != 1:
        raise ValueError(f"attribution_graph takes one prompt, got a batch of {ids.shape[0]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # raises UnknownSiteError for models without the canonical sites the graph needs
    im.resolve(["embed", "ln_final", im.layer_site(0, "attn.pattern"), im.layer_site(0, im.family.mlp_output_kind),
                *[site for pair in im.family.frozen_norms for site in pair]])
    tcs = transcoder_map(im, transcoders)
    n_layers, T = im.n_layers, ids.shape[1]
    st = _prompt_state(im, ids, tcs)
    bos = bos_token_id if bos_token_id is not None else getattr(tokenizer, "bos_token_id", None)
    zero = bool(zero_bos) if zero_bos is not None else bos is not None and int(ids[0, 0]) == int(bos)
    zeroed = _zeroed_positions(zero, zero_positions, T)
    # [n_layers, len(zeroed), d_model]: what the features and error node of each layer wrote at the zeroed positions
    zero_out = _zero_positions(st, tcs, n_layers, zeroed) if zeroed else None

    # -- nodes --------------------------------------------------------------------------
    feat_rows, acts, pres = [], [], []
    for layer in sorted(st.feats):
        pre, f = st.feats[layer]
        nz = (f != 0).nonzero()
        feat_rows.append(torch.cat([torch.full((nz.shape[0], 1), layer), nz], 1))
        acts.append(f[nz[:, 0], nz[:, 1]])
        pres.append(pre[nz[:, 0], nz[:, 1]])
    features = torch.cat(feat_rows).long() if feat_rows else torch.zeros(0, 3, dtype=torch.long)
    activations = torch.cat(acts) if acts else torch.zeros(0)
    pre_acts = torch.cat(pres) if pres else torch.zeros(0)
    n_f = features.shape[0]

    W_U, lm_bias = _unembedding(im)
    probs = st.last_logits.softmax(-1)
    if logit_tokens is not None:
        ltoks = torch.as_tensor(list(logit_tokens), dtype=torch.long)
        if ltoks.numel() == 0 or bool((ltoks < 0).any()) or bool((ltoks >= W_U.shape[0]).any()):
            raise ValueError(f"logit_tokens must be token ids in [0, {W_U.shape[0]}), got {list(logit_tokens)}")
    else:
        top = probs.sort(descending=True)
        k = int(torch.searchsorted(top.values.cumsum(0), torch.tensor(desired_logit_prob)).item()) + 1
        ltoks = top.indices[: max(1, min(k, max_n_logits))]
    lprobs = probs[ltoks]
    logit_vecs = W_U[ltoks] - W_U.mean(0)  # de-meaned unembedding rows [n_logits, d_model]
    pre_logits = st.ln_final[-1].float() @ W_U.T
    if lm_bias is not None:
        pre_logits = pre_logits + lm_bias.detach().float()
    logit_values = pre_logits[ltoks] - pre_logits.mean()
    n_l = ltoks.numel()
    n_nodes = n_f + n_layers * T + T + n_l
    A = torch.zeros(n_nodes, n_nodes)
    bias = torch.zeros(n_nodes)
    visited = torch.zeros(n_nodes, dtype=torch.bool)

    # -- the replicated frozen forward --------------------------------------------------
    R = batch_size
    stash = _frozen_forward(im, ids, tcs, R)
    embed = st.embed
    err = torch.stack([st.errors[layer] for layer in range(n_layers)])  # [L, T, d]
    # per layer: decoder rows of active features (scaled by activation) and their positions
    by_layer = {}
    for layer in tcs:
        sel = (features[:, 0] == layer).nonzero().flatten()
        tc = tcs[layer][0]
        W = tc.W_dec.detach().float()[features[sel, 2]] * activations[sel, None]
        by_layer[layer] = (sel, features[sel, 1], W, tc.b_dec.detach().float())

    def run_rows(targets: list[int]) -> None:
        """Compute adjacency rows for node indices ``targets`` (features or logits) in one backward."""
        outs: dict[str, torch.Tensor] = {}
        for r, node in enumerate(targets):
            if node < n_f:
                layer, pos, feat = (int(v) for v in features[node])
                tc, site = tcs[layer]
                seed_name = site
                vec = tc.W_enc.detach()[:, feat]
            else:
                seed_name, pos, vec = "ln_final", T - 1, logit_vecs[node - (n_nodes - n_l)]
            out = outs.get(seed_name)
            if out is None:
                ref = stash[seed_name]
                out = outs[seed_name] = torch.zeros(ref.shape, dtype=ref.dtype)
            out[r, pos] = vec.to(out.dtype)
        names = list(outs)
        inputs = [stash["embed"]] + [stash[f"mlp{layer}"] for layer in range(n_layers)]
        grads = torch.autograd.grad([stash[n] for n in names], inputs, grad_outputs=[outs[n] for n in names],
                                    retain_graph=True, allow_unused=True)
        k = len(targets)
        g_embed = grads[0]
        rows = torch.zeros(k, n_nodes)
        const = torch.zeros(k)
        if g_embed is not None:
            rows[:, n_f + n_layers * T: n_f + n_layers * T + T] = (g_embed[:k].float() * embed).sum(-1)
        for layer in range(n_layers):
            g = grads[1 + layer]
            if g is None:
                continue
            g = g[:k].float()  # [k, T, d]
            rows[:, n_f + layer * T: n_f + (layer + 1) * T] = (g * err[layer]).sum(-1)
            if zero_out is not None:  # the zeroed nodes' output is a constant of every target
                const += (g[:, zeroed] * zero_out[layer]).sum((-2, -1))
            if layer in by_layer:
                sel, pos_sel, W, b_dec = by_layer[layer]
                if sel.numel():
                    rows[:, sel] = (g[:, pos_sel] * W).sum(-1)
                const += (g @ b_dec).sum(-1)
        for r, node in enumerate(targets):
            if node < n_f:
                layer, _pos, feat = (int(v) for v in features[node])
                tc, site = tcs[layer]
                zero = torch.zeros(1, int(tc.W_enc.shape[0]), dtype=tc.W_enc.dtype)
                with torch.no_grad():  # b_enc (and -b_dec W_enc if the SAE subtracts b_dec from its input)
                    const[r] += float(tc.pre_acts(zero)[0, feat])
            elif lm_bias is not None:
                kk = node - (n_nodes - n_l)
                const[r] += float(lm_bias[ltoks[kk]] - lm_bias.mean())
        A[targets] = rows
        bias[targets] = const
        visited[targets] = True

    logit_nodes = list(range(n_nodes - n_l, n_nodes))
    total = n_l + (n_f if max_feature_nodes is None else min(n_f, max_feature_nodes))
    bar = progress_bar(total, "attribution graph rows", progress, unit="row")
    for i in range(0, n_l, R):
        run_rows(logit_nodes[i:i + R])
        bar.update(len(logit_nodes[i:i + R]))
    if max_feature_nodes is None:
        order = list(range(n_f))
        for i in range(0, n_f, R):
            run_rows(order[i:i + R])
            bar.update(len(order[i:i + R]))
    else:
        w = torch.zeros(n_nodes)
        w[n_nodes - n_l:] = lprobs
        remaining = torch.ones(n_f, dtype=torch.bool)
        budget = min(n_f, max_feature_nodes)
        while budget > 0 and bool(remaining.any()):
            infl = compute_influence(normalise_rows(A), w)[:n_f].masked_fill(~remaining, -1.0)
            take = infl.topk(min(R, budget, int(remaining.sum()))).indices.tolist()
            run_rows(take)
            remaining[take] = False
            budget -= len(take)
            bar.update(len(take))
    bar.close()
    stash.clear()

    def text(t: int) -> str:
        if tokenizer is None:
            return str(t)
        out = tokenizer.decode([t])
        return out if isinstance(out, str) else "".join(out)

    toks = [text(int(t)) for t in ids[0]]
    if tokenizer is None:
        prompt = " ".join(toks)
    else:
        decoded = tokenizer.decode([int(t) for t in ids[0]])
        prompt = decoded if isinstance(decoded, str) else "".join(decoded)
    logit_strings = {int(t): text(int(t)) for t in ltoks}
    settings = {"max_n_logits": max_n_logits, "desired_logit_prob": desired_logit_prob, "batch_size": batch_size,
                "max_feature_nodes": max_feature_nodes, "zero_bos": 0 in zeroed,
                "zero_positions": zeroed, "logit_strings": logit_strings}
    return AttributionGraph(
        input_ids=ids[0].cpu(), tokens=toks, n_layers=n_layers, features=features, activations=activations,
        pre_activations=pre_acts, logit_tokens=ltoks.cpu(), logit_probabilities=lprobs.cpu(),
        logit_values=logit_values.cpu(), adjacency=A, bias=bias, visited=visited,
        transcoder_layers=sorted(tcs), error_norms=err.norm(dim=-1), settings=settings, prompt=prompt,
    )
