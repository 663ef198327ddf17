"""Melody chroma vs transformers' MusicgenMelodyFeatureExtractor and MusicgenMelody conditioning path.

transformers' extractor builds a ``torchaudio.transforms.Spectrogram``. torchaudio has no build
that loads with this torch, so unless a real one imports, the test hands the extractor a
stand-in computed with transformers' own numpy ``audio_utils.spectrogram`` (float64, periodic
Hann, centred, reflect padding) scaled by 1/sum(window^2), which is torchaudio's
``normalized=True`` for a power spectrogram. Everything else (filter bank, padding of short and
batched audio, max-normalization, argmax) is transformers' code.
"""
from __future__ import annotations

import importlib
import types

import numpy as np
import pytest
import torch
from t5_fixture import tiny_t5_folder  # noqa: F401  (fixture)

from conditioning import (
    FUSER_PRESETS,
    ChromaConditioner,
    ChromaConfig,
    ChromaExtractor,
    ConditionFuser,
    ConditionProvider,
    T5Conditioner,
    chroma_filter_bank,
)

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
from transformers.audio_utils import chroma_filter_bank as hf_chroma_filter_bank  # noqa: E402
from transformers.audio_utils import spectrogram as hf_spectrogram  # noqa: E402
from transformers.audio_utils import window_function  # noqa: E402

SR = 32_000
DECODER_DIM = 32


class NumpySpectrogram:
    """torchaudio's Spectrogram(power=2, normalized=True, center=True) via transformers' numpy STFT."""

    def __init__(self, *, n_fft, win_length, hop_length, power, center, pad, normalized):
        assert win_length == n_fft and pad == 0 and normalized is True and center and power == 2
        self.n_fft, self.hop_length = n_fft, hop_length
        self.window = window_function(n_fft, "hann", periodic=True)

    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        specs = [hf_spectrogram(w.double().numpy(), self.window, frame_length=self.n_fft,
                                hop_length=self.hop_length, power=2.0, center=True, pad_mode="reflect",
                                dtype=np.float64) for w in wav]
        return torch.from_numpy(np.stack(specs) / np.sum(self.window ** 2)).float()


def _torchaudio_or_stand_in():
    try:
        import torchaudio

        torchaudio.transforms.Spectrogram(n_fft=16)  # noqa: B018 - proves the build loads
        return torchaudio
    except Exception:
        return types.SimpleNamespace(transforms=types.SimpleNamespace(Spectrogram=NumpySpectrogram))


@pytest.fixture(scope="module")
def hf_extractor():
    module = importlib.import_module("transformers.models.musicgen_melody.feature_extraction_musicgen_melody")
    had = hasattr(module, "torchaudio")
    saved = getattr(module, "torchaudio", None)
    module.torchaudio = _torchaudio_or_stand_in()
    try:
        yield module.MusicgenMelodyFeatureExtractor()  # default args: 32 kHz, n_fft 16384, hop 4096
    finally:
        if had:
            module.torchaudio = saved
        else:
            del module.torchaudio


def melody(notes_hz: list[float], seconds: float, seed: int) -> np.ndarray:
    """Consecutive notes (fundamental + octave) with a little noise: a clear chroma per frame."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    out = np.zeros_like(t)
    step = len(t) // len(notes_hz)
    for i, f in enumerate(notes_hz):
        part = slice(i * step, len(t) if i == len(notes_hz) - 1 else (i + 1) * step)
        out[part] = np.sin(2 * np.pi * f * t[part]) + 0.5 * np.sin(4 * np.pi * f * t[part])
    return (0.5 * out + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


C4, E4, F4, G4, A4, B4 = 261.63, 329.63, 349.23, 392.0, 440.0, 493.88
MELODIES = [melody([C4, E4, G4, A4], 2.0, 0), melody([B4, F4], 1.3, 1)]


def test_filter_bank_matches_transformers():
    for sr, n_fft in [(32_000, 16_384), (16_000, 2_048), (44_100, 4_096)]:
        ours = chroma_filter_bank(sample_rate=sr, n_fft=n_fft)
        ref = hf_chroma_filter_bank(num_frequency_bins=n_fft, num_chroma=12, sampling_rate=sr, tuning=0)
        assert ours.shape == (12, n_fft // 2 + 1) == ref.shape
        torch.testing.assert_close(ours, torch.from_numpy(ref).float(), rtol=1e-5, atol=1e-7)
    ours = chroma_filter_bank(sample_rate=22_050, n_fft=2_048, num_chroma=24, tuning=0.3)
    ref = hf_chroma_filter_bank(num_frequency_bins=2_048, num_chroma=24, sampling_rate=22_050, tuning=0.3)
    torch.testing.assert_close(ours, torch.from_numpy(ref).float(), rtol=1e-5, atol=1e-7)


def test_chroma_matches_feature_extractor(hf_extractor):
    ref = hf_extractor(MELODIES, sampling_rate=SR, return_tensors="pt")["input_features"]
    conditioner = ChromaConditioner(output_dim=8)
    ours = conditioner.chroma(conditioner.prepare([torch.from_numpy(m) for m in MELODIES]).wav)
    assert ours.shape == ref.shape == (2, 16, 12)
    assert torch.equal(ours, ref)
    assert ours[0].argmax(-1).tolist() == [0] * 4 + [4] * 4 + [7] * 4 + [9] * 4  # C E G A
    assert ours[1, :13].argmax(-1).tolist() == [11] * 6 + [5] * 7  # B F, then padding
    for audio in MELODIES:  # one at a time: no batch padding
        single = hf_extractor([audio], sampling_rate=SR, return_tensors="pt")["input_features"]
        assert torch.equal(ChromaExtractor()(torch.from_numpy(audio)[None]), single)


def test_short_and_silent_audio_match_feature_extractor(hf_extractor):
    short = [melody([A4], 0.3, 2), np.zeros(100, dtype=np.float32)]  # both shorter than n_fft
    ref = hf_extractor(short, sampling_rate=SR, return_tensors="pt")["input_features"]
    padded = np.stack([short[0], np.pad(short[1], (0, len(short[0]) - 100))])
    ours = ChromaExtractor()(torch.from_numpy(padded))
    assert ours.shape == ref.shape == (2, 5, 12)
    assert torch.equal(ours, ref)
    assert ours[1].argmax(-1).tolist() == [0] * 5  # silence -> one-hot C


def test_chroma_before_argmax_matches_numpy_pipeline():
    wav = torch.from_numpy(MELODIES[0])[None]
    ours = ChromaExtractor(argmax=False)(wav)[0]
    spec = NumpySpectrogram(n_fft=16_384, win_length=16_384, hop_length=4_096, power=2, center=True,
                            pad=0, normalized=True)(wav)[0].double().numpy()
    bank = hf_chroma_filter_bank(num_frequency_bins=16_384, num_chroma=12, sampling_rate=SR, tuning=0)
    raw = bank @ spec
    ref = (raw / np.maximum(np.abs(raw).max(axis=0, keepdims=True), 1e-6)).T
    torch.testing.assert_close(ours, torch.from_numpy(ref).float(), rtol=1e-4, atol=1e-5)


def test_chroma_length_matches_transformers_default():
    from transformers import MusicgenMelodyConfig

    assert ChromaConfig().chroma_length == MusicgenMelodyConfig.chroma_length == 235


def test_prepare_mixes_channels_and_pads():
    conditioner = ChromaConditioner(output_dim=4)
    stereo = torch.randn(2, 500)
    batch = conditioner.prepare([stereo, None, torch.ones(300)])
    assert batch.wav.shape == (3, 500) and batch.lengths.tolist() == [500, 0, 300]
    torch.testing.assert_close(batch.wav[0], stereo.mean(0))
    assert batch.wav[1].abs().sum() == 0 and batch.wav[2, 300:].abs().sum() == 0
    assert conditioner.prepare(torch.randn(2, 2, 50)).wav.shape == (2, 50)
    for bad in ([torch.randn(1, 2, 3)], [torch.zeros(0)], ["x"], [], torch.randn(4)):
        with pytest.raises(ValueError):
            conditioner.prepare(bad)
    with pytest.raises(ValueError, match="32000 Hz, found 44100 Hz"):
        conditioner.prepare([stereo], sample_rate=44_100)


def test_chroma_stays_float32_when_module_is_cast():
    wav = torch.from_numpy(MELODIES[0])[None]
    reference = ChromaExtractor(argmax=False)(wav)
    cast = ChromaExtractor(argmax=False).to(torch.bfloat16)
    assert torch.equal(cast(wav), reference) and reference.dtype == torch.float32
    conditioner = ChromaConditioner(output_dim=4).to(torch.float64)
    assert conditioner.encode([wav[0]]).embeddings.dtype == torch.float64


def test_training_mode_masks_by_length_and_nulls_to_zero():
    config = ChromaConfig(n_fft=2_048, hop_length=512, duration=1.0)
    conditioner = ChromaConditioner(output_dim=6, config=config, match_length=False)
    out = conditioner.encode([torch.randn(5_000), torch.randn(2_000), None])
    frames = 1 + 5_000 // 512
    assert out.embeddings.shape == (3, frames, 6)
    valid = [sum(t < n / 512 for t in range(frames)) for n in (5_000, 2_000, 0)]
    assert out.mask.sum(dim=1).tolist() == valid == [10, 4, 0]
    assert out.embeddings[2].abs().sum() == 0
    assert (out.embeddings[1, 4:] == 0).all() and (out.embeddings[1, :4] != 0).any()


def test_inference_mode_tiles_to_chroma_length():
    config = ChromaConfig(n_fft=2_048, hop_length=512, duration=1.0)  # chroma_length 63
    conditioner = ChromaConditioner(output_dim=6, config=config)
    out = conditioner.encode([torch.randn(3_000), None])
    assert out.embeddings.shape == (2, config.chroma_length, 6) and out.mask.all()
    chroma = conditioner.chroma(conditioner.prepare([torch.randn(3_000)]).wav)
    assert chroma.shape[1] == 6
    one_hot_c = conditioner.output_proj(torch.eye(12)[0])
    torch.testing.assert_close(out.embeddings[1], one_hot_c.expand(config.chroma_length, 6))
    torch.testing.assert_close(out.embeddings[0, :6], out.embeddings[0, 6:12])  # tiled
    long = conditioner.encode([torch.randn(40_000)])
    assert long.embeddings.shape[1] == config.chroma_length  # cut


# --- against transformers' MusicgenMelodyForConditionalGeneration --------------------------------

@pytest.fixture(scope="module")
def melody_model(tiny_t5_folder):  # noqa: F811
    from transformers import (EncodecConfig, MusicgenMelodyConfig, MusicgenMelodyDecoderConfig,
                              MusicgenMelodyForConditionalGeneration, T5EncoderModel)

    t5 = T5EncoderModel.from_pretrained(str(tiny_t5_folder))
    codec = EncodecConfig(num_filters=4, upsampling_ratios=[2, 2], codebook_size=16, hidden_size=8,
                          num_lstm_layers=1, codebook_dim=8, sampling_rate=800, target_bandwidths=[4.0],
                          chunk_length_s=None)
    decoder = MusicgenMelodyDecoderConfig(vocab_size=16, hidden_size=DECODER_DIM, num_hidden_layers=1,
                                          num_attention_heads=2, ffn_dim=64, num_codebooks=2,
                                          pad_token_id=16, bos_token_id=16, decoder_start_token_id=16)
    torch.manual_seed(0)
    model = MusicgenMelodyForConditionalGeneration(MusicgenMelodyConfig(
        text_encoder=t5.config.to_dict(), audio_encoder=codec.to_dict(), decoder=decoder.to_dict(),
        chroma_length=ChromaConfig().chroma_length))
    model.text_encoder.load_state_dict(t5.state_dict())
    return model.eval()


def our_provider(model, t5_folder) -> ConditionProvider:
    text = T5Conditioner.from_pretrained(t5_folder, output_dim=DECODER_DIM, empty_is_null=False)
    text.output_proj.load_state_dict(model.enc_to_dec_proj.state_dict())
    chroma = ChromaConditioner(output_dim=DECODER_DIM)
    chroma.output_proj.load_state_dict(model.audio_enc_to_dec_proj.state_dict())
    return ConditionProvider({"description": text, "self_wav": chroma}).eval()


def capture_decoder_inputs(model):
    calls = []

    def hook(module, args, kwargs):
        calls.append(kwargs.get("encoder_hidden_states"))

    return calls, model.decoder.register_forward_pre_hook(hook, with_kwargs=True)


TEXTS = ["calm piano melody", "80s pop track with bassy drums and synth"]


def test_melody_conditions_match_musicgen_melody(melody_model, hf_extractor, tiny_t5_folder):  # noqa: F811
    from transformers import T5Tokenizer

    text_inputs = T5Tokenizer.from_pretrained(str(tiny_t5_folder))(TEXTS, padding=True, return_tensors="pt")
    features = hf_extractor(MELODIES, sampling_rate=SR, return_tensors="pt")["input_features"]
    calls, handle = capture_decoder_inputs(melody_model)
    try:
        with torch.no_grad():
            melody_model(**text_inputs, input_features=features,
                         decoder_input_ids=torch.zeros(len(TEXTS) * 2, 1, dtype=torch.long))
    finally:
        handle.remove()
    (ref,) = calls
    provider = our_provider(melody_model, tiny_t5_folder)
    with torch.no_grad():
        conditions = provider({"description": TEXTS, "self_wav": [torch.from_numpy(m) for m in MELODIES]})
    frames = ChromaConfig().chroma_length
    assert ref.shape[1] == frames + conditions["description"].mask.shape[1]
    torch.testing.assert_close(conditions["self_wav"].embeddings, ref[:, :frames], rtol=0, atol=1e-5)
    torch.testing.assert_close(conditions["description"].embeddings, ref[:, frames:], rtol=0, atol=1e-5)
    # The fuser's melody preset puts them in front of the LM input in the same order.
    x = torch.randn(len(TEXTS), 3, DECODER_DIM)
    fused = ConditionFuser(FUSER_PRESETS["chroma2music"])(x, conditions)
    torch.testing.assert_close(fused.input[:, : fused.prepend_length], ref, rtol=0, atol=1e-5)
    assert torch.equal(fused.input[:, fused.prepend_length:], x) and fused.cross is None


def test_melody_null_matches_guidance_branch(melody_model, hf_extractor, tiny_t5_folder):  # noqa: F811
    from transformers import T5Tokenizer

    text_inputs = T5Tokenizer.from_pretrained(str(tiny_t5_folder))(TEXTS, padding=True, return_tensors="pt")
    features = hf_extractor(MELODIES, sampling_rate=SR, return_tensors="pt")["input_features"]
    calls, handle = capture_decoder_inputs(melody_model)
    try:
        with torch.no_grad():
            melody_model.generate(**text_inputs, input_features=features, guidance_scale=3.0,
                                  max_new_tokens=2, do_sample=False)
    finally:
        handle.remove()
    ref = calls[0]
    batch = len(TEXTS)
    assert ref.shape[0] == 2 * batch
    provider = our_provider(melody_model, tiny_t5_folder)
    melodies = [torch.from_numpy(m) for m in MELODIES]
    with torch.no_grad():
        conditions = provider({"description": TEXTS + [None] * batch, "self_wav": melodies + [None] * batch})
    fused = ConditionFuser(FUSER_PRESETS["chroma2music"])(torch.zeros(2 * batch, 1, DECODER_DIM), conditions)
    torch.testing.assert_close(fused.input[:, : fused.prepend_length], ref, rtol=0, atol=1e-5)
