"""The frozen local replacement model of one prompt as a linear map, and its batched backward passes.

An attribution graph (:mod:`mishax_py.circuits.build`) needs, for each target (a feature's
pre-activation or a logit node), the gradient of that target with respect to every *source*
output: the embedding site's value (token nodes) and each layer's MLP output (feature and error
nodes), in the model with its attention patterns and the scales of ``im.family.frozen_norms``
frozen and the gradient stopped at every MLP output except through a transcoder's skip connection.
That model is linear, so one forward of the prompt (batch 1) fixes it, and the gradients of many
targets are vector-Jacobian products of that one forward.

:class:`FrozenReplacement` runs the forward once under :func:`torch.func.vjp` and evaluates a batch
of ``R`` targets with :func:`torch.func.vmap` over the VJP: memory holds one copy of the prompt's
activations plus ``R`` gradients of ``[pos, d_model]`` per source, instead of ``R`` copies of the
whole forward (what replicating the prompt along the batch costs, with its ``R`` attention maps).

Attention. Through a frozen pattern ``P`` (``[head, q_pos, k_pos]``) the gradient reaching the
values ``v`` of kv head ``j`` is ``sum over its query heads h of P[h].T @ dz[:, h]``. Left to vmap,
that product copies ``P`` once per row; here the site ``attn.z`` keeps its value and takes its gradient
from :class:`_OVGrad` instead, which folds the ``R`` rows into one matrix product per head
(``[k_pos, q_pos] @ [q_pos, R * d_head]``) and skips the blocks of ``P`` that are all zero (the causal
upper triangle; everything off the band of a sliding-window layer). The shortcut is used for a layer
only when ``z`` recomputed from the cached ``v`` and ``P`` with kv head ``h // (n_heads / n_kv_heads)``
equals the model's ``z``; otherwise that layer's gradient goes through the model's own code (exact,
slower).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from mishax_py.circuits.dictionaries import TranscoderLike
from mishax_py.circuits.transcoders import TranscoderMap, skip_term
from mishax_py.devices import transformable
from mishax_py.runtime import Handler, SiteEvent, activate

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel

__all__ = ["BLOCK", "FrozenReplacement", "norm_scale"]

#: Positions per block of the block-sparse attention backward.
BLOCK = 64


def norm_scale(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``c = y / x`` elementwise (0 where ``x`` is 0): a norm's output as a fixed scale of its input."""
    return torch.where(x != 0, y / torch.where(x != 0, x, torch.ones_like(x)), torch.zeros_like(x))


# -- attention: the gradient through a frozen pattern ----------------------------------------------
def _nonzero_blocks(pattern: torch.Tensor, block: int) -> list[tuple[int, list[int]]]:
    """``[(key block, [query blocks whose pattern block is not all zero])]`` for ``pattern [H, Tq, Tk]``."""
    H, Tq, Tk = pattern.shape
    nq, nk = -(-Tq // block), -(-Tk // block)
    pad = torch.zeros(H, nq * block, nk * block, dtype=torch.bool, device=pattern.device)
    pad[:, :Tq, :Tk] = pattern != 0
    nz = pad.view(H, nq, block, nk, block).any(dim=(0, 2, 4)).cpu()  # [nq, nk]
    return [(kb, [qb for qb in range(nq) if bool(nz[qb, kb])]) for kb in range(nk)]


def _ov_vjp(g: torch.Tensor, pattern: torch.Tensor, n_kv: int, blocks: list[tuple[int, list[int]]],
            block: int) -> torch.Tensor:
    """``dv [N, k_pos, n_kv, d_head]`` from ``dz [N, q_pos, H, d_head]`` through ``pattern [H, q_pos, k_pos]``."""
    N, Tq, H, dh = g.shape
    Tk = pattern.shape[2]
    G = g.permute(2, 1, 0, 3).reshape(H, Tq, N * dh).to(pattern.dtype)  # rows folded into the columns
    out = torch.empty(H, Tk, N * dh, dtype=pattern.dtype, device=g.device)
    for kb, qbs in blocks:
        k0, k1 = kb * block, min((kb + 1) * block, Tk)
        if not qbs:
            out[:, k0:k1] = 0
            continue
        q0, q1 = qbs[0] * block, min((qbs[0] + 1) * block, Tq)
        acc = torch.bmm(pattern[:, q0:q1, k0:k1].transpose(1, 2), G[:, q0:q1])
        for qb in qbs[1:]:
            q0, q1 = qb * block, min((qb + 1) * block, Tq)
            acc.baddbmm_(pattern[:, q0:q1, k0:k1].transpose(1, 2), G[:, q0:q1])
        out[:, k0:k1] = acc
    out = out.view(n_kv, H // n_kv, Tk, N * dh).sum(1)
    return out.view(n_kv, Tk, N, dh).permute(2, 1, 0, 3).to(g.dtype)


class _OVBack(torch.autograd.Function):
    """``dz -> dv`` through a frozen pattern, with a vmap rule that folds the batched rows into the product."""

    @staticmethod
    def forward(g: torch.Tensor, pattern: torch.Tensor, n_kv: int, blocks: Any, block: int) -> torch.Tensor:
        return _ov_vjp(g, pattern, n_kv, blocks, block)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:  # the graph is never differentiated twice
        raise RuntimeError("attribution graphs take first-order gradients only")

    @staticmethod
    def vmap(info: Any, in_dims: Any, g: torch.Tensor, pattern: torch.Tensor, n_kv: int, blocks: Any,
             block: int) -> tuple[torch.Tensor, int]:
        if in_dims[1] is not None:  # never: the pattern is the prompt's, shared by every row
            raise RuntimeError("the frozen pattern cannot be batched")
        g = g.movedim(in_dims[0], 0)
        R, b = g.shape[:2]
        out = _ov_vjp(g.reshape(R * b, *g.shape[2:]), pattern, n_kv, blocks, block)
        return out.reshape(R, b, *out.shape[1:]), 0


class _OVGrad(torch.autograd.Function):
    """A zero ``[batch, pos, H, d_head]`` whose gradient with respect to ``v`` is the frozen attention's."""

    @staticmethod
    def forward(v: torch.Tensor, pattern: torch.Tensor, n_heads: int, blocks: Any, block: int) -> torch.Tensor:
        b, t, _, dh = v.shape
        return v.new_zeros(b, pattern.shape[1], n_heads, dh)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        v, pattern, _, blocks, block = inputs
        ctx.save_for_backward(pattern)
        ctx.n_kv, ctx.blocks, ctx.block = v.shape[2], blocks, block

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        (pattern,) = ctx.saved_tensors
        return _OVBack.apply(grads[0], pattern, ctx.n_kv, ctx.blocks, ctx.block), None, None, None, None


# -- the handlers of the frozen forward --------------------------------------------------------------
def _freeze_norm(stash: dict[str, torch.Tensor], src: str) -> Handler:
    """Autograd sees ``y = c * x`` with ``c = y / x`` frozen (value unchanged)."""

    def h(y: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        x = stash[src]
        xd = x.detach().to(y.dtype)
        return y.detach() + (x.to(y.dtype) - xd) * norm_scale(xd, y.detach())

    return h


def _stash(stash: dict[str, torch.Tensor], name: str) -> Handler:
    def h(v: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        stash[name] = v
        return v

    return h


def _source(value: torch.Tensor, stash: dict[str, torch.Tensor], tc: TranscoderLike | None = None,
            in_name: str | None = None) -> Handler:
    """The site's value becomes ``value`` (a VJP input: the embedding or an MLP output, equal in value);
    only a transcoder's skip connection passes gradient from the MLP's input to its output."""

    def h(v: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        out = value.to(device=v.device, dtype=v.dtype)
        skip = None if tc is None or in_name is None else skip_term(tc, stash[in_name])
        if skip is not None:
            skip = skip.to(v.dtype)
            out = out + (skip - skip.detach())
        return out

    return h


def _frozen_pattern(stash: dict[str, torch.Tensor], layer: int) -> Handler:
    def h(p: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        p = p.detach()
        stash[f"pattern{layer}"] = p
        return p

    return h


def _ov_shortcut(stash: dict[str, torch.Tensor], layer: int, used: dict[int, bool]) -> Handler:
    """At ``attn.z``: keep the value, take the gradient from :class:`_OVGrad` when ``z`` checks out (module docs)."""

    def h(z: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        v, p = stash.get(f"v{layer}"), stash.get(f"pattern{layer}")
        if v is None or p is None or z.dim() != 4 or v.dim() != 4 or p.dim() != 4 or p.shape[0] != 1:
            used[layer] = False
            return z
        H, n_kv = z.shape[2], v.shape[2]
        if n_kv == 0 or H % n_kv or p.shape[1] != H or p.shape[3] != v.shape[1] or p.shape[2] != z.shape[1]:
            used[layer] = False
            return z
        pat = p[0]
        with torch.no_grad():
            vv = v.detach()[0].to(pat.dtype).repeat_interleave(H // n_kv, dim=1)  # [Tk, H, dh]
            z_check = torch.einsum("hqk,khd->qhd", pat, vv)
            scale = float(z.detach().abs().max()) or 1.0
            tol = 1e-4 if z.dtype == torch.float32 or z.dtype == torch.float64 else 3e-2
            ok = float((z_check - z.detach()[0].to(pat.dtype)).abs().max()) <= tol * scale
        used[layer] = ok
        if not ok:
            return z
        return z.detach() + _OVGrad.apply(v, pat, H, _nonzero_blocks(pat, BLOCK), BLOCK).to(z.dtype)

    return h


class FrozenReplacement:
    """The frozen replacement model of one prompt, linearised once; :meth:`backward` gives gradients of targets.

    Sources (the VJP's inputs): ``"embed"`` and each layer's MLP output site, ``[1, pos, d_model]``
    each in the model's dtype. Targets (its outputs): the transcoders' input sites and ``"ln_final"``.

    Args:
        im: the instrumented model.
        ids: the prompt ``[1, pos]``.
        tcs: the transcoders by layer (:func:`~mishax_py.circuits.transcoders.transcoder_map`).
        sources: ``{"embed": value, mlp_output_site: value, ...}`` the sources' values on the prompt.
        shortcut: take the attention's gradient from the folded product where ``z`` checks out (module docs);
            ``False``: always through the model's own code (the same gradients, slower; for checking).

    Attributes:
        targets: the target site names, in the order :meth:`backward` takes cotangents.
        shortcut_layers: the layers whose attention gradient uses the folded product (module docs).
    """

    def __init__(self, im: InstrumentedModel, ids: torch.Tensor, tcs: TranscoderMap,
                 sources: Mapping[str, torch.Tensor], *, shortcut: bool = True) -> None:
        self.n_layers = im.n_layers
        out_kind = im.family.mlp_output_kind
        self.source_names = ["embed", *[im.layer_site(layer, out_kind) for layer in range(im.n_layers)]]
        self.targets = [*dict.fromkeys(site for _, (_, site) in sorted(tcs.items())), "ln_final"]
        used: dict[int, bool] = {}
        T = ids.shape[1]

        def run(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            stash: dict[str, torch.Tensor] = {}
            handlers: list[tuple[str, Handler]] = [("embed", _source(values[0], stash))]
            for x_site, y_site in im.family.frozen_norms:  # first: a site's stash below sees the frozen value
                handlers += [(x_site, _stash(stash, x_site)), (y_site, _freeze_norm(stash, x_site))]
            for layer in range(im.n_layers):
                tc, in_site = tcs.get(layer, (None, None))
                handlers.append((im.layer_site(layer, "attn.pattern"), _frozen_pattern(stash, layer)))
                v_site, z_site = im.layer_site(layer, "attn.v"), im.layer_site(layer, "attn.z")
                if shortcut and v_site in im.catalogue.by_name and z_site in im.catalogue.by_name:
                    handlers += [(v_site, _stash(stash, f"v{layer}")), (z_site, _ov_shortcut(stash, layer, used))]
                if in_site is not None:
                    handlers.append((in_site, _stash(stash, in_site)))
                handlers.append((self.source_names[layer + 1], _source(values[layer + 1], stash, tc, in_site)))
            handlers.append(("ln_final", _stash(stash, "ln_final")))
            ctx = im.context(None, batch=1, pos=T)
            for name, h in handlers:
                im.add_handler(ctx, name, h)
            with activate(ctx):
                im.forward(ids)
            return tuple(stash[t] for t in self.targets)

        primals = tuple(sources[name] for name in self.source_names)
        # under no_grad: torch.func differentiates with respect to the primals only, and parameters that require
        # gradients do not make torch's autograd record the forward or the backward passes as well
        with torch.no_grad(), transformable(im):  # transformable: layers offloaded by accelerate (mishax_py.devices)
            vjp = torch.func.vjp(run, *primals)
        outs, self._vjp = vjp[0], vjp[1]
        self._shapes = [o.shape for o in outs]
        self._dtypes = [o.dtype for o in outs]
        self._devices = [o.device for o in outs]  # a model split by accelerate: each target on its layer's device
        self.shortcut_layers = sorted(layer for layer, ok in used.items() if ok)
        self._batched = torch.func.vmap(self._vjp)

    def target_shape(self, name: str) -> torch.Size:
        """The shape ``[1, pos, width]`` of target ``name``."""
        return self._shapes[self.targets.index(name)]

    def target_dtype(self, name: str) -> torch.dtype:
        """The dtype of target ``name`` (its cotangents are converted to it)."""
        return self._dtypes[self.targets.index(name)]

    def backward(self, cotangents: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Gradients of ``R`` targets at once.

        Args:
            cotangents: one tensor per name of :attr:`targets`, ``[R, 1, pos, width]`` (zeros where a
                row seeds nothing there).

        Returns:
            One gradient per source (``"embed"``, then each layer's MLP output), ``[R, 1, pos, d_model]``.
        """
        cot = tuple(c.to(device=dv, dtype=dt)
                    for c, dt, dv in zip(cotangents, self._dtypes, self._devices, strict=True))
        with torch.no_grad():
            grads = self._batched(cot)
        home = cotangents[0].device  # the gradients come back on the caller's device, from each source's
        return tuple(g.to(home) for g in grads)
