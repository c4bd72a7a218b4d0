"""SAEs and transcoders for mishax-py: families, file formats, kernels, splicing, training.

::

    import saes
    sae = saes.load("google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71")
    f = sae.encode(x); x_hat = sae.decode(f)
    im.run(ids, interventions={sae.site: saes.Splice(sae, edit=saes.FeatureClamp([123], 8.0))})

Modules: :mod:`saes.base` (families), :mod:`saes.formats` (Gemma Scope npz, SAELens,
hub references), :mod:`saes.canonical` (canonical-SAE table), :mod:`saes.kernels`
(encode/decode kernels), :mod:`saes.splicing` (``Splice`` and feature edits),
:mod:`saes.train` (activation store, JumpReLU/TopK training, evaluation).
"""

from saes.base import SAE, JumpReLUSAE, ReLUSAE, TopKSAE, Transcoder
from saes.formats import SAEFetchError, SAEFileError, load, save_saelens
from saes.splicing import (
    FeatureAblate,
    FeatureClamp,
    FeatureEdit,
    FeatureSteer,
    Splice,
    TranscoderSplice,
    splice,
)

__all__ = [
    "SAE",
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
