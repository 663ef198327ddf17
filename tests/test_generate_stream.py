"""Streaming generation: frames as the LM completes them, audio while it still runs.

``LMModel.generate_iter`` must yield, piece by piece, exactly the codes ``generate`` returns,
each frame as soon as its most delayed codebook is sampled; ``MusicGen.generate_stream``
must yield audio that concatenates to ``generate``'s waveform for the same seed (tokens
exactly, audio to 1e-5) on every kind of codec: non-causal (32/16 kHz-like, lookahead),
causal (24 kHz-like), stereo through ``InterleavedStereo`` and segment-normalized (48 kHz-like,
decoded at the end). The CLI's ``--stdout`` / ``--play`` and the demo's streaming handler are
checked against the same non-streamed outputs.

Tiny models built in milliseconds (see ``test_generator``): an 800 Hz codec with hop 4
(200 frames per second), a 2-layer LM over 4 codebooks of 16 codes.
"""
from __future__ import annotations

import dataclasses
import io
import sys
import types

import numpy as np
import pytest
import torch
from test_generator import CODEC, DIM, HOP, SR, VOCAB, WINDOW, build_tiny_generator, tiny_lm, unit_scale

from codec.model import EncodecModel, InterleavedStereo
from conditioning import ConditionProvider, LUTConditioner
from inference import MusicGen, cli
from inference.generator import CodecStream, GeneratorConfig
from lm import LMModel


@pytest.fixture(scope="module")
def generator() -> MusicGen:
    return build_tiny_generator()


def _with_codec(codec, *, lm: LMModel | None = None, config: GeneratorConfig = WINDOW) -> MusicGen:
    text = LUTConditioner(vocab=VOCAB, dim=8, output_dim=DIM)
    unit_scale(text, 1)
    return MusicGen(lm=lm if lm is not None else tiny_lm(0), codec=codec,
                    condition_provider=ConditionProvider({"description": text}), config=config)


def _random_codec(config) -> EncodecModel:
    torch.manual_seed(3)
    return cli.random_model(config)


# -- the LM's iterator ------------------------------------------------------------------------------

def _condition(rows: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(rows, 5, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fast", [False, True])
def test_lm_iterator_yields_frames_as_their_last_codebook_is_sampled(fast):
    lm = tiny_lm(0)
    steps = []
    pieces = []
    kwargs = dict(max_gen_len=9, num_samples=2, condition=_condition(4), top_k=5, fast=fast)
    for piece in lm.generate_iter(**kwargs, generator=torch.Generator().manual_seed(0),
                                  callback=lambda step, total: steps.append(step)):
        pieces.append((len(steps), piece))
    # Delays 0..3: frame t is final after step t + 4 (callback step t + 4); 9 frames, 12 steps.
    assert [step for step, _ in pieces] == list(range(4, 13))
    assert all(piece.shape == (2, 4, 1) for _, piece in pieces)
    whole = lm.generate(**kwargs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([p for _, p in pieces], dim=-1), whole)


def test_lm_iterator_yields_the_prompt_first_and_runs_lazily():
    lm = tiny_lm(1)
    prompt = torch.randint(0, 16, (1, 4, 3), generator=torch.Generator().manual_seed(0))
    steps = []
    stream = lm.generate_iter(max_gen_len=7, prompt=prompt, condition=_condition(2), use_sampling=False,
                              callback=lambda step, total: steps.append(step))
    first = next(stream)
    assert torch.equal(first, prompt) and steps == []  # the prompt's frames before any step
    second = next(stream)
    # Frame 3 needs steps 4..7 (its codebook 3 sits at step 3 + 1 + 3); resuming at step 4 means 4 steps.
    assert second.shape == (1, 4, 1) and steps == [1, 2, 3, 4]
    rest = list(stream)
    whole = lm.generate(max_gen_len=7, prompt=prompt, condition=_condition(2), use_sampling=False)
    assert torch.equal(torch.cat([first, second, *rest], dim=-1), whole)


def test_lm_iterator_on_a_non_delay_pattern():
    """Coarse-first: codebook 0 of every frame first, so no frame is final before the second half."""
    lm = tiny_lm(0, pattern="coarse_first")
    pieces = list(lm.generate_iter(max_gen_len=5, num_samples=1, use_sampling=False))
    whole = lm.generate(max_gen_len=5, num_samples=1, use_sampling=False)
    assert torch.equal(torch.cat(pieces, dim=-1), whole)
    assert len(pieces) == 5


# -- the generator's audio stream ---------------------------------------------------------------------

def _concat(chunks: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(chunks, dim=-1)


@pytest.mark.parametrize("first,every", [(1, 1), (3, 7), (50, 50)])
def test_stream_concatenates_to_the_generated_waveform(generator, first, every):
    expected = generator.generate(["happy rock", "calm piano"], 0.08, seed=4, return_tokens=True)
    chunks = list(generator.generate_stream(["happy rock", "calm piano"], 0.08, seed=4,
                                            first_chunk_frames=first, chunk_frames=every))
    assert all(c.dtype == torch.float32 and c.shape[:2] == (2, 1) for c in chunks)
    torch.testing.assert_close(_concat(chunks), expected.wav, atol=1e-5, rtol=0)
    if first < 16:
        assert len(chunks) > 2  # 16 frames: audio came out before the LM was done
    tokens = generator.generate_tokens(["happy rock", "calm piano"], 0.08, seed=4)
    assert torch.equal(tokens, expected.tokens)


def test_first_audio_comes_after_first_chunk_frames(generator):
    """The first chunk is decoded once ``first_chunk_frames`` frames are final, i.e. after
    first_chunk_frames + 3 LM steps (delay pattern, 4 codebooks)."""
    steps = []
    stream = generator.generate_stream("happy rock", 0.1, seed=0, first_chunk_frames=8, chunk_frames=4,
                                       progress=lambda step, total: steps.append(step))
    first = next(stream)
    assert len(steps) == 8 + 3
    # The tiny non-causal codec holds back the 21 samples its lookahead still covers.
    assert first.shape[-1] == 8 * HOP - 21
    stream.close()  # stopping the stream stops the LM
    assert len(steps) == 8 + 3


def test_first_chunk_swallowed_by_the_lookahead_is_retried_frame_by_frame(generator):
    """5 frames (20 samples) are all held back by the tiny codec's 21-sample lookahead: the
    stream then pushes each next frame and yields as soon as samples come out."""
    steps = []
    stream = generator.generate_stream("happy rock", 0.1, seed=0, first_chunk_frames=5, chunk_frames=10,
                                       progress=lambda step, total: steps.append(step))
    first = next(stream)
    assert len(steps) == 6 + 3 and first.shape[-1] == 6 * HOP - 21
    assert next(stream).shape[-1] == 10 * HOP


def test_stream_over_a_sliding_window_and_an_audio_prompt(generator):
    """0.23 s with a 0.1 s window (stride 0.06 s): 4 LM windows, streamed window by window."""
    tone = (0.3 * torch.sin(torch.arange(30) / 3.0))[None]  # 30 samples: 8 frames (the last one padded)
    prompt = torch.stack([tone, -tone])  # (2, 1, 30)
    kwargs = dict(seed=1, audio_prompt=(prompt, SR), top_k=4)
    expected = generator.generate(["happy rock", None], 0.23, return_tokens=True, **kwargs)
    steps = []
    chunks = list(generator.generate_stream(["happy rock", None], 0.23, first_chunk_frames=2, chunk_frames=3,
                                            progress=lambda step, total: steps.append((step, total)), **kwargs))
    assert expected.wav.shape == (2, 1, 46 * HOP)
    torch.testing.assert_close(_concat(chunks), expected.wav, atol=1e-5, rtol=0)
    assert steps[-1][0] == steps[-1][1]
    pieces = list(generator.generate_tokens_iter(["happy rock", None], 0.23, prompt_codes=expected.tokens[..., :8],
                                                 seed=1, top_k=4))
    assert torch.equal(_concat(pieces), expected.tokens)
    assert pieces[0].shape[-1] == 8  # the audio prompt's frames come out first


@pytest.mark.parametrize("fast", [False, True])
def test_stream_with_the_fast_decoder(generator, fast):
    expected = generator.generate("calm piano", 0.06, seed=2, return_tokens=True, fast=fast)
    chunks = list(generator.generate_stream("calm piano", 0.06, seed=2, fast=fast, first_chunk_frames=2))
    torch.testing.assert_close(_concat(chunks), expected.wav, atol=1e-5, rtol=0)
    assert torch.equal(generator.generate_tokens(["calm piano"], 0.06, seed=2, fast=not fast), expected.tokens)


def test_causal_codec_streams_each_frame_at_once():
    """A causal codec (24 kHz-like) decodes every pushed frame to hop samples, once its first
    convolution has the 7 frames its reflect padding mirrors."""
    codec = _random_codec(dataclasses.replace(CODEC, name="tiny_causal", causal=True, pad_mode="reflect"))
    generator = _with_codec(codec)
    expected = generator.generate("happy", 0.08, seed=0)
    chunks = list(generator.generate_stream("happy", 0.08, seed=0, first_chunk_frames=1, chunk_frames=1))
    torch.testing.assert_close(_concat(chunks), expected.wav, atol=1e-5, rtol=0)
    assert chunks[0].shape[-1] == 7 * HOP and all(c.shape[-1] == HOP for c in chunks[1:])


def test_stereo_codec_streams_left_and_right():
    mono = _random_codec(dataclasses.replace(CODEC, name="tiny_stereo_mono"))
    generator = _with_codec(InterleavedStereo(mono), lm=tiny_lm(0, num_codebooks=8, delays=(0, 0, 1, 1, 2, 2, 3, 3)))
    expected = generator.generate(["happy", "calm"], 0.05, seed=0)
    chunks = list(generator.generate_stream(["happy", "calm"], 0.05, seed=0, first_chunk_frames=2, chunk_frames=3))
    assert expected.wav.shape == (2, 2, 10 * HOP) and chunks[0].shape[:2] == (2, 2)
    torch.testing.assert_close(_concat(chunks), expected.wav, atol=1e-5, rtol=0)


def test_segment_codec_falls_back_to_one_decode_at_the_end():
    """A codec normalizing whole segments (48 kHz-like) cannot decode a frame early: one chunk."""
    codec = _random_codec(dataclasses.replace(CODEC, name="tiny_segments", norm="time_group_norm", normalize=True,
                                              segment=0.05))
    generator = _with_codec(codec)
    expected = generator.generate("happy", 0.04, seed=0)
    chunks = list(generator.generate_stream("happy", 0.04, seed=0, first_chunk_frames=1, chunk_frames=1))
    assert len(chunks) == 1
    torch.testing.assert_close(chunks[0], expected.wav, atol=1e-6, rtol=0)


def test_codec_stream_equals_offline_decode():
    codec = _random_codec(CODEC)
    codes = torch.randint(0, 16, (2, 4, 23), generator=torch.Generator().manual_seed(0))
    stream = CodecStream(codec)
    pieces = [stream.push(part) for part in codes.split([1, 5, 9, 8], dim=-1)] + [stream.flush()]
    torch.testing.assert_close(_concat(pieces), codec.decode(codes), atol=1e-5, rtol=0)


def test_one_call_stream(generator):
    from inference import api

    chunks = list(api.generate_stream("happy", 0.05, model=generator, seed=1, chunk_frames=2))
    torch.testing.assert_close(_concat(chunks), api.generate("happy", 0.05, model=generator, seed=1).wav,
                               atol=1e-5, rtol=0)


def test_bad_chunk_sizes(generator):
    with pytest.raises(ValueError, match="first_chunk_frames"):
        next(generator.generate_stream("happy", 0.05, first_chunk_frames=0))


# -- the CLI ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory, generator):
    folder = tmp_path_factory.mktemp("models") / "tiny"
    generator.save_pretrained(folder)
    return folder


def _stdout_bytes(monkeypatch) -> io.BytesIO:
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, write_through=True))
    return raw


@pytest.mark.parametrize("fmt", ["f32", "s16"])
def test_cli_writes_raw_pcm_to_stdout(saved, generator, monkeypatch, capsys, fmt):
    expected = generator.generate("happy rock", 0.1, seed=3).wav[0]  # (1, T)
    raw = _stdout_bytes(monkeypatch)
    code = cli.main(["generate", "happy rock", "--stdout", "--format", fmt, "--model", str(saved),
                     "--duration", "0.1", "--seed", "3", "--chunk-frames", "4"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"{SR} Hz" in err and "1 channel" in err  # the stream's layout, on stderr
    data = raw.getvalue()
    if fmt == "f32":
        got = torch.from_numpy(np.frombuffer(data, dtype="<f4").copy())
        torch.testing.assert_close(got, expected[0], atol=1e-5, rtol=0)
    else:
        got = torch.from_numpy(np.frombuffer(data, dtype="<i2").astype(np.float32))
        want = torch.round(expected[0].clamp(-1, 1) * 32767)
        assert got.shape == want.shape and (got - want).abs().max() <= 1


def test_cli_stdout_and_file_together(saved, generator, monkeypatch, tmp_path):
    from codec import audio

    raw = _stdout_bytes(monkeypatch)
    out = tmp_path / "song.wav"
    code = cli.main(["generate", "calm", "--stdout", "-o", str(out), "--subtype", "FLOAT", "--model", str(saved),
                     "--duration", "0.05", "--seed", "0", "-q"])
    assert code == 0
    wav, _ = audio.read_audio(out)
    pcm = torch.from_numpy(np.frombuffer(raw.getvalue(), dtype="<f4").copy())
    torch.testing.assert_close(wav[0], pcm, atol=1e-6, rtol=0)


def test_cli_stdout_takes_one_prompt(saved, capsys):
    code = cli.main(["generate", "a", "b", "--stdout", "--model", str(saved), "--duration", "0.05"])
    err = capsys.readouterr().err
    assert code == 1 and "one prompt" in err and err.count("\n") == 1


def test_cli_needs_an_output(saved, capsys):
    code = cli.main(["generate", "a", "--model", str(saved), "--duration", "0.05"])
    err = capsys.readouterr().err
    assert code == 1 and "-o" in err and "--stdout" in err


def test_cli_play_without_sounddevice_says_what_to_install(saved, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import fails
    code = cli.main(["generate", "a", "--play", "--model", str(saved), "--duration", "0.05"])
    err = capsys.readouterr().err
    assert code == 1 and "pip install sounddevice" in err and err.count("\n") == 1


def test_cli_play_streams_to_sounddevice(saved, generator, capsys, monkeypatch):
    played, opened = [], {}

    class OutputStream:
        def __init__(self, **kwargs):
            opened.update(kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, block):
            played.append(np.array(block))

    monkeypatch.setitem(sys.modules, "sounddevice", types.SimpleNamespace(OutputStream=OutputStream))
    code = cli.main(["generate", "happy", "--play", "--model", str(saved), "--duration", "0.1", "--seed", "1",
                     "--chunk-frames", "5", "-q"])
    assert code == 0, capsys.readouterr().err
    assert opened["samplerate"] == SR and opened["channels"] == 1 and opened["dtype"] == "float32"
    assert len(played) > 1 and all(block.ndim == 2 and block.shape[1] == 1 for block in played)
    expected = generator.generate("happy", 0.1, seed=1).wav[0, 0]
    torch.testing.assert_close(torch.from_numpy(np.concatenate(played)[:, 0]), expected, atol=1e-5, rtol=0)


# -- the demo's streaming handler ----------------------------------------------------------------------

def test_demo_stream_handler_yields_the_first_prompt_then_the_same_clips(saved, tmp_path):
    import soundfile as sf

    from demos import app

    common = dict(duration=0.25, seed=5, model=str(saved), workdir=tmp_path)
    plain = app.generate_music("calm piano\nhappy rock", **common)
    seen = []
    items = list(app.generate_music_stream("calm piano\nhappy rock", **common, chunk_seconds=0.05,
                                           progress=lambda fraction, text: seen.append(fraction)))
    pieces, result = items[:-1], items[-1]
    assert isinstance(result, app.Generation) and all(isinstance(p, app.StreamedAudio) for p in pieces)
    assert len(pieces) > 3 and seen[-1] == 1.0
    live = np.concatenate([p.audio for p in pieces])  # (T, 1): the first prompt, raw
    raw = MusicGen.from_pretrained(saved).generate(["calm piano", "happy rock"], 0.25, seed=5).wav
    assert raw.shape[-1] == live.shape[0]
    np.testing.assert_allclose(live[:, 0], raw[0, 0].clamp(-1, 1).numpy(), atol=1e-5)
    for streamed, clip in zip(result.clips, plain.clips):
        assert streamed.prompt == clip.prompt
        np.testing.assert_allclose(streamed.audio, clip.audio, atol=1e-4)
    data, rate = sf.read(io.BytesIO(app.wav_bytes(pieces[0])), dtype="float32", always_2d=True)
    assert rate == SR and data.shape == pieces[0].audio.shape
    np.testing.assert_allclose(data, pieces[0].audio, atol=1 / 32_000)
    with pytest.raises(app.DemoError, match="Type a prompt"):
        next(app.generate_music_stream("  ", **common))


def test_demo_has_a_stream_checkbox_and_a_streaming_player(saved, tmp_path):
    pytest.importorskip("gradio")
    from demos import app

    demo = app.build_app(str(saved), workdir=tmp_path)
    components = demo.config["components"]
    assert any(c["type"] == "checkbox" and c["props"].get("label") == "Stream" for c in components)
    live = [c for c in components if c["type"] == "audio" and c["props"].get("streaming")]
    assert len(live) == 1 and live[0]["props"]["visible"] is False
