"""Lead-instrument conditioning: one learnt embedding per instrument name, summed into every LM step.

Why: the caption names the lead instrument, but through cross-attention the LM hardly reads it
(the shipped model's generations were recognized as the prompted instrument family at chance),
while the beat clock and key embedding (:mod:`conditioning.musical`), which say tempo and key at
every frame, moved those attributes. This does the same for the instrument.

The vocabulary is the set of lead instruments of the training corpus (the first name of each
item's ``instrument`` metadata, :func:`lead_instrument`), fixed when the conditioner is added and
stored with it. In training the value comes from the metadata; when generating, from the prompt:
the instrument it names first (:func:`parse_instrument`, whole words, case-insensitive, the
longest name at that position: "alto sax lead over piano" -> "alto sax"). An unknown or absent
instrument is the null condition (zeros), as is a dropped one.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .base import Condition

MAX_NAME_CHARS = 64


def normalize_name(name: str) -> str:
    """Lower case, single spaces: how names are compared."""
    return " ".join(str(name).lower().split())


def lead_instrument(meta) -> str | None:
    """The first instrument a track's metadata lists (:class:`lm.corpus.TrackMeta` joins a list with
    ", "): the lead, by the convention of the corpus recipe and audiocraft's captions; None if none."""
    field = getattr(meta, "instrument", None)
    if not field:
        return None
    first = normalize_name(field.split(",")[0])
    return first or None


def instrument_vocabulary(metas: Iterable, *, min_items: int = 1) -> tuple[str, ...]:
    """The lead instruments named by at least ``min_items`` of ``metas``, sorted."""
    counts = Counter(name for name in map(lead_instrument, metas) if name is not None)
    return tuple(sorted(name for name, n in counts.items() if n >= min_items))


class InstrumentParser:
    """Finds the first vocabulary name a text mentions (see the module docstring)."""

    def __init__(self, vocabulary: Sequence[str]) -> None:
        names = sorted({normalize_name(v) for v in vocabulary}, key=lambda v: (-len(v), v))
        if not names or any(not n or len(n) > MAX_NAME_CHARS for n in names):
            raise ValueError(f"an instrument vocabulary needs names of 1-{MAX_NAME_CHARS} characters, "
                             f"found {list(vocabulary)[:5]!r}")
        words = "|".join(r"\s+".join(map(re.escape, name.split())) for name in names)
        self.pattern = re.compile(rf"(?<![\w])({words})(?![\w])", re.IGNORECASE)

    def __call__(self, text: str | None) -> str | None:
        if not text:
            return None
        match = self.pattern.search(text)  # leftmost; the alternation lists longer names first
        return normalize_name(match.group(1)) if match else None


def parse_instrument(text: str | None, vocabulary: Sequence[str]) -> str | None:
    """The first instrument of ``vocabulary`` that ``text`` names, normalized; None if none."""
    return InstrumentParser(vocabulary)(text)


class InstrumentConditioner(nn.Module):
    """An instrument name (None or unknown = null) -> one embedding ``(B, 1, dim)``, zero at first."""

    def __init__(self, *, dim: int, vocabulary: Sequence[str]) -> None:
        super().__init__()
        names = tuple(normalize_name(v) for v in vocabulary)
        if len(set(names)) != len(names):
            repeated = sorted(n for n, c in Counter(names).items() if c > 1)
            raise ValueError(f"the instrument vocabulary repeats names: {repeated}")
        self.parse = InstrumentParser(names)
        self.vocabulary = names
        self.index = {name: i for i, name in enumerate(names)}
        self.dim = dim
        self.embedding = nn.Embedding(len(names), dim)
        nn.init.zeros_(self.embedding.weight)

    def encode(self, values: Sequence[str | None]) -> Condition:
        device = self.embedding.weight.device
        rows = [None if v is None else self.index.get(normalize_name(v)) for v in values]
        index = torch.tensor([0 if r is None else r for r in rows], device=device)
        mask = torch.tensor([r is not None for r in rows], dtype=torch.long, device=device)
        emb = self.embedding(index)[:, None] * mask[:, None, None].to(self.embedding.weight.dtype)
        return Condition(emb, mask[:, None])


__all__ = ["InstrumentConditioner", "InstrumentParser", "instrument_vocabulary", "lead_instrument",
           "normalize_name", "parse_instrument"]
