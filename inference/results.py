"""What the generator hands the LM (:class:`LMConditions`) and returns (:class:`GeneratedAudio`)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class LMConditions(NamedTuple):
    """What :meth:`lm.LMModel.generate` / ``forward`` take: rows ``R`` = B, or 2B for guidance.

    condition: ``(R, S, dim)`` cross-attention source, ``condition_mask (R, S)`` (None: attend to
    all positions); prefix: ``(R, P, dim)`` prepended to the sequence, ``prefix_mask (R, P)``.
    guided: the rows are ``[conditional; unconditional]`` (R = 2B); ``generate(guided=...)`` takes
    it, so the LM checks the rows rather than deciding guidance again.
    """

    condition: torch.Tensor | None
    condition_mask: torch.Tensor | None
    prefix: torch.Tensor | None
    prefix_mask: torch.Tensor | None
    frame_input: torch.Tensor | None = None  # (R, steps, dim): tempo/key, per window (_token_pieces)
    guided: bool = False

    def as_kwargs(self) -> dict[str, torch.Tensor | None]:
        """The tensors, as keyword arguments of the LM's ``forward`` (and ``generate``)."""
        return {name: getattr(self, name) for name in self._fields if name != "guided"}


class GeneratedAudio(NamedTuple):
    """wav: ``(B, C, T)`` float32; sample_rate in Hz."""

    wav: torch.Tensor
    sample_rate: int


class GeneratedAudioTokens(NamedTuple):
    """wav: ``(B, C, T)`` float32; sample_rate in Hz; tokens: codes ``(B, K, frames)``."""

    wav: torch.Tensor
    sample_rate: int
    tokens: torch.Tensor


__all__ = ["GeneratedAudio", "GeneratedAudioTokens", "LMConditions"]
