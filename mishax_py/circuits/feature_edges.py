"""Feature-circuit edges between successive SAE sites, by the Jacobian-vector trick.

``edge(u -> d) = dm/dd * (dd/du) * (u^patch - u)``, the derivative ``dd/du`` taken through the
model between the two sites with the upstream site's nodes (features and error) as the only
inputs. One backward pass per downstream node; downstream nodes run as replicas of the batch
(see :mod:`mishax_py.circuits.feature_circuits`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from mishax_py.circuits.dictionaries import SAELike, decode_at, encode_at
from mishax_py.execution.forward import forward_with, repeat_rows
from mishax_py.progress import progress_bar
from mishax_py.runtime import Handler, SiteEvent

if TYPE_CHECKING:
    from mishax_py.circuits.feature_circuits import CircuitNode, FeatureCircuit
    from mishax_py.instrumented import InstrumentedModel

__all__ = ["feature_edges"]


def _nodes_as_leaves(sae: SAELike, f_leaf: torch.Tensor, e_leaf: torch.Tensor) -> Handler:
    """The upstream site: its value unchanged, its gradient routed to the feature and error leaves."""

    def h(v: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        xh = decode_at(sae, f_leaf).float()
        moved = (xh - xh.detach()) + (e_leaf - e_leaf.detach())  # zero in value; gradient to the leaves
        return v.detach() + moved.reshape(v.shape).to(v.dtype)

    return h


def _split_in_graph(sae: SAELike, stash: dict[str, torch.Tensor]) -> Handler:
    """The downstream site: its features ``"f"`` and error ``"e"``, kept in the autograd graph, into ``stash``."""

    def h(v: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        y = v.reshape(*v.shape[:2], -1)
        g = encode_at(sae, y).float()
        stash["f"] = g
        stash["e"] = y.float() - decode_at(sae, g).float()
        return v

    return h


def feature_edges(
    im: InstrumentedModel,
    run_ids: torch.Tensor,
    circuit: FeatureCircuit,
    run_nodes: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    grads: Mapping[str, torch.Tensor],
    threshold: float,
    batch_size: int,
    progress: bool | None,
    hf: Mapping[str, Any],
) -> dict[tuple[CircuitNode, CircuitNode], float]:
    """``{(upstream node, downstream node): weight}`` between the selected nodes of successive sites.

    Args:
        im: the instrumented model.
        run_ids: ``[B, T]`` the ids of the run the circuit was found on.
        circuit: the circuit (its sites, selected nodes, SAEs and patch values).
        run_nodes: ``{site: (features [B, T, d_sae], error [B, T, d])}`` on that run.
        grads: ``{site: dm/dx}`` on that run (the site's shape).
        threshold: keep edges with ``|weight| >= threshold`` (and non-zero).
        batch_size: rows per forward: ``batch_size // B`` downstream nodes per backward pass.
        progress: a bar over downstream nodes (see :mod:`mishax_py.progress`).
        hf: passed to the model (per-row tensors repeated for the replicas).
    """
    B, T = run_ids.shape
    per_chunk = max(1, batch_size // B)
    out: dict[tuple[CircuitNode, CircuitNode], float] = {}
    pairs = list(zip(circuit.sites[:-1], circuit.sites[1:], strict=True))
    jobs = [(u, d, n) for u, d in pairs for n in circuit.nodes if n[0] == d]
    bar = progress_bar(len(jobs), "feature-circuit edges", progress if len(jobs) > per_chunk else False)
    for up, down in pairs:
        ups = [n for n in circuit.nodes if n[0] == up]
        downs = [n for n in circuit.nodes if n[0] == down]
        if not ups or not downs:
            continue
        sae_u, sae_d = circuit.saes[up], circuit.saes[down]
        f_u, e_u = run_nodes[up]
        fp_u, ep_u = circuit.ablation_values[up]
        df_u, de_u = (fp_u - f_u).unsqueeze(0), (ep_u - e_u).unsqueeze(0)  # right vectors [1, B, T, .]
        g_d = grads[down].reshape(B, T, -1)  # dm/dy at the downstream site
        gf_d = g_d @ sae_d.W_dec.detach().float().to(g_d.device).T  # dm/dg for downstream features
        for c0 in range(0, len(downs), per_chunk):
            chunk = downs[c0:c0 + per_chunk]
            R = len(chunk)
            ids = run_ids.repeat(R, 1)
            f_leaf = f_u.repeat(R, 1, 1).requires_grad_(True)
            e_leaf = e_u.repeat(R, 1, 1).requires_grad_(True)
            stash: dict[str, torch.Tensor] = {}

            with torch.enable_grad():
                handlers = [(up, _nodes_as_leaves(sae_u, f_leaf, e_leaf)), (down, _split_in_graph(sae_d, stash))]
                forward_with(im, ids, handlers, None, repeat_rows(hf, B, R))
                seed_f = torch.zeros_like(stash["f"])
                seed_e = torch.zeros_like(stash["e"])
                for r, (_s, pos, feat) in enumerate(chunk):
                    rows = slice(r * B, (r + 1) * B)
                    if feat < 0:
                        seed_e[rows, pos] = g_d[:, pos]
                    else:
                        seed_f[rows, pos, feat] = gf_d[:, pos, feat]
                gf, ge = torch.autograd.grad([stash["f"], stash["e"]], [f_leaf, e_leaf], [seed_f, seed_e],
                                             allow_unused=True)
            gf = torch.zeros_like(f_leaf) if gf is None else gf
            ge = torch.zeros_like(e_leaf) if ge is None else ge
            w_f = (gf.view(R, B, T, -1) * df_u).sum(1)  # [R, T, d_sae]
            w_e = (ge.view(R, B, T, -1) * de_u).sum((1, 3))  # [R, T]
            for r, dn in enumerate(chunk):
                for un in ups:
                    _s, pos, feat = un
                    w = float(w_e[r, pos] if feat < 0 else w_f[r, pos, feat])
                    if abs(w) >= threshold and w != 0.0:
                        out[(un, dn)] = w
            bar.update(R)
    bar.close()
    return out
