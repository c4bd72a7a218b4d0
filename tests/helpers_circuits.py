"""Helpers the circuit tests share: a trained transcoder, a linear final norm.

(Not a test module: test modules import these instead of importing each other.)
"""

from __future__ import annotations

import torch
from torch import nn

import saes
from mishax_py import InstrumentedModel


def train_transcoder(im: InstrumentedModel, layer: int, d_sae: int = 64, steps: int = 400, skip: bool = False,
                     seed: int = 0, in_kind: str = "ln2_normalized", out_kind: str = "mlp_out") -> saes.Transcoder:
    """A ReLU transcoder ``blocks.L.{in_kind} -> blocks.L.{out_kind}`` trained for a few hundred Adam steps on
    random prompts (token ids 4..63, so any model with a vocabulary of 64 or more)."""
    g = torch.Generator().manual_seed(seed)
    vocab = im.family.dims.vocab
    ids = torch.randint(min(4, vocab - 1), min(64, vocab), (48, 12), generator=g)
    x_site, y_site = im.layer_site(layer, in_kind), im.layer_site(layer, out_kind)
    with torch.no_grad():
        _, cache = im.run_with_cache(ids, sites=[x_site, y_site])
    d_model = im.family.dims.d_model
    x = cache[x_site].reshape(-1, d_model)
    y = cache[y_site].reshape(-1, d_model)
    tc = saes.Transcoder(d_model, d_sae, d_out=d_model, site=x_site, output_site=y_site, activation="relu", skip=skip)
    torch.manual_seed(seed)
    with torch.no_grad():
        tc.W_enc.normal_(0, d_model ** -0.5)
        tc.W_dec.normal_(0, 0.1 * d_sae ** -0.5)
        tc.b_enc.fill_(-0.05)
    opt = torch.optim.Adam(tc.parameters(), lr=1e-2)
    for _ in range(steps):
        f = tc.encode(x)
        loss = ((tc(x) - y) ** 2).sum(-1).mean() + 3e-3 * f.abs().sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    tc.requires_grad_(False)
    return tc


def linearise_norm(norm: nn.Module, gain: float = 1e15) -> None:
    """Make a Gemma 2 RMSNorm exactly linear: with eps = 1e30, mean(x^2) + eps == eps in float32 (for
    mean(x^2) < ~6e22), so rsqrt(.) is the constant 1e-15; the gain (1 + w) = 1e15 restores the scale."""
    norm.eps = 1e30
    with torch.no_grad():
        norm.weight.fill_(gain - 1)
