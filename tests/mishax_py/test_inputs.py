"""What runs and studies accept as input (mishax_py.inputs): degenerate input gets a clear error before the
forward, and inputs come the way Hugging Face users pass them (text, tokenizer output, lists of ints)."""

from __future__ import annotations

import pytest
import torch

import instrumentation.gemma2 as g2
from mishax_py.execution.sweep import sweep
from mishax_py.interventions import Ablate
from mishax_py.studies import activation_patching, attribution_patching
from tests.helpers import forbid_forward, needs_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, 5].sum()


def _entry_points(im):
    """Every entry point that takes token ids, as ``name -> f(ids)``."""
    return {
        "run": lambda x: im.run(x),
        "run_with_cache": lambda x: im.run_with_cache(x),
        "sweep": lambda x: im.sweep(x, [{"blocks.0.mlp_out": Ablate()}], _metric),
        "sweep(list)": lambda x: sweep(im, x, [{"blocks.0.mlp_out": Ablate()}], _metric),
        "walk": lambda x: [None for _ in im.walk(x)],
        "activation_patching": lambda x: activation_patching(im, x, x, _metric),
        "attribution_patching": lambda x: attribution_patching(im, x, x, _metric),
    }


# -- A6: degenerate input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", list(_entry_points(None)))
def test_an_empty_batch_is_refused_before_the_forward(tiny_im, monkeypatch, entry):
    forbid_forward(monkeypatch, tiny_im)
    f = _entry_points(tiny_im)[entry]
    for empty in (torch.zeros(0, 5, dtype=torch.long), [], torch.zeros(0, dtype=torch.long)):
        with pytest.raises(ValueError, match="empty batch"):
            f(empty)


@pytest.mark.parametrize("entry", list(_entry_points(None)))
def test_a_zero_length_sequence_is_refused_before_the_forward(tiny_im, monkeypatch, entry):
    forbid_forward(monkeypatch, tiny_im)
    f = _entry_points(tiny_im)[entry]
    for empty in (torch.zeros(2, 0, dtype=torch.long), [[]], [[], []]):
        with pytest.raises(ValueError, match="zero-length sequence"):
            f(empty)


@pytest.mark.parametrize("entry", list(_entry_points(None)))
@pytest.mark.parametrize("bad", [64, 1000, -1])
def test_ids_outside_the_vocabulary_are_refused_naming_the_id_its_position_and_the_vocab(tiny_im, ids, monkeypatch,
                                                                                        entry, bad):
    forbid_forward(monkeypatch, tiny_im)
    assert tiny_im.family.dims.vocab == 64
    x = ids.clone()
    x[1, 3] = bad
    with pytest.raises(ValueError) as err:
        _entry_points(tiny_im)[entry](x)
    msg = str(err.value)
    assert f"{bad}" in msg and "vocabulary" in msg and "64" in msg, msg
    assert "row 1" in msg and "position 3" in msg, msg


def test_the_vocabulary_check_sees_every_row_and_lists_accepted_as_before(tiny_im, ids):
    x = ids.clone()
    x[0, 0] = 63  # the largest valid id
    torch.testing.assert_close(tiny_im.run(x), tiny_im.run(x.tolist()), rtol=0, atol=0)
    torch.testing.assert_close(tiny_im.run(x[0]), tiny_im.run(x[0].tolist()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="row 0, position 9"):
        tiny_im.run([x[0].tolist()[:-1] + [99]])


def test_ragged_nested_lists_name_the_row_lengths(tiny_im):
    with pytest.raises(ValueError, match=r"lengths.*\b3\b.*\b2\b|pad"):
        tiny_im.run([[5, 6, 7], [5, 6]])


def test_float_ids_are_refused(tiny_im):
    with pytest.raises(TypeError, match="integers"):
        tiny_im.run(torch.ones(1, 3))


@pytest.mark.parametrize("study", [attribution_patching, activation_patching])
def test_a_complex_metric_is_refused_by_studies(tiny_im, ids, study):
    corrupt = ids.flip(0)

    def complex_metric(logits):
        return logits[:, -1, 5].sum() * (1 + 1j)

    with pytest.raises(TypeError, match="real scalar"):
        study(tiny_im, ids, corrupt, complex_metric)


@pytest.mark.parametrize("study", [attribution_patching, activation_patching])
def test_a_nan_metric_is_refused_by_studies(tiny_im, ids, study):
    corrupt = ids.flip(0)

    def nan_metric(logits):
        return logits[:, -1, 5].sum() * float("nan")

    with pytest.raises(ValueError, match="NaN"):
        study(tiny_im, ids, corrupt, nan_metric)


# -- B2: text, tokenizer output, lists ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    """The bundled gemma2-tiny word-level tokenizer (its files ship with the package)."""
    from transformers import PreTrainedTokenizerFast

    from mishax_py.zoo.models import model_path

    return PreTrainedTokenizerFast.from_pretrained(str(model_path("gemma2-tiny")), local_files_only=True)


@pytest.fixture
def text_im(tok):
    """A tiny random Gemma 2 with the tokenizer's vocabulary (133), instrumented with that tokenizer."""
    from tests.helpers import make_model

    return g2.instrument(make_model(vocab_size=133), tokenizer=tok)


def test_instrument_stores_the_tokenizer(text_im, tok):
    assert text_im.tokenizer is tok


def test_a_string_is_tokenised_with_the_models_tokenizer(text_im, tok):
    text = "k1 v2 ? k1"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.tolist() == [[2, 6, 71, 4, 6]]
    expected = text_im.run(ids)
    torch.testing.assert_close(text_im.run(text), expected, rtol=0, atol=0)
    torch.testing.assert_close(text_im.run([text]), expected, rtol=0, atol=0)
    logits, cache = text_im.run_with_cache(text, sites="blocks.0.resid_post")
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert cache["blocks.0.resid_post"].shape == (1, 5, 32)
    with text_im.walk(text) as w:
        for _ in w:
            pass
    torch.testing.assert_close(w.output, expected, rtol=0, atol=0)


def test_strings_of_different_lengths_are_padded_and_the_mask_passed(text_im, tok):
    texts = ["k1 v2 ? k1", "k3 v4"]
    enc = tok(texts, return_tensors="pt", padding=True)
    assert (enc.attention_mask == 0).any()
    expected = text_im.run(enc.input_ids, attention_mask=enc.attention_mask)
    torch.testing.assert_close(text_im.run(texts), expected, rtol=0, atol=0)
    logits, cache = text_im.run_with_cache(texts, sites="blocks.0.resid_post")
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert torch.equal(cache.attention_mask, enc.attention_mask)


def test_a_batch_encoding_passes_its_ids_and_attention_mask(text_im, tok):
    # left padding: without the mask, the padded row's real tokens would attend to the pads
    tok_left = tok.__class__.from_pretrained(tok.name_or_path, local_files_only=True, padding_side="left")
    enc = tok_left(["k1 v2 ? k1", "k3 v4"], return_tensors="pt", padding=True)
    expected = text_im.run(enc.input_ids, attention_mask=enc.attention_mask)
    unmasked = text_im.run(enc.input_ids)
    assert not torch.allclose(expected[1, -1], unmasked[1, -1])
    torch.testing.assert_close(text_im.run(enc), expected, rtol=0, atol=0)
    torch.testing.assert_close(text_im.run(dict(enc)), expected, rtol=0, atol=0)
    got = text_im.sweep(enc, [{"blocks.0.mlp_out": Ablate()}])
    want = text_im.sweep(enc.input_ids, [{"blocks.0.mlp_out": Ablate()}], attention_mask=enc.attention_mask)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # tokenizer output without tensors (lists), as `tok(text)` returns it
    plain = tok("k1 v2 ? k1")
    torch.testing.assert_close(text_im.run(plain), text_im.run([[2, 6, 71, 4, 6]]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="attention_mask"):
        text_im.run(enc, attention_mask=enc.attention_mask)


def test_studies_take_text(text_im, tok):
    clean, corrupt = "k1 v2 k3 v4 ? k1", "k5 v2 k3 v4 ? k5"
    want = activation_patching(text_im, tok(clean, return_tensors="pt").input_ids,
                               tok(corrupt, return_tensors="pt").input_ids, _metric)
    got = activation_patching(text_im, clean, corrupt, _metric)
    torch.testing.assert_close(got.values, want.values, rtol=0, atol=0)
    got = attribution_patching(text_im, tok(clean), tok(corrupt), _metric)
    assert got.values.shape == want.values.shape


def test_text_ids_outside_the_models_vocabulary_are_named(tiny_model, tok):
    im = g2.instrument(tiny_model, tokenizer=tok)  # vocab 64 < the tokenizer's 133
    with pytest.raises(ValueError, match=r"79.*vocabulary of size 64|vocabulary of size 64.*79"):
        im.run("k1 v10")


def test_text_without_a_tokenizer_says_what_to_pass(tiny_im):
    assert tiny_im.tokenizer is None
    with pytest.raises(ValueError, match=r"tokenizer=") as err:
        tiny_im.run("k1 v2")
    assert "im.tokenizer" in str(err.value)
    with pytest.raises(ValueError, match=r"tokenizer="):
        activation_patching(tiny_im, "k1", "k2", _metric)


def test_instrument_again_sets_the_tokenizer(tiny_model, tok):
    im = g2.instrument(tiny_model)
    assert im.tokenizer is None
    assert g2.instrument(tiny_model, tokenizer=tok) is im
    assert im.tokenizer is tok


@needs_model
def test_the_tokenizer_of_the_models_own_folder_is_found_offline(monkeypatch):
    from mishax_py.zoo import load

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load("gemma2-tiny")
    im = g2.instrument(model)  # no tokenizer given: the one in the model's folder is loaded, offline
    assert im.tokenizer is not None
    assert im.tokenizer("k1 v2").input_ids == tok("k1 v2").input_ids
    torch.testing.assert_close(im.run("k1 v2 ? k1"), im.run([[2, 6, 71, 4, 6]]), rtol=0, atol=0)


def test_a_missing_tokenizer_in_the_models_folder_is_named(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)  # weights and config only: no tokenizer files
    tiny_model.name_or_path = str(tmp_path)
    tiny_model.config._name_or_path = str(tmp_path)
    im = g2.instrument(tiny_model)
    with pytest.raises(ValueError, match="tokenizer=") as err:
        im.run("k1")
    assert str(tmp_path) in str(err.value)
