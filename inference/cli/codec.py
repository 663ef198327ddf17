"""``tokenwave compress``, ``decompress``, ``tokens`` and ``roundtrip``: the codec commands.

Models: ``--model`` takes a name (looked up in ``$TOKENWAVE_MODELS``, see
:mod:`codec.registry`), a checkpoint path in any format :mod:`codec.formats` reads, a
generator's name or folder (its codec: ``--model tokenwave-small`` is the shipped one), or
``random:<preset>`` (e.g. ``random:encodec_24khz``): an untrained model with fixed-seed random
weights that needs no download, named ``random_<preset>`` in messages and .ecdc headers (so
``decompress`` rebuilds it); see :func:`codec.pretrained.load_codec`. It runs the whole pipeline
but does not reproduce the audio. Inputs longer than ``STREAM_ABOVE_SECONDS`` are read, coded
and written block by block (:mod:`codec.streaming`), in memory bounded by ``--block-seconds``;
the results equal the whole-file ones (codes and .ecdc bytes exactly, audio to float rounding).

``tokens`` writes ``.npy`` (codes ``(K, F)``, int16 when the codebook size allows) for models
that encode whole files. Models that encode in segments with a scale each (encodec_48khz)
need ``.npz``: ``codes`` ``(K, sum F_i)`` (the segments' codes concatenated along frames),
``chunk_frames`` ``(S,)``, ``scales`` ``(S,)`` float32, and ``model``, ``sample_rate``,
``num_samples``, ``frame_rate``, ``segment_length``, ``segment_stride``. ``.npz`` works for
every model and keeps what decoding needs.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from codec import audio
from codec.model import EncodecModel, EncodedFrame
from codec.pretrained import entropy_lm_for, load_codec, model_label

from .common import (CliError, Job, audio_output_options, check_audio_output_options,
                     check_audio_target, common_options, one_line, parse_device, plan_jobs,
                     run_jobs, speed, write_output_audio)

DEFAULT_MODEL = "encodec_24khz"
# Inputs longer than this are processed block by block (bounded memory, no normalization).
STREAM_ABOVE_SECONDS = 60.0
BLOCK_SECONDS = 5.0
# --block-seconds bounds: shorter blocks cost a Python round per few samples, longer ones
# hold minutes of audio in memory, which is what the blocks are for avoiding.
BLOCK_SECONDS_RANGE = (0.1, 600.0)


def check_codec_options(args) -> None:
    """Refuse numbers no one means (inf, nan, 0, negative) before anything runs, naming the
    option; argparse only checks that they parse. ``--bandwidth`` and ``--codebooks`` are the
    model's to check (:func:`resolve_codebooks`)."""
    def fail(option: str, wants: str, value) -> None:
        raise CliError(f"{option} must be {wants}, got {value}")

    block = getattr(args, "block_seconds", None)
    low, high = BLOCK_SECONDS_RANGE
    if block is not None and not low <= block <= high:  # nan fails too
        fail("--block-seconds", f"between {low:g} and {high:g} seconds", block)
    check_audio_output_options(args)
    limit = getattr(args, "max_duration", None)
    if limit is not None and not limit > 0:
        fail("--max-duration", "a positive number of seconds (inf for no limit)", limit)


def max_duration(args) -> float | None:
    """``--max-duration`` as .ecdc's ``max_duration``: inf means no limit (None)."""
    return None if math.isinf(args.max_duration) else args.max_duration


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
    """``--bandwidth``/``--codebooks`` -> a codebook count. The model checks the value (the one
    check on the way to the quantizer); its error is reported under the option's name."""
    try:
        return model.resolve_codebooks(args.codebooks, args.bandwidth)
    except ValueError as error:
        option = "--bandwidth" if args.bandwidth is not None else "--codebooks"
        raise CliError(f"{option}: {one_line(error)}") from None


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




# -- arguments ----------------------------------------------------------------------------------
def add_max_duration(parser: argparse.ArgumentParser, what: str) -> None:
    from codec.ecdc import DEFAULT_MAX_DURATION_S

    parser.add_argument("--max-duration", type=float, default=DEFAULT_MAX_DURATION_S,
                        metavar="SECONDS", help=f"{what}; default {DEFAULT_MAX_DURATION_S:g} s "
                                                "(4 h), inf for no limit")


def _model_and_rate_options() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """``--model``, and ``--bandwidth`` | ``--codebooks`` with ``--block-seconds``: parent
    parsers of the commands that encode."""
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
    return model, rate


def register(commands) -> None:
    """Add ``compress``, ``decompress``, ``tokens`` and ``roundtrip`` to the sub-commands."""
    common, out_audio = common_options(), audio_output_options()
    model, rate = _model_and_rate_options()

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
