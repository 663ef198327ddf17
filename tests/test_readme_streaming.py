"""The README's streaming snippet, run as written: a round trip must keep every sample.

The block is read from README.md (the python block under "Streaming and long files") and
executed with ``model`` and ``chunks`` defined, on the shipped clip, for a causal model and a
non-causal one (whose encoder holds back ~95 ms until ``flush()``).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from codec import audio
from codec.model import EncodecConfig
from inference.cli import random_model

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "assets" / "clip.wav"
# Tiny stand-ins with the real hop lengths; enough codebooks for the snippet's 6 kbps.
CAUSAL = EncodecConfig(name="tiny_causal_24k", n_filters=2, dimension=8, num_codebooks=8,
                       codebook_size=1024, lstm=1)
NON_CAUSAL = EncodecConfig(name="tiny_noncausal_32k", sample_rate=32_000, causal=False,
                           ratios=(8, 5, 4, 4), n_filters=2, dimension=8, num_codebooks=16,
                           codebook_size=2048, true_skip=True, lstm=1)


def readme_streaming_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Streaming and long files", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "no python block under 'Streaming and long files' in README.md"
    return blocks[0]


def chunked(wav: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """``(1, C, T)`` cut at random points, 1-sample pieces included."""
    rng = torch.Generator().manual_seed(seed)
    sizes = [1, 7] + torch.randint(1, 4000, (200,), generator=rng).tolist()
    pieces, start = [], 0
    for size in sizes:
        if start >= wav.shape[-1]:
            break
        pieces.append(wav[..., start:start + size])
        start += size
    if start < wav.shape[-1]:
        pieces.append(wav[..., start:])
    return pieces


@pytest.mark.parametrize("config", [CAUSAL, NON_CAUSAL], ids=lambda c: c.name)
def test_readme_streaming_snippet_keeps_every_sample(config):
    torch.set_num_threads(1)
    model = random_model(config, seed=3)
    wav, sr = audio.read_audio(CLIP)
    wav = audio.convert_audio(wav, sr, model.sample_rate, model.channels)[..., : model.sample_rate]
    wav = wav[None]  # (1, C, T): 1 s of real audio, not a multiple of the hop
    wav = wav[..., : wav.shape[-1] - 37]
    namespace = {"model": model, "chunks": chunked(wav, seed=1)}
    exec(compile(readme_streaming_snippet(), "README.md", "exec"), namespace)
    out = namespace["out"]
    assert out.shape == wav.shape  # the last frames' audio is there, cut to the input
    with torch.inference_mode():
        frames = model.encode(wav, bandwidth=6.0)
        offline = model.decode(frames)[..., : wav.shape[-1]]
    assert torch.allclose(out, offline, atol=1e-5, rtol=0), (out - offline).abs().max()
    tail = 0.1 * model.sample_rate  # the part the old snippet lost: decoded, not zeros
    assert out[..., -int(tail):].abs().max() > 0


def test_decoder_flush_takes_the_encoders_last_codes():
    """Why the snippet passes ``enc.flush()`` on: the encoder's last codes are audio."""
    from codec.streaming import StreamingDecoder, StreamingEncoder

    model = random_model(NON_CAUSAL, seed=3)
    wav = 0.1 * torch.randn(1, 1, 20_000, generator=torch.Generator().manual_seed(0))

    def round_trip(pass_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        enc, dec = StreamingEncoder(model, num_codebooks=4), StreamingDecoder(model)
        pieces = [dec.push(enc.push(wav))]
        last = enc.flush()
        pieces.append(dec.flush(last) if pass_last else dec.flush())
        return torch.cat(pieces, dim=-1), last

    full, last = round_trip(True)
    short, _ = round_trip(False)
    assert last.shape[-1] > 0  # the lookahead frames only come at the end
    assert full.shape[-1] >= wav.shape[-1] > short.shape[-1]


def test_chunked_streams_end_the_same_way():
    """The 48 kHz-style segment streams: ``dec.flush(enc.flush())`` ends a round trip too."""
    from codec.streaming import ChunkedStreamingDecoder, ChunkedStreamingEncoder

    config = EncodecConfig(name="tiny_chunked", sample_rate=8_000, channels=2, causal=False,
                           norm="time_group_norm", n_filters=2, dimension=8, num_codebooks=4,
                           codebook_size=32, lstm=1, normalize=True, segment=0.25)
    model = random_model(config, seed=3)
    wav = 0.1 * torch.randn(1, 2, 7_001, generator=torch.Generator().manual_seed(0))
    enc, dec = ChunkedStreamingEncoder(model, num_codebooks=3), ChunkedStreamingDecoder(model)
    pieces = [dec.push(frame) for chunk in chunked(wav, seed=2) for frame in enc.push(chunk)]
    pieces.append(dec.flush(enc.flush()))
    out = torch.cat(pieces, dim=-1)[..., : wav.shape[-1]]
    with torch.inference_mode():
        offline = model.decode(model.encode(wav, num_codebooks=3))[..., : wav.shape[-1]]
    assert out.shape == wav.shape and torch.allclose(out, offline, atol=1e-5, rtol=0)
