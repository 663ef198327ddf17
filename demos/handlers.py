"""What the demo's buttons call: plain functions of plain values, no gradio.

:func:`generate_music` writes one clip per prompt line (with a spectrogram each);
:func:`generate_music_stream` yields the first prompt's audio while generating, then the same;
:func:`codec_roundtrip` compresses an upload to ``.ecdc`` and decodes the file back. Uploads are
read and checked by :func:`read_upload`. Every function raises :class:`~demos.models.DemoError`
with a one-line message on bad input; the page shows it. The models come from
:mod:`demos.models`; each generation keeps its own cache and random generator.
"""
from __future__ import annotations

import math
import os
import secrets
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from codec import audio as audio_io
from codec import ecdc
from codec.pretrained import EntropyLMNotFoundError, entropy_lm_for, model_label
from inference.config import DEFAULT_DURATION
from inference.generator import MusicGen
from lm.sampling import SamplingConfig

from .models import (RANDOM_LABEL, RANDOM_MODEL, DemoError, generator_key, load_codec_model, load_generator,
                     one_line)
from .spectrogram import spectrogram_image

MAX_PROMPTS = 4
MAX_DURATION = 120.0  # seconds the demo generates at most per request
MAX_CODEC_SECONDS = 300.0  # longest upload the codec tab takes
OUTPUT_MAX_AGE = 2 * 3600.0  # seconds generated files are kept in the work folder
SAMPLING = SamplingConfig()  # the sampling defaults of the functions below and the page's sliders

ProgressFn = Callable[[float, str], None]


# -- inputs and outputs ---------------------------------------------------------------------------
def parse_prompts(text: str | None) -> list[str]:
    """One prompt per non-blank line."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _number(value, name: str, low: float, high: float, *, integer: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise DemoError(f"{name} must be between {low:g} and {high:g}, got {value}")
    if integer and number != int(number):
        raise DemoError(f"{name} must be a whole number, got {value}")
    return int(number) if integer else number


def read_upload(path: str | os.PathLike, what: str) -> tuple[torch.Tensor, int]:
    """An uploaded audio file as ``(wav (C, T), sample_rate)``: readable, not empty, and finite
    (:func:`codec.audio.check_audio_values`, whose message names the first bad sample)."""
    name = Path(path).name
    try:
        wav, sample_rate = audio_io.read_audio(path)
    except Exception as error:
        raise DemoError(f"Cannot read the {what} ({name}): {one_line(error)}") from None
    if wav.shape[-1] == 0:
        raise DemoError(f"The {what} holds no audio.")
    try:  # no peak warning: nobody would read it in a server's log
        audio_io.check_audio_values(wav, f"The {what} ({name})", sample_rate=sample_rate, warn=False)
    except ValueError as error:
        raise DemoError(one_line(error)) from None
    return wav, sample_rate


def output_folder(workdir: str | os.PathLike | None) -> Path:
    """The folder outputs are written to (created; files older than :data:`OUTPUT_MAX_AGE` removed)."""
    folder = Path(workdir) if workdir is not None else Path(tempfile.gettempdir()) / "tokenwave-demo"
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in folder.glob("tokenwave-*"):  # outputs of earlier requests, served and downloaded by now
        try:
            if now - old.stat().st_mtime > OUTPUT_MAX_AGE:
                old.unlink()
        except OSError:
            pass
    return folder


def _normalized(wav: torch.Tensor, sample_rate: int, untrained: bool) -> torch.Tensor:
    """Trained models' output at -14 LUFS (peak at most -1 dBFS); the noise of the untrained
    stand-in at a -12 dBFS peak so it is not loud."""
    if untrained or wav.shape[-1] < sample_rate:  # loudness needs 0.4 s; short clips use the peak
        return audio_io.peak_normalize(wav, -12.0 if untrained else -1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return audio_io.loudness_normalize(wav, sample_rate, -14.0, -1.0)
        except ImportError:
            return audio_io.peak_normalize(wav, -1.0)


# -- generation -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GeneratedClip:
    """One output: its prompt, the written wav, the audio ``(T, C)`` it holds, a spectrogram."""

    prompt: str
    path: Path
    sample_rate: int
    audio: np.ndarray
    spectrogram: np.ndarray


@dataclass(frozen=True)
class Generation:
    """A request's clips, the seed used (drawn when none was given) and a line describing them."""

    clips: list[GeneratedClip]
    seed: int
    info: str


@dataclass(frozen=True)
class StreamedAudio:
    """A piece of the first prompt's audio, ``(n, C)`` float32 in [-1, 1], while generating."""

    sample_rate: int
    audio: np.ndarray


@dataclass
class _Request:
    """A validated generation request: the loaded generator and what to pass it."""

    generator: MusicGen
    batch: list[str]
    seed: int
    untrained: bool
    options: dict
    report: ProgressFn


def _uploads(batch: list[str], audio_prompt: str | None, melody: str | None, generator: MusicGen,
             duration: float) -> dict:
    """The audio prompt and the melody as ``generate`` takes them, ``((B, C, T), rate)``, checked."""
    extra = {}
    for key, path, what in (("audio_prompt", audio_prompt, "audio prompt"), ("melody", melody, "melody")):
        if path:
            wav, sample_rate = read_upload(path, what)
            extra[key] = (wav[None].expand(len(batch), -1, -1), sample_rate)
    if "melody" in extra and not generator.has_melody:
        raise DemoError("This model has no melody conditioning; remove the melody or choose a melody model.")
    if "audio_prompt" in extra:
        prompt_seconds = extra["audio_prompt"][0].shape[-1] / extra["audio_prompt"][1]
        if prompt_seconds >= duration:
            raise DemoError(f"The audio prompt ({prompt_seconds:.1f} s) must be shorter than the duration "
                            f"({duration:g} s): the output starts with it.")
    return extra


def _prepare_request(prompts, duration, top_k, top_p, temperature, cfg_coef, seed, model, model_path,
                     audio_prompt, melody, progress: ProgressFn | None) -> _Request:
    """Check the inputs, load the model and the uploads; raise DemoError on bad input."""
    texts = parse_prompts(prompts)
    if not texts and not audio_prompt and not melody:
        raise DemoError("Type a prompt (one per line), or give an audio prompt or a melody.")
    if len(texts) > MAX_PROMPTS:
        raise DemoError(f"At most {MAX_PROMPTS} prompts at once (one per line); got {len(texts)}.")
    duration = _number(duration, "Duration (seconds)", 0.1, MAX_DURATION)
    options = dict(duration=duration, top_k=_number(top_k, "top-k", 0, 1_000_000, integer=True),
                   top_p=_number(top_p, "top-p", 0.0, 1.0),
                   temperature=_number(temperature, "Temperature", 0.01, 10.0))
    if cfg_coef is not None:  # None: the model's own guidance (MusicGen.default_sampling)
        options["cfg_coef"] = _number(cfg_coef, "Guidance", 0.0, 30.0)
    seed = -1 if seed is None or seed == "" else _number(seed, "Seed", -1, 2**63 - 1, integer=True)
    seed = seed if seed >= 0 else secrets.randbelow(2**31)
    report = progress or (lambda fraction, text: None)
    report(0.0, "loading the model")
    generator = load_generator(model, model_path)
    batch = texts or [""]
    extra = _uploads(batch, audio_prompt, melody, generator, duration)
    shown = [0.0]

    def on_step(step: int, total: int) -> None:
        fraction = step / max(total, 1)
        if fraction - shown[0] >= 0.01 or step == total:
            shown[0] = fraction
            report(fraction, f"generating: step {step} of {total}")

    untrained = generator_key(model, model_path) == RANDOM_MODEL
    options.update(seed=seed, progress=on_step, **extra)
    return _Request(generator, batch, seed, untrained, options, report)


def _finish(request: _Request, wav: torch.Tensor, sample_rate: int, elapsed: float,
            workdir: str | os.PathLike | None) -> Generation:
    """Write the clips ``wav (B, C, T)`` (normalized) and describe them."""
    folder = output_folder(workdir)
    name = uuid.uuid4().hex[:10]
    clips = []
    for index, (prompt, row) in enumerate(zip(request.batch, wav)):
        row = _normalized(row.detach().float().cpu(), sample_rate, request.untrained)
        path = audio_io.write_audio(folder / f"tokenwave-{name}-{index}.wav", row, sample_rate)
        clips.append(GeneratedClip(prompt, path, sample_rate, row.T.numpy().copy(),
                                   spectrogram_image(row.mean(0).numpy(), sample_rate)))
    seconds = wav.shape[-1] / sample_rate
    info = (f"{len(clips)} clip(s) of {seconds:.1f} s at {sample_rate} Hz in {elapsed:.1f} s "
            f"({seconds * len(clips) / max(elapsed, 1e-9):.2f}x real time); seed {request.seed}")
    if request.untrained:
        info = f"**{RANDOM_LABEL}**: {info}"
    request.report(1.0, "done")
    return Generation(clips, request.seed, info)


def generate_music(prompts: str | None, duration: float = DEFAULT_DURATION, top_k: int = SAMPLING.top_k,
                   top_p: float = SAMPLING.top_p, temperature: float = SAMPLING.temperature,
                   cfg_coef: float | None = None, seed: int | None = -1,
                   model: str | None = RANDOM_MODEL, model_path: str | None = "",
                   audio_prompt: str | None = None, melody: str | None = None, *,
                   workdir: str | os.PathLike | None = None,
                   progress: ProgressFn | None = None) -> Generation:
    """Generate one clip per prompt line; writes ``tokenwave-<id>-<i>.wav`` files into ``workdir``.

    ``seed`` < 0 (or None) draws one (reported in ``info``); ``top_k`` 0 turns top-k off;
    ``cfg_coef`` None is the model's own guidance (:attr:`MusicGen.default_sampling`);
    ``audio_prompt``/``melody`` are audio file paths; ``progress(fraction, text)`` is called
    while loading and after LM steps.
    """
    request = _prepare_request(prompts, duration, top_k, top_p, temperature, cfg_coef, seed, model,
                               model_path, audio_prompt, melody, progress)
    options = dict(request.options)
    began = time.perf_counter()
    try:
        out = request.generator.generate(request.batch, options.pop("duration"), **options)
    except (ValueError, TypeError) as error:
        raise DemoError(f"Cannot generate: {one_line(error)}") from None
    return _finish(request, out.wav, out.sample_rate, time.perf_counter() - began, workdir)


def generate_music_stream(prompts: str | None, duration: float = DEFAULT_DURATION,
                          top_k: int = SAMPLING.top_k, top_p: float = SAMPLING.top_p,
                          temperature: float = SAMPLING.temperature, cfg_coef: float | None = None,
                          seed: int | None = -1, model: str | None = RANDOM_MODEL,
                          model_path: str | None = "", audio_prompt: str | None = None,
                          melody: str | None = None, *, workdir: str | os.PathLike | None = None,
                          progress: ProgressFn | None = None,
                          chunk_seconds: float = 0.5) -> Iterator[StreamedAudio | Generation]:
    """:func:`generate_music` while streaming: yields :class:`StreamedAudio` pieces of the first
    prompt's audio as the model generates them (every ``chunk_seconds``), then the
    :class:`Generation` (the same clips :func:`generate_music` writes for the same seed).

    The pieces are the raw output clipped to [-1, 1] (the files are loudness-normalized once
    complete); the untrained stand-in's noise is scaled to a -12 dBFS peak by its first piece.
    """
    request = _prepare_request(prompts, duration, top_k, top_p, temperature, cfg_coef, seed, model,
                               model_path, audio_prompt, melody, progress)
    generator, options = request.generator, dict(request.options)
    frames = max(1, round(chunk_seconds * generator.frame_rate))
    began = time.perf_counter()
    pieces, gain = [], None
    try:
        stream = generator.generate_stream(request.batch, options.pop("duration"), first_chunk_frames=frames,
                                           chunk_frames=frames, **options)
        for piece in stream:
            pieces.append(piece)
            first = piece[0].detach().float().cpu()  # (C, n): the first prompt
            if gain is None:
                gain = 0.25 / max(float(first.abs().max()), 1e-6) if request.untrained else 1.0
            yield StreamedAudio(generator.sample_rate, (first * gain).clamp(-1, 1).T.numpy().copy())
    except (ValueError, TypeError) as error:
        raise DemoError(f"Cannot generate: {one_line(error)}") from None
    wav = torch.cat(pieces, dim=-1)
    yield _finish(request, wav, generator.sample_rate, time.perf_counter() - began, workdir)


# -- codec ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CodecRoundTrip:
    """The decoded audio ``(T, C)`` and its file, the .ecdc file, its size and real bitrate."""

    decoded_path: Path
    ecdc_path: Path
    sample_rate: int
    audio: np.ndarray
    ecdc_bytes: int
    kbps: float
    info: str


def _codec_upload(audio_path: str | os.PathLike | None) -> tuple[torch.Tensor, int]:
    """The codec tab's upload: given, readable, finite and at most :data:`MAX_CODEC_SECONDS`."""
    if not audio_path:
        raise DemoError("Upload an audio file first.")
    wav, sample_rate = read_upload(audio_path, "upload")
    duration = wav.shape[-1] / sample_rate
    if duration > MAX_CODEC_SECONDS:
        raise DemoError(f"The upload lasts {duration:.0f} s; the demo takes up to {MAX_CODEC_SECONDS:g} s "
                        f"(use `tokenwave compress` for long files).")
    return wav, sample_rate


def codec_roundtrip(audio_path: str | os.PathLike | None, codec: str, num_codebooks: int | None = None,
                    use_lm: bool = False, *, workdir: str | os.PathLike | None = None) -> CodecRoundTrip:
    """Compress an audio file to .ecdc with ``codec`` at ``num_codebooks`` (None: all) and decode
    the file back; ``use_lm`` entropy-codes with the codec's LM."""
    wav, sample_rate = _codec_upload(audio_path)
    duration = wav.shape[-1] / sample_rate
    model = load_codec_model(codec)
    try:
        count = model.resolve_codebooks(None if num_codebooks in (None, "") else int(num_codebooks))
    except (TypeError, ValueError) as error:
        raise DemoError(one_line(error)) from None
    lm = None
    if use_lm:  # the CLI's lookup: beside the codec given, then in the models folder
        try:
            lm = entropy_lm_for(model, codec.strip())
        except (EntropyLMNotFoundError, ValueError) as error:
            raise DemoError(f"No entropy-coding LM for {model.name}: {one_line(error)}") from None
    device = next(model.parameters()).device
    signal = audio_io.convert_audio(wav, sample_rate, model.sample_rate, model.channels).to(device)
    began = time.perf_counter()
    with torch.inference_mode():
        data = ecdc.compress(signal, model.sample_rate, model, num_codebooks=count, use_lm=lm is not None,
                             lm=lm)
        decoded, rate = ecdc.decompress(data, model=model, lm=lm)
    elapsed = time.perf_counter() - began
    folder = output_folder(workdir)
    stem = f"tokenwave-{uuid.uuid4().hex[:10]}-{Path(audio_path).stem[:40]}"
    ecdc_path = folder / f"{stem}.ecdc"
    ecdc_path.write_bytes(data)
    decoded = decoded.detach().float().cpu()
    decoded_path = audio_io.write_audio(folder / f"{stem}-decoded.wav", decoded, rate)
    kbps = len(data) * 8 / duration / 1000
    original = Path(audio_path).stat().st_size
    nominal = count * model.bandwidth_per_codebook
    info = (f"**{len(data):,} bytes** of .ecdc for {duration:.2f} s: **{kbps:.2f} kbps** real "
            f"(nominal {nominal:g} kbps: {count} codebooks{' + entropy coding' if lm is not None else ''}); "
            f"the upload is {original:,} bytes, {original / max(len(data), 1):.0f}x larger.  \n"
            f"Codec: {model_label(model)}, {model.sample_rate} Hz, {model.channels} channel(s); "
            f"encode + decode {elapsed:.2f} s ({duration / max(elapsed, 1e-9):.1f}x real time).")
    return CodecRoundTrip(decoded_path, ecdc_path, rate, decoded.T.numpy().copy(), len(data), kbps, info)


__all__ = ["CodecRoundTrip", "GeneratedClip", "Generation", "MAX_CODEC_SECONDS", "MAX_DURATION",
           "MAX_PROMPTS", "StreamedAudio", "codec_roundtrip", "generate_music", "generate_music_stream",
           "output_folder", "parse_prompts", "read_upload"]
