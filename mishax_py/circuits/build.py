"""Building a transcoder attribution graph (the circuit-tracer method, Ameisen et al. 2025).

The *local replacement model* of a prompt replaces every MLP by its transcoder (reading the
family's MLP input, e.g. ``blocks.L.ln2_normalized``, writing its MLP output ``blocks.L.mlp_out``)
plus an *error node* holding what the transcoder misses at each (layer, position), and freezes
the attention patterns and the scales of the normalisations the family lists
(``im.family.frozen_norms``) at their values on the prompt. With those fixed, the replacement
model is *linear* in the feature activations, error nodes and token embeddings, so every node's
pre-activation splits exactly into direct contributions:

* a feature node ``(L, p, i)`` with activation ``a`` contributes ``a * W_dec[i]`` to the MLP
  output of layer ``L`` at position ``p`` -- and, for a cross-layer transcoder, ``a * W_dec[L -> L'][i]``
  to that of every later layer ``L'`` too, so its edge to a target sums its direct effects through every
  layer it writes (circuit-tracer's CLT arithmetic; :mod:`mishax_py.circuits.transcoders`);
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

How it runs (batched backward passes): the prompt runs once through the frozen replacement
model (batch 1), which is then a fixed linear map (:class:`~mishax_py.circuits.frozen.FrozenReplacement`);
each backward pass is a vector-Jacobian product of that map for ``batch_size`` targets at once (the
gradient of a feature pre-activation is seeded by its encoder column at its position; of a logit node,
by the de-meaned unembedding row at the last position), so one pass yields ``batch_size`` rows of the
adjacency matrix. Memory: one forward of the prompt, the ``[batch_size, pos, d_model]`` gradients of
one pass and the computed rows; :func:`estimate_graph_memory` estimates the peak and ``max_memory=``
lowers ``batch_size`` to fit it (``mishax_py.circuits.graph_memory``).

Which features get rows (``max_feature_nodes``, default :data:`DEFAULT_MAX_FEATURE_NODES`): circuit-tracer's
strategy. The logit rows come first; then, while fewer than ``max_feature_nodes`` feature rows are
computed, the features without a row are ranked by their *partial influence* on the logits -- the
logit probabilities flowed back through the normalised ``|rows|`` computed so far
(:func:`~mishax_py.circuits.prune.partial_influence`) -- and the next ``batch_size`` in that ranking
(ties: the earlier feature) get theirs. The ranking is recomputed before the first feature batch and
again whenever the rows computed since the last ranking reach the number of rows it used (at least
one batch): the rows a ranking uses about double from one to the next, so ranking costs about two
passes over the final rows, not one per batch. The cost then grows about
linearly with the prompt: a fixed number of rows, each a backward pass over ``pos`` positions plus one
dot product per active feature. A feature without a row is not a node of the graph: what it writes
joins the error node of its layer and position (the error vector and every edge from it), so each
row still sums exactly to its value and the rows computed are those the uncapped graph has, with
the folded features' edges added to their error nodes (a cross-layer feature's edges, which sum its
effects through every layer it writes, join the error node of its own layer). When the cap exceeds the active features
(short prompts) every feature gets its row and nothing is folded. ``max_feature_nodes=None`` computes
every row (cost quadratic in the prompt's length).

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

from mishax_py.circuits.frozen import FrozenReplacement, norm_scale
from mishax_py.circuits.graph import AttributionGraph
from mishax_py.circuits.graph_memory import fit_batch_size, graph_memory
from mishax_py.circuits.prune import partial_influence
from mishax_py.circuits.transcoders import (
    TranscoderMap,
    Transcoders,
    cross_decoders,
    cross_layer_writes,
    transcoder_features,
    transcoder_map,
    transcoder_output,
)
from mishax_py.devices import materialised_weight
from mishax_py.inputs import Ids, as_ids
from mishax_py.memory import MemoryEstimate
from mishax_py.progress import progress_bar

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel

__all__ = ["DEFAULT_MAX_FEATURE_NODES", "TokenDecoder", "attribution_graph", "estimate_graph_memory", "norm_scale"]

#: The default cap on feature rows (circuit-tracer's ``max_feature_nodes`` as its command line sets it): the
#: graph of a short prompt has every active feature; a long one the 7,500 most influential (module docs).
DEFAULT_MAX_FEATURE_NODES = 7500
#: The ranking of features is recomputed once the rows computed since it reach 1/RERANK_DIVISOR of those it used.
RERANK_DIVISOR = 1
#: Decoder rows padded per position are kept between passes up to this many bytes per block (else rebuilt).
PADDED_BYTES = 256 << 20


class TokenDecoder(Protocol):
    """What the graph uses of a tokenizer: the string of a token id or of the whole prompt (a Hugging Face
    tokenizer is one; its ``decode`` is typed to return a list of strings for a batch of sequences, joined
    here if it does). Its ``bos_token_id``, where it has one, decides the default ``zero_bos``."""

    def decode(self, token_ids: list[int], /) -> str | list[str]: ...


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
        sources: ``{"embed": ..., MLP output site: ...}`` ``[1, pos, d_model]`` in the model's dtype: the values
            the frozen forward's gradients are taken at.
    """

    last_logits: torch.Tensor
    embed: torch.Tensor
    ln_final: torch.Tensor
    feats: dict[int, tuple[torch.Tensor, torch.Tensor]]
    errors: dict[int, torch.Tensor]
    sources: dict[str, torch.Tensor]


@torch.no_grad()
def _prompt_state(im: InstrumentedModel, ids: torch.Tensor, tcs: TranscoderMap) -> _PromptState:
    """One plain forward: features, pre-activations, error vectors, embeddings, final-norm output."""
    out_kind = im.family.mlp_output_kind
    mlp_outs = [im.layer_site(layer, out_kind) for layer in range(im.n_layers)]
    # cache_device: the graph is assembled on the ids' device, whichever layers' devices a split model runs on
    logits, cache = im.run_with_cache(ids, sites=["embed", "ln_final", *mlp_outs, *[s for _, s in tcs.values()]],
                                      cache_device=ids.device)
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
    for layer, (_, f) in feats.items():  # a cross-layer transcoder's features also write to later layers
        for target, w in cross_layer_writes(tcs[layer][0], f).items():
            errors[target] = errors[target] - w.to(errors[target].device)
    sources = {"embed": cache["embed"], **{site: cache[site] for site in mlp_outs}}
    return _PromptState(logits[0, -1].float(), cache["embed"][0].float(), cache["ln_final"][0], feats, errors,
                        sources)


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
            for target, w in cross_layer_writes(tcs[layer][0], f[positions]).items():
                out[target] += w.to(out.device)
            f = f.clone()
            f[positions] = 0
            st.feats[layer] = (pre, f)
        st.errors[layer] = st.errors[layer].clone()
        st.errors[layer][positions] = 0
    return out


@dataclass
class _WriteBlock:
    """Active features of one transcoder layer as they write one layer's MLP output (their own layer's, or a later
    one's for a cross-layer transcoder): the edge from such a feature to a target is its scaled decoder row dotted
    with the target's gradient at that output and the feature's position.

    Attributes:
        features: ``[n]`` indices into the graph's features.
        positions: ``[n]`` their positions.
        rows: ``[n, d_model]`` float32 decoder rows (towards the written layer) times the activations (emptied
            once they are kept padded per position; :meth:`scaled_rows` reads them).
        n_pos: the prompt's length.
    """

    features: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor
    n_pos: int

    def __post_init__(self) -> None:
        # padded per position: slot s of position p holds the s-th feature at p, so one batched product
        # [pos, k, d] @ [pos, d, m] gives every edge of the block (m: the most features at one position)
        n, dev = self.positions.numel(), self.positions.device
        counts = torch.bincount(self.positions, minlength=self.n_pos)
        self.width = int(counts.max()) if n else 0
        start = counts.cumsum(0) - counts
        perm = self.positions.argsort(stable=True)
        self.slots = torch.empty(n, dtype=torch.long, device=dev)
        self.slots[perm] = torch.arange(n, device=dev) - start[self.positions[perm]]
        self._padded: torch.Tensor | None = None
        if self.n_pos * self.width * self.rows.shape[1] * 4 <= PADDED_BYTES:  # kept once: padded, not plain too
            self._padded = self._pad()
            self.rows = self.rows.new_empty(0, self.rows.shape[1])

    def _pad(self) -> torch.Tensor:
        out = self.rows.new_zeros(self.n_pos, self.width, self.rows.shape[1])
        out[self.positions, self.slots] = self.rows
        return out

    def scaled_rows(self) -> torch.Tensor:
        """``[n, d_model]`` the block's decoder rows times the activations."""
        return self._padded[self.positions, self.slots] if self._padded is not None else self.rows

    def edges(self, g: torch.Tensor) -> torch.Tensor:
        """``[k, n]`` edges from this block's features to ``k`` targets with gradients ``g [k, pos, d_model]``."""
        padded = self._padded if self._padded is not None else self._pad()
        prod = torch.bmm(g.transpose(0, 1), padded.transpose(1, 2))  # [pos, k, width]
        return prod[self.positions, :, self.slots].T


def _write_blocks(tcs: TranscoderMap, features: torch.Tensor, activations: torch.Tensor, n_pos: int
                  ) -> dict[int, list[_WriteBlock]]:
    """``{written layer: blocks}``: each transcoder layer's active features with their scaled decoder rows, for
    their own layer and, for a cross-layer transcoder, every later layer they write (:func:`cross_decoders`)."""
    out: dict[int, list[_WriteBlock]] = {}
    for layer, (tc, _) in sorted(tcs.items()):
        sel = (features[:, 0] == layer).nonzero().flatten()
        if not sel.numel():
            continue
        pos, idx, a = features[sel, 1], features[sel, 2], activations[sel, None]
        decoders = {layer: tc.W_dec, **cross_decoders(tc)}
        for target, W in sorted(decoders.items()):
            rows = W.detach()[idx.to(W.device)].float().to(a.device) * a
            out.setdefault(target, []).append(_WriteBlock(sel, pos, rows, n_pos))
    return out


def _unembedding(im: InstrumentedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W_U [vocab, d_model], bias [vocab] or None)``: the linear map from the final norm to the logits, in the
    model's dtype (a float32 copy of a 256k-token unembedding would take 2.4 GB; :func:`_readout` reads it in chunks).

    Read from ``model.get_output_embeddings()`` (the unembedding module of a Hugging Face causal LM), through
    :func:`mishax_py.devices.materialised_weight` (loaded when accelerate offloads it).
    """
    get = getattr(im.model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"attribution_graph reads the unembedding from model.get_output_embeddings(); "
                        f"{type(im.model).__name__} has none")
    bias = materialised_weight(head, "bias") if isinstance(getattr(head, "bias", None), torch.Tensor) else None
    return materialised_weight(head), bias


def _readout(W_U: torch.Tensor, x: torch.Tensor, chunk: int = 32768) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_U @ x, W_U.mean(0))`` in float32 ``[vocab]``, ``[d_model]``, converting ``chunk`` rows at a time."""
    x = x.float().to(W_U.device)
    out = torch.empty(W_U.shape[0], dtype=torch.float32, device=W_U.device)
    total = torch.zeros(W_U.shape[1], dtype=torch.float32, device=W_U.device)
    for i in range(0, W_U.shape[0], chunk):
        block = W_U[i:i + chunk].float()
        out[i:i + chunk] = block @ x
        total += block.sum(0)
    return out, total / W_U.shape[0]


def estimate_graph_memory(
    im: InstrumentedModel,
    ids: Ids,
    transcoders: Transcoders,
    *,
    batch_size: int = 64,
    max_feature_nodes: int | None = DEFAULT_MAX_FEATURE_NODES,
    max_n_logits: int = 10,
) -> MemoryEstimate:
    """The estimated peak memory of :func:`attribution_graph` with these arguments, by part, before building it.

    The estimate depends on how many features are active on the prompt, so one plain forward of the prompt
    (batch 1, no gradients) counts them; nothing else runs. The formula and its parts are in
    :mod:`mishax_py.circuits.graph_memory`; ``attribution_graph`` checks the same estimate against
    ``max_memory=`` before it allocates the rows.
    """
    ids = as_ids(ids, im)
    tcs = transcoder_map(im, transcoders)
    with torch.no_grad():
        _, cache = im.run_with_cache(ids[:1], sites=[site for _, site in tcs.values()])
        n_f = sum(int((transcoder_features(tc, cache[site][0])[1] != 0).sum()) for tc, site in tcs.values())
    d_sae = max(int(tc.W_dec.shape[0]) for tc, _ in tcs.values())
    return graph_memory(im, ids.shape[1], n_f, batch_size=batch_size, max_feature_nodes=max_feature_nodes,
                        n_logits=max_n_logits, d_sae=d_sae, n_transcoders=len(tcs))


def attribution_graph(
    im: InstrumentedModel,
    ids: Ids,
    transcoders: Transcoders,
    *,
    tokenizer: TokenDecoder | None = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    logit_tokens: Sequence[int] | None = None,
    max_feature_nodes: int | None = DEFAULT_MAX_FEATURE_NODES,
    batch_size: int = 64,
    progress: bool | None = None,
    zero_bos: bool | None = None,
    bos_token_id: int | None = None,
    zero_positions: int | slice | None = None,
    max_memory: int | str | None = None,
) -> AttributionGraph:
    """Build the attribution graph of one prompt (see the module docs).

    A single-prompt analysis, not a clean/corrupt study: it explains the model's own next-token
    logits on ``ids``.

    Args:
        im: the instrumented model.
        ids: the prompt, token ids ``[pos]`` or ``[1, pos]``.
        transcoders: ``{layer: transcoder}`` or a list of transcoders with ``site`` (an MLP
            input kind of the family, e.g. ``blocks.L.ln2_normalized``) and ``output_site``
            (its MLP output, ``blocks.L.mlp_out``), or a cross-layer transcoder (``saes.CrossLayerTranscoder``:
            each layer's features also write every later layer's MLP output). Layers without one keep their
            whole MLP output (less what earlier layers' features write there) as error nodes.
        tokenizer: optional, for token strings, the prompt string (its ``decode`` of the whole
            prompt) and the BOS id (its ``bos_token_id``).
        max_n_logits, desired_logit_prob: logit nodes are the most probable next tokens
            until their probabilities add up to ``desired_logit_prob`` (at most ``max_n_logits``).
        logit_tokens: explicit logit-node tokens instead (the first is the target logit).
        max_feature_nodes: compute rows for at most this many features, chosen greedily by their
            influence on the logits through the rows computed so far (circuit-tracer's strategy; module
            docs); the others join the error nodes. Default :data:`DEFAULT_MAX_FEATURE_NODES` (7,500);
            ``None``: every active feature (cost quadratic in the prompt's length).
        batch_size: targets per backward pass (at most; ``max_memory`` may lower it, with a warning).
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
        max_memory: the memory budget (bytes or ``"8GiB"``; default :func:`mishax_py.memory.memory_budget`);
            checked against :func:`estimate_graph_memory` before the rows are allocated.

    Raises:
        ValueError: a batch of prompts, ``batch_size < 1``, transcoders that do not fit the
            model's MLPs, ``logit_tokens`` outside the vocabulary, ``zero_positions`` a negative
            int or longer than the prompt.
        TypeError: ``zero_positions`` neither an int nor a slice.
        mishax_py.memory.MemoryBudgetError: the graph does not fit ``max_memory`` even one target per pass.
    """
    ids = as_ids(ids, im)
    if ids.shape[0] != 1:
        raise ValueError(f"attribution_graph takes one prompt, got a batch of {ids.shape[0]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_feature_nodes is not None and max_feature_nodes < 0:
        raise ValueError(f"max_feature_nodes must be >= 0 or None, got {max_feature_nodes}")
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
        feat_rows.append(torch.cat([torch.full((nz.shape[0], 1), layer, device=nz.device), nz], 1))
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
        share = torch.tensor(desired_logit_prob, device=probs.device)
        k = int(torch.searchsorted(top.values.cumsum(0), share).item()) + 1
        ltoks = top.indices[: max(1, min(k, max_n_logits))]
    lprobs = probs[ltoks]
    pre_logits, W_U_mean = _readout(W_U, st.ln_final[-1])
    logit_vecs = W_U[ltoks.to(W_U.device)].float() - W_U_mean  # de-meaned unembedding rows [n_logits, d_model]
    if lm_bias is not None:
        pre_logits = pre_logits + lm_bias.detach().float()
    logit_values = pre_logits[ltoks] - pre_logits.mean()
    n_l = ltoks.numel()
    dev = st.embed.device
    cap = n_f if max_feature_nodes is None else min(n_f, int(max_feature_nodes))
    d_sae = max((int(tc.W_dec.shape[0]) for tc, _ in tcs.values()), default=0)
    R, _est = fit_batch_size(im, T, n_f, batch_size=batch_size, max_feature_nodes=max_feature_nodes,
                             n_logits=n_l, d_sae=d_sae, n_transcoders=len(tcs), max_memory=max_memory)

    # -- the frozen replacement model, linearised once (batch 1) ------------------------
    frozen = FrozenReplacement(im, ids, tcs, st.sources)
    embed = st.embed
    err = torch.stack([st.errors[layer] for layer in range(n_layers)])  # [L, T, d]
    n_src = n_f + n_layers * T + T  # the rows' columns: features, error nodes, token nodes
    writes = _write_blocks(tcs, features, activations, T)
    b_dec = {layer: tc.b_dec.detach().float().to(dev) for layer, (tc, _) in tcs.items()}
    with torch.no_grad():  # b_enc (and -b_dec W_enc where the transcoder subtracts b_dec from its input)
        enc_const = {layer: tc.pre_acts(torch.zeros(1, int(tc.W_enc.shape[0]), dtype=tc.W_enc.dtype,
                                                    device=tc.W_enc.device))[0].float().to(dev)
                     for layer, (tc, _) in tcs.items()}
    logit_const = (lm_bias[ltoks].float() - lm_bias.float().mean()).to(dev) if lm_bias is not None else None
    target_of = {site: i for i, site in enumerate(frozen.targets)}

    # the cotangents of one pass, zeroed again after each (allocating them per pass costs as much as a layer)
    cot_buf = [torch.zeros(R, *frozen.target_shape(site), dtype=frozen.target_dtype(site), device=dev)
               for site in frozen.targets]

    def compute(feats: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Write the rows of features ``feats`` then logit nodes ``logits`` into ``rows`` ``[k, n_src]`` (zeros) in
        one pass; returns their constants ``[k]``."""
        k = feats.numel() + logits.numel()
        cots = [c[:k] for c in cot_buf]
        seeded: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        const = torch.zeros(k, device=dev)
        for layer, (tc, site) in tcs.items():
            r = (features[feats, 0] == layer).nonzero().flatten()
            if r.numel():
                fi = features[feats[r]]
                W_enc = tc.W_enc.detach()  # the transcoder's device may not be the graph's
                c = cots[target_of[site]]
                c[r, 0, fi[:, 1]] = W_enc[:, fi[:, 2].to(W_enc.device)].T.to(device=dev, dtype=c.dtype)
                seeded.append((cots[target_of[site]], r, fi[:, 1]))
                const[r] += enc_const[layer][fi[:, 2]]
        if logits.numel():
            r = torch.arange(feats.numel(), k, device=dev)
            c = cots[target_of["ln_final"]]
            c[r, 0, T - 1] = logit_vecs[logits].to(device=dev, dtype=c.dtype)
            seeded.append((cots[target_of["ln_final"]], r, torch.full_like(r, T - 1)))
            if logit_const is not None:
                const[r] += logit_const[logits]
        grads = frozen.backward(cots)
        for c, r, p in seeded:
            c[r, 0, p] = 0
        g = grads[0][:, 0].float()
        rows[:, n_f + n_layers * T:] = torch.einsum("ktd,td->kt", g, embed)
        for layer in range(n_layers):
            g = grads[1 + layer][:, 0].float()  # [k, T, d]
            rows[:, n_f + layer * T: n_f + (layer + 1) * T] = torch.einsum("ktd,td->kt", g, err[layer])
            if zero_out is not None:  # the zeroed nodes' output is a constant of every target
                const += torch.einsum("kpd,pd->k", g[:, zeroed], zero_out[layer].to(dev))
            if layer in b_dec:
                const += g.sum(1) @ b_dec[layer]
            for block in writes.get(layer, ()):  # the features that write this layer's MLP output
                rows[:, block.features] += block.edges(g)
        return const

    # -- rows: the logit nodes, then features by influence (the cap) -------------------
    n_rows = n_l + cap
    rows = torch.zeros(n_rows, n_src, device=dev)
    row_bias = torch.zeros(n_rows, device=dev)
    row_sums = torch.zeros(n_rows, device=dev)
    row_src = torch.full((n_rows,), -1, dtype=torch.long, device=dev)  # a row's own source column (-1: logit)
    weights = torch.zeros(n_rows, device=dev)
    weights[:n_l] = lprobs.to(dev)
    done = 0

    def store(feats: torch.Tensor, logits: torch.Tensor) -> None:
        nonlocal done
        first = n_l + done if feats.numel() else int(logits[0])
        at = slice(first, first + feats.numel() + logits.numel())
        row_bias[at] = compute(feats, logits, rows[at])
        row_sums[at] = rows[at].abs().sum(1)
        if feats.numel():
            row_src[at] = feats
            done += feats.numel()
        bar.update(feats.numel() + logits.numel())

    bar = progress_bar(n_rows, "attribution graph rows", progress, unit="row")
    none = torch.zeros(0, dtype=torch.long, device=dev)
    for i in range(0, n_l, R):
        store(none, torch.arange(i, min(i + R, n_l), device=dev))
    if cap == n_f:  # every feature: no ranking needed, the rows do not depend on the order
        for i in range(0, n_f, R):
            store(torch.arange(i, min(i + R, n_f), device=dev), none)
    else:
        computed = torch.zeros(n_f, dtype=torch.bool, device=dev)
        ranked_at, order = -1, none
        while done < cap:
            if ranked_at < 0 or (n_l + done) - ranked_at >= max(R, ranked_at // RERANK_DIVISOR):
                # feature columns only (the row sums are over every column)
                infl = partial_influence(rows[: n_l + done, :n_f], row_src[: n_l + done], weights[: n_l + done],
                                         row_sums=row_sums[: n_l + done])
                order = infl.masked_fill(computed, -1.0).sort(descending=True, stable=True).indices
                ranked_at = n_l + done
            picked = order[~computed[order]][: min(R, cap - done)]  # skipping those computed since the ranking
            computed[picked] = True
            store(picked, none)
    bar.close()

    # -- the graph: computed features are its feature nodes; the others join the error nodes -----------
    order_done = row_src[n_l:]
    keep = order_done.sort().values  # feature indices with a row, in the features' order
    folded = torch.ones(n_f, dtype=torch.bool, device=dev)
    folded[keep] = False
    n_keep = keep.numel()
    n_nodes = n_keep + n_layers * T + T + n_l
    n_cols = n_keep + n_layers * T + T
    dest = torch.empty(n_rows, dtype=torch.long, device=dev)
    dest[:n_l] = torch.arange(n_nodes - n_l, n_nodes, device=dev)
    dest[n_l:] = torch.searchsorted(keep, order_done)
    fold_idx = features[folded, 0] * T + features[folded, 1]  # each folded feature's error node
    fold_cols = folded.nonzero().flatten()
    A = torch.zeros(n_nodes, n_nodes, device=dev)
    bias = torch.zeros(n_nodes, device=dev)
    for i in range(0, n_rows, 1024):
        blk = rows[i:i + 1024]
        out = torch.cat([blk[:, keep], blk[:, n_f:]], 1)
        if fold_cols.numel():
            out[:, n_keep:n_keep + n_layers * T].index_add_(1, fold_idx, blk[:, fold_cols])
        A[dest[i:i + 1024], :n_cols] = out
    bias[dest] = row_bias
    visited = torch.zeros(n_nodes, dtype=torch.bool, device=dev)
    visited[dest] = True
    if fold_cols.numel():  # the error vectors now hold what the folded features wrote
        err = err.clone()
        for layer, blocks in writes.items():
            for block in blocks:
                sel = folded[block.features]
                if bool(sel.any()):
                    err[layer].index_add_(0, block.positions[sel], block.scaled_rows()[sel])
    features, activations, pre_acts = features[keep], activations[keep], pre_acts[keep]

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
    settings = {"max_n_logits": max_n_logits, "desired_logit_prob": desired_logit_prob, "batch_size": R,
                "max_feature_nodes": max_feature_nodes, "n_active_features": n_f,
                "folded_features": n_f - n_keep, "zero_bos": 0 in zeroed,
                "zero_positions": zeroed, "logit_strings": logit_strings}
    return AttributionGraph(
        input_ids=ids[0].cpu(), tokens=toks, n_layers=n_layers, features=features, activations=activations,
        pre_activations=pre_acts, logit_tokens=ltoks.cpu(), logit_probabilities=lprobs.cpu(),
        logit_values=logit_values.cpu(), adjacency=A, bias=bias, visited=visited,
        transcoder_layers=sorted(tcs), error_norms=err.norm(dim=-1), settings=settings, prompt=prompt,
    )
