"""SEANet encoder and decoder (the EnCodec convolutional backbone).

Module indices inside ``model`` follow the original release (see REFERENCE.md), so that
state dicts of the original, audiocraft and (after translation) transformers load directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .conv import StreamableConv1d, StreamableConvTranspose1d
from .lstm import StreamableLSTM


@dataclass(frozen=True)
class SEANetConfig:
    channels: int = 1
    dimension: int = 128
    n_filters: int = 32
    n_residual_layers: int = 1
    ratios: tuple[int, ...] = (8, 5, 4, 2)  # decoder order; the encoder uses them reversed
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_base: int = 2
    causal: bool = False
    norm: str = "weight_norm"
    pad_mode: str = "reflect"
    true_skip: bool = False  # identity shortcut instead of a 1x1 conv
    compress: int = 2
    lstm: int = 2
    trim_right_ratio: float = 1.0

    @property
    def hop_length(self) -> int:
        hop = 1
        for ratio in self.ratios:
            hop *= ratio
        return hop


class SEANetResnetBlock(nn.Module):
    """``x + block(x)`` with block = ELU, conv k3 (dim -> dim/compress), ELU, conv k1 (back)."""

    def __init__(self, dim: int, *, dilation: int, cfg: SEANetConfig) -> None:
        super().__init__()
        hidden = dim // cfg.compress
        conv = dict(norm=cfg.norm, causal=cfg.causal, pad_mode=cfg.pad_mode)
        self.block = nn.Sequential(
            nn.ELU(alpha=1.0),
            StreamableConv1d(dim, hidden, cfg.residual_kernel_size, dilation=dilation, **conv),
            nn.ELU(alpha=1.0),
            StreamableConv1d(hidden, dim, 1, **conv),
        )
        self.shortcut: nn.Module = (nn.Identity() if cfg.true_skip
                                    else StreamableConv1d(dim, dim, 1, **conv))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.block(x)


def _residual_blocks(dim: int, cfg: SEANetConfig) -> list[nn.Module]:
    return [SEANetResnetBlock(dim, dilation=cfg.dilation_base ** j, cfg=cfg)
            for j in range(cfg.n_residual_layers)]


class SEANetEncoder(nn.Module):
    """``(B, channels, T) -> (B, dimension, ceil(T / hop_length))``."""

    def __init__(self, cfg: SEANetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        conv = dict(norm=cfg.norm, causal=cfg.causal, pad_mode=cfg.pad_mode)
        mult = 1
        layers: list[nn.Module] = [
            StreamableConv1d(cfg.channels, cfg.n_filters, cfg.kernel_size, **conv)]
        for ratio in reversed(cfg.ratios):
            layers += _residual_blocks(mult * cfg.n_filters, cfg)
            layers += [nn.ELU(alpha=1.0),
                       StreamableConv1d(mult * cfg.n_filters, mult * cfg.n_filters * 2,
                                        ratio * 2, stride=ratio, **conv)]
            mult *= 2
        if cfg.lstm:
            layers.append(StreamableLSTM(mult * cfg.n_filters, num_layers=cfg.lstm))
        layers += [nn.ELU(alpha=1.0),
                   StreamableConv1d(mult * cfg.n_filters, cfg.dimension, cfg.last_kernel_size,
                                    **conv)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class SEANetDecoder(nn.Module):
    """``(B, dimension, F) -> (B, channels, F * hop_length)``."""

    def __init__(self, cfg: SEANetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        conv = dict(norm=cfg.norm, causal=cfg.causal, pad_mode=cfg.pad_mode)
        mult = 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [
            StreamableConv1d(cfg.dimension, mult * cfg.n_filters, cfg.kernel_size, **conv)]
        if cfg.lstm:
            layers.append(StreamableLSTM(mult * cfg.n_filters, num_layers=cfg.lstm))
        for ratio in cfg.ratios:
            layers += [nn.ELU(alpha=1.0),
                       StreamableConvTranspose1d(mult * cfg.n_filters, mult * cfg.n_filters // 2,
                                                 ratio * 2, stride=ratio, norm=cfg.norm,
                                                 causal=cfg.causal,
                                                 trim_right_ratio=cfg.trim_right_ratio)]
            layers += _residual_blocks(mult * cfg.n_filters // 2, cfg)
            mult //= 2
        layers += [nn.ELU(alpha=1.0),
                   StreamableConv1d(cfg.n_filters, cfg.channels, cfg.last_kernel_size, **conv)]
        self.model = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z)
