"""The model zoo: tiny, trained Gemma 2 and Gemma 3 models shipped inside the package.

``load("gemma2-tiny")`` returns a real ``transformers.Gemma2ForCausalLM`` and
``load("gemma3-tiny")`` a real ``transformers.Gemma3ForCausalLM`` (loaded with
``from_pretrained`` from ``mishax_py/zoo/data/<name>/``, offline), each with its word-level
tokenizer. Both were trained by ``scripts/train_tiny_gemma2.py`` (``--family gemma3`` for
the second) on the tasks in ``mishax_py.zoo.tasks`` so their mechanisms are known (see
the model card README.md in each data folder). :func:`instrument` picks the
instrumentation module by the model's ``config.model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from mishax_py.zoo import tasks

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

    from mishax_py.instrumented import InstrumentedModel

__all__ = [
    "ZooModel", "MODELS", "DATA_DIR", "INSTRUMENTATION", "FAMILY_LABELS", "model_path", "load", "load_checkpoint",
    "build_tokenizer", "instrument", "supported_model_types",
]  # fmt: skip

DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class ZooModel:
    """Registry entry of a bundled model.

    Attributes:
        folder: sub-folder of ``DATA_DIR`` holding ``config.json``, ``model.safetensors`` and tokenizer.
        description: what the model is.
        tasks: names of the ``mishax_py.zoo.tasks`` generators it was trained on.
        mechanisms: the circuits it is expected to implement (what tools should find).
        train_command: how to rebuild it from scratch.
    """

    folder: str
    description: str
    tasks: tuple[str, ...]
    mechanisms: str
    train_command: str


MODELS: dict[str, ZooModel] = {
    "gemma2-tiny": ZooModel(
        folder="gemma2-tiny",
        description=(
            "Gemma2ForCausalLM, 4 layers (sliding window 8 on layers 0 and 2, global on 1 and 3), "
            "d_model 64, 4 query heads / 2 KV heads of dim 16, d_mlp 256, vocab 133 (word level), "
            "context 64, attention soft-cap 50, final soft-cap 30; 255k parameters, fp32."
        ),
        tasks=("induction_batch", "recall_batch"),
        mechanisms=(
            "Induction (repeat a random sequence) and key-value recall ('<bos> k v .. ? k' -> v) share "
            "one circuit: the 4 heads of layer 0 (sliding) are previous-token heads, the 4 heads of "
            "layer 1 (global) are induction heads attending to the token after the earlier copy; "
            "layers 2-3 are not needed (layer 3 heads rest on <bos>). Heads within a layer are "
            "redundant: ablate a whole layer's heads to break a task."
        ),
        train_command="python scripts/train_tiny_gemma2.py",
    ),
    "gemma3-tiny": ZooModel(
        folder="gemma3-tiny",
        description=(
            "Gemma3ForCausalLM, 6 layers in Gemma 3's 5:1 pattern (sliding window 8 on layers 0-4, global "
            "on 5; RoPE bases 10k / 1M), QK-norm, no soft-caps, d_model 64, 4 query heads / 2 KV heads of "
            "dim 16, d_mlp 256, vocab 133 (word level), context 64; fp32."
        ),
        tasks=("induction_batch", "recall_batch"),
        mechanisms=(
            "The same shared circuit as gemma2-tiny, split by Gemma 3's layer pattern: previous-token heads "
            "in the sliding layers (mostly layer 1, heads 2-3; layer 2 helps), and the 4 heads of layer 5 "
            "(the one global layer) are the induction heads, attending to the token after the earlier copy "
            "beyond the window. Zero-ablating layer 5's heads breaks both tasks (0%); layer 1's leaves ~35%."
        ),
        train_command="python scripts/train_tiny_gemma2.py --family gemma3",
    ),
}

# config.model_type -> (transformers class name, instrumentation module) for the checkpoints the zoo
# loads: the bundled models and local Gemma 2 / Gemma 3 folders (``gemma3``: the multimodal 4B-27B
# checkpoints, whose text decoder is instrumented).
INSTRUMENTATION: dict[str, tuple[str, str]] = {
    "gemma2": ("Gemma2ForCausalLM", "instrumentation.gemma2"),
    "gemma3_text": ("Gemma3ForCausalLM", "instrumentation.gemma3"),
    "gemma3": ("Gemma3ForConditionalGeneration", "instrumentation.gemma3"),
}
#: config.model_type -> the family's name as the CLI and the demo print it.
FAMILY_LABELS: dict[str, str] = {"gemma2": "Gemma 2", "gemma3_text": "Gemma 3", "gemma3": "Gemma 3"}


def supported_model_types() -> str:
    """The ``model_type`` values the zoo loads, for error messages: ``'gemma2', 'gemma3_text', 'gemma3'``."""
    return ", ".join(repr(t) for t in INSTRUMENTATION)


def _model_class(folder: Path) -> type[PreTrainedModel]:
    """The causal-LM class for the checkpoint in ``folder`` (by its config's ``model_type``).

    Raises:
        ValueError: a ``model_type`` the zoo does not load (the message names it and the supported ones).
    """
    import transformers
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(folder, local_files_only=True).model_type
    if model_type not in INSTRUMENTATION:
        raise ValueError(f"{folder}: config.json model_type {model_type!r} is not supported "
                         f"(supported: {supported_model_types()})")  # fmt: skip
    cls: type[PreTrainedModel] = getattr(transformers, INSTRUMENTATION[model_type][0])
    return cls


def instrument(model: PreTrainedModel) -> InstrumentedModel:
    """Instrument ``model`` with the module of its family (``instrumentation.gemma2`` or ``.gemma3``).

    Raises:
        ValueError: a ``config.model_type`` with no instrumentation (the message names it).
    """
    import importlib

    model_type = getattr(model.config, "model_type", None)
    if model_type not in INSTRUMENTATION:
        raise ValueError(f"no instrumentation for model_type {model_type!r} "
                         f"(supported: {supported_model_types()})")  # fmt: skip
    module = importlib.import_module(INSTRUMENTATION[model_type][1])
    im: InstrumentedModel = module.instrument(model)
    return im


def model_path(name: str = "gemma2-tiny") -> Path:
    """Folder holding the bundled files of ``name``; raises ``KeyError`` listing valid names if unknown."""
    if name not in MODELS:
        raise KeyError(f"unknown zoo model {name!r}; available: {', '.join(sorted(MODELS))}")
    return DATA_DIR / MODELS[name].folder


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the word-level tokenizer of the task vocabulary (``tasks.token_names()``).

    Words are split on whitespace and mapped one-to-one to ids (``<pad>`` 0, ``<eos>`` 1,
    ``<bos>`` 2, ``<unk>`` 3, ``?`` 4, ``k0..k63`` 5..68, ``v0..v63`` 69..132); encoding
    prepends ``<bos>`` like Gemma's tokenizer, decoding joins words with spaces. Imported
    lazily so ``mishax_py.zoo`` stays cheap to import.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {name: i for i, name in enumerate(tasks.token_names())}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tasks.BOS_ID)]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=64,
        clean_up_tokenization_spaces=False,
    )


def load(
    name: str = "gemma2-tiny",
    *,
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a bundled model and its tokenizer through ``from_pretrained``, offline.

    Args:
        name: a key of ``MODELS`` (``"gemma2-tiny"``, ``"gemma3-tiny"``).
        attn_implementation: passed to ``from_pretrained``. ``"eager"`` (default) is the
            implementation that applies Gemma 2's attention soft-cap and exposes attention
            scores/patterns (transformers 5.23-5.24 refuse ``"sdpa"`` for Gemma 2).
            The class is ``Gemma2ForCausalLM`` or ``Gemma3ForCausalLM`` by the stored config.
        dtype: parameter dtype (trained and stored in float32).
        device: optional device to move the model to.

    Returns:
        ``(model, tokenizer)``: the model in eval mode, and a ``PreTrainedTokenizerFast``.

    Raises:
        KeyError: unknown ``name`` (the message lists the available names).
        FileNotFoundError: the bundled files are missing (message says how to rebuild them).
    """
    from transformers import PreTrainedTokenizerFast

    folder = model_path(name)
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"zoo model {name!r} is missing {', '.join(missing)} in {folder}; "
            f"rebuild it with `{MODELS[name].train_command}`"
        )
    model = _model_class(folder).from_pretrained(
        folder, attn_implementation=attn_implementation, dtype=dtype, local_files_only=True
    )
    model.eval()
    if device is not None:
        nn.Module.to(model, torch.device(device))  # the plain Module method: transformers wraps .to
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


def load_checkpoint(
    name_or_path: str, *, tokenizer: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a bundled model by name, or a local Gemma 2 / Gemma 3 checkpoint folder, offline.

    The one loader behind ``mishax-py sites --model`` and ``mishax-py demo --model``. A folder's
    class follows its config's ``model_type`` (``INSTRUMENTATION``: ``Gemma2ForCausalLM``,
    ``Gemma3ForCausalLM``, ``Gemma3ForConditionalGeneration``); :func:`instrument` then picks the
    instrumentation module the same way.

    Args:
        name_or_path: a key of ``MODELS`` (see :func:`load`) or a folder written by
            ``save_pretrained`` (loaded with eager attention, so attention scores and patterns
            exist and Gemma 2's soft-cap applies).
        tokenizer: also load the folder's tokenizer (``None`` when it has no tokenizer files).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        FileNotFoundError: ``name_or_path`` is neither a bundled model nor a folder (the message
            says what to download), or a bundled model's files are missing.
        ValueError: the folder's ``model_type`` is not one the zoo loads (names it and the supported ones).
    """
    if name_or_path in MODELS:
        bundled, bundled_tok = load(name_or_path)
        return bundled, (bundled_tok if tokenizer else None)
    folder = Path(name_or_path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a bundled model ({', '.join(MODELS)}) nor a local folder. Download a "
            "checkpoint first (e.g. `hf download google/gemma-2-2b --local-dir DIR`) and pass DIR."
        )
    model = _model_class(folder).from_pretrained(folder, attn_implementation="eager", local_files_only=True).eval()
    tok: PreTrainedTokenizerBase | None = None
    tok_files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if tokenizer and any((folder / f).is_file() for f in tok_files):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tok
