"""A second model family that is not Hugging Face's: a 2-layer toy transformer and its family module.

It proves the core's family boundary: nothing in ``mishax_py`` knows this model, yet runs,
caches, interventions, sweeps, walks and studies work on it through
:class:`mishax_py.family.ModelFamily` and a :class:`mishax_py.sites.SiteCatalogue`.

The model writes its ``tag(...)`` calls directly in its source (a family for a model you own
needs no AST patches) and keeps the calling convention the core relies on:
``model(input_ids=ids, **kwargs).logits``, ``begin_forward`` once per forward and
``skip_layer`` before each layer. Pre-norm blocks with RMSNorm, causal multi-head attention
with a learned position embedding (no RoPE), a GELU MLP; ``d_model`` 16, 2 heads of 8.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from mishax_py import InstrumentedModel
from mishax_py.family import AttentionSpec, ModelDims
from mishax_py.naming import layer_site, tl_alias
from mishax_py.runtime import begin_forward, skip_layer, tag
from mishax_py.sites import BATCH, KEY_POS, POS, SiteCatalogue, SiteSpec

__all__ = ["ToyFamily", "ToyTransformer", "instrument_toy", "make_toy"]


class RMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_head: int) -> None:
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_head
        self.q_proj = nn.Linear(d_model, n_heads * d_head, bias=False)
        self.k_proj = nn.Linear(d_model, n_heads * d_head, bias=False)
        self.v_proj = nn.Linear(d_model, n_heads * d_head, bias=False)
        self.o_proj = nn.Linear(n_heads * d_head, d_model, bias=False)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        b, p, _ = x.shape
        shape = (b, p, self.n_heads, self.d_head)
        q = tag(self, "q", self.q_proj(x).view(shape))  # [b, p, h, d]
        k = tag(self, "k", self.k_proj(x).view(shape))
        v = tag(self, "v", self.v_proj(x).view(shape))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.d_head)
        allowed = torch.ones(p, p, dtype=torch.bool, device=x.device).tril()[None, None]
        if pad_mask is not None:
            allowed = allowed & pad_mask[:, None, None, :].bool()
        scores = tag(self, "scores", scores.masked_fill(~allowed, torch.finfo(scores.dtype).min))
        pattern = tag(self, "pattern", torch.softmax(scores, dim=-1))
        z = tag(self, "z", torch.einsum("bhqk,bkhd->bqhd", pattern, v))
        return self.o_proj(z.reshape(b, p, -1))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_head: int, d_mlp: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = RMSNorm(d_model), RMSNorm(d_model)
        self.attn = Attention(d_model, n_heads, d_head)
        self.up, self.down = nn.Linear(d_model, d_mlp), nn.Linear(d_mlp, d_model)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        x = tag(self, "resid_pre", x)
        x = tag(self, "resid_mid", x + tag(self, "attn_out", self.attn(tag(self, "ln1", self.ln1(x)), pad_mask)))
        pre = tag(self, "mlp_pre", self.up(tag(self, "ln2", self.ln2(x))))
        mlp_out = tag(self, "mlp_out", self.down(tag(self, "mlp_post", nn.functional.gelu(pre))))
        return tag(self, "resid_post", x + mlp_out)


class ToyTransformer(nn.Module):
    """A 2-layer causal transformer over a 24-token vocabulary (random weights unless trained)."""

    def __init__(self, *, vocab: int = 24, d_model: int = 16, n_heads: int = 2, d_head: int = 8, d_mlp: int = 32,
                 n_layers: int = 2, max_pos: int = 64) -> None:
        super().__init__()
        self.vocab, self.d_model, self.n_heads, self.d_head, self.d_mlp = vocab, d_model, n_heads, d_head, d_mlp
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_pos, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_head, d_mlp) for _ in range(n_layers))
        self.ln_final = RMSNorm(d_model)
        self.unembed = nn.Linear(d_model, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, use_cache: bool = False,
                **_: Any) -> SimpleNamespace:
        begin_forward(self, None)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = tag(self, "embed", self.embed(input_ids) + self.pos(positions)[None])
        for i, block in enumerate(self.blocks):
            if skip_layer(self, i):
                continue
            x = block(x, attention_mask)
        logits = tag(self, "logits", self.unembed(tag(self, "ln_final", self.ln_final(x))))
        return SimpleNamespace(logits=logits)


class ToyFamily:
    """The toy transformer's facts for studies (implements :class:`mishax_py.family.ModelFamily`)."""

    name = "toy"
    supports_kv_prefix = False
    mlp_input_kinds = ("ln2",)
    mlp_output_kind = "mlp_out"

    def __init__(self, model: ToyTransformer) -> None:
        n = len(model.blocks)
        self.dims = ModelDims(n_layers=n, d_model=model.d_model, d_mlp=model.d_mlp, n_heads=model.n_heads,
                              n_kv_heads=model.n_heads, d_head=model.d_head, vocab=model.vocab)
        self.frozen_norms = [pair for L in range(n) for pair in ((layer_site(L, "resid_pre"), layer_site(L, "ln1")),
                                                                  (layer_site(L, "resid_mid"), layer_site(L, "ln2")))]
        self.frozen_norms.append((layer_site(n - 1, "resid_post"), "ln_final"))
        self._attention = AttentionSpec(scale=model.d_head ** -0.5)

    def attention(self, layer: int) -> AttentionSpec:
        return self._attention

    def ensure_installed(self) -> None:
        """Nothing to install: the tags are in the model's own source."""


def _catalogue(model: ToyTransformer) -> SiteCatalogue:
    d, h, dh, dm = model.d_model, model.n_heads, model.d_head, model.d_mlp
    stream, heads, amap = (BATCH, POS, d), (BATCH, POS, h, dh), (BATCH, h, POS, KEY_POS)

    def spec(name: str, owner: nn.Module, local: str, layer: int | None, dims: tuple[int | str, ...]) -> SiteSpec:
        return SiteSpec(name, owner, local, layer, dims, f"ToyTransformer: {local}", tl_alias(name))

    specs = [spec("embed", model, "embed", None, stream)]
    for L, block in enumerate(model.blocks):
        assert isinstance(block, Block)  # for the type checker: an nn.ModuleList yields nn.Module
        a = block.attn
        specs += [
            spec(layer_site(L, "resid_pre"), block, "resid_pre", L, stream),
            spec(layer_site(L, "ln1"), block, "ln1", L, stream),
            spec(layer_site(L, "attn.q"), a, "q", L, heads),
            spec(layer_site(L, "attn.k"), a, "k", L, heads),
            spec(layer_site(L, "attn.v"), a, "v", L, heads),
            spec(layer_site(L, "attn.scores"), a, "scores", L, amap),
            spec(layer_site(L, "attn.pattern"), a, "pattern", L, amap),
            spec(layer_site(L, "attn.z"), a, "z", L, heads),
            spec(layer_site(L, "attn_out"), block, "attn_out", L, stream),
            spec(layer_site(L, "resid_mid"), block, "resid_mid", L, stream),
            spec(layer_site(L, "ln2"), block, "ln2", L, stream),
            spec(layer_site(L, "mlp.pre"), block, "mlp_pre", L, (BATCH, POS, dm)),
            spec(layer_site(L, "mlp.post"), block, "mlp_post", L, (BATCH, POS, dm)),
            spec(layer_site(L, "mlp_out"), block, "mlp_out", L, stream),
            spec(layer_site(L, "resid_post"), block, "resid_post", L, stream),
        ]
    specs += [spec("ln_final", model, "ln_final", None, stream),
              spec("logits", model, "logits", None, (BATCH, POS, model.vocab))]
    return SiteCatalogue(specs)


def instrument_toy(model: ToyTransformer) -> InstrumentedModel:
    """The toy family's ``instrument()``: a catalogue and a family for this model instance."""
    return InstrumentedModel(model, _catalogue(model), ToyFamily(model))


def make_toy(seed: int = 0) -> ToyTransformer:
    """The tests' toy transformer: random weights drawn after ``torch.manual_seed(seed)``, in eval mode."""
    torch.manual_seed(seed)
    return ToyTransformer().eval()
