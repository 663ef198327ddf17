"""The token cache: a corpus encoded once into codec codes (and optionally T5 states) for LM training.

``prepare_corpus`` scans a corpus (:mod:`lm.corpus`), checks and encodes every file with a
:class:`CodecTokenizer`, and writes the cache; :class:`TokenCache` reads it back.

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
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codec import audio as audio_io
from codec.files import atomic_path, read_json_file, read_safetensors_file, write_json_file
from codec.model import EncodecModel, InterleavedStereo

from .corpus import (
    CorpusEntry,
    Skipped,
    TrackMeta,
    check_audio,
    one_line,
    plain_caption,
    scan_corpus,
)

CACHE_FORMAT = "tokenwave-token-cache"
CACHE_VERSION = 1
INDEX_NAME = "index.json"
TOKENS_DIR = "tokens"
TEXT_DIR = "text"
# Files longer than this are encoded block by block (codec.streaming): same codes, bounded memory.
STREAM_ABOVE_SECONDS = 60.0
BLOCK_SECONDS = 10.0


# -- codec tokens -------------------------------------------------------------------------------
def codec_fingerprint(codec: EncodecModel | InterleavedStereo) -> str:
    """sha256 over the codec's config and codebooks: which tokens a cache holds (two codecs
    with equal fingerprints give the same codes for the same audio, up to the encoder weights,
    which the codebooks all but pin down)."""
    model = codec.base_model
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
        model = codec.base_model
        if model.segment_length is not None:
            raise ValueError(f"{model.name} encodes in chunks with scales; LM training needs a codec that "
                             "encodes whole files (24/32/16 kHz models)")
        total = codec.num_codebooks
        num_codebooks = total if num_codebooks is None else int(num_codebooks)
        stereo = codec.interleaved
        if not 1 <= num_codebooks <= total or (stereo and num_codebooks % 2):
            even = " and even (stereo)" if stereo else ""
            raise ValueError(f"num_codebooks must be between 1 and {total}{even}, "
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
                encoded = encode_blocks(blocks, self.model, num_codebooks=per_channel)
                codes = torch.cat([f.codes for f in encoded], dim=-1)
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
            counts = ", ".join(f"{n} {c}" for c, n in by_category.items())
            parts.append(f"skipped {len(self.skipped)}: {counts}")
        return "; ".join(parts)


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
    with atomic_path(path, overwrite=True) as tmp, open(tmp, "wb") as handle:
        np.save(handle, codes.astype(dtype))


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
        raise ValueError(f"segment_seconds must be > 0 and min_seconds >= 0, found {segment_seconds}, "
                         f"{min_seconds}")
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
            report.skipped.append(Skipped(str(entry.path), f"unreadable: {one_line(error)}"))
            continue
        reason = check_audio(wav, sample_rate, min_seconds=min_seconds, silence_db=silence_db)
        if reason is not None:
            report.skipped.append(Skipped(str(entry.path), reason))
            continue
        try:
            codes = tokenizer.encode(wav, sample_rate)
        except Exception as error:  # e.g. out of memory on a huge file: that file only
            report.skipped.append(Skipped(str(entry.path), f"encode failed: {one_line(error)}"))
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
                with atomic_path(out / text_file, overwrite=True) as tmp:
                    save_file({"hidden": states.contiguous()}, str(tmp))
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
        summary = PrepareReport(out, skipped=report.skipped).summary()
        raise ValueError(f"no usable audio in {source}: {summary}")
    index = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "codec": info, "model": model_spec,
             "segment_seconds": segment_seconds, "text_encoder": text_info, "items": items,
             "skipped": [{"source": s.source, "reason": s.reason} for s in report.skipped],
             "stats": {"prepared": report.prepared, "seconds": report.seconds, "frames": report.frames,
                       "resampled": report.resampled, "uncaptioned": report.uncaptioned,
                       "skipped": report.skipped_by_category(), "min_seconds": min_seconds,
                       "silence_db": silence_db}}
    write_json_file(out / INDEX_NAME, index)
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
        index = read_json_file(index_path, "a token cache index")
        if index.get("format") != CACHE_FORMAT or not isinstance(index.get("version"), int) \
                or index["version"] > CACHE_VERSION:
            raise ValueError(f"{index_path}: expected format {CACHE_FORMAT!r} version <= {CACHE_VERSION}, "
                             f"found {index.get('format')!r} version {index.get('version')!r}")
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
        return read_safetensors_file(item.text)["hidden"]

    def padded_text_states(self, items: list[int | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached T5 states of ``items`` (None = null condition) padded into ``hidden (B, S, D)``
        and ``mask (B, S)`` (long; zeros for padding and null rows)."""
        states = [None if i is None else self.text_states(i) for i in items]
        width = int(self.text_encoder["dim"])
        length = max([1] + [s.shape[0] for s in states if s is not None])
        hidden = torch.zeros(len(states), length, width)
        mask = torch.zeros(len(states), length, dtype=torch.long)
        for row, s in enumerate(states):
            if s is not None:
                hidden[row, :s.shape[0]] = s
                mask[row, :s.shape[0]] = 1
        return hidden, mask

    def split(self, valid_fraction: float, seed: int) -> tuple[list[int], list[int]]:
        """Deterministic (train, valid) item indices; valid is empty for one item or fraction 0."""
        if not 0.0 <= valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), found {valid_fraction}")
        n = len(self.items)
        n_valid = 0 if valid_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * valid_fraction)))
        order = np.random.default_rng([seed, 0x5EED]).permutation(n)
        return sorted(int(i) for i in order[n_valid:]), sorted(int(i) for i in order[:n_valid])


def caption_texts(source: str | os.PathLike) -> list[str]:
    """Caption texts of a corpus folder, a ``.jsonl`` manifest or a token cache folder (what
    :func:`conditioning.t5_builder.build_text_encoder` trains its vocabulary on).

    Per item: its description, and its metadata fields merged (``"genre: rock. bpm: 120"``),
    each when present. Items without a caption give nothing; order follows the corpus.
    """
    path = Path(source)
    if path.is_dir() and (path / INDEX_NAME).is_file():
        metas = [item.meta for item in TokenCache(path).items]
    else:
        metas = [entry.meta for entry in scan_corpus(path).entries]
    texts: list[str] = []
    for meta in metas:
        merged = plain_caption(replace(meta, description=None))
        texts.extend(t for t in (meta.description, merged) if t)
    if not texts:
        raise ValueError(f"{source}: expected captions (.txt/.json sidecars, manifest descriptions or "
                         f"metadata), found none")
    return texts


__all__ = [
    "CACHE_FORMAT", "CachedItem", "CodecTokenizer", "PrepareReport", "TokenCache", "caption_texts",
    "codec_fingerprint", "encode_text_states", "prepare_corpus", "text_encoder_fingerprint",
]
