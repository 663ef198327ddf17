"""codec.audio: reading every format this libsndfile build has, resampling, channels,
normalization, atomic writes, blockwise reading."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from codec import audio

SR = 24_000


def sine(freq: float, seconds: float, sr: int = SR, channels: int = 1,
         amp: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(seconds * sr), dtype=torch.float64) / sr
    return (amp * torch.sin(2 * math.pi * freq * t)).float().expand(channels, -1).contiguous()


def dominant_frequency(wav: torch.Tensor, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wav[0].double().numpy() * np.hanning(wav.shape[-1])))
    return float(np.argmax(spectrum) * sr / wav.shape[-1])


# -- reading ------------------------------------------------------------------------------
# (extension, soundfile format, subtype, max abs error after decoding a 0.5-amplitude sine)
FORMATS = [("wav", "WAV", "PCM_16", 1e-4), ("flac", "FLAC", "PCM_24", 1e-6),
           ("ogg", "OGG", "VORBIS", 0.1), ("opus", "OGG", "OPUS", 0.1),
           ("mp3", "MP3", "MPEG_LAYER_III", 0.15)]


@pytest.mark.parametrize("ext,fmt,subtype,tol", FORMATS)
def test_read_each_supported_format(tmp_path, ext, fmt, subtype, tol):
    if f".{ext}" not in audio.readable_extensions():
        pytest.skip(f"this libsndfile build cannot handle .{ext}")
    wav = sine(440, 1.0, channels=2)
    path = tmp_path / f"x.{ext}"
    sf.write(str(path), wav.T.numpy(), SR, format=fmt, subtype=subtype)
    got, sr = audio.read_audio(path)
    assert sr == SR and got.dtype == torch.float32 and got.shape[0] == 2
    assert abs(got.shape[1] - SR) <= 2048  # lossy codecs may pad their last frame
    assert abs(dominant_frequency(got, sr) - 440) < 2
    if tol < 0.01:  # lossless: samples match
        assert torch.allclose(got, wav, atol=tol)


def test_supported_formats_cover_the_common_ones():
    # The build used here has all of them; the list is what error messages and folders use.
    for ext in (".wav", ".flac", ".ogg", ".mp3", ".opus"):
        assert ext in audio.readable_extensions()


def test_read_slice_matches_full_read(tmp_path):
    wav = torch.randn(2, 5000).clamp(-1, 1) * 0.5
    path = tmp_path / "x.flac"
    audio.write_audio(path, wav, SR, subtype="PCM_24")
    full, _ = audio.read_audio(path)
    part, _ = audio.read_audio(path, start=1234, frames=777)
    assert part.shape == (2, 777)
    assert torch.equal(part, full[:, 1234:2011])
    tail, _ = audio.read_audio(path, start=4000)
    assert torch.equal(tail, full[:, 4000:])


def test_unreadable_file_names_file_and_formats(tmp_path):
    path = tmp_path / "notes.m4a"
    path.write_bytes(b"\x00\x01 definitely not audio" * 20)
    with pytest.raises(audio.AudioError) as info:
        audio.read_audio(path)
    message = str(info.value)
    assert "notes.m4a" in message and "wav" in message and "flac" in message
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        audio.read_audio(tmp_path / "missing.wav")


def test_truncated_flac_is_an_audio_error(tmp_path):
    path = tmp_path / "x.flac"
    audio.write_audio(path, (torch.randn(1, SR) * 0.3).clamp(-1, 1), SR)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(audio.AudioError, match="x.flac"):
        audio.read_audio(path)


# -- resampling ---------------------------------------------------------------------------
@pytest.mark.parametrize("sr_in,sr_out", [(44_100, 24_000), (16_000, 48_000), (48_000, 32_000),
                                          (22_050, 24_000)])
def test_resample_length_and_frequency(sr_in, sr_out):
    wav = sine(1000, 0.5, sr=sr_in, channels=2)
    out = audio.resample(wav, sr_in, sr_out)
    assert out.shape == (2, round(wav.shape[-1] * sr_out / sr_in))
    assert out.dtype == torch.float32
    assert abs(dominant_frequency(out, sr_out) - 1000) < sr_out / out.shape[-1]
    # Away from the edges the resampled sine is the sine at the new rate.
    expected = sine(1000, 0.5, sr=sr_out, channels=2)[:, : out.shape[-1]]
    middle = slice(out.shape[-1] // 4, 3 * out.shape[-1] // 4)
    assert torch.allclose(out[:, middle], expected[:, middle], atol=2e-3)


def test_resample_is_deterministic_and_identity_at_same_rate():
    wav = torch.randn(1, 3001)
    assert audio.resample(wav, SR, SR) is wav
    assert torch.equal(audio.resample(wav, 44_100, SR), audio.resample(wav, 44_100, SR))
    with pytest.raises(ValueError, match="positive"):
        audio.resample(wav, 0, SR)


def test_resample_leading_dims_are_independent_channels():
    wav = torch.randn(3, 2, 1000)
    out = audio.resample(wav, 16_000, 24_000)
    assert out.shape == (3, 2, 1500)
    assert torch.equal(out[1, 0], audio.resample(wav[1, 0], 16_000, 24_000))


# -- channels -----------------------------------------------------------------------------
def test_convert_channels():
    stereo = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])
    assert torch.equal(audio.convert_channels(stereo, 1), torch.tensor([[0.5, 0.5, 0.0]]))
    mono = torch.tensor([[0.1, 0.2]])
    assert torch.equal(audio.convert_channels(mono, 2), torch.tensor([[0.1, 0.2], [0.1, 0.2]]))
    assert audio.convert_channels(stereo, 2) is stereo
    batched = torch.randn(4, 2, 10)
    assert audio.convert_channels(batched, 1).shape == (4, 1, 10)
    with pytest.raises(ValueError, match="3 channel"):
        audio.convert_channels(torch.zeros(3, 10), 2)
    with pytest.raises(ValueError, match="shaped"):
        audio.convert_channels(torch.zeros(10), 1)


def test_convert_audio_matches_steps():
    wav = torch.randn(2, 4410) * 0.1
    out = audio.convert_audio(wav, 44_100, SR, 1)
    assert out.shape == (1, 2400)
    assert torch.allclose(out, audio.resample(wav.mean(0, keepdim=True), 44_100, SR))
    up = audio.convert_audio(wav[:1], 44_100, 48_000, 2)
    assert up.shape == (2, 4800) and torch.equal(up[0], up[1])


# -- normalization ------------------------------------------------------------------------
def test_peak_normalize():
    wav = sine(440, 0.1, amp=0.2)
    out = audio.peak_normalize(wav, -1.0)
    assert math.isclose(float(out.abs().max()), 10 ** (-1 / 20), rel_tol=1e-6)
    silence = torch.zeros(1, 100)
    assert torch.equal(audio.peak_normalize(silence), silence)
    with pytest.raises(ValueError, match="peak_db"):
        audio.peak_normalize(wav, 3.0)


def test_loudness_matches_pyloudnorm_and_normalizes():
    pyloudnorm = pytest.importorskip("pyloudnorm")
    wav = sine(1000, 2.0, channels=2, amp=0.1)
    measured = audio.integrated_loudness(wav, SR)
    assert measured == pytest.approx(pyloudnorm.Meter(SR).integrated_loudness(
        wav.T.double().numpy()))
    out = audio.loudness_normalize(wav, SR, target_lufs=-20.0)
    assert audio.integrated_loudness(out, SR) == pytest.approx(-20.0, abs=0.01)
    # BS.1770's calibration: a full-scale 1 kHz sine in one channel reads -3.01 LUFS.
    loud = sine(1000, 1.0, channels=1, amp=1.0)
    assert audio.integrated_loudness(loud, SR) == pytest.approx(-3.0, abs=0.3)


def test_loudness_normalize_limits_peak_instead_of_clipping():
    pytest.importorskip("pyloudnorm")
    wav = sine(1000, 1.0, amp=0.5)
    with pytest.warns(UserWarning, match="would clip"):
        out = audio.loudness_normalize(wav, SR, target_lufs=0.0, peak_db=-1.0)
    assert float(out.abs().max()) == pytest.approx(10 ** (-1 / 20), rel=1e-5)
    with pytest.raises(ValueError, match="0.4 s"):
        audio.integrated_loudness(wav[:, :1000], SR)
    silence = torch.zeros(1, SR)
    assert torch.equal(audio.loudness_normalize(silence, SR), silence)


# -- writing ------------------------------------------------------------------------------
@pytest.mark.parametrize("ext,subtype,tol", [("wav", "PCM_16", 1 / 32767), ("wav", "PCM_24", 1e-6),
                                             ("wav", "FLOAT", 0.0), ("flac", "PCM_16", 1 / 32767),
                                             ("flac", "PCM_24", 1e-6)])
def test_write_read_round_trip(tmp_path, ext, subtype, tol):
    wav = torch.rand(2, 1000) * 1.6 - 0.8
    path = audio.write_audio(tmp_path / f"x.{ext}", wav, SR, subtype=subtype)
    info = audio.audio_info(path)
    assert (info.sample_rate, info.channels, info.frames, info.subtype) == (SR, 2, 1000, subtype)
    got, _ = audio.read_audio(path)
    assert (got - wav).abs().max() <= tol
    assert [p.name for p in tmp_path.iterdir()] == [f"x.{ext}"]  # no temp file left


def test_write_accepts_mono_vector_and_numpy(tmp_path):
    audio.write_audio(tmp_path / "a.wav", np.zeros(10, dtype=np.float32), SR)
    assert audio.audio_info(tmp_path / "a.wav").channels == 1


def test_write_normalizes(tmp_path):
    wav = sine(440, 1.0, amp=0.1)
    audio.write_audio(tmp_path / "p.wav", wav, SR, subtype="FLOAT", normalize="peak", peak_db=-3)
    got, _ = audio.read_audio(tmp_path / "p.wav")
    assert float(got.abs().max()) == pytest.approx(10 ** (-3 / 20), rel=1e-5)
    with pytest.raises(ValueError, match="normalize"):
        audio.write_audio(tmp_path / "x.wav", wav, SR, normalize="rms")


def test_write_loudness(tmp_path):
    pytest.importorskip("pyloudnorm")
    audio.write_audio(tmp_path / "l.wav", sine(440, 1.0, amp=0.1), SR, subtype="FLOAT",
                      normalize="loudness", target_lufs=-18)
    got, _ = audio.read_audio(tmp_path / "l.wav")
    assert audio.integrated_loudness(got, SR) == pytest.approx(-18, abs=0.01)


def test_write_warns_and_clips(tmp_path):
    wav = torch.tensor([[0.5, 1.5, -2.0, 0.0]])
    with pytest.warns(UserWarning, match="2 sample"):
        audio.write_audio(tmp_path / "c.wav", wav, SR)
    got, _ = audio.read_audio(tmp_path / "c.wav")
    assert float(got.max()) <= 1.0 and float(got.min()) >= -1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float keeps them: no warning
        audio.write_audio(tmp_path / "f.wav", wav, SR, subtype="FLOAT")
        audio.write_audio(tmp_path / "n.wav", wav, SR, normalize="peak")
    got, _ = audio.read_audio(tmp_path / "f.wav")
    assert torch.equal(got, wav)


def test_write_rejects_bad_requests_and_leaves_nothing(tmp_path):
    wav = torch.zeros(1, 10)
    with pytest.raises(audio.AudioError, match="extension"):
        audio.write_audio(tmp_path / "x.mp4", wav, SR)
    with pytest.raises(audio.AudioError, match="FLOAT"):
        audio.write_audio(tmp_path / "x.flac", wav, SR, subtype="FLOAT")
    with pytest.raises(ValueError, match="NaN"):
        audio.write_audio(tmp_path / "x.wav", torch.full((1, 4), float("nan")), SR)
    with pytest.raises(ValueError, match="shaped"):
        audio.write_audio(tmp_path / "x.wav", torch.zeros(1, 1, 4), SR)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.wav"
    path.write_bytes(b"old")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sf, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        audio.write_audio(path, torch.zeros(1, 10), SR)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.wav"]


def test_block_writer(tmp_path):
    wav = torch.rand(2, 5000) * 2.4 - 1.2
    path = tmp_path / "b.wav"
    with pytest.warns(UserWarning, match="clipped"):
        with audio.AudioFileWriter(path, SR, 2, subtype="PCM_24") as writer:
            for start in range(0, 5000, 1024):
                writer.write(wav[:, start: start + 1024])
                assert not path.exists()  # only renamed into place at the end
    got, _ = audio.read_audio(path)
    assert (got - wav.clamp(-1, 1)).abs().max() < 1e-6
    with pytest.raises(RuntimeError, match="boom"):
        with audio.AudioFileWriter(tmp_path / "partial.wav", SR, 1) as writer:
            writer.write(torch.zeros(1, 100))
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.wav"]


# -- blockwise reading --------------------------------------------------------------------
@pytest.mark.parametrize("sr_out,channels", [(None, None), (SR, 1), (48_000, 2), (16_000, 1)])
def test_blocks_equal_whole_file(tmp_path, sr_out, channels):
    wav = torch.randn(2, 12_345) * 0.2
    path = tmp_path / "x.wav"
    audio.write_audio(path, wav, SR, subtype="FLOAT")
    full, sr = audio.read_audio(path)
    expected = audio.convert_audio(full, sr, sr_out or sr, channels or 2)
    blocks = list(audio.iter_audio_blocks(path, 1000, sample_rate=sr_out, channels=channels))
    assert all(b.shape[-1] == 1000 for b in blocks[:-1]) and 0 < blocks[-1].shape[-1] <= 1000
    assert torch.equal(torch.cat(blocks, dim=-1), expected)


def test_blocks_reject_impossible_channels_before_reading(tmp_path):
    path = tmp_path / "x.wav"
    audio.write_audio(path, torch.zeros(2, 100), SR)
    with pytest.raises(ValueError, match="2 channel"):
        next(audio.iter_audio_blocks(path, 10, channels=3))
