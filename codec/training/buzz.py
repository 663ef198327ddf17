"""Frame-rate buzz: energy a codec adds at multiples of its frame rate.

A decoder that upsamples latent frames with strided transposed convolutions can leave a
periodic pattern at the frame rate, heard as a buzz and seen as horizontal lines at every
multiple of it (50, 100, 150 Hz ... for a 50 Hz codec) across a spectrogram. The measure:
the long-term (Welch) power spectrum at 1 Hz resolution; at each multiple ``k * rate`` the
peak power within one bin against the median power of the neighbouring bins (3 to 20 Hz
away on each side), in dB: the *prominence* of that line. Music can have partials there too,
so a codec is scored by how much more prominent the lines are in its output than in its
input (``buzz_db``: the mean over multiples up to ``max_hz``; 0 for a transparent codec,
positive for a buzz, a few tenths of a dB either way is noise).
"""
from __future__ import annotations

import torch

NEIGHBOUR_HZ = (3.0, 20.0)


def _welch_power(wav: torch.Tensor, sample_rate: int, resolution_hz: float) -> torch.Tensor:
    """Mean power spectrum (bins ``resolution_hz`` apart) of mono ``(T,)`` audio, Hann frames, 50 % overlap."""
    n = round(sample_rate / resolution_hz)
    if wav.shape[-1] < n:
        wav = torch.nn.functional.pad(wav, (0, n - wav.shape[-1]))
    window = torch.hann_window(n, dtype=torch.float64)
    spec = torch.stft(wav.double(), n_fft=n, hop_length=n // 2, window=window, center=False, return_complex=True)
    return spec.abs().pow(2).mean(-1)


def line_prominence(wav: torch.Tensor, sample_rate: int, rate_hz: float, *, max_hz: float = 8000.0,
                    resolution_hz: float = 1.0) -> torch.Tensor:
    """Prominence (dB) of the spectral lines at ``rate_hz, 2 rate_hz, ...`` up to ``max_hz`` (and
    below the Nyquist frequency less the neighbourhood) of ``(T,)`` or ``(C, T)`` audio (channels
    averaged)."""
    if wav.dim() == 2:
        wav = wav.mean(0)
    if wav.dim() != 1:
        raise ValueError(f"expected audio shaped (T,) or (C, T), got {tuple(wav.shape)}")
    if not rate_hz > 0:
        raise ValueError(f"rate_hz must be positive, got {rate_hz}")
    power = _welch_power(wav.float(), sample_rate, resolution_hz) + 1e-20
    top = min(max_hz, sample_rate / 2 - NEIGHBOUR_HZ[1] - resolution_hz)
    count = int(top // rate_hz)
    if count < 1:
        raise ValueError(f"no multiple of {rate_hz} Hz below {top:.0f} Hz")
    near, far = (round(hz / resolution_hz) for hz in NEIGHBOUR_HZ)
    values = []
    for k in range(1, count + 1):
        center = round(k * rate_hz / resolution_hz)
        peak = power[center - 1: center + 2].max()
        neighbours = torch.cat([power[center - far: center - near + 1], power[center + near: center + far + 1]])
        values.append(10 * torch.log10(peak / neighbours.median()))
    return torch.stack(values).float()


def buzz_db(reference: torch.Tensor, decoded: torch.Tensor, sample_rate: int, rate_hz: float, *,
            max_hz: float = 8000.0, resolution_hz: float = 1.0) -> float:
    """Mean extra prominence (dB) of the lines at multiples of ``rate_hz`` in ``decoded`` over
    ``reference`` (both ``(T,)`` or ``(C, T)`` at ``sample_rate``; 1 Hz bins want a few seconds,
    2 Hz bins do for 1 s clips)."""
    length = min(reference.shape[-1], decoded.shape[-1])
    kwargs = dict(max_hz=max_hz, resolution_hz=resolution_hz)
    ref = line_prominence(reference[..., :length], sample_rate, rate_hz, **kwargs)
    out = line_prominence(decoded[..., :length], sample_rate, rate_hz, **kwargs)
    return float((out - ref).mean())


__all__ = ["buzz_db", "line_prominence"]
