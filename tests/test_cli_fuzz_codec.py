"""Absurd numbers for the codec commands: one-line error naming the option, no output.

Every row runs ``inference.cli.main`` in-process on a tiny model and a real input file; the
command must exit non-zero with exactly one stderr line that names the option, show no
traceback, and leave nothing in the output folder.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from codec import audio, ecdc
from codec.model import EncodecConfig
from inference import cli

SR = 8_000
TINY = EncodecConfig(name="tiny_fuzz", sample_rate=SR, n_filters=2, dimension=8,
                     num_codebooks=4, codebook_size=32, lstm=1, target_bandwidths=(0.5,))

RATE_CASES = [
    ("--bandwidth", "inf"), ("--bandwidth", "-inf"), ("--bandwidth", "nan"),
    ("--bandwidth", "0"), ("--bandwidth", "-3"), ("--bandwidth", "1e308"),
    ("--codebooks", "0"), ("--codebooks", "-1"), ("--codebooks", "99999"),
]
BLOCK_CASES = [("--block-seconds", v) for v in ("0", "-1", "1e-9", "nan", "inf", "-inf", "1e9")]
LUFS_CASES = [("--target-lufs", v) for v in ("nan", "inf", "-inf", "5", "-1e9")]
LIMIT_CASES = [("--max-duration", v) for v in ("0", "-1", "nan", "-inf")]
RATE = ["-n", "2"]

TABLE = (
    [("roundtrip", opt, value, []) for opt, value in RATE_CASES]
    + [("compress", opt, value, []) for opt, value in RATE_CASES]
    + [("tokens", opt, value, []) for opt, value in RATE_CASES]
    + [(command, opt, value, RATE) for command in ("roundtrip", "compress", "tokens")
       for opt, value in BLOCK_CASES]
    + [("decompress", opt, value, []) for opt, value in BLOCK_CASES]
    + [("roundtrip", opt, value, RATE + ["--normalize", "loudness"]) for opt, value in LUFS_CASES]
    + [("decompress", opt, value, ["--normalize", "loudness"]) for opt, value in LUFS_CASES]
    + [(command, opt, value, RATE if command == "compress" else [])
       for command in ("compress", "decompress") for opt, value in LIMIT_CASES]
)
OUTPUT = {"roundtrip": "o.wav", "compress": "o.ecdc", "tokens": "o.npy", "decompress": "o.wav"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A models folder with the tiny codec, a 1 s input and its .ecdc."""
    root = tmp_path_factory.mktemp("fuzz")
    model = cli.random_model(TINY, seed=1)
    model.save_pretrained(root / TINY.name)
    t = torch.arange(SR) / SR
    wav = 0.3 * torch.sin(2 * torch.pi * 220 * t)[None]
    audio.write_audio(root / "in.wav", wav, SR)
    (root / "in.ecdc").write_bytes(ecdc.compress(wav, SR, model, num_codebooks=2))
    return root


@pytest.mark.parametrize("command,option,value,extra", TABLE,
                         ids=[f"{c}{o}={v}" for c, o, v, _ in TABLE])
def test_absurd_codec_option_is_one_clean_line(inputs, tmp_path, capsys, monkeypatch, command,
                                               option, value, extra):
    monkeypatch.setenv("TOKENWAVE_MODELS", str(inputs))
    source = inputs / ("in.ecdc" if command == "decompress" else "in.wav")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = [command, str(source), str(out_dir / OUTPUT[command]), "--model", TINY.name,
            f"{option}={value}", *extra]
    code = cli.main(argv)
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, argv
    assert len(lines) == 1 and lines[0].startswith("tokenwave: error: "), err
    assert option in lines[0], err
    assert "Traceback" not in err
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("command,option,value", [
    ("roundtrip", "--bandwidth", "fast"), ("compress", "--codebooks", "1.5"),
    ("decompress", "--block-seconds", "ten"), ("decompress", "--max-duration", "4h")])
def test_unparsable_numbers_are_usage_errors(inputs, tmp_path, capsys, monkeypatch, command,
                                             option, value):
    """argparse's own check: exit 2, the option named, no traceback, no output."""
    monkeypatch.setenv("TOKENWAVE_MODELS", str(inputs))
    source = inputs / ("in.ecdc" if command == "decompress" else "in.wav")
    extra = [] if command == "decompress" or option in ("--bandwidth", "--codebooks") else RATE
    code = cli.main([command, str(source), str(tmp_path / OUTPUT[command]), "--model", TINY.name,
                     f"{option}={value}", *extra])
    _, err = capsys.readouterr()
    assert code == 2 and option in err and "Traceback" not in err
    assert not (tmp_path / OUTPUT[command]).exists()
