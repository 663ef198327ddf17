"""Random fixed-length clips from a folder of audio, for codec training.

Clip ``i`` is a pure function of ``(seed, i)``: which file (drawn with probability proportional
to its duration, so every second of the corpus is equally likely) and where in it. The trainer
asks for clips ``step * batch .. (step + 1) * batch - 1`` (offset per process), so a resumed run
reads exactly the clips the uninterrupted run would have, with any number of loader workers.

Files are read at their own rate and converted to the codec's rate and channel count with
:func:`codec.audio.convert_audio`; files shorter than a clip are zero-padded on the right.
Unreadable or empty files are skipped when the folder is scanned and listed in the result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from .. import audio

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, index) over seeds


@dataclass(frozen=True)
class AudioFile:
    path: Path
    sample_rate: int
    channels: int
    frames: int


@dataclass(frozen=True)
class Corpus:
    """The usable files of a folder and those skipped, with the reason."""

    files: tuple[AudioFile, ...]
    skipped: tuple[tuple[Path, str], ...]

    @property
    def duration(self) -> float:
        return sum(f.frames / f.sample_rate for f in self.files)


def scan_audio_folder(folder: str | Path) -> Corpus:
    """Every readable, non-empty audio file under ``folder`` (recursively, sorted by path)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"audio folder not found: {str(root)!r}")
    extensions = audio.readable_extensions()
    files, skipped = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if path.suffix.lower() not in extensions:
            continue
        try:
            info = audio.audio_info(path)
        except (audio.AudioError, OSError) as error:
            skipped.append((path, str(error)))
            continue
        if info.frames <= 0:
            skipped.append((path, "no audio (0 samples)"))
            continue
        files.append(AudioFile(path, info.sample_rate, info.channels, info.frames))
    if not files:
        raise ValueError(f"no readable audio files ({', '.join(extensions)}) in {str(root)!r}"
                         + (f"; {len(skipped)} skipped, e.g. {skipped[0][1]}" if skipped else ""))
    return Corpus(tuple(files), tuple(skipped))


class RandomClips(Dataset):
    """``dataset[i]`` -> clip ``(channels, segment_samples)`` float32 at ``sample_rate``.

    Indices are unbounded (any ``i >= 0``); the same ``(seed, i)`` always gives the same clip.
    """

    def __init__(self, files: tuple[AudioFile, ...] | list[AudioFile], *, sample_rate: int,
                 channels: int, segment_samples: int, seed: int = 0) -> None:
        if not files:
            raise ValueError("RandomClips needs at least one file")
        if segment_samples < 1:
            raise ValueError(f"segment_samples must be >= 1, got {segment_samples}")
        self.files = tuple(files)
        self.sample_rate = sample_rate
        self.channels = channels
        self.segment_samples = segment_samples
        self.seed = seed
        durations = torch.tensor([f.frames / f.sample_rate for f in self.files],
                                 dtype=torch.float64)
        self._cumulative = durations.cumsum(0) / durations.sum()

    def locate(self, index: int) -> tuple[AudioFile, int]:
        """The file clip ``index`` comes from and its first sample at the file's rate."""
        if index < 0:
            raise IndexError(f"clip index must be >= 0, got {index}")
        generator = torch.Generator().manual_seed((self.seed * _MIX + index) % (1 << 63))
        u, v = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        which = min(int(torch.searchsorted(self._cumulative, torch.tensor([u], dtype=torch.float64),
                                           right=True)), len(self.files) - 1)
        file = self.files[which]
        room = file.frames - self._source_frames(file)
        return file, int(v * (room + 1)) if room > 0 else 0

    def _source_frames(self, file: AudioFile) -> int:
        """Samples at the file's rate that give a full clip after resampling."""
        return math.ceil(self.segment_samples * file.sample_rate / self.sample_rate)

    def __getitem__(self, index: int) -> torch.Tensor:
        file, start = self.locate(index)
        wav, sr = audio.read_audio(file.path, start=start, frames=self._source_frames(file))
        wav = audio.convert_audio(wav, sr, self.sample_rate, self.channels)
        wav = wav[:, : self.segment_samples]
        if wav.shape[-1] < self.segment_samples:
            wav = torch.nn.functional.pad(wav, (0, self.segment_samples - wav.shape[-1]))
        return wav.contiguous()


class StepBatchSampler(Sampler[list[int]]):
    """Batches of clip indices for steps ``start_step, start_step + 1, ...`` (forever).

    Process ``rank`` of ``world_size`` gets clips ``((step * world_size + rank) * batch_size
    + j)``: disjoint across processes, fixed per step.
    """

    def __init__(self, *, batch_size: int, start_step: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size < 1 or start_step < 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler arguments: batch_size {batch_size}, start_step "
                             f"{start_step}, rank {rank}, world_size {world_size}")
        self.batch_size = batch_size
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            first = (step * self.world_size + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))
            step += 1


def skipped_message(corpus: Corpus, limit: int = 5) -> str | None:
    """One line naming the skipped files (the first ``limit``) and why; None if none."""
    if not corpus.skipped:
        return None
    listed = "; ".join(f"{p}: {why}" for p, why in corpus.skipped[:limit])
    more = f" (and {len(corpus.skipped) - limit} more)" if len(corpus.skipped) > limit else ""
    return f"skipped {len(corpus.skipped)} unreadable audio file(s): {listed}{more}"
