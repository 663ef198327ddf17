"""One call from prompts to audio: ``generate(prompts, duration=...)``.

    from inference import generate
    wav, sample_rate = generate("calm piano melody at night", duration=10, seed=0)

    from inference.api import generate_stream
    for chunk in generate_stream("calm piano melody at night", duration=30, seed=0):
        ...  # (B, C, n) float32 audio, while the model is still generating

The model (default ``tokenwave-small``, shipped in ``assets/models``; other names are looked up
in ``$TOKENWAVE_MODELS``; see :mod:`inference.registry`) is loaded on the first call and kept for
the next ones with the same model, device and dtype. The options are
:meth:`inference.generator.MusicGen.generate`'s; the sampling ones and their defaults are
:class:`lm.sampling.SamplingConfig`'s.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from lm.sampling import SAMPLING_OPTIONS

from .config import DEFAULT_DURATION, check_generation
from .generator import GeneratedAudio, GeneratedAudioTokens, MusicGen
from .registry import DEFAULT_MODEL

_CACHE: dict[tuple, MusicGen] = {}


def _check_first(duration: float, options: dict) -> dict:
    """Bad arguments fail before the model is loaded; all options are passed on as they are (the
    sampling options the caller left out take the model's defaults: its guidance coefficient)."""
    sampling = {name: options[name] for name in SAMPLING_OPTIONS if name in options}
    check_generation(duration=duration, seed=options.get("seed"), extend_stride=options.get("extend_stride"),
                     sampling=options.get("sampling"), **sampling)
    return options


def load(model: str | os.PathLike | MusicGen = DEFAULT_MODEL, *, device: str | torch.device | None = None,
         dtype: torch.dtype | str | None = None, t5_path: str | os.PathLike | None = None) -> MusicGen:
    """A generator for ``model`` (a loaded generator, a folder or a name), cached by arguments.

    One generator is kept at a time: loading another frees the previous one.
    """
    if isinstance(model, MusicGen):
        return model
    key = (os.fspath(model), None if device is None else str(torch.device(device)), dtype,
           None if t5_path is None else os.fspath(t5_path))
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = MusicGen.from_pretrained(model, device=device, dtype=dtype, t5_path=t5_path)
    return _CACHE[key]


def generate(prompts, duration: float = DEFAULT_DURATION, *,
             model: str | os.PathLike | MusicGen = DEFAULT_MODEL, device: str | torch.device | None = None,
             dtype: torch.dtype | str | None = None, t5_path: str | os.PathLike | None = None,
             **options) -> GeneratedAudio | GeneratedAudioTokens:
    """Generate ``duration`` seconds per prompt; returns ``(wav (B, C, T), sample_rate)``.

    ``prompts``: one string (one prompt), a list (a batch), ``None``/``""`` entries for
    unconditional generation. ``options`` are :meth:`MusicGen.generate`'s: ``sampling=`` (a
    :class:`~lm.sampling.SamplingConfig`) and/or its fields (``top_k``, ``top_p``, ``temperature``,
    ``cfg_coef``, ``two_step_cfg``, ``use_sampling``), ``seed=None``, ``progress=False`` (True: a
    tqdm bar; or a ``callback(step, total)``), ``return_tokens=False`` (then ``(wav, sample_rate, tokens)``),
    ``audio_prompt=(wav, sample_rate)`` (continuation), ``melody=(wavs, sample_rate)``,
    ``extend_stride=None`` (the model's: 18 s for MusicGen). ``dtype``: a torch dtype, or
    ``"int8"`` / ``"int4"`` for a weight-quantized LM (faster on CPUs; :mod:`lm.quant`).
    A bad argument (a duration outside (0, 1 hour], ``temperature <= 0`` while sampling, ...)
    raises ValueError before the model loads.
    """
    options = _check_first(duration, options)
    generator = load(model, device=device, dtype=dtype, t5_path=t5_path)
    return generator.generate(prompts, duration, **options)


def generate_stream(prompts, duration: float = DEFAULT_DURATION, *,
                    model: str | os.PathLike | MusicGen = DEFAULT_MODEL,
                    device: str | torch.device | None = None,
                    dtype: torch.dtype | str | None = None, t5_path: str | os.PathLike | None = None,
                    **options) -> Iterator[torch.Tensor]:
    """:func:`generate` as a stream: audio ``(B, C, n)`` float32 pieces while the LM runs.

    ``options`` are :meth:`MusicGen.generate_stream`'s: :func:`generate`'s (but
    ``return_tokens``) plus ``first_chunk_frames=10`` and ``chunk_frames=25``. The pieces,
    concatenated, are :func:`generate`'s waveform for the same seed (to float rounding).
    """
    options = _check_first(duration, options)
    generator = load(model, device=device, dtype=dtype, t5_path=t5_path)
    return generator.generate_stream(prompts, duration, **options)


def output_paths(output: str | os.PathLike, count: int) -> list[Path]:
    """Where ``count`` generated files go: ``out.wav`` for one, ``out_0.wav``, ``out_1.wav``, ... for more."""
    output = Path(output)
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(count)]


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """One prompt per line (UTF-8); surrounding whitespace is stripped and blank lines skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read prompts file {path}: {error}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompt (one per line expected)")
    return prompts


__all__ = ["generate", "generate_stream", "load", "output_paths", "read_prompts_file"]
