"""LSTM over convolutional layout, with the skip connection EnCodec uses."""
from __future__ import annotations

import torch
from torch import nn


class StreamableLSTM(nn.Module):
    """``(B, C, T) -> (B, C, T)``; the state is kept only inside one call (see codec.streaming)."""

    def __init__(self, dimension: int, *, num_layers: int = 2, skip: bool = True) -> None:
        super().__init__()
        self.skip = skip
        self.lstm = nn.LSTM(dimension, dimension, num_layers)

    def forward(self, x: torch.Tensor,
                state: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        y, _ = self.step(x, state)
        return y

    def step(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Run on ``x`` from ``state``; returns the output and the state after the last step."""
        x = x.permute(2, 0, 1)  # (T, B, C), the layout nn.LSTM expects by default
        y, state = self.lstm(x, state)
        if self.skip:
            y = y + x
        return y.permute(1, 2, 0), state
