"""Seeded synthetic tasks for the bundled tiny Gemma 2 (``mishax_py.zoo``).

The bundled model ``gemma2-tiny`` is trained on exactly these generators, so every
interpretability tool has a known mechanism to find. The module depends only on
torch: tests, the demo, the training script and SAE training all import it.

Vocabulary layout (shared with the bundled word-level tokenizer, ``VOCAB_SIZE`` = 133)::

    0 <pad>   1 <eos>   2 <bos>   3 <unk>   4 ?  (query marker of the recall task)
    5 .. 68   k0 .. k63   "key" tokens
    69 .. 132 v0 .. v63   "value" tokens

All ids >= ``CONTENT_START`` (5) are *content* tokens; the induction task draws from
all of them, the recall task draws keys and values from the two disjoint halves.

Tasks
-----
Induction (``induction_batch``)
    ``<bos> s1 .. sL s1 .. sL`` with ``L`` in ``[min_len, max_len]`` and ``s`` a
    uniformly random sequence of *distinct* content tokens (distinct so that the
    continuation of the repeat is unambiguous; with repeats allowed a token seen
    twice in the first half would have two valid continuations). Scored targets:
    ``s2 .. sL`` of the repeat, i.e. every repeated token except the first, which is
    not predictable. Expected mechanism: a previous-token head (layer 0, a sliding
    layer: the previous token is always inside the window) writes "my previous token
    is s_j" into position of ``s_{j+1}``; an induction head in a later *global* layer
    (the repeat sits ``L + 1`` positions back, beyond the sliding window for long
    ``L``) at the repeated ``s_j`` attends to that position and copies ``s_{j+1}``.

Key-value recall (``recall_batch``)
    ``<bos> k1 v1 k2 v2 .. kn vn ? k_i`` -> ``v_i`` with ``n`` in ``[min_pairs,
    max_pairs]``, distinct keys from ``k0..k63`` and values (repeats allowed) from
    ``v0..v63``. One scored target per row: the value after the query key. Expected
    mechanism: the same two-step circuit as induction, specialised by token ranges --
    the previous-token head stores ``k_j`` at the position of ``v_j``; at the final
    ``k_i`` a global-layer head matches "previous token == k_i", attends to ``v_i`` and
    its OV circuit copies the value into the logits. Unlike induction, only one
    earlier occurrence of the query exists and the answer must come from the value
    range, so the model can also use the ``?`` marker / key range as context.

Batches are right-padded with ``<pad>``; because the model is causal, padding after a
row never changes the logits of the row's real tokens. ``TaskBatch.labels`` follows
the Hugging Face convention (aligned with ``input_ids``, ``-100`` where unscored), so
``model(input_ids, attention_mask=..., labels=batch.labels).loss`` trains on exactly
the scored targets.

``random_induction_batch`` / ``random_induction_clean_corrupt`` build the same induction
prompts over any vocabulary (for checkpoints not trained on these tasks; ``mishax-py demo
--model DIR``).

Why over 500 lines: every task generator, its clean/corrupt pairing and the accuracy helpers
share ``TaskBatch`` and the vocabulary layout above; half the file is their documentation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "PAD_ID",
    "EOS_ID",
    "BOS_ID",
    "UNK_ID",
    "QUERY_ID",
    "CONTENT_START",
    "N_KEYS",
    "N_VALUES",
    "KEY_START",
    "VALUE_START",
    "VOCAB_SIZE",
    "IGNORE_INDEX",
    "token_names",
    "TaskBatch",
    "induction_batch",
    "recall_batch",
    "induction_clean_corrupt",
    "recall_clean_corrupt",
    "random_induction_batch",
    "random_induction_clean_corrupt",
    "predict_logits",
    "correct_mask",
    "batch_accuracy",
    "induction_accuracy",
    "recall_accuracy",
]

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3
QUERY_ID = 4
CONTENT_START = 5
N_KEYS = 64
N_VALUES = 64
KEY_START = CONTENT_START
VALUE_START = KEY_START + N_KEYS
VOCAB_SIZE = VALUE_START + N_VALUES  # 133
N_CONTENT = VOCAB_SIZE - CONTENT_START
IGNORE_INDEX = -100  # Hugging Face's "not scored" label


def token_names() -> list[str]:
    """Return the readable name of every token id, index = id (length ``VOCAB_SIZE``)."""
    names = ["<pad>", "<eos>", "<bos>", "<unk>", "?"]
    names += [f"k{i}" for i in range(N_KEYS)]
    names += [f"v{i}" for i in range(N_VALUES)]
    assert len(names) == VOCAB_SIZE
    return names


@dataclass
class TaskBatch:
    """A right-padded batch of task sequences with the positions that are scored.

    Attributes:
        input_ids: ``[n, T]`` long token ids, right-padded with ``PAD_ID``.
        attention_mask: ``[n, T]`` long, 1 on real tokens, 0 on padding.
        labels: ``[n, T]`` long, Hugging Face convention: ``labels[i, p]`` is the token
            the model must predict *at position p - 1*; ``IGNORE_INDEX`` where unscored.
        lengths: ``[n]`` long, number of real tokens per row.
        info: task-specific per-row tensors (e.g. ``half_len`` for induction,
            ``n_pairs`` / ``answer`` for recall), each with leading dim ``n``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor
    info: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def target_mask(self) -> torch.Tensor:
        """``[n, T]`` bool aligned with the logits: True where logits at p are scored."""
        m = torch.zeros_like(self.labels, dtype=torch.bool)
        m[:, :-1] = self.labels[:, 1:] != IGNORE_INDEX
        return m

    @property
    def targets(self) -> torch.Tensor:
        """``[n, T]`` long aligned with the logits: the next token (``PAD_ID`` at the end)."""
        t = torch.full_like(self.input_ids, PAD_ID)
        t[:, :-1] = self.input_ids[:, 1:]
        return t

    def to(self, device: torch.device | str) -> TaskBatch:
        """Return a copy with every tensor moved to ``device``."""
        return TaskBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.lengths.to(device),
            {k: v.to(device) for k, v in self.info.items()},
        )

    def __getitem__(self, rows: slice | torch.Tensor | list[int]) -> TaskBatch:
        """Select rows (e.g. ``batch[:32]``); padding columns are kept."""
        return TaskBatch(
            self.input_ids[rows],
            self.attention_mask[rows],
            self.labels[rows],
            self.lengths[rows],
            {k: v[rows] for k, v in self.info.items()},
        )


def _generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator:
    """The generator to draw from: ``generator``, else a fresh one seeded with ``seed`` (default 0)."""
    if generator is not None:
        if seed is not None:
            raise ValueError("pass either generator= or seed=, not both")
        return generator
    g = torch.Generator()
    g.manual_seed(0 if seed is None else seed)
    return g


def _lengths(
    n: int, fixed: int | None, lo: int, hi: int, g: torch.Generator, what: str, lo_limit: int, hi_limit: int
) -> torch.Tensor:
    """``[n]`` per-row sizes: all ``fixed`` if given, else uniform in ``[lo, hi]`` (validated)."""
    if fixed is not None:
        lo = hi = fixed
    if not (lo_limit <= lo <= hi <= hi_limit):
        raise ValueError(f"{what} must satisfy {lo_limit} <= min <= max <= {hi_limit}, got [{lo}, {hi}]")
    return torch.randint(lo, hi + 1, (n,), generator=g)


def _distinct(n: int, k: int, start: int, size: int, g: torch.Generator) -> torch.Tensor:
    """``[n, k]`` rows of ``k`` distinct ids drawn uniformly from ``[start, start + size)``."""
    return torch.rand(n, size, generator=g).argsort(dim=1)[:, :k] + start


def _pack(rows: list[torch.Tensor], scored: list[torch.Tensor], info: dict[str, torch.Tensor]) -> TaskBatch:
    """Right-pad 1-D rows into a ``TaskBatch``; ``scored[i]`` are the label positions of row i."""
    n, t = len(rows), max(int(r.numel()) for r in rows)
    ids = torch.full((n, t), PAD_ID, dtype=torch.long)
    att = torch.zeros((n, t), dtype=torch.long)
    labels = torch.full((n, t), IGNORE_INDEX, dtype=torch.long)
    for i, (r, s) in enumerate(zip(rows, scored, strict=True)):
        ids[i, : r.numel()] = r
        att[i, : r.numel()] = 1
        labels[i, s] = r[s]
    lengths = torch.tensor([r.numel() for r in rows], dtype=torch.long)
    return TaskBatch(ids, att, labels, lengths, info)


def induction_batch(
    n: int,
    *,
    seq_len: int | None = None,
    min_len: int = 4,
    max_len: int = 24,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> TaskBatch:
    """Repeated-random-sequence prompts ``<bos> s1..sL s1..sL``; scored on ``s2..sL`` of the repeat.

    Args:
        n: number of rows.
        seq_len: if given, every row uses this half-length ``L``; otherwise ``L`` is
            drawn per row uniformly from ``[min_len, max_len]`` and rows are right-padded.
        min_len, max_len: half-length range (2 <= L <= number of content tokens).
        generator, seed: randomness source (a seed gives a fresh generator; default seed 0).

    Returns:
        ``TaskBatch`` with ``input_ids`` ``[n, 2*max(L)+1]``, ``L - 1`` scored targets per row
        and ``info["half_len"]`` ``[n]``.
    """
    g = _generator(generator, seed)
    lens = _lengths(n, seq_len, min_len, max_len, g, "induction half-length", 2, N_CONTENT)
    first = _distinct(n, int(lens.max()), CONTENT_START, N_CONTENT, g)
    rows, scored = [], []
    bos = torch.tensor([BOS_ID])
    for i in range(n):
        L = int(lens[i])
        s = first[i, :L]
        rows.append(torch.cat([bos, s, s]))
        scored.append(torch.arange(L + 2, 2 * L + 1))  # repeat tokens s2..sL (positions L+2 .. 2L)
    return _pack(rows, scored, {"half_len": lens})


def recall_batch(
    n: int,
    *,
    n_pairs: int | None = None,
    min_pairs: int = 2,
    max_pairs: int = 24,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> TaskBatch:
    """Key-value recall prompts ``<bos> k1 v1 .. kn vn ? k_i``; scored on the answer ``v_i``.

    The answer ``v_i`` is appended as the last token so that ``labels`` can hold it; a
    model is scored on its prediction at the query key (position ``-2`` of the row).

    Args:
        n: number of rows.
        n_pairs: if given, every row has this many pairs; else drawn per row from
            ``[min_pairs, max_pairs]`` (1 <= pairs <= ``N_KEYS``).
        generator, seed: randomness source (a seed gives a fresh generator; default seed 0).

    Returns:
        ``TaskBatch`` with ``input_ids`` ``[n, 2*max(pairs)+4]`` and ``info`` holding
        ``n_pairs``, ``query_index`` (i, zero-based pair index), ``answer`` (value id) and
        ``answer_pos`` (position of the query key, whose logits are scored), all ``[n]``.
    """
    g = _generator(generator, seed)
    npairs = _lengths(n, n_pairs, min_pairs, max_pairs, g, "recall pairs", 1, N_KEYS)
    m = int(npairs.max())
    keys = _distinct(n, m, KEY_START, N_KEYS, g)
    values = torch.randint(VALUE_START, VALUE_START + N_VALUES, (n, m), generator=g)
    qidx = (torch.rand(n, generator=g) * npairs).long()
    rows, scored = [], []
    for i in range(n):
        k = int(npairs[i])
        body = torch.stack([keys[i, :k], values[i, :k]], dim=1).reshape(-1)
        q = int(qidx[i])
        tail = torch.tensor([QUERY_ID, int(keys[i, q]), int(values[i, q])])
        rows.append(torch.cat([torch.tensor([BOS_ID]), body, tail]))
        scored.append(torch.tensor([2 * k + 3]))
    info = {
        "n_pairs": npairs,
        "query_index": qidx,
        "answer": values[torch.arange(n), qidx],
        "answer_pos": 2 * npairs + 2,
    }
    return _pack(rows, scored, info)


def induction_clean_corrupt(
    n: int,
    *,
    seq_len: int = 16,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> tuple[TaskBatch, TaskBatch]:
    """Aligned clean/corrupt induction prompts for activation patching.

    clean:   ``<bos> A A``  (A: ``seq_len`` distinct random content tokens)
    corrupt: ``<bos> B A``  with B re-randomised from tokens *not* in A, so the repeat
             half is identical token-for-token but unpredictable (no earlier copy exists).

    Both batches share the same length, positions and scored targets (the clean answers;
    ``corrupt.labels`` equals ``clean.labels``). Patching clean activations of the
    induction circuit into the corrupt run should restore the clean predictions.

    Returns:
        ``(clean, corrupt)``, each a ``TaskBatch`` with ``input_ids`` ``[n, 2*seq_len+1]``.
    """
    g = _generator(generator, seed)
    clean = induction_batch(n, seq_len=seq_len, generator=g)
    L = seq_len
    if 2 * L > N_CONTENT:
        raise ValueError(f"seq_len must be <= {N_CONTENT // 2} so the corrupt half avoids the clean tokens")
    corrupt_ids = clean.input_ids.clone()
    for i in range(n):
        a = clean.input_ids[i, 1 : L + 1]
        allowed = torch.ones(VOCAB_SIZE, dtype=torch.bool)
        allowed[:CONTENT_START] = False
        allowed[a] = False
        pool = allowed.nonzero().squeeze(1)
        corrupt_ids[i, 1 : L + 1] = pool[torch.randperm(pool.numel(), generator=g)[:L]]
    att, labels, lengths = clean.attention_mask.clone(), clean.labels.clone(), clean.lengths.clone()
    corrupt = TaskBatch(corrupt_ids, att, labels, lengths, dict(clean.info))
    return clean, corrupt


def recall_clean_corrupt(
    n: int,
    *,
    n_pairs: int = 8,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> tuple[TaskBatch, TaskBatch]:
    """Aligned clean/corrupt recall prompts differing only in the query key.

    clean:   ``<bos> k1 v1 .. kn vn ? k_i`` -> ``v_i``
    corrupt: the same context with query ``k_j`` (j != i, and ``v_j != v_i``) -> ``v_j``

    ``info["answer"]`` / ``info["answer_pos"]`` give each batch's own answer; a natural
    metric is ``logit[v_i] - logit[v_j]`` at ``answer_pos``. Patching the query-key
    position's activations from clean into corrupt moves the answer from ``v_j`` to ``v_i``.

    Returns:
        ``(clean, corrupt)``, each a ``TaskBatch`` with ``input_ids`` ``[n, 2*n_pairs+4]``.
    """
    if n_pairs < 2:
        raise ValueError("recall_clean_corrupt needs n_pairs >= 2")
    g = _generator(generator, seed)
    clean = recall_batch(n, n_pairs=n_pairs, generator=g)
    corrupt_ids = clean.input_ids.clone()
    answers = clean.info["answer"].clone()
    qidx = clean.info["query_index"].clone()
    pos = int(clean.info["answer_pos"][0])
    for i in range(n):
        vals = clean.input_ids[i, 2 : 2 * n_pairs + 1 : 2]
        choices = [j for j in range(n_pairs) if int(vals[j]) != int(clean.info["answer"][i])]
        if not choices:  # every value equal to the answer: give this pair a different value
            j = (int(qidx[i]) + 1) % n_pairs
            new_v = VALUE_START + (int(vals[j]) - VALUE_START + 1) % N_VALUES
            clean.input_ids[i, 2 + 2 * j] = new_v
            corrupt_ids[i, 2 + 2 * j] = new_v
            choices = [j]
        j = choices[int(torch.randint(len(choices), (1,), generator=g))]
        corrupt_ids[i, pos] = clean.input_ids[i, 1 + 2 * j]
        corrupt_ids[i, pos + 1] = clean.input_ids[i, 2 + 2 * j]
        answers[i] = clean.input_ids[i, 2 + 2 * j]
        qidx[i] = j
    corrupt_labels = torch.full_like(clean.labels, IGNORE_INDEX)
    corrupt_labels[:, pos + 1] = corrupt_ids[:, pos + 1]
    info = dict(clean.info, answer=answers, query_index=qidx)
    corrupt = TaskBatch(
        corrupt_ids, clean.attention_mask.clone(), corrupt_labels, clean.lengths.clone(), info
    )
    return clean, corrupt


def _random_repeats(
    n: int, half: int, content_ids: torch.Tensor, bos_id: int | None, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean ``[bos] A A`` and corrupt ``[bos] B A`` rows ``[n, offset + 2*half]`` (A, B disjoint draws)."""
    pool = torch.as_tensor(content_ids, dtype=torch.long).flatten()
    if half < 2 or 2 * half > pool.numel():
        raise ValueError(f"half must satisfy 2 <= half <= {pool.numel() // 2} (content pool of {pool.numel()})")
    perm = torch.rand(n, pool.numel(), generator=g).argsort(1)
    a, b = pool[perm[:, :half]], pool[perm[:, half : 2 * half]]
    head = [] if bos_id is None else [torch.full((n, 1), bos_id, dtype=torch.long)]
    return torch.cat([*head, a, a], 1), torch.cat([*head, b, a], 1)


def _repeat_batch(ids: torch.Tensor, half: int, offset: int) -> TaskBatch:
    """A ``TaskBatch`` of unpadded ``[bos] s s`` rows scored on the repeat's 2nd..last tokens."""
    n, t = ids.shape
    labels = torch.full_like(ids, IGNORE_INDEX)
    scored = torch.arange(offset + half + 1, offset + 2 * half)
    labels[:, scored] = ids[:, scored]
    att = torch.ones_like(ids)
    lengths = torch.full((n,), t, dtype=torch.long)
    return TaskBatch(ids, att, labels, lengths, {"half_len": torch.full((n,), half, dtype=torch.long)})


def random_induction_batch(
    n: int,
    *,
    half: int,
    content_ids: torch.Tensor,
    bos_id: int | None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> TaskBatch:
    """Induction prompts ``[bos] s1..sL s1..sL`` over any vocabulary (for models not trained on these tasks).

    Like :func:`induction_batch` but the ``L = half`` distinct tokens are drawn from ``content_ids``
    (e.g. a checkpoint's ordinary tokens) and the BOS token is optional (``bos_id=None``: rows start
    with ``s1``). Scored targets: ``s2..sL`` of the repeat.

    Returns:
        ``TaskBatch`` with ``input_ids [n, offset + 2*half]`` (``offset`` 1 with BOS, else 0), no
        padding, and ``info["half_len"] [n]``.
    """
    g = _generator(generator, seed)
    clean, _ = _random_repeats(n, half, content_ids, bos_id, g)
    return _repeat_batch(clean, half, 0 if bos_id is None else 1)


def random_induction_clean_corrupt(
    n: int,
    *,
    half: int,
    content_ids: torch.Tensor,
    bos_id: int | None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> tuple[TaskBatch, TaskBatch]:
    """Aligned clean ``[bos] A A`` / corrupt ``[bos] B A`` prompts over any vocabulary.

    Like :func:`induction_clean_corrupt`: ``A`` and ``B`` are disjoint sets of ``half`` distinct
    tokens from ``content_ids``; both batches carry the clean batch's labels.
    """
    g = _generator(generator, seed)
    clean_ids, corrupt_ids = _random_repeats(n, half, content_ids, bos_id, g)
    clean = _repeat_batch(clean_ids, half, 0 if bos_id is None else 1)
    corrupt = TaskBatch(corrupt_ids, clean.attention_mask.clone(), clean.labels.clone(), clean.lengths.clone(),
                        dict(clean.info))  # fmt: skip
    return clean, corrupt


def _device_of(model: Any) -> torch.device:
    """The device of ``model``'s first parameter (CPU if it has none)."""
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


@torch.no_grad()
def predict_logits(model: Callable[..., Any], batch: TaskBatch, *, batch_size: int = 256) -> torch.Tensor:
    """Run ``model`` over ``batch`` in chunks; returns logits ``[n, T, vocab]`` (float32, CPU).

    ``model`` is a Hugging Face causal LM (anything returning ``.logits``) or a callable
    returning the logits tensor; it is called as ``model(input_ids=..., attention_mask=...)``.
    """
    device = _device_of(model)
    outs = []
    for start in range(0, len(batch), batch_size):
        part = batch[start : start + batch_size].to(device)
        out = model(input_ids=part.input_ids, attention_mask=part.attention_mask)
        logits = out.logits if hasattr(out, "logits") else out
        outs.append(logits.float().cpu())
    return torch.cat(outs)


def correct_mask(model: Callable[..., Any], batch: TaskBatch, *, batch_size: int = 256) -> torch.Tensor:
    """``[n, T]`` bool: True where the scored next-token prediction (argmax) is right.

    Unscored positions are False; combine with ``batch.target_mask`` to count.
    """
    pred = predict_logits(model, batch, batch_size=batch_size).argmax(-1)
    return (pred == batch.targets) & batch.target_mask


def batch_accuracy(model: Callable[..., Any], batch: TaskBatch, *, batch_size: int = 256) -> float:
    """Fraction of scored targets in ``batch`` that ``model`` predicts (greedy argmax)."""
    hits = correct_mask(model, batch, batch_size=batch_size)
    return float(hits.sum()) / max(int(batch.target_mask.sum()), 1)


def induction_accuracy(
    model: Callable[..., Any],
    n: int = 256,
    *,
    seed: int = 12345,
    min_len: int = 4,
    max_len: int = 24,
    seq_len: int | None = None,
    batch_size: int = 256,
) -> float:
    """Next-token accuracy on the repeated half (excluding its first token) of fresh induction prompts.

    Uses ``induction_batch(n, seed=seed, ...)``; pick a seed the model was not trained on
    (the training script draws from a generator seeded differently).
    """
    batch = induction_batch(n, seq_len=seq_len, min_len=min_len, max_len=max_len, seed=seed)
    return batch_accuracy(model, batch, batch_size=batch_size)


def recall_accuracy(
    model: Callable[..., Any],
    n: int = 256,
    *,
    seed: int = 12345,
    min_pairs: int = 2,
    max_pairs: int = 24,
    n_pairs: int | None = None,
    batch_size: int = 256,
) -> float:
    """Accuracy of predicting ``v_i`` after ``? k_i`` on fresh key-value recall prompts."""
    batch = recall_batch(n, n_pairs=n_pairs, min_pairs=min_pairs, max_pairs=max_pairs, seed=seed)
    return batch_accuracy(model, batch, batch_size=batch_size)
