"""saes.edits: ``FeatureEdit.table`` (the per-row form the sparse splice kernels read) means what the edit does."""

from __future__ import annotations

import torch

import saes
from saes.edits import EditScope, apply_edit


def test_table_reproduces_the_dense_edit() -> None:
    """Scattering a table's values (set or added, per row, masked by positions) gives ``edit(f)`` exactly."""
    g = torch.Generator().manual_seed(0)
    f = torch.rand(3, 5, 20, generator=g) * (torch.rand(3, 5, 20, generator=g) < 0.3)
    per_row = torch.tensor([[1, 4], [2, -1], [0, 19]])
    edits = [
        saes.FeatureAblate([1, 2, 3]),
        saes.FeatureClamp(per_row, torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])),
        saes.FeatureSteer([7, 8], [0.5, -1.5], positions=slice(1, 4)),
        saes.FeatureClamp(5, 2.0, positions=[0, -1]),
    ]
    scope = EditScope(offset=2, rows=None, full_batch=3)
    for edit in edits:
        ids, vals, pos = edit.table(tuple(f.shape), scope)
        assert ids.shape == vals.shape and ids.shape[0] in (1, 3)
        want = apply_edit(edit, f, scope)
        got = f.clone()
        for r in range(3):
            for p in range(5):
                if pos is not None and not bool(pos[p]):
                    continue
                row = 0 if ids.shape[0] == 1 else r
                for i, v in zip(ids[row].tolist(), vals[row].tolist(), strict=True):
                    if i >= 0:
                        got[r, p, i] = v if edit.sets else f[r, p, i] + v
        torch.testing.assert_close(got, want, rtol=0, atol=0)
