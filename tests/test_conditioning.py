"""Text conditioners, fuser, condition dropout; the T5 path checked against transformers' MusicGen."""
from __future__ import annotations

import math

import pytest
import torch
from t5_fixture import build_tiny_t5, tiny_t5_folder  # noqa: F401  (fixture)

from conditioning import (
    FUSER_PRESETS,
    AttributeDropout,
    ClassifierFreeGuidanceDropout,
    Condition,
    ConditionFuser,
    ConditionProvider,
    FuserConfig,
    LUTConditioner,
    T5Conditioner,
    concat_batches,
    drop_words,
    null_condition,
)

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TEXTS = ["happy rock song", "", "calm piano melody at night with strings"]
DECODER_DIM = 32  # != tiny T5's 24, so transformers builds enc_to_dec_proj


def tiny_musicgen(t5_folder):
    """transformers' MusicGen from a tiny composite config (tiny T5, EnCodec, decoder), T5 weights copied in.

    Built from the config, not from sub-models: in transformers 5.23,
    ``MusicgenForConditionalGeneration(text_encoder=..., ...)`` leaves the text encoder's attention
    implementation unset, and its T5 then ignores the padding mask.
    """
    from transformers import (EncodecConfig, MusicgenConfig, MusicgenDecoderConfig,
                              MusicgenForConditionalGeneration, T5EncoderModel)

    t5 = T5EncoderModel.from_pretrained(str(t5_folder))
    codec = EncodecConfig(num_filters=4, upsampling_ratios=[2, 2], codebook_size=16, hidden_size=8,
                          num_lstm_layers=1, codebook_dim=8, sampling_rate=800, target_bandwidths=[4.0],
                          chunk_length_s=None)
    decoder = MusicgenDecoderConfig(vocab_size=16, hidden_size=DECODER_DIM, num_hidden_layers=1,
                                    num_attention_heads=2, ffn_dim=64, num_codebooks=2, pad_token_id=16,
                                    bos_token_id=16, decoder_start_token_id=16)
    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(MusicgenConfig(
        text_encoder=t5.config.to_dict(), audio_encoder=codec.to_dict(), decoder=decoder.to_dict()))
    model.text_encoder.load_state_dict(t5.state_dict())
    with torch.no_grad():  # a non-trivial bias, so a forgotten mask would show
        model.enc_to_dec_proj.bias.normal_()
    return model.eval()


def musicgen_processor(t5_folder):
    from transformers import EncodecFeatureExtractor, MusicgenProcessor, T5Tokenizer

    return MusicgenProcessor(feature_extractor=EncodecFeatureExtractor(),
                             tokenizer=T5Tokenizer.from_pretrained(str(t5_folder)))


def capture_decoder_conditions(model):
    """Record (encoder_hidden_states, encoder_attention_mask) of every decoder call."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((kwargs.get("encoder_hidden_states"), kwargs.get("encoder_attention_mask")))

    return calls, model.decoder.register_forward_pre_hook(hook, with_kwargs=True)


def conditioner_from(model, t5_folder, **kwargs) -> T5Conditioner:
    cond = T5Conditioner.from_pretrained(t5_folder, output_dim=DECODER_DIM, **kwargs)
    proj = model.enc_to_dec_proj.state_dict()
    cond.load_state_dict({"output_proj.weight": proj["weight"], "output_proj.bias": proj["bias"]})
    return cond.eval()


@pytest.fixture(scope="module")
def musicgen(tiny_t5_folder):  # noqa: F811
    return tiny_musicgen(tiny_t5_folder)


# --- T5 conditioner vs transformers' MusicGen ---------------------------------------------------

def test_t5_tokens_match_musicgen_processor(tiny_t5_folder):  # noqa: F811
    ref = musicgen_processor(tiny_t5_folder)(text=TEXTS, padding=True, return_tensors="pt")
    hf_style = T5Conditioner.from_pretrained(tiny_t5_folder, output_dim=8, empty_is_null=False)
    tokens = hf_style.tokenize(TEXTS)
    assert torch.equal(tokens.input_ids, ref["input_ids"])
    assert torch.equal(tokens.attention_mask, ref["attention_mask"])
    assert torch.equal(tokens.mask, ref["attention_mask"])
    # audiocraft style: same ids, "" row masked out entirely.
    ac_style = T5Conditioner.from_pretrained(tiny_t5_folder, output_dim=8)
    ac_tokens = ac_style.tokenize(TEXTS)
    assert torch.equal(ac_tokens.input_ids, ref["input_ids"])
    expected = ref["attention_mask"].clone()
    expected[1] = 0
    assert torch.equal(ac_tokens.mask, expected)


def test_single_string_is_one_prompt(tiny_t5_folder):  # noqa: F811
    cond = T5Conditioner.from_pretrained(tiny_t5_folder, output_dim=8)
    tokens = cond.tokenize("calm piano")
    ref = cond.tokenizer(["calm piano"], return_tensors="pt", padding=True)
    assert tokens.input_ids.shape[0] == 1
    assert torch.equal(tokens.input_ids, ref["input_ids"])
    assert cond.encode("calm piano").embeddings.shape[0] == 1


@pytest.mark.parametrize("bad, error", [(123, TypeError), ([], ValueError), (["ok", 3], TypeError),
                                        (b"bytes", TypeError)])
def test_bad_text_input_raises(tiny_t5_folder, bad, error):  # noqa: F811
    cond = T5Conditioner.from_pretrained(tiny_t5_folder, output_dim=8)
    with pytest.raises(error):
        cond.tokenize(bad)


def test_t5_condition_matches_musicgen_text_path(musicgen, tiny_t5_folder):  # noqa: F811
    inputs = musicgen_processor(tiny_t5_folder)(text=TEXTS, padding=True, return_tensors="pt")
    calls, handle = capture_decoder_conditions(musicgen)
    try:
        with torch.no_grad():
            musicgen(**inputs, decoder_input_ids=torch.zeros(len(TEXTS) * 2, 1, dtype=torch.long))
    finally:
        handle.remove()
    ref_states, ref_mask = calls[0]
    cond = conditioner_from(musicgen, tiny_t5_folder, empty_is_null=False)
    with torch.no_grad():
        ours = cond.encode(TEXTS)
    assert ours.embeddings.shape == ref_states.shape
    torch.testing.assert_close(ours.embeddings, ref_states, rtol=0, atol=1e-5)
    assert torch.equal(ours.mask, ref_mask)
    assert (ours.embeddings[0, ours.mask[0] == 0] == 0).all()  # padding zeroed after the projection


def test_t5_null_matches_musicgen_guidance_branch(musicgen, tiny_t5_folder):  # noqa: F811
    texts = [t for t in TEXTS if t]
    inputs = musicgen_processor(tiny_t5_folder)(text=texts, padding=True, return_tensors="pt")
    calls, handle = capture_decoder_conditions(musicgen)
    try:
        with torch.no_grad():
            musicgen.generate(**inputs, guidance_scale=3.0, max_new_tokens=2, do_sample=False)
    finally:
        handle.remove()
    ref_states, ref_mask = calls[0]
    batch = len(texts)
    assert ref_states.shape[0] == 2 * batch
    cond = conditioner_from(musicgen, tiny_t5_folder)  # audiocraft-style: None and "" are null
    with torch.no_grad():
        both = cond.encode(texts + [None] * batch)
        empty = cond.encode(texts + [""] * batch)
        alone = cond.encode(texts)
    torch.testing.assert_close(both.embeddings, ref_states, rtol=0, atol=1e-5)
    assert torch.equal(both.mask, ref_mask)
    torch.testing.assert_close(empty.embeddings, ref_states, rtol=0, atol=1e-5)
    guided = concat_batches(alone, null_condition(alone))
    torch.testing.assert_close(guided.embeddings, ref_states, rtol=0, atol=1e-5)
    assert torch.equal(guided.mask, ref_mask)


def test_empty_text_is_eos_prompt_in_transformers_mode(musicgen, tiny_t5_folder):  # noqa: F811
    ac = conditioner_from(musicgen, tiny_t5_folder, empty_is_null=True)
    hf = conditioner_from(musicgen, tiny_t5_folder, empty_is_null=False)
    with torch.no_grad():
        a, h = ac.encode(["", None]), hf.encode(["", None])
    assert a.mask.sum() == 0 and a.embeddings.abs().sum() == 0
    assert h.mask.tolist() == [[1], [0]]
    assert h.embeddings[0].abs().sum() > 0 and h.embeddings[1].abs().sum() == 0


# --- T5 conditioner: weights, freezing, fine-tuning, word dropout --------------------------------

def test_frozen_t5_is_outside_state_dict_and_follows_to(tiny_t5_folder):  # noqa: F811
    cond = T5Conditioner.from_pretrained(tiny_t5_folder, output_dim=16)
    assert sorted(cond.state_dict()) == ["output_proj.bias", "output_proj.weight"]
    assert len(list(cond.parameters())) == 2
    provider = ConditionProvider({"description": cond})
    audiocraft_keys = {"conditioners.description.output_proj.weight": torch.randn(16, 24),
                       "conditioners.description.output_proj.bias": torch.randn(16)}
    provider.load_state_dict(audiocraft_keys, strict=True)
    cond.train()
    assert not cond.encoder.training  # frozen T5 stays in eval mode (no dropout)
    cond.to(torch.float64)
    assert next(cond.encoder.parameters()).dtype == torch.float32  # casts leave the frozen T5 alone
    assert cond.output_proj.weight.dtype == torch.float64
    out = cond.encode(["calm piano", "rock"])
    assert out.embeddings.dtype == torch.float64
    assert all(not p.requires_grad for p in cond.encoder.parameters())
    out.embeddings.sum().backward()  # gradients reach output_proj only
    assert cond.output_proj.weight.grad is not None
    assert all(p.grad is None for p in cond.encoder.parameters())


def test_finetuned_t5_trains_and_is_saved(tiny_t5_folder):  # noqa: F811
    cond = T5Conditioner.from_pretrained(tiny_t5_folder, output_dim=16, finetune=True)
    keys = cond.state_dict().keys()
    assert "output_proj.weight" in keys and any(k.startswith("t5.") for k in keys)
    cond.encode(["calm piano", "rock"]).embeddings.square().sum().backward()
    grads = [p.grad for n, p in cond.named_parameters() if n.startswith("t5.")]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_no_projection_when_output_dim_is_none(tiny_t5_folder):  # noqa: F811
    from transformers import T5EncoderModel

    cond = T5Conditioner.from_pretrained(tiny_t5_folder, output_dim=None, empty_is_null=False)
    tokens = cond.tokenize(TEXTS)
    ref = T5EncoderModel.from_pretrained(str(tiny_t5_folder))(
        input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    with torch.no_grad():
        out = cond(tokens)
    torch.testing.assert_close(out.embeddings, ref * tokens.mask[..., None], rtol=0, atol=1e-6)


def test_flan_t5_layout_loads(tmp_path):
    from transformers import T5EncoderModel

    folder = build_tiny_t5(tmp_path / "flan", feed_forward_proj="gated-gelu", seed=3)
    cond = T5Conditioner.from_pretrained(folder, output_dim=None, empty_is_null=False)
    assert "wi_0" in str(dict(cond.encoder.named_parameters()).keys())
    tokens = cond.tokenize(["acoustic folk guitar"])
    ref = T5EncoderModel.from_pretrained(str(folder))(input_ids=tokens.input_ids).last_hidden_state
    with torch.no_grad():
        torch.testing.assert_close(cond(tokens).embeddings, ref, rtol=0, atol=1e-6)


def test_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        T5Conditioner.from_pretrained(tmp_path, output_dim=8)


def test_word_dropout_only_in_training_and_seeded(tiny_t5_folder):  # noqa: F811
    texts = ["happy rock song with electric guitar and drums"] * 8
    a = T5Conditioner.from_pretrained(tiny_t5_folder, output_dim=8, word_dropout=0.5, seed=7)
    b = T5Conditioner.from_pretrained(tiny_t5_folder, output_dim=8, word_dropout=0.5, seed=7)
    a.eval()
    full = a.tokenize(texts)
    assert (full.input_ids == full.input_ids[0]).all()  # eval: nothing dropped
    a.train(), b.train()
    ta, tb = a.tokenize(texts), b.tokenize(texts)
    assert torch.equal(ta.input_ids, tb.input_ids) and torch.equal(ta.mask, tb.mask)
    assert ta.mask.sum(dim=1).lt(full.mask.sum(dim=1)).any()  # some words were dropped
    everything = T5Conditioner.from_pretrained(tiny_t5_folder, output_dim=8, word_dropout=1.0).train()
    assert everything.tokenize(texts).mask.sum() == 0  # all words gone -> "" -> null


# --- lookup-table conditioner ---------------------------------------------------------------------

def test_lut_tokenizer_and_embeddings():
    torch.manual_seed(0)
    lut = LUTConditioner(vocab=["calm", "piano", "rock"], dim=6, output_dim=10)
    tokens = lut.tokenize(["Calm piano, jazz!", None, "rock", ""])
    assert tokens.input_ids.tolist() == [[2, 3, 1], [0, 0, 0], [4, 0, 0], [0, 0, 0]]
    assert tokens.mask.tolist() == [[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 0, 0]]
    out = lut(tokens)
    expected = lut.output_proj(lut.embed.weight[torch.tensor([2, 3, 1])])
    torch.testing.assert_close(out.embeddings[0], expected)
    assert out.embeddings[1:, :].abs().sum() == out.embeddings[2, 0].abs().sum()  # only "rock" is non-zero
    assert sorted(lut.state_dict()) == ["embed.weight", "output_proj.bias", "output_proj.weight"]
    assert lut.encode("rock").embeddings.shape == (1, 1, 10)
    assert lut.encode([None, None]).mask.tolist() == [[0], [0]]


def test_lut_whole_text_entries():
    lut = LUTConditioner(vocab=["hip hop", "jazz"], dim=4, output_dim=4, split_words=False)
    assert lut.tokenize(["Hip hop", "jazz", "rock"]).input_ids.tolist() == [[2], [3], [1]]
    with pytest.raises(ValueError):
        LUTConditioner(vocab=["a", "A"], dim=4, output_dim=4)


# --- fuser --------------------------------------------------------------------------------------

def _cond(batch: int, length: int, dim: int, seed: int) -> Condition:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - 1:] = 0
    return Condition(torch.randn(batch, length, dim, generator=g) * mask[..., None], mask)


def test_fuser_cross_concatenates_in_config_order():
    fuser = ConditionFuser(FuserConfig(cross=("a", "b")))
    x = torch.randn(2, 5, 4)
    a, b = _cond(2, 3, 4, 1), _cond(2, 2, 4, 2)
    fused = fuser(x, {"b": b, "a": a})
    assert torch.equal(fused.input, x) and fused.prepend_length == 0 and fused.prepend_mask is None
    assert torch.equal(fused.cross, torch.cat([a.embeddings, b.embeddings], dim=1))
    assert torch.equal(fused.cross_mask, torch.cat([a.mask, b.mask], dim=1))


def test_fuser_prepend_order_and_streaming_steps():
    fuser = ConditionFuser(FUSER_PRESETS["chroma2music"])
    x = torch.randn(2, 5, 4)
    chroma, text = _cond(2, 3, 4, 1), _cond(2, 2, 4, 2)
    fused = fuser(x, {"description": text, "self_wav": chroma})
    assert fused.cross is None and fused.prepend_length == 5
    assert torch.equal(fused.input, torch.cat([chroma.embeddings, text.embeddings, x], dim=1))
    assert torch.equal(fused.prepend_mask, torch.cat([chroma.mask, text.mask], dim=1))
    later = fuser(x[:, -1:], {"description": text, "self_wav": chroma}, prepend=False)
    assert torch.equal(later.input, x[:, -1:]) and later.prepend_length == 0


def test_fuser_sum_and_interpolate():
    fuser = ConditionFuser(FuserConfig(cross=(), sum=("genre",), input_interpolate=("curve",)))
    x = torch.randn(2, 4, 3)
    genre = _cond(2, 1, 3, 1)
    curve = Condition(torch.arange(12.0).view(2, 2, 3), torch.ones(2, 2, dtype=torch.long))
    fused = fuser(x, {"genre": genre, "curve": curve})
    expected = x + genre.embeddings + curve.embeddings.repeat_interleave(2, dim=1)
    torch.testing.assert_close(fused.input, expected)
    assert fused.cross is None
    with pytest.raises(ValueError, match="length 1 or 4"):
        fuser(x, {"genre": _cond(2, 3, 3, 0)})


def test_fuser_rejects_bad_input():
    fuser = ConditionFuser()
    x = torch.randn(2, 5, 4)
    with pytest.raises(KeyError, match="genre"):
        fuser(x, {"genre": _cond(2, 1, 4, 0)})
    prepend = ConditionFuser(FuserConfig(cross=("a", "b"), prepend=("description",)))
    with pytest.raises(ValueError, match="D=4"):
        prepend(x, {"description": _cond(2, 3, 6, 0)})
    with pytest.raises(ValueError, match="B=2"):
        prepend(x, {"description": _cond(3, 3, 4, 0)})
    with pytest.raises(ValueError, match="one width"):
        prepend(x, {"a": _cond(2, 3, 6, 0), "b": _cond(2, 3, 8, 0)})
    assert prepend(x, {"a": _cond(2, 3, 6, 0)}).cross.shape == (2, 3, 6)  # own width is fine
    with pytest.raises(ValueError, match="mask"):
        prepend(x, {"description": Condition(torch.zeros(2, 3, 4), torch.ones(2, 2))})
    with pytest.raises(ValueError, match="twice"):
        FuserConfig(cross=("a",), prepend=("a",))
    with pytest.raises(TypeError, match="tuple"):
        FuserConfig(cross="description")


def test_fuser_cross_positional_embedding():
    fuser = ConditionFuser(FuserConfig(cross=("a",), cross_attention_pos_emb=True,
                                       cross_attention_pos_emb_scale=0.5))
    zeros = Condition(torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.long))
    cross = fuser(torch.zeros(1, 2, 8), {"a": zeros}).cross
    for pos in range(3):
        phases = [pos / 10_000 ** (i / 3) for i in range(4)]
        expected = [math.cos(p) for p in phases] + [math.sin(p) for p in phases]
        torch.testing.assert_close(cross[0, pos], 0.5 * torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_condition_provider():
    genre = LUTConditioner(vocab=["rock"], dim=4, output_dim=4)
    mood = LUTConditioner(vocab=["calm"], dim=4, output_dim=4)
    provider = ConditionProvider({"genre": genre, "mood": mood})
    out = provider({"genre": ["rock", None, "rock"]})
    assert set(out) == {"genre", "mood"}
    assert out["genre"].mask.tolist() == [[1], [0], [1]]
    assert out["mood"].mask.sum() == 0 and out["mood"].embeddings.shape == (3, 1, 4)  # absent -> null
    with pytest.raises(KeyError, match="bpm"):
        provider({"bpm": ["120"]})
    with pytest.raises(ValueError, match="one value per sample"):
        provider({"genre": ["rock"], "mood": ["calm", None]})
    with pytest.raises(ValueError, match="at least one"):
        provider({})
    with pytest.raises(TypeError, match="encode"):
        ConditionProvider({"x": torch.nn.Linear(2, 2)})


def test_concat_batches_pads_time():
    a, b = _cond(2, 3, 4, 1), _cond(1, 5, 4, 2)
    both = concat_batches(a, b)
    assert both.embeddings.shape == (3, 5, 4) and both.mask.shape == (3, 5)
    assert torch.equal(both.embeddings[:2, :3], a.embeddings) and both.mask[:2, 3:].sum() == 0
    assert torch.equal(both.embeddings[2:], b.embeddings)
    nulls = null_condition(a)
    assert nulls.embeddings.abs().sum() == 0 and nulls.mask.sum() == 0 and nulls.mask.shape == a.mask.shape


# --- dropout ------------------------------------------------------------------------------------

def _batch(size: int) -> dict[str, list]:
    return {"description": [f"text {i}" for i in range(size)], "self_wav": [f"wav {i}" for i in range(size)]}


def test_cfg_dropout_whole_batch_statistics():
    drop = ClassifierFreeGuidanceDropout(0.3, seed=11).train()
    batch = _batch(4)
    dropped = 0
    for _ in range(2000):
        out = drop(batch)
        values = out["description"] + out["self_wav"]
        nulls = sum(v is None for v in values)
        assert nulls in (0, len(values))  # all attributes of all samples, or nothing
        dropped += nulls > 0
    assert abs(dropped / 2000 - 0.3) < 0.035  # binomial sd ~0.01
    assert batch == _batch(4)  # input untouched


def test_cfg_dropout_per_sample_statistics():
    drop = ClassifierFreeGuidanceDropout(0.3, per_sample=True, seed=5).train()
    count, mixed = 0, 0
    for _ in range(500):
        out = drop(_batch(8))
        for text, wav in zip(out["description"], out["self_wav"], strict=True):
            assert (text is None) == (wav is None)  # a chosen sample loses every attribute
            count += text is None
        mixed += 0 < sum(t is None for t in out["description"]) < 8
    assert abs(count / 4000 - 0.3) < 0.025
    assert mixed > 400  # samples of one batch are drawn independently


def test_cfg_dropout_is_seeded_and_off_in_eval():
    a = ClassifierFreeGuidanceDropout(0.5, per_sample=True, seed=3).train()
    b = ClassifierFreeGuidanceDropout(0.5, per_sample=True, seed=3).train()
    runs_a = [a(_batch(6)) for _ in range(20)]
    assert runs_a == [b(_batch(6)) for _ in range(20)]
    a.reset()
    assert runs_a == [a(_batch(6)) for _ in range(20)]
    c = ClassifierFreeGuidanceDropout(0.5, per_sample=True, seed=4).train()
    assert runs_a != [c(_batch(6)) for _ in range(20)]
    assert ClassifierFreeGuidanceDropout(1.0).eval()(_batch(3)) == _batch(3)
    with pytest.raises(ValueError):
        ClassifierFreeGuidanceDropout(1.5)


@pytest.mark.parametrize("per_sample", [False, True])
def test_attribute_dropout_statistics(per_sample):
    drop = AttributeDropout({"self_wav": 0.5, "description": 0.1}, per_sample=per_sample, seed=2).train()
    wav_nulls = text_nulls = both = 0
    trials = 1000
    for _ in range(trials):
        out = drop(_batch(4))
        wav = [v is None for v in out["self_wav"]]
        text = [v is None for v in out["description"]]
        if not per_sample:
            assert len(set(wav)) == 1 and len(set(text)) == 1  # one draw for the whole batch
        wav_nulls += sum(wav)
        text_nulls += sum(text)
        both += sum(w and t for w, t in zip(wav, text, strict=True))
    total = trials * 4
    tol = 0.06 if not per_sample else 0.03
    assert abs(wav_nulls / total - 0.5) < tol
    assert abs(text_nulls / total - 0.1) < tol
    assert abs(both / total - 0.05) < tol  # independent attributes


def test_attribute_dropout_eval_and_unnamed():
    drop = AttributeDropout({"self_wav": 1.0}).eval()
    assert drop(_batch(2)) == _batch(2)
    drop = AttributeDropout({"self_wav": 1.0}, active_on_eval=True).eval()
    out = drop(_batch(2))
    assert out["self_wav"] == [None, None] and out["description"] == _batch(2)["description"]


def test_drop_words():
    g = torch.Generator().manual_seed(0)
    text = " ".join(f"w{i}" for i in range(20))
    kept = total = 0
    for _ in range(200):
        (out,) = drop_words([text], 0.3, g)
        words = out.split(" ") if out else []
        assert all(w in text.split(" ") for w in words)
        kept += len(words)
        total += 20
    assert abs(kept / total - 0.7) < 0.03
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert drop_words([text, None], 0.5, g1) == drop_words([text, None], 0.5, g2)
    assert drop_words([text, None], 1.0, g1) == ["", None]
    assert drop_words([text], 0.0, g1) == [text]
