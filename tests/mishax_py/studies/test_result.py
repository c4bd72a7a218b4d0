"""PatchingResult behaves as its ``values`` tensor: each operation of the tensor protocol against the same
operation on ``.values``; and its own view (normalized, plot, repr) stays as it was."""

from __future__ import annotations

import copy
import operator
import pickle
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from mishax_py.studies.result import PatchingResult, plot


def make(values: torch.Tensor | None = None, **kw: object) -> PatchingResult:
    v = values if values is not None else torch.tensor([[0.5, -1.0, 2.0, 0.0], [3.0, 1.5, -2.5, 0.25]])
    axes = ("layer", "pos")[: v.ndim] if v.ndim <= 2 else ("layer", "head", "pos")
    return PatchingResult(v, axes, {}, kw.pop("site", "resid_pre"), **kw)  # type: ignore[arg-type]


def same(a: object, b: object) -> None:
    """``a`` is a tensor (or a tuple of them) equal to ``b``."""
    if isinstance(b, tuple):
        assert isinstance(a, tuple) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            same(x, y)
        return
    assert isinstance(a, torch.Tensor) and not isinstance(a, PatchingResult), type(a)
    assert isinstance(b, torch.Tensor)
    assert a.dtype == b.dtype and a.shape == b.shape, (a, b)
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_conversion_to_tensors_and_arrays() -> None:
    res = make()
    t = torch.as_tensor(res)
    same(t, res.values)
    assert t.data_ptr() == res.values.data_ptr()  # as_tensor shares the memory, as for a tensor
    same(torch.tensor(res), res.values)
    same(torch.as_tensor(res, dtype=torch.float64), res.values.double())
    assert np.array_equal(np.asarray(res), res.values.numpy()) and np.asarray(res).dtype == np.float32
    assert np.asarray(res, dtype=np.float64).dtype == np.float64
    assert np.array_equal(res.numpy(), res.values.numpy())
    assert res.tolist() == res.values.tolist()
    same(res.float(), res.values.float())
    one = make(torch.tensor(1.25))
    assert float(one) == 1.25 and int(make(torch.tensor(3.0))) == 3 and one.item() == 1.25
    assert f"{one:.1f}" == "1.2" and torch.as_tensor(one).shape == ()


def test_shape_indexing_length_iteration() -> None:
    res = make()
    assert res.shape == res.values.shape == (2, 4) and res.ndim == 2
    assert res.dtype == torch.float32 and res.device == res.values.device
    for index in (0, -1, (1, 2), (slice(None), 1), torch.tensor([1, 0]), res.values > 0, (..., 0)):
        same(res[index], res.values[index])
    same(res[res > 0], res.values[res.values > 0])  # a boolean result as the index
    assert len(res) == len(res.values) == 2
    items = list(res)
    assert len(items) == 2
    for a, b in zip(items, res.values, strict=True):
        same(a, b)
    copied = make()
    copied[0, 1] = 7.0
    assert copied.values[0, 1] == 7.0


OPS = [operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod, operator.pow,
       operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne]


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_arithmetic_and_comparisons_with_tensors_numbers_and_results(op) -> None:
    res, other = make(), make(torch.tensor([[1.0, 2.0, -1.0, 4.0], [0.5, 1.5, 2.0, -3.0]]))
    t, n = other.values, 2.0
    same(op(res, t), op(res.values, t))
    same(op(t, res), op(t, res.values))
    same(op(res, n), op(res.values, n))
    same(op(n, res), op(n, res.values))
    same(op(res, other), op(res.values, other.values))  # two results
    same(op(res, t[0]), op(res.values, t[0]))  # broadcasting


def test_unary_and_matmul() -> None:
    res = make()
    same(-res, -res.values)
    same(+res, +res.values)
    same(abs(res), res.values.abs())
    m = torch.arange(8.0).view(4, 2)
    same(res @ m, res.values @ m)
    same(m.T @ res.T, m.T @ res.values.T)


def test_tensor_methods() -> None:
    res, v = make(), make().values
    same(res.argmax(), v.argmax())
    same(res.argmax(1), v.argmax(1))
    same(res.argmin(dim=0, keepdim=True), v.argmin(dim=0, keepdim=True))
    same(tuple(res.topk(2)), tuple(v.topk(2)))
    same(tuple(res.flatten().topk(3, largest=False)), tuple(v.flatten().topk(3, largest=False)))
    same(res.max(), v.max())
    same(tuple(res.max(dim=1)), tuple(v.max(dim=1)))
    same(res.min(), v.min())
    same(res.abs(), v.abs())
    same(res.sum(), v.sum())
    same(res.sum(0), v.sum(0))
    same(res.mean(), v.mean())
    # the rest of the Tensor API, read from values
    same(res.std(), v.std())
    same(res.T, v.T)
    same(res.reshape(-1), v.reshape(-1))
    same(res.detach().cpu().clone(), v)
    same(res.isnan(), v.isnan())
    assert res.numel() == v.numel() and res.dim() == 2 and res.size(1) == 4
    with pytest.raises(AttributeError, match="PatchingResult.*no attribute 'no_such_thing'"):
        res.no_such_thing  # noqa: B018


def test_torch_functions_take_results() -> None:
    res, t = make(), torch.ones(2, 4)
    same(torch.stack([res, res]), torch.stack([res.values, res.values]))
    same(torch.cat([res, t]), torch.cat([res.values, t]))
    assert torch.allclose(res, res.values) and not torch.allclose(res, t)
    same(torch.where(res > 0, res, t), torch.where(res.values > 0, res.values, t))
    same(torch.nn.functional.softmax(res, dim=-1), torch.softmax(res.values, dim=-1))
    same(t.add(res), t + res.values)
    assert np.array_equal(np.abs(res), np.abs(res.values.numpy()))


def test_bool_follows_the_tensor() -> None:
    assert bool(make(torch.tensor(1.0))) and not bool(make(torch.tensor(0.0)))
    with pytest.raises(RuntimeError, match="ambiguous"):
        bool(make())


def test_own_view_normalized_repr_copy_pickle(tmp_path) -> None:
    res = make(site="attn_out", direction="noise", clean=2.0, corrupt=-1.0)
    same(res.normalized(), (res.values - 2.0) / (-1.0 - 2.0))
    assert repr(res) == "PatchingResult('attn_out', noise, [layer=2, pos=4], clean=2, corrupt=-1)"
    zero = PatchingResult(torch.tensor(0.75), (), {}, "path", "noise", 1.0, 0.0)
    assert repr(zero) == "PatchingResult('path', noise, [], value=0.75, clean=1, corrupt=0)"
    for clone in (copy.deepcopy(res), pickle.loads(pickle.dumps(res))):
        assert isinstance(clone, PatchingResult) and clone.site == "attn_out" and torch.equal(clone.values, res.values)
    assert hash(res) == hash(res) and {res: 1}[res] == 1  # hashable by identity, as tensors


def test_plot_method_and_function(tmp_path) -> None:
    res = make()
    a = res.plot(tmp_path / "a.png", title="by method", normalized=False)
    b = plot(res, tmp_path / "b.png")
    for path in (a, b):
        data = open(path, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(ValueError, match="1-, 2- or 3-axis"):
        make(torch.tensor(1.0)).plot(tmp_path / "c.png")


@dataclass(eq=False)
class _Extended(PatchingResult):
    effects: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    method: str = "atp"


def test_a_subclass_with_extra_fields_keeps_the_protocol() -> None:
    base = make()
    ext = _Extended(base.values, base.axes, {}, "resid_pre", effects=base.values * 2, method="ig")
    assert ext.method == "ig" and torch.equal(ext.effects, base.values * 2)
    same(ext - base, torch.zeros(2, 4))
    same(ext == base, torch.ones(2, 4, dtype=torch.bool))
    same(torch.as_tensor(ext), base.values)
    same(ext.argmax(), base.values.argmax())
