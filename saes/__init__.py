"""SAEs and transcoders for mishax-py: families, file formats, kernels, splicing, training.

::

    import saes
    sae = saes.load("google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71")
    f = sae.encode(x); x_hat = sae.decode(f)
    im.run(ids, interventions={sae.site: saes.Splice(sae, edit=saes.FeatureClamp([123], 8.0))})

Modules: :mod:`saes.base` (families; ``SAE.save`` writes a SAELens folder), :mod:`saes.formats`
(loading Gemma Scope npz and SAELens folders), :mod:`saes.hub` (hub references: parse, fetch),
:mod:`saes.sites` (an SAE's sites from SAELens hook names and Gemma Scope repo names),
:mod:`saes.canonical` (canonical-SAE table), :mod:`saes.files` (atomic writes, SAELens file
names), :mod:`saes.kernels` (encode/decode kernels), :mod:`saes.edits` (feature edits),
:mod:`saes.splicing` (``Splice``, ``TranscoderSplice``), :mod:`saes.clt` (cross-layer transcoders and
crosscoders: ``CrossLayerTranscoder``, ``CLTSplice``), :mod:`saes.store` (activation store),
:mod:`saes.train` (JumpReLU/TopK training; re-exports the store and evaluation),
:mod:`saes.checkpoint` (atomic, pickle-free training checkpoints),
:mod:`saes.parallel` (training and collection across torch.distributed ranks: the collectives),
:mod:`saes.evaluation` (L0, FVU, delta LM loss).

Imports run one way: ``files``, ``sites``, ``kernels``, ``canonical``, ``edits``, ``checkpoint``,
``parallel`` import no other ``saes`` module (``hub`` only ``canonical`` and ``files``); ``base`` imports ``files``,
``sites`` and ``kernels``; ``clt`` imports ``edits``, ``files``, ``gemma_scope_2`` and ``kernels``;
``formats`` (above ``base`` and ``clt``), ``splicing`` and ``store`` sit above ``base``;
``evaluation`` above ``splicing`` and ``store``; ``train`` on top.
"""

from saes.base import SAE, JumpReLUSAE, ReLUSAE, TopKSAE, Transcoder
from saes.clt import CLTSplice, CrossLayerTranscoder
from saes.edits import FeatureAblate, FeatureClamp, FeatureEdit, FeatureSteer
from saes.formats import SAEFetchError, SAEFileError, load, save_saelens
from saes.splicing import Splice, TranscoderSplice, splice

__all__ = [
    "SAE",
    "CLTSplice",
    "CrossLayerTranscoder",
    "FeatureAblate",
    "FeatureClamp",
    "FeatureEdit",
    "FeatureSteer",
    "JumpReLUSAE",
    "ReLUSAE",
    "SAEFetchError",
    "SAEFileError",
    "Splice",
    "TopKSAE",
    "Transcoder",
    "TranscoderSplice",
    "load",
    "save_saelens",
    "splice",
]
