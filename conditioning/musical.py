"""Tempo and key conditioning: a beat clock summed into every LM input step, and a key embedding.

Why: a T5 embedding of "at 124 bpm, in G# minor" is a weak, slow-to-learn signal (the shipped
model's generations ignored both: tempo Spearman ~0, mode at chance). A beat clock gives the LM,
at every frame, where it is inside the beat, so "an onset now" becomes a local pattern; a key
embedding names the scale directly. Both are read from the caption's own words at generation
time (:func:`parse_tempo`, :func:`parse_key`) and from the corpus metadata (``bpm``, ``key``)
in training.

- :class:`BeatConditioner` (attribute ``"bpm"``, fused by ``sum``): frame ``t`` of a window
  starting at frame ``t0`` has beat phase ``phi = ((t0 + t) / frame_rate) * bpm / 60`` (beat 0
  at the first frame of the output, as the corpus's clips start on a bar line); its features are
  ``cos/sin(2 pi h phi)`` for each harmonic ``h`` (beats, eighths, sixteenths), projected to the
  LM width by a linear map initialized to zero (an LM it is added to starts unchanged).
- :class:`KeyConditioner` (attribute ``"key"``, fused by ``sum``): one of 24 embeddings (tonic
  x major/minor), also zero at first.
A sample without the attribute (``None``: not in the caption, or dropped for classifier-free
guidance) gets zeros with a zero mask, the null condition.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .base import Condition
from .instrument import InstrumentConditioner, lead_instrument

MIN_BPM, MAX_BPM = 20.0, 400.0
PITCH_CLASSES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
_TONICS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_ACCIDENTALS = {"": 0, "#": 1, "\u266f": 1, "b": -1, "\u266d": -1}
_TEMPO = re.compile(r"(\d{1,3}(?:\.\d+)?)\s*(?:bpm\b|beats\s+per\s+minute|beats/min)", re.IGNORECASE)
_KEY_ALONE = re.compile(r"([A-Ga-g])(\s?(?:#|b|\u266f|\u266d)?\s*(?:-\s*)?(?:major|minor|maj|min))", re.IGNORECASE)
_KEY = re.compile(r"(?<![A-Za-z])([A-G])\s?(#|b|\u266f|\u266d)?\s*(?:-\s*)?(major|minor|maj|min)\b")


def parse_tempo(text: str | None) -> float | None:
    """The tempo a caption states ("124 bpm", "at 90 BPM", "111 beats per minute"), or None.

    The first mention counts; a number outside [MIN_BPM, MAX_BPM] is not a tempo."""
    if not text:
        return None
    for match in _TEMPO.finditer(text):
        bpm = float(match.group(1))
        if MIN_BPM <= bpm <= MAX_BPM:
            return bpm
    return None


def parse_key(text: str | None) -> str | None:
    """The key a caption states ("G# minor", "in the key of Eb major", "F#min"), normalized to
    ``"<tonic> major|minor"`` with the tonic spelled as :data:`PITCH_CLASSES`; None if absent."""
    if not text:
        return None
    match = _KEY.search(text)
    if match is None:
        return None
    letter, accidental, mode = match.groups()
    tonic = (_TONICS[letter] + _ACCIDENTALS[accidental or ""]) % 12
    return f"{PITCH_CLASSES[tonic]} {'minor' if mode.lower().startswith('min') else 'major'}"


def key_name(value: str | None) -> str | None:
    """A key given on its own, in any case ("g# minor", "Eb MAJOR": metadata fields), normalized as
    :func:`parse_key` does; None when ``value`` is not one key."""
    if not value:
        return None
    match = _KEY_ALONE.fullmatch(value.strip())
    return parse_key(match.group(1).upper() + match.group(2).lower()) if match else None


def key_index(key: str) -> int:
    """A key (:func:`key_name`'s spellings) -> 0..23 (tonic * 2 + minor)."""
    parsed = key_name(key)
    if parsed is None:
        raise ValueError(f"not a key: {key!r}; expected a tonic and a mode, e.g. 'F# minor' or 'Bb major'")
    tonic, mode = parsed.split()
    return PITCH_CLASSES.index(tonic) * 2 + (mode == "minor")


class BeatConditioner(nn.Module):
    """Beat-phase features per frame -> ``(B, frames, dim)``; see the module docstring.

    ``encode`` needs the number of frames and where the window starts (frames since the
    output's first frame): the only time-aligned conditioner, so
    :class:`~conditioning.base.ConditionProvider` passes them to it alone (``time_aligned``).
    """

    time_aligned = True

    def __init__(self, *, dim: int, frame_rate: float, harmonics: Sequence[float] = (1.0, 2.0, 4.0)) -> None:
        super().__init__()
        if frame_rate <= 0 or not harmonics:
            raise ValueError(f"need a positive frame rate and at least one harmonic, got {frame_rate}, "
                             f"{tuple(harmonics)}")
        self.dim = dim
        self.frame_rate = float(frame_rate)
        self.harmonics = tuple(float(h) for h in harmonics)
        self.output_proj = nn.Linear(2 * len(self.harmonics), dim, bias=False)
        nn.init.zeros_(self.output_proj.weight)

    def features(self, bpm: torch.Tensor, frames: int, start: torch.Tensor) -> torch.Tensor:
        """``(B, frames, 2H)`` float32 cos/sin features of bpm ``(B,)`` from frame ``start (B,)``."""
        t = start.double()[:, None] + torch.arange(frames, dtype=torch.float64, device=bpm.device)[None]
        beats = t / self.frame_rate * bpm.double()[:, None] / 60.0  # float64: phase stays exact for hours
        phases = 2 * math.pi * torch.remainder(beats[..., None] * torch.tensor(self.harmonics, dtype=torch.float64,
                                                                                  device=bpm.device), 1.0)
        return torch.cat([torch.cos(phases), torch.sin(phases)], dim=-1).float()

    def encode(self, values: Sequence[float | None], *, frames: int,
               start_frames: int | Sequence[int] = 0) -> Condition:
        """values: B tempi in bpm (None = null); frames: window length; start_frames: per sample
        (or one for all) the window's first frame within the output."""
        device = self.output_proj.weight.device
        batch = len(values)
        for value in values:
            if value is not None and not MIN_BPM <= float(value) <= MAX_BPM:
                raise ValueError(f"tempo {value!r} bpm is outside [{MIN_BPM:g}, {MAX_BPM:g}]")
        starts = [start_frames] * batch if isinstance(start_frames, int) else list(start_frames)
        if len(starts) != batch:
            raise ValueError(f"{batch} tempi but {len(starts)} start frames")
        mask = torch.tensor([v is not None for v in values], dtype=torch.long, device=device)
        bpm = torch.tensor([float(v) if v is not None else 0.0 for v in values], device=device)
        feats = self.features(bpm, frames, torch.tensor(starts, dtype=torch.long, device=device))
        emb = self.output_proj(feats.to(self.output_proj.weight.dtype)) * mask[:, None, None]
        return Condition(emb, mask[:, None].expand(-1, frames).contiguous())


class KeyConditioner(nn.Module):
    """A key (``"A minor"``; None = null) -> one embedding ``(B, 1, dim)``, zero-initialized."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.embedding = nn.Embedding(24, dim)
        nn.init.zeros_(self.embedding.weight)

    def encode(self, values: Sequence[str | None]) -> Condition:
        device = self.embedding.weight.device
        index = torch.tensor([key_index(v) if v is not None else 0 for v in values], device=device)
        mask = torch.tensor([v is not None for v in values], dtype=torch.long, device=device)
        emb = self.embedding(index)[:, None] * mask[:, None, None]
        return Condition(emb, mask[:, None])


def musical_value(name: str, meta) -> float | str | None:
    """The ``bpm``/``key``/``instrument`` attribute of a track's metadata (:class:`lm.corpus.TrackMeta`),
    or None."""
    if name == "instrument":
        return lead_instrument(meta)
    if name == "bpm":
        return meta.bpm if meta.bpm is not None and MIN_BPM <= meta.bpm <= MAX_BPM else None
    if name == "key":
        return key_name(meta.key)
    raise KeyError(f"no musical attribute {name!r}; expected 'bpm', 'key' or 'instrument'")


def caption_attributes(texts: Sequence[str | None], provider=None) -> dict[str, list]:
    """The tempo and key each caption states: ``{"bpm": [...], "key": [...]}`` (None where absent),
    and ``"instrument"`` when ``provider`` has an :class:`~conditioning.instrument.InstrumentConditioner`
    (the first instrument of its vocabulary each caption names)."""
    attributes = {"bpm": [parse_tempo(t) for t in texts], "key": [parse_key(t) for t in texts]}
    conditioners = {} if provider is None else provider.conditioners
    instrument = conditioners["instrument"] if "instrument" in conditioners else None
    if isinstance(instrument, InstrumentConditioner):
        attributes["instrument"] = [instrument.parse(t) for t in texts]
    return attributes


def summed_input(provider, fuser, attributes: Mapping[str, Sequence], *, steps: int,
                 start_frames: int | Sequence[int] = 0) -> torch.Tensor | None:
    """The LM's per-step ``frame_input (B, steps, D)``: the provider's conditioners the fuser routes to
    ``sum`` (the beat clock from ``start_frames``, the key, the instrument), summed; None when the model has none.
    Attributes the batch lacks are null."""
    batch = len(next(iter(attributes.values())))
    conditions = {}
    for name in fuser.config.sum:
        conditioner = provider.conditioners[name]
        values = attributes.get(name, [None] * batch)
        conditions[name] = (conditioner.encode(values, frames=steps, start_frames=start_frames)
                            if getattr(conditioner, "time_aligned", False) else conditioner.encode(values))
    total = fuser.summed(conditions, steps)
    return None if total is None else total.expand(-1, steps, -1)


__all__ = ["BeatConditioner", "KeyConditioner", "MAX_BPM", "MIN_BPM", "PITCH_CLASSES", "caption_attributes",
           "key_index", "key_name", "musical_value", "parse_key", "parse_tempo", "summed_input"]
