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


# ------------------------------------------------------------------------- gemma3-tiny
# Ground truth from the model card (mishax_py/zoo/data/gemma3-tiny/README.md, measured by the
# training script's mechanism_report on raw HF attentions): on induction prompts whose earlier
# copy lies beyond the sliding window, the heads of the one global layer are the induction heads.
G3_GLOBAL_LAYER = 5
G3_INDUCTION_HEADS = [(G3_GLOBAL_LAYER, h) for h in range(4)]


@pytest.fixture(scope="module")
def loaded3(monkeypatch_module: pytest.MonkeyPatch):
    """The bundled gemma3-tiny and its tokenizer, loaded with the hub forced offline."""
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setenv("TRANSFORMERS_OFFLINE", "1")
    return zoo.load("gemma3-tiny")


@pytest.fixture(scope="module")
def im3(loaded3):
    """gemma3-tiny instrumented (through the zoo's family dispatch: instrumentation.gemma3)."""
    from mishax_py.zoo.models import instrument

    return instrument(loaded3[0])


def test_gemma3_tiny_loads_offline_as_a_real_gemma3(loaded3) -> None:
    from transformers import Gemma3ForCausalLM

    model, tok = loaded3
    assert isinstance(model, Gemma3ForCausalLM) and not model.training
    assert model.config._attn_implementation == "eager"
    assert next(model.parameters()).dtype == torch.float32
    assert tok.bos_token_id == tasks.BOS_ID and len(tok) == tasks.VOCAB_SIZE
    assert tok("k1 v2 ? k1")["input_ids"] == [2, tasks.KEY_START + 1, tasks.VALUE_START + 2, tasks.QUERY_ID,
                                               tasks.KEY_START + 1]  # fmt: skip


def test_gemma3_tiny_config_has_every_gemma3_feature(loaded3) -> None:
    model = loaded3[0]
    cfg = model.config
    assert cfg.model_type == "gemma3_text"
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.attn_logit_softcapping is None and cfg.final_logit_softcapping is None
    assert cfg.layer_types == ["sliding_attention"] * 5 + ["full_attention"]  # 5:1
    assert cfg.sliding_window < 2 * 24 + 1 <= cfg.max_position_embeddings  # induction must span > window
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] != cfg.rope_parameters["full_attention"]["rope_theta"]
    attn = model.model.layers[0].self_attn
    assert hasattr(attn, "q_norm") and hasattr(attn, "k_norm")  # QK-norm
    assert float(attn.q_norm.weight.detach().abs().sum()) > 0  # trained, not the zero init


@pytest.mark.parametrize("seed", FRESH_SEEDS)
def test_gemma3_tiny_accuracy_on_fresh_prompts(loaded3, seed: int) -> None:
    assert tasks.induction_accuracy(loaded3[0], 256, seed=seed) >= 0.95
    assert tasks.recall_accuracy(loaded3[0], 256, seed=seed) >= 0.95


def test_gemma3_tiny_induction_works_beyond_the_sliding_window(loaded3) -> None:
    # half-length 24: the earlier copy is 25 positions back, beyond the window of 16.
    acc = tasks.induction_accuracy(loaded3[0], 128, seed=99, seq_len=24)
    assert acc >= 0.95, acc


def test_gemma3_tiny_instrumented_is_transparent(loaded3, im3) -> None:
    import instrumentation.gemma3 as g3

    assert isinstance(im3.family, g3.Gemma3Family)
    ids = tasks.induction_batch(4, seq_len=20, seed=12).input_ids
    with torch.no_grad():
        ref = loaded3[0](input_ids=ids).logits
        got = im3.run(ids)
    assert torch.equal(got, ref)
    assert im3.family.attention(G3_GLOBAL_LAYER).window is None
    assert im3.family.attention(0).window == loaded3[0].config.sliding_window
    assert im3.family.attention(0).softcap is None


def _hf_prefix_matching(model, ids: torch.Tensor, half: int) -> torch.Tensor:
    """Ground truth: prefix-matching scores ``[n_layers, n_heads]`` from HF's own attention maps."""
    with torch.no_grad():
        attn = model(input_ids=ids, output_attentions=True).attentions
    q = torch.arange(half + 1, 2 * half)  # second copy of s_1..s_{L-1}
    return torch.stack([a[:, :, q, q - half + 1].mean((0, 2)) for a in attn])


def test_gemma3_tiny_induction_heads_found_by_prefix_matching_match_ground_truth(loaded3, im3) -> None:
    from mishax_py.zoo import analyses as A

    half = 20  # earlier copy 21 positions back: beyond the window, only the global layer reaches it
    ids = tasks.induction_batch(16, seq_len=half, seed=77).input_ids
    pm = A.prefix_matching_scores(im3, ids, half)
    truth = _hf_prefix_matching(loaded3[0], ids, half)
    torch.testing.assert_close(pm, truth, atol=1e-5, rtol=0)
    assert sorted(A.select_heads(pm, 0.5)) == G3_INDUCTION_HEADS
    assert sorted(A.select_heads(truth, 0.5)) == G3_INDUCTION_HEADS


def test_gemma3_tiny_induction_heads_found_by_patching_match_ground_truth(loaded3, im3) -> None:
    from mishax_py.zoo import analyses as A

    clean, corrupt = tasks.induction_clean_corrupt(8, seq_len=20, seed=3)
    found = A.find_induction_heads(im3, clean.input_ids, corrupt.input_ids, clean.targets, clean.target_mask)
    assert found.reason is None and found.gap > 2
    assert set(found.heads) <= set(G3_INDUCTION_HEADS) and len(found.heads) >= 1
    # and ablating the named heads breaks induction beyond the window, while the model alone solves it
    b = tasks.induction_batch(64, seq_len=20, seed=404)
    test = A.ablation_vs_control(im3, b.input_ids, b.targets, b.target_mask, G3_INDUCTION_HEADS, n_controls=4, seed=0)
    assert test.baseline > 0.95 and test.ablated < 0.2


# ------------------------------------------------------------------- checkpoint folders by model_type
def test_load_checkpoint_reads_a_gemma3_folder_by_its_model_type(tmp_path) -> None:
    """``load_checkpoint(DIR)`` (behind ``--model DIR``) loads a Gemma 3 folder as ``Gemma3ForCausalLM`` with eager
    attention, and ``instrument`` gives it Gemma 3's sites; the logits equal the saved model's."""
    from transformers import Gemma3ForCausalLM

    from mishax_py.zoo.models import instrument, load_checkpoint
    from tests.helpers import make_gemma3

    src = make_gemma3(seed=2)
    src.save_pretrained(tmp_path / "g3")
    model, tok = load_checkpoint(str(tmp_path / "g3"))
    assert type(model) is Gemma3ForCausalLM and tok is None and not model.training
    assert model.config._attn_implementation == "eager"
    im = instrument(model)
    assert "blocks.0.attn.q_normed" in im.site_names() and im.family.name == "gemma3"
    ids = torch.randint(4, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(im.run(ids), src(input_ids=ids).logits)


def test_load_checkpoint_names_an_unsupported_model_type(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from mishax_py.zoo.models import load_checkpoint

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"model_type 'llama'.*'gemma2', 'gemma3_text', 'gemma3'"):
        load_checkpoint(str(tmp_path / "llama"))
