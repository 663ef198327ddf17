"""The tokenwave CLI, run in-process with ``main([...])`` on tiny random models and files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from codec import audio, ecdc
from codec.formats import load_model
from codec.model import EncodecConfig
from inference import cli

ROOT = Path(__file__).resolve().parents[1]
SR = 24_000
TINY = EncodecConfig(name="tiny_codec", n_filters=2, dimension=8, num_codebooks=4,
                     codebook_size=32, lstm=1, target_bandwidths=(0.75, 1.5))
# Segment model like encodec_48khz: stereo, non-causal, time group norm, RMS scale per chunk.
TINY_CHUNKED = EncodecConfig(name="tiny_chunked", sample_rate=8_000, channels=2, causal=False,
                             norm="time_group_norm", n_filters=2, dimension=8, num_codebooks=4,
                             codebook_size=32, lstm=1, normalize=True, segment=0.25,
                             target_bandwidths=(1.0,))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for config in (TINY, TINY_CHUNKED):
        cli.random_model(config, seed=1).save_pretrained(root / config.name)
    return root


@pytest.fixture(autouse=True)
def _models_env(models_dir, monkeypatch):
    monkeypatch.setenv("TOKENWAVE_MODELS", str(models_dir))


def tiny(name: str = "tiny_codec"):
    return load_model(name)


def make_wav(path: Path, seconds: float = 0.5, sr: int = SR, channels: int = 1,
             seed: int = 0) -> torch.Tensor:
    t = torch.arange(int(seconds * sr)) / sr
    rng = torch.Generator().manual_seed(seed)
    wav = 0.4 * torch.sin(2 * torch.pi * 330 * t) + 0.05 * torch.randn(len(t), generator=rng)
    wav = wav.expand(channels, -1).contiguous()
    audio.write_audio(path, wav, sr, subtype="PCM_24" if path.suffix == ".flac" else "FLOAT")
    return wav


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str) -> None:
    assert code != 0
    assert err.startswith("tokenwave: error: ") and err.strip().count("\n") == 0, err
    assert "Traceback" not in err


# -- roundtrip ----------------------------------------------------------------------------
def test_roundtrip_equals_model_and_reports(tmp_path, capsys):
    wav = make_wav(tmp_path / "in.wav")
    code, out, _ = run(capsys, "roundtrip", tmp_path / "in.wav", tmp_path / "out.wav",
                       "--model", "tiny_codec", "--bandwidth", "0.75", "--subtype", "FLOAT")
    assert code == 0
    assert "tiny_codec" in out and "2 codebooks" in out and "0.75 kbps" in out
    assert "0.50 s" in out and "x real time" in out
    got, sr = audio.read_audio(tmp_path / "out.wav")
    with torch.no_grad():
        expected = tiny()(wav[None], num_codebooks=2)[0]
    assert sr == SR and got.shape == wav.shape
    assert torch.allclose(got, expected, atol=1e-6)


def test_roundtrip_converts_rate_and_channels(tmp_path, capsys):
    wav = make_wav(tmp_path / "in.flac", seconds=0.3, sr=44_100, channels=2)
    code, _, _ = run(capsys, "roundtrip", tmp_path / "in.flac", tmp_path / "out.wav",
                     "--model", "tiny_codec", "--codebooks", "4")
    assert code == 0
    info = audio.audio_info(tmp_path / "out.wav")
    assert (info.sample_rate, info.channels) == (SR, 1)
    assert info.frames == round(wav.shape[-1] * SR / 44_100)


def test_roundtrip_normalize_peak(tmp_path, capsys):
    make_wav(tmp_path / "in.wav")
    code, _, _ = run(capsys, "roundtrip", tmp_path / "in.wav", tmp_path / "out.wav", "--model",
                     "tiny_codec", "-n", "4", "--normalize", "peak", "--subtype", "FLOAT")
    assert code == 0
    got, _ = audio.read_audio(tmp_path / "out.wav")
    assert float(got.abs().max()) == pytest.approx(10 ** (-1 / 20), rel=1e-5)


def test_main_job_random_model_on_shipped_clip(tmp_path, capsys):
    """What `make run` does, on the clip the repository ships."""
    clip = ROOT / "assets" / "clip.wav"
    assert clip.stat().st_size < 300_000
    code, out, _ = run(capsys, "roundtrip", clip, tmp_path / "out" / "roundtrip.wav", "--model",
                       "random:encodec_24khz", "--bandwidth", "6", "--force")
    assert code == 0
    assert "UNTRAINED" in out and "8 codebooks, 6 kbps" in out and "4.00 s" in out
    info = audio.audio_info(tmp_path / "out" / "roundtrip.wav")
    assert (info.sample_rate, info.channels, info.frames) == (SR, 1, 4 * SR)
    got, _ = audio.read_audio(tmp_path / "out" / "roundtrip.wav")
    assert float(got.abs().max()) > 0  # the untrained codec still produces a signal


def test_random_model_is_reproducible_and_uses_its_codebooks():
    a, b = cli.random_model("encodec_24khz"), cli.random_model("encodec_24khz")
    assert a.name == "random_encodec_24khz" and cli.is_random(a)
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), key
    with torch.no_grad():
        codes = a.encode(torch.randn(1, 1, SR) * 0.1, num_codebooks=8)[0].codes[0]
    assert all(len(torch.unique(row)) > 10 for row in codes)  # no all-zero codebooks
    with pytest.raises(ValueError, match="unknown preset"):  # a library error (codec.pretrained)
        cli.random_model("encodec_99khz")


# -- tokens -------------------------------------------------------------------------------
def test_tokens_npy_shape_dtype_values(tmp_path, capsys):
    wav = make_wav(tmp_path / "in.wav", seconds=0.41)
    code, out, _ = run(capsys, "tokens", tmp_path / "in.wav", tmp_path / "t.npy", "--model",
                       "tiny_codec", "--codebooks", "3")
    assert code == 0
    codes = np.load(tmp_path / "t.npy")
    frames = -(-wav.shape[-1] // TINY.hop_length)
    assert codes.shape == (3, frames) and codes.dtype == np.int16
    assert f"codes (3, {frames})" in out
    with torch.no_grad():
        expected = tiny().encode(wav[None], num_codebooks=3)[0].codes[0]
    assert np.array_equal(codes, expected.numpy())


def test_tokens_segment_model_needs_npz(tmp_path, capsys):
    wav = make_wav(tmp_path / "in.wav", seconds=0.6, sr=8_000, channels=2)
    code, _, err = run(capsys, "tokens", tmp_path / "in.wav", tmp_path / "t.npy", "--model",
                       "tiny_chunked", "-n", "2")
    assert_one_line_error(code, err)
    assert ".npz" in err and not (tmp_path / "t.npy").exists()
    code, _, _ = run(capsys, "tokens", tmp_path / "in.wav", tmp_path / "t.npz", "--model",
                     "tiny_chunked", "-n", "2")
    assert code == 0
    data = np.load(tmp_path / "t.npz")
    with torch.no_grad():
        frames = tiny("tiny_chunked").encode(wav[None], num_codebooks=2)
    assert len(frames) == 3  # 0.6 s in 0.25 s segments, 0.2475 s apart
    assert np.array_equal(data["codes"], torch.cat([f.codes[0] for f in frames], -1).numpy())
    assert data["chunk_frames"].tolist() == [f.codes.shape[-1] for f in frames]
    assert np.allclose(data["scales"], [float(f.scale) for f in frames])
    assert str(data["model"]) == "tiny_chunked" and int(data["num_samples"]) == wav.shape[-1]
    assert int(data["segment_stride"]) == 1980


def test_tokens_rejects_other_extensions(tmp_path, capsys):
    make_wav(tmp_path / "in.wav")
    code, _, err = run(capsys, "tokens", tmp_path / "in.wav", tmp_path / "t.txt", "--model",
                       "tiny_codec", "-n", "2")
    assert_one_line_error(code, err)
    assert ".npy" in err


# -- compress / decompress ----------------------------------------------------------------
def test_compress_decompress_round_trip(tmp_path, capsys):
    wav = make_wav(tmp_path / "in.wav")
    code, out, _ = run(capsys, "compress", tmp_path / "in.wav", tmp_path / "x.ecdc", "--model",
                       "tiny_codec", "--bandwidth", "1.5")
    assert code == 0 and "bytes" in out
    data = (tmp_path / "x.ecdc").read_bytes()
    header = ecdc.read_header(data)[0]
    assert (header.model_name, header.audio_length, header.num_codebooks) == \
        ("tiny_codec", wav.shape[-1], 4)
    # No --model: the model the header names, found in $TOKENWAVE_MODELS.
    code, _, _ = run(capsys, "decompress", tmp_path / "x.ecdc", tmp_path / "y.wav",
                     "--subtype", "FLOAT")
    assert code == 0
    got, _ = audio.read_audio(tmp_path / "y.wav")
    with torch.no_grad():
        expected = tiny()(wav[None], num_codebooks=4)[0]
    assert torch.allclose(got, expected, atol=1e-6)


def test_compress_with_entropy_coding_random_model(tmp_path, capsys):
    make_wav(tmp_path / "in.wav", seconds=0.25)
    for name, extra in (("plain", []), ("lm", ["--lm"])):
        code, _, _ = run(capsys, "compress", tmp_path / "in.wav", tmp_path / f"{name}.ecdc",
                         "--model", "random:encodec_24khz", "-b", "3", *extra)
        assert code == 0
        code, _, _ = run(capsys, "decompress", tmp_path / f"{name}.ecdc",
                         tmp_path / f"{name}.wav", "--subtype", "FLOAT")
        assert code == 0
    assert ecdc.read_header((tmp_path / "lm.ecdc").read_bytes())[0].use_lm
    plain, _ = audio.read_audio(tmp_path / "plain.wav")
    coded, _ = audio.read_audio(tmp_path / "lm.wav")
    assert torch.equal(plain, coded)  # entropy coding is lossless


def test_corrupt_ecdc_gives_one_line_and_no_output(tmp_path, capsys):
    make_wav(tmp_path / "in.wav")
    assert run(capsys, "compress", tmp_path / "in.wav", tmp_path / "x.ecdc", "--model",
               "tiny_codec", "-n", "4")[0] == 0
    data = (tmp_path / "x.ecdc").read_bytes()
    (tmp_path / "cut.ecdc").write_bytes(data[:-7])
    (tmp_path / "junk.ecdc").write_bytes(b"RIFF" + bytes(100))
    for name in ("cut", "junk"):
        code, _, err = run(capsys, "decompress", tmp_path / f"{name}.ecdc",
                           tmp_path / f"{name}.wav")
        assert_one_line_error(code, err)
        assert not (tmp_path / f"{name}.wav").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.ecdc", "in.wav", "junk.ecdc",
                                                          "x.ecdc"]


# -- folders ------------------------------------------------------------------------------
def test_folder_mode_mirrors_names(tmp_path, capsys):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    make_wav(src / "a.wav", seed=1)
    make_wav(src / "sub" / "b.flac", seed=2)
    (src / "notes.txt").write_text("not audio")
    code, out, _ = run(capsys, "roundtrip", src, tmp_path / "out", "--model", "tiny_codec",
                       "-n", "2")
    assert code == 0 and out.count("roundtrip ") == 2
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.*")) \
        == ["a.wav", "sub/b.wav"]
    code, _, _ = run(capsys, "compress", src, tmp_path / "ecdc", "--model", "tiny_codec",
                     "-n", "2")
    assert code == 0
    code, _, _ = run(capsys, "decompress", tmp_path / "ecdc", tmp_path / "dec")
    assert code == 0 and (tmp_path / "dec" / "sub" / "b.wav").is_file()
    code, _, _ = run(capsys, "tokens", src, tmp_path / "tok", "--model", "tiny_codec", "-n", "2")
    assert code == 0 and np.load(tmp_path / "tok" / "sub" / "b.npy").shape[0] == 2


def test_folder_mode_goes_on_after_a_bad_file(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    make_wav(src / "good.wav")
    (src / "bad.wav").write_bytes(b"not a wave file" * 10)
    code, _, err = run(capsys, "roundtrip", src, tmp_path / "out", "--model", "tiny_codec",
                       "-n", "2")
    assert code == 1
    assert "bad.wav" in err and "1 of 2 files failed" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.wav"]


def test_folder_outputs_that_collide_are_refused(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    make_wav(src / "a.wav")
    make_wav(src / "a.flac")
    code, _, err = run(capsys, "roundtrip", src, tmp_path / "out", "--model", "tiny_codec",
                       "-n", "2")
    assert_one_line_error(code, err)
    assert "both" in err and not (tmp_path / "out").exists()


# -- overwriting, bad input, bad arguments ------------------------------------------------
@pytest.mark.parametrize("command,out_name", [("roundtrip", "o.wav"), ("compress", "o.ecdc"),
                                              ("tokens", "o.npy")])
def test_existing_output_needs_force(tmp_path, capsys, command, out_name):
    make_wav(tmp_path / "in.wav")
    target = tmp_path / out_name
    target.write_bytes(b"keep me")
    args = [command, tmp_path / "in.wav", target, "--model", "tiny_codec", "-n", "2"]
    code, _, err = run(capsys, *args)
    assert_one_line_error(code, err)
    assert "--force" in err and target.read_bytes() == b"keep me"
    code, _, _ = run(capsys, *args, "--force")
    assert code == 0 and target.read_bytes() != b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.wav", out_name])


def test_folder_existing_outputs_need_force(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    make_wav(src / "a.wav")
    make_wav(src / "b.wav")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "b.wav").write_bytes(b"keep")
    code, _, err = run(capsys, "roundtrip", src, tmp_path / "out", "--model", "tiny_codec",
                       "-n", "2")
    assert_one_line_error(code, err)
    assert "--force" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["b.wav"]  # nothing was done


def test_corrupt_audio_input(tmp_path, capsys):
    (tmp_path / "in.wav").write_bytes(b"RIFF\x00\x00garbage" * 30)
    for command, out_name in (("roundtrip", "o.wav"), ("compress", "o.ecdc"),
                              ("tokens", "o.npy")):
        code, _, err = run(capsys, command, tmp_path / "in.wav", tmp_path / out_name, "--model",
                           "tiny_codec", "-n", "2")
        assert_one_line_error(code, err)
        assert "in.wav" in err
    assert [p.name for p in tmp_path.iterdir()] == ["in.wav"]


def test_truncated_audio_input(tmp_path, capsys):
    make_wav(tmp_path / "x.wav")
    audio.write_audio(tmp_path / "in.flac", audio.read_audio(tmp_path / "x.wav")[0], SR)
    data = (tmp_path / "in.flac").read_bytes()
    (tmp_path / "in.flac").write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, "roundtrip", tmp_path / "in.flac", tmp_path / "o.wav", "--model",
                       "tiny_codec", "-n", "2")
    assert_one_line_error(code, err)
    assert not (tmp_path / "o.wav").exists()


def test_verbose_shows_the_traceback(tmp_path, capsys):
    (tmp_path / "in.wav").write_bytes(b"garbage" * 10)
    code, _, err = run(capsys, "roundtrip", tmp_path / "in.wav", tmp_path / "o.wav", "--model",
                       "tiny_codec", "-n", "2", "--verbose")
    assert code == 1 and "Traceback" in err and "AudioError" in err


def test_unknown_model_name(tmp_path, capsys):
    make_wav(tmp_path / "in.wav")
    code, _, err = run(capsys, "roundtrip", tmp_path / "in.wav", tmp_path / "o.wav", "--model",
                       "no_such_model", "-b", "6")
    assert_one_line_error(code, err)
    assert "no_such_model" in err and "not found" in err
    code, _, err = run(capsys, "roundtrip", tmp_path / "in.wav", tmp_path / "o.wav", "--model",
                       "encodec_24khz", "-b", "6")  # a known name with no file: say how to run
    assert_one_line_error(code, err)
    assert "random:encodec_24khz" in err
    assert not (tmp_path / "o.wav").exists()


def test_shipped_model_folder_is_the_fallback(tmp_path, capsys, models_dir, monkeypatch):
    monkeypatch.setenv("TOKENWAVE_MODELS", str(tmp_path / "empty"))
    monkeypatch.setattr("codec.registry.SHIPPED_MODELS", models_dir)
    make_wav(tmp_path / "in.wav")
    code, out, _ = run(capsys, "roundtrip", tmp_path / "in.wav", tmp_path / "o.wav", "--model",
                       "tiny_codec", "-n", "2")
    assert code == 0 and "tiny_codec" in out


def test_bad_arguments(tmp_path, capsys):
    make_wav(tmp_path / "in.wav")
    base = ["roundtrip", tmp_path / "in.wav", tmp_path / "o.wav", "--model", "tiny_codec"]
    assert run(capsys, *base)[0] == 2  # neither --bandwidth nor --codebooks
    assert run(capsys, *base, "-b", "1", "-n", "2")[0] == 2
    code, _, err = run(capsys, *base, "-b", "24")
    assert_one_line_error(code, err)
    assert "at most 1.5 kbps" in err
    code, _, err = run(capsys, *base[:-2], "--model", "tiny_codec", "-n", "9")
    assert_one_line_error(code, err)
    code, _, err = run(capsys, "roundtrip", tmp_path / "in.wav", tmp_path / "in.wav",
                       "--model", "tiny_codec", "-n", "2", "--force")
    assert_one_line_error(code, err)
    assert "same file" in err
    code, _, err = run(capsys, "roundtrip", tmp_path / "in.wav", tmp_path / "o.mp4",
                       "--model", "tiny_codec", "-n", "2")
    assert_one_line_error(code, err)
    code, _, err = run(capsys, "roundtrip", tmp_path / "nope.wav", tmp_path / "o.wav",
                       "--model", "tiny_codec", "-n", "2")
    assert_one_line_error(code, err)
    assert "not found" in err
    assert run(capsys, "--help")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.wav"]


# -- long inputs: block by block ----------------------------------------------------------
@pytest.mark.parametrize("model,sr,channels", [("tiny_codec", SR, 1),
                                               ("tiny_chunked", 8_000, 2)])
def test_long_inputs_stream_with_the_same_results(tmp_path, capsys, monkeypatch, model, sr,
                                                  channels):
    make_wav(tmp_path / "in.wav", seconds=0.9, sr=sr, channels=channels)
    common = ["--model", model, "-n", "3"]
    tokens = "t.npz" if model == "tiny_chunked" else "t.npy"
    outputs = {}
    for mode, threshold in (("whole", 60.0), ("blocks", 0.1)):
        monkeypatch.setattr("inference.cli.codec.STREAM_ABOVE_SECONDS", threshold)
        folder = tmp_path / mode
        folder.mkdir()
        for argv in (["roundtrip", tmp_path / "in.wav", folder / "rt.wav", *common,
                      "--subtype", "FLOAT", "--block-seconds", "0.13"],
                     ["compress", tmp_path / "in.wav", folder / "x.ecdc", *common,
                      "--block-seconds", "0.13"],
                     ["decompress", folder / "x.ecdc", folder / "dec.wav", "--subtype", "FLOAT"],
                     ["tokens", tmp_path / "in.wav", folder / tokens, *common,
                      "--block-seconds", "0.13"]):
            assert run(capsys, *argv)[0] == 0
        outputs[mode] = folder
    whole, blocks = outputs["whole"], outputs["blocks"]
    assert (whole / "x.ecdc").read_bytes() == (blocks / "x.ecdc").read_bytes()
    if tokens.endswith(".npy"):
        assert np.array_equal(np.load(whole / tokens), np.load(blocks / tokens))
    else:
        a, b = np.load(whole / tokens), np.load(blocks / tokens)
        assert all(np.array_equal(a[k], b[k]) for k in a.files)
    for name in ("rt.wav", "dec.wav"):
        x, _ = audio.read_audio(whole / name)
        y, _ = audio.read_audio(blocks / name)
        assert x.shape == y.shape and torch.allclose(x, y, atol=1e-5)


def test_long_inputs_refuse_normalization(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("inference.cli.codec.STREAM_ABOVE_SECONDS", 0.1)
    make_wav(tmp_path / "in.wav")
    code, _, err = run(capsys, "roundtrip", tmp_path / "in.wav", tmp_path / "o.wav", "--model",
                       "tiny_codec", "-n", "2", "--normalize", "peak")
    assert_one_line_error(code, err)
    assert "--normalize" in err and not (tmp_path / "o.wav").exists()


def test_python_dash_m_inference(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "inference", "roundtrip", "--help"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--bandwidth" in result.stdout


# -- the command line as a package --------------------------------------------------------
@pytest.mark.parametrize("option,value", [("--bandwidth", "nan"), ("--bandwidth", "99"),
                                          ("--codebooks", "0"), ("--codebooks", "9")])
def test_rate_is_checked_once_by_the_model(tmp_path, capsys, option, value):
    """--bandwidth/--codebooks reach the model unchecked: its message, under the option's name."""
    make_wav(tmp_path / "in.wav")
    code, _, err = run(capsys, "roundtrip", tmp_path / "in.wav", tmp_path / "o.wav", "--model",
                       "tiny_codec", option, value)
    number = {"--bandwidth": float, "--codebooks": int}[option](value)
    with pytest.raises(ValueError) as library:
        tiny().resolve_codebooks(**{"--bandwidth": {"bandwidth": number},
                                    "--codebooks": {"num_codebooks": number}}[option])
    assert_one_line_error(code, err)
    assert err.strip() == f"tokenwave: error: {option}: {library.value}"
    assert not (tmp_path / "o.wav").exists()


def test_extra_commands_come_from_entry_points(tmp_path, capsys, monkeypatch):
    """Packages above the CLI add sub-commands through ``tokenwave.commands``; one that fails to
    load is one warning line and the other commands still run."""
    import importlib.metadata
    from types import SimpleNamespace

    def register(commands) -> None:
        sub = commands.add_parser("hello", help="say hello")
        sub.add_argument("--name", default="world")
        sub.set_defaults(func=lambda args: print(f"hello {args.name}") or 0)

    def broken():
        raise ImportError("no module named 'missing_extra'")

    points = [SimpleNamespace(name="hello", value="extra:register", load=lambda: register),
              SimpleNamespace(name="bad", value="missing_extra:register", load=broken)]
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: points if kw.get("group") == "tokenwave.commands" else real(**kw))
    code, out, err = run(capsys, "hello", "--name", "tokenwave")
    assert code == 0 and out == "hello tokenwave\n"
    assert err == ("tokenwave: warning: command 'bad' (missing_extra:register) not loaded: "
                   "no module named 'missing_extra'\n")


def test_warnings_are_one_line_each_and_resource_warnings_stay_quiet(capsys, monkeypatch):
    """A ResourceWarning is about some object the garbage collector met during the command (an
    event loop a library left open), never about the user's input: it is not shown."""
    import importlib.metadata
    import warnings
    from types import SimpleNamespace

    def noisy(args) -> int:
        warnings.warn("unclosed event loop <loop>", ResourceWarning)
        warnings.warn("the input was resampled", UserWarning)
        return 0

    def register(commands) -> None:
        commands.add_parser("noisy").set_defaults(func=noisy)

    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [SimpleNamespace(
        name="noisy", value="x:register", load=lambda: register)] if kw.get("group") == "tokenwave.commands"
        else real(**kw))
    code, _, err = run(capsys, "noisy")
    assert code == 0 and err == "tokenwave: warning: the input was resampled\n"


def test_installed_demo_command_is_an_entry_point():
    """``tokenwave demo`` is found through the installed entry point, not imported by the CLI."""
    import importlib.metadata

    points = {p.name: p.value for p in importlib.metadata.entry_points(group="tokenwave.commands")}
    assert points.get("demo") == "demos.command:register"
    assert "demo" in cli.build_parser()._subparsers._group_actions[0].choices
