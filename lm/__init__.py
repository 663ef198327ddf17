"""MusicGen-style language model over codec tokens: patterns, transformer, sampling, LMModel."""
from .model import PRESETS, DecodingState, LMConfig, LMModel, get_preset
from .patterns import (
    CoarseFirstPatternProvider,
    DelayPatternProvider,
    ParallelPatternProvider,
    Pattern,
    PatternProvider,
    UnrolledPatternProvider,
    make_pattern_provider,
    stereo_delays,
)
from .sampling import classifier_free_guidance, guide_batched, sample_next_token

__all__ = [
    "PRESETS", "DecodingState", "LMConfig", "LMModel", "get_preset",
    "CoarseFirstPatternProvider", "DelayPatternProvider", "ParallelPatternProvider", "Pattern",
    "PatternProvider", "UnrolledPatternProvider", "make_pattern_provider", "stereo_delays",
    "classifier_free_guidance", "guide_batched", "sample_next_token",
]
