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
                 with the LM: a fresh arithmetic coder and LM state (`codec.entropy_lm`), flushed
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

import io
import math
from pathlib import Path
from typing import BinaryIO

import torch

from . import registry
from .arithmetic import EntropyDecodingError, max_symbols_for_bits
from .binary import (PUBLIC_CODECS, SAFE_NAME, SCALE, CodecLayout, EcdcError, EcdcHeader,
                     check_identity, pack_bits, read_header, read_scale, unpack_bits)
from .config import PRESETS
from .entropy_lm import EntropyLM, decode_chunk, encode_chunk
from .files import CheckpointError, read_pickle, verify_sha256_prefix
from .formats import load_model
from .model import EncodedFrame

# Decoding refuses files that claim more audio than this by default (see `decompress`): the
# decoded audio is held in memory whole. Writing refuses longer audio by the same default, so
# every file we write decodes with the defaults; raise both with `max_duration=`
# (`--max-duration` on the command line).
DEFAULT_MAX_DURATION_S = 4 * 3600.0


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
def write_body(fileobj: BinaryIO, frames: list[EncodedFrame], layout: CodecLayout,
               lm: EntropyLM | None = None, *, lm_threads: int = 1) -> None:
    """Write the chunks of `frames` (codes `(1, K, F)`, scale `(1, 1)` or None); with `lm`
    entropy-coded, else bit-packed."""
    bits = layout.bits_per_codebook
    for codes, scale in frames:
        if layout.normalize:
            if scale is None:
                raise ValueError(f"{layout.name} normalizes chunks but a frame has no scale")
            fileobj.write(SCALE.pack(float(scale.reshape(-1)[0])))
        codes = codes[0].detach().cpu()
        if codes.numel() and not 0 <= int(codes.min()) <= int(codes.max()) < layout.codebook_size:
            raise ValueError(f"codes must be in [0, {layout.codebook_size}), found "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        if lm is not None:
            fileobj.write(encode_chunk(codes, lm, lm_threads))
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
    if not SAFE_NAME.match(model.name):
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
    scale_bytes = SCALE.size if layout.normalize else 0
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
            scale, pos = read_scale(data, pos)
        if header.use_lm:
            try:
                codes, pos = decode_chunk(data, pos, header.num_codebooks, num_frames, lm,
                                          lm_threads)
            except EntropyDecodingError as error:
                raise EcdcError(f"corrupted entropy-coded data in {error}") from None
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
    try:
        path = registry.find_codec(name, models_dir=models_dir)
        return load_model(path)
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
    reads it with `torch.load(weights_only=True)` (`codec.files`).

    Raises:
        FileNotFoundError: no such file (the message lists where it looked and how to get it).
        EcdcError: the file is not a matching entropy LM.
    """
    if isinstance(codec, str):
        if codec not in PRESETS:
            raise EcdcError(f"no preset {codec!r} to size its entropy LM; pass the model")
        layout = CodecLayout.from_config(PRESETS[codec])
    elif isinstance(codec, CodecLayout):
        layout = codec
    else:
        layout = CodecLayout.from_model(codec)
    path = Path(registry.find_codec(lm_name(layout.name), models_dir=models_dir))
    expected = registry.release_checksum(path.name)
    try:
        if expected is not None:
            verify_sha256_prefix(path, expected)
        state = read_pickle(path)
    except CheckpointError as error:
        raise EcdcError(str(error)) from None
    if not isinstance(state, dict):
        raise EcdcError(f"{path}: expected a state dict, found {type(state).__name__}")
    lm = EntropyLM.for_codec(num_codebooks=layout.num_codebooks, card=layout.codebook_size,
                             frame_rate=layout.frame_rate)
    try:
        lm.load_state_dict(state)
    except RuntimeError as error:
        raise EcdcError(f"{path}: not an entropy LM for {layout.name}: {error}") from None
    return lm.eval()


# Names of the byte format (codec.binary) that callers reach through this module.
__all__ = ["DEFAULT_MAX_DURATION_S", "PUBLIC_CODECS", "CodecLayout", "EcdcError", "EcdcHeader",
           "check_duration", "compress", "decompress", "lm_name", "load_entropy_lm",
           "parse_ecdc", "read_ecdc", "read_header", "write_body", "write_ecdc"]
