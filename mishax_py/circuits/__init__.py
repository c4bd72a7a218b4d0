"""Circuit tracing on top of the instrumented model.

* :mod:`mishax_py.circuits.graph` -- transcoder attribution graphs (the circuit-tracer method,
  Ameisen et al. 2025): a linear replacement model with frozen attention patterns and
  norm scales, direct attributions between tokens, transcoder features, error nodes and
  logits, influence pruning, Neuronpedia-compatible JSON and a matplotlib rendering.
* :mod:`mishax_py.circuits.replacement` -- interventions that run a prompt's local replacement
  model (with feature clamps), to check a graph's claims in the model it describes.
* :mod:`mishax_py.circuits.feature_circuits` -- sparse feature circuits (Marks et al. 2024):
  attribution of a metric to SAE features and error nodes, edges between successive sites,
  thresholded circuits, faithfulness and completeness by ablation.

SAEs and transcoders are taken as arguments (duck-typed: ``encode``, ``decode``,
``pre_acts``, ``W_dec``, ``b_dec``, ``site`` / ``output_site``); this package does not
import ``saes`` at module level.
"""

from mishax_py.circuits.feature_circuits import (
    FeatureCircuit,
    ablate_complement,
    feature_circuit,
)
from mishax_py.circuits.graph import (
    AttributionGraph,
    attribution_graph,
    load_graph_json,
    render_graph,
)
from mishax_py.circuits.replacement import replacement_interventions

__all__ = [
    "AttributionGraph",
    "FeatureCircuit",
    "ablate_complement",
    "attribution_graph",
    "feature_circuit",
    "load_graph_json",
    "render_graph",
    "replacement_interventions",
]
