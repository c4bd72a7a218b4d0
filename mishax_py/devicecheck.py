"""A simulated accelerator on a CPU-only machine, to catch cross-device mistakes without a GPU.

The commonest GPU-only failure of interpretability code is a tensor made on the default device
(``torch.zeros(n)``, ``torch.arange(n)``, a mask, a cached value moved to the CPU) meeting a value on
the model's device: on CPU every tensor is on the same device, so tests pass there and the code fails on
the first CUDA run. This module gives the CPU a second device, ``"sim"``, with CUDA's device rules:

>>> from mishax_py import devicecheck
>>> with devicecheck.simulated():
...     devicecheck.place(model)                         # parameters and buffers now report sim:0
...     logits = im.run(ids.to("sim"))                   # runs on the CPU, reports sim:0
...     logits + torch.zeros(64)                         # DeviceMismatchError: aten.add.Tensor mixes sim:0 and cpu

How it works. ``"sim"`` is torch's ``privateuse1`` backend renamed and registered from Python (with a
no-op device guard), so ``torch.device("sim:1")``, ``x.to("sim")`` and ``torch.zeros(n, device="sim")``
work as for any device (``module.to("sim")`` too, but it unties tied weights: :func:`place` keeps them).
A sim tensor is a :class:`SimTensor`: a wrapper subclass (``_make_wrapper_subclass``) holding a CPU
tensor (``.elem``) and reporting a sim device. Its ``__torch_dispatch__`` runs every aten op on the CPU
tensors (:func:`run_op`) after checking the devices of its tensor arguments as CUDA does
(:func:`check_devices`): all tensors on one device, except 0-dim CPU tensors in the ops that read them
as scalars (not ``cat``, ``mm``, ``searchsorted``, ...), copies between devices, and CPU index tensors
in indexing (``x[idx]``, ``x[idx] = v``), which CUDA accepts. Anything else raises
:class:`DeviceMismatchError`, naming the aten op, the devices and the offending argument (shape, dtype);
the Python traceback shows the line that made the call. Factories with ``device="sim"`` and the ops torch
runs below Python (``torch.tensor(data, device=)``, ``x[[1, 2]] = True``) reach the ``sim`` backend's own
kernels, registered with ``torch.library`` for the ``PrivateUse1`` key, which run them on the CPU and
wrap the result. A CPU ``generator=`` drawing on a sim device is refused, as CUDA refuses it, and so is
``.numpy()`` of a sim tensor (``.tolist()``, ``.item()`` and ``.cpu()`` work, as on CUDA). Backward
passes run on the calling thread inside :func:`simulated` (the autograd engine has no worker thread for
a Python device); gradients are sim tensors too.

The values are the CPU's: a run under the simulator equals the plain CPU run exactly, so a test can
compare them. Costs: one Python call per aten op (tiny models only). What it cannot see: code that
branches on ``device.type == "cuda"`` (memory queries, Triton kernels: ``pytest -m gpu`` covers those),
mistakes that CUDA also tolerates (0-dim CPU tensors, CPU indices), which are not bugs, and ops that
resize a tensor in place (``resize_``, a too small ``out=``), which it refuses with ``NotImplementedError``.

The registration is process-wide and permanent (torch allows one name for ``privateuse1``): the first
:func:`simulated`, :func:`device` or :func:`place` call makes it; a process whose ``privateuse1``
backend already has another name (a real out-of-tree accelerator) gets a clear error instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["DeviceMismatchError", "SimTensor", "check_devices", "device", "place", "run_op", "simulated", "unwrap"]

NAME = "sim"
N_DEVICES = 4  # sim:0 .. sim:3, for multi-device placements

aten = torch.ops.aten
# ops whose tensor arguments may sit on different devices on CUDA too: copies between devices
_CROSS_DEVICE = {aten.copy_.default, aten._to_copy.default, aten._copy_from.default,
                 aten._copy_from_and_resize.default, aten._foreach_copy_.default}
# ops that take CPU index tensors for a device tensor (CUDA moves them): the `indices` argument is exempt
_CPU_INDICES = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                aten._index_put_impl_.default, aten._unsafe_index.Tensor, aten._unsafe_index_put.default}


class DeviceMismatchError(RuntimeError):
    """An op mixed tensors of different devices in a way CUDA refuses (names the op and the tensor)."""


class _Backend:
    """The device module torch looks up as ``torch.sim`` (availability, seeding, device count)."""

    def is_initialized(self) -> bool:
        return True

    def is_available(self) -> bool:
        return _ACTIVE[0] > 0

    def current_device(self) -> int:
        return 0

    def device_count(self) -> int:
        return N_DEVICES

    def _is_in_bad_fork(self) -> bool:
        return False

    def manual_seed_all(self, seed: int) -> None:
        """Seeding is the CPU generator's (sim tensors are drawn by it)."""

    def manual_seed(self, seed: int) -> None:
        """As :meth:`manual_seed_all`."""


class _Hooks(torch._C._acc.PrivateUse1Hooks):
    """What torch asks a backend: ``sim`` counts as available (``torch.accelerator``) only inside
    :func:`simulated`, so that code elsewhere in the process that looks for an accelerator does not pick it."""

    def is_available(self) -> bool:
        return _ACTIVE[0] > 0

    def has_primary_context(self, dev_id: int) -> bool:
        return True

    def is_built(self) -> bool:
        return True


_ACTIVE = [0]  # simulated() blocks open


def _register() -> None:
    """Rename ``privateuse1`` to ``"sim"`` and register its Python device module and guard (once)."""
    from torch.utils import backend_registration

    current = torch._C._get_privateuse1_backend_name()
    if current == NAME and hasattr(torch, NAME):
        return
    if current not in ("privateuseone", NAME):
        raise RuntimeError(f"devicecheck needs torch's privateuse1 backend, but this process already named it "
                           f"{current!r} (a real accelerator plug-in is loaded): run the device check in a "
                           f"process without it")
    backend_registration._setup_privateuseone_for_python_backend(rename=NAME, backend_module=_Backend(),
                                                                 hook=_Hooks())
    lib = torch.library.Library("aten", "IMPL")
    for name in [*_factory_ops(), *_BACKEND_OPS]:
        base, _, overload = name.partition(".")
        op = getattr(getattr(aten, base), overload or "default")
        lib.impl(name, functools.partial(_backend_kernel, op), "PrivateUse1")
    _LIBRARY.append(lib)  # kept alive: the registrations live as long as it


_LIBRARY: list[torch.library.Library] = []
# the aten ops that reach the sim backend itself rather than SimTensor.__torch_dispatch__: the factories
# (:func:`_factory_ops`: run whole on the CPU; their composite kernels would resize an empty out= tensor,
# which a wrapper cannot follow), and the ops torch runs below Python on new tensors
# (torch.tensor(data, device=), x[[1, 2]] = True: _to_copy, copy_, fill_ ...)
_BACKEND_OPS = ["_to_copy", "copy_", "_copy_from", "_copy_from_and_resize", "fill_.Scalar", "fill_.Tensor", "zero_",
                "lift_fresh", "_local_scalar_dense", "normal_", "uniform_", "random_", "random_.from", "random_.to",
                "bernoulli_.float", "exponential_", "index_put_", "_index_put_impl_", "view", "as_strided", "clone",
                "detach", "alias", "resize_"]


def _factory_ops() -> list[str]:
    """The public aten factories: a ``device`` argument and no tensor argument (``zeros``, ``arange.start``,
    ``randn.generator``, ``eye.m``, ``linspace``, ...)."""
    out = []
    for full in torch._C._dispatch_get_all_op_names():
        base, _, overload = full.removeprefix("aten::").partition(".")
        if not full.startswith("aten::") or base.startswith("_") or "sparse" in base or base == "from_file":
            continue
        schema = torch._C._get_schema(f"aten::{base}", overload)
        if (not schema.is_mutable and any(a.name == "device" for a in schema.arguments)
                and not any("Tensor" in str(a.type) for a in schema.arguments)):
            out.append(f"{base}.{overload}" if overload else base)
    return out


def device(index: int = 0) -> torch.device:
    """``torch.device("sim", index)``, registering the ``"sim"`` device first (torch parses only known names)."""
    _register()
    if not 0 <= index < N_DEVICES:
        raise ValueError(f"the simulator has devices sim:0 .. sim:{N_DEVICES - 1}, not sim:{index}")
    return torch.device(NAME, index)


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"


def check_devices(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> torch.device | None:
    """The device an aten op runs on, after checking its tensor arguments as CUDA would.

    Returns the one device of the tensors that count (``None`` when only 0-dim CPU tensors or none are
    passed); raises :class:`DeviceMismatchError` naming ``func``, the two devices and the argument
    that disagrees. Exempt, as on CUDA: 0-dim CPU tensors (except in the ops of :data:`_NO_CPU_SCALARS`,
    e.g. ``searchsorted``, ``cat``, ``mm``), copies between devices, CPU index tensors.
    """
    if func in _CROSS_DEVICE:
        return None
    flat: list[tuple[str, Any]] = []
    for name, a in [*((f"argument {i}", a) for i, a in enumerate(args)), *kwargs.items()]:
        # `indices`: CPU index tensors are accepted for a tensor on any device (not the other way round)
        cpu_ok = func in _CPU_INDICES and name in ("argument 1", "indices")
        flat += [(name, x) for x in tree_flatten(a)[0]
                 if not (cpu_ok and isinstance(x, torch.Tensor) and x.device.type == "cpu")]
    device: torch.device | None = None
    first = ""
    scalars_ok = func._schema.name not in _NO_CPU_SCALARS
    for name, t in flat:
        if not isinstance(t, torch.Tensor) or (scalars_ok and t.dim() == 0 and t.device.type == "cpu"):
            continue
        if device is None:
            device, first = t.device, f"{name} ({_describe(t)})"
        elif t.device != device:
            raise DeviceMismatchError(
                f"device check: {func} mixes {device} and {t.device}: {first} and {name} ({_describe(t)}). "
                f"Create the tensor on the value's device (device=x.device) or move it (.to(x.device)).")
    return device


class SimTensor(torch.Tensor):
    """A CPU tensor (``.elem``) that reports a simulated device and refuses mixed-device ops.

    Made by :func:`place`, ``x.to("sim")`` or any factory call with ``device="sim"`` inside
    :func:`simulated`; ops on it return sim tensors (``.cpu()``/``.to("cpu")`` return plain ones).
    """

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, device: torch.device) -> SimTensor:
        if isinstance(elem, SimTensor):
            elem = elem.elem
        if device.index is None:  # "sim" means sim:0, as "cuda" means the current CUDA device
            device = torch.device(device.type, 0)
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=device, requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return f"SimTensor({self.elem!r}, device='{self.device}')"

    @classmethod
    def __torch_function__(cls, func: Callable[..., Any], types: Any, args: Sequence[Any] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist:  # CUDA copies to the host; wrapper subclasses refuse it by default
            return args[0].elem.tolist()
        if func in (torch.Tensor.numpy, torch.Tensor.__array__):
            raise DeviceMismatchError(f"device check: can't convert {args[0].device} device type tensor to numpy "
                                      f"({_describe(args[0])}); use .cpu() first, as CUDA requires")
        if func is torch.Tensor.untyped_storage:  # savers dedupe shared storage through it
            return args[0].elem.untyped_storage()
        if func is torch.Tensor.__deepcopy__:  # the default copies storage, which a wrapper lacks
            return _deepcopy(args[0], args[1])
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Sequence[Any] = (),  # type: ignore[override]
                           kwargs: dict[str, Any] | None = None) -> Any:
        return run_op(func, args, kwargs or {})


def run_op(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """Run an aten op that involves a sim tensor or a sim ``device=`` on the CPU, after
    :func:`check_devices`; tensor results on a sim device come back as :class:`SimTensor`."""
    kwargs = dict(kwargs)
    sims = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, SimTensor)]
    dev = check_devices(func, args, kwargs)
    target = kwargs.get("device")
    if target is not None:  # a factory, or a copy with a device: the result's device is the one asked for
        dev = torch.device(target)
        kwargs["device"] = torch.device("cpu")
    elif dev is None or dev.type != NAME:  # copies between devices (and 0-dim-only args): the first sim one's
        dev = sims[0].device if sims else torch.device("cpu")
    gen = kwargs.get("generator")
    if gen is not None and dev.type == NAME and gen.device.type != NAME:
        raise DeviceMismatchError(f"device check: {func} draws on {dev} with a generator on {gen.device}; "
                                  f"CUDA needs a generator of the tensor's device (or none)")
    originals: dict[int, torch.Tensor] = {}

    def unwrap_arg(t: Any) -> Any:
        if isinstance(t, SimTensor):
            originals[id(t.elem)] = t
            return t.elem
        if isinstance(t, torch.Tensor):
            originals[id(t)] = t
        return t

    out = func(*tree_map(unwrap_arg, args), **tree_map(unwrap_arg, kwargs))
    if func._schema.name in _METADATA_INPLACE:  # x.squeeze_(0) ...: change the wrapper's sizes the same way
        with torch._C._DisableTorchDispatch():
            func(args[0], *args[1:], **kwargs)
    for t in sims:
        if t.elem.shape != t.shape:  # a wrapper's sizes are fixed at creation
            raise NotImplementedError(f"devicecheck: {func} resized a sim tensor in place ({tuple(t.shape)} -> "
                                      f"{tuple(t.elem.shape)}); the simulator follows no resize_ or resizing out=")
    if func in _INPLACE_COPIES:  # copies into its first argument, whatever its device
        return args[0]

    def wrap(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) in originals:  # in-place and out= ops return their argument
            return originals[id(t)]
        return SimTensor(t, dev) if dev.type == NAME else t

    return tree_map(wrap, out)


# CUDA kernels that take no CPU scalar tensor (not TensorIterator ops): every argument on the device
_NO_CPU_SCALARS = {f"aten::{n}" for n in ("searchsorted", "bucketize", "cat", "stack", "index_select", "gather",
                                          "scatter", "scatter_", "scatter_add", "scatter_add_", "mm", "bmm", "addmm",
                                          "mv", "dot", "embedding", "take", "index_add", "index_add_")}
_METADATA_INPLACE = {f"aten::{n}" for n in ("squeeze_", "unsqueeze_", "transpose_", "t_", "swapdims_", "swapaxes_",
                                              "as_strided_")}
_INPLACE_COPIES = {aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default}


def _backend_kernel(func: Any, *args: Any, **kwargs: Any) -> Any:
    """The ``sim`` backend's kernel of ``func`` (one of :data:`_BACKEND_OPS`)."""
    return run_op(func, args, kwargs)


def _deepcopy(t: SimTensor, memo: dict[int, Any]) -> torch.Tensor:
    if id(t) in memo:
        return memo[id(t)]
    new: torch.Tensor
    with torch.no_grad():
        new = SimTensor(t.elem.clone(), t.device)
    new.requires_grad_(t.requires_grad)
    if getattr(t, "_is_param", False):  # an nn.Parameter made of a sim tensor
        new = nn.Parameter(new, requires_grad=t.requires_grad)
    memo[id(t)] = new
    return new


@contextmanager
def simulated() -> Iterator[torch.device]:
    """Register the ``"sim"`` devices (once per process) and run the body with backward passes on this thread
    (the autograd engine has no worker thread for a Python device); yields ``sim:0``."""
    dev = device(0)
    _ACTIVE[0] += 1
    try:
        with torch.autograd.set_multithreading_enabled(False):
            yield dev
    finally:
        _ACTIVE[0] -= 1


def place(obj: Any, to: torch.device | str | None = None) -> Any:
    """Move a tensor or an ``nn.Module`` (in place: parameters, their gradients, buffers) to a sim
    device, keeping tied parameters tied (``module.to("sim")`` would untie them: a wrapper subclass
    cannot be swapped into a plain parameter's ``.data``). Other objects are returned unchanged."""
    dev = device(0) if to is None else torch.device(to)  # parsing "sim:1" needs the registration
    if dev.type != NAME:
        raise ValueError(f"place() moves to a simulated device ('{NAME}', '{NAME}:1', ...), not {dev}")
    if isinstance(obj, torch.Tensor):
        return obj if isinstance(obj, SimTensor) and obj.device == dev else SimTensor(unwrap(obj), dev)
    if not isinstance(obj, nn.Module):
        return obj
    done: dict[int, Any] = {}
    for mod in obj.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:
                new = nn.Parameter(SimTensor(unwrap(p.detach()), dev), requires_grad=p.requires_grad)
                if p.grad is not None:
                    new.grad = SimTensor(unwrap(p.grad), dev)
                done[id(p)] = new
            mod._parameters[name] = done[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is not None:
                done.setdefault(id(b), SimTensor(unwrap(b), dev))
                mod._buffers[name] = done[id(b)]
    return obj


def unwrap(t: torch.Tensor) -> torch.Tensor:
    """The CPU tensor behind a sim tensor (a plain tensor is returned as is); no copy, no device check."""
    return t.elem if isinstance(t, SimTensor) else t
