"""Feature-circuit ablations: every SAE spliced in, the nodes outside a set moved to their patch values.

What :meth:`~mishax_py.circuits.feature_circuits.FeatureCircuit.evaluate` runs for faithfulness
and completeness (see :mod:`mishax_py.circuits.feature_circuits`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from mishax_py.circuits.dictionaries import SAELike, decode_at, encode_at
from mishax_py.interventions import Intervention
from mishax_py.runtime import SiteEvent

if TYPE_CHECKING:
    from mishax_py.circuits.feature_circuits import CircuitNode, FeatureCircuit

__all__ = ["ablate_complement"]


class _NodeAblation(Intervention):
    """At a site: encode, set the features/error not kept to their ablation values, decode + error."""

    def __init__(self, sae: SAELike, keep_f: torch.Tensor, keep_e: torch.Tensor, abl_f: torch.Tensor,
                 abl_e: torch.Tensor) -> None:
        self.sae, self.keep_f, self.keep_e, self.abl_f, self.abl_e = sae, keep_f, keep_e, abl_f, abl_e

    def apply(self, value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        if event.rows is not None:
            raise ValueError("feature-circuit ablations do not run inside row-restricted sweeps")
        x = value.reshape(*value.shape[:2], -1)
        f = encode_at(self.sae, x)
        err = x.to(f.dtype) - decode_at(self.sae, f)
        T = x.shape[1]
        f = torch.where(self.keep_f[:T], f, self.abl_f[:, :T].to(f.dtype))
        err = torch.where(self.keep_e[:T, None], err, self.abl_e[:, :T].to(err.dtype))
        return (decode_at(self.sae, f) + err).to(value.dtype).reshape(value.shape)

    def __repr__(self) -> str:
        return f"NodeAblation(kept {int(self.keep_f.sum())} features, {int(self.keep_e.sum())} error nodes)"


def ablate_complement(circuit: FeatureCircuit, keep: Iterable[CircuitNode] | None,
                      invert: bool = False) -> dict[str, Intervention]:
    """Interventions splicing every SAE of ``circuit`` with the nodes outside ``keep`` ablated.

    ``keep=None`` keeps every node (the spliced model, equal to the original up to float
    error); ``invert=True`` ablates ``keep`` instead (the complement survives). Ablation
    values are the circuit's (``mean``/``zero``/``patch``), for the batch it was found on.
    """
    out: dict[str, Intervention] = {}
    keep_set = None if keep is None else set(keep)
    for s in circuit.sites:
        abl_f, abl_e = circuit.ablation_values[s]
        T, F = abl_f.shape[1], abl_f.shape[2]  # batch 1 (mean/zero) broadcasts to any batch
        kf = torch.zeros(T, F, dtype=torch.bool, device=abl_f.device)
        ke = torch.zeros(T, dtype=torch.bool, device=abl_f.device)
        if keep_set is None:
            kf[:], ke[:] = True, True
        else:
            for site, pos, feat in keep_set:
                if site != s:
                    continue
                if feat < 0:
                    ke[pos] = True
                else:
                    kf[pos, feat] = True
        if invert:
            kf, ke = ~kf, ~ke
        out[s] = _NodeAblation(circuit.saes[s], kf, ke, abl_f, abl_e)
    return out
