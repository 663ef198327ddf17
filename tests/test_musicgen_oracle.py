"""transformers' MusicGen is the oracle for the whole generator loaded from its own folder.

A tiny ``MusicgenForConditionalGeneration`` (tiny T5 from ``t5_fixture`` with its trained
sentencepiece model, tiny EnCodec, tiny decoder) gets random weights at unit scale (its own
init makes token embeddings so small that the tokens would barely matter) and random
codebooks, is written with ``save_pretrained`` together with its tokenizer, and is loaded by
``MusicGen.from_pretrained``. Checked: logits for the same text and token inputs (1e-4),
greedy generation with guidance 3 (identical tokens, audio within 1e-4), unconditional
generation and continuation of an audio prompt; then the same for ``MusicgenMelody`` with a
melody, and a stereo decoder (8 codebooks, interleaved codec).
"""
from __future__ import annotations

import pytest
import torch
from t5_fixture import tiny_t5_folder  # noqa: F401  (fixture)

from conditioning import ChromaExtractor
from inference import MusicGen, detect_format

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

CARD, DIM, K, SR, HOP = 16, 32, 4, 800, 4  # codec: 800 Hz, hop 4 -> 200 frames per second
FRAME_RATE = SR // HOP
TEXTS = ["happy rock song with electric guitar", "calm piano"]


def rescale(module: torch.nn.Module, seed: int) -> None:
    """Unit-scale random weights: embeddings N(0, 1), matrices N(0, 1/fan_in), norms near 1 / 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            elif param.dim() == 2:
                param.copy_(noise / (1.0 if "embed" in name else param.shape[1] ** 0.5))
            else:
                param.copy_(0.1 * noise)


def randomize_codebooks(codec: torch.nn.Module, seed: int) -> None:
    """transformers' codebooks start at zero, which would decode every code to the same audio."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in codec.quantizer.layers:
            layer.codebook.embed.copy_(torch.randn(layer.codebook.embed.shape, generator=gen))
            layer.codebook.embed_avg.copy_(layer.codebook.embed)
            layer.codebook.inited.fill_(1.0)


def codec_config():
    # 3.2 kbps at 200 frames/s and 16-entry codebooks (4 bits): 4 codebooks.
    return transformers.EncodecConfig(
        num_filters=4, upsampling_ratios=[2, 2], codebook_size=CARD, hidden_size=8, num_lstm_layers=1,
        codebook_dim=8, sampling_rate=SR, target_bandwidths=[3.2], chunk_length_s=None,
        use_conv_shortcut=False)


def decoder_kwargs(**overrides):
    kwargs = dict(vocab_size=CARD, hidden_size=DIM, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                  num_codebooks=K, pad_token_id=CARD, bos_token_id=CARD, decoder_start_token_id=CARD,
                  max_position_embeddings=256, dropout=0.0)
    kwargs.update(overrides)
    return kwargs


def build_and_save(folder, t5_folder, *, melody: bool = False, stereo: bool = False, seed: int = 0):
    """A random tiny composite model saved (with the T5 tokenizer) into ``folder``; returns it in eval mode."""
    t5 = transformers.T5EncoderModel.from_pretrained(str(t5_folder))
    torch.manual_seed(seed)
    if melody:
        decoder = transformers.MusicgenMelodyDecoderConfig(**decoder_kwargs())
        model = transformers.MusicgenMelodyForConditionalGeneration(transformers.MusicgenMelodyConfig(
            text_encoder=t5.config.to_dict(), audio_encoder=codec_config().to_dict(), decoder=decoder.to_dict(),
            chroma_length=10))
    else:
        decoder = transformers.MusicgenDecoderConfig(**decoder_kwargs(
            **(dict(num_codebooks=2 * K, audio_channels=2) if stereo else {})))
        model = transformers.MusicgenForConditionalGeneration(transformers.MusicgenConfig(
            text_encoder=t5.config.to_dict(), audio_encoder=codec_config().to_dict(), decoder=decoder.to_dict()))
    model.text_encoder.load_state_dict(t5.state_dict())
    rescale(model.decoder, seed + 1)
    rescale(model.enc_to_dec_proj, seed + 2)
    if melody:
        rescale(model.audio_enc_to_dec_proj, seed + 3)
    randomize_codebooks(model.audio_encoder, seed + 4)
    model.eval()
    model.save_pretrained(str(folder))
    transformers.T5Tokenizer.from_pretrained(str(t5_folder)).save_pretrained(str(folder))
    return model


def tokenize(folder, texts):
    return transformers.T5Tokenizer.from_pretrained(str(folder))(texts, padding=True, return_tensors="pt")


def reference_generate(model, frames: int, num_codebooks: int = K, max_delay: int = K - 1, **inputs):
    """transformers' greedy generation: (codes (B, K, T) where it hands them to the codec, audio)."""
    captured = []
    decode = model.audio_encoder.decode

    def capture(codes, *args, **kwargs):
        captured.append(codes.clone())
        return decode(codes, *args, **kwargs)

    model.audio_encoder.decode = capture
    try:
        with torch.no_grad():
            audio = model.generate(**inputs, do_sample=False, max_new_tokens=frames + max_delay)
    finally:
        del model.audio_encoder.decode
    if num_codebooks == K:
        (codes,) = captured
        return codes[0], audio
    left, right = captured  # stereo: left codebooks (::2) then right (1::2)
    codes = torch.stack([left[0], right[0]], dim=2).flatten(1, 2)
    return codes, audio


@pytest.fixture(scope="module")
def mono(tiny_t5_folder, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("musicgen") / "tiny-musicgen"
    reference = build_and_save(folder, tiny_t5_folder)
    return reference, MusicGen.from_pretrained(folder, device="cpu"), folder


def test_folder_is_detected_and_configured(mono):
    reference, ours, folder = mono
    assert detect_format(folder) == "transformers"
    assert ours.lm.config.num_codebooks == K and ours.lm.config.card == CARD and ours.lm.config.dim == DIM
    assert ours.sample_rate == SR and ours.frame_rate == FRAME_RATE and ours.channels == 1
    assert ours.config.mask_condition_padding and ours.config.max_duration == 30.0
    assert not any(p.is_meta for p in ours.parameters())


def test_logits_match(mono):
    reference, ours, folder = mono
    inputs = tokenize(folder, TEXTS)
    assert inputs["attention_mask"].sum() < inputs["attention_mask"].numel()  # padding is exercised
    S = 9
    sequence = torch.randint(0, CARD + 1, (len(TEXTS), K, S), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(**inputs, decoder_input_ids=sequence.reshape(-1, S)).logits
        conditions = ours.prepare_conditions(TEXTS, guided=False)
        got = ours.lm(sequence, **conditions.as_kwargs())
    torch.testing.assert_close(got, expected.reshape(len(TEXTS), K, S, CARD), atol=1e-4, rtol=0)


def test_greedy_generation_with_guidance_matches(mono):
    reference, ours, folder = mono
    frames = 12
    expected_codes, expected_audio = reference_generate(reference, frames, **tokenize(folder, TEXTS),
                                                        guidance_scale=3.0)
    out = ours.generate(TEXTS, frames / FRAME_RATE, use_sampling=False, cfg_coef=3.0, return_tokens=True)
    assert out.tokens.shape == (len(TEXTS), K, frames)
    assert torch.equal(out.tokens, expected_codes)
    assert out.tokens.unique().numel() > 4  # the tokens vary: the comparison means something
    assert out.wav.shape == expected_audio.shape == (len(TEXTS), 1, frames * HOP)
    torch.testing.assert_close(out.wav, expected_audio, atol=1e-4, rtol=0)


def test_unconditional_generation_matches(mono):
    reference, ours, _ = mono
    frames = 8
    inputs = reference.get_unconditional_inputs(num_samples=2)
    expected_codes, expected_audio = reference_generate(reference, frames, **inputs)
    out = ours.generate([None, ""], frames / FRAME_RATE, use_sampling=False, cfg_coef=1.0, return_tokens=True)
    assert torch.equal(out.tokens, expected_codes)
    torch.testing.assert_close(out.wav, expected_audio, atol=1e-4, rtol=0)


def test_continuation_matches(mono):
    reference, ours, folder = mono
    prompt_frames, frames = 5, 11
    wav = 0.3 * torch.randn(2, 1, prompt_frames * HOP, generator=torch.Generator().manual_seed(4))
    expected_codes, expected_audio = reference_generate(
        reference, frames - prompt_frames, **tokenize(folder, TEXTS), input_values=wav, guidance_scale=3.0)
    out = ours.generate(TEXTS, frames / FRAME_RATE, use_sampling=False, audio_prompt=(wav, SR),
                        return_tokens=True)
    assert torch.equal(out.tokens[..., :prompt_frames], ours.encode_audio(wav, SR))
    assert torch.equal(out.tokens, expected_codes)
    torch.testing.assert_close(out.wav, expected_audio, atol=1e-4, rtol=0)


def test_melody_model_matches(tiny_t5_folder, tmp_path):  # noqa: F811
    folder = tmp_path / "tiny-melody"
    reference = build_and_save(folder, tiny_t5_folder, melody=True, seed=10)
    ours = MusicGen.from_pretrained(folder, device="cpu")
    assert ours.has_melody and not ours.lm.config.cross_attention
    chroma_rate = ours.condition_provider.conditioners["self_wav"].config.sample_rate
    assert chroma_rate == 32_000
    t = torch.arange(chroma_rate) / chroma_rate
    melodies = torch.stack([torch.sin(2 * torch.pi * 440 * t), torch.sin(2 * torch.pi * 262 * t)])[:, None]
    features = ChromaExtractor()(melodies[:, 0])  # equal to transformers' feature extractor (test_melody)
    inputs = tokenize(folder, TEXTS)
    S = 7
    sequence = torch.randint(0, CARD + 1, (2, K, S), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = reference(**inputs, input_features=features, decoder_input_ids=sequence.reshape(-1, S)).logits
        conditions = ours.prepare_conditions(TEXTS, melodies=list(melodies), guided=False)
        got = ours.lm(sequence, **conditions.as_kwargs())
    torch.testing.assert_close(got, expected.reshape(2, K, -1, CARD)[:, :, -S:], atol=1e-4, rtol=0)

    frames = 9
    expected_codes, expected_audio = reference_generate(reference, frames, **inputs, input_features=features,
                                                        guidance_scale=3.0)
    out = ours.generate(TEXTS, frames / FRAME_RATE, use_sampling=False, melody=(melodies, chroma_rate),
                        return_tokens=True)
    assert torch.equal(out.tokens, expected_codes)
    torch.testing.assert_close(out.wav, expected_audio, atol=1e-4, rtol=0)


def test_stereo_model_matches(tiny_t5_folder, tmp_path):  # noqa: F811
    folder = tmp_path / "tiny-stereo"
    reference = build_and_save(folder, tiny_t5_folder, stereo=True, seed=20)
    ours = MusicGen.from_pretrained(folder, device="cpu")
    assert ours.channels == 2 and ours.lm.config.delays == (0, 0, 1, 1, 2, 2, 3, 3)
    frames = 8
    expected_codes, expected_audio = reference_generate(reference, frames, num_codebooks=2 * K,
                                                        **tokenize(folder, TEXTS), guidance_scale=3.0)
    out = ours.generate(TEXTS, frames / FRAME_RATE, use_sampling=False, return_tokens=True)
    assert out.tokens.shape == (2, 2 * K, frames)
    assert torch.equal(out.tokens, expected_codes)
    assert out.wav.shape == expected_audio.shape == (2, 2, frames * HOP)
    torch.testing.assert_close(out.wav, expected_audio, atol=1e-4, rtol=0)


def test_sharded_folder_loads_the_same(mono, tmp_path):
    """Large hub models come in shards (model-0000i-of-0000n.safetensors + an index)."""
    reference, ours, folder = mono
    sharded = tmp_path / "sharded"
    reference.save_pretrained(str(sharded), max_shard_size="20KB")
    transformers.T5Tokenizer.from_pretrained(str(folder)).save_pretrained(str(sharded))
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    loaded = MusicGen.from_pretrained(sharded, device="cpu")
    for key, value in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    a = ours.generate(TEXTS, 0.04, seed=0, return_tokens=True)
    b = loaded.generate(TEXTS, 0.04, seed=0, return_tokens=True)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.wav, b.wav)
