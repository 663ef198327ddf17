"""Sample-rate and channel conversion of ``(..., C, T)`` audio tensors.

Resampling is soxr's (high quality, deterministic: the same input gives the same output, whole
or block by block, see :func:`codec.audio.iter_audio_blocks`); channels convert only by mixdown
to mono (mean) and mono to stereo (copy).
"""
from __future__ import annotations

import numpy as np
import soxr
import torch


def check_rate(name: str, rate: int) -> int:
    """``rate`` as an int; ValueError naming ``name`` unless it is a positive whole number of Hz."""
    if int(rate) != rate or rate <= 0:
        raise ValueError(f"{name} must be a positive integer number of Hz, got {rate}")
    return int(rate)


def resample(wav: torch.Tensor, sr_in: int, sr_out: int, *, quality: str = "HQ") -> torch.Tensor:
    """Resample ``(..., T)`` audio to ``(..., round(T * sr_out / sr_in))`` with soxr.

    soxr's ``HQ`` (20-bit precision, linear phase) by default. Same rates return ``wav`` as is.
    """
    sr_in, sr_out = check_rate("sr_in", sr_in), check_rate("sr_out", sr_out)
    if sr_in == sr_out:
        return wav
    if wav.dim() == 0:
        raise ValueError("expected audio shaped (..., T), got a scalar")
    lead, length = wav.shape[:-1], wav.shape[-1]
    dtype = torch.float64 if wav.dtype == torch.float64 else torch.float32
    # soxr wants (T, channels); every leading index becomes one channel.
    flat = wav.detach().to("cpu", dtype).reshape(-1, length).T.numpy()
    out = soxr.resample(np.ascontiguousarray(flat), sr_in, sr_out, quality=quality)
    out = torch.from_numpy(np.ascontiguousarray(out.T)).reshape(*lead, -1)
    return out.to(wav.device)


def convert_channels(wav: torch.Tensor, channels: int) -> torch.Tensor:
    """``(..., C, T) -> (..., channels, T)``: mixdown to mono by mean, mono to stereo by copy."""
    if wav.dim() < 2:
        raise ValueError(f"expected audio shaped (..., C, T), got {tuple(wav.shape)}")
    have = wav.shape[-2]
    if have == channels:
        return wav
    if channels == 1:
        return wav.mean(dim=-2, keepdim=True)
    if have == 1 and channels == 2:
        return wav.expand(*wav.shape[:-2], 2, wav.shape[-1]).contiguous()
    raise ValueError(f"cannot convert {have} channel(s) to {channels}: only mixdown to mono "
                     f"and mono to stereo are supported")


def convert_audio(wav: torch.Tensor, sr: int, target_sr: int,
                  target_channels: int) -> torch.Tensor:
    """``(..., C, T)`` at ``sr`` -> ``(..., target_channels, T')`` at ``target_sr``."""
    if target_channels < wav.shape[-2]:  # mix down first: less to resample
        return resample(convert_channels(wav, target_channels), sr, target_sr)
    return convert_channels(resample(wav, sr, target_sr), target_channels)
