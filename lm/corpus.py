"""The training corpus: audio files with caption metadata, checked before encoding.

Corpus format
-------------
Either a **folder** of audio files (any format ``codec.audio.readable_extensions()`` lists,
searched recursively, hidden files skipped) with optional captions next to each file:

- ``<name>.txt``: the description, as plain UTF-8 text;
- ``<name>.json``: an object with audiocraft's metadata fields, all optional: ``description``,
  ``title``, ``artist``, ``genre``, ``moods``, ``keywords``, ``instrument``, ``bpm``, ``key``
  (``moods``/``keywords`` a list or a comma-separated string; ``bpm`` a number). Other fields
  are ignored. When both files exist the JSON wins, and the ``.txt`` fills a missing description.

or a **JSONL manifest** (a ``.jsonl`` file): one object per line with ``path`` (absolute, or
relative to the manifest's folder) and the same fields. Files without any caption are kept
and trained as unconditional examples (they are counted in the report).

``tokenwave prepare`` (:func:`lm.token_cache.prepare_corpus`) checks every file and never stops on a bad one:
unreadable files, empty ones, non-finite samples, files shorter than ``min_seconds`` and
silent ones (peak below ``silence_db`` dBFS) are skipped and listed with their reason; other
sample rates and channel counts are converted to the codec's. Broken captions (invalid JSON,
a manifest line without ``path``, a missing file) are skipped the same way.

Caption augmentation (audiocraft's ``augment_music_info_description``; its MusicGen recipe uses
``merge_text_p=0.25, drop_desc_p=0.5, drop_other_p=0.5``): with probability ``merge_text_p`` the
fields ``key, bpm, genre, moods, instrument, keywords`` are written as ``"name: value"`` pairs,
each dropped with probability ``drop_other_p`` (audiocraft's code *keeps* a field with that
probability; at its 0.5 the two agree), shuffled, joined by ``". "`` and appended to the
description, which is itself dropped with probability ``drop_desc_p``. Title and artist are
never merged. Two deliberate differences: an item with no description always gets its fields
merged (so metadata-only corpora are not trained mostly unconditionally), and a description
with nothing merged is left exactly as written (audiocraft appends a period).
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import string
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch

from codec import audio as audio_io
from codec.config import DictConfig
from codec.files import read_json_file

MERGE_FIELDS = ("key", "bpm", "genre", "moods", "instrument", "keywords")
_PUNCTUATION = string.punctuation + "\u201c\u201d\u2018\u2019"


# -- metadata ---------------------------------------------------------------------------------
def _text(value: Any) -> str | None:
    """A free-text field: stripped, None when absent, empty or the string 'None'."""
    if not isinstance(value, str):
        return None
    value = " ".join(value.split())
    return value if value and value != "None" else None


def _keyword(value: Any) -> str | None:
    value = _text(value)
    return None if value is None else value.lower()


def _keywords(value: Any) -> tuple[str, ...]:
    """A list, or a string split on commas/semicolons (not on spaces: "hip hop" is one mood)."""
    if isinstance(value, str):
        value = re.split(r"[,;]", value)
    if not isinstance(value, (list, tuple)):
        return ()
    words = (_keyword(v) for v in value)
    return tuple(dict.fromkeys(w for w in words if w))  # de-duplicated, order kept


def _keyword_field(value: Any) -> str | None:
    """A single keyword (genre, instrument); a list of them is joined with ", "."""
    if isinstance(value, (list, tuple)):
        return ", ".join(_keywords(value)) or None
    return _keyword(value)


def _bpm(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        bpm = float(value)
    except (TypeError, ValueError):
        return None
    return bpm if math.isfinite(bpm) and bpm > 0 else None


def _musical_key(value: Any) -> str | None:
    value = _keyword(value)
    return None if value is None or "," in value else value  # several keys: ambiguous, dropped


@dataclass(frozen=True)
class TrackMeta(DictConfig):
    """Caption metadata of one file (audiocraft's MusicInfo text fields), normalized.

    Keyword fields are lower-cased, ``moods``/``keywords`` are tuples, ``bpm`` a positive float,
    a ``key`` naming several keys is dropped; absent or empty values are None / ().
    """

    description: str | None = None
    title: str | None = None
    artist: str | None = None
    genre: str | None = None
    moods: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    instrument: str | None = None
    bpm: float | None = None
    key: str | None = None

    _omit_empty = True  # to_dict leaves absent fields out

    @classmethod
    def _from_dict_fix(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Normalize a JSON object (user-written captions); unknown fields are ignored."""
        return dict(
            description=_text(data.get("description")), title=_text(data.get("title")),
            artist=_text(data.get("artist")), genre=_keyword_field(data.get("genre")),
            moods=_keywords(data.get("moods")), keywords=_keywords(data.get("keywords")),
            instrument=_keyword_field(data.get("instrument")),
            bpm=_bpm(data.get("bpm")), key=_musical_key(data.get("key")))

    @property
    def has_caption(self) -> bool:
        return self.description is not None or any(getattr(self, name) for name in MERGE_FIELDS)


# -- captions -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaptionAugmentation:
    """Probabilities of audiocraft's metadata merge; see the module docstring."""

    merge_text_p: float = 0.25
    drop_desc_p: float = 0.5
    drop_other_p: float = 0.5

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{item.name} must be a probability in [0, 1], found {value}")


NO_AUGMENTATION = CaptionAugmentation(0.0, 0.0, 0.0)


def _field_text(meta: TrackMeta, name: str) -> str | None:
    value = getattr(meta, name)
    if value is None or value == ():
        return None
    if name == "bpm":
        return f"{value:g}"
    return ", ".join(value) if isinstance(value, tuple) else str(value)


def _metadata_pairs(meta: TrackMeta) -> list[str]:
    return [f"{name}: {text}" for name in MERGE_FIELDS if (text := _field_text(meta, name)) is not None]


def plain_caption(meta: TrackMeta) -> str | None:
    """The caption without augmentation: the description, else every field merged in a fixed
    order (``"genre: rock. bpm: 120"``), else None (unconditional). Used for validation,
    sample prompts and cached text embeddings."""
    if meta.description is not None:
        return meta.description
    return ". ".join(_metadata_pairs(meta)) or None


def augment_caption(meta: TrackMeta, augmentation: CaptionAugmentation, rng: random.Random) -> str | None:
    """One training caption drawn with ``rng``; see the module docstring for the recipe."""
    description = meta.description
    if description is not None and not rng.random() < augmentation.merge_text_p:
        return description
    pairs = [pair for pair in _metadata_pairs(meta) if not rng.random() < augmentation.drop_other_p]
    rng.shuffle(pairs)
    merged = ". ".join(pairs)
    if description is not None and rng.random() < augmentation.drop_desc_p:
        description = None
    if description is None:
        return merged or None
    return f"{description.rstrip('.')}. {merged}" if merged else description


def caption_vocabulary(metas: Iterable[TrackMeta], limit: int = 20_000) -> list[str]:
    """Words of the plain and merged captions, most frequent first (ties alphabetical), for a
    lookup-table text conditioner trained from scratch. Lower-cased, edge punctuation stripped."""
    counts: Counter[str] = Counter()
    for meta in metas:
        texts = [meta.description or "", *_metadata_pairs(meta)]
        for text in texts:
            for word in text.split():
                word = word.strip(_PUNCTUATION).lower()
                if word:
                    counts[word] += 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [word for word, _ in ranked[:limit]]


# -- scanning ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusEntry:
    """An audio file found in the corpus and its caption metadata."""

    path: Path
    meta: TrackMeta


@dataclass(frozen=True)
class Skipped:
    """A file (or manifest line) left out, and why (``reason`` starts with its category)."""

    source: str
    reason: str

    @property
    def category(self) -> str:
        return self.reason.split(":", 1)[0]


class ScanResult(NamedTuple):
    entries: list[CorpusEntry]
    skipped: list[Skipped]


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _sidecar_meta(audio: Path) -> TrackMeta:
    """Metadata from ``<name>.json`` and/or ``<name>.txt`` (raises on unreadable ones)."""
    data: dict[str, Any] = {}
    json_path, text_path = audio.with_suffix(".json"), audio.with_suffix(".txt")
    if json_path.is_file():
        try:
            data = read_json_file(json_path, "JSON track metadata")
        except (OSError, ValueError) as error:  # the message names the file
            raise ValueError(f"metadata: cannot read {one_line(error)}") from None
    if text_path.is_file() and _text(data.get("description")) is None:
        try:
            data = {**data, "description": text_path.read_text(encoding="utf-8")}
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"metadata: cannot read {text_path.name}: {one_line(error)}") from None
    return TrackMeta.from_dict(data)


def scan_corpus(source: str | os.PathLike) -> ScanResult:
    """Find the audio files of a corpus folder or JSONL manifest with their metadata.

    Entries come sorted by path (folder) or in manifest order; nothing is read but the captions.
    """
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() != ".jsonl":
            raise ValueError(f"{source}: expected a corpus folder or a .jsonl manifest, found a "
                             f"{source.suffix or 'suffix-less'} file")
        return _scan_manifest(source)
    if not source.is_dir():
        raise FileNotFoundError(f"corpus not found: {source}")
    extensions = set(audio_io.readable_extensions())
    entries, skipped = [], []
    for path in sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in extensions
                       and not any(part.startswith(".") for part in p.relative_to(source).parts)):
        try:
            entries.append(CorpusEntry(path, _sidecar_meta(path)))
        except ValueError as error:
            skipped.append(Skipped(str(path), str(error)))
    return ScanResult(entries, skipped)


def _scan_manifest(manifest: Path) -> ScanResult:
    entries, skipped = [], []
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read manifest {manifest}: {one_line(error)}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{manifest}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as error:
            skipped.append(Skipped(where, f"metadata: invalid JSON ({error.msg})"))
            continue
        if not isinstance(data, dict) or not isinstance(data.get("path"), str) or not data["path"]:
            skipped.append(Skipped(where, "metadata: expected an object with a \"path\" string"))
            continue
        path = Path(data["path"])
        path = path if path.is_absolute() else manifest.parent / path
        if not path.is_file():
            skipped.append(Skipped(str(path), f"missing: no such file (manifest line {number})"))
            continue
        entries.append(CorpusEntry(path, TrackMeta.from_dict(data)))
    return ScanResult(entries, skipped)


def check_audio(wav: torch.Tensor, sample_rate: int, *, min_seconds: float, silence_db: float) -> str | None:
    """Why ``wav (C, T)`` is unusable for training (a reason string), or None when it is fine."""
    if wav.shape[-1] == 0:
        return "empty: no samples"
    try:  # the one finiteness check every audio path uses (codec.audio)
        peak = audio_io.check_audio_values(wav, "audio", sample_rate=sample_rate, warn=False)
    except ValueError as error:
        return f"non-finite: {str(error).split(':')[0].removeprefix('audio holds a ')}"
    seconds = wav.shape[-1] / sample_rate
    if seconds < min_seconds:
        return f"too short: {seconds:.2f} s < {min_seconds:g} s"
    peak_db = 20 * math.log10(peak) if peak > 0 else -math.inf
    if peak_db < silence_db:
        return f"silent: peak {peak_db:.1f} dBFS < {silence_db:g} dBFS"
    return None


__all__ = [
    "MERGE_FIELDS", "NO_AUGMENTATION", "CaptionAugmentation", "CorpusEntry", "ScanResult", "Skipped",
    "TrackMeta",
    "augment_caption", "caption_vocabulary", "check_audio", "one_line", "plain_caption",
    "scan_corpus",
]
