"""Melody conditioning from the chroma of reference audio, as in MusicGen-melody.

Chroma: power STFT (Hann window of n_fft, hop n_fft/4, centred with reflect padding, scaled by
1/sum(window^2) as torchaudio's ``normalized=True``), folded to 12 pitch classes with librosa's
chroma filter bank (built here from its definition), max-normalized per frame, then one-hot at
the strongest pitch class. audiocraft's ChromaExtractor and transformers'
MusicgenMelodyFeatureExtractor compute the same thing.

No stem separation: audiocraft runs demucs and keeps vocals + other before the chroma; we take
the whole mix (mono mean of the channels), which is also what transformers does unless it is
handed demucs output (a 4-D tensor whose stems it sums). Drums and bass can then win the argmax
where audiocraft's would not; separate stems yourself and pass their sum to match it.

Long references: the chroma is computed over the whole audio and then cut to the training
length (audiocraft); transformers cuts the audio to 30 s first, so the last frame or two before
the cut can differ (the STFT window there sees reflect padding instead of audio).

The chroma (B, F, 12) goes through ``output_proj`` (audiocraft's
``conditioners.self_wav.output_proj``, transformers' ``audio_enc_to_dec_proj``) and is
prepended to the LM input by the fuser (``FUSER_PRESETS["chroma2music"]``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from codec.audio import check_audio_values

from .base import Condition


def chroma_filter_bank(*, sample_rate: int, n_fft: int, num_chroma: int = 12, tuning: float = 0.0,
                       center_octave: float = 5.0, octave_width: float | None = 2.0,
                       base_c: bool = True) -> torch.Tensor:
    """librosa's ``filters.chroma``: (num_chroma, n_fft // 2 + 1) weights from FFT bins to pitch classes.

    Each FFT bin gets a Gaussian bump around its (fractional) pitch class, as wide as the bin's
    spacing in chroma units (min 1); columns are L2-normalized, then weighted by a Gaussian over
    octaves centred on ``center_octave`` (octave 5 above A0 = 880 Hz, 2 octaves wide). Rows
    start at C when ``base_c`` (else at A). Computed in float64, returned as float32.
    """
    freqs = torch.arange(1, n_fft, dtype=torch.float64) * (sample_rate / n_fft)
    a440 = 440.0 * 2.0 ** (tuning / num_chroma)
    bins = num_chroma * torch.log2(freqs / (a440 / 16))  # A0 = 27.5 Hz is octave 0
    # The 0 Hz bin gets a made-up position 1.5 octaves below bin 1, and a broad width.
    bins = torch.cat([bins[:1] - 1.5 * num_chroma, bins])
    widths = torch.cat([torch.clamp(bins[1:] - bins[:-1], min=1.0), torch.ones(1, dtype=torch.float64)])
    distance = bins[None, :] - torch.arange(num_chroma, dtype=torch.float64)[:, None]
    half = float(round(num_chroma / 2))
    # Wrap to [-half, half): the offset of 10 * num_chroma keeps the remainder's argument positive.
    distance = torch.remainder(distance + half + 10 * num_chroma, num_chroma) - half
    weights = torch.exp(-0.5 * (2 * distance / widths[None, :]) ** 2)
    weights = weights / weights.pow(2).sum(dim=0, keepdim=True).sqrt()
    if octave_width is not None:
        weights = weights * torch.exp(-0.5 * ((bins / num_chroma - center_octave) / octave_width) ** 2)
    if base_c:
        weights = torch.roll(weights, -3 * (num_chroma // 12), dims=0)
    return weights[:, : n_fft // 2 + 1].float().contiguous()


class ChromaExtractor(nn.Module):
    """wav (B, T) -> chroma (B, F, num_chroma) with F = 1 + max(T, n_fft) // hop_length.

    Audio shorter than n_fft is zero-padded on both sides to n_fft first (a nulled, 1-sample
    melody thus gives silence, whose argmax chroma is one-hot at C).
    """

    def __init__(self, *, sample_rate: int = 32_000, n_fft: int = 16_384, hop_length: int | None = None,
                 num_chroma: int = 12, argmax: bool = True) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop_length = hop_length or n_fft // 4
        self.num_chroma = num_chroma
        self.argmax = argmax
        # Plain float32 tensors, not buffers: casting the model to bf16/fp16 must not round them
        # (the argmax is sensitive to it). They follow the input's device in forward().
        self.filters = chroma_filter_bank(sample_rate=sample_rate, n_fft=n_fft, num_chroma=num_chroma)
        self.window = torch.hann_window(n_fft)

    def num_frames(self, num_samples: int) -> int:
        return 1 + max(num_samples, self.n_fft) // self.hop_length

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.dim() != 2:
            raise ValueError(f"expected mono audio as (B, T), found shape {tuple(wav.shape)}")
        if self.window.device != wav.device:
            self.filters, self.window = self.filters.to(wav.device), self.window.to(wav.device)
        wav, window, filters = wav.float(), self.window, self.filters
        short = self.n_fft - wav.shape[-1]
        if short > 0:
            wav = nn.functional.pad(wav, (short // 2, short - short // 2))
        spec = torch.stft(wav, n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.n_fft,
                          window=window, center=True, pad_mode="reflect", onesided=True,
                          return_complex=True)
        power = (spec / window.pow(2).sum().sqrt()).abs().pow(2)  # (B, n_fft // 2 + 1, F)
        chroma = torch.einsum("cf,bft->btc", filters, power)
        chroma = nn.functional.normalize(chroma, p=math.inf, dim=-1, eps=1e-6)
        if self.argmax:
            chroma = nn.functional.one_hot(chroma.argmax(dim=-1), self.num_chroma).to(chroma.dtype)
        return chroma


@dataclass(frozen=True)
class ChromaConfig:
    """MusicGen-melody's chroma settings (audiocraft ``chroma_stem``: radix2_exp 14, argmax)."""

    sample_rate: int = 32_000
    num_chroma: int = 12
    n_fft: int = 16_384
    hop_length: int = 4_096
    argmax: bool = True
    duration: float = 30.0  # training window; fixes the chroma length the LM was trained on

    @property
    def chroma_length(self) -> int:
        """Frames of chroma for ``duration`` seconds: 235 for the defaults (transformers' chroma_length)."""
        return 1 + max(int(self.sample_rate * self.duration), self.n_fft) // self.hop_length


class MelodyBatch(NamedTuple):
    """wav: (B, T) mono audio, zero-padded to the longest; lengths: (B,) long, 0 for a null melody."""

    wav: torch.Tensor
    lengths: torch.Tensor


MelodyInput = torch.Tensor | Sequence[torch.Tensor | None]


class ChromaConditioner(nn.Module):
    """Reference audio -> one-hot chroma (B, F, 12) -> ``output_proj`` -> Condition (B, F', output_dim).

    ``match_length=True`` (what audiocraft's MusicGen switches on for inference, and what
    transformers does): the chroma is tiled or cut to ``config.chroma_length`` frames and every
    frame is valid, so a null melody is the projection of one-hot C on every frame.
    ``match_length=False`` (audiocraft training): the chroma keeps its length and frames past
    ``length / hop`` are masked to zero, so a null melody is all zeros.
    """

    def __init__(self, *, output_dim: int, config: ChromaConfig = ChromaConfig(),
                 match_length: bool = True) -> None:
        super().__init__()
        self.config = config
        self.match_length = match_length
        self.chroma = ChromaExtractor(sample_rate=config.sample_rate, n_fft=config.n_fft,
                                      hop_length=config.hop_length, num_chroma=config.num_chroma,
                                      argmax=config.argmax)
        self.output_proj = nn.Linear(config.num_chroma, output_dim)

    def prepare(self, melodies: MelodyInput, *, sample_rate: int | None = None) -> MelodyBatch:
        """melodies at ``config.sample_rate``: (B, C, T) / (B, T), or B items of (C, T) / (T,) / None.

        Channels are averaged to mono; items are zero-padded to the longest. Pass
        ``sample_rate`` to have it checked; resample other rates first (``codec.audio``).
        """
        if sample_rate is not None and sample_rate != self.config.sample_rate:
            raise ValueError(f"melody audio must be at {self.config.sample_rate} Hz, found {sample_rate} Hz; "
                             "resample it first")
        if isinstance(melodies, torch.Tensor):
            if melodies.dim() not in (2, 3):
                raise ValueError(f"expected melodies as (B, C, T) or (B, T), found {tuple(melodies.shape)}")
            items: list[torch.Tensor | None] = list(melodies)
        else:
            items = list(melodies)
        if not items:
            raise ValueError("expected at least one melody (or None), found none")
        monos: list[torch.Tensor | None] = []
        for i, item in enumerate(items):
            if item is None:
                monos.append(None)
            elif not isinstance(item, torch.Tensor) or item.dim() not in (1, 2) or item.shape[-1] == 0:
                found = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
                raise ValueError(f"melody {i}: expected a non-empty (C, T) or (T,) tensor or None, "
                                 f"found {found}")
            else:
                check_audio_values(item, f"melody {i}")  # NaN would give a silent argmax of C
                monos.append(item.float() if item.dim() == 1 else item.float().mean(dim=0))
        device = self.output_proj.weight.device
        length = max([m.shape[-1] for m in monos if m is not None], default=1)
        wav = torch.zeros(len(monos), length, device=device)
        lengths = torch.zeros(len(monos), dtype=torch.long, device=device)
        for i, mono in enumerate(monos):
            if mono is not None:
                wav[i, : mono.shape[-1]] = mono.to(device)
                lengths[i] = mono.shape[-1]
        return MelodyBatch(wav, lengths)

    def forward(self, batch: MelodyBatch) -> Condition:
        """MelodyBatch -> Condition((B, F, output_dim), (B, F)); F = chroma_length when match_length."""
        with torch.no_grad():
            chroma = self.chroma(batch.wav)
        frames = chroma.shape[1]
        if self.match_length:
            target = self.config.chroma_length
            chroma = chroma.repeat(1, math.ceil(target / frames), 1)[:, :target]
            mask = torch.ones(chroma.shape[:2], dtype=torch.long, device=chroma.device)
        else:
            positions = torch.arange(frames, device=chroma.device)[None, :]
            mask = (positions < batch.lengths[:, None] / self.config.hop_length).long()
        embeds = self.output_proj(chroma.to(self.output_proj.weight.dtype))
        return Condition(embeds * mask[..., None].to(embeds.dtype), mask)

    def encode(self, melodies: MelodyInput, *, sample_rate: int | None = None) -> Condition:
        """prepare + forward."""
        return self(self.prepare(melodies, sample_rate=sample_rate))
