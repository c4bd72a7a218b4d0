"""Interventions: what a run does to the value at a site.

Layout: :mod:`.base` (the ``Intervention`` base, ``Hook``, the ``{site: intervention}`` mapping),
:mod:`.selection` (selectors and the masks built from them), :mod:`.fitting` (values and sources
against a selection), :mod:`.edits` (``Ablate``, ``Clamp``, ``Patch``, ``Steer``), :mod:`.watch`
(edits that select nothing).

An intervention is a callable ``(value, event) -> Tensor`` registered on a site; it
receives the site's value in the site's canonical layout (see the site catalogue)
and returns the value the model continues with. Interventions are plain tensor
operations over the whole batch, so gradients flow through them.

A list of interventions at one site composes: each receives the previous one's output.

Built-in edits
--------------
``Ablate()``                       zero the selection; ``Ablate(mean=cache_or_tensor)`` mean-ablate;
                                   ``Ablate(resample=True, seed=0)`` take the value of another batch row.
``Clamp(value)``                   set the selection to ``value`` (scalar or tensor).
``Patch(source)``                  copy the selection from another run (an ``ActivationCache`` or a tensor).
``Steer(vector, scale=1.0)``       add ``scale * vector`` to the selection.

Selectors (keyword arguments of every built-in edit; all default to "everything")
--------------------------------------------------------------------------------
Site layouts: residual-like sites ``[batch, pos, d]``, per-head sites ``[batch, pos, head, d_head]``,
attention maps (``attn.scores`` / ``attn.pattern``) ``[batch, head, q_pos, k_pos]``.

``rows=``       batch rows (dim 0): int, list, slice or 1-D LongTensor.
``positions=``  token positions (dim 1; the *query* dim 2 on attention maps):

                * ``None`` / ``"all"`` / ``Positions.ALL`` -- every position (the default);
                * an int, a list / 1-D tensor of ints, or a ``slice`` -- the same positions in every row;
                * a list of per-row lists (ragged allowed) or a 2-D LongTensor ``[batch, k]`` -- row ``b``
                  gets its own positions (row count ``batch``, or 1 to broadcast);
                * ``"new"`` / ``Positions.NEW`` -- every position at or after the prompt length (the tokens
                  that ``model.generate`` produces; in a plain run it selects nothing, and the run warns: below).

                Positions are **absolute**: the index in the full sequence seen so far, prompt (and left
                padding) included. During KV-cache generation each forward covers absolute positions
                ``[offset, offset + n)`` with ``offset = event.position_offset`` (the KV-cache length), so
                ``positions=7`` edits token 7 exactly once, in whichever forward computes it, just as a
                full re-run of the whole sequence would. Negative positions count from the end of the
                sequence seen so far (``offset + n``); they are re-resolved at every decoding step, so for
                generation prefer non-negative positions or ``"new"``. ``slice`` selectors resolve the same
                way (``slice(5, None)`` = position 5 onwards). A position beyond the current sequence
                simply is not selected yet. "The prompt length" for ``"new"`` is the length of the first
                forward of the sequence (a forward with offset 0 that is the first of the run or follows
                a KV-cache step); ``model.generate`` prefills the whole prompt in that forward.
                Caveat: ``generate`` computes the ``logits`` site of its prefill for the last prompt
                token only (``logits_to_keep=1``), so position selectors at ``logits`` see that row
                as position ``offset``; decoding steps (one token each) are exact.
``heads=``      heads (dim 2 on per-head sites, dim 1 on attention maps); an error elsewhere. On ``k``/``v``
                sites these are KV heads.
``index=``      units along the last dim (e.g. residual dims, MLP neurons, ``d_head`` dims; key columns of
                an attention map as computed, i.e. KV-cache slots during generation).

The selection is the product of the selectors. It is built once per call as a boolean mask
(plus index maps, below) and applied with ``torch.where`` over the whole batch: no Python loop
over rows, heads or positions, no in-place writes, so autograd sees every edit.

Values given to ``Clamp`` / ``Steer`` / a precomputed ``Ablate(mean=...)`` broadcast against the
site (numpy rules, right-aligned). Along a selected dim, a size equal to the number of selected
entries is matched to them in the order given (``Clamp(torch.tensor([1., 2.]), index=[7, 3])`` sets
unit 7 to 1 and unit 3 to 2). Along the position dim a longer size is read at the absolute
positions (a ``[P, d]`` steering tensor used during generation). Site-shaped sources (``Patch`` and
reference activations for ``Ablate(mean=...)``) must match the site in every dim except: batch may
be 1 (broadcast) and positions may be longer (read at the absolute positions).

Batch rows restricted by the run (``event.rows``, used by sweeps and ``InstrumentedModel.context(rows=)``)
---------------------------------------------------------------------------------------------------------
When a handler is registered with ``rows`` (a LongTensor), the edit is computed on the sub-batch
``value[rows]`` *as if it were the whole run*, and written back to those rows (``index_copy``,
differentiable); other rows pass through unchanged. So inside the edit, row ``j`` means run row
``rows[j]``: the ``rows=`` selector, per-row positions, a ``Patch`` source or per-row tensors with
``len(rows)`` rows, and resampling all work on the sub-batch (resampling never reads another
variant's rows). A per-row source whose batch is the *full* run's batch (and not ``len(rows)``)
is read at ``source[rows]``.

Selections that select nothing
------------------------------
An edit whose selection is empty in **every** forward of a run changed nothing, and the run says so:
one :class:`EmptySelectionWarning` per run (``im.run``, ``run_with_cache``, an ``im.intervene`` block,
a sweep: one warning for all its variants), naming the site and the edit with its selectors. The
common case is ``Steer(v, positions="new")`` in a plain ``im.run``: ``"new"`` selects only tokens that
``model.generate`` adds inside ``im.intervene``; there it selects nothing in the prompt's forward and
the new tokens afterwards, so generation does not warn. A warning, not an error, because emptiness is
only known while the run runs and its results are valid; make it an error with
``warnings.simplefilter("error", EmptySelectionWarning)``. See :mod:`.watch`.
"""

from mishax_py.interventions.base import Hook, Intervention, InterventionLike, Interventions, as_intervention_list
from mishax_py.interventions.edits import Ablate, Clamp, Patch, SelectiveEdit, Steer
from mishax_py.interventions.selection import IndexLike, Positions, PositionsLike
from mishax_py.interventions.watch import EmptySelectionWarning

__all__ = [
    "Ablate",
    "Clamp",
    "EmptySelectionWarning",
    "Hook",
    "IndexLike",
    "Intervention",
    "InterventionLike",
    "Interventions",
    "Patch",
    "Positions",
    "PositionsLike",
    "SelectiveEdit",
    "Steer",
    "as_intervention_list",
]
