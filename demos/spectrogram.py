"""The demo's picture of a clip: a log-mel spectrogram as an RGB image, with numpy only.

:func:`spectrogram_image` maps mono audio ``(T,)`` to ``(height, width, 3)`` uint8, low
frequencies at the bottom, in the magma colour map over 80 dB below the loudest bin.
"""
from __future__ import annotations

import numpy as np

# magma's colours at six evenly spaced levels (quiet -> loud), interpolated in between
_MAGMA = np.array([(0, 0, 4), (59, 15, 112), (140, 41, 129), (222, 73, 104), (254, 159, 109),
                   (252, 253, 191)], dtype=np.float64)
N_MELS = 80
DYNAMIC_RANGE_DB = 80.0


def mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular filters on the HTK mel scale from 30 Hz to Nyquist, ``(n_mels, n_fft // 2 + 1)``."""
    def to_mel(hz):
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    mels = np.linspace(to_mel(30.0), to_mel(sample_rate / 2), n_mels + 2)
    edges = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    bins = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / (center - lower)
    falling = (upper - bins) / (upper - center)
    return np.maximum(0.0, np.minimum(rising, falling))


def spectrogram_image(wav: np.ndarray, sample_rate: int, *, width: int = 768,
                      height: int = 160) -> np.ndarray:
    """A log-mel spectrogram of mono audio ``(T,)`` as an RGB image ``(height, width, 3)`` uint8,
    low frequencies at the bottom, 80 dB of range below the loudest bin."""
    n_fft = 2048 if sample_rate > 24_000 else 1024
    hop = n_fft // 4
    signal = np.asarray(wav, dtype=np.float32).reshape(-1)
    if signal.size < n_fft:
        signal = np.pad(signal, (0, n_fft - signal.size))
    window = np.hanning(n_fft).astype(np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(signal, n_fft)[::hop] * window
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    mel = power @ mel_filters(sample_rate, n_fft, N_MELS).T  # (frames, N_MELS)
    db = 10.0 * np.log10(np.maximum(mel, 1e-12))
    level = np.clip((db - db.max()) / DYNAMIC_RANGE_DB + 1.0, 0.0, 1.0)
    columns = np.linspace(0, level.shape[0] - 1, width).round().astype(int)
    rows = np.linspace(level.shape[1] - 1, 0, height).round().astype(int)
    image = level[columns][:, rows].T  # (height, width), high frequencies first
    anchors = np.linspace(0.0, 1.0, len(_MAGMA))
    rgb = np.stack([np.interp(image, anchors, _MAGMA[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


__all__ = ["mel_filters", "spectrogram_image"]
