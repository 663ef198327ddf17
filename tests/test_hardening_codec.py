"""Bad input to the codec paths gets a clear error, and nothing is left half-written.

Issue 11, codec items: the .ecdc length limit agreed by writer and reader (a 4 h + 1 s file
end to end); NaN/inf refused by every path that encodes, a warning for absurd peaks;
truncated WAVs and non-mp3 ``.mp3`` files named; SIGTERM cleans up like Ctrl-C; an output
location that cannot be written is reported before any model is loaded.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from codec import audio, ecdc
from codec.model import EncodecConfig, EncodedFrame
from codec.streaming import (ChunkedStreamingEncoder, StreamingEncoder,
                             encode_blocks)
from inference import cli

ROOT = Path(__file__).resolve().parents[1]
SR = 8_000
TINY = EncodecConfig(name="tiny_hardening", sample_rate=SR, n_filters=2, dimension=8,
                     num_codebooks=4, codebook_size=32, lstm=1, target_bandwidths=(0.8,))
TINY_CHUNKED = EncodecConfig(name="tiny_hardening_chunked", sample_rate=SR, channels=2,
                             causal=False, norm="time_group_norm", n_filters=2, dimension=8,
                             num_codebooks=4, codebook_size=32, lstm=1, normalize=True,
                             segment=0.25, target_bandwidths=(1.0,))
# 100 Hz audio, 25 Hz frames, no LSTM: 4 hours encode and decode in well under a second.
SLOW_RATE = EncodecConfig(name="tiny_slow_rate", sample_rate=100, ratios=(2, 2), n_filters=2,
                          dimension=8, num_codebooks=2, codebook_size=32, lstm=0,
                          target_bandwidths=(0.125,))
FOUR_HOURS = 4 * 3600


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for config in (TINY, TINY_CHUNKED, SLOW_RATE):
        cli.random_model(config, seed=1).save_pretrained(root / config.name)
    return root


@pytest.fixture(autouse=True)
def _env(models_dir, monkeypatch):
    monkeypatch.setenv("TOKENWAVE_MODELS", str(models_dir))
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    return cli.random_model(TINY, seed=1)


def signal_wav(seconds: float, sr: int = SR, channels: int = 1) -> torch.Tensor:
    t = torch.arange(int(seconds * sr)) / sr
    return (0.3 * torch.sin(2 * math.pi * 220 * t)).expand(channels, -1).contiguous()


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("tokenwave: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


# -- 3. the .ecdc length limit: writer and reader agree --------------------------------------
def test_api_writer_refuses_what_the_reader_refuses(tiny):
    wav = signal_wav(1.0)
    with pytest.raises(ecdc.EcdcError, match=r"max_duration of 0.5 s.*max_duration=1"):
        ecdc.compress(wav, SR, tiny, num_codebooks=2, max_duration=0.5)
    data = ecdc.compress(wav, SR, tiny, num_codebooks=2, max_duration=1.0)
    with pytest.raises(ecdc.EcdcError, match="max_duration"):
        ecdc.decompress(data, tiny, max_duration=0.5)
    out, _ = ecdc.decompress(data, tiny, max_duration=1.0)
    assert out.shape == wav.shape
    # The defaults are one constant on both sides.
    assert ecdc.write_ecdc.__kwdefaults__["max_duration"] == \
        ecdc.decompress.__kwdefaults__["max_duration"] == ecdc.DEFAULT_MAX_DURATION_S


def test_four_hours_and_one_second_end_to_end(tmp_path, capsys, models_dir):
    """A file just over the default limit: compress says how to pass it, decompress reads it
    back with the same option, through the real CLI path (block by block)."""
    rate = SLOW_RATE.sample_rate
    n = (FOUR_HOURS + 1) * rate
    rng = np.random.default_rng(0)
    samples = 0.3 * np.sin(np.arange(n) * 0.3) + 0.05 * rng.standard_normal(n)
    audio.write_audio(tmp_path / "long.wav", samples[None].astype(np.float32), rate,
                      subtype="FLOAT")
    common = ["--model", SLOW_RATE.name, "--block-seconds", "600"]
    code, _, err = run(capsys, "compress", tmp_path / "long.wav", tmp_path / "long.ecdc", "-n",
                       "1", *common)
    assert_one_line_error(code, err, "long.wav", "14401 s", "--max-duration 14401")
    assert not (tmp_path / "long.ecdc").exists()
    code, _, err = run(capsys, "compress", tmp_path / "long.wav", tmp_path / "long.ecdc", "-n",
                       "1", *common, "--max-duration", "14401")
    assert code == 0, err
    header = ecdc.read_header((tmp_path / "long.ecdc").read_bytes())[0]
    assert header.audio_length == n
    # The reader refuses it by default, naming the option...
    code, _, err = run(capsys, "decompress", tmp_path / "long.ecdc", tmp_path / "out.wav",
                       *common)
    assert_one_line_error(code, err, "long.ecdc", "--max-duration 14401")
    assert not (tmp_path / "out.wav").exists()
    # ... and decodes it with it.
    code, _, err = run(capsys, "decompress", tmp_path / "long.ecdc", tmp_path / "out.wav",
                       *common, "--max-duration", "14401", "--subtype", "FLOAT")
    assert code == 0, err
    out, out_rate = audio.read_audio(tmp_path / "out.wav")
    assert out_rate == rate and out.shape == (1, n)
    model = cli.load_codec(SLOW_RATE.name, torch.device("cpu"))
    wav = torch.from_numpy(samples.astype(np.float32))[None, None]
    with torch.inference_mode():
        expected = model.decode(model.encode(wav, num_codebooks=1))[0, :, :n]
    assert torch.allclose(out, expected, atol=1e-4)
    code, _, err = run(capsys, "decompress", tmp_path / "long.ecdc", tmp_path / "out2.wav",
                       *common, "--max-duration", "inf")
    assert code == 0, err


# -- 4. NaN / inf / absurd amplitudes ----------------------------------------------------------
def with_bad_sample(wav: torch.Tensor, index: int, value: float = math.nan) -> torch.Tensor:
    wav = wav.clone()
    wav[..., -1, index] = value
    return wav


def test_check_audio_values_names_the_first_bad_sample():
    wav = torch.zeros(2, 1000)
    wav[1, 700] = math.inf
    wav[0, 400] = math.nan
    with pytest.raises(ValueError, match=r"song\.wav holds a non-finite value \(nan\) at sample "
                                         r"1400 \(1\.400 s\)"):
        audio.check_audio_values(wav, "song.wav", offset=1000, sample_rate=1000)
    with pytest.warns(audio.PeakWarning, match="clipping or wrong scale"):
        assert audio.check_audio_values(torch.full((1, 10), -300.0), "x") == 300.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert audio.check_audio_values(torch.full((1, 10), 1.5), "x") == 1.5  # no warning


def test_model_encode_and_encode_batch_refuse_nan(tiny):
    wav = signal_wav(0.3)
    with pytest.raises(ValueError, match="non-finite value .* at sample 123"):
        tiny.encode(with_bad_sample(wav, 123)[None], num_codebooks=2)
    with pytest.raises(ValueError, match=r"encode_batch item 1 .*\(-inf\) at sample 5"):
        tiny.encode_batch([wav, with_bad_sample(wav, 5, -math.inf)], num_codebooks=2)
    with pytest.warns(audio.PeakWarning):
        tiny.encode(wav[None] * 1000, num_codebooks=2)


def test_ecdc_compress_refuses_nan(tiny):
    with pytest.raises(ValueError, match="non-finite value .* at sample 10"):
        ecdc.compress(with_bad_sample(signal_wav(0.3), 10, math.inf), SR, tiny, num_codebooks=2)


def test_streaming_encoders_refuse_nan_at_the_stream_position(tiny):
    wav = signal_wav(0.3)[None]
    enc = StreamingEncoder(tiny, num_codebooks=2, what="mic")
    enc.push(wav[..., :1000])
    with pytest.raises(ValueError, match=r"mic holds a non-finite value \(nan\) at sample 1007"):
        enc.push(with_bad_sample(wav[..., 1000:2000], 7))
    chunked = ChunkedStreamingEncoder(cli.random_model(TINY_CHUNKED, seed=1), num_codebooks=2)
    stereo = signal_wav(0.3, channels=2)[None]
    chunked.push(stereo[..., :500])
    with pytest.raises(ValueError, match="at sample 503"):
        chunked.push(with_bad_sample(stereo[..., 500:], 3))
    with pytest.raises(ValueError, match="at sample 1500"):  # blocks: positions in the file
        list(encode_blocks([wav[..., :1000], with_bad_sample(wav[..., 1000:], 500)], tiny,
                           num_codebooks=2))


def test_streaming_warns_once_per_stream_about_peaks(tiny):
    enc = StreamingEncoder(tiny, num_codebooks=2)
    loud = 50 * signal_wav(0.1)[None]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            enc.push(loud)
    assert [w.category for w in caught] == [audio.PeakWarning]


def test_melody_conditioning_refuses_nan():
    from conditioning.melody import ChromaConditioner

    conditioner = ChromaConditioner(output_dim=4)
    melody = torch.zeros(1, 32_000)
    with pytest.raises(ValueError, match=r"melody 1 holds a non-finite value .* at sample 99"):
        conditioner.prepare([melody, with_bad_sample(melody, 99)])


def test_continuation_prompt_with_nan_is_refused():
    from test_generator import SR as GEN_SR
    from test_generator import build_tiny_generator

    generator = build_tiny_generator()
    prompt = torch.zeros(1, 1, GEN_SR // 20)
    prompt[..., 17] = math.nan
    with pytest.raises(ValueError, match="non-finite value"):
        generator.generate("happy", 0.1, audio_prompt=(prompt, GEN_SR))


@pytest.mark.parametrize("long", [False, True], ids=["whole", "blocks"])
@pytest.mark.parametrize("command,out_name", [("roundtrip", "o.wav"), ("compress", "o.ecdc"),
                                              ("tokens", "o.npy")])
def test_cli_refuses_nan_naming_file_and_sample(tmp_path, capsys, monkeypatch, command, out_name,
                                                long):
    if long:
        monkeypatch.setattr("inference.cli.codec.STREAM_ABOVE_SECONDS", 0.1)
    wav = with_bad_sample(signal_wav(0.5), 2345)
    sf.write(tmp_path / "bad.wav", wav.T.numpy(), SR, subtype="FLOAT")  # write_audio refuses it
    code, _, err = run(capsys, command, tmp_path / "bad.wav", tmp_path / out_name, "--model",
                       TINY.name, "-n", "2", "--block-seconds", "0.1")
    assert_one_line_error(code, err, "bad.wav", "non-finite", "sample 2345")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.wav"]


def test_cli_warns_once_about_a_loud_file_and_goes_on(tmp_path, models_dir):
    """In a real process (pytest replaces the warning display): one line, naming the file."""
    audio.write_audio(tmp_path / "loud.wav", 40 * signal_wav(0.5), SR, subtype="FLOAT")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "inference", "compress", "loud.wav", "o.ecdc",
                             "--model", str(models_dir / TINY.name), "-n", "2", "-q"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenwave: warning: loud.wav: peak "), lines
    assert "clipping or wrong scale" in lines[0]
    assert (tmp_path / "o.ecdc").exists()


# -- 5. truncated WAV, a .mp3 that is not one ---------------------------------------------------
def truncated_wav(path: Path, seconds: float = 4.0, keep: float = 0.5) -> None:
    audio.write_audio(path, signal_wav(seconds), SR)
    data = path.read_bytes()
    path.write_bytes(data[: 44 + int((len(data) - 44) * keep)])


def test_truncated_wav_is_named(tmp_path, capsys):
    truncated_wav(tmp_path / "cut.wav")
    message = r"cut\.wav is truncated: header says 4\.00 s, data holds 2\.00 s"
    with pytest.raises(audio.AudioError, match=message):
        audio.read_audio(tmp_path / "cut.wav")
    with pytest.raises(audio.AudioError, match=message):
        audio.audio_info(tmp_path / "cut.wav")
    for command, out_name in (("roundtrip", "o.wav"), ("compress", "o.ecdc"),
                              ("tokens", "o.npy")):
        code, _, err = run(capsys, command, tmp_path / "cut.wav", tmp_path / out_name,
                           "--model", TINY.name, "-n", "2")
        assert_one_line_error(code, err, "cut.wav is truncated", "header says 4.00 s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.wav"]


def test_complete_wavs_are_not_called_truncated(tmp_path):
    wav = signal_wav(1.0)
    audio.write_audio(tmp_path / "a.wav", wav, SR)
    # A chunk after the data (LIST metadata, as many editors write): complete.
    data = (tmp_path / "a.wav").read_bytes() + b"LIST" + (6).to_bytes(4, "little") + b"INFOab"
    data = data[:4] + (len(data) - 8).to_bytes(4, "little") + data[8:]
    (tmp_path / "b.wav").write_bytes(data)
    # A streamed WAV whose writer could not seek back: data size 0xFFFFFFFF.
    raw = bytearray((tmp_path / "a.wav").read_bytes())
    raw[40:44] = (0xFFFFFFFF).to_bytes(4, "little")
    (tmp_path / "c.wav").write_bytes(bytes(raw))
    for name in ("a.wav", "b.wav", "c.wav"):
        out, rate = audio.read_audio(tmp_path / name)
        assert rate == SR and out.shape[-1] == wav.shape[-1], name


def test_garbage_mp3_is_named_without_decoder_noise(tmp_path, capfd):
    (tmp_path / "x.mp3").write_bytes(b"this is not an mp3 file " * 40)
    with pytest.raises(audio.AudioError, match=r"x\.mp3 is not a readable MP3 file"):
        audio.read_audio(tmp_path / "x.mp3")
    code = cli.main(["roundtrip", str(tmp_path / "x.mp3"), str(tmp_path / "o.wav"), "--model",
                     TINY.name, "-n", "2"])
    out, err = capfd.readouterr()  # file descriptor level: libmpg123 writes to fd 2 itself
    assert_one_line_error(code, err, "x.mp3 is not a readable MP3 file")
    assert "Note:" not in err and "does not exist" not in err


# -- 8. SIGTERM cleans up as Ctrl-C does ----------------------------------------------------------
def ecdc_of_random_codes(path: Path, model, seconds: float) -> None:
    """A valid .ecdc of random codes, written without running the encoder."""
    layout = ecdc.CodecLayout.from_model(model)
    length = int(seconds * model.sample_rate)
    frames = layout.frames_for(length)
    codes = torch.randint(0, model.codebook_size, (1, 2, frames),
                          generator=torch.Generator().manual_seed(0))
    with open(path, "wb") as handle:
        handle.write(layout.header(length, 2, False).to_bytes()
                     if hasattr(layout, "header")
                     else ecdc.EcdcHeader(model.name, length, 2, False).to_bytes())
        ecdc.write_body(handle, [EncodedFrame(codes, None)], layout)


@pytest.mark.parametrize("command", ["roundtrip", "decompress"])
def test_sigterm_leaves_no_temporary_files(tmp_path, models_dir, command):
    model_dir = models_dir / TINY.name
    if command == "roundtrip":
        source = tmp_path / "long.wav"
        rng = np.random.default_rng(0)
        audio.write_audio(source, (0.1 * rng.standard_normal((1, SR * 2400))), SR)  # ~10 s
    else:
        source = tmp_path / "long.ecdc"
        ecdc_of_random_codes(source, cli.load_codec(str(model_dir), torch.device("cpu")),
                             3 * 3600)  # ~15 s to decode
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "inference", command, str(source), str(out_dir / "o.wav"),
            "--model", str(model_dir)] + (["-n", "2"] if command == "roundtrip" else [])
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if any(p.name.endswith(".tmp") for p in out_dir.iterdir()):
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"finished before SIGTERM: {proc.communicate()}"
        assert any(p.name.endswith(".tmp") for p in out_dir.iterdir())
        time.sleep(0.1)  # inside the block-by-block loop
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert "tokenwave: terminated" in err and "Traceback" not in err
    assert list(out_dir.iterdir()) == []


# -- 9. output location checked first -----------------------------------------------------------
@pytest.mark.parametrize("command,in_name,out_name", [
    ("roundtrip", "in.wav", "o.wav"), ("compress", "in.wav", "o.ecdc"),
    ("tokens", "in.wav", "o.npy"), ("decompress", "in.ecdc", "o.wav")])
def test_unwritable_output_is_reported_before_loading_models(tmp_path, capsys, command,
                                                             in_name, out_name):
    audio.write_audio(tmp_path / "in.wav", signal_wav(0.2), SR)
    (tmp_path / "in.ecdc").write_bytes(b"not read before the output is checked")
    (tmp_path / "afile").write_text("a regular file where a folder should be")
    target = tmp_path / "afile" / "sub" / out_name
    rate = ["-n", "2"] if command != "decompress" else []
    # A model that does not exist: had it been loaded first, the error would be about it.
    code, _, err = run(capsys, command, tmp_path / in_name, target, "--model", "no_such_model",
                       *rate)
    assert_one_line_error(code, err, f"cannot write {target}", "is a file, not a folder")
    assert ".tmp" not in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_read_only_folder_is_reported_first(tmp_path, capsys):
    audio.write_audio(tmp_path / "in.wav", signal_wav(0.2), SR)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = run(capsys, "roundtrip", tmp_path / "in.wav", locked / "o.wav",
                           "--model", "no_such_model", "-n", "2")
    finally:
        locked.chmod(0o755)
    assert_one_line_error(code, err, f"cannot write {locked / 'o.wav'}", "not writable")
    assert list(locked.iterdir()) == []


def test_generate_checks_the_output_before_loading(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "song.wav"
    code, _, err = run(capsys, "generate", "lofi", "-o", target, "--model", "no_such_model")
    assert_one_line_error(code, err, f"cannot write {target}")


def test_write_failures_name_the_users_path_not_the_temporary_file(tmp_path, monkeypatch):
    def failing_write(file, *args, **kwargs):
        raise sf.LibsndfileError(2, f"Error opening {file!r}: ")

    monkeypatch.setattr(audio.sf, "write", failing_write)
    with pytest.raises(audio.AudioError) as caught:
        audio.write_audio(tmp_path / "o.wav", signal_wav(0.1), SR)
    assert "o.wav" in str(caught.value) and ".tmp" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []
