"""The condition type every conditioner returns, and the provider that holds conditioners by name.

A batch of conditioning attributes is a mapping from attribute name (``"description"``,
``"self_wav"``) to one value per sample; ``None`` marks a sample that has no such attribute,
which every conditioner turns into its null condition. Classifier-free guidance and the
dropout modules only ever write ``None``, so the null condition is defined in one place per
conditioner.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn


class Condition(NamedTuple):
    """A dense condition and its validity mask.

    embeddings: (B, S, D) float; positions where ``mask`` is 0 hold zeros.
    mask: (B, S) int, 1 for a real position, 0 for padding or a null condition.
    """

    embeddings: torch.Tensor
    mask: torch.Tensor


def null_condition(like: Condition) -> Condition:
    """The unconditional counterpart of ``like``: zeros with an all-zero mask, same shapes.

    This is what transformers' MusicGen feeds as the guidance branch (zeros of the encoder
    states with a zero attention mask, which the projection + masking turns into zeros), and
    what audiocraft's empty description reduces to after its mask is applied.
    """
    return Condition(torch.zeros_like(like.embeddings), torch.zeros_like(like.mask))


def concat_batches(first: Condition, second: Condition) -> Condition:
    """Stack two conditions along the batch, zero-padding the shorter one in time.

    Used to put the conditional and unconditional rows of classifier-free guidance in one batch.
    """
    if first.embeddings.shape[-1] != second.embeddings.shape[-1]:
        raise ValueError(
            f"cannot batch conditions of dimension {first.embeddings.shape[-1]} and "
            f"{second.embeddings.shape[-1]}")
    length = max(first.mask.shape[1], second.mask.shape[1])

    def pad(cond: Condition) -> Condition:
        extra = length - cond.mask.shape[1]
        return Condition(nn.functional.pad(cond.embeddings, (0, 0, 0, extra)),
                         nn.functional.pad(cond.mask, (0, extra)))

    a, b = pad(first), pad(second)
    return Condition(torch.cat([a.embeddings, b.embeddings]), torch.cat([a.mask, b.mask]))


def batch_size_of(attributes: Mapping[str, Sequence[Any]]) -> int:
    """The common number of samples in a batch of attributes; raises if they disagree."""
    sizes = {name: len(values) for name, values in attributes.items()}
    if not sizes:
        raise ValueError("expected at least one conditioning attribute, found none")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"every attribute needs one value per sample; found sizes {sizes}")
    return next(iter(sizes.values()))


class ConditionProvider(nn.Module):
    """Runs each attribute through its conditioner.

    The conditioners live in ``self.conditioners`` (an ``nn.ModuleDict``) so that an LM holding
    this module as ``condition_provider`` has audiocraft's state-dict names, e.g.
    ``condition_provider.conditioners.description.output_proj.weight``.

    Each conditioner must have ``encode(values: Sequence[Any | None]) -> Condition``.
    """

    def __init__(self, conditioners: Mapping[str, nn.Module]) -> None:
        super().__init__()
        for name, conditioner in conditioners.items():
            if not callable(getattr(conditioner, "encode", None)):
                raise TypeError(f"conditioner {name!r} ({type(conditioner).__name__}) has no encode()")
        self.conditioners = nn.ModuleDict(dict(conditioners))

    @property
    def attributes(self) -> list[str]:
        return list(self.conditioners.keys())

    def forward(self, attributes: Mapping[str, Sequence[Any]], *, frames: int | None = None,
                start_frames: int | Sequence[int] = 0) -> dict[str, Condition]:
        """attributes: name -> one value (or None) per sample. Returns name -> Condition (B, S, D).

        An attribute this provider knows but the batch lacks is encoded as all-null, so a
        caller can pass only the description to a melody model. Time-aligned conditioners
        (``time_aligned = True``: the beat clock) need the window's ``frames`` and
        ``start_frames``; without ``frames`` they are left out of the result.
        """
        unknown = sorted(set(attributes) - set(self.conditioners))
        if unknown:
            raise KeyError(f"no conditioner for attribute(s) {unknown}; known: {self.attributes}")
        batch = batch_size_of(attributes)
        out = {}
        for name, conditioner in self.conditioners.items():
            values = attributes.get(name, [None] * batch)
            if getattr(conditioner, "time_aligned", False):
                if frames is not None:
                    out[name] = conditioner.encode(values, frames=frames, start_frames=start_frames)
            else:
                out[name] = conditioner.encode(values)
        return out
