"""Shared fixtures: small random Gemma 2 models (real Gemma2ForCausalLM, random weights)."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

import instrumentation.gemma2 as g2
from mishax_py import InstrumentedModel


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one intra-op thread (restored afterwards).

    Modules of tiny tensors use it (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a
    shared 2-core CPU, two threads are several times slower for them.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**overrides: object) -> Gemma2Config:
    """A 2-layer Gemma 2 with every Gemma 2 feature on: GQA, soft-caps, sliding window < context."""
    kwargs: dict[str, object] = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        max_position_embeddings=64,
        attn_implementation="eager",
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    kwargs.update(overrides)
    return Gemma2Config(**kwargs)


def make_model(seed: int = 0, **overrides: object) -> Gemma2ForCausalLM:
    """A random-weight Gemma 2; norm gains are randomised too so `(1 + w)` is exercised."""
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.2)
    return model


@pytest.fixture
def tiny_model() -> Gemma2ForCausalLM:
    return make_model()


@pytest.fixture
def tiny_im(tiny_model: Gemma2ForCausalLM) -> InstrumentedModel:
    return g2.instrument(tiny_model)


@pytest.fixture
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(4, 64, (2, 10), generator=g)
