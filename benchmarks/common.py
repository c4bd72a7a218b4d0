"""Helpers shared by the benchmark scripts: the machine description, random Gemma 2 models, prompt pairs."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig


def build(spec: dict[str, int], *, sliding_window: int | None = None, max_positions: int = 256) -> Gemma2ForCausalLM:
    """A seeded random-weight Gemma 2 from a spec dict (layers, d_model, heads, kv_heads, d_head, d_mlp, vocab, pos).

    The sliding window defaults to half the benchmark's sequence length, so both layer kinds matter.
    """
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=spec["vocab"], hidden_size=spec["d_model"], intermediate_size=spec["d_mlp"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
        head_dim=spec["d_head"], sliding_window=sliding_window or max(spec["pos"] // 2, 1),
        max_position_embeddings=max(max_positions, spec["pos"]), attn_implementation="eager",
    )
    return Gemma2ForCausalLM(config).eval()


def build_gemma3(spec: dict[str, int], *, sliding_window: int | None = None,
                 max_positions: int = 256) -> Gemma3ForCausalLM:
    """A seeded random-weight Gemma 3 from the same spec dict as :func:`build`.

    QK-norm, GQA, and the release's 5:1 pattern of sliding and global layers (each with its own RoPE
    base); the sliding window defaults to half the benchmark's sequence length, as in :func:`build`.
    """
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=spec["vocab"], hidden_size=spec["d_model"], intermediate_size=spec["d_mlp"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
        head_dim=spec["d_head"], query_pre_attn_scalar=spec["d_head"],
        sliding_window=sliding_window or max(spec["pos"] // 2, 1),
        max_position_embeddings=max(max_positions, spec["pos"]), attn_implementation="eager",
    )
    return Gemma3ForCausalLM(config).eval()


def machine() -> str:
    """CPU model, cores, torch version and threads, python, load average: printed with every result."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),)
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"python {platform.python_version()}, load avg {load[0]:.2f}")


def describe(spec: dict[str, int]) -> str:
    """The model line printed with every result of a spec-built model."""
    return (f"{spec['layers']} layers, d_model {spec['d_model']}, {spec['heads']} heads ({spec['kv_heads']} kv), "
            f"d_head {spec['d_head']}, d_mlp {spec['d_mlp']}, vocab {spec['vocab']}; batch 1 x {spec['pos']} tokens, "
            "fp32")


def prompt_pairs(spec: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                Callable[[torch.Tensor], torch.Tensor]]:
    """``(clean, worst, ioi, metric)``: seeded random prompts ``[1, pos]`` for patching benchmarks.

    ``worst`` differs from ``clean`` at every position (nothing can be skipped); ``ioi`` swaps two
    tokens, at ``pos // 3`` and ``pos // 2`` (IOI-like: two "names"); ``metric`` is the logit difference
    between those two tokens at the last position.
    """
    T, V = spec["pos"], spec["vocab"]
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(4, V, (1, T), generator=g)
    worst = clean.clone()
    while bool((worst == clean).any()):  # differs everywhere
        worst = torch.where(worst == clean, torch.randint(4, V, (1, T), generator=g), worst)
    ioi = clean.clone()
    ioi[0, T // 3], ioi[0, T // 2] = clean[0, T // 2], clean[0, T // 3]
    answer, other = int(clean[0, T // 3]), int(clean[0, T // 2])

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, -1, answer] - logits[:, -1, other]).mean()

    return clean, worst, ioi, metric
