"""The bundled trained tiny Gemma 2: offline loading, Gemma 2 features, and that it really solves its tasks."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2ForCausalLM

from mishax_py import zoo
from mishax_py.zoo import tasks

# Seeds never used for training data (the script draws training data from seed + 1_000_003).
FRESH_SEEDS = (31337, 8086)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def loaded(monkeypatch_module: pytest.MonkeyPatch) -> tuple[Gemma2ForCausalLM, object]:
    """The bundled model and tokenizer, loaded with the hub forced offline."""
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setenv("TRANSFORMERS_OFFLINE", "1")
    return zoo.load("gemma2-tiny")


@pytest.fixture(scope="module")
def monkeypatch_module():
    """A module-scoped MonkeyPatch (pytest's own fixture is function-scoped)."""
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_load_offline_returns_real_gemma2(loaded) -> None:
    model, tok = loaded
    assert isinstance(model, Gemma2ForCausalLM)
    assert not model.training
    assert model.config._attn_implementation == "eager"
    assert next(model.parameters()).dtype == torch.float32
    assert "gemma2-tiny" in zoo.MODELS


def test_unknown_name_lists_available() -> None:
    with pytest.raises(KeyError, match="gemma2-tiny"):
        zoo.load("gemma2-huge")


def test_config_has_every_gemma2_feature(loaded) -> None:
    cfg = loaded[0].config
    assert cfg.model_type == "gemma2"
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.attn_logit_softcapping == 50.0
    assert cfg.final_logit_softcapping == 30.0
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    assert cfg.layer_types[0] == "sliding_attention" and cfg.layer_types[1] == "full_attention"
    assert cfg.sliding_window < 2 * 24 + 1 <= cfg.max_position_embeddings  # induction must span > window
    assert cfg.vocab_size == tasks.VOCAB_SIZE
    layer = loaded[0].model.layers[0]
    for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"):
        assert hasattr(layer, norm)


def test_tokenizer_round_trip_and_specials(loaded) -> None:
    _, tok = loaded
    assert tok.bos_token_id == tasks.BOS_ID == 2
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 3)
    assert len(tok) == tasks.VOCAB_SIZE
    text = "k1 v2 k7 v40 ? k7"
    ids = tok(text)["input_ids"]
    assert ids[0] == tasks.BOS_ID
    assert ids == [2, tasks.KEY_START + 1, tasks.VALUE_START + 2, tasks.KEY_START + 7, tasks.VALUE_START + 40,
                   tasks.QUERY_ID, tasks.KEY_START + 7]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_ids_to_tokens(list(range(tasks.VOCAB_SIZE))) == tasks.token_names()


@pytest.mark.parametrize("seed", FRESH_SEEDS)
def test_induction_accuracy_on_fresh_prompts(loaded, seed: int) -> None:
    acc = tasks.induction_accuracy(loaded[0], 256, seed=seed)
    assert acc >= 0.95, acc


def test_induction_works_beyond_the_sliding_window(loaded) -> None:
    # half-length 24: the earlier copy is 25 positions back, three times the window.
    acc = tasks.induction_accuracy(loaded[0], 128, seed=99, seq_len=24)
    assert acc >= 0.95, acc


@pytest.mark.parametrize("seed", FRESH_SEEDS)
def test_recall_accuracy_on_fresh_prompts(loaded, seed: int) -> None:
    acc = tasks.recall_accuracy(loaded[0], 256, seed=seed)
    assert acc >= 0.95, acc


def test_corrupt_induction_prompts_are_not_predictable(loaded) -> None:
    clean, corrupt = tasks.induction_clean_corrupt(64, seq_len=16, seed=5)
    assert tasks.batch_accuracy(loaded[0], clean) >= 0.95
    assert tasks.batch_accuracy(loaded[0], corrupt) <= 0.2


def test_recall_clean_corrupt_answers_follow_the_query(loaded) -> None:
    clean, corrupt = tasks.recall_clean_corrupt(64, n_pairs=8, seed=6)
    assert (clean.info["answer"] != corrupt.info["answer"]).all()
    assert tasks.batch_accuracy(loaded[0], clean) >= 0.95
    assert tasks.batch_accuracy(loaded[0], corrupt) >= 0.95
