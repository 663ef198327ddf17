"""Generators, one-call generate(), model registry and checkpoint formats.

Layout: :mod:`.config` (GeneratorConfig, argument checks, window plan) < :mod:`.formats` (read
any checkpoint format, write ours) < :mod:`.generator` (MusicGen, AudioGen) < :mod:`.api`.
"""
from __future__ import annotations

import os
from typing import Any

from lm.sampling import SamplingConfig

from .api import generate, generate_stream, load
from .config import AUDIOGEN_CONFIG, DEFAULT_DURATION, MUSICGEN_CONFIG, GeneratorConfig
from .formats import detect_format, save_generator
from .generator import AudioGen, GeneratedAudio, GeneratedAudioTokens, LMConditions, MusicGen
from .registry import DEFAULT_MODEL


def load_generator(path_or_name: str | os.PathLike = DEFAULT_MODEL, *, cls: type[MusicGen] = MusicGen,
                   **options: Any) -> MusicGen:
    """``cls.from_pretrained(path_or_name, **options)``: a generator from a folder in any format
    or a model name (see :meth:`MusicGen.from_pretrained` for the options)."""
    return cls.from_pretrained(path_or_name, **options)


__all__ = [
    "AUDIOGEN_CONFIG", "AudioGen", "DEFAULT_DURATION", "GeneratedAudio", "GeneratedAudioTokens",
    "GeneratorConfig", "LMConditions", "MUSICGEN_CONFIG", "MusicGen", "SamplingConfig", "detect_format",
    "generate", "generate_stream", "load", "load_generator", "save_generator",
]
