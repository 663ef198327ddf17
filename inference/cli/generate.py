"""``tokenwave generate``: text prompts (and optionally audio to continue or a melody) -> audio.

One prompt writes ``OUT``; several write ``OUT_0``, ``OUT_1``, ... ``--stdout`` streams one
prompt as raw PCM while it is generated: no header, little-endian, channels interleaved, at the
model's sample rate (printed on stderr); ``--format f32`` (float32, the default) or ``s16``
(16-bit, clipped to [-1, 1]). For example
``tokenwave generate "lofi beat" --stdout --format s16 | aplay -f S16_LE -r 32000 -c 1``.
``--play`` plays it through the optional ``sounddevice`` package.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from codec import audio
from lm.sampling import SamplingConfig

from .common import (CliError, audio_output_options, check_audio_output_options, check_audio_target,
                     check_writable, common_options, one_line, parse_device, speed, write_output_audio)

SAMPLING_DEFAULTS = SamplingConfig()  # the option defaults below read these fields
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
                       f"PortAudio library, e.g. apt-get install libportaudio2); {one_line(error)}") from None
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


def stream_generation(generator, prompt: str, args, options: dict, target: Path | None,
                      sounddevice=None) -> None:
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

    check_audio_output_options(args)  # --target-lufs
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.chunk_frames < 1:
        raise CliError(f"--chunk-frames must be at least 1, got {args.chunk_frames}")
    check_generation(duration=args.duration, seed=args.seed, extend_stride=args.extend_stride,
                     use_sampling=not args.greedy, temperature=args.temperature, top_k=args.top_k,
                     top_p=args.top_p, **_guidance(args))


def _guidance(args) -> dict:
    """``cfg_coef`` when given (else the model's own, :attr:`MusicGen.default_sampling`)."""
    return {} if args.cfg_coef is None else {"cfg_coef": args.cfg_coef}


@option_errors
def cmd_generate(args) -> int:
    """Prompts -> audio files with a MusicGen/AudioGen generator (``out.wav``, or
    ``out_0.wav``, ``out_1.wav``, ... for several prompts), or one prompt streamed to stdout
    (``--stdout``, raw PCM) and/or the speakers (``--play``) as it is generated."""
    streaming = args.stdout or args.play
    if args.output is None and not streaming:
        raise CliError("give an output file (-o OUT), or stream with --stdout or --play")
    prompts = _prompts(args)
    if streaming and len(prompts) != 1:
        raise CliError(f"--stdout and --play stream one prompt; got {len(prompts)}")
    check_generate_options(args)
    sounddevice = import_sounddevice() if args.play else None
    targets = _targets(args, len(prompts))
    generator = _load_generator(args)
    conditioning = _conditioning(args)
    if targets:
        targets[0].parent.mkdir(parents=True, exist_ok=True)
    options = dict(top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, **_guidance(args),
                   two_step_cfg=args.two_step_cfg, use_sampling=not args.greedy,
                   progress=not args.quiet, extend_stride=args.extend_stride, fast=args.fast)
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
                print(f"generate {prompt!r} -> {target}: {args.model}, {seconds:.2f} s at "
                      f"{out.sample_rate} Hz, batch of {len(batch)} in {elapsed:.1f} s "
                      f"({speed(seconds * len(batch), elapsed)})")
    return 0


def _prompts(args) -> list[str]:
    """The prompts given and those of ``--prompts-file``; one empty prompt when only audio is."""
    from inference.api import read_prompts_file

    prompts = list(args.prompts) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        if args.continue_from is None and args.melody is None:
            raise CliError('give at least one prompt or --prompts-file ("" generates without text)')
        prompts = [""]
    return prompts


def _targets(args, count: int) -> list[Path]:
    """The output files for ``count`` prompts, checked before any model loads."""
    from inference.api import output_paths

    targets = output_paths(args.output, count) if args.output is not None else []
    for target in targets:
        check_audio_target(target)
    existing = [t for t in targets if t.exists()]
    if existing and not args.force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise CliError(f"output exists: {existing[0]}{more}; use --force to overwrite")
    check_writable(targets)  # before loading models, not after generating
    return targets


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load_generator(args):
    """The generator of ``--model`` with the ``--dtype`` asked for. ``bf16-weights``: float32
    compute with bfloat16 matrix weights (CPU speed); the int kinds go to the loader as named."""
    from inference.generator import MusicGen

    dtype = torch.float32 if args.dtype == "bf16-weights" else _DTYPES.get(args.dtype, args.dtype)
    generator = MusicGen.from_pretrained(args.model, device=parse_device(args.device), dtype=dtype,
                                         t5_path=args.t5_path)
    if args.dtype == "bf16-weights":
        generator.lm.low_precision_weights(torch.bfloat16)
    return generator


def _conditioning(args) -> dict[str, tuple[torch.Tensor, int]]:
    """``--continue`` and ``--melody`` audio ``(C, T)`` with their sample rates, by keyword."""
    conditioning = {}
    for key, path in (("audio_prompt", args.continue_from), ("melody", args.melody)):
        if path is not None:
            wav, sr = audio.read_audio(path)
            if wav.shape[-1] == 0:
                raise CliError(f"{path} holds no audio (0 samples)")
            conditioning[key] = (wav, sr)
    return conditioning


# -- arguments ----------------------------------------------------------------------------------
def register(commands) -> None:
    """Add ``generate`` to the ``tokenwave`` sub-commands."""
    common, out_audio = common_options(), audio_output_options()
    from inference.generator import DEFAULT_DURATION, MAX_DURATION
    from inference.registry import DEFAULT_MODEL as DEFAULT_GENERATOR

    sub = commands.add_parser(
        "generate", parents=[common, out_audio], help="text prompt(s) -> music or sound (MusicGen, AudioGen)",
        description="Generate audio from text prompts. One prompt writes OUT; several write OUT_0, "
                    "OUT_1, ... "
                    "(same extension). --stdout / --play stream one prompt while it is generated. "
                    f"Defaults are MusicGen's: sampling with top-k {SAMPLING_DEFAULTS.top_k}; guidance "
                    f"the model's own ({SAMPLING_DEFAULTS.cfg_coef:g} for MusicGen).")
    sub.add_argument("prompts", nargs="*", metavar="PROMPT", help='text prompts ("" for no text)')
    sub.add_argument("-o", "--output", metavar="OUT",
                     help="output .wav or .flac (optional with --stdout/--play)")
    sub.add_argument("--stdout", action="store_true",
                     help="stream raw PCM to stdout as it is generated (no header; little-endian, channels "
                          "interleaved, at the model's rate, printed on stderr; see --format); one prompt")
    sub.add_argument("--format", choices=sorted(PCM_FORMATS), default="f32",
                     help="--stdout sample format: f32 = float32 (default), s16 = signed 16-bit, clipped")
    sub.add_argument("--play", action="store_true",
                     help="play through the speakers as it is generated (needs: pip install "
                          "sounddevice); one prompt")
    sub.add_argument("--chunk-frames", type=int, default=25, metavar="N",
                     help="--stdout/--play: codec frames decoded per chunk (default 25: 0.5 s at 50 Hz)")
    sub.add_argument("--fast", action=argparse.BooleanOptionalAction, default=False,
                     help="LM steps through the static-cache decoder, a CUDA graph on CUDA (default: off)")
    sub.add_argument("--model", default=DEFAULT_GENERATOR,
                     help=f"generator folder (tokenwave, transformers or audiocraft files) or name in "
                          f"$TOKENWAVE_MODELS; default {DEFAULT_GENERATOR}")
    sub.add_argument("--duration", type=float, default=DEFAULT_DURATION,
                     help=f"seconds per output, an audio prompt included (default {DEFAULT_DURATION:g}, "
                          f"at most {MAX_DURATION:g} = 1 hour); beyond the model's window (its own: 10 s for "
                          f"{DEFAULT_GENERATOR}, 30 s for MusicGen) by sliding window")
    sub.add_argument("--seed", type=int, help="random seed, a whole number (batch i uses seed + index of its "
                                              "first prompt)")
    d = SAMPLING_DEFAULTS
    sub.add_argument("--top-k", type=int, default=d.top_k,
                     help=f"sample among the k most likely codes (default {d.top_k}; 0 = off)")
    sub.add_argument("--top-p", type=float, default=d.top_p,
                     help=f"nucleus sampling; > 0 replaces top-k (default {d.top_p:g})")
    sub.add_argument("--temperature", type=float, default=d.temperature,
                     help=f"sampling temperature, > 0 (default {d.temperature:g}); "
                          "for argmax decoding use --greedy")
    sub.add_argument("--cfg-coef", type=float, default=None,
                     help=f"classifier-free guidance (default: the model's, {d.cfg_coef:g} for MusicGen; 1 = off)")
    sub.add_argument("--two-step-cfg", action="store_true", default=d.two_step_cfg,
                     help="guidance as two passes, not one batch")
    sub.add_argument("--greedy", action="store_true", default=not d.use_sampling,
                     help="argmax decoding instead of sampling")
    sub.add_argument("--extend-stride", type=float, metavar="SECONDS",
                     help="sliding-window step beyond the window, > 0 and below the window (default: the "
                          "model's, 18 s for MusicGen)")
    sub.add_argument("--prompts-file", metavar="FILE",
                     help="more prompts, one per line (blank lines skipped)")
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
