"""Training data for the LM: a corpus of captioned audio, its token cache, and training batches.

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

``tokenwave prepare`` (:func:`prepare_corpus`) checks every file and never stops on a bad one:
unreadable files, empty ones, non-finite samples, files shorter than ``min_seconds`` and
silent ones (peak below ``silence_db`` dBFS) are skipped and listed with their reason; other
sample rates and channel counts are converted to the codec's. Broken captions (invalid JSON,
a manifest line without ``path``, a missing file) are skipped the same way.

Token cache format
------------------
A folder holding ``index.json`` (written last, atomically: a folder without it is not a cache)::

    {"format": "tokenwave-token-cache", "version": 1,
     "codec": {"name", "sample_rate", "frame_rate", "channels", "num_codebooks", "card",
               "stereo_interleaved", "fingerprint"},
     "model": the --model given to prepare, "segment_seconds": default training window,
     "text_encoder": null or {"fingerprint", "dim"},
     "items": [{"id", "tokens": "tokens/000000.npy", "frames", "seconds", "source",
                "meta": {...}, "text": null or "text/000000.safetensors"}],
     "skipped": [{"source", "reason"}], "stats": {...}}

``tokens/*.npy`` hold the codes ``(K, frames)`` of a whole file (int16 when the codebook size
allows, else int32), read memory-mapped; training crops them. ``text/*.safetensors`` (optional,
``--text-embeddings``) hold the frozen T5 encoder's output ``hidden (S, D)`` for the item's plain
caption; training from them skips T5 but also caption augmentation and word dropout.

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

import hashlib
import json
import math
import os
import random
import re
import shutil
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from codec import audio as audio_io
from codec.model import EncodecModel, InterleavedStereo

CACHE_FORMAT = "tokenwave-token-cache"
CACHE_VERSION = 1
INDEX_NAME = "index.json"
TOKENS_DIR = "tokens"
TEXT_DIR = "text"
MERGE_FIELDS = ("key", "bpm", "genre", "moods", "instrument", "keywords")
# Files longer than this are encoded block by block (codec.streaming): same codes, bounded memory.
STREAM_ABOVE_SECONDS = 60.0
BLOCK_SECONDS = 10.0
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
class TrackMeta:
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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrackMeta:
        """Normalize a JSON object; unknown fields are ignored."""
        return cls(
            description=_text(data.get("description")), title=_text(data.get("title")),
            artist=_text(data.get("artist")), genre=_keyword_field(data.get("genre")),
            moods=_keywords(data.get("moods")), keywords=_keywords(data.get("keywords")),
            instrument=_keyword_field(data.get("instrument")),
            bpm=_bpm(data.get("bpm")), key=_musical_key(data.get("key")))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, absent fields left out."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if v not in (None, ())}

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


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _read_json_object(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, found {type(data).__name__}")
    return data


def _sidecar_meta(audio: Path) -> TrackMeta:
    """Metadata from ``<name>.json`` and/or ``<name>.txt`` (raises on unreadable ones)."""
    data: dict[str, Any] = {}
    json_path, text_path = audio.with_suffix(".json"), audio.with_suffix(".txt")
    if json_path.is_file():
        try:
            data = _read_json_object(json_path)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise ValueError(f"metadata: cannot read {json_path.name}: {_one_line(error)}") from None
    if text_path.is_file() and _text(data.get("description")) is None:
        try:
            data = {**data, "description": text_path.read_text(encoding="utf-8")}
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"metadata: cannot read {text_path.name}: {_one_line(error)}") from None
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
        raise ValueError(f"cannot read manifest {manifest}: {_one_line(error)}") from None
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


# -- codec tokens -------------------------------------------------------------------------------
def codec_fingerprint(codec: EncodecModel | InterleavedStereo) -> str:
    """sha256 over the codec's config and codebooks: which tokens a cache holds (two codecs
    with equal fingerprints give the same codes for the same audio, up to the encoder weights,
    which the codebooks all but pin down)."""
    model = codec.model if isinstance(codec, InterleavedStereo) else codec
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.quantizer.state_dict().items()):
        if name.endswith(".embed"):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


class CodecTokenizer:
    """Audio -> the codes an LM is trained on, with a given codec.

    ``num_codebooks`` is the total the LM models (for an interleaved-stereo codec: both
    channels, ``L0 R0 L1 R1 ...``). Only codecs that encode a whole file as one chunk qualify
    (an LM cannot use the 48 kHz model's per-second scales).
    """

    def __init__(self, codec: EncodecModel | InterleavedStereo, num_codebooks: int | None = None) -> None:
        model = codec.model if isinstance(codec, InterleavedStereo) else codec
        if model.segment_length is not None:
            raise ValueError(f"{model.name} encodes in chunks with scales; LM training needs a codec that "
                             "encodes whole files (24/32/16 kHz models)")
        total = codec.num_codebooks
        num_codebooks = total if num_codebooks is None else int(num_codebooks)
        stereo = isinstance(codec, InterleavedStereo)
        if not 1 <= num_codebooks <= total or (stereo and num_codebooks % 2):
            raise ValueError(f"num_codebooks must be between 1 and {total}{' and even (stereo)' if stereo else ''}, "
                             f"found {num_codebooks}")
        self.codec = codec
        self.model = model
        self.num_codebooks = num_codebooks
        self.stereo_interleaved = stereo

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate

    @property
    def channels(self) -> int:
        return self.codec.channels

    def info(self) -> dict[str, Any]:
        return {"name": self.model.name, "sample_rate": self.sample_rate, "frame_rate": self.model.frame_rate,
                "channels": self.channels, "num_codebooks": self.num_codebooks,
                "card": self.model.codebook_size, "stereo_interleaved": self.stereo_interleaved,
                "fingerprint": codec_fingerprint(self.codec)}

    def encode(self, wav: torch.Tensor, sample_rate: int) -> np.ndarray:
        """Audio ``(C, T)`` at any rate and channel count -> codes ``(K, frames)`` (int64 array)."""
        wav = audio_io.convert_audio(wav.float(), sample_rate, self.sample_rate, self.channels)
        per_channel = self.num_codebooks // self.channels if self.stereo_interleaved else self.num_codebooks
        # Interleaved stereo: each channel goes through the mono codec as one batch row.
        batch = wav[:, None] if self.stereo_interleaved else wav[None]  # (B, C, T)
        batch = batch.to(next(self.model.parameters()).device)
        with torch.inference_mode():
            if batch.shape[-1] <= STREAM_ABOVE_SECONDS * self.sample_rate:
                codes = self.model.encode_to_codes(batch, per_channel)
            else:
                from codec.streaming import encode_blocks

                step = int(BLOCK_SECONDS * self.sample_rate)
                blocks = (batch[..., i:i + step] for i in range(0, batch.shape[-1], step))
                codes = torch.cat([f.codes for f in encode_blocks(blocks, self.model, num_codebooks=per_channel)],
                                  dim=-1)
        if self.stereo_interleaved:  # (2, K, F) -> (K, 2, F) -> (2K, F)
            codes = codes.transpose(0, 1).reshape(-1, codes.shape[-1])
        else:
            codes = codes[0]
        return codes.cpu().numpy().astype(np.int64)


# -- text embeddings ----------------------------------------------------------------------------
def text_encoder_fingerprint(conditioner: torch.nn.Module) -> str:
    """sha256 over a T5 conditioner's encoder weights (names, shapes, values): which encoder the
    cached text states come from. Configs are left out, as their incidental fields change on save."""
    digest = hashlib.sha256()
    for name, tensor in sorted(conditioner.encoder.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def encode_text_states(conditioner: torch.nn.Module, text: str) -> torch.Tensor | None:
    """The frozen T5 encoder's output ``(S, D)`` for one caption (before ``output_proj``), or
    None when the conditioner treats the text as the null condition."""
    was_training = conditioner.training
    conditioner.eval()  # no word dropout
    try:
        tokens = conditioner.tokenize([text])
        if not bool(tokens.mask.any()):
            return None
        with torch.inference_mode():
            hidden = conditioner.encoder(input_ids=tokens.input_ids,
                                         attention_mask=tokens.attention_mask).last_hidden_state
    finally:
        conditioner.train(was_training)
    length = int(tokens.attention_mask[0].sum())
    return hidden[0, :length].float().cpu()


# -- writing the cache -----------------------------------------------------------------------------
@dataclass
class PrepareReport:
    """What :func:`prepare_corpus` did; ``skipped`` lists every file left out with its reason."""

    cache_dir: Path
    prepared: int = 0
    seconds: float = 0.0
    frames: int = 0
    resampled: int = 0
    converted_channels: int = 0
    uncaptioned: int = 0
    skipped: list[Skipped] = field(default_factory=list)

    def skipped_by_category(self) -> dict[str, int]:
        return dict(sorted(Counter(s.category for s in self.skipped).items()))

    def summary(self) -> str:
        parts = [f"prepared {self.prepared} file(s), {self.seconds:.1f} s of audio, {self.frames} frames "
                 f"-> {self.cache_dir}"]
        if self.resampled:
            parts.append(f"{self.resampled} resampled")
        if self.converted_channels:
            parts.append(f"{self.converted_channels} converted to the codec's channels")
        if self.uncaptioned:
            parts.append(f"{self.uncaptioned} without caption (trained unconditionally)")
        by_category = self.skipped_by_category()
        if by_category:
            parts.append(f"skipped {len(self.skipped)}: " + ", ".join(f"{n} {c}" for c, n in by_category.items()))
        return "; ".join(parts)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file, fsync, rename over ``path``, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _clear_cache(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite (--force) to rebuild the cache there")
        if not (out / INDEX_NAME).is_file() and not (out / TOKENS_DIR).is_dir():
            raise FileExistsError(f"{out} holds files but no token cache; refusing to delete them")
        for name in (INDEX_NAME, TOKENS_DIR, TEXT_DIR):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    (out / TOKENS_DIR).mkdir(parents=True, exist_ok=True)


def _save_npy(path: Path, codes: np.ndarray, card: int) -> None:
    dtype = np.int16 if card <= np.iinfo(np.int16).max else np.int32
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, codes.astype(dtype))
    os.replace(tmp, path)


def prepare_corpus(source: str | os.PathLike, out: str | os.PathLike, tokenizer: CodecTokenizer, *,
                   segment_seconds: float = 30.0, min_seconds: float = 1.0, silence_db: float = -60.0,
                   text_conditioner: torch.nn.Module | None = None, model_spec: str | None = None,
                   overwrite: bool = False, progress: bool = False) -> PrepareReport:
    """Scan ``source`` (folder or .jsonl), check and encode every file, write the cache to ``out``.

    ``segment_seconds`` is recorded as the default training window; ``text_conditioner`` (a
    :class:`~conditioning.T5Conditioner`) also caches the T5 states of each plain caption.
    Bad files are skipped and reported, never raised; raises only when nothing usable is left.
    """
    if not segment_seconds > 0 or not min_seconds >= 0:
        raise ValueError(f"segment_seconds must be > 0 and min_seconds >= 0, found {segment_seconds}, {min_seconds}")
    out = Path(out)
    scan = scan_corpus(source)
    if not scan.entries and not scan.skipped:
        raise ValueError(f"no audio files ({', '.join(audio_io.readable_extensions())}) found in {source}")
    _clear_cache(out, overwrite)
    info = tokenizer.info()
    report = PrepareReport(out, skipped=list(scan.skipped))
    text_info = None
    if text_conditioner is not None:
        (out / TEXT_DIR).mkdir(exist_ok=True)
        text_info = {"fingerprint": text_encoder_fingerprint(text_conditioner),
                     "dim": int(text_conditioner.encoder.config.d_model)}
    items = []
    entries: Iterable[CorpusEntry] = scan.entries
    if progress:
        from tqdm import tqdm

        entries = tqdm(scan.entries, unit="file", desc="prepare")
    for entry in entries:
        item_id = f"{len(items):06d}"
        try:
            wav, sample_rate = audio_io.read_audio(entry.path)
        except Exception as error:  # any decoder failure: report and go on
            report.skipped.append(Skipped(str(entry.path), f"unreadable: {_one_line(error)}"))
            continue
        reason = check_audio(wav, sample_rate, min_seconds=min_seconds, silence_db=silence_db)
        if reason is not None:
            report.skipped.append(Skipped(str(entry.path), reason))
            continue
        try:
            codes = tokenizer.encode(wav, sample_rate)
        except Exception as error:  # e.g. out of memory on a huge file: that file only
            report.skipped.append(Skipped(str(entry.path), f"encode failed: {_one_line(error)}"))
            continue
        tokens = f"{TOKENS_DIR}/{item_id}.npy"
        _save_npy(out / tokens, codes, info["card"])
        text_file = None
        caption = plain_caption(entry.meta)
        if text_conditioner is not None and caption is not None:
            states = encode_text_states(text_conditioner, caption)
            if states is not None:
                from safetensors.torch import save_file

                text_file = f"{TEXT_DIR}/{item_id}.safetensors"
                save_file({"hidden": states.contiguous()}, str(out / text_file))
        seconds = wav.shape[-1] / sample_rate
        items.append({"id": item_id, "tokens": tokens, "frames": int(codes.shape[-1]), "seconds": seconds,
                      "source": str(entry.path), "meta": entry.meta.to_dict(), "text": text_file})
        report.prepared += 1
        report.seconds += seconds
        report.frames += int(codes.shape[-1])
        report.resampled += sample_rate != tokenizer.sample_rate
        report.converted_channels += wav.shape[0] != tokenizer.channels
        report.uncaptioned += not entry.meta.has_caption
    if not items:
        raise ValueError(f"no usable audio in {source}: " + PrepareReport(out, skipped=report.skipped).summary())
    index = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "codec": info, "model": model_spec,
             "segment_seconds": segment_seconds, "text_encoder": text_info, "items": items,
             "skipped": [{"source": s.source, "reason": s.reason} for s in report.skipped],
             "stats": {"prepared": report.prepared, "seconds": report.seconds, "frames": report.frames,
                       "resampled": report.resampled, "uncaptioned": report.uncaptioned,
                       "skipped": report.skipped_by_category(), "min_seconds": min_seconds,
                       "silence_db": silence_db}}
    write_json_atomic(out / INDEX_NAME, index)
    return report


# -- reading the cache ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CachedItem:
    """One encoded file of a token cache."""

    id: str
    tokens: Path
    frames: int
    seconds: float
    source: str
    meta: TrackMeta
    text: Path | None


class TokenCache:
    """A token cache folder written by :func:`prepare_corpus` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index_path = self.path / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.path}: not a token cache (no {INDEX_NAME}); create one with "
                                    "`tokenwave prepare`")
        try:
            index = _read_json_object(index_path)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise ValueError(f"{index_path}: unreadable cache index ({_one_line(error)})") from None
        if index.get("format") != CACHE_FORMAT or not isinstance(index.get("version"), int) \
                or index["version"] > CACHE_VERSION:
            raise ValueError(f"{index_path}: expected format {CACHE_FORMAT!r} version <= {CACHE_VERSION}, found "
                             f"{index.get('format')!r} version {index.get('version')!r}")
        self.index = index
        self.codec: dict[str, Any] = index["codec"]
        self.segment_seconds = float(index["segment_seconds"])
        self.text_encoder: dict[str, Any] | None = index.get("text_encoder")
        self.items = [CachedItem(id=i["id"], tokens=self.path / i["tokens"], frames=int(i["frames"]),
                                 seconds=float(i["seconds"]), source=i["source"],
                                 meta=TrackMeta.from_dict(i.get("meta") or {}),
                                 text=None if not i.get("text") else self.path / i["text"])
                      for i in index["items"]]
        if not self.items:
            raise ValueError(f"{index_path}: the cache holds no items")
        self._tokens: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_codebooks(self) -> int:
        return int(self.codec["num_codebooks"])

    @property
    def card(self) -> int:
        return int(self.codec["card"])

    @property
    def frame_rate(self) -> float:
        return float(self.codec["frame_rate"])

    def tokens(self, i: int) -> np.ndarray:
        """Codes ``(K, frames)`` of item ``i`` (memory-mapped, opened once)."""
        if i not in self._tokens:
            item = self.items[i]
            array = np.load(item.tokens, mmap_mode="r", allow_pickle=False)
            if array.ndim != 2 or array.shape != (self.num_codebooks, item.frames):
                raise ValueError(f"{item.tokens}: expected codes ({self.num_codebooks}, {item.frames}), "
                                 f"found {array.shape}")
            self._tokens[i] = array
        return self._tokens[i]

    def text_states(self, i: int) -> torch.Tensor | None:
        """Cached T5 states ``(S, D)`` of item ``i``'s plain caption; None = null condition."""
        item = self.items[i]
        if item.text is None:
            return None
        from safetensors.torch import load_file

        return load_file(str(item.text))["hidden"]

    def split(self, valid_fraction: float, seed: int) -> tuple[list[int], list[int]]:
        """Deterministic (train, valid) item indices; valid is empty for one item or fraction 0."""
        if not 0.0 <= valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), found {valid_fraction}")
        n = len(self.items)
        n_valid = 0 if valid_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * valid_fraction)))
        order = np.random.default_rng([seed, 0x5EED]).permutation(n)
        return sorted(int(i) for i in order[n_valid:]), sorted(int(i) for i in order[:n_valid])


# -- batches ------------------------------------------------------------------------------------
class Batch(NamedTuple):
    """codes: ``(B, K, T)`` long, padded with the special token past an item's end;
    frame_mask: ``(B, T)`` bool, true on real frames; captions: B texts (None = no caption);
    items: B item indices into the cache."""

    codes: torch.Tensor
    frame_mask: torch.Tensor
    captions: list[str | None]
    items: list[int]


class SegmentBatches:
    """Training batches as a pure function of the position in the run: resuming needs no state.

    Sample ``p`` of the run (``p = ((step * grad_accum + micro) * world + rank) * B + j``)
    is item ``perm_e[p % N]`` of epoch ``e = p // N`` (a fresh permutation per epoch from
    ``seed``); its crop offset and caption augmentation come from a generator seeded with
    ``(seed, p)``. Items shorter than the window are padded with ``special_token``.
    """

    def __init__(self, cache: TokenCache, indices: Sequence[int], *, segment_frames: int, batch_size: int,
                 special_token: int, seed: int = 0, augmentation: CaptionAugmentation = CaptionAugmentation()) -> None:
        if not indices:
            raise ValueError("no training items")
        if segment_frames < 1 or batch_size < 1:
            raise ValueError(f"segment_frames and batch_size must be >= 1, found {segment_frames}, {batch_size}")
        self.cache = cache
        self.indices = list(indices)
        # No wider than the longest item: padding only costs compute.
        self.segment_frames = min(segment_frames, max(cache.items[i].frames for i in self.indices))
        self.batch_size = batch_size
        self.special_token = special_token
        self.seed = seed
        self.augmentation = augmentation
        self._epoch: tuple[int, np.ndarray] | None = None

    def _item_at(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.indices))
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.indices)))
        return self.indices[int(self._epoch[1][offset])]

    def sample(self, position: int) -> tuple[int, int, str | None]:
        """(item index, crop start frame, caption) of sample ``position``."""
        item = self._item_at(position)
        rng = random.Random(f"tokenwave-batches:{self.seed}:{position}")
        frames = self.cache.items[item].frames
        start = rng.randrange(frames - self.segment_frames + 1) if frames > self.segment_frames else 0
        return item, start, augment_caption(self.cache.items[item].meta, self.augmentation, rng)

    def batch(self, step: int, *, micro: int = 0, grad_accum: int = 1, rank: int = 0, world: int = 1) -> Batch:
        """The micro-batch ``micro`` of optimizer step ``step`` for process ``rank`` of ``world``."""
        first = ((step * grad_accum + micro) * world + rank) * self.batch_size
        samples = [self.sample(first + j) for j in range(self.batch_size)]
        return collate(self.cache, [(i, s) for i, s, _ in samples], [c for *_, c in samples],
                       self.segment_frames, self.special_token)


def collate(cache: TokenCache, crops: Sequence[tuple[int, int]], captions: Sequence[str | None],
            frames: int, special_token: int) -> Batch:
    """Cut ``(item, start)`` crops of ``frames`` frames into a :class:`Batch`."""
    K = cache.num_codebooks
    codes = torch.full((len(crops), K, frames), special_token, dtype=torch.long)
    mask = torch.zeros(len(crops), frames, dtype=torch.bool)
    for row, (item, start) in enumerate(crops):
        piece = np.asarray(cache.tokens(item)[:, start:start + frames], dtype=np.int64)
        codes[row, :, :piece.shape[1]] = torch.from_numpy(piece)
        mask[row, :piece.shape[1]] = True
    return Batch(codes, mask, list(captions), [i for i, _ in crops])


def validation_batches(cache: TokenCache, indices: Sequence[int], *, segment_frames: int, batch_size: int,
                       special_token: int) -> list[Batch]:
    """Fixed validation batches: each item's first window, its plain caption."""
    out = []
    for first in range(0, len(indices), batch_size):
        chunk = list(indices[first:first + batch_size])
        frames = min(segment_frames, max(cache.items[i].frames for i in chunk))
        out.append(collate(cache, [(i, 0) for i in chunk], [plain_caption(cache.items[i].meta) for i in chunk],
                           frames, special_token))
    return out


__all__ = [
    "Batch", "CACHE_FORMAT", "CachedItem", "CaptionAugmentation", "CodecTokenizer", "CorpusEntry", "MERGE_FIELDS",
    "NO_AUGMENTATION", "PrepareReport", "ScanResult", "SegmentBatches", "Skipped", "TokenCache", "TrackMeta",
    "augment_caption", "caption_vocabulary", "check_audio", "codec_fingerprint", "collate", "encode_text_states",
    "plain_caption", "prepare_corpus", "scan_corpus", "text_encoder_fingerprint", "validation_batches",
    "write_json_atomic",
]
