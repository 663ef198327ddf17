"""Streamable 1-D convolutions with EnCodec's padding rules and normalizations.

Module nesting reproduces the original release's state-dict keys:
``<name>.conv.conv.weight_g|weight_v|bias`` (weight norm), ``<name>.conv.conv.weight`` plus
``<name>.conv.norm.weight|bias`` (time group norm), ``<name>.convtr.convtr.*`` for transposed
convolutions.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

NORMS = ("none", "weight_norm", "time_group_norm")
PAD_MODES = ("reflect", "constant", "replicate", "circular")


def _weight_norm(weight_v: torch.Tensor, weight_g: torch.Tensor) -> torch.Tensor:
    # Same kernel torch's weight norm uses, so weights are bitwise identical to the references.
    return torch._weight_norm(weight_v, weight_g, 0)


class _WeightNormMixin:
    """Holds ``weight_g``/``weight_v`` (norm over every dim but the first) instead of ``weight``.

    ``fold()`` computes the plain weight once, for inference.
    """

    def _init_weight_norm(self) -> None:
        weight = self.weight.detach()
        del self.weight
        norm = weight.flatten(1).norm(dim=1).view(-1, *([1] * (weight.dim() - 1)))
        self.weight_g = nn.Parameter(norm.clone())
        self.weight_v = nn.Parameter(weight.clone())
        self.folded = False

    def current_weight(self) -> torch.Tensor:
        if self.folded:
            return self.weight
        return _weight_norm(self.weight_v, self.weight_g)

    def fold(self) -> None:
        if self.folded:
            return
        weight = _weight_norm(self.weight_v, self.weight_g).detach()
        del self.weight_g, self.weight_v
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.folded = True


class WeightNormConv1d(_WeightNormMixin, nn.Conv1d):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_weight_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.current_weight(), self.bias)


class WeightNormConvTranspose1d(_WeightNormMixin, nn.ConvTranspose1d):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_weight_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose1d(x, self.current_weight(), self.bias, self.stride, self.padding,
                                  self.output_padding, self.groups, self.dilation)


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown conv normalization {norm!r}; expected one of {NORMS}")


class NormConv1d(nn.Module):
    """Conv1d followed by its normalization (identity unless ``time_group_norm``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True, norm: str = "none") -> None:
        super().__init__()
        _check_norm(norm)
        conv_cls = WeightNormConv1d if norm == "weight_norm" else nn.Conv1d
        self.conv = conv_cls(in_channels, out_channels, kernel_size, stride=stride,
                             dilation=dilation, groups=groups, bias=bias)
        self.norm = nn.GroupNorm(1, out_channels) if norm == "time_group_norm" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class NormConvTranspose1d(nn.Module):
    """ConvTranspose1d followed by its normalization (identity unless ``time_group_norm``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 bias: bool = True, norm: str = "none") -> None:
        super().__init__()
        _check_norm(norm)
        conv_cls = WeightNormConvTranspose1d if norm == "weight_norm" else nn.ConvTranspose1d
        self.convtr = conv_cls(in_channels, out_channels, kernel_size, stride=stride, bias=bias)
        self.norm = nn.GroupNorm(1, out_channels) if norm == "time_group_norm" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.convtr(x))


def extra_padding_for_conv1d(length: int, kernel_size: int, stride: int, padding_total: int) -> int:
    """Right padding so that the last window is full (no sample is dropped by the conv).

    ``kernel_size`` is the effective (dilated) kernel size.
    """
    n_frames = (length - kernel_size + padding_total) / stride + 1
    ideal_length = (math.ceil(n_frames) - 1) * stride + (kernel_size - padding_total)
    return ideal_length - length


def pad1d(x: torch.Tensor, paddings: tuple[int, int], mode: str = "constant",
          value: float = 0.0) -> torch.Tensor:
    """``F.pad`` that also reflects inputs shorter than the padding.

    As the references do, a too-short input is zero-extended on the right first, reflected,
    and the zero extension is cut off again.
    """
    left, right = paddings
    if mode != "reflect":
        return F.pad(x, paddings, mode, value) if mode == "constant" else F.pad(x, paddings, mode)
    length = x.shape[-1]
    max_pad = max(left, right)
    extra = 0
    if length <= max_pad:
        extra = max_pad - length + 1
        x = F.pad(x, (0, extra))
    padded = F.pad(x, paddings, mode)
    return padded[..., : padded.shape[-1] - extra]


class StreamableConv1d(nn.Module):
    """Conv1d with EnCodec's causal or centred padding; L samples in -> ceil(L / stride) out.

    Shapes: ``(B, C_in, T) -> (B, C_out, ceil(T / stride))``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True, causal: bool = False,
                 norm: str = "none", pad_mode: str = "reflect") -> None:
        super().__init__()
        if pad_mode not in PAD_MODES:
            raise ValueError(f"unknown pad mode {pad_mode!r}; expected one of {PAD_MODES}")
        self.conv = NormConv1d(in_channels, out_channels, kernel_size, stride=stride,
                               dilation=dilation, groups=groups, bias=bias, norm=norm)
        self.causal = causal
        self.pad_mode = pad_mode
        self.kernel_size = (kernel_size - 1) * dilation + 1  # effective
        self.stride = stride
        self.padding_total = self.kernel_size - stride

    def paddings(self, length: int) -> tuple[int, int]:
        extra = extra_padding_for_conv1d(length, self.kernel_size, self.stride, self.padding_total)
        if self.causal:
            return self.padding_total, extra
        right = self.padding_total // 2
        return self.padding_total - right, right + extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad1d(x, self.paddings(x.shape[-1]), mode=self.pad_mode)
        return self.conv(x)


class StreamableConvTranspose1d(nn.Module):
    """Transposed conv that trims ``kernel_size - stride`` samples: T in -> T * stride out.

    Causal: ``trim_right_ratio`` of the trim is taken on the right (1.0 = all of it).
    Non-causal: ``padding_total // 2`` on the right, the rest on the left.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 bias: bool = True, causal: bool = False, norm: str = "none",
                 trim_right_ratio: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= trim_right_ratio <= 1.0:
            raise ValueError(f"trim_right_ratio must be in [0, 1], got {trim_right_ratio}")
        if not causal and trim_right_ratio != 1.0:
            raise ValueError("trim_right_ratio != 1 only makes sense for causal convolutions")
        self.convtr = NormConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride,
                                          bias=bias, norm=norm)
        self.causal = causal
        self.kernel_size = kernel_size
        self.stride = stride
        padding_total = kernel_size - stride
        if causal:
            right = math.ceil(padding_total * trim_right_ratio)
        else:
            right = padding_total // 2
        self.trim = (padding_total - right, right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.convtr(x)
        left, right = self.trim
        return y[..., left: y.shape[-1] - right]


def fold_weight_norm(module: nn.Module) -> int:
    """Replace every weight-normed conv's ``weight_g``/``weight_v`` by a plain weight.

    Returns how many convolutions were folded.
    """
    count = 0
    for sub in module.modules():
        if isinstance(sub, _WeightNormMixin) and not sub.folded:
            sub.fold()
            count += 1
    return count
