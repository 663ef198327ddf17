"""The `.ecdc` byte format: header, the codec layout that fixes the body's size, scales and
bit-packed codes (the entropy-coded body is :mod:`codec.arithmetic`'s). Every check on an
untrusted header is here; :mod:`codec.ecdc` reads and writes whole files with it.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .formats import weights_id

MAGIC = b"ECDC"
VERSION = 0
HEADER = struct.Struct("!4sBI")
SCALE = struct.Struct("!f")
# The metadata is ~60 bytes; anything much larger is not an .ecdc file.
MAX_METADATA_BYTES = 1 << 16
# Model names in a file are looked up in the models folder only; no paths, no traversal.
SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
WEIGHTS_ID = re.compile(r"^[0-9a-f]{8,64}$")
# Codecs whose files carry no weights id: the public presets, as the original writes them.
PUBLIC_CODECS = frozenset({"encodec_24khz", "encodec_48khz", "encodec_32khz", "encodec_16khz"})


class EcdcError(ValueError):
    """An .ecdc file that cannot be decoded: malformed, truncated, corrupted, or naming a model
    (or entropy-coding LM) that is not available. The message says what was expected."""


@dataclass(frozen=True)
class EcdcHeader:
    """The file's metadata: model name, audio length in samples, codebooks, LM used, and the
    codec's weights id (None: not recorded, as in the original's files)."""

    model_name: str
    audio_length: int
    num_codebooks: int
    use_lm: bool
    weights_id: str | None = None

    def to_bytes(self) -> bytes:
        """Header + JSON, byte-identical to the original's (`json.dumps` defaults, key order)
        when there is no weights id."""
        meta = {"m": self.model_name, "al": self.audio_length, "nc": self.num_codebooks,
                "lm": self.use_lm}
        if self.weights_id is not None:
            meta["w"] = self.weights_id
        raw = json.dumps(meta).encode("utf-8")
        return HEADER.pack(MAGIC, VERSION, len(raw)) + raw


@dataclass(frozen=True)
class CodecLayout:
    """What the container needs to know about a codec: the chunking and code sizes."""

    name: str
    sample_rate: int
    channels: int
    frame_rate: int
    num_codebooks: int
    codebook_size: int
    normalize: bool
    segment_length: int | None
    segment_stride: int | None
    weights_id: str | None = None

    @classmethod
    def from_model(cls, model) -> "CodecLayout":
        """From an `EncodecModel` (or anything with the same attributes); with its weights id
        unless it is one of `PUBLIC_CODECS`."""
        return cls(name=model.name, sample_rate=model.sample_rate, channels=model.channels,
                   frame_rate=model.frame_rate, num_codebooks=model.num_codebooks,
                   codebook_size=model.codebook_size, normalize=model.normalize,
                   segment_length=model.segment_length, segment_stride=model.segment_stride,
                   weights_id=identity_of(model))

    @classmethod
    def from_config(cls, config) -> "CodecLayout":
        """From an `EncodecConfig`, without building the model (same chunking rules)."""
        segment = None if config.segment is None else int(config.segment * config.sample_rate)
        stride = None if segment is None else max(1, int((1 - config.overlap) * segment))
        return cls(name=config.name, sample_rate=config.sample_rate, channels=config.channels,
                   frame_rate=config.frame_rate, num_codebooks=config.num_codebooks,
                   codebook_size=config.codebook_size, normalize=config.normalize,
                   segment_length=segment, segment_stride=stride)

    @property
    def bits_per_codebook(self) -> int:
        bits = self.codebook_size.bit_length() - 1
        if 1 << bits != self.codebook_size:
            raise ValueError(f"codebook size must be a power of 2, got {self.codebook_size}")
        return bits

    def chunk_frames(self, audio_length: int) -> Iterator[int]:
        """Frames in each chunk of `audio_length` samples, as the model's `encode` makes them."""
        segment = self.segment_length or audio_length
        stride = self.segment_stride or audio_length
        for offset in range(0, audio_length, stride):
            yield self.frames_for(min(segment, audio_length - offset))

    def count_chunks(self, audio_length: int) -> int:
        return -(-audio_length // (self.segment_stride or audio_length))

    def total_frames(self, audio_length: int) -> int:
        """Sum of `chunk_frames`, in O(1): only the last two chunks can be partial."""
        if self.segment_length is None or self.segment_stride is None:
            return self.frames_for(audio_length)
        full = max(0, self.count_chunks(audio_length) - 2)
        tail = self.chunk_frames(audio_length - full * self.segment_stride)
        return full * self.frames_for(self.segment_length) + sum(tail)

    def frames_for(self, num_samples: int) -> int:
        """ceil(num_samples * frame_rate / sample_rate), exactly (see the module docstring)."""
        return -(-num_samples * self.frame_rate // self.sample_rate)

    def header(self, audio_length: int, num_codebooks: int, use_lm: bool) -> EcdcHeader:
        """The header of a file this codec writes (its weights id included when it has one)."""
        return EcdcHeader(self.name, audio_length, num_codebooks, use_lm, self.weights_id)


def identity_of(model) -> str | None:
    """The weights id a file written by `model` records: None for `PUBLIC_CODECS` (files
    identical to the original's) and for objects that are not torch modules."""
    if model.name in PUBLIC_CODECS or not isinstance(model, torch.nn.Module):
        return None
    return weights_id(model)


def check_identity(header: EcdcHeader, layout: CodecLayout) -> None:
    """Refuse to decode a file with a codec whose weights differ from the writer's."""
    if header.weights_id is None or layout.weights_id is None:
        return
    if header.weights_id != layout.weights_id:
        raise EcdcError(f"file was written by codec {header.model_name!r} (weights "
                        f"{header.weights_id}); the codec given has weights {layout.weights_id}: "
                        f"pass the right codec (--model on the command line)")


def read_header(data: bytes | memoryview) -> tuple[EcdcHeader, int]:
    """Parse and check the header; returns it and the offset where the body starts."""
    if len(data) < HEADER.size:
        raise EcdcError(f"not an .ecdc file: {len(data)} bytes, shorter than the "
                        f"{HEADER.size}-byte header")
    magic, version, meta_size = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise EcdcError(f"not an .ecdc file: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise EcdcError(f"unsupported .ecdc version {version}, expected {VERSION}")
    if meta_size > MAX_METADATA_BYTES:
        raise EcdcError(f"metadata length {meta_size} exceeds {MAX_METADATA_BYTES} bytes")
    end = HEADER.size + meta_size
    if len(data) < end:
        raise EcdcError(f"file truncated in the metadata: {len(data)} bytes, header says {end}")
    try:
        meta = json.loads(bytes(data[HEADER.size:end]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise EcdcError(f"metadata is not valid UTF-8 JSON: {error}") from None
    if not isinstance(meta, dict):
        raise EcdcError(f"metadata must be a JSON object, got {type(meta).__name__}")
    missing = [key for key in ("m", "al", "nc", "lm") if key not in meta]
    if missing:
        raise EcdcError(f"metadata lacks {missing}; found keys {sorted(meta)[:10]}")
    name, length, codebooks, use_lm = meta["m"], meta["al"], meta["nc"], meta["lm"]
    if not isinstance(name, str) or not SAFE_NAME.match(name):
        raise EcdcError(f"metadata 'm' must be a model name, got {name!r:.80}")
    for key, value in (("al", length), ("nc", codebooks)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise EcdcError(f"metadata {key!r} must be a positive integer, got {value!r:.80}")
    if not isinstance(use_lm, bool):
        raise EcdcError(f"metadata 'lm' must be true or false, got {use_lm!r:.80}")
    weights = meta.get("w")
    if weights is not None and not (isinstance(weights, str) and WEIGHTS_ID.match(weights)):
        raise EcdcError(f"metadata 'w' must be a weights id (8 to 64 hex digits), got "
                        f"{weights!r:.80}")
    return EcdcHeader(name, length, codebooks, use_lm, weights), end


def read_scale(data: memoryview, pos: int) -> tuple[torch.Tensor, int]:
    """A chunk's float32 scale at byte ``pos``: ``(1, 1)`` and the next offset."""
    if len(data) < pos + SCALE.size:
        raise EcdcError("file truncated: a chunk's scale is missing")
    scale, = SCALE.unpack_from(data, pos)
    if not (math.isfinite(scale) and scale > 0):
        raise EcdcError(f"corrupted chunk scale {scale}: expected a positive finite number")
    return torch.tensor([[scale]], dtype=torch.float32), pos + SCALE.size


# Values are (un)packed this many at a time: a multiple of 8 values is a whole number of bytes
# for any width, and the bit planes of a block stay small.
_PACK_BLOCK = 1 << 15


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """`values` (n,) ints in [0, 2**bits) -> `bits`-bit values packed LSB-first, last byte
    zero-padded (the original's `BitPacker` then `flush`)."""
    values = np.asarray(values, dtype=np.int64).reshape(-1)
    shifts = np.arange(bits, dtype=np.int64)
    out = []
    for start in range(0, len(values), _PACK_BLOCK):
        planes = (values[start:start + _PACK_BLOCK, None] >> shifts) & 1
        out.append(np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little").tobytes())
    return b"".join(out)


def unpack_bits(data: bytes | memoryview, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: the first `count` values (int64) of `data`, which must hold
    at least `count * bits` bits."""
    raw = np.frombuffer(data, dtype=np.uint8)
    weights = np.int64(1) << np.arange(bits, dtype=np.int64)
    out = np.empty(count, dtype=np.int64)
    block_bytes = _PACK_BLOCK * bits // 8
    for index, start in enumerate(range(0, count, _PACK_BLOCK)):
        n = min(_PACK_BLOCK, count - start)
        chunk = raw[index * block_bytes: index * block_bytes + -(-n * bits // 8)]
        planes = np.unpackbits(chunk, bitorder="little")[: n * bits].reshape(n, bits)
        out[start:start + n] = planes.astype(np.int64) @ weights
    return out
