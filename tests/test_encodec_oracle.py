"""EncodecModel against the original `encodec` package (PyPI 0.1.1) with the same random weights.

Both 24 and 48 kHz builders, codebooks re-drawn from N(0, 1) so that codes are non-trivial.
Codes (and 48 kHz scales) must be identical, decoded audio within 1e-5, for short and odd
lengths, a batch of 2, every bandwidth, and for our model as loaded (weight norm live), after
``prepare_for_inference()`` (folded, exact encoder, time-major decoder) and with
``exact_codes=False`` (time-major encoder).
"""
from __future__ import annotations

import copy
from functools import lru_cache

import pytest
import torch

from codec import EncodecModel
from codec.runners import run_channel_major
from oracles import import_encodec

encodec = import_encodec()

BUILDERS = {"encodec_24khz": encodec.EncodecModel.encodec_model_24khz,
            "encodec_48khz": encodec.EncodecModel.encodec_model_48khz}
CODEBOOKS = {"encodec_24khz": {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32},
             "encodec_48khz": {3.0: 2, 6.0: 4, 12.0: 8, 24.0: 16}}
VARIANTS = ("loaded", "prepared", "prepared_fast")


@lru_cache(maxsize=None)
def models(preset: str) -> dict[str, torch.nn.Module]:
    """The reference and our three variants, sharing one set of random weights."""
    torch.manual_seed(0)
    ref = BUILDERS[preset](pretrained=False).eval()
    with torch.no_grad():
        for layer in ref.quantizer.vq.layers:
            layer._codebook.embed.normal_()
    ours = EncodecModel.from_preset(preset)
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    return {"reference": ref, "loaded": ours,
            "prepared": copy.deepcopy(ours).prepare_for_inference(),
            "prepared_fast": copy.deepcopy(ours).prepare_for_inference(exact_codes=False)}


def lengths(preset: str) -> list[int]:
    rate = EncodecModel.from_preset(preset).sample_rate
    return [1, 319, 321, 2 * rate + 7]


@lru_cache(maxsize=None)
def audio(preset: str, length: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(length)
    channels = EncodecModel.from_preset(preset).channels
    t = torch.arange(length) / 24000
    tone = 0.3 * torch.sin(2 * torch.pi * 440 * t)
    return tone + 0.1 * torch.randn(2, channels, length, generator=gen)  # batch of 2


def bandwidths(preset: str, length: int) -> list[float]:
    """Every bandwidth on short inputs; on the 2 s one the ends (the quantizer-level test
    covers every bandwidth there)."""
    every = list(CODEBOOKS[preset])
    return every if length < 1000 else [every[0], every[-1]]


@lru_cache(maxsize=None)
def reference_output(preset: str, length: int, bandwidth: float):
    ref = models(preset)["reference"]
    ref.set_target_bandwidth(bandwidth)
    with torch.no_grad():
        frames = ref.encode(audio(preset, length))
        return frames, ref.decode(frames)


@pytest.mark.parametrize("preset", BUILDERS)
def test_bandwidth_gives_the_reference_codebook_count(preset):
    ref, ours = models(preset)["reference"], models(preset)["loaded"]
    for bandwidth, count in CODEBOOKS[preset].items():
        assert ref.quantizer.get_num_quantizers_for_bandwidth(ref.frame_rate, bandwidth) == count
        assert ours.num_codebooks_for_bandwidth(bandwidth) == count
    assert ours.num_codebooks == max(CODEBOOKS[preset].values())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("preset", BUILDERS)
@pytest.mark.parametrize("which", range(4), ids=["1", "319", "321", "2s+7"])
def test_codes_and_audio_match_the_reference(preset, which, variant):
    length = lengths(preset)[which]
    model = models(preset)[variant]
    wav = audio(preset, length)
    for bandwidth in bandwidths(preset, length):
        want_frames, want_audio = reference_output(preset, length, bandwidth)
        frames = model.encode(wav, bandwidth=bandwidth)
        assert len(frames) == len(want_frames)
        for got, (codes, scale) in zip(frames, want_frames):
            assert got.codes.shape == (2, CODEBOOKS[preset][bandwidth], codes.shape[-1])
            assert torch.equal(got.codes, codes), f"{bandwidth} kbps"
            assert (got.scale is None) == (scale is None)
            if scale is not None:
                assert torch.equal(got.scale, scale)
        with torch.no_grad():
            decoded = model.decode(frames)
        assert decoded.shape == want_audio.shape
        err = (decoded - want_audio).abs().max().item()
        if variant == "loaded":  # same kernels on the same tensors: bit for bit
            assert err == 0.0, f"{bandwidth} kbps"
        else:
            assert err < 1e-5, f"{bandwidth} kbps: {err}"


@pytest.mark.parametrize("preset", BUILDERS)
def test_every_bandwidth_on_two_seconds(preset):
    """Latents bitwise (the exact runner after folding), then every codebook count."""
    ref, prepared = models(preset)["reference"], models(preset)["prepared"]
    wav = audio(preset, lengths(preset)[-1])[..., : prepared.segment_length or None]
    with torch.inference_mode():
        if prepared.normalize:
            wav = wav / (1e-8 + wav.mean(1, keepdim=True).pow(2).mean(2, keepdim=True).sqrt())
        latent = ref.encoder(wav)
        assert torch.equal(run_channel_major(prepared.encoder.model, wav), latent)
        for bandwidth, count in CODEBOOKS[preset].items():
            want = ref.quantizer.encode(latent, ref.frame_rate, bandwidth).transpose(0, 1)
            assert torch.equal(prepared.quantizer.encode(latent, count), want)
            assert torch.equal(prepared.quantizer.decode(want),
                               ref.quantizer.decode(want.transpose(0, 1)))


def test_reference_forward_round_trip_matches():
    ref, ours = models("encodec_24khz")["reference"], models("encodec_24khz")["prepared"]
    wav = audio("encodec_24khz", 321)
    ref.set_target_bandwidth(6.0)
    with torch.no_grad():
        want = ref(wav)
    got = ours(wav, bandwidth=6.0)
    assert got.shape == want.shape == wav.shape
    assert (got - want).abs().max() < 1e-5
