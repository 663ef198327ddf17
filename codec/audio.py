"""Audio files for the codec: read, inspect, write (whole or block by block), and the one check
that audio is finite.

Audio is a float32 tensor shaped ``(C, T)`` (channels first, as the models take it) on the CPU.
Files are read with libsndfile through ``soundfile``; blocks are converted on the way with
:mod:`codec.resample`, and writes can normalize with :mod:`codec.loudness` (both re-exported
here). Writes go to a temporary file in the destination folder that is renamed at the end, so a
crash or an error never leaves a half-written file under the final name.
"""
from __future__ import annotations

import math
import os
import struct
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

# Conversion and normalization live in their own modules; ``codec.audio.X`` keeps naming them.
from .files import AtomicPath, atomic_path
from .loudness import (  # noqa: F401
    NORMALIZE_MODES,
    integrated_loudness,
    loudness_normalize,
    normalize_audio,
    peak_normalize,
)
from .resample import check_rate, convert_audio, convert_channels, resample  # noqa: F401

# Extension -> (libsndfile major format, subtype that must exist for it, or None).
_READ_EXTENSIONS: dict[str, tuple[str, str | None]] = {
    ".wav": ("WAV", None), ".flac": ("FLAC", None), ".ogg": ("OGG", "VORBIS"),
    ".oga": ("OGG", "VORBIS"), ".opus": ("OGG", "OPUS"), ".mp3": ("MP3", None),
    ".aiff": ("AIFF", None), ".aif": ("AIFF", None), ".au": ("AU", None), ".w64": ("W64", None),
    ".rf64": ("RF64", None), ".caf": ("CAF", None),
}
_WRITE_FORMATS: dict[str, str] = {".wav": "WAV", ".flac": "FLAC"}
SUBTYPES = ("PCM_16", "PCM_24", "FLOAT")
# Audio is expected in [-1, 1]; a peak beyond this is a scale error (e.g. int16 values as
# floats) or heavy clipping, worth a warning before it is encoded.
PEAK_WARNING = 4.0


class AudioError(ValueError):
    """An audio file could not be read or written; the message names the file."""


class PeakWarning(UserWarning):
    """Audio peaks far above 1.0: clipping, or samples on the wrong scale."""


def check_audio_values(wav: torch.Tensor, what: str = "audio", *, offset: int = 0,
                       sample_rate: int | None = None, warn: bool = True) -> float:
    """Refuse NaN/infinite samples in ``(..., T)`` audio; warn on peaks above ``PEAK_WARNING``.

    The codec turns a NaN into code 0 without a word, so every path that takes audio from a
    user (model.encode, .ecdc compress, streaming pushes, the CLI, melody conditioning) calls
    this first. ``what`` names the input in the message (a file name in the CLI); ``offset`` is
    the index of ``wav``'s first sample in the whole input (blocks, stream pushes), so the
    message gives the sample's position in the input. Returns the peak absolute value.
    """
    if wav.numel() == 0:
        return 0.0
    if wav.is_floating_point():
        finite = torch.isfinite(wav)
        if not bool(finite.all()):
            index = int((~finite).reshape(-1, wav.shape[-1]).any(0).nonzero()[0])
            column = wav[..., index].reshape(-1)
            value = float(column[~torch.isfinite(column)][0])
            where = f"sample {offset + index}"
            if sample_rate:
                where += f" ({(offset + index) / sample_rate:.3f} s)"
            raise ValueError(f"{what} holds a non-finite value ({value}) at {where}: audio must "
                             "be finite (no NaN or infinity), in [-1, 1]; repair or re-export "
                             "the input")
    peak = float(wav.detach().abs().max())
    if warn and peak > PEAK_WARNING:
        warnings.warn(f"{what}: peak amplitude {peak:.4g} is far above 1.0 (clipping or wrong "
                      "scale?); audio is expected in [-1, 1]", PeakWarning, stacklevel=2)
    return peak


@dataclass(frozen=True)
class AudioInfo:
    """What a file holds, from its header (``frames`` may be an estimate for mp3)."""

    path: str
    sample_rate: int
    channels: int
    frames: int
    format: str
    subtype: str

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


def readable_extensions() -> tuple[str, ...]:
    """File extensions this libsndfile build can decode (it reads by content, not name)."""
    formats = sf.available_formats()
    found = []
    for ext, (major, subtype) in _READ_EXTENSIONS.items():
        if major in formats and (subtype is None or subtype in sf.available_subtypes(major)):
            found.append(ext)
    return tuple(found)


def writable_extensions() -> tuple[str, ...]:
    return tuple(_WRITE_FORMATS)


def is_audio_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in readable_extensions()


def _read_error(path: str | os.PathLike, error: Exception) -> AudioError:
    if Path(path).suffix.lower() == ".mp3":  # libsndfile's own text is empty or misleading
        return AudioError(f"{str(path)} is not a readable MP3 file")
    return AudioError(f"cannot read audio file {str(path)!r}: {error}. Readable formats here: "
                      f"{', '.join(e.lstrip('.') for e in readable_extensions())}")


@contextmanager
def _quiet_decoder(path: str | os.PathLike) -> Iterator[None]:
    """Silence file descriptor 2 while libsndfile decodes an mp3.

    libmpg123 prints "Note: Illegal Audio-MPEG-Header ..." lines straight to the process's
    stderr on bad data; the error we raise says it better. Other formats are left alone, as
    the redirect also hides other threads' stderr for its duration.
    """
    if Path(path).suffix.lower() != ".mp3":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_RIFF_CHUNK = {b"RIFF": "<I", b"RIFX": ">I"}
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # streamed/RF64 WAVs: the size is not in the data chunk


def _wav_shortfall(path: str | os.PathLike) -> tuple[float, float] | None:
    """``(seconds the header declares, seconds the data holds)`` of a WAV whose data chunk is
    cut short, else None.

    libsndfile quietly shortens such a file to the samples present, so a download or copy
    that stopped halfway would be processed as if complete. Only the chunk headers are read.
    """
    with open(path, "rb") as handle:
        riff = handle.read(12)
        if len(riff) < 12 or riff[:4] not in _RIFF_CHUNK or riff[8:12] != b"WAVE":
            return None
        size_format = _RIFF_CHUNK[riff[:4]]
        file_size = os.fstat(handle.fileno()).st_size
        rate = align = 0
        for _ in range(1000):  # real files have a handful of chunks
            head = handle.read(8)
            if len(head) < 8:
                return None
            size = struct.unpack(size_format, head[4:])[0]
            start = handle.tell()
            if head[:4] == b"fmt ":
                fmt = handle.read(min(size, 16))
                if len(fmt) >= 14:
                    order = size_format[0]
                    rate = struct.unpack(order + "I", fmt[4:8])[0]
                    align = struct.unpack(order + "H", fmt[12:14])[0]
            elif head[:4] == b"data":
                present = file_size - start
                if size in _UNKNOWN_SIZES or not (rate and align) or present + align > size:
                    return None  # complete, or at most a partial frame short
                return size / align / rate, present // align / rate
            handle.seek(start + size + (size & 1))
    return None


def _check_complete(path: str | os.PathLike) -> None:
    shortfall = _wav_shortfall(path)
    if shortfall is not None:
        declared, present = shortfall
        raise AudioError(f"{str(path)} is truncated: header says {declared:.2f} s, data holds "
                         f"{present:.2f} s; copy or export the file again")


def _check_exists(path: str | os.PathLike) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"audio file not found: {str(path)!r}")
    if os.path.isdir(path):
        raise AudioError(f"expected an audio file, found a folder: {str(path)!r}")


def audio_info(path: str | os.PathLike) -> AudioInfo:
    _check_exists(path)
    try:
        with _quiet_decoder(path):
            info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError) as error:
        raise _read_error(path, error) from None
    _check_complete(path)
    return AudioInfo(str(path), int(info.samplerate), int(info.channels), int(info.frames),
                     info.format, info.subtype)


def read_audio(path: str | os.PathLike, *, start: int | None = None,
               frames: int | None = None) -> tuple[torch.Tensor, int]:
    """Read ``frames`` samples from sample ``start`` (both at the file's rate; None = all).

    Returns ``(wav, sample_rate)`` with ``wav`` a float32 tensor ``(C, T)`` in [-1, 1] for
    integer formats (float files are returned as stored: check them with
    :func:`check_audio_values`). A WAV whose data is shorter than its header says raises
    :class:`AudioError` ("truncated"), as do unreadable files.
    """
    _check_exists(path)
    if start is not None and start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if frames is not None and frames < 0:
        raise ValueError(f"frames must be >= 0 or None, got {frames}")
    _check_complete(path)
    try:
        with _quiet_decoder(path):
            data, sample_rate = sf.read(str(path), start=start or 0,
                                        frames=-1 if frames is None else frames,
                                        dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError) as error:
        raise _read_error(path, error) from None
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(sample_rate)


# -- writing ------------------------------------------------------------------------------
def atomic_output(path: str | os.PathLike) -> AtomicPath:
    """``with atomic_output(path) as tmp:``: a temporary file beside ``path``, renamed to ``path``
    only if the block succeeds (:func:`codec.files.atomic_path`; ``path`` is replaced). On any
    error the temporary file is removed and ``path`` is left as it was; an ``OSError`` names
    ``path``, not the temporary file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output path is a folder: {str(path)!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {str(path.parent)!r}")
    return atomic_path(path, overwrite=True)


def _write_format(path: Path, subtype: str) -> str:
    fmt = _WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise AudioError(f"cannot write {str(path)!r}: the extension decides the format, "
                         f"expected one of {', '.join(_WRITE_FORMATS)}")
    if subtype not in SUBTYPES:
        raise ValueError(f"subtype must be one of {SUBTYPES}, got {subtype!r}")
    if not sf.check_format(fmt, subtype):
        raise AudioError(f"cannot write {str(path)!r}: {fmt} does not hold {subtype} samples")
    return fmt


def _as_channels_first(wav: torch.Tensor | np.ndarray) -> torch.Tensor:
    wav = torch.as_tensor(wav)
    if wav.dim() == 1:
        wav = wav.unsqueeze(0)
    if wav.dim() != 2:
        raise ValueError(f"expected audio shaped (C, T) or (T,), got {tuple(wav.shape)}")
    if not wav.is_floating_point():
        raise ValueError(f"expected float audio, got {wav.dtype}")
    check_audio_values(wav, "audio to write", warn=False)  # clipping is warned about later
    return wav.detach().to("cpu", torch.float32)


def _clip_for_pcm(data: np.ndarray, subtype: str, where: str) -> np.ndarray:
    """Clip to [-1, 1] for integer subtypes, warning how much was lost."""
    if subtype == "FLOAT":
        return data
    over = int(np.count_nonzero(np.abs(data) > 1.0))
    if over:
        warnings.warn(f"{where}: {over} sample(s) exceed [-1, 1] (peak "
                      f"{float(np.abs(data).max()):.3f}) and are clipped in {subtype}; use "
                      f"normalize='peak' or subtype='FLOAT' to keep them", stacklevel=3)
        data = np.clip(data, -1.0, 1.0)
    return data


def write_audio(path: str | os.PathLike, wav: torch.Tensor | np.ndarray, sample_rate: int, *,
                subtype: str = "PCM_16", normalize: str | None = None, peak_db: float = -1.0,
                target_lufs: float = -14.0) -> Path:
    """Write ``(C, T)`` (or ``(T,)``) audio to a .wav or .flac file, atomically.

    ``normalize``: None (write as is; samples beyond [-1, 1] are clipped with a warning for
    integer subtypes), 'peak' (peak at ``peak_db`` dBFS) or 'loudness' (``target_lufs``,
    peak limited to ``peak_db``). Returns the path written.
    """
    path = Path(path)
    fmt = _write_format(path, subtype)
    sample_rate = check_rate("sample_rate", sample_rate)
    wav = normalize_audio(_as_channels_first(wav), sample_rate, normalize, peak_db=peak_db,
                          target_lufs=target_lufs)
    data = _clip_for_pcm(wav.T.numpy(), subtype, str(path))
    with atomic_output(path) as tmp:
        try:
            sf.write(str(tmp), data, sample_rate, format=fmt, subtype=subtype)
        except (sf.SoundFileError, RuntimeError) as error:
            raise _write_error(path, error) from None
    return path


def _write_error(path: Path, error: Exception) -> AudioError:
    """libsndfile names the hidden temporary file; the user asked for ``path``."""
    reason = getattr(error, "error_string", None) or type(error).__name__
    return AudioError(f"cannot write {str(path)!r}: {reason}")


class AudioFileWriter:
    """Write a long file block by block in bounded memory; renamed into place on ``close()``.

    Use as a context manager: an exception inside the block removes the partial file. No
    normalization (it needs the whole signal); clipping is counted and warned about once.
    """

    def __init__(self, path: str | os.PathLike, sample_rate: int, channels: int, *,
                 subtype: str = "PCM_16") -> None:
        self.path = Path(path)
        self.channels = channels
        self.subtype = subtype
        fmt = _write_format(self.path, subtype)
        sample_rate = check_rate("sample_rate", sample_rate)
        self._output = atomic_output(self.path)
        try:
            self._file = sf.SoundFile(str(self._output.tmp), "w", samplerate=sample_rate,
                                      channels=channels, format=fmt, subtype=subtype)
        except BaseException as error:
            self._output.discard()
            if isinstance(error, (sf.SoundFileError, RuntimeError)):
                raise _write_error(self.path, error) from None
            raise
        self._clipped = 0
        self.frames = 0

    def write(self, block: torch.Tensor | np.ndarray) -> None:
        """Append a ``(C, n)`` block."""
        block = _as_channels_first(block)
        if block.shape[0] != self.channels:
            raise ValueError(f"{str(self.path)!r} has {self.channels} channel(s), got a block "
                             f"shaped {tuple(block.shape)}")
        data = block.T.numpy()
        if self.subtype != "FLOAT":
            over = np.abs(data) > 1.0
            self._clipped += int(np.count_nonzero(over))
            data = np.clip(data, -1.0, 1.0)
        self._file.write(data)
        self.frames += data.shape[0]

    def close(self) -> None:
        self._file.close()
        self._output.commit()
        if self._clipped:
            warnings.warn(f"{str(self.path)}: {self._clipped} sample(s) exceeded [-1, 1] and "
                          f"were clipped in {self.subtype}", stacklevel=2)

    def abort(self) -> None:
        """Drop the partial file; ``path`` is left as it was."""
        self._file.close()
        self._output.discard()

    def __enter__(self) -> "AudioFileWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# -- blockwise reading --------------------------------------------------------------------
def iter_audio_blocks(path: str | os.PathLike, block_size: int, *,
                      sample_rate: int | None = None,
                      channels: int | None = None) -> Iterator[torch.Tensor]:
    """Yield ``(C, block_size)`` float32 blocks of a file (the last may be shorter).

    The file is converted to ``channels`` and resampled to ``sample_rate`` on the way (None
    keeps the file's). Resampler state carries across blocks, so the concatenated blocks equal
    ``convert_audio(*read_audio(path), sample_rate, channels)`` exactly, in bounded memory.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    info = audio_info(path)
    sr_out = info.sample_rate if sample_rate is None else check_rate("sample_rate", sample_rate)
    ch_out = info.channels if channels is None else channels
    convert_channels(torch.zeros(info.channels, 0), ch_out)  # fail before reading anything
    stream = None
    if sr_out != info.sample_rate:
        stream = soxr.ResampleStream(info.sample_rate, sr_out, ch_out, dtype="float32",
                                     quality="HQ")
    read_size = max(1024, math.ceil(block_size * info.sample_rate / sr_out))
    pending: list[np.ndarray] = []  # (n, C) pieces at the output rate, not yet yielded
    pending_len = 0
    try:
        with _quiet_decoder(path):
            handle = sf.SoundFile(str(path))
        with handle:
            while True:
                with _quiet_decoder(path):
                    data = handle.read(read_size, dtype="float32", always_2d=True)
                last = data.shape[0] < read_size
                data = convert_channels(torch.from_numpy(data.T), ch_out).T.numpy()
                if stream is not None:
                    data = stream.resample_chunk(np.ascontiguousarray(data), last=last)
                pending.append(data)
                pending_len += data.shape[0]
                while pending_len >= block_size or (last and pending_len):
                    merged = np.concatenate(pending) if len(pending) > 1 else pending[0]
                    block, rest = merged[:block_size], merged[block_size:]
                    pending, pending_len = [rest], rest.shape[0]
                    yield torch.from_numpy(np.ascontiguousarray(block.T))
                if last:
                    return
    except (sf.SoundFileError, RuntimeError) as error:
        raise _read_error(path, error) from None
