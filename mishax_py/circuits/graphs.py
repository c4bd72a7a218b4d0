"""Attribution graphs of many prompts, split across processes inside ``mishax_py.distributed.split()``.

:func:`attribution_graphs` builds one :func:`~mishax_py.circuits.build.attribution_graph` per prompt. Inside
:func:`mishax_py.distributed.split` each rank builds the graphs of its share of the prompts (prompts
``rank, rank + world, ...``) and every rank returns every graph: a graph travels as bytes
(:func:`graph_to_bytes`: its tensors in safetensors' format, the rest as JSON; nothing is pickled) and is
rebuilt by :func:`graph_from_bytes`, bit for bit. Graphs built on another rank arrive with their
tensors on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from mishax_py.circuits.build import attribution_graph
from mishax_py.circuits.graph import AttributionGraph
from mishax_py.distributed import active_split

if TYPE_CHECKING:
    from mishax_py.circuits.transcoders import Transcoders
    from mishax_py.inputs import Ids
    from mishax_py.instrumented import InstrumentedModel

__all__ = ["attribution_graphs", "graph_from_bytes", "graph_to_bytes"]

_TENSOR_FIELDS = tuple(f.name for f in dataclasses.fields(AttributionGraph)
                       if f.type in ("torch.Tensor", torch.Tensor))
_INT_KEYS = "__int_keys__"


def attribution_graphs(im: InstrumentedModel, prompts: Sequence[Ids], transcoders: Transcoders,
                       **kwargs: Any) -> list[AttributionGraph]:
    """The attribution graph of each prompt (``attribution_graph(im, prompt, transcoders, **kwargs)``), in order.

    Args:
        im: the instrumented model.
        prompts: one prompt per graph (token ids ``[pos]``/``[1, pos]`` or text); lengths may differ.
        transcoders: as for :func:`~mishax_py.circuits.build.attribution_graph`.
        **kwargs: its keywords (``tokenizer=``, ``max_feature_nodes=``, ``batch_size=``, ...).

    Inside :func:`mishax_py.distributed.split` the prompts are dealt to the ranks and every rank returns
    the whole list (module docs); outside it, the same graphs built one after another.
    """
    prompts = list(prompts)
    sp = active_split()
    if sp is None:
        return [attribution_graph(im, p, transcoders, **kwargs) for p in prompts]
    own: dict[int, AttributionGraph] = {}

    def build(mine: list[int]) -> list[bytes]:
        for i in mine:
            own[i] = attribution_graph(im, prompts[i], transcoders, **kwargs)
        return [graph_to_bytes(own[i]) for i in mine]

    blobs = sp.map_bytes(len(prompts), build, what="attribution_graphs prompts")
    return [own[i] if i in own else graph_from_bytes(b) for i, b in enumerate(blobs)]


def graph_to_bytes(graph: AttributionGraph) -> bytes:
    """``graph`` as bytes: an 8-byte length, a JSON header (the non-tensor fields), the tensors (safetensors)."""
    from safetensors.torch import save

    tensors = {name: getattr(graph, name).detach().cpu().contiguous().clone() for name in _TENSOR_FIELDS}
    rest = {f.name: getattr(graph, f.name) for f in dataclasses.fields(graph) if f.name not in _TENSOR_FIELDS}
    header = json.dumps(_encode(rest)).encode()
    return struct.pack("<Q", len(header)) + header + save(tensors)


def graph_from_bytes(data: bytes) -> AttributionGraph:
    """The graph :func:`graph_to_bytes` wrote (tensors on the CPU); a ``ValueError`` for bytes it did not write."""
    from safetensors.torch import load

    if len(data) < 8:
        raise ValueError(f"not a serialised attribution graph: {len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        rest = _decode(json.loads(data[8:8 + n].decode()))
        tensors = load(data[8 + n:])
    except Exception as e:
        raise ValueError(f"not a serialised attribution graph: {e}") from None
    missing = [k for k in _TENSOR_FIELDS if k not in tensors]
    if missing or not isinstance(rest, dict):
        raise ValueError(f"not a serialised attribution graph: missing {missing or 'its header'}")
    fields: dict[str, Any] = {**rest, **tensors}
    return AttributionGraph(**fields)


def _encode(x: Any) -> Any:
    """JSON-ready: dicts with non-string keys (e.g. ``settings["logit_strings"]``) as ``{_INT_KEYS: pairs}``."""
    if isinstance(x, dict):
        if all(isinstance(k, str) for k in x):
            return {k: _encode(v) for k, v in x.items()}
        return {_INT_KEYS: [[k, _encode(v)] for k, v in x.items()]}
    if isinstance(x, (list, tuple)):
        return [_encode(v) for v in x]
    return x


def _decode(x: Any) -> Any:
    if isinstance(x, dict):
        if set(x) == {_INT_KEYS}:
            return {k: _decode(v) for k, v in x[_INT_KEYS]}
        return {k: _decode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode(v) for v in x]
    return x
