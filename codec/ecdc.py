"""The `.ecdc` compressed audio file of the original EnCodec release, read and written.

Layout (all big-endian)::

    header   struct '!4sBI': magic b'ECDC', version 0, length N of the metadata
    metadata N bytes of UTF-8 JSON {"m": model name, "al": audio length in samples,
             "nc": number of codebooks, "lm": entropy coded with the LM?[, "w": weights id]}
    body     per chunk (one per `segment_stride` samples for models with segments, e.g. one
             per 0.99 s at 48 kHz; a single chunk otherwise):
               float32 scale, when the model normalizes chunks;
               the chunk's codes frame-major (frame 0 codebooks 0..K-1, frame 1, ...):
                 without the LM: `log2(codebook_size)`-bit values packed LSB-first, the last
                 byte zero-padded;
                 with the LM: a fresh arithmetic coder and LM state (`codec.entropy`), flushed
                 to a whole byte.

The original release only has 1024-entry codebooks (10 bits). For the 2048-entry models
(`encodec_32khz`, `encodec_16khz`) values take 11 bits: an extension, which the original
decoder reads the same way since it also uses `log2(bins)`, but has no such models for.

Files are byte-identical to the original's for the same codes, and either implementation
decodes the other's. Two departures, both on inputs the original mishandles:

- The original decoder counts a chunk's frames as `ceil(length / sample_rate * frame_rate)` in
  floats, one too many for some lengths (e.g. 6720 samples at 24 kHz, 21 frames exactly), and
  then misreads or fails on files it wrote itself. Here the count is exact integer arithmetic,
  matching what the encoder produced.
- Untrusted input: every malformed file raises `EcdcError` (a `ValueError`) before any large
  allocation; see `parse_ecdc` for the checks.

Codec identity: a name alone does not pin the weights (two trained codecs may share one), so
files of codecs other than the public presets (`PUBLIC_CODECS`) also store "w", the first 8
hex digits of a sha256 over the codec's stored tensors (`codec.formats.weights_id`), and
decoding refuses a codec whose weights differ. The original decoder ignores unknown keys (it
reads "m", "al", "nc" and "lm" only), and files of the public presets carry no "w", so they
stay byte-identical to the original's.

Entropy coding is deterministic only for identical float arithmetic: like the original, a file
coded with the LM decodes reliably on the machine type (CPU kernels, torch/MKL build) that
coded it. The LM's probabilities also depend on torch's thread count, in the original too (they
differ between 1 and 2 threads, so its files need the thread count they were made with). Here
the LM always runs with `lm_threads` threads, 1 by default, whatever the caller's setting, so
our files do not depend on it; to read a file the original wrote with n threads, pass
`lm_threads=n` (slower: attention keys are then recomputed as the original does). Files
without the LM are portable.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import torch

from .entropy import (ArithmeticDecoder, ArithmeticEncoder, EntropyDecodingError, EntropyLM,
                      max_symbols_for_bits, quantized_cdf, symbol_bounds)
from .model import EncodedFrame

MAGIC = b"ECDC"
VERSION = 0
_HEADER = struct.Struct("!4sBI")
_SCALE = struct.Struct("!f")
# The metadata is ~60 bytes; anything much larger is not an .ecdc file.
MAX_METADATA_BYTES = 1 << 16
# Decoding refuses files that claim more audio than this by default (see `decompress`): the
# decoded audio is held in memory whole. Writing refuses longer audio by the same default, so
# every file we write decodes with the defaults; raise both with `max_duration=`
# (`--max-duration` on the command line).
DEFAULT_MAX_DURATION_S = 4 * 3600.0
# Model names in a file are looked up in the models folder only; no paths, no traversal.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_WEIGHTS_ID = re.compile(r"^[0-9a-f]{8,64}$")
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
        return _HEADER.pack(MAGIC, VERSION, len(raw)) + raw


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
    from .formats import weights_id

    return weights_id(model)


def check_identity(header: EcdcHeader, layout: CodecLayout) -> None:
    """Refuse to decode a file with a codec whose weights differ from the writer's."""
    if header.weights_id is None or layout.weights_id is None:
        return
    if header.weights_id != layout.weights_id:
        raise EcdcError(f"file was written by codec {header.model_name!r} (weights "
                        f"{header.weights_id}); the codec given has weights {layout.weights_id}: "
                        f"pass the right codec (--model on the command line)")


def check_duration(audio_length: int, sample_rate: int, max_duration: float | None, *,
                   what: str, option: str = "max_duration") -> None:
    """Refuse ``audio_length`` samples beyond ``max_duration`` seconds (None: no limit).

    Writers and readers call this with the same arguments, so a file is written only if it
    reads back with the same limit. ``what`` names the input; ``option`` the way to raise the
    limit (``max_duration=`` in Python, ``--max-duration`` on the command line).
    """
    if max_duration is None or audio_length <= max_duration * sample_rate:
        return
    seconds = audio_length / sample_rate
    setting = f"{option}{' ' if option.startswith('--') else '='}{math.ceil(seconds)}"
    raise EcdcError(f"{what} holds {seconds:.0f} s of audio ({audio_length} samples), more than "
                    f"the {option} of {max_duration:g} s; to accept it pass {setting} (or more) "
                    f"when compressing and when decompressing")


# -- writing ----------------------------------------------------------------------------
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


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the entropy LM with `threads` torch threads (the probabilities, hence the bits,
    depend on the thread count); restores the previous setting."""
    if threads < 1:
        raise ValueError(f"lm_threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    if previous != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if previous != threads:
            torch.set_num_threads(previous)


def encode_chunk_lm(codes: torch.Tensor, lm: EntropyLM, threads: int = 1) -> bytes:
    """Entropy-code one chunk's codes `(K, F)` with a fresh LM state and coder."""
    num_codebooks, num_frames = codes.shape
    codes_np = codes.cpu().numpy()
    coder = ArithmeticEncoder()
    with torch_threads(threads):
        state = lm.initial_state(num_codebooks, cache_keys=threads == 1)
        prev = None
        for t in range(num_frames):
            probs = lm.step(state, prev)
            starts, ends = symbol_bounds(quantized_cdf(probs[0].numpy()), codes_np[:, t])
            coder.push_bounds(starts, ends)
            prev = codes[:, t].view(1, num_codebooks)
    return coder.finish()


def write_body(fileobj: BinaryIO, frames: list[EncodedFrame], layout: CodecLayout,
               lm: EntropyLM | None = None, *, lm_threads: int = 1) -> None:
    """Write the chunks of `frames` (codes `(1, K, F)`, scale `(1, 1)` or None); with `lm`
    entropy-coded, else bit-packed."""
    bits = layout.bits_per_codebook
    for codes, scale in frames:
        if layout.normalize:
            if scale is None:
                raise ValueError(f"{layout.name} normalizes chunks but a frame has no scale")
            fileobj.write(_SCALE.pack(float(scale.reshape(-1)[0])))
        codes = codes[0].detach().cpu()
        if codes.numel() and not 0 <= int(codes.min()) <= int(codes.max()) < layout.codebook_size:
            raise ValueError(f"codes must be in [0, {layout.codebook_size}), found "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        if lm is not None:
            fileobj.write(encode_chunk_lm(codes, lm, lm_threads))
        else:
            fileobj.write(pack_bits(codes.t().numpy(), bits))


def write_ecdc(fileobj: BinaryIO, wav: torch.Tensor, sample_rate: int, model, *,
               bandwidth: float | None = None, num_codebooks: int | None = None,
               use_lm: bool = False, lm: EntropyLM | None = None,
               models_dir: str | Path | None = None, lm_threads: int = 1,
               max_duration: float | None = DEFAULT_MAX_DURATION_S) -> None:
    """Encode `wav` `(C, T)` with `model` and write an .ecdc file to `fileobj`.

    Args:
        sample_rate: must equal `model.sample_rate` (resample with `codec.audio.convert_audio`).
        bandwidth / num_codebooks: how many codebooks (at most one; neither = all).
        use_lm: entropy-code with the LM prior: ~25-40% smaller, slower.
        lm: the prior to use; default: the released one for `model.name`, found with
            `load_entropy_lm` in `models_dir`.
        lm_threads: torch threads for the LM (see the module docstring): 1 is fast and
            matches the original run single-threaded; n > 1 matches it run with n threads.
        max_duration: refuse audio longer than this many seconds (None: any), the limit
            `decompress` applies by default, so that what is written can be read back.
    Raises:
        ValueError: malformed or non-finite audio (NaN/inf, see `codec.audio.
            check_audio_values`); `EcdcError` for audio beyond `max_duration`.
    """
    if not isinstance(wav, torch.Tensor) or wav.dim() != 2:
        raise ValueError(f"wav must be a (channels, samples) tensor, got "
                         f"{tuple(wav.shape) if isinstance(wav, torch.Tensor) else type(wav)}")
    if sample_rate != model.sample_rate:
        raise ValueError(f"{model.name} takes {model.sample_rate} Hz audio, got {sample_rate} Hz; "
                         f"resample with codec.audio.convert_audio")
    if not _SAFE_NAME.match(model.name):
        raise ValueError(f"model name {model.name!r} cannot be stored in an .ecdc file "
                         f"(letters, digits, '_', '.', '-' only)")
    layout = CodecLayout.from_model(model)
    check_duration(wav.shape[-1], sample_rate, max_duration,
                   what="the audio to compress", option="max_duration")
    if use_lm and lm is None:
        lm = load_entropy_lm(layout, models_dir=models_dir)
    param = next(model.parameters(), None)
    device = param.device if param is not None else wav.device
    with torch.no_grad():
        frames = model.encode(wav[None].to(device), num_codebooks=num_codebooks,
                              bandwidth=bandwidth)
    header = layout.header(wav.shape[-1], frames[0].codes.shape[1], use_lm)
    # The decoder recomputes the frame counts from the length; they must be what encode made.
    made = [frame.codes.shape[-1] for frame in frames]
    if made != list(layout.chunk_frames(header.audio_length)):
        raise ValueError(f"{model.name} encoded {header.audio_length} samples into chunks of "
                         f"{made[:4]} frames; the .ecdc layout expects "
                         f"{list(layout.chunk_frames(header.audio_length))[:4]}")
    if use_lm:
        _check_lm(lm, layout, header.num_codebooks)
    fileobj.write(header.to_bytes())
    write_body(fileobj, frames, layout, lm if use_lm else None, lm_threads=lm_threads)


def compress(wav: torch.Tensor, sample_rate: int, model, bandwidth: float | None = None,
             num_codebooks: int | None = None, use_lm: bool = False, *,
             lm: EntropyLM | None = None, models_dir: str | Path | None = None,
             lm_threads: int = 1, max_duration: float | None = DEFAULT_MAX_DURATION_S) -> bytes:
    """Compress `wav` `(C, T)` to the bytes of an .ecdc file; see `write_ecdc`."""
    buffer = io.BytesIO()
    write_ecdc(buffer, wav, sample_rate, model, bandwidth=bandwidth, num_codebooks=num_codebooks,
               use_lm=use_lm, lm=lm, models_dir=models_dir, lm_threads=lm_threads,
               max_duration=max_duration)
    return buffer.getvalue()


# -- reading ----------------------------------------------------------------------------
def read_header(data: bytes | memoryview) -> tuple[EcdcHeader, int]:
    """Parse and check the header; returns it and the offset where the body starts."""
    if len(data) < _HEADER.size:
        raise EcdcError(f"not an .ecdc file: {len(data)} bytes, shorter than the "
                        f"{_HEADER.size}-byte header")
    magic, version, meta_size = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise EcdcError(f"not an .ecdc file: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise EcdcError(f"unsupported .ecdc version {version}, expected {VERSION}")
    if meta_size > MAX_METADATA_BYTES:
        raise EcdcError(f"metadata length {meta_size} exceeds {MAX_METADATA_BYTES} bytes")
    end = _HEADER.size + meta_size
    if len(data) < end:
        raise EcdcError(f"file truncated in the metadata: {len(data)} bytes, header says {end}")
    try:
        meta = json.loads(bytes(data[_HEADER.size:end]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise EcdcError(f"metadata is not valid UTF-8 JSON: {error}") from None
    if not isinstance(meta, dict):
        raise EcdcError(f"metadata must be a JSON object, got {type(meta).__name__}")
    missing = [key for key in ("m", "al", "nc", "lm") if key not in meta]
    if missing:
        raise EcdcError(f"metadata lacks {missing}; found keys {sorted(meta)[:10]}")
    name, length, codebooks, use_lm = meta["m"], meta["al"], meta["nc"], meta["lm"]
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
        raise EcdcError(f"metadata 'm' must be a model name, got {name!r:.80}")
    for key, value in (("al", length), ("nc", codebooks)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise EcdcError(f"metadata {key!r} must be a positive integer, got {value!r:.80}")
    if not isinstance(use_lm, bool):
        raise EcdcError(f"metadata 'lm' must be true or false, got {use_lm!r:.80}")
    weights = meta.get("w")
    if weights is not None and not (isinstance(weights, str) and _WEIGHTS_ID.match(weights)):
        raise EcdcError(f"metadata 'w' must be a weights id (8 to 64 hex digits), got "
                        f"{weights!r:.80}")
    return EcdcHeader(name, length, codebooks, use_lm, weights), end


def _read_scale(data: memoryview, pos: int) -> tuple[torch.Tensor, int]:
    if len(data) < pos + _SCALE.size:
        raise EcdcError("file truncated: a chunk's scale is missing")
    scale, = _SCALE.unpack_from(data, pos)
    if not (math.isfinite(scale) and scale > 0):
        raise EcdcError(f"corrupted chunk scale {scale}: expected a positive finite number")
    return torch.tensor([[scale]], dtype=torch.float32), pos + _SCALE.size


def decode_chunk_lm(data: memoryview, pos: int, num_codebooks: int, num_frames: int,
                    lm: EntropyLM, threads: int = 1) -> tuple[torch.Tensor, int]:
    """Entropy-decode one chunk starting at byte `pos`: codes `(K, F)` and the end offset.

    Codes are collected as they decode, so memory grows with the data actually decoded, not
    with the frame count the header claims."""
    decoder = ArithmeticDecoder(data, pos)
    decoded: list[list[int]] = []
    with torch_threads(threads):
        state = lm.initial_state(num_codebooks, cache_keys=threads == 1)
        prev = None
        for t in range(num_frames):
            probs = lm.step(state, prev)
            try:
                symbols = decoder.pull_many(quantized_cdf(probs[0].numpy()))
            except EntropyDecodingError as error:
                raise EcdcError(f"corrupted entropy-coded data in frame {t}: {error}") from None
            decoded.append(symbols)
            prev = torch.tensor([symbols])
    codes = torch.tensor(decoded, dtype=torch.long).reshape(num_frames, num_codebooks).t()
    return codes.contiguous(), decoder.position


def parse_ecdc(data: bytes | bytearray | memoryview, layout: CodecLayout,
               lm: EntropyLM | None = None, *,
               max_duration: float | None = DEFAULT_MAX_DURATION_S, lm_threads: int = 1,
               ) -> tuple[EcdcHeader, list[EncodedFrame]]:
    """Read an .ecdc file's header and codes without running the codec.

    Checks, all raising `EcdcError` before anything is allocated in proportion to the claimed
    length: magic, version, metadata size (<= `MAX_METADATA_BYTES`) and fields, model name
    equal to `layout.name` and weights id equal to `layout.weights_id` (when both have one),
    1 <= codebooks <= the model's, audio length <= `max_duration`
    seconds (None: no limit), the body size (exact without the LM; with it, at least 3 bytes
    per chunk and few enough symbols for the bits, see `max_symbols_for_bits`), scales
    positive and finite, entropy-coded bits decodable, and no bytes after the last chunk.
    """
    data = memoryview(data).cast("B")
    header, pos = read_header(data)
    if header.model_name != layout.name:
        raise EcdcError(f"file was compressed with {header.model_name!r}, the model given is "
                        f"{layout.name!r}")
    check_identity(header, layout)
    if header.num_codebooks > layout.num_codebooks:
        raise EcdcError(f"file says {header.num_codebooks} codebooks, {layout.name} has "
                        f"{layout.num_codebooks}")
    check_duration(header.audio_length, layout.sample_rate, max_duration, what="the file")
    if header.use_lm and lm is None:
        raise EcdcError("file is entropy coded; an EntropyLM is needed to read it")
    # Check the claimed sizes against the data before building anything per chunk.
    num_chunks = layout.count_chunks(header.audio_length)
    scale_bytes = _SCALE.size if layout.normalize else 0
    body_bytes = len(data) - pos
    bits = layout.bits_per_codebook
    if header.use_lm:
        _check_lm(lm, layout, header.num_codebooks)
        if body_bytes < num_chunks * (scale_bytes + 3):  # a coder writes >= 24 bits
            raise EcdcError(f"file truncated: {num_chunks} entropy-coded chunks need at least "
                            f"{num_chunks * (scale_bytes + 3)} bytes, found {body_bytes}")
        symbols = layout.total_frames(header.audio_length) * header.num_codebooks
        coded_bits = 8 * (body_bytes - num_chunks * scale_bytes)
        if symbols > max_symbols_for_bits(coded_bits, layout.codebook_size):
            raise EcdcError(f"file claims {symbols} codes, more than {coded_bits} entropy-coded "
                            f"bits can hold")
    else:
        expected = num_chunks * scale_bytes + _packed_size(layout, header)
        if body_bytes != expected:
            what = "truncated" if body_bytes < expected else "followed by unexpected bytes"
            raise EcdcError(f"file {what}: header implies a {expected}-byte body, found "
                            f"{body_bytes}")
    frames = []
    for num_frames in layout.chunk_frames(header.audio_length):
        scale = None
        if layout.normalize:
            scale, pos = _read_scale(data, pos)
        if header.use_lm:
            codes, pos = decode_chunk_lm(data, pos, header.num_codebooks, num_frames, lm,
                                         lm_threads)
        else:
            size = -(-num_frames * header.num_codebooks * bits // 8)
            values = unpack_bits(data[pos:pos + size], bits, num_frames * header.num_codebooks)
            codes = torch.from_numpy(values.reshape(num_frames, header.num_codebooks).T.copy())
            pos += size
        frames.append(EncodedFrame(codes[None], scale))
    if pos != len(data):
        raise EcdcError(f"{len(data) - pos} unexpected bytes after the last chunk")
    return header, frames


def _packed_size(layout: CodecLayout, header: EcdcHeader) -> int:
    """Bytes of bit-packed codes, each chunk padded to a whole byte, computed in O(1)."""
    def chunk_bytes(frames: int) -> int:
        return -(-frames * header.num_codebooks * layout.bits_per_codebook // 8)

    num_chunks = layout.count_chunks(header.audio_length)
    if num_chunks <= 2:
        return sum(map(chunk_bytes, layout.chunk_frames(header.audio_length)))
    full = num_chunks - 2  # all but the last two chunks are full segments
    tail = layout.chunk_frames(header.audio_length - full * layout.segment_stride)
    return full * chunk_bytes(layout.frames_for(layout.segment_length)) + \
        sum(map(chunk_bytes, tail))


def _check_lm(lm: EntropyLM, layout: CodecLayout, num_codebooks: int) -> None:
    if lm.card != layout.codebook_size or lm.num_codebooks < num_codebooks:
        raise EcdcError(f"entropy LM for {lm.num_codebooks} codebooks of {lm.card} codes cannot "
                        f"code {num_codebooks} codebooks of {layout.codebook_size} ({layout.name})")


def read_ecdc(fileobj: BinaryIO, model=None, *, lm: EntropyLM | None = None,
              models_dir: str | Path | None = None,
              max_duration: float | None = DEFAULT_MAX_DURATION_S,
              lm_threads: int = 1) -> tuple[torch.Tensor, int]:
    """Read an .ecdc file to its end and decode it; see `decompress`."""
    return decompress(fileobj.read(), model, lm=lm, models_dir=models_dir,
                      max_duration=max_duration, lm_threads=lm_threads)


def decompress(data: bytes | bytearray | memoryview, model=None, *, lm: EntropyLM | None = None,
               models_dir: str | Path | None = None,
               max_duration: float | None = DEFAULT_MAX_DURATION_S,
               lm_threads: int = 1) -> tuple[torch.Tensor, int]:
    """Decode .ecdc bytes to `(wav (C, T), sample_rate)`.

    Args:
        model: the codec; default: the model the file names, loaded with
            `codec.formats.load_model` from `models_dir` (names only, never paths).
        lm: the entropy-coding prior for files coded with it; default: `load_entropy_lm`.
        max_duration: refuse files claiming more audio than this many seconds (None: any);
            the decoded audio is held in memory whole. `write_ecdc` refuses to write longer
            audio by the same default, so our files always decode with the defaults.
        lm_threads: torch threads for the LM; must be what the file was coded with (see the
            module docstring).
    Raises:
        EcdcError: for any file that cannot be decoded, including unknown models.
    """
    header, _ = read_header(memoryview(data).cast("B"))
    if model is None:
        model = _load_named_model(header.model_name, models_dir)
    layout = CodecLayout.from_model(model)
    if header.use_lm and lm is None and header.model_name == layout.name:
        try:
            lm = load_entropy_lm(layout, models_dir=models_dir)
        except FileNotFoundError as error:
            raise EcdcError(str(error)) from None
    header, frames = parse_ecdc(data, layout, lm, max_duration=max_duration,
                                lm_threads=lm_threads)
    param = next(model.parameters(), None)
    if param is not None:
        frames = [EncodedFrame(codes.to(param.device),
                               None if scale is None else scale.to(param.device, param.dtype))
                  for codes, scale in frames]
    with torch.no_grad():
        wav = model.decode(frames)
    return wav[0, :, :header.audio_length], model.sample_rate


def _load_named_model(name: str, models_dir: str | Path | None):
    from . import formats, registry

    try:
        path = registry.resolve(name, models_dir=models_dir)
        return formats.load_model(path)
    except (FileNotFoundError, ValueError) as error:
        raise EcdcError(f"cannot load the model {name!r} the file was compressed with: "
                        f"{error}") from None


# -- the released LM priors ---------------------------------------------------------------
def lm_name(model_name: str) -> str:
    """Name of the entropy-coding LM of a codec: `encodec_24khz` -> `encodec_lm_24khz`."""
    if model_name.startswith("encodec_"):
        return "encodec_lm_" + model_name[len("encodec_"):]
    return model_name + "_lm"


def load_entropy_lm(codec: "str | CodecLayout", *,
                    models_dir: str | Path | None = None) -> EntropyLM:
    """Load the LM prior of a codec from the models folder.

    Args:
        codec: a codec preset name, a `CodecLayout`, or a model (anything `CodecLayout.
            from_model` takes); it fixes the LM's name (`encodec_24khz` -> `encodec_lm_24khz`)
            and its size (the released architecture for its codebooks and frame rate).
        models_dir: see `codec.registry`.

    Looks for the release file (`encodec_lm_24khz-1608e3c0.th`, `encodec_lm_48khz-7add9fc3.th`;
    the sha256 prefix in the name is verified) or `<LM name>.th` through `codec.registry`, and
    reads it with `torch.load(weights_only=True)`.

    Raises:
        FileNotFoundError: no such file (the message lists where it looked and how to get it).
        EcdcError: the file is not a matching entropy LM.
    """
    from . import registry
    from .model import PRESETS

    if isinstance(codec, str):
        if codec not in PRESETS:
            raise EcdcError(f"no preset {codec!r} to size its entropy LM; pass the model")
        layout = CodecLayout.from_config(PRESETS[codec])
    elif isinstance(codec, CodecLayout):
        layout = codec
    else:
        layout = CodecLayout.from_model(codec)
    path = Path(registry.resolve(lm_name(layout.name), models_dir=models_dir))
    expected = registry.release_checksum(path.name)
    if expected is not None:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if not digest.startswith(expected):
            raise EcdcError(f"{path}: sha256 {digest[:len(expected)]} does not match the "
                            f"{expected} in its name")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise EcdcError(f"{path}: expected a state dict, found {type(state).__name__}")
    lm = EntropyLM.for_codec(num_codebooks=layout.num_codebooks, card=layout.codebook_size,
                             frame_rate=layout.frame_rate)
    try:
        lm.load_state_dict(state)
    except RuntimeError as error:
        raise EcdcError(f"{path}: not an entropy LM for {layout.name}: {error}") from None
    return lm.eval()
