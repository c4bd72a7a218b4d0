"""The structural types of SAEs and transcoders: the ``saes`` classes satisfy them, other objects do not."""

from __future__ import annotations

import saes
from mishax_py.circuits import SAELike, TranscoderLike


def test_saes_classes_satisfy_the_protocols():
    for sae in (saes.ReLUSAE(8, 16, site="blocks.0.resid_post"), saes.JumpReLUSAE(8, 16), saes.TopKSAE(8, 16, k=2)):
        assert isinstance(sae, SAELike), type(sae).__name__
    tc = saes.Transcoder(8, 16, site="blocks.0.ln2_normalized", output_site="blocks.0.mlp_out")
    assert isinstance(tc, SAELike) and isinstance(tc, TranscoderLike)
    assert not isinstance(object(), SAELike) and not isinstance(object(), TranscoderLike)


def test_an_object_with_the_members_is_one():
    """Structural: no base class needed (a dictionary from another library, wrapped in a few lines)."""

    class Wrapped:
        site = "blocks.0.resid_post"
        W_dec = None

        def encode(self, x):
            return x

        def decode(self, f):
            return f

    assert isinstance(Wrapped(), SAELike)
    assert not isinstance(Wrapped(), TranscoderLike)  # no pre_acts, activation, W_enc, b_dec, output_site
