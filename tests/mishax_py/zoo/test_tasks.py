"""``mishax_py.zoo.tasks``: the seeded induction and recall generators, and ``random_induction_batch`` /
``random_induction_clean_corrupt`` (the demo's prompts for any checkpoint)."""

from __future__ import annotations

import pytest
import torch

from mishax_py.zoo import tasks


@pytest.mark.parametrize("bos", [7, None])
def test_random_induction_batch_repeats_distinct_pool_tokens(bos: int | None) -> None:
    pool = torch.arange(100, 160)
    b = tasks.random_induction_batch(5, half=6, content_ids=pool, bos_id=bos, seed=3)
    off = 0 if bos is None else 1
    assert b.input_ids.shape == (5, off + 12) and b.attention_mask.all()
    for row in b.input_ids:
        if bos is not None:
            assert int(row[0]) == bos
        first, second = row[off : off + 6], row[off + 6 :]
        assert torch.equal(first, second) and len(set(first.tolist())) == 6
        assert set(first.tolist()) <= set(pool.tolist())
    # scored: the predictions of s2..sL of the repeat, made at positions off+L .. off+2L-2
    want = torch.zeros(5, off + 12, dtype=torch.bool)
    want[:, off + 6 : off + 11] = True
    assert torch.equal(b.target_mask, want)
    assert torch.equal(b.targets[b.target_mask], b.input_ids[:, off + 7 :].flatten())
    assert b.info["half_len"].tolist() == [6] * 5
    again = tasks.random_induction_batch(5, half=6, content_ids=pool, bos_id=bos, seed=3)
    assert torch.equal(b.input_ids, again.input_ids)


def test_random_clean_corrupt_share_the_repeat_and_differ_before_it() -> None:
    pool = torch.arange(10, 40)
    clean, corrupt = tasks.random_induction_clean_corrupt(4, half=5, content_ids=pool, bos_id=2, seed=0)
    assert torch.equal(clean.input_ids[:, 6:], corrupt.input_ids[:, 6:]) and torch.equal(clean.labels, corrupt.labels)
    for c, k in zip(clean.input_ids, corrupt.input_ids, strict=True):
        assert not set(c[1:6].tolist()) & set(k[1:6].tolist())  # B avoids A: no earlier copy in the corrupt prompt
    with pytest.raises(ValueError, match="half"):
        tasks.random_induction_batch(1, half=16, content_ids=pool, bos_id=2)


def test_generators_are_seeded_and_well_formed() -> None:
    a = tasks.induction_batch(16, seed=3)
    b = tasks.induction_batch(16, seed=3)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, tasks.induction_batch(16, seed=4).input_ids)
    for i in range(len(a)):
        L = int(a.info["half_len"][i])
        row = a.input_ids[i, : 2 * L + 1]
        assert row[0] == tasks.BOS_ID and torch.equal(row[1 : L + 1], row[L + 1 :])
        assert row[1 : L + 1].unique().numel() == L and (row[1:] >= tasks.CONTENT_START).all()
        assert int(a.target_mask[i].sum()) == L - 1
        assert (a.input_ids[i, 2 * L + 1 :] == tasks.PAD_ID).all()
    r = tasks.recall_batch(16, seed=3)
    pos = r.info["answer_pos"]
    rows = torch.arange(len(r))
    assert (r.input_ids[rows, pos - 1] == tasks.QUERY_ID).all()
    assert torch.equal(r.targets[rows, pos], r.info["answer"])
    assert (r.target_mask.sum(1) == 1).all() and r.target_mask[rows, pos].all()
