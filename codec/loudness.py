"""Level normalization of ``(C, T)`` audio: peak (dBFS) or integrated loudness (LUFS, ITU-R
BS.1770-4 through the optional ``pyloudnorm``), never clipping: a loudness target that would push
the peak past its ceiling is lowered, with a warning.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

NORMALIZE_MODES = ("peak", "loudness")
# Loudness gating blocks are 400 ms (ITU-R BS.1770): shorter audio has no defined loudness.
_LOUDNESS_BLOCK_SECONDS = 0.4


def _db_to_gain(db: float) -> float:
    return 10.0 ** (db / 20.0)


def peak_normalize(wav: torch.Tensor, peak_db: float = -1.0) -> torch.Tensor:
    """Scale so the largest absolute sample is ``peak_db`` dBFS; silence is returned as is."""
    if peak_db > 0:
        raise ValueError(f"peak_db must be <= 0 dBFS, got {peak_db}")
    peak = float(wav.abs().max()) if wav.numel() else 0.0
    if peak == 0.0:
        return wav
    return wav * (_db_to_gain(peak_db) / peak)


def integrated_loudness(wav: torch.Tensor, sample_rate: int) -> float:
    """Integrated loudness in LUFS (ITU-R BS.1770-4: K-weighting, 400 ms gated blocks).

    ``wav`` is ``(C, T)`` with C <= 5; silence gives ``-inf``. Needs at least 0.4 s.
    """
    try:
        import pyloudnorm
    except ImportError as error:  # optional dependency: only loudness needs it
        raise ImportError("loudness measurement needs the 'pyloudnorm' package: "
                          "pip install pyloudnorm") from error
    if wav.dim() != 2:
        raise ValueError(f"expected audio shaped (C, T), got {tuple(wav.shape)}")
    if wav.shape[-1] < _LOUDNESS_BLOCK_SECONDS * sample_rate:
        raise ValueError(f"loudness needs at least {_LOUDNESS_BLOCK_SECONDS} s of audio, got "
                         f"{wav.shape[-1] / sample_rate:.3f} s; use peak normalization instead")
    data = wav.detach().to("cpu", torch.float64).T.numpy()
    if not np.any(data):
        return -math.inf
    return float(pyloudnorm.Meter(sample_rate).integrated_loudness(data))


def loudness_normalize(wav: torch.Tensor, sample_rate: int, target_lufs: float = -14.0,
                       peak_db: float = -1.0) -> torch.Tensor:
    """Scale ``(C, T)`` audio to ``target_lufs``, but never past a ``peak_db`` dBFS peak.

    When reaching the target would push the peak above ``peak_db`` the gain is lowered to fit
    and a warning says so: the output is quieter than asked rather than clipped.
    """
    loudness = integrated_loudness(wav, sample_rate)
    if not math.isfinite(loudness):  # silence (or below the -70 LUFS gate): nothing to scale
        return wav
    gain = _db_to_gain(target_lufs - loudness)
    peak = float(wav.abs().max())
    ceiling = _db_to_gain(peak_db)
    if peak * gain > ceiling:
        gain = ceiling / peak
        reached = loudness + 20 * math.log10(gain)
        warnings.warn(f"loudness normalization to {target_lufs:g} LUFS would clip; limited to a "
                      f"{peak_db:g} dBFS peak, giving {reached:.1f} LUFS", stacklevel=2)
    return wav * gain


def normalize_audio(wav: torch.Tensor, sample_rate: int, mode: str | None, *,
                    peak_db: float = -1.0, target_lufs: float = -14.0) -> torch.Tensor:
    """Apply ``mode`` ('peak', 'loudness' or None) to ``(C, T)`` audio."""
    if mode is None:
        return wav
    if mode == "peak":
        return peak_normalize(wav, peak_db)
    if mode == "loudness":
        return loudness_normalize(wav, sample_rate, target_lufs, peak_db)
    raise ValueError(f"normalize must be one of {NORMALIZE_MODES} or None, got {mode!r}")
