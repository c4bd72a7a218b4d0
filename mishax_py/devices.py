"""Where a model computes, and its weights read directly: correct for models dispatched with accelerate.

A model loaded with ``from_pretrained(..., device_map=...)`` (or ``accelerate.dispatch_model`` /
``load_checkpoint_and_dispatch``) may have its layers on several devices, and the layers accelerate
*offloads* (to the CPU, on a GPU machine, or to disk with ``offload_folder=``) keep their parameters on
the ``meta`` device: accelerate's hooks (``module._hf_hook``, an ``AlignDevicesHook``) load them onto
the module's *execution device* just for the module's forward and drop them afterwards. So
``next(model.parameters()).device`` (and Hugging Face's ``model.device``) may say ``meta``, and a
weight read outside a forward (the unembedding of an attribution graph, the embedding matrix, a
direct logit attribution) is a tensor without data.

This module is the one place the core asks those questions:

* :func:`execution_device` -- the device a module computes on (its accelerate hook's execution
  device, else the device of its first tensor that has data, else the CPU);
* :func:`input_device` -- where token ids go: the execution device of the input embeddings;
* :func:`model_dtype` -- the dtype the model computes in (its first floating parameter's; a meta
  parameter keeps its dtype);
* :func:`materialised_weight` -- a parameter of one module with its data, on the module's execution
  device, loaded through accelerate's documented ``align_module_device`` when the module is offloaded;
* :func:`transformable` -- a block in which ``torch.func`` transforms (``vjp``, ``vmap``) may run the
  forward of an offloaded model.

Values that meet a site (patch sources, steering vectors, SAE and transcoder parameters, masks) are
moved to the device of the site's value where they meet it, not to any of these: on a model split over
several GPUs each layer's values live on that layer's device.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel

__all__ = ["execution_device", "input_device", "materialised_weight", "model_dtype", "transformable"]


def _module(model: InstrumentedModel | nn.Module) -> nn.Module:
    return model if isinstance(model, nn.Module) else model.model


def _hook_device(module: nn.Module) -> torch.device | None:
    """The ``execution_device`` of accelerate's hook on ``module`` (one hook, or a ``SequentialHook`` of
    several), or ``None`` where it has none."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return None
    for h in (*getattr(hook, "hooks", ()), hook):
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    return None


def execution_device(model: InstrumentedModel | nn.Module) -> torch.device:
    """The device ``model`` (an ``nn.Module`` or an ``InstrumentedModel``) computes on.

    Its accelerate hook's execution device where it has one (a dispatched model's main device; an
    offloaded module's device while it runs); else the device of its first parameter or buffer that is
    not on ``meta``; else, where all its tensors are offloaded, the first execution device of a
    submodule's hook; else the CPU (a model without tensors).
    """
    module = _module(model)
    device = _hook_device(module)
    if device is not None:
        return device
    for t in itertools.chain(module.parameters(), module.buffers()):  # lazily: usually the first one answers
        if t.device.type != "meta":
            return t.device
    for sub in module.modules():
        device = _hook_device(sub)
        if device is not None:
            return device
    return torch.device("cpu")


def input_device(model: InstrumentedModel | nn.Module) -> torch.device:
    """Where token ids for ``model`` go: the execution device of its input embeddings
    (``get_input_embeddings()``, a Hugging Face model's), else :func:`execution_device` of the model."""
    module = _module(model)
    if getattr(module, "_hf_hook", None) is None:  # not dispatched: the first parameter says (one per call)
        for p in module.parameters():
            if p.device.type != "meta":
                return p.device
            break
    get = getattr(module, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return execution_device(emb if isinstance(emb, nn.Module) else module)


def model_dtype(model: InstrumentedModel | nn.Module) -> torch.dtype:
    """The dtype ``model`` computes in: its first floating-point parameter's (offloaded parameters on
    ``meta`` keep their dtype), else torch's default dtype."""
    for p in _module(model).parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def materialised_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """``module``'s parameter or buffer ``name`` (detached) with its data, on the module's execution device.

    A module that accelerate offloads (its parameters on ``meta`` between forwards) gets its weights
    loaded for the read by ``accelerate.utils.align_module_device`` (the hook's own ``pre_forward``: the
    CPU copy or the ``offload_folder`` file, moved to the execution device) and dropped again after it;
    the returned tensor keeps the loaded copy alive (as much memory as the weight, for as long as the
    caller holds it). Any other module's tensor is returned as it is (no copy).

    Raises ``TypeError`` naming the module when it has no tensor ``name``, and ``RuntimeError`` when the
    tensor is on ``meta`` and no accelerate hook can load it.
    """
    t = getattr(module, name, None)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no tensor {name!r} to read")
    if t.device.type != "meta":
        return t.detach()
    from accelerate.utils import align_module_device, has_offloaded_params

    if not has_offloaded_params(module):
        raise RuntimeError(f"{type(module).__name__}.{name} is on the meta device and no accelerate offload hook "
                           "loads it (a model built on meta and never loaded?)")
    with align_module_device(module):
        loaded = getattr(module, name)
        if not isinstance(loaded, torch.Tensor) or loaded.device.type == "meta":
            raise RuntimeError(f"accelerate's hook did not load {type(module).__name__}.{name}")
        return loaded.detach()


@contextmanager
def transformable(model: InstrumentedModel | nn.Module) -> Iterator[None]:
    """Inside the block, a forward of ``model`` may run under ``torch.func`` transforms (``vjp``, ``vmap``)
    although accelerate offloads some of its modules.

    accelerate's offload hooks look up the data pointer of each weight they load, in the map of tied
    weights a dispatched model carries (``hook.tied_params_map``, shared by all hooks, which lets tied
    weights be loaded once); a weight loaded inside a ``torch.func`` transform is a functorch wrapper without
    storage, and the lookup raises ``RuntimeError: Cannot access data pointer of Tensor that doesn't have
    storage``. Inside the block the offloading hooks run without that map: each module loads its own
    weights, so two tied modules (the embeddings and the unembedding) hold two loaded copies while both are
    in use. The hooks also put their modules back on ``meta`` after each forward with tensors made inside
    the transform (wrappers that die with it), so the offloaded modules' own ``meta`` tensors are put back
    when the block ends. Both are restored even on error; models without offloaded modules are left
    untouched.
    """
    hooked = [m for m in _module(model).modules() if getattr(m, "_hf_hook", None) is not None]
    if not hooked:  # not dispatched by accelerate: nothing to do (and accelerate is not even imported)
        yield
        return
    from accelerate.hooks import AlignDevicesHook
    from accelerate.utils import named_module_tensors

    maps: list[tuple[AlignDevicesHook, object]] = []
    tensors: list[tuple[nn.Module, str, torch.Tensor, bool]] = []  # (module, name, meta tensor, is a parameter)
    for module in hooked:
        hook = getattr(module, "_hf_hook", None)
        for h in (*getattr(hook, "hooks", ()), hook):
            if not (isinstance(h, AlignDevicesHook) and h.offload):
                continue
            for name, _ in named_module_tensors(module, include_buffers=h.offload_buffers, recurse=h.place_submodules,
                                                remove_non_persistent=True):
                owner_name, _, local = name.rpartition(".")
                owner = module.get_submodule(owner_name)
                is_param = local in owner._parameters
                t = owner._parameters[local] if is_param else owner._buffers[local]
                if t is not None:
                    tensors.append((owner, local, t, is_param))
            if h.tied_params_map is not None:
                maps.append((h, h.tied_params_map))
                h.tied_params_map = None
    try:
        yield
    finally:
        for h, tied in maps:
            h.tied_params_map = tied
        for owner, local, t, is_param in tensors:
            if is_param:
                owner._parameters[local] = t  # type: ignore[assignment]
            else:
                owner._buffers[local] = t
