"""The model the repository ships (assets/models/tokenwave-small): found by name with no
download, small enough to ship, makes audio from a prompt, and its codec beats a bound on a
held-out corpus clip (assets/heldout_clip.flac: seconds 2-7 of clip 000106 of the valid split
of recipes/corpus/make_corpus.py --hours 3 --seed 0, which the model never trained on)."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codec.audio import read_audio
from codec.training.losses import MelDistance
from inference import MusicGen, registry

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "models" / "tokenwave-small"
HELD_OUT = ROOT / "assets" / "heldout_clip.flac"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    # An empty models folder and no hub: the name must resolve to the shipped folder.
    monkeypatch.setenv("TOKENWAVE_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def model() -> MusicGen:
    return MusicGen.from_pretrained(SHIPPED)


def test_default_name_resolves_to_the_shipped_folder():
    assert registry.DEFAULT_MODEL == "tokenwave-small"
    assert registry.find_generator(registry.DEFAULT_MODEL) == SHIPPED


def test_fits_the_50_mb_budget():
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert 1_000_000 < size <= 50_000_000, size


def test_generates_audio_from_a_prompt(model):
    assert (model.sample_rate, model.channels, model.frame_rate) == (32_000, 1, 50)
    wav, sr = model.generate("a slow, sad piano ballad in A minor", duration=1.0, seed=3)
    again, _ = model.generate("a slow, sad piano ballad in A minor", duration=1.0, seed=3)
    assert sr == 32_000 and wav.shape == (1, 1, 32_000)
    assert torch.isfinite(wav).all()
    rms = wav.pow(2).mean().sqrt().item()
    assert 1e-3 < rms < 1.0, rms
    torch.testing.assert_close(wav, again, rtol=0, atol=0)


def test_prompts_change_the_tokens(model):
    tokens = model.generate(["energetic drums and bass at 140 bpm", "calm flute solo, 70 bpm"],
                            duration=1.0, seed=0, return_tokens=True, use_sampling=False).tokens
    assert tokens.shape == (2, 4, 50)
    assert not torch.equal(tokens[0], tokens[1])


def test_codec_reconstructs_a_held_out_clip(model):
    wav, sr = read_audio(HELD_OUT)
    assert sr == 32_000
    wav = wav[None, :1]
    codec = model.codec
    with torch.no_grad():
        decoded = codec.decode(codec.encode(wav))[..., : wav.shape[-1]]
        silent = MelDistance(sr)(torch.zeros_like(wav), wav).item()
        distance = MelDistance(sr)(decoded, wav).item()
    # Opus at 6 kbps scores 0.98 on the corpus' held-out split (bench/quality.py); an untrained
    # codec scores about the silent signal's distance.
    assert math.isfinite(distance) and distance < 0.9, (distance, silent)


def test_cli_generates_with_the_default_model(tmp_path):
    out = tmp_path / "music.wav"
    result = subprocess.run([sys.executable, "-m", "inference", "generate", "upbeat jazz piano trio",
                             "--duration", "1", "--seed", "0", "-o", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    wav, sr = read_audio(out)
    assert sr == 32_000 and wav.shape[-1] == 32_000
