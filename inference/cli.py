"""The ``tokenwave`` command line: compress, decompress, tokens, roundtrip.

Every command takes a file or a folder (``IN`` a folder -> ``OUT`` a folder with the same
file names, a progress bar over the files). Outputs are written to a temporary file and
renamed, so a failure, Ctrl-C or SIGTERM never leaves a partial file, and an existing output
is only replaced with ``--force``; an output folder that cannot be written is reported before
any model loads. Errors are one line on stderr (``--verbose`` adds the traceback), warnings
one ``tokenwave: warning:`` line.

Models: ``--model`` takes a name (looked up in ``$TOKENWAVE_MODELS``, see
:mod:`codec.registry`), a checkpoint path in any format :mod:`codec.formats` reads, a
generator's name or folder (its codec: ``--model tokenwave-small`` is the shipped one), or
``random:<preset>`` (e.g. ``random:encodec_24khz``): an untrained model with fixed-seed random
weights that needs no download, named ``random_<preset>`` in messages and .ecdc headers (so
``decompress`` rebuilds it). It runs the whole pipeline but does not reproduce the audio.
Inputs longer than ``STREAM_ABOVE_SECONDS`` are read, coded and written block by block
(:mod:`codec.streaming`), in memory bounded by ``--block-seconds``; the results equal the
whole-file ones (codes and .ecdc bytes exactly, audio to float rounding).

``tokens`` writes ``.npy`` (codes ``(K, F)``, int16 when the codebook size allows) for models
that encode whole files. Models that encode in segments with a scale each (encodec_48khz)
need ``.npz``: ``codes`` ``(K, sum F_i)`` (the segments' codes concatenated along frames),
``chunk_frames`` ``(S,)``, ``scales`` ``(S,)`` float32, and ``model``, ``sample_rate``,
``num_samples``, ``frame_rate``, ``segment_length``, ``segment_stride``. ``.npz`` works for
every model and keeps what decoding needs.

``generate --stdout`` streams one prompt as raw PCM while it is generated: no header,
little-endian, channels interleaved, at the model's sample rate (printed on stderr);
``--format f32`` (float32, the default) or ``s16`` (16-bit, clipped to [-1, 1]). For example
``tokenwave generate "lofi beat" --stdout --format s16 | aplay -f S16_LE -r 32000 -c 1``.
``--play`` plays it through the optional ``sounddevice`` package.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import math
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from codec import audio
from codec.model import PRESETS, EncodecConfig, EncodecModel, EncodedFrame
from codec.pretrained import RANDOM_NAME_PREFIX, RANDOM_SEED, is_random  # random_<preset> models

DEFAULT_MODEL = "encodec_24khz"
RANDOM_PREFIX = "random:"  # --model random:encodec_24khz
# Inputs longer than this are processed block by block (bounded memory, no normalization).
STREAM_ABOVE_SECONDS = 60.0
BLOCK_SECONDS = 5.0
# --block-seconds bounds: shorter blocks cost a Python round per few samples, longer ones
# hold minutes of audio in memory, which is what the blocks are for avoiding.
BLOCK_SECONDS_RANGE = (0.1, 600.0)
# Model folders shipped with the repository, used when a name is not in the models folder.
SHIPPED_MODELS = Path(__file__).resolve().parents[1] / "assets" / "models"


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: every ``with`` block unwinds as on Ctrl-C, so the
    atomic writers remove their temporary files."""


@contextlib.contextmanager
def terminate_as_interrupt():
    """Turn SIGTERM into :class:`Terminated` while the command runs (main thread only: signal
    handlers cannot be installed elsewhere); the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def one_line_warnings():
    """Warnings as ``tokenwave: warning: ...`` lines, not Python's file:line and source."""
    previous = warnings.formatwarning
    warnings.formatwarning = lambda message, *args, **kwargs: f"tokenwave: warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = previous


# -- models ---------------------------------------------------------------------------------
def random_model(preset: str | EncodecConfig, seed: int = RANDOM_SEED) -> EncodecModel:
    """An untrained model with reproducible random weights, for runs with no download.

    A preset name gives the model name ``random_<preset>`` (stored in .ecdc headers, where
    ``:`` is not allowed; :func:`load_codec` rebuilds the model from it); a config keeps its
    own name. Each codebook is drawn from a Gaussian fitted to what the previous stages leave
    of the encoder's output on a fixed noise probe, so every stage spreads its codes over the
    codebook (an untrained quantizer's all-zero codebooks would give code 0 everywhere).
    """
    if isinstance(preset, EncodecConfig):
        config = preset
    elif preset in PRESETS:
        config = replace(PRESETS[preset], name=f"{RANDOM_NAME_PREFIX}{preset}")
    else:
        raise CliError(f"unknown preset {preset!r} for a random model; expected one of "
                       f"{', '.join(sorted(PRESETS))}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EncodecModel(config).prepare_for_inference()
        probe = 0.1 * torch.randn(1, config.channels, 2 * config.sample_rate)
        with torch.no_grad():
            residual = model.encoder(probe / probe.pow(2).mean().sqrt() if config.normalize
                                     else probe)[0].T  # (F, D)
            for layer in model.quantizer.vq.layers:
                book = layer._codebook
                # Entries of scale sqrt(2 ln M / D) * std: the nearest of M random vectors
                # then removes a fixed share of the residual, so more codebooks do better.
                size, dim = book.codebook_size, residual.shape[1]
                spread = residual.std(0) * math.sqrt(2 * math.log(size) / dim)
                book.embed.copy_(residual.mean(0) + spread * torch.randn(size, dim))
                book.embed_avg.copy_(book.embed)
                book.inited.fill_(1.0)
                residual = residual - book.decode(book.quantize(residual))
    from codec.formats import remember_weights_id, state_weights_id

    remember_weights_id(model, state_weights_id(model.state_dict()))  # .ecdc files record it
    return model


def random_entropy_lm(model: EncodecModel, seed: int = RANDOM_SEED):
    """The entropy-coding LM for a random model (:func:`codec.pretrained.random_entropy_lm`)."""
    from codec.pretrained import random_entropy_lm as make

    return make(model, seed)


def _random_preset(spec: str) -> str | None:
    """``random:<preset>`` (the CLI spelling) or ``random_<preset>`` (the model name)."""
    for prefix in (RANDOM_PREFIX, RANDOM_NAME_PREFIX):
        if spec.startswith(prefix) and (spec[len(prefix):] in PRESETS or prefix == RANDOM_PREFIX):
            return spec[len(prefix):]
    return None


def load_codec(spec: str, device: torch.device) -> EncodecModel:
    """A ready-for-inference model from a name, a path or ``random:<preset>``.

    A generator (name or folder) gives its codec. A name missing from the models folder falls
    back to ``assets/models/<name>`` when the repository ships a model folder there.
    """
    preset = _random_preset(spec)
    if preset is not None:
        return random_model(preset).to(device)
    from codec.formats import load_model

    try:
        return load_model(spec, device=device, inference=True)
    except FileNotFoundError as error:
        shipped = SHIPPED_MODELS / spec
        if "/" not in spec and shipped.is_dir():
            return load_model(shipped, device=device, inference=True)
        hint = ""
        if spec in PRESETS:
            hint = (f" (to run with no download use --model tokenwave-small, the shipped codec, or "
                    f"--model {RANDOM_PREFIX}{spec}: untrained)")
        raise CliError(f"{_one_line(error)}{hint}") from error


def entropy_lm_for(model: EncodecModel, spec: str | None):
    """The codec's entropy-coding LM, found as :func:`codec.pretrained.entropy_lm_for` finds it
    (beside the model given, then in the models folder); a missing one is a one-line error
    naming the command that trains it."""
    from codec.pretrained import EntropyLMNotFoundError
    from codec.pretrained import entropy_lm_for as find

    try:
        return find(model, spec)
    except EntropyLMNotFoundError as error:
        raise CliError(_one_line(error)) from None


def model_label(model: EncodecModel) -> str:
    if is_random(model):
        return f"{model.name} (UNTRAINED random weights, seed {RANDOM_SEED})"
    return model.name


def parse_device(spec: str) -> torch.device:
    try:
        device = torch.device(spec)
    except RuntimeError as error:
        raise CliError(f"--device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {spec}: CUDA is not available here; use --device cpu")
    return device


# -- jobs: which file goes where --------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    source: Path
    target: Path


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def plan_jobs(source: str, target: str, *, inputs: tuple[str, ...], suffix: str,
              force: bool) -> list[Job]:
    """File -> file, or folder -> folder (mirrored relative paths, extension ``suffix``)."""
    src, dst = Path(source), Path(target)
    if not src.exists():
        raise CliError(f"input not found: {source}")
    if src.is_dir():
        if dst.exists() and not dst.is_dir():
            raise CliError(f"input {source} is a folder, so the output must be a folder; "
                           f"{target} is a file")
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in inputs
                       and not p.name.startswith("."))
        if not files:
            raise CliError(f"no input files ({', '.join(inputs)}) in folder {source}")
        jobs = [Job(p, (dst / p.relative_to(src)).with_suffix(suffix)) for p in files]
        seen: dict[Path, Path] = {}
        for job in jobs:
            if job.target in seen:
                raise CliError(f"{seen[job.target]} and {job.source} would both be written to "
                               f"{job.target}")
            seen[job.target] = job.source
    else:
        if dst.is_dir():
            raise CliError(f"output {target} is a folder; give an output file name")
        jobs = [Job(src, dst)]
    for job in jobs:
        if job.target.resolve() == job.source.resolve():
            raise CliError(f"input and output are the same file: {job.source}")
    existing = [job.target for job in jobs if job.target.exists()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise CliError(f"output exists: {existing[0]}{more}; use --force to overwrite")
    check_writable([job.target for job in jobs])
    return jobs


def check_writable(targets: list[Path]) -> None:
    """Fail before any work if an output cannot be written where it is asked for.

    For each output folder, the nearest folder that exists must be a folder (not a file) and
    accept a new file (probed with an anonymous temporary file, which also catches read-only
    mounts and root's exemptions); missing folders below it are created later. The message
    names the user's path, never a temporary file.
    """
    seen: set[Path] = set()
    for target in targets:
        folder = Path(target).absolute().parent
        if folder in seen:
            continue
        seen.add(folder)
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise CliError(f"cannot write {target}: {existing} is a file, not a folder")
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as error:
            raise CliError(f"cannot write {target}: folder {existing} is not writable "
                           f"({error.strerror or _one_line(error)})") from None


def check_codec_options(args) -> None:
    """Refuse numbers no one means (inf, nan, 0, negative) before anything runs, naming the
    option; argparse only checks that they parse."""
    def fail(option: str, wants: str, value) -> None:
        raise CliError(f"{option} must be {wants}, got {value}")

    bandwidth = getattr(args, "bandwidth", None)
    if bandwidth is not None and not (math.isfinite(bandwidth) and bandwidth > 0):
        fail("--bandwidth", "a positive number of kbps", bandwidth)
    codebooks = getattr(args, "codebooks", None)
    if codebooks is not None and codebooks < 1:
        fail("--codebooks", "at least 1", codebooks)
    block = getattr(args, "block_seconds", None)
    low, high = BLOCK_SECONDS_RANGE
    if block is not None and not low <= block <= high:  # nan fails too
        fail("--block-seconds", f"between {low:g} and {high:g} seconds", block)
    lufs = getattr(args, "target_lufs", None)
    if lufs is not None and not -70.0 <= lufs <= 0.0:
        fail("--target-lufs", "a loudness between -70 and 0 LUFS", lufs)
    limit = getattr(args, "max_duration", None)
    if limit is not None and not limit > 0:
        fail("--max-duration", "a positive number of seconds (inf for no limit)", limit)


def max_duration(args) -> float | None:
    """``--max-duration`` as .ecdc's ``max_duration``: inf means no limit (None)."""
    return None if math.isinf(args.max_duration) else args.max_duration


def run_jobs(jobs: list[Job], work: Callable[[Job], str], args) -> int:
    """Run ``work`` on each job; a failure in folder mode is reported and the rest go on."""
    from tqdm import tqdm

    if len(jobs) == 1:
        jobs[0].target.parent.mkdir(parents=True, exist_ok=True)
        message = work(jobs[0])
        if not args.quiet:
            print(message)
        return 0
    failed = 0
    bar = tqdm(jobs, unit="file", disable=args.quiet, file=sys.stderr)
    for job in bar:
        job.target.parent.mkdir(parents=True, exist_ok=True)
        try:
            message = work(job)
        except Exception as error:  # report it, go on with the other files
            failed += 1
            if args.verbose:
                traceback.print_exc()
            tqdm.write(f"tokenwave: error: {job.source}: {_one_line(error)}", file=sys.stderr)
            continue
        if not args.quiet:
            tqdm.write(message)
    if failed:
        raise CliError(f"{failed} of {len(jobs)} files failed")
    return 0


# -- audio in, audio out ------------------------------------------------------------------------
def load_input(path: Path, model: EncodecModel) -> tuple[torch.Tensor, float]:
    """The file at the model's rate and channel count ``(C, T)``, and its duration in seconds.

    NaN/inf samples are refused (naming the file and the sample) and a peak far above 1 is
    warned about here, at the file's own rate; encode under :func:`input_checked`."""
    wav, sr = audio.read_audio(path)
    if wav.shape[-1] == 0:
        raise CliError(f"{path} holds no audio (0 samples)")
    audio.check_audio_values(wav, str(path), sample_rate=sr)
    return audio.convert_audio(wav, sr, model.sample_rate, model.channels), wav.shape[-1] / sr


@contextlib.contextmanager
def input_checked():
    """Encode audio that :func:`load_input` already checked: the model's own peak warning
    would repeat the file's without its name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", audio.PeakWarning)
        yield


def input_blocks(path: Path, model: EncodecModel, block_seconds: float):
    return audio.iter_audio_blocks(path, max(1, int(block_seconds * model.sample_rate)),
                                   sample_rate=model.sample_rate, channels=model.channels)


def is_long(path: Path) -> bool:
    return audio.audio_info(path).duration > STREAM_ABOVE_SECONDS


def check_audio_target(target: Path) -> None:
    if target.suffix.lower() not in audio.writable_extensions():
        raise CliError(f"cannot write audio to {target}: use one of "
                       f"{', '.join(audio.writable_extensions())}")


def write_output_audio(path: Path, wav: torch.Tensor, sample_rate: int, args) -> None:
    audio.write_audio(path, wav, sample_rate, subtype=args.subtype, normalize=args.normalize,
                      target_lufs=args.target_lufs)


def stream_roundtrip(job: Job, model: EncodecModel, num_codebooks: int, args) -> float:
    """Encode and decode block by block into ``job.target``; returns the seconds processed."""
    from codec.streaming import decode_blocks, encode_blocks

    if args.normalize:
        raise CliError(f"{job.source} is longer than {STREAM_ABOVE_SECONDS:g} s and is processed "
                       "block by block; --normalize needs the whole signal, leave it out")
    info = audio.audio_info(job.source)
    length = round(info.frames * model.sample_rate / info.sample_rate)
    frames = encode_blocks(input_blocks(job.source, model, args.block_seconds), model,
                           num_codebooks=num_codebooks, what=str(job.source))
    with torch.inference_mode(), audio.AudioFileWriter(
            job.target, model.sample_rate, model.channels, subtype=args.subtype) as writer:
        for block in decode_blocks(frames, model, length=length):
            writer.write(block[0].cpu())
    return info.duration


def speed(duration: float, seconds: float) -> str:
    return f"{duration / max(seconds, 1e-9):.1f}x real time"


def bandwidth_text(model: EncodecModel, num_codebooks: int) -> str:
    return f"{num_codebooks} codebooks, {num_codebooks * model.bandwidth_per_codebook:g} kbps"


# -- commands -----------------------------------------------------------------------------------
def cmd_roundtrip(args) -> int:
    check_codec_options(args)
    jobs = plan_jobs(args.input, args.output, inputs=audio.readable_extensions(), suffix=".wav",
                     force=args.force)
    for job in jobs:
        check_audio_target(job.target)
    model = load_codec(args.model, parse_device(args.device))
    num_codebooks = resolve_codebooks(model, args)
    device = next(model.parameters()).device

    def work(job: Job) -> str:
        start = time.perf_counter()
        if is_long(job.source):
            duration = stream_roundtrip(job, model, num_codebooks, args)
        else:
            wav, duration = load_input(job.source, model)
            with torch.inference_mode(), input_checked():
                out = model(wav[None].to(device), num_codebooks=num_codebooks)[0].cpu()
            write_output_audio(job.target, out, model.sample_rate, args)
        elapsed = time.perf_counter() - start
        return (f"roundtrip {job.source} -> {job.target}: {model_label(model)}, "
                f"{bandwidth_text(model, num_codebooks)}, {duration:.2f} s of audio, "
                f"{speed(duration, elapsed)}")

    return run_jobs(jobs, work, args)


def resolve_codebooks(model: EncodecModel, args) -> int:
    try:
        return model.resolve_codebooks(args.codebooks, args.bandwidth)
    except ValueError as error:
        option = "--bandwidth" if args.bandwidth is not None else "--codebooks"
        raise CliError(f"{option}: {_one_line(error)}") from None


def encode_codes(job: Job, model: EncodecModel, num_codebooks: int,
                 block_seconds: float) -> tuple[list[EncodedFrame], float]:
    """All encoded frames of a file (in bounded memory for long files) and its duration."""
    device = next(model.parameters()).device
    if is_long(job.source):
        from codec.streaming import encode_blocks

        blocks = input_blocks(job.source, model, block_seconds)
        with torch.inference_mode():
            pieces = [EncodedFrame(f.codes.cpu(), None if f.scale is None else f.scale.cpu())
                      for f in encode_blocks(blocks, model, num_codebooks=num_codebooks,
                                             what=str(job.source))]
        if model.segment_length is None:  # pieces of one chunk: join them
            pieces = [EncodedFrame(torch.cat([p.codes for p in pieces], dim=-1), None)]
        return pieces, audio.audio_info(job.source).duration
    wav, duration = load_input(job.source, model)
    with torch.inference_mode(), input_checked():
        frames = model.encode(wav[None].to(device), num_codebooks=num_codebooks)
    return [EncodedFrame(f.codes.cpu(), None if f.scale is None else f.scale.cpu())
            for f in frames], duration


def save_tokens(path: Path, frames: list[EncodedFrame], model: EncodecModel,
                num_samples: int) -> tuple[int, ...]:
    """Write codes as .npy (whole-file models) or .npz (any model); returns the codes' shape."""
    dtype = np.int16 if model.codebook_size <= np.iinfo(np.int16).max + 1 else np.int32
    codes = torch.cat([f.codes[0] for f in frames], dim=-1).numpy().astype(dtype)
    with audio.atomic_output(path) as tmp, open(tmp, "wb") as handle:
        if path.suffix.lower() == ".npy":
            np.save(handle, codes)
        else:
            extra = {}
            if model.segment_length is not None:
                extra = {"segment_length": np.int64(model.segment_length),
                         "segment_stride": np.int64(model.segment_stride)}
            if frames[0].scale is not None:
                extra["scales"] = np.array([float(f.scale.reshape(-1)[0]) for f in frames],
                                           dtype=np.float32)
            np.savez(handle, codes=codes, model=np.str_(model.name),
                     chunk_frames=np.array([f.codes.shape[-1] for f in frames], dtype=np.int64),
                     sample_rate=np.int64(model.sample_rate), num_samples=np.int64(num_samples),
                     frame_rate=np.int64(model.frame_rate), **extra)
    return codes.shape


def cmd_tokens(args) -> int:
    check_codec_options(args)
    folder = Path(args.input).is_dir()
    suffix = (".npz" if args.npz else ".npy") if folder else Path(args.output).suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise CliError(f"tokens are written to .npy or .npz, got {args.output}")
    jobs = plan_jobs(args.input, args.output, inputs=audio.readable_extensions(), suffix=suffix,
                     force=args.force)
    model = load_codec(args.model, parse_device(args.device))
    num_codebooks = resolve_codebooks(model, args)
    if suffix == ".npy" and model.segment_length is not None:
        raise CliError(f"{model.name} encodes {model.config.segment:g} s segments, each with a "
                       f"scale; write .npz (codes, chunk_frames, scales) instead of .npy"
                       f"{' (--npz in folder mode)' if folder else ''}")

    def work(job: Job) -> str:
        start = time.perf_counter()
        frames, duration = encode_codes(job, model, num_codebooks, args.block_seconds)
        num_samples = round(duration * model.sample_rate)
        shape = save_tokens(job.target, frames, model, num_samples)
        elapsed = time.perf_counter() - start
        return (f"tokens {job.source} -> {job.target}: {model_label(model)}, "
                f"{bandwidth_text(model, num_codebooks)}, codes {shape}, {duration:.2f} s of "
                f"audio, {speed(duration, elapsed)}")

    return run_jobs(jobs, work, args)


def cmd_compress(args) -> int:
    from codec import ecdc

    check_codec_options(args)
    jobs = plan_jobs(args.input, args.output, inputs=audio.readable_extensions(), suffix=".ecdc",
                     force=args.force)
    model = load_codec(args.model, parse_device(args.device))
    num_codebooks = resolve_codebooks(model, args)
    lm = entropy_lm_for(model, args.model) if args.lm else None

    def work(job: Job) -> str:
        start = time.perf_counter()
        info = audio.audio_info(job.source)  # refuse what decompress would refuse, up front
        check_ecdc_duration(job.source, round(info.frames * model.sample_rate / info.sample_rate),
                            model, args)
        if is_long(job.source):  # codes are small: only the audio must stay out of memory
            frames, duration = encode_codes(job, model, num_codebooks, args.block_seconds)
            info = audio.audio_info(job.source)
            length = round(info.frames * model.sample_rate / info.sample_rate)
            buffer = io.BytesIO()
            layout = ecdc.CodecLayout.from_model(model)  # with the weights id, as compress()
            buffer.write(layout.header(length, num_codebooks, lm is not None).to_bytes())
            ecdc.write_body(buffer, frames, layout, lm)
            data = buffer.getvalue()
        else:
            wav, duration = load_input(job.source, model)
            with input_checked():
                data = ecdc.compress(wav, model.sample_rate, model, num_codebooks=num_codebooks,
                                     use_lm=lm is not None, lm=lm, max_duration=max_duration(args))
        with audio.atomic_output(job.target) as tmp:
            tmp.write_bytes(data)
        elapsed = time.perf_counter() - start
        kbps = len(data) * 8 / duration / 1000
        return (f"compress {job.source} -> {job.target}: {model_label(model)}, "
                f"{bandwidth_text(model, num_codebooks)}{' + entropy coding' if lm else ''}, "
                f"{duration:.2f} s of audio, {len(data)} bytes ({kbps:.2f} kbps), "
                f"{speed(duration, elapsed)}")

    return run_jobs(jobs, work, args)


def check_ecdc_duration(source: Path, length: int, model: EncodecModel, args) -> None:
    """``--max-duration``, the same test for compress and decompress (see codec.ecdc)."""
    from codec import ecdc

    ecdc.check_duration(length, model.sample_rate, max_duration(args), what=str(source),
                        option="--max-duration")


def cmd_decompress(args) -> int:
    from codec import ecdc
    from codec.streaming import decode_blocks

    check_codec_options(args)
    jobs = plan_jobs(args.input, args.output, inputs=(".ecdc",), suffix=".wav", force=args.force)
    for job in jobs:
        check_audio_target(job.target)
    device = parse_device(args.device)
    models: dict[str, EncodecModel] = {}

    def model_for(name: str) -> EncodecModel:
        if name not in models:
            models[name] = load_codec(name, device)
        return models[name]

    fixed = model_for(args.model) if args.model else None

    def work(job: Job) -> str:
        data = job.source.read_bytes()
        header = ecdc.read_header(data)[0]
        model = fixed or model_for(header.model_name)
        lm = None
        if header.use_lm and header.model_name == model.name:
            lm = entropy_lm_for(model, args.model)
        start = time.perf_counter()
        check_ecdc_duration(job.source, header.audio_length, model, args)
        duration = header.audio_length / model.sample_rate
        if duration > STREAM_ABOVE_SECONDS:  # decode block by block into the file
            if args.normalize:
                raise CliError(f"{job.source} holds more than {STREAM_ABOVE_SECONDS:g} s and is "
                               "decoded block by block; --normalize needs the whole signal")
            header, frames = ecdc.parse_ecdc(data, ecdc.CodecLayout.from_model(model), lm,
                                             max_duration=max_duration(args))
            param = next(model.parameters())
            frames = [EncodedFrame(codes.to(param.device), None if scale is None
                                   else scale.to(param.device, param.dtype))
                      for codes, scale in frames]
            if model.segment_length is None:  # one chunk: feed it to the decoder in pieces
                step = max(1, round(args.block_seconds * model.frame_rate))
                frames = [EncodedFrame(piece, None) for piece in frames[0].codes.split(step, -1)]
            with torch.inference_mode(), audio.AudioFileWriter(
                    job.target, model.sample_rate, model.channels, subtype=args.subtype) as out:
                for block in decode_blocks(frames, model, length=header.audio_length):
                    out.write(block[0].cpu())
        else:
            with torch.inference_mode():
                wav, sr = ecdc.decompress(data, model=model, lm=lm,
                                          max_duration=max_duration(args))
            write_output_audio(job.target, wav.cpu(), sr, args)
        elapsed = time.perf_counter() - start
        return (f"decompress {job.source} -> {job.target}: {model_label(model)}, "
                f"{bandwidth_text(model, header.num_codebooks)}, {duration:.2f} s of audio, "
                f"{speed(duration, elapsed)}")

    return run_jobs(jobs, work, args)


PCM_FORMATS = {"f32": "float32", "s16": "signed 16-bit"}  # --format: raw little-endian, channels interleaved


def pcm_bytes(chunk: torch.Tensor, fmt: str) -> bytes:
    """Audio ``(C, n)`` -> raw little-endian PCM, channels interleaved (frame-major).

    ``f32``: float32 as generated; ``s16``: clipped to [-1, 1], scaled by 32767 and rounded.
    """
    frames = chunk.detach().float().cpu().T.numpy()  # (n, C)
    if fmt == "s16":
        return np.round(np.clip(frames, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    return np.ascontiguousarray(frames, dtype="<f4").tobytes()


def import_sounddevice():
    """The ``sounddevice`` module, or a CliError saying what to install (it is optional)."""
    try:
        import sounddevice  # noqa: PLC0415 -- optional: only --play needs it
    except (ImportError, OSError) as error:  # OSError: the package is there, PortAudio is not
        raise CliError(f"--play needs the sounddevice package: pip install sounddevice (on Linux also the "
                       f"PortAudio library, e.g. apt-get install libportaudio2); {_one_line(error)}") from None
    return sounddevice


def silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null once the reader of stdout is gone, so that the
    interpreter's last flush of what is still buffered does not fail again at exit."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (tests capture it)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def stream_generation(generator, prompt: str, args, options: dict, target: Path | None, sounddevice=None) -> None:
    """Generate one prompt chunk by chunk to stdout (raw PCM) and/or the speakers (through
    ``sounddevice``, float32); also to ``target`` when given (written once complete).

    A reader that closes stdout early (``... --stdout | head -c 100``) stops the generation
    quietly, as a pipe does for any command; ``target`` is then not written (it would be cut).
    """

    rate, channels = generator.sample_rate, generator.channels
    if not args.quiet:
        what = " and ".join(x for x, on in (("stdout", args.stdout), ("the speakers", args.play)) if on)
        layout = f", raw {PCM_FORMATS[args.format]} little-endian PCM" if args.stdout else ""
        print(f"streaming {prompt!r} to {what}: {rate} Hz, {channels} channel(s){layout}", file=sys.stderr)
    sink = sys.stdout.buffer if args.stdout else None
    chunks = []
    began = time.perf_counter()
    output = contextlib.nullcontext() if sounddevice is None else \
        sounddevice.OutputStream(samplerate=rate, channels=channels, dtype="float32")
    stream = generator.generate_stream(prompt, args.duration, first_chunk_frames=args.chunk_frames,
                                       chunk_frames=args.chunk_frames, **options)
    with output as player, contextlib.closing(stream):
        for chunk in stream:
            chunk = chunk[0].detach().float().cpu()  # (C, n)
            if sink is not None:
                try:
                    sink.write(pcm_bytes(chunk, args.format))
                    sink.flush()
                except BrokenPipeError:  # the reader has gone: stop, no traceback
                    silence_stdout()
                    if target is not None:
                        raise CliError(f"stdout was closed before the end of the stream; {target} was not "
                                       "written") from None
                    return
            if player is not None:
                player.write(np.ascontiguousarray(chunk.T.numpy()))
            if target is not None:
                chunks.append(chunk)
    elapsed = time.perf_counter() - began
    if target is not None:
        wav = torch.cat(chunks, dim=-1)
        write_output_audio(target, wav, rate, args)
        if not args.quiet:
            print(f"generate {prompt!r} -> {target}: {args.model}, {wav.shape[-1] / rate:.2f} s at {rate} Hz "
                  f"in {elapsed:.1f} s", file=sys.stderr)


def option_errors(command: Callable) -> Callable:
    """Run ``command``, turning a :class:`~lm.sampling.GenerationArgumentError` (``top_k must be
    >= 0``) into the CLI's words for it (``--top-k must be >= 0``)."""
    from lm.sampling import GenerationArgumentError

    @functools.wraps(command)
    def run(args) -> int:
        try:
            return command(args)
        except GenerationArgumentError as error:
            raise CliError(f"--{error.argument.replace('_', '-')} {error.problem}") from error

    return run


def check_generate_options(args) -> None:
    """The arguments no generation can use, refused before a model is loaded (the library's
    own checks: :func:`inference.generator.check_generation`)."""
    from inference.generator import check_generation

    check_codec_options(args)  # the output options generate shares with the codec commands (--target-lufs)
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.chunk_frames < 1:
        raise CliError(f"--chunk-frames must be at least 1, got {args.chunk_frames}")
    check_generation(duration=args.duration, seed=args.seed, extend_stride=args.extend_stride,
                     use_sampling=not args.greedy, temperature=args.temperature, top_k=args.top_k,
                     top_p=args.top_p, cfg_coef=args.cfg_coef)


@option_errors
def cmd_generate(args) -> int:
    """Prompts -> audio files with a MusicGen/AudioGen generator (``out.wav``, or
    ``out_0.wav``, ``out_1.wav``, ... for several prompts), or one prompt streamed to stdout
    (``--stdout``, raw PCM) and/or the speakers (``--play``) as it is generated."""
    from inference.api import output_paths, read_prompts_file
    from inference.generator import MusicGen

    streaming = args.stdout or args.play
    if args.output is None and not streaming:
        raise CliError("give an output file (-o OUT), or stream with --stdout or --play")
    prompts = list(args.prompts) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        if args.continue_from is None and args.melody is None:
            raise CliError('give at least one prompt or --prompts-file ("" generates without text)')
        prompts = [""]
    if streaming and len(prompts) != 1:
        raise CliError(f"--stdout and --play stream one prompt; got {len(prompts)}")
    check_generate_options(args)
    sounddevice = import_sounddevice() if args.play else None
    targets = output_paths(args.output, len(prompts)) if args.output is not None else []
    for target in targets:
        check_audio_target(target)
    existing = [t for t in targets if t.exists()]
    if existing and not args.force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise CliError(f"output exists: {existing[0]}{more}; use --force to overwrite")
    check_writable(targets)  # before loading models, not after generating
    if args.dtype == "bf16-weights":  # float32 compute, bfloat16 matrix weights (CPU speed)
        dtype = torch.float32
    else:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype,
                                                                                                    args.dtype)
    generator = MusicGen.from_pretrained(args.model, device=parse_device(args.device), dtype=dtype,
                                         t5_path=args.t5_path)
    if args.dtype == "bf16-weights":
        generator.lm.low_precision_weights(torch.bfloat16)
    conditioning = {}
    for key, path in (("audio_prompt", args.continue_from), ("melody", args.melody)):
        if path is not None:
            wav, sr = audio.read_audio(path)
            if wav.shape[-1] == 0:
                raise CliError(f"{path} holds no audio (0 samples)")
            conditioning[key] = (wav, sr)
    if targets:
        targets[0].parent.mkdir(parents=True, exist_ok=True)
    options = dict(top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, cfg_coef=args.cfg_coef,
                   two_step_cfg=args.two_step_cfg, use_sampling=not args.greedy, progress=not args.quiet,
                   extend_stride=args.extend_stride, fast=args.fast)
    if streaming:
        extra = {key: (wav[None], sr) for key, (wav, sr) in conditioning.items()}
        stream_generation(generator, prompts[0], args, dict(options, seed=args.seed, **extra),
                          targets[0] if targets else None, sounddevice)
        return 0
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start: start + args.batch_size]
        extra = {key: (wav[None].expand(len(batch), -1, -1), sr) for key, (wav, sr) in conditioning.items()}
        began = time.perf_counter()
        out = generator.generate(batch, args.duration, seed=None if args.seed is None else args.seed + start,
                                 **options, **extra)
        elapsed = time.perf_counter() - began
        seconds = out.wav.shape[-1] / out.sample_rate
        for prompt, wav, target in zip(batch, out.wav, targets[start:]):
            write_output_audio(target, wav.cpu(), out.sample_rate, args)
            if not args.quiet:
                print(f"generate {prompt!r} -> {target}: {args.model}, {seconds:.2f} s at {out.sample_rate} Hz, "
                      f"batch of {len(batch)} in {elapsed:.1f} s ({speed(seconds * len(batch), elapsed)})")
    return 0


# -- argument parsing ---------------------------------------------------------------------------
def add_max_duration(parser: argparse.ArgumentParser, what: str) -> None:
    from codec.ecdc import DEFAULT_MAX_DURATION_S

    parser.add_argument("--max-duration", type=float, default=DEFAULT_MAX_DURATION_S,
                        metavar="SECONDS", help=f"{what}; default {DEFAULT_MAX_DURATION_S:g} s "
                                                "(4 h), inf for no limit")


def package_version() -> str:
    """tokenwave's version: the installed package's, else the one pyproject.toml states (a
    source checkout that was never installed)."""
    from importlib import metadata

    try:
        return metadata.version("tokenwave")
    except metadata.PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line (``tokenwave generate: error: argument --seed: invalid int value:
    '1e20'; see tokenwave generate --help``), exit status 2, as argparse's own but without the
    usage block. Sub-commands' parsers are made with this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="tokenwave", description="EnCodec audio codec tools: compress to .ecdc, "
        "decompress, extract tokens, round trip. IN may be a folder (then OUT is a folder).")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    common.add_argument("--force", action="store_true", help="overwrite existing outputs")
    common.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"model name, checkpoint path, or random:<preset> (an untrained "
                            f"stand-in); default {DEFAULT_MODEL}")
    rate = argparse.ArgumentParser(add_help=False)
    group = rate.add_mutually_exclusive_group(required=True)
    group.add_argument("--bandwidth", "-b", type=float, metavar="KBPS",
                       help="target bandwidth in kbps (e.g. 1.5, 3, 6, 12, 24 at 24 kHz)")
    group.add_argument("--codebooks", "-n", type=int, metavar="N", help="number of codebooks")
    rate.add_argument("--block-seconds", type=float, default=BLOCK_SECONDS,
                      help=f"block length for inputs longer than {STREAM_ABOVE_SECONDS:g} s, "
                           "which are processed in bounded memory")
    out_audio = argparse.ArgumentParser(add_help=False)
    out_audio.add_argument("--subtype", default="PCM_16", choices=audio.SUBTYPES,
                           help="sample format of the written audio")
    out_audio.add_argument("--normalize", choices=audio.NORMALIZE_MODES,
                           help="peak (-1 dBFS) or loudness (--target-lufs); default: none")
    out_audio.add_argument("--target-lufs", type=float, default=-14.0,
                           help="loudness target for --normalize loudness (default -14)")

    sub = commands.add_parser("compress", parents=[common, model, rate],
                              help="audio -> .ecdc file")
    sub.add_argument("input", metavar="IN")
    sub.add_argument("output", metavar="OUT")
    sub.add_argument("--lm", action="store_true", help="entropy-code with the codec's LM")
    add_max_duration(sub, "refuse inputs longer than this (decompress refuses longer files by "
                          "the same default)")
    sub.set_defaults(func=cmd_compress)

    sub = commands.add_parser("decompress", parents=[common, out_audio],
                              help=".ecdc file -> audio")
    sub.add_argument("input", metavar="IN")
    sub.add_argument("output", metavar="OUT")
    sub.add_argument("--model", help="model to decode with (default: the one the file names)")
    sub.add_argument("--block-seconds", type=float, default=BLOCK_SECONDS,
                     help=f"block length for files longer than {STREAM_ABOVE_SECONDS:g} s, "
                          "which are decoded in bounded memory")
    add_max_duration(sub, "refuse files claiming more audio than this (a guard against "
                          "hostile files)")
    sub.set_defaults(func=cmd_decompress)

    sub = commands.add_parser("tokens", parents=[common, model, rate],
                              help="audio -> codes (.npy (K, F) or .npz)")
    sub.add_argument("input", metavar="IN")
    sub.add_argument("output", metavar="OUT")
    sub.add_argument("--npz", action="store_true", help="folder mode: write .npz, not .npy")
    sub.set_defaults(func=cmd_tokens)

    sub = commands.add_parser("roundtrip", parents=[common, model, rate, out_audio],
                              help="audio -> codes -> audio, to hear the codec")
    sub.add_argument("input", metavar="IN")
    sub.add_argument("output", metavar="OUT")
    sub.set_defaults(func=cmd_roundtrip)

    from inference.generator import DEFAULT_DURATION, MAX_DURATION
    from inference.registry import DEFAULT_MODEL as DEFAULT_GENERATOR

    sub = commands.add_parser(
        "generate", parents=[common, out_audio], help="text prompt(s) -> music or sound (MusicGen, AudioGen)",
        description="Generate audio from text prompts. One prompt writes OUT; several write OUT_0, OUT_1, ... "
                    "(same extension). --stdout / --play stream one prompt while it is generated. "
                    "Defaults are MusicGen's: sampling with top-k 250, guidance 3.")
    sub.add_argument("prompts", nargs="*", metavar="PROMPT", help='text prompts ("" for no text)')
    sub.add_argument("-o", "--output", metavar="OUT", help="output .wav or .flac (optional with --stdout/--play)")
    sub.add_argument("--stdout", action="store_true",
                     help="stream raw PCM to stdout as it is generated (no header; little-endian, channels "
                          "interleaved, at the model's rate, printed on stderr; see --format); one prompt")
    sub.add_argument("--format", choices=sorted(PCM_FORMATS), default="f32",
                     help="--stdout sample format: f32 = float32 (default), s16 = signed 16-bit, clipped")
    sub.add_argument("--play", action="store_true",
                     help="play through the speakers as it is generated (needs: pip install sounddevice); one prompt")
    sub.add_argument("--chunk-frames", type=int, default=25, metavar="N",
                     help="--stdout/--play: codec frames decoded per chunk (default 25: 0.5 s at 50 Hz)")
    sub.add_argument("--fast", action=argparse.BooleanOptionalAction, default=False,
                     help="LM steps through the static-cache decoder, a CUDA graph on CUDA (default: off)")
    sub.add_argument("--model", default=DEFAULT_GENERATOR,
                     help=f"generator folder (tokenwave, transformers or audiocraft files) or name in "
                          f"$TOKENWAVE_MODELS; default {DEFAULT_GENERATOR}")
    sub.add_argument("--duration", type=float, default=DEFAULT_DURATION,
                     help=f"seconds per output, an audio prompt included (default {DEFAULT_DURATION:g}, at most "
                          f"{MAX_DURATION:g} = 1 hour); beyond the model's window (its own: 10 s for "
                          f"{DEFAULT_GENERATOR}, 30 s for MusicGen) by sliding window")
    sub.add_argument("--seed", type=int, help="random seed, a whole number (batch i uses seed + index of its "
                                              "first prompt)")
    sub.add_argument("--top-k", type=int, default=250, help="sample among the k most likely codes (default 250)")
    sub.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling; > 0 replaces top-k (default 0)")
    sub.add_argument("--temperature", type=float, default=1.0,
                     help="sampling temperature, > 0 (default 1); for argmax decoding use --greedy")
    sub.add_argument("--cfg-coef", type=float, default=3.0, help="classifier-free guidance (default 3; 1 = off)")
    sub.add_argument("--two-step-cfg", action="store_true", help="guidance as two passes, not one batch")
    sub.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    sub.add_argument("--extend-stride", type=float, metavar="SECONDS",
                     help="sliding-window step beyond the window, > 0 and below the window (default: the "
                          "model's, 18 s for MusicGen)")
    sub.add_argument("--prompts-file", metavar="FILE", help="more prompts, one per line (blank lines skipped)")
    sub.add_argument("--continue", dest="continue_from", metavar="AUDIO",
                     help="continue this audio: the output starts with it")
    sub.add_argument("--melody", metavar="AUDIO", help="melody to follow (melody models)")
    sub.add_argument("--dtype", default="float32",
                     choices=("float32", "bfloat16", "float16", "bf16-weights", "int8", "int4", "int4-g64",
                              "int4-g128"),
                     help="LM weights' type (default float32); bf16-weights keeps float32 "
                          "activations with bfloat16 matrix weights: ~2x faster steps on CPUs "
                          "with bf16 instructions; int8 / int4 (groups of 32; int4-g64, int4-g128: larger) "
                          "quantize the LM's matrices at load time (see README: CPU quantization)")
    sub.add_argument("--t5-path", metavar="FOLDER", help="T5 folder for audiocraft checkpoints that name one")
    sub.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    sub.set_defaults(func=cmd_generate)
    from inference.cli_codec_train import register as register_train_codec
    register_train_codec(commands)
    from inference.cli_train import register as register_training  # prepare, finetune
    register_training(commands)
    from inference.cli_demo import register as register_demo  # demo
    register_demo(commands)
    from inference.cli_hub import register as register_hub  # download, models
    register_hub(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help or a usage error (argparse printed it)
        return int(exit_.code or 0)
    try:
        with terminate_as_interrupt(), one_line_warnings():
            return args.func(args)
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM: the with blocks cleaned up
        terminated = isinstance(interrupt, Terminated)
        print(f"tokenwave: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + signal.SIGTERM if terminated else 130
    except Exception as error:  # one line for users; the traceback on request
        if args.verbose:
            traceback.print_exc()
        print(f"tokenwave: error: {_one_line(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
