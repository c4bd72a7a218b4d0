"""Circuit tracing on top of the instrumented model.

Transcoder attribution graphs (the circuit-tracer method, Ameisen et al. 2025): a linear
replacement model with frozen attention patterns and norm scales, direct attributions between
tokens, transcoder features, error nodes and logits, influence pruning, Neuronpedia-compatible
JSON and a matplotlib rendering. Modules, one job each:

* :mod:`~mishax_py.circuits.build`: :func:`attribution_graph` (the frozen forward, the rows of the
  adjacency matrix by batched backward passes; the method's description);
* :mod:`~mishax_py.circuits.frozen`: the frozen replacement model of a prompt as one linear map, and its
  batched backward passes;
* :mod:`~mishax_py.circuits.graph_memory`: a graph's memory estimate and the batch size that fits a budget
  (:func:`estimate_graph_memory` counts a prompt's features and applies it);
* :mod:`~mishax_py.circuits.graph`: :class:`AttributionGraph` (the nodes, the adjacency, what a
  clamp does);
* :mod:`~mishax_py.circuits.graphs`: :func:`attribution_graphs`, one graph per prompt (split across
  processes inside ``mishax_py.distributed.split()``);
* :mod:`~mishax_py.circuits.prune`: node influence and influence pruning;
* :mod:`~mishax_py.circuits.json_format`: circuit-tracer's graph-file format, export and :func:`load_graph_json`;
* :mod:`~mishax_py.circuits.render`: :func:`render_graph`, the static picture;
* :mod:`~mishax_py.circuits.viewer`: ``AttributionGraph.to_html``, the interactive viewer (one offline HTML file);
* :mod:`~mishax_py.circuits.transcoders`: which layer a transcoder replaces, its features and output;
* :mod:`~mishax_py.circuits.replacement`: :func:`replacement_interventions`, runs of a prompt's local
  replacement model (with feature clamps), to check a graph's claims in the model it describes.

Sparse feature circuits (Marks et al. 2024), :mod:`~mishax_py.circuits.feature_circuits`:
attribution of a metric to SAE features and error nodes, edges between successive sites,
thresholded circuits, faithfulness and completeness by ablation.

SAEs and transcoders are taken as arguments, typed structurally
(:mod:`~mishax_py.circuits.dictionaries`: :class:`SAELike`, :class:`TranscoderLike`, which
``saes.SAE`` and ``saes.Transcoder`` satisfy); this package does not import ``saes``.
"""

from mishax_py.circuits.build import DEFAULT_MAX_FEATURE_NODES, attribution_graph, estimate_graph_memory
from mishax_py.circuits.dictionaries import SAELike, TranscoderLike
from mishax_py.circuits.feature_circuits import (
    FeatureCircuit,
    ablate_complement,
    feature_circuit,
)
from mishax_py.circuits.graph import AttributionGraph
from mishax_py.circuits.graphs import attribution_graphs
from mishax_py.circuits.json_format import load_graph_json
from mishax_py.circuits.render import render_graph
from mishax_py.circuits.replacement import replacement_interventions
from mishax_py.circuits.viewer import graph_to_html

__all__ = [
    "DEFAULT_MAX_FEATURE_NODES",
    "AttributionGraph",
    "FeatureCircuit",
    "SAELike",
    "TranscoderLike",
    "ablate_complement",
    "attribution_graph",
    "attribution_graphs",
    "estimate_graph_memory",
    "feature_circuit",
    "graph_to_html",
    "load_graph_json",
    "render_graph",
    "replacement_interventions",
]
