"""Generators, one-call generate(), model registry and checkpoint loaders."""
from .api import generate, generate_stream, load
from .generator import (
    AUDIOGEN_CONFIG,
    DEFAULT_DURATION,
    MUSICGEN_CONFIG,
    AudioGen,
    GeneratedAudio,
    GeneratedAudioTokens,
    GeneratorConfig,
    LMConditions,
    MusicGen,
)
from .pretrained import detect_format, load_generator, save_generator

__all__ = [
    "AUDIOGEN_CONFIG", "AudioGen", "DEFAULT_DURATION", "GeneratedAudio", "GeneratedAudioTokens",
    "GeneratorConfig", "LMConditions", "MUSICGEN_CONFIG", "MusicGen", "detect_format", "generate", "generate_stream", "load",
    "load_generator", "save_generator",
]
