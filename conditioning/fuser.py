"""Condition fuser: routes each attribute's embedding into the LM input or its cross-attention.

Modes (audiocraft's ConditionFuser semantics):
- ``cross``: the conditions become the cross-attention source, concatenated along time in the
  order listed (MusicGen text-to-music: ``cross=("description",)``).
- ``prepend``: the conditions are put in front of the LM input, in the order listed, first
  listed first (MusicGen-melody: ``prepend=("self_wav", "description")`` gives
  ``[chroma, text, input]``, the order audiocraft and transformers' MusicgenMelody produce).
  Only on the first step of a streamed/cached generation: later steps pass ``prepend=False``.
- ``sum``: added to every input position; the condition must be (B, 1, D) or (B, T, D).
- ``input_interpolate``: resampled in time (nearest) to the input length, then added.
- ``ignore``: computed but not used.

Masks are passed along but not applied: padded positions of every condition already hold
zeros. audiocraft attends to those zeros (cross and prepend alike); transformers' MusicGen
masks them in cross-attention and, for the melody model, attends to the prepended ones. The LM
chooses; ``cross_mask`` and ``prepend_mask`` are there for it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .base import Condition

FUSE_MODES = ("cross", "prepend", "sum", "input_interpolate", "ignore")


@dataclass(frozen=True)
class FuserConfig:
    """Which attribute goes where; each attribute may appear in one mode only."""

    cross: tuple[str, ...] = ("description",)
    prepend: tuple[str, ...] = ()
    sum: tuple[str, ...] = ()
    input_interpolate: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    cross_attention_pos_emb: bool = False
    cross_attention_pos_emb_scale: float = 1.0

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for mode in FUSE_MODES:
            names = getattr(self, mode)
            if isinstance(names, str):
                raise TypeError(f"FuserConfig.{mode} must be a tuple of names, found the string {names!r}")
            for name in names:
                if name in seen:
                    raise ValueError(f"attribute {name!r} is fused twice: {seen[name]!r} and {mode!r}")
                seen[name] = mode

    def mode_of(self, name: str) -> str:
        for mode in FUSE_MODES:
            if name in getattr(self, mode):
                return mode
        raise KeyError(name)


FUSER_PRESETS: dict[str, FuserConfig] = {
    "text2music": FuserConfig(cross=("description",)),
    "chroma2music": FuserConfig(cross=(), prepend=("self_wav", "description")),
}


class FusedInput(NamedTuple):
    """The LM input after fusing.

    input: (B, P + T, D), P prepended positions then the T original ones.
    prepend_length: P.
    prepend_mask: (B, P) long masks of the prepended conditions (None when P == 0).
    cross: (B, S, D) cross-attention source, or None when no attribute is routed there.
    cross_mask: (B, S) long, or None.
    """

    input: torch.Tensor
    prepend_length: int
    prepend_mask: torch.Tensor | None
    cross: torch.Tensor | None
    cross_mask: torch.Tensor | None


def sinusoidal_embedding(positions: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """positions (..., S, 1) -> (..., S, dim): cat([cos, sin]) with phase pos / max_period^(i/(half-1))."""
    if dim % 2:
        raise ValueError(f"sinusoidal embedding needs an even dimension, found {dim}")
    half = dim // 2
    exponent = torch.arange(half, device=positions.device, dtype=torch.float32) / max(half - 1, 1)
    phase = positions.float() / torch.full((), max_period, device=positions.device) ** exponent
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


class ConditionFuser(nn.Module):
    """Fuses a dict of conditions into the LM input; no parameters."""

    def __init__(self, config: FuserConfig = FuserConfig()) -> None:
        super().__init__()
        self.config = config

    def forward(self, input: torch.Tensor, conditions: Mapping[str, Condition], *,
                prepend: bool = True) -> FusedInput:
        """input: (B, T, D) LM input embeddings; conditions: name -> Condition((B, S, D), (B, S)).

        ``prepend=False`` skips the prepend mode (steps after the first one of a cached decode).
        """
        if input.dim() != 3:
            raise ValueError(f"expected the LM input as (B, T, D), found shape {tuple(input.shape)}")
        unknown = sorted(n for n in conditions if not self._known(n))
        if unknown:
            raise KeyError(f"the fuser has no mode for attribute(s) {unknown}")
        batch, length, dim = input.shape
        for name, cond in conditions.items():
            emb = cond.embeddings
            # Only the cross-attention source may have its own width (its attention projects it).
            width = emb.shape[-1] if self.config.mode_of(name) == "cross" else dim
            if emb.dim() != 3 or emb.shape[0] != batch or emb.shape[2] != width:
                raise ValueError(f"condition {name!r}: expected (B={batch}, S, D={width}), "
                                 f"found {tuple(emb.shape)}")
            if cond.mask.shape != emb.shape[:2]:
                raise ValueError(f"condition {name!r}: mask {tuple(cond.mask.shape)} does not match "
                                 f"embeddings {tuple(emb.shape)}")

        input = self.summed(conditions, length, base=input)
        for name in self.config.input_interpolate:
            if name in conditions:
                emb = conditions[name].embeddings.transpose(1, 2)
                input = input + nn.functional.interpolate(emb, size=length).transpose(1, 2)

        prefix = [conditions[n] for n in self.config.prepend if n in conditions] if prepend else []
        prepend_mask = None
        if prefix:
            input = torch.cat([c.embeddings for c in prefix] + [input], dim=1)
            prepend_mask = torch.cat([c.mask for c in prefix], dim=1)

        cross_parts = [conditions[n] for n in self.config.cross if n in conditions]
        cross = cross_mask = None
        if len({c.embeddings.shape[-1] for c in cross_parts}) > 1:
            raise ValueError("cross-attention conditions must share one width, found "
                             f"{[c.embeddings.shape[-1] for c in cross_parts]}")
        if cross_parts:
            cross = torch.cat([c.embeddings for c in cross_parts], dim=1)
            cross_mask = torch.cat([c.mask for c in cross_parts], dim=1)
            if self.config.cross_attention_pos_emb:
                positions = torch.arange(cross.shape[1], device=cross.device).view(1, -1, 1)
                pos = sinusoidal_embedding(positions, cross.shape[-1]).to(cross.dtype)
                cross = cross + self.config.cross_attention_pos_emb_scale * pos
        prepend_length = input.shape[1] - length
        return FusedInput(input, prepend_length, prepend_mask, cross, cross_mask)

    def summed(self, conditions: Mapping[str, Condition], length: int,
               base: torch.Tensor | None = None) -> torch.Tensor | None:
        """``base`` plus the ``sum``-routed conditions present, in the config's order (None when
        neither): what :meth:`forward` adds to its input, and the LM's per-step ``frame_input``
        (:func:`conditioning.musical.summed_input`). Each must be ``(B, 1, D)`` or ``(B, length, D)``."""
        total = base
        for name in self.config.sum:
            if name in conditions:
                emb = conditions[name].embeddings
                if emb.shape[1] not in (1, length):
                    raise ValueError(f"condition {name!r} is summed to an input of length {length}: "
                                     f"expected length 1 or {length}, found {emb.shape[1]}")
                total = emb if total is None else total + emb
        return total

    def _known(self, name: str) -> bool:
        try:
            self.config.mode_of(name)
        except KeyError:
            return False
        return True

    def extra_repr(self) -> str:
        return repr(self.config)
