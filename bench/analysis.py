"""Audio as the quality and adherence measures read it: mono at 16 kHz, and its log-mel energies.

The analysis rate is enough bandwidth for timbre, onsets and pitch, at half the cost of 32 kHz.
"""
from __future__ import annotations

from pathlib import Path

import torch

from codec import audio as audio_io
from codec.training.losses import MelSpectrogram

ANALYSIS_RATE = 16_000
HOP = 160  # 100 frames per second: 1 % tempo resolution near 100 bpm before interpolation
FRAME_RATE = ANALYSIS_RATE / HOP
NUM_MELS = 64


def load_mono(path: str | Path) -> torch.Tensor:
    """A file as mono float32 ``(T,)`` at :data:`ANALYSIS_RATE`."""
    wav, rate = audio_io.read_audio(path)
    return as_analysis_audio(wav, rate)


def as_analysis_audio(wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """``(C, T)`` or ``(T,)`` audio at ``sample_rate`` -> mono ``(T',)`` at :data:`ANALYSIS_RATE`."""
    wav = wav.float()
    if wav.dim() == 2:
        wav = wav.mean(0)
    if wav.dim() != 1:
        raise ValueError(f"expected audio shaped (C, T) or (T,), got {tuple(wav.shape)}")
    return audio_io.resample(wav, sample_rate, ANALYSIS_RATE)



_MEL = MelSpectrogram(sample_rate=ANALYSIS_RATE, n_fft=1024, hop_length=HOP, num_mels=NUM_MELS)


def log_mel(wav: torch.Tensor) -> torch.Tensor:
    """Mono ``(T,)`` at :data:`ANALYSIS_RATE` -> log10 mel energies ``(NUM_MELS, frames)``."""
    with torch.no_grad():
        return torch.log10(1e-6 + _MEL(wav.reshape(1, 1, -1))[0, 0])
