"""Training and validation batches cut from a token cache.

Training batches are a pure function of the position in the run (:class:`SegmentBatches`), so a
resumed run needs no data-loader state; validation batches are fixed (:func:`validation_batches`).
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from .corpus import CaptionAugmentation, augment_caption, plain_caption
from .token_cache import TokenCache


class Batch(NamedTuple):
    """codes: ``(B, K, T)`` long, padded with the special token past an item's end;
    frame_mask: ``(B, T)`` bool, true on real frames; captions: B texts (None = no caption);
    items: B item indices into the cache; starts: each window's first frame in its item."""

    codes: torch.Tensor
    frame_mask: torch.Tensor
    captions: list[str | None]
    items: list[int]
    starts: list[int]


class SegmentBatches:
    """Training batches as a pure function of the position in the run: resuming needs no state.

    Sample ``p`` of the run (``p = ((step * grad_accum + micro) * world + rank) * B + j``)
    is item ``perm_e[p % N]`` of epoch ``e = p // N`` (a fresh permutation per epoch from
    ``seed``); its crop offset and caption augmentation come from a generator seeded with
    ``(seed, p)``. Items shorter than the window are padded with ``special_token``. A share
    ``start_fraction`` of the windows begin at their item's first frame (the rest anywhere).
    """

    def __init__(self, cache: TokenCache, indices: Sequence[int], *, segment_frames: int, batch_size: int,
                 special_token: int, seed: int = 0,
                 augmentation: CaptionAugmentation = CaptionAugmentation(), start_fraction: float = 0.0) -> None:
        if not indices:
            raise ValueError("no training items")
        if segment_frames < 1 or batch_size < 1:
            raise ValueError(f"segment_frames and batch_size must be >= 1, found {segment_frames}, "
                             f"{batch_size}")
        if not 0.0 <= start_fraction <= 1.0:
            raise ValueError(f"start_fraction must be in [0, 1], found {start_fraction}")
        self.cache = cache
        self.indices = list(indices)
        # No wider than the longest item: padding only costs compute.
        self.segment_frames = min(segment_frames, max(cache.items[i].frames for i in self.indices))
        self.batch_size = batch_size
        self.special_token = special_token
        self.seed = seed
        self.augmentation = augmentation
        self.start_fraction = start_fraction
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
        if self.start_fraction and rng.random() < self.start_fraction:  # no draw when off: old runs unchanged
            start = 0
        return item, start, augment_caption(self.cache.items[item].meta, self.augmentation, rng)

    def batch(self, step: int, *, micro: int = 0, grad_accum: int = 1, rank: int = 0,
              world: int = 1) -> Batch:
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
    return Batch(codes, mask, list(captions), [i for i, _ in crops], [s for _, s in crops])


def validation_batches(cache: TokenCache, indices: Sequence[int], *, segment_frames: int, batch_size: int,
                       special_token: int) -> list[Batch]:
    """Fixed validation batches: each item's first window, its plain caption."""
    out = []
    for first in range(0, len(indices), batch_size):
        chunk = list(indices[first:first + batch_size])
        frames = min(segment_frames, max(cache.items[i].frames for i in chunk))
        captions = [plain_caption(cache.items[i].meta) for i in chunk]
        out.append(collate(cache, [(i, 0) for i in chunk], captions, frames, special_token))
    return out


__all__ = ["Batch", "SegmentBatches", "collate", "validation_batches"]
