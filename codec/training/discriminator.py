"""Multi-scale STFT (MS-STFT) discriminator of the EnCodec paper.

Each sub-discriminator sees the complex STFT of the audio at one resolution (real and imaginary
parts as channels, ``(B, 2C, frames, freqs)``) through a stack of 2-D convolutions: a 3x9
input conv, three 3x9 convs strided by 2 along frequency with time dilations 1, 2, 4, a 3x3
conv and a 3x3 output conv to ``out_channels`` logits; LeakyReLU after every conv but the last.
The 24 kHz paper model uses 32 filters and five windows (2048, 1024, 512, 256, 128) with a hop
of a quarter window.

Module names and weight norm (``weight_g``/``weight_v``; none on the input conv) follow the
original release's ``encodec/msstftd.py``, so its state dicts load here and the outputs match
(``tests/test_codec_training.py`` checks this against the ``encodec`` package).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..conv import _WeightNormMixin

# audiocraft's order of the paper's five windows (its configs list 1024 first).
DEFAULT_WINDOWS = (1024, 2048, 512, 256, 128)


class WeightNormConv2d(_WeightNormMixin, nn.Conv2d):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_weight_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.current_weight(), self.bias)


class NormConv2d(nn.Module):
    """A Conv2d under ``.conv`` (the reference's nesting), weight-normed or plain."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], *,
                 stride: tuple[int, int] = (1, 1), dilation: tuple[int, int] = (1, 1),
                 weight_norm: bool = True) -> None:
        super().__init__()
        # Same-size padding for odd kernels, as the reference's get_2d_padding.
        padding = tuple((k - 1) * d // 2 for k, d in zip(kernel_size, dilation))
        conv_cls = WeightNormConv2d if weight_norm else nn.Conv2d
        self.conv = conv_cls(in_channels, out_channels, kernel_size, stride=stride,
                             dilation=dilation, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class STFTDiscriminator(nn.Module):
    """One resolution: ``(B, C, T)`` audio -> logits ``(B, out, frames, freqs')`` and the
    feature map after each hidden conv (``len(dilations) + 2`` maps of ``(B, F_l, frames, f_l)``).

    Needs ``T >= n_fft`` (no centring, as the reference).
    """

    def __init__(self, *, filters: int = 32, in_channels: int = 1, out_channels: int = 1,
                 n_fft: int = 1024, hop_length: int = 256, win_length: int | None = None,
                 max_filters: int = 1024, filters_scale: int = 1,
                 kernel_size: tuple[int, int] = (3, 9), dilations: Sequence[int] = (1, 2, 4),
                 stride: tuple[int, int] = (1, 2), normalized: bool = True,
                 negative_slope: float = 0.2) -> None:
        super().__init__()
        win_length = n_fft if win_length is None else win_length
        if not 0 < win_length <= n_fft or hop_length < 1:
            raise ValueError(f"need 0 < win_length <= n_fft and hop_length >= 1, got n_fft "
                             f"{n_fft}, win_length {win_length}, hop_length {hop_length}")
        self.in_channels = in_channels
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.win_length = win_length
        self.normalized = normalized
        self.negative_slope = negative_slope
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)
        self.convs = nn.ModuleList([NormConv2d(2 * in_channels, filters, kernel_size,
                                               weight_norm=False)])
        channels = min(filters_scale * filters, max_filters)
        for i, dilation in enumerate(dilations):
            out = min(filters_scale ** (i + 1) * filters, max_filters)
            self.convs.append(NormConv2d(channels, out, kernel_size, stride=stride,
                                         dilation=(dilation, 1)))
            channels = out
        out = min(filters_scale ** (len(dilations) + 1) * filters, max_filters)
        square = (kernel_size[0], kernel_size[0])
        self.convs.append(NormConv2d(channels, out, square))
        self.conv_post = NormConv2d(out, out_channels, square)

    def spectrogram(self, wav: torch.Tensor) -> torch.Tensor:
        """``(B, C, T)`` -> ``(B, 2C, frames, freqs)``: real parts of every channel, then
        imaginary parts; divided by the window's L2 norm when ``normalized``."""
        batch, channels, length = wav.shape
        if channels != self.in_channels:
            raise ValueError(f"discriminator expects {self.in_channels} channel(s), got {channels}")
        if length < self.n_fft:
            raise ValueError(f"audio of {length} samples is shorter than the discriminator's "
                             f"{self.n_fft}-sample window")
        with torch.autocast(device_type=wav.device.type, enabled=False):
            spec = torch.stft(wav.reshape(batch * channels, length).float(), self.n_fft,
                              self.hop_length, self.win_length, window=self.window, center=False,
                              return_complex=True)
            if self.normalized:
                spec = spec / self.window.pow(2).sum().sqrt()
        spec = spec.view(batch, channels, *spec.shape[1:])
        return torch.cat([spec.real, spec.imag], dim=1).transpose(2, 3)

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.spectrogram(wav)
        features = []
        for conv in self.convs:
            z = F.leaky_relu(conv(z), self.negative_slope)
            features.append(z)
        return self.conv_post(z), features


class MultiScaleSTFTDiscriminator(nn.Module):
    """Sub-discriminators at several STFT resolutions.

    ``forward`` gives one logits tensor and one list of feature maps per resolution.
    ``hop_lengths`` default to a quarter of each window.
    """

    def __init__(self, *, filters: int = 32, in_channels: int = 1, out_channels: int = 1,
                 n_ffts: Sequence[int] = DEFAULT_WINDOWS,
                 hop_lengths: Sequence[int] | None = None,
                 win_lengths: Sequence[int] | None = None, **kwargs) -> None:
        super().__init__()
        hop_lengths = [n // 4 for n in n_ffts] if hop_lengths is None else list(hop_lengths)
        win_lengths = list(n_ffts) if win_lengths is None else list(win_lengths)
        if not len(n_ffts) == len(hop_lengths) == len(win_lengths) or not n_ffts:
            raise ValueError(f"n_ffts, hop_lengths and win_lengths must be non-empty and of one "
                             f"length, got {len(n_ffts)}, {len(hop_lengths)}, {len(win_lengths)}")
        self.discriminators = nn.ModuleList(
            STFTDiscriminator(filters=filters, in_channels=in_channels, out_channels=out_channels,
                              n_fft=n, hop_length=h, win_length=w, **kwargs)
            for n, h, w in zip(n_ffts, hop_lengths, win_lengths))

    @property
    def min_length(self) -> int:
        """Shortest input in samples (the largest window)."""
        return max(d.n_fft for d in self.discriminators)

    def forward(self, wav: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """``(B, C, T)`` -> (logits per resolution, feature maps per resolution)."""
        logits, features = [], []
        for discriminator in self.discriminators:
            out, maps = discriminator(wav)
            logits.append(out)
            features.append(maps)
        return logits, features
