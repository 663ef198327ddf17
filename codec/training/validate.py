"""Validation metrics of the codec trainers: reconstruction quality per bitrate, ViSQOL, and the
entropy LM's bits per code.

Every metric is computed on fixed validation clips in eval mode (no codebook updates), so its
values along a run are comparable; names carry the bitrate (``valid_si_snr@1.5kbps``) or the
number of codebooks (``valid_bits_per_code@4``).
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .. import audio
from ..resample import convert_audio
from .buzz import buzz_db
from .losses import MelDistance, MultiScaleMelLoss, l1_time_loss, si_snr

Reconstruct = Callable[[torch.Tensor, int], torch.Tensor]


def visqol_score(reference: torch.Tensor, degraded: torch.Tensor, sample_rate: int
                 ) -> float | None:
    """ViSQOL MOS-LQO (audio mode, 48 kHz mono) of ``(C, T)`` clips, or None when the optional
    ``visqol-python`` package is not installed or the clip is under the 1 s it needs."""
    if reference.shape[-1] < sample_rate:
        return None
    try:
        from visqol import VisqolApi
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for name, wav in (("reference.wav", reference), ("degraded.wav", degraded)):
            path = Path(folder) / name
            audio.write_audio(path, convert_audio(wav.float().cpu(), sample_rate, 48_000, 1),
                              48_000, subtype="FLOAT")
            paths.append(str(path))
        api = VisqolApi()
        api.create(mode="audio")
        return float(api.measure(*paths).moslqo)


def codec_metrics(wav: torch.Tensor, reconstruct: Reconstruct, *, choices: list[int],
                  num_codebooks: int, kbps_per_codebook: float, sample_rate: int,
                  mel_distance: MelDistance, mel_loss: MultiScaleMelLoss, visqol_clips: int,
                  frame_rate: float | None = None) -> dict[str, float]:
    """SI-SNR (dB), mel distance and (if installed) ViSQOL of ``reconstruct(wav, n)`` for each
    codebook count ``n`` in ``choices``, and the reconstruction losses at ``num_codebooks``.

    ``wav`` is ``(B, C, T)``; ``reconstruct`` returns the decoded ``(B, C, T)`` in eval mode.
    With ``frame_rate`` and clips of at least 1 s, ``valid_buzz`` is the mean frame-rate buzz
    (:func:`~codec.training.buzz.buzz_db`, 2 Hz bins) at ``num_codebooks``.
    """
    out: dict[str, float] = {}
    for n in choices:
        decoded = reconstruct(wav, n)
        kbps = n * kbps_per_codebook
        out[f"valid_si_snr@{kbps:g}kbps"] = si_snr(decoded, wav).mean().item()
        out[f"valid_mel_distance@{kbps:g}kbps"] = mel_distance(decoded, wav).mean().item()
    decoded = reconstruct(wav, num_codebooks)
    out["valid_l1"] = l1_time_loss(decoded, wav).item()
    out["valid_mel"] = mel_loss(decoded, wav).item()
    if frame_rate is not None and wav.shape[-1] >= sample_rate:
        out["valid_buzz"] = sum(buzz_db(wav[i], decoded[i], sample_rate, frame_rate, resolution_hz=2.0)
                                for i in range(wav.shape[0])) / wav.shape[0]
    scores = [visqol_score(wav[i], decoded[i], sample_rate)
              for i in range(min(visqol_clips, wav.shape[0]))]
    scores = [score for score in scores if score is not None]
    if scores:
        out["valid_visqol"] = sum(scores) / len(scores)
    return out


def entropy_metrics(codes: torch.Tensor, bits_per_code: Callable[[torch.Tensor], float], *,
                    choices: list[int], frame_rate: float) -> dict[str, float]:
    """Bits per code and the resulting kbps of codes ``(B, K, F)`` cut to each codebook count
    in ``choices`` (``bits_per_code`` scores a ``(B, n, F)`` slice)."""
    out = {}
    for n in choices:
        bits = bits_per_code(codes[:, :n])
        out[f"valid_bits_per_code@{n}"] = bits
        out[f"valid_kbps@{n}"] = bits * n * frame_rate / 1000
    return out
