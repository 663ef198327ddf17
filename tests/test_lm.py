"""LMModel against transformers' MusicGen (same random weights) and audiocraft-format files.

transformers' random init makes token embeddings tiny next to the sinusoidal positions, so
a model would barely look at its input and wrong token handling could pass unnoticed: the
weights are re-drawn at unit scale (``_rescale``) before comparing.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from inference.formats.audiocraft import load_audiocraft_lm, lm_config_from_audiocraft, read_audiocraft_lm
from inference.formats.transformers import audiocraft_to_transformers_lm, transformers_to_audiocraft_lm
from lm import LMConfig, LMModel, get_preset
from lm.transformer import sin_embedding

transformers = pytest.importorskip("transformers")

K, CARD, DIM, HEADS, LAYERS, FFN = 4, 16, 32, 4, 2, 64


def _rescale(model: torch.nn.Module, seed: int) -> None:
    """Unit-scale random weights: embeddings N(0, 1), linears N(0, 1/fan_in), norms near 1/0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            elif p.dim() == 2:
                p.copy_(noise / (1.0 if "embed" in name else p.shape[1] ** 0.5))
            else:
                p.copy_(0.1 * noise)


def _decoder_config(**overrides):
    kwargs = dict(vocab_size=CARD, hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  ffn_dim=FFN, num_codebooks=K, pad_token_id=CARD, bos_token_id=CARD,
                  max_position_embeddings=64, dropout=0.0)
    kwargs.update(overrides)
    return kwargs


def _ours_for(reference: torch.nn.Module, **overrides) -> LMModel:
    config = LMConfig(dim=DIM, num_heads=HEADS, num_layers=LAYERS, ffn_dim=FFN, num_codebooks=K,
                      card=CARD, **overrides)
    ours = LMModel(config).eval()
    lm_state = {k: v for k, v in transformers_to_audiocraft_lm(reference.state_dict()).items()
                if not k.startswith("condition_provider.")}
    ours.load_state_dict(lm_state, strict=True)
    return ours


@pytest.fixture(scope="module")
def causal_pair():
    torch.manual_seed(0)
    reference = transformers.MusicgenForCausalLM(transformers.MusicgenDecoderConfig(**_decoder_config())).eval()
    _rescale(reference, seed=1)
    return reference, _ours_for(reference)


def _condition(B: int, S: int = 5, seed: int = 2):
    """A projected condition (B, S, dim) with padding in the last row, zeroed where padded."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[-1, 2:] = 0
    return torch.randn(B, S, DIM, generator=gen) * mask[..., None], mask


def _with_null(condition, mask):
    """Rows [conditional; unconditional]: the null condition is all zeros and fully masked."""
    return torch.cat([condition, torch.zeros_like(condition)]), torch.cat([mask, torch.zeros_like(mask)])


# -- layout and building blocks -----------------------------------------------------------------

def test_state_dict_names_are_audiocraft():
    model = LMModel(dataclasses.replace(get_preset("tiny"), num_layers=1))
    layer = "transformer.layers.0."
    expected = {f"emb.{k}.weight" for k in range(4)} | {f"linears.{k}.weight" for k in range(4)} | {
        "out_norm.weight", "out_norm.bias",
        layer + "self_attn.in_proj_weight", layer + "self_attn.out_proj.weight",
        layer + "cross_attention.in_proj_weight", layer + "cross_attention.out_proj.weight",
        layer + "linear1.weight", layer + "linear2.weight",
        *(layer + f"{norm}.{kind}" for norm in ("norm1", "norm_cross", "norm2") for kind in ("weight", "bias")),
    }
    assert set(model.state_dict()) == expected
    assert model.state_dict()["emb.0.weight"].shape == (17, 32)  # card + 1 rows
    assert model.state_dict()[layer + "self_attn.in_proj_weight"].shape == (96, 32)  # packed q, k, v
    prepend = LMModel(dataclasses.replace(get_preset("tiny_prepend"), num_layers=1))
    assert not any("cross" in key for key in prepend.state_dict())


def test_sin_embedding_formula():
    emb = sin_embedding(torch.arange(3), 8)
    half = torch.arange(4, dtype=torch.float64)
    phase = torch.arange(3, dtype=torch.float64)[:, None] / 10_000 ** (half / 3)
    assert torch.allclose(emb.double(), torch.cat([phase.cos(), phase.sin()], dim=1), atol=1e-6)


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9])
def test_decode_linear_equals_f_linear(rows):
    from lm.transformer import linear

    x, w, b = torch.randn(rows, 1, 24), torch.randn(40, 24), torch.randn(40)
    torch.testing.assert_close(linear(x, w, b), torch.nn.functional.linear(x, w, b))
    torch.testing.assert_close(linear(x, w), torch.nn.functional.linear(x, w))


def test_presets():
    small = get_preset("musicgen_small")
    assert (small.dim, small.num_layers, small.num_heads, small.ffn_dim, small.num_codebooks, small.card) == \
        (1024, 24, 16, 4096, 4, 2048)
    assert get_preset("musicgen_large").dim == 2048 and not get_preset("musicgen_melody").cross_attention
    assert get_preset("musicgen_stereo_small").pattern_provider().delays == [0, 0, 1, 1, 2, 2, 3, 3]
    config = get_preset("tiny_stereo")
    assert LMConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown LMConfig fields"):
        LMConfig.from_dict({"dims": 3})
    with pytest.raises(ValueError, match="unknown LM preset"):
        get_preset("musicgen_huge")


# -- exactness against transformers --------------------------------------------------------------

def test_logits_match_transformers(causal_pair):
    reference, ours = causal_pair
    B, S = 3, 9
    sequence = torch.randint(0, CARD + 1, (B, K, S), generator=torch.Generator().manual_seed(3))
    condition, mask = _condition(B)
    mask[1] = 0  # a fully masked row (the null condition) as well as a padded one
    with torch.no_grad():
        expected = reference(input_ids=sequence.reshape(B * K, S), encoder_hidden_states=condition,
                             encoder_attention_mask=mask).logits.reshape(B, K, S, CARD)
        got = ours(sequence, condition=condition, condition_mask=mask)
    assert expected.abs().max() > 1  # the comparison is not between near-zero numbers
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_incremental_decoding_equals_full_forward(causal_pair):
    _, ours = causal_pair
    B, S = 2, 10
    sequence = torch.randint(0, CARD + 1, (B, K, S), generator=torch.Generator().manual_seed(4))
    condition, mask = _condition(B)
    with torch.no_grad():
        full = ours(sequence, condition=condition, condition_mask=mask)
        state = ours.init_state(B, S + 2, condition=condition, condition_mask=mask)
        chunks = [ours(sequence[..., :4], state=state)]
        chunks += [ours(sequence[..., i:i + 1], state=state) for i in range(4, 7)]
        chunks.append(ours(sequence[..., 7:], state=state))  # a multi-step chunk after the prefill
    assert state.offset == S
    torch.testing.assert_close(torch.cat(chunks, dim=2), full, atol=1e-5, rtol=0)


def _reference_generate(reference, inputs, **kwargs):
    """transformers' MusicgenForCausalLM.generate with the settings that make it well defined.

    Its generate derives a decoder attention mask from ``inputs != pad`` (BOS is the pad id, so
    it would mask the BOS column): a mask of ones is passed. With its cache, a cross-attending
    model either fails (the default cache is decoder-only) or, given an encoder-decoder cache,
    feeds only the last prompt position: the cache is turned off (full recompute each step).
    """
    with torch.no_grad():
        return reference.generate(
            inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
            decoder_start_token_id=CARD, num_return_sequences=1, use_cache=False, **kwargs)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_greedy_generation_matches_transformers(causal_pair, guidance):
    reference, ours = causal_pair
    B, T = 2, 8
    condition, mask = _condition(B)
    if guidance > 1:
        condition, mask = _with_null(condition, mask)
    bos = torch.full((B * K, 1), CARD)
    expected = _reference_generate(reference, bos, encoder_hidden_states=condition,
                                   encoder_attention_mask=mask, guidance_scale=guidance,
                                   max_new_tokens=T + K - 1)
    got = ours.generate(max_gen_len=T, num_samples=B, condition=condition, condition_mask=mask,
                        use_sampling=False, cfg_coef=guidance)
    assert got.shape == (B, K, T)
    assert torch.equal(got, expected)


def test_greedy_continuation_matches_transformers(causal_pair):
    reference, ours = causal_pair
    B, T0, T = 2, 3, 9
    condition, mask = _with_null(*_condition(B))
    prompt = torch.randint(0, CARD, (B, K, T0), generator=torch.Generator().manual_seed(5))
    inputs = torch.cat([torch.full((B * K, 1), CARD), prompt.reshape(B * K, T0)], dim=1)
    expected = _reference_generate(reference, inputs, encoder_hidden_states=condition,
                                   encoder_attention_mask=mask, guidance_scale=3.0,
                                   max_new_tokens=T - T0 + K - 1)
    got = ours.generate(max_gen_len=T, prompt=prompt, condition=condition, condition_mask=mask,
                        use_sampling=False)
    assert torch.equal(got[..., :T0], prompt)
    assert torch.equal(got, expected)


def test_stereo_greedy_generation_matches_transformers():
    torch.manual_seed(0)
    reference = transformers.MusicgenForCausalLM(transformers.MusicgenDecoderConfig(
        **_decoder_config(num_codebooks=8, audio_channels=2))).eval()
    _rescale(reference, seed=6)
    config = dataclasses.replace(get_preset("tiny_stereo"), dim=DIM, num_heads=HEADS, num_layers=LAYERS,
                                 ffn_dim=FFN)
    ours = LMModel(config).eval()
    ours.load_state_dict(transformers_to_audiocraft_lm(reference.state_dict()))
    B, T = 1, 7
    condition, mask = _with_null(*_condition(B))
    expected = _reference_generate(reference, torch.full((B * 8, 1), CARD), encoder_hidden_states=condition,
                                   encoder_attention_mask=mask, guidance_scale=3.0, max_new_tokens=T + 3)
    got = ours.generate(max_gen_len=T, num_samples=B, condition=condition, condition_mask=mask,
                        use_sampling=False)
    assert torch.equal(got, expected)


@pytest.fixture(scope="module")
def composite():
    """A tiny MusicgenForConditionalGeneration: T5 text encoder, EnCodec, decoder; random weights."""
    torch.manual_seed(0)
    config = transformers.MusicgenConfig(
        text_encoder=transformers.T5Config(vocab_size=40, d_model=24, d_kv=6, d_ff=48, num_layers=1,
                                           num_heads=4).to_dict(),
        audio_encoder=transformers.EncodecConfig(
            codebook_size=CARD, hidden_size=8, num_filters=4, upsampling_ratios=[2, 2],
            target_bandwidths=[8.0], codebook_dim=8, sampling_rate=800, num_lstm_layers=1).to_dict(),
        decoder=_decoder_config())
    model = transformers.MusicgenForConditionalGeneration(config).eval()
    _rescale(model.decoder, seed=7)
    _rescale(model.enc_to_dec_proj, seed=8)
    return model


def test_composite_greedy_generation_matches_transformers(composite, monkeypatch):
    """Full transformers path: T5 + enc_to_dec_proj + padding mask + guidance; codes captured
    where transformers hands them to the audio decoder."""
    ours = _ours_for(composite.decoder)
    B, T = 2, 8
    input_ids = torch.randint(1, 40, (B, 6), generator=torch.Generator().manual_seed(9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 3:] = 0
    captured = []
    decode = composite.audio_encoder.decode

    def capture(codes, *args, **kwargs):
        captured.append(codes.clone())
        return decode(codes, *args, **kwargs)

    monkeypatch.setattr(composite.audio_encoder, "decode", capture)
    with torch.no_grad():
        composite.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                           guidance_scale=3.0, max_new_tokens=T + K - 1)
        hidden = composite.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        condition = composite.enc_to_dec_proj(hidden) * attention_mask[..., None]
    condition, mask = _with_null(condition, attention_mask)
    got = ours.generate(max_gen_len=T, num_samples=B, condition=condition, condition_mask=mask,
                        use_sampling=False, cfg_coef=3.0)
    (expected,) = captured
    assert torch.equal(got, expected[0])


def test_prepend_conditioning_matches_transformers_melody():
    """MusicGen-melody style: the condition is prepended to the sequence, padding masked."""
    torch.manual_seed(0)
    reference = transformers.MusicgenMelodyForCausalLM(
        transformers.MusicgenMelodyDecoderConfig(**_decoder_config())).eval()
    _rescale(reference, seed=10)
    ours = _ours_for(reference, cross_attention=False)
    B, S = 2, 7
    prefix, prefix_mask = _condition(B, S=4, seed=11)
    sequence = torch.randint(0, CARD + 1, (B, K, S), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        expected = reference(input_ids=sequence.reshape(B * K, S), encoder_hidden_states=prefix,
                             encoder_attention_mask=prefix_mask).logits.reshape(B, K, -1, CARD)[:, :, -S:]
        got = ours(sequence, prefix=prefix, prefix_mask=prefix_mask)
        state = ours.init_state(B, 4 + S)
        steps = [ours(sequence[..., :3], prefix=prefix, prefix_mask=prefix_mask, state=state)]
        steps += [ours(sequence[..., i:i + 1], state=state) for i in range(3, S)]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(steps, dim=2), got, atol=1e-5, rtol=0)


def test_melody_greedy_generation_matches_transformers():
    torch.manual_seed(0)
    reference = transformers.MusicgenMelodyForCausalLM(
        transformers.MusicgenMelodyDecoderConfig(**_decoder_config())).eval()
    _rescale(reference, seed=13)
    ours = _ours_for(reference, cross_attention=False)
    B, T = 2, 6
    prefix = torch.randn(B, 3, DIM, generator=torch.Generator().manual_seed(14))
    bos = torch.full((B * K, 1), CARD)
    # transformers appends the zero null prefix itself; its attention mask here is per batch row
    # (B, S), and its cache drops the prefix after the first step, so the cache is off.
    with torch.no_grad():
        expected = reference.generate(bos, attention_mask=torch.ones(B, 1, dtype=torch.long),
                                      encoder_hidden_states=prefix, do_sample=False, guidance_scale=3.0,
                                      decoder_start_token_id=CARD, num_return_sequences=1, use_cache=False,
                                      max_new_tokens=T + K - 1)
    got = ours.generate(max_gen_len=T, num_samples=B, prefix=torch.cat([prefix, torch.zeros_like(prefix)]),
                        use_sampling=False)
    assert torch.equal(got, expected)


# -- generation behaviour -----------------------------------------------------------------------

def _tiny(seed: int = 0, **overrides) -> LMModel:
    torch.manual_seed(seed)
    model = LMModel(dataclasses.replace(get_preset("tiny"), **overrides)).eval()
    _rescale(model, seed)
    return model


def test_two_step_guidance_equals_batched_guidance():
    model = _tiny()
    condition, mask = _with_null(*_condition(2))
    kwargs = dict(max_gen_len=7, num_samples=2, condition=condition, condition_mask=mask, use_sampling=False)
    assert torch.equal(model.generate(**kwargs, two_step_cfg=True), model.generate(**kwargs))


def test_sampling_is_reproducible_with_a_generator():
    model = _tiny()
    condition, mask = _with_null(*_condition(2))

    def run(seed):
        return model.generate(max_gen_len=8, num_samples=2, condition=condition, condition_mask=mask,
                              top_k=5, generator=torch.Generator().manual_seed(seed))

    first = run(0)
    assert torch.equal(first, run(0))
    assert not torch.equal(first, run(1))
    assert ((first >= 0) & (first < CARD)).all()


def test_generation_callback_and_prompt_kept():
    model = _tiny()
    condition, mask = _with_null(*_condition(1))
    prompt = torch.randint(0, CARD, (1, K, 3))
    calls = []
    out = model.generate(max_gen_len=6, prompt=prompt, condition=condition, condition_mask=mask,
                         callback=lambda step, total: calls.append((step, total)))
    # the prompt's 3 frames are known; steps 4 .. 6 + 3 (delay tail) remain
    assert calls == [(i, 6) for i in range(1, 7)]
    assert torch.equal(out[..., :3], prompt)


def test_no_condition_is_the_null_condition():
    model = _tiny()
    null = torch.zeros(2, 3, DIM), torch.zeros(2, 3, dtype=torch.long)
    explicit = model.generate(max_gen_len=5, num_samples=2, condition=null[0], condition_mask=null[1],
                              use_sampling=False)
    assert torch.equal(model.generate(max_gen_len=5, num_samples=2, use_sampling=False), explicit)


def test_low_precision_weights_stay_close_to_float32():
    model = _tiny()
    low = _tiny().low_precision_weights(torch.bfloat16)
    assert low.linears[0].weight.dtype == torch.bfloat16 and low.emb[0].weight.dtype == torch.float32
    assert low.transformer.layers[0].norm1.weight.dtype == torch.float32
    sequence = torch.randint(0, CARD + 1, (2, K, 6))
    condition, mask = _condition(2)
    with torch.no_grad():
        ref = model(sequence, condition=condition, condition_mask=mask)
        got = low(sequence, condition=condition, condition_mask=mask)
    assert got.dtype == torch.float32
    rel = (got - ref).pow(2).mean().sqrt() / ref.std()
    assert 0 < rel < 0.02  # bf16 rounding of the weights, nothing more
    out = low.generate(max_gen_len=4, num_samples=2, condition=torch.cat([condition, condition]))
    assert out.shape == (2, K, 4)


def test_compute_predictions_alignment():
    """Valid logits at (k, t) are the forward logits at step t + k of the pattern sequence."""
    model = _tiny()
    codes = torch.randint(0, CARD, (2, K, 6))
    condition, mask = _condition(2)
    logits, valid = model.compute_predictions(codes, condition=condition, condition_mask=mask)
    sequence, _ = model.pattern_provider.get_pattern(6).build_sequence(codes, CARD, keep_only_valid_steps=True)
    forward = model(sequence, condition=condition, condition_mask=mask)
    for k in range(K):
        for t in range(6):
            assert bool(valid[0, k, t]) == (t < 6 - k)
            if t < 6 - k:
                assert torch.equal(logits[:, k, t], forward[:, k, t + k])
            else:
                assert logits[:, k, t].isnan().all()


def test_generation_errors():
    model = _tiny()
    condition, mask = _condition(3)
    with pytest.raises(ValueError, match="rows"):
        model.generate(max_gen_len=4, num_samples=2, condition=condition)
    with pytest.raises(ValueError, match="max_gen_len"):
        model.generate(max_gen_len=3, prompt=torch.zeros(1, K, 3, dtype=torch.long), condition=condition[:2])
    with pytest.raises(ValueError, match="condition_mask"):
        model(torch.zeros(3, K, 2, dtype=torch.long), condition=condition, condition_mask=mask[:, :2])
    with pytest.raises(ValueError, match="no cross-attention"):
        _tiny(cross_attention=False)(torch.zeros(3, K, 2, dtype=torch.long), condition=condition)
    with pytest.raises(ValueError, match=r"\(B, 4, S\)"):
        model(torch.zeros(3, 2, 2, dtype=torch.long), condition=condition)
    with pytest.raises(RuntimeError, match="eval"):
        model.train().generate(max_gen_len=4, condition=condition[:1])


def test_attention_backend_selection():
    model = _tiny()
    with pytest.raises(ValueError, match="attention backend"):
        model.set_attention_backend("flash")
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="xformers"):
            model.set_attention_backend("xformers")
    else:  # installed: selectable, and CPU tensors still run through SDPA
        model.set_attention_backend("xformers")
        condition, mask = _condition(1)
        model(torch.zeros(1, K, 3, dtype=torch.long), condition=condition, condition_mask=mask)


# -- checkpoint formats --------------------------------------------------------------------------

def test_transformers_translation_round_trip(composite):
    state = {k: v for k, v in composite.state_dict().items()
             if not k.startswith(("text_encoder.", "audio_encoder."))}
    ours = transformers_to_audiocraft_lm(state)
    assert "condition_provider.conditioners.description.output_proj.weight" in ours
    back = audiocraft_to_transformers_lm(ours, composite=True)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(KeyError, match="unexpected key"):
        transformers_to_audiocraft_lm({"decoder.something.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="no place"):
        audiocraft_to_transformers_lm(ours, composite=False)


AUDIOCRAFT_YAML = {
    "lm_model": "transformer_lm",
    "codebooks_pattern": {"modeling": "delay",
                          "delay": {"delays": [0, 1, 2, 3], "flatten_first": 0, "empty_initial": 0},
                          "unroll": {"flattening": [0, 1, 2, 3], "delays": [0, 0, 0, 0]}},
    "transformer_lm": {"dim": DIM, "num_heads": HEADS, "num_layers": LAYERS, "hidden_scale": 2, "n_q": K,
                       "card": CARD, "dropout": 0.0, "activation": "gelu", "norm_first": True,
                       "bias_ff": False, "bias_attn": False, "bias_proj": False, "past_context": None,
                       "causal": True, "custom": False, "memory_efficient": True, "layer_scale": None,
                       "positional_embedding": "sin", "norm": "layer_norm", "cross_attention": False,
                       "qk_layer_norm": False, "kv_repeat": 1, "two_step_cfg": False},
    "fuser": {"cross_attention_pos_emb": False, "sum": [], "prepend": [], "cross": ["description"],
              "input_interpolate": []},
    "classifier_free_guidance": {"training_dropout": 0.3, "inference_coef": 3.0},
}


def _audiocraft_file(tmp_path, model: LMModel, cfg: dict) -> str:
    state = dict(model.state_dict())
    state["condition_provider.conditioners.description.output_proj.weight"] = torch.randn(DIM, 24)
    state["condition_provider.conditioners.description.output_proj.bias"] = torch.randn(DIM)
    path = tmp_path / "state_dict.bin"
    torch.save({"best_state": state, "xp.cfg": yaml.safe_dump(cfg), "version": "1.3.0", "exported": True}, path)
    return str(path)


def test_audiocraft_state_dict_bin_loads(tmp_path):
    source = _tiny(ffn_dim=2 * DIM, card=CARD)
    path = _audiocraft_file(tmp_path, source, AUDIOCRAFT_YAML)
    model, checkpoint = load_audiocraft_lm(path)
    assert checkpoint.config == dataclasses.replace(source.config, delays=(0, 1, 2, 3))
    assert checkpoint.config.cross_attention  # enforced by the fuser's 'cross' list, as audiocraft does
    assert sorted(checkpoint.condition_state) == [
        "condition_provider.conditioners.description.output_proj.bias",
        "condition_provider.conditioners.description.output_proj.weight"]
    assert checkpoint.xp_cfg["classifier_free_guidance"]["training_dropout"] == 0.3
    sequence = torch.randint(0, CARD + 1, (1, K, 5))
    condition, mask = _condition(1)
    with torch.no_grad():
        assert torch.equal(model(sequence, condition=condition, condition_mask=mask),
                           source(sequence, condition=condition, condition_mask=mask))


def test_audiocraft_reader_errors(tmp_path):
    bad = tmp_path / "bad.bin"
    torch.save({"state": {}}, bad)
    with pytest.raises(ValueError, match="'best_state' and 'xp.cfg'"):
        read_audiocraft_lm(bad)
    torch.save({"best_state": {}, "xp.cfg": "- just\n- a list\n"}, bad)
    with pytest.raises(ValueError, match="YAML mapping"):
        read_audiocraft_lm(bad)
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a loadable torch file"):
        read_audiocraft_lm(bad)
    with pytest.raises(FileNotFoundError):
        read_audiocraft_lm(tmp_path / "missing.bin")
    unsupported = {**AUDIOCRAFT_YAML, "transformer_lm": {**AUDIOCRAFT_YAML["transformer_lm"], "layer_scale": 0.1}}
    with pytest.raises(ValueError, match="layer_scale"):
        read_audiocraft_lm({"best_state": {}, "xp.cfg": yaml.safe_dump(unsupported)})
    wrong_size = {**AUDIOCRAFT_YAML, "transformer_lm": {**AUDIOCRAFT_YAML["transformer_lm"], "card": 8}}
    path = _audiocraft_file(tmp_path, _tiny(ffn_dim=2 * DIM), wrong_size)
    with pytest.raises(ValueError, match="do not match the config"):
        load_audiocraft_lm(path)


def test_lm_config_from_audiocraft_patterns():
    cfg = {**AUDIOCRAFT_YAML, "codebooks_pattern": {"modeling": "unroll",
                                                    "unroll": {"flattening": [0, 1, 1, 2], "delays": [0, 1, 1, 2]}}}
    config = lm_config_from_audiocraft(cfg)
    assert config.pattern == "unroll" and config.flattening == (0, 1, 1, 2)
    assert config.pattern_provider().get_pattern(3).num_steps > 1
    with pytest.raises(ValueError, match="not supported"):
        lm_config_from_audiocraft({**AUDIOCRAFT_YAML, "codebooks_pattern": {"modeling": "musiclm"}})
