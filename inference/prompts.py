"""What a generation's inputs mean: text prompts, audio prompts, melodies, before any model work.

A prompt ``None`` or ``""`` is "no text": :func:`condition_texts` is the one place that decides
it, for every model (transformers' own MusicGen would encode a literal ``""`` as ``</s>``; its
unconditional generation is the null condition, which is what ``""`` means here). Audio comes as
``(wav, sample_rate)`` with wav ``(B, C, T)``, ``(C, T)`` or B items of ``(C, T)`` / None.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from conditioning.text import as_text_batch

from .config import Window

BatchAudio = list[torch.Tensor | None]


def condition_texts(prompts: Sequence[str | None]) -> list[str | None]:
    """The text rows the conditioners see: ``""`` and None are both None (the null condition)."""
    return [None if p == "" else p for p in prompts]


def batch_texts(prompts: str | Sequence[str | None] | None, *audio: BatchAudio | None) -> list[str | None]:
    """One text per generated item: ``prompts`` as a batch (a string is one prompt), or, for
    None, one null text per item of the audio given (1 without audio). Batch sizes must agree."""
    sizes = {len(x) for x in audio if x is not None}
    if prompts is None:
        if len(sizes) > 1:
            raise ValueError(f"audio_prompt and melody batch sizes differ: {sorted(sizes)}")
        return [None] * (sizes.pop() if sizes else 1)
    texts = as_text_batch(prompts)
    for size in sizes:
        if size != len(texts):
            raise ValueError(f"{len(texts)} prompt(s) but audio for {size}; give one audio per prompt")
    return texts


def as_batch_audio(wav: torch.Tensor | Sequence[torch.Tensor | None], what: str) -> BatchAudio:
    """``(B, C, T)`` / ``(C, T)`` tensor or B items of ``(C, T)`` / None -> list of ``(C, T)`` or None."""
    if isinstance(wav, torch.Tensor):
        if wav.dim() == 2:
            wav = wav[None]
        if wav.dim() != 3:
            raise ValueError(f"{what}: expected audio shaped (B, C, T) or (C, T), found {tuple(wav.shape)}")
        return list(wav)
    items = list(wav)
    for i, item in enumerate(items):
        if item is not None and (not isinstance(item, torch.Tensor) or item.dim() != 2):
            found = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
            raise ValueError(f"{what} {i}: expected a (C, T) tensor or None, found {found}")
    return items


def unpack_audio(value: Any, what: str) -> tuple[BatchAudio, int]:
    """A ``(wav, sample_rate)`` argument -> (list of ``(C, T)`` or None, sample rate)."""
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int)):
        raise TypeError(f"{what} must be a (wav, sample_rate) tuple with an int sample rate, "
                        f"found {type(value).__name__}")
    return as_batch_audio(value[0], what), value[1]


def check_audio_prompt(prompt: int, total: int, window: int, stride: int | None, frame_rate: float) -> None:
    """An audio prompt of ``prompt`` frames must leave room to generate, in the output (``total``
    frames) and in the model's ``window``; the error says so in seconds, and what to do."""
    def seconds(frames: float) -> str:
        return f"{round(frames / frame_rate, 2):g} s"

    if prompt and prompt >= total:
        raise ValueError(f"the audio prompt ({seconds(prompt)}) must be shorter than the requested "
                         f"duration ({seconds(total)}), which includes it: ask for a longer duration")
    if prompt and prompt >= window:
        keep = window - stride if stride is not None and 0 < stride < window else window // 2
        relation = "longer than" if prompt > window else "as long as"
        raise ValueError(
            f"the audio prompt is {seconds(prompt)}, {relation} the model's window "
            f"({seconds(window)}), which leaves the model no room to continue it: use a prompt "
            f"shorter than {seconds(window)}, e.g. its last {seconds(keep)} "
            f"(ffmpeg -sseof -{round(keep / frame_rate, 2):g} -i PROMPT.wav SHORT.wav)")


def window_melody(melodies: BatchAudio, window: Window, frame_rate: float, max_duration: float,
                  rate: int) -> BatchAudio:
    """audiocraft's periodic melody extension: the stretch of each melody (at ``rate``) that a
    sliding window covers, wrapped around when the melody is shorter."""
    start = int(window.offset / frame_rate * rate)
    length = int(max_duration * rate)
    out: BatchAudio = []
    for melody in melodies:
        if melody is None:
            out.append(None)
            continue
        positions = torch.arange(start, start + length, device=melody.device) % melody.shape[-1]
        out.append(melody[..., positions])
    return out


__all__ = ["BatchAudio", "as_batch_audio", "batch_texts", "check_audio_prompt", "condition_texts",
           "unpack_audio", "window_melody"]
