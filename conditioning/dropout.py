"""Condition dropout for training: classifier-free guidance, per-attribute, and T5 word dropout.

All three work on attributes before encoding (name -> one value per sample) and drop by writing
``None``, which each conditioner encodes as its null condition. Randomness comes from a
``torch.Generator`` owned by the module, so a seed gives the same drops on every run.

audiocraft's modules draw once per batch: ``ClassifierFreeGuidanceDropout`` nulls every
attribute of every sample with probability p (MusicGen: 0.3 text-only, 0.2 melody), and
``AttributeDropout`` nulls one attribute for the whole batch with its own probability (melody:
``self_wav`` 0.5). That is the default here; ``per_sample=True`` draws for each sample instead.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .base import batch_size_of

Attributes = Mapping[str, Sequence[Any]]


def _check_probability(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], found {p}")


def _draws(p: float, count: int, generator: torch.Generator) -> list[bool]:
    return (torch.rand(count, generator=generator) < p).tolist()


def drop_words(texts: Sequence[str | None], p: float, generator: torch.Generator) -> list[str | None]:
    """Drop each space-separated word with probability p (MusicGen's T5 word dropout, 0.3).

    Words are split on single spaces and re-joined with single spaces as audiocraft does, so a
    text whose words are all dropped becomes "" (which the audiocraft-style T5 conditioner then
    treats as null). ``None`` stays ``None``.
    """
    _check_probability("word dropout", p)
    out: list[str | None] = []
    for text in texts:
        if text is None:
            out.append(None)
            continue
        words = text.split(" ")
        keep = _draws(1.0 - p, len(words), generator) if p > 0 else [True] * len(words)
        out.append(" ".join(w for w, k in zip(words, keep, strict=True) if k))
    return out


class _SeededDropout(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def reset(self, seed: int | None = None) -> None:
        """Restart the random stream (from ``seed``, or the constructor's)."""
        self.generator.manual_seed(self.seed if seed is None else seed)


class ClassifierFreeGuidanceDropout(_SeededDropout):
    """Null all attributes with probability p so the model also learns p(x) for guidance.

    Active only in training mode. ``per_sample=False`` (audiocraft) draws once for the batch;
    ``per_sample=True`` draws once per sample and nulls all attributes of the chosen samples.
    """

    def __init__(self, p: float = 0.3, *, per_sample: bool = False, seed: int = 1234) -> None:
        super().__init__(seed)
        _check_probability("classifier-free guidance dropout", p)
        self.p = p
        self.per_sample = per_sample

    def forward(self, attributes: Attributes) -> dict[str, list[Any]]:
        out = {name: list(values) for name, values in attributes.items()}
        if not self.training or self.p == 0.0:
            return out
        batch = batch_size_of(attributes)
        drops = _draws(self.p, batch, self.generator) if self.per_sample else \
            _draws(self.p, 1, self.generator) * batch
        for values in out.values():
            for i, drop in enumerate(drops):
                if drop:
                    values[i] = None
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}, per_sample={self.per_sample}"


class AttributeDropout(_SeededDropout):
    """Null each attribute independently with its own probability, e.g. {"self_wav": 0.5}.

    Attributes not named are never dropped. Draws are made in the order of ``p``'s keys, one per
    attribute for the batch (audiocraft) or, with ``per_sample=True``, one per attribute and
    sample. Off in eval mode unless ``active_on_eval``.
    """

    def __init__(self, p: Mapping[str, float], *, per_sample: bool = False,
                 active_on_eval: bool = False, seed: int = 1234) -> None:
        super().__init__(seed)
        for name, prob in p.items():
            _check_probability(f"dropout of {name!r}", prob)
        self.p = dict(p)
        self.per_sample = per_sample
        self.active_on_eval = active_on_eval

    def forward(self, attributes: Attributes) -> dict[str, list[Any]]:
        out = {name: list(values) for name, values in attributes.items()}
        if not (self.training or self.active_on_eval):
            return out
        batch = batch_size_of(attributes)
        for name, prob in self.p.items():
            # Draw even for absent attributes so the stream does not depend on which are present.
            drops = _draws(prob, batch, self.generator) if self.per_sample else \
                _draws(prob, 1, self.generator) * batch
            if name not in out:
                continue
            for i, drop in enumerate(drops):
                if drop:
                    out[name][i] = None
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}, per_sample={self.per_sample}, active_on_eval={self.active_on_eval}"
