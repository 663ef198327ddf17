"""Inference runners for the SEANet encoder and decoder (no autograd).

Both walk the very modules whose ``forward`` defines the model (``encoder.model`` /
``decoder.model``), so checkpoints, streaming and training keep one module tree.

* :func:`run_channel_major` keeps the reference's ``(B, C, T)`` layout and calls the same
  kernels on tensors of the same shapes, so its output is bitwise equal to ``module(x)``; it
  only drops work that does not change a number (no-op pads, out-of-place ELUs and sums).
  oneDNN picks other kernels for other batch sizes, so an item in a batch can get other last
  bits than alone, as in the reference.
* :func:`run_time_major` keeps activations ``(B, T, C)`` and runs convolutions as
  channels-last 2-D ones through oneDNN with prepacked weights (1x1 convolutions as matrix
  products with the residual sum fused in; an ELU in front of a padded convolution written
  straight into the padded buffer). Same arithmetic in another summation order: results are
  within ~1e-7 relative of the reference's, so codes can flip at near-ties; the exact encoder
  does not use it.

  On CPUs with AVX-512 the passes between convolutions are fused (:mod:`codec.cpu_kernels`):
  a GroupNorm output stays pending (statistics taken, affine not applied) until its consumer
  writes it in one pass with the residual sum and the ELU that follow, into the next
  convolution's padded buffer; the LSTM's recurrence runs on a packed copy of ``W_hh``.

The exact runner's LSTM is ``nn.LSTM``. :func:`tune_malloc` is an opt-in, process-wide
allocator setting that removes the page-fault cost of large short-lived tensors.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from . import cpu_kernels
from .conv import StreamableConv1d, StreamableConvTranspose1d, pad1d
from .kernels import cached, current_weight
from .lstm import StreamableLSTM
from .seanet import SEANetResnetBlock


# -- channel-major (bitwise equal to the modules) ----------------------------------------------
def _conv_channel_major(layer: StreamableConv1d, x: torch.Tensor) -> torch.Tensor:
    left, right = layer.paddings(x.shape[-1])
    if left or right:
        x = pad1d(x, (left, right), mode=layer.pad_mode)
    return layer.conv(x)


def run_channel_major(seq: Iterable[nn.Module], x: torch.Tensor, *, owned: bool = False
                      ) -> torch.Tensor:
    """``seq(x)`` for ``(B, C, T)`` input, bitwise, with fewer copies.

    ``owned`` says ``x`` may be overwritten. Call under ``torch.inference_mode()``.
    """
    for layer in seq:
        before = x
        if isinstance(layer, StreamableConv1d):
            x = _conv_channel_major(layer, x)
        elif isinstance(layer, nn.ELU):
            # In place on the tensor the module would give it, never on a padded copy: the
            # CPU kernel's last bits depend on where an element falls (expm1 in the vector
            # loop, exp(x) - 1 in the scalar loop that ends each thread's range).
            x = F.elu_(x, alpha=layer.alpha) if owned else F.elu(x, alpha=layer.alpha)
        elif isinstance(layer, SEANetResnetBlock):
            block = run_channel_major(layer.block, x)
            shortcut = x if isinstance(layer.shortcut, nn.Identity) else \
                _conv_channel_major(layer.shortcut, x)
            x = block.add_(shortcut)  # == shortcut + block: addition commutes exactly
        else:
            x = layer(x)
        owned = owned or x is not before
    return x


# -- time-major (channels-last convolutions) ---------------------------------------------------
def pad_time_major(x: torch.Tensor, left: int, right: int, mode: str) -> torch.Tensor:
    """:func:`codec.conv.pad1d` for ``(B, T, C)`` input: pads the time axis (dim 1)."""
    if mode == "constant":
        return F.pad(x, (0, 0, left, right))
    if mode != "reflect":  # rare: go through the (B, C, T) implementation
        return pad1d(x.transpose(1, 2), (left, right), mode=mode).transpose(1, 2).contiguous()
    length = x.shape[1]
    extra = 0
    if length <= max(left, right):  # as pad1d: zero-extend, reflect, cut the extension off
        extra = max(left, right) - length + 1
        x = F.pad(x, (0, 0, 0, extra))
        length += extra
    parts = []
    if left:
        parts.append(x[:, 1: left + 1].flip(1))
    parts.append(x)
    if right:
        parts.append(x[:, length - right - 1: length - 1].flip(1))
    out = torch.cat(parts, dim=1)
    return out[:, : out.shape[1] - extra] if extra else out


# oneDNN kernels with prepacked weights and dense in/outputs: the ones torch.compile's CPU
# "freezing" uses. Same arithmetic as F.conv2d on channels-last input minus the weight reorder
# at each call; for 1x1 convolutions, oneDNN's matmul is ~3x faster than MKL's on these skinny
# (T x 32) @ (32 x 32) products. Private ops: used when present, plain ops otherwise.
_ONEDNN = torch.ops.mkldnn
_HAS_ONEDNN = torch.backends.mkldnn.is_available() and all(
    hasattr(_ONEDNN, op) for op in ("_convolution_pointwise", "_convolution_transpose_pointwise",
                                    "_linear_pointwise", "_reorder_convolution_weight",
                                    "_reorder_convolution_transpose_weight",
                                    "_reorder_linear_weight"))
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def _onednn_ok(x: torch.Tensor, conv: nn.Module) -> bool:
    """Whether the prepacked kernels apply: CPU, float32/bfloat16, a fixed (folded) weight."""
    return (_HAS_ONEDNN and x.device.type == "cpu" and x.dtype in ONEDNN_DTYPES
            and getattr(conv, "folded", True) and torch.backends.mkldnn.enabled)


def _channels_last_weight(conv: nn.Module) -> torch.Tensor:
    """The conv's weight as a ``(O, I, 1, K)`` channels-last tensor, cached on the module.

    Loading new weights (in place or not) refreshes it, see :func:`cached`.
    """
    def pack(weight: torch.Tensor) -> torch.Tensor:
        return weight.detach().unsqueeze(2).contiguous(memory_format=torch.channels_last)

    if not getattr(conv, "folded", True):  # weight norm rebuilds the weight at each call
        return pack(current_weight(conv))
    return cached(conv, "_channels_last_weight", conv.weight, pack)


def _onednn_weight(conv: nn.Module, kind: str) -> torch.Tensor:
    """The weight prepacked for oneDNN: ``kind`` is conv, conv_transpose or linear."""
    stride, dilation, groups = conv.stride[0], conv.dilation[0], conv.groups

    def pack(weight: torch.Tensor) -> torch.Tensor:
        weight = weight.detach()
        if kind == "linear":
            return _ONEDNN._reorder_linear_weight(weight[:, :, 0].contiguous(), None)
        if kind == "conv_transpose":
            return _ONEDNN._reorder_convolution_transpose_weight(
                weight.unsqueeze(2), [0, 0], [0, 0], [1, stride], [1, dilation], groups)
        return _ONEDNN._reorder_convolution_weight(
            weight.unsqueeze(2), [0, 0], [1, stride], [1, dilation], groups)

    return cached(conv, f"_onednn_{kind}_weight", conv.weight, pack)


@dataclass
class _Affine:
    """A value not yet written out: ``raw * scale + shift (+ add * add_scale)``, per (item,
    channel), as a GroupNorm(1, C) output (plus a residual) is. Its consumer writes it in one
    pass with what follows (an ELU, a padding); it is consumed once and may reuse ``raw``."""

    raw: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    add: torch.Tensor | None = None
    add_scale: torch.Tensor | None = None


Value = torch.Tensor | _Affine


def _group_norm_time_major(norm: nn.Module, y: torch.Tensor) -> Value:
    if isinstance(norm, nn.Identity):
        return y
    if not isinstance(norm, nn.GroupNorm) or norm.num_groups != 1:
        raise TypeError(f"time-major runner supports GroupNorm(1, C) only, got {norm}")
    length, channels = y.shape[1:]
    if y.dtype == torch.float32 and y.is_contiguous() and cpu_kernels.available():
        # Statistics now, the affine (with whatever follows) in the consumer's pass.
        total, squares = cpu_kernels.moments(y)
        count = length * channels
        mean = total / count
        rstd = ((squares / count - mean * mean).clamp_min(0) + norm.eps).rsqrt()
        weight = norm.weight.double() if norm.affine else torch.ones(channels, dtype=torch.float64)
        bias = norm.bias.double() if norm.affine else torch.zeros(channels, dtype=torch.float64)
        scale = weight[None] * rstd[:, None]
        return _Affine(y, scale.float(), (bias[None] - mean[:, None] * scale).float())
    # GroupNorm(1, C) normalizes each item over (T, C): a layer norm of the (T, C) plane with
    # the per-channel affine broadcast over time (torch.var_mean is ~7x slower, the
    # channels-last group_norm kernel loses ~1e-4).
    weight = bias = None
    if norm.affine:
        weight = norm.weight.expand(length, channels)
        bias = norm.bias.expand(length, channels)
    return F.layer_norm(y, (length, channels), weight, bias, eps=norm.eps)


def _write(x: Value, *, alpha: float | None = None, out: torch.Tensor | None = None,
           owned: bool = False) -> torch.Tensor:
    """``x`` as a tensor, with an ELU of ``alpha`` applied when given, into ``out`` if given
    (else in place where ``x`` is ours to overwrite)."""
    if isinstance(x, _Affine):
        return cpu_kernels.affine_elu(x.raw, scale=x.scale, shift=x.shift, add=x.add, add_scale=x.add_scale,
                                      alpha=alpha, out=x.raw if out is None else out)
    if alpha is None:
        return x if out is None else out.copy_(x)
    if out is None and owned:
        out = x
    return cpu_kernels.affine_elu(x, alpha=alpha, out=out)


def _add(x: Value, other: Value) -> Value:
    """``x + other``; a normalized ``x`` takes ``other`` into its pending pass."""
    if isinstance(x, _Affine) and x.add is None:
        if isinstance(other, _Affine) and other.add is None:
            return _Affine(x.raw, x.scale, x.shift + other.shift, other.raw, other.scale)
        if isinstance(other, torch.Tensor):
            return _Affine(x.raw, x.scale, x.shift, other)
    return _write(x, owned=True).add_(_write(other))


def _elu_pad_time_major(x: Value, left: int, right: int, mode: str, alpha: float) -> torch.Tensor:
    """``pad(elu(x))`` in one pass: ELU written into the middle of the padded buffer, the
    borders copied from its result (ELU is elementwise, so it commutes with the padding)."""
    length = (x.raw if isinstance(x, _Affine) else x).shape[1]
    if mode not in ("reflect", "constant") or length <= max(left, right):
        return F.elu_(pad_time_major(_write(x), left, right, mode), alpha=alpha)
    like = x.raw if isinstance(x, _Affine) else x
    out = like.new_empty(like.shape[0], left + length + right, like.shape[2])
    _write(x, alpha=alpha, out=out[:, left: left + length])
    if mode == "reflect":
        if left:
            out[:, :left] = out[:, left + 1: 2 * left + 1].flip(1)
        if right:
            end = left + length
            out[:, end:] = out[:, end - 1 - right: end - 1].flip(1)
    else:
        out[:, :left] = 0
        out[:, left + length:] = 0
    return out


def _is_pointwise(layer: nn.Module) -> bool:
    """A 1x1, stride 1, ungrouped conv without norm: a matrix product per time step."""
    if not isinstance(layer, StreamableConv1d) or not isinstance(layer.conv.norm, nn.Identity):
        return False
    conv = layer.conv.conv
    return conv.kernel_size[0] == 1 and conv.stride[0] == 1 and conv.groups == 1


def _pointwise_time_major(layer: StreamableConv1d, x: torch.Tensor,
                          add: torch.Tensor | None = None) -> torch.Tensor:
    """1x1 conv on ``(B, T, C)`` as ``(B*T, C) @ W^T + b`` (plus ``add``, fused)."""
    conv = layer.conv.conv
    batch, length, _ = x.shape
    rows = x.reshape(batch * length, -1)
    other = None if add is None else add.reshape(batch * length, -1)
    if _onednn_ok(x, conv):
        weight = _onednn_weight(conv, "linear")
        if other is None:
            y = _ONEDNN._linear_pointwise(rows, weight, conv.bias, "none", [], "")
        else:
            y = _ONEDNN._linear_pointwise.binary(rows, other.contiguous(), weight, conv.bias, "add")
    else:
        weight = current_weight(conv)[:, :, 0]
        y = F.linear(rows, weight, conv.bias)
        if other is not None:
            y = y.add_(other)
    return y.view(batch, length, -1)


def _conv_time_major(layer: StreamableConv1d, x: Value, *, elu: float | None,
                     owned: bool) -> Value:
    """``layer(elu(x))`` on ``(B, T, C)``; ``elu`` is the alpha of an ELU in front, or None."""
    left, right = layer.paddings((x.raw if isinstance(x, _Affine) else x).shape[1])
    if left or right:
        if elu is not None:
            x = _elu_pad_time_major(x, left, right, layer.pad_mode, elu)
        else:
            x = pad_time_major(_write(x), left, right, layer.pad_mode)
    else:
        x = _write(x, alpha=elu, owned=owned)
    x = x.contiguous()
    if _is_pointwise(layer):
        return _pointwise_time_major(layer, x)
    conv = layer.conv.conv
    x4 = x.transpose(1, 2).unsqueeze(2)  # (B, C, 1, T): a channels-last view
    stride, dilation = [1, conv.stride[0]], [1, conv.dilation[0]]
    if _onednn_ok(x, conv):
        y = _ONEDNN._convolution_pointwise(x4, _onednn_weight(conv, "conv"), conv.bias, [0, 0],
                                           stride, dilation, conv.groups, "none", [], "")
    else:
        y = F.conv2d(x4, _channels_last_weight(conv), conv.bias, stride=stride,
                     dilation=dilation, groups=conv.groups)
    return _group_norm_time_major(layer.conv.norm, y.squeeze(2).transpose(1, 2))


def _conv_transpose_time_major(layer: StreamableConvTranspose1d, x: Value, *,
                               elu: float | None, owned: bool) -> Value:
    x = _write(x, alpha=elu, owned=owned)
    conv = layer.convtr.convtr
    x4 = x.contiguous().transpose(1, 2).unsqueeze(2)
    left, right = layer.trim
    # The symmetric part of the trim is the conv's own padding: those samples are never
    # computed, and the output needs no slicing (a copy later when the batch is > 1).
    crop = min(left, right) if isinstance(layer.convtr.norm, nn.Identity) else 0
    if _onednn_ok(x, conv):
        y = _ONEDNN._convolution_transpose_pointwise(
            x4, _onednn_weight(conv, "conv_transpose"), conv.bias, [0, crop], [0, 0],
            [1, conv.stride[0]], [1, conv.dilation[0]], conv.groups, "none", [], "")
    else:
        y = F.conv_transpose2d(x4, _channels_last_weight(conv), conv.bias,
                               stride=(1, conv.stride[0]), padding=(0, crop),
                               groups=conv.groups)
    y = _write(_group_norm_time_major(layer.convtr.norm, y.squeeze(2).transpose(1, 2)))
    left, right = left - crop, right - crop
    return y[:, left: y.shape[1] - right] if left or right else y


def _lstm_time_major(layer: StreamableLSTM, x: torch.Tensor) -> torch.Tensor:
    xt = x.transpose(0, 1)  # (T, B, C): a view, contiguous when B == 1
    if cpu_kernels.lstm_fits(layer.lstm, xt):
        y = cpu_kernels.lstm(layer.lstm, xt.contiguous())
    else:
        y, _ = layer.lstm(xt)
    if layer.skip:
        y = y.add_(xt)
    return y.transpose(0, 1)


def _resblock_time_major(block: SEANetResnetBlock, x: Value) -> Value:
    x = _write(x)  # read twice: by the shortcut and by the block
    shortcut = x if isinstance(block.shortcut, nn.Identity) else \
        _conv_time_major(block.shortcut, x, elu=None, owned=False)
    layers = list(block.block)
    if _is_pointwise(layers[-1]):  # the usual [ELU, conv k, ELU, conv 1x1]: fuse the sum
        h = _write(_run(layers[:-1], x, owned=False), owned=True)
        return _pointwise_time_major(layers[-1], h.contiguous(), add=_write(shortcut))
    return _add(_run(block.block, x, owned=False), shortcut)


def _run(layers: list[nn.Module], x: Value, *, owned: bool) -> Value:
    i = 0
    while i < len(layers):
        layer, before = layers[i], x
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        elu = layer.alpha if isinstance(layer, nn.ELU) else None
        if elu is not None and isinstance(nxt, StreamableConv1d):
            x = _conv_time_major(nxt, x, elu=elu, owned=owned)
            i += 2
        elif elu is not None and isinstance(nxt, StreamableConvTranspose1d):
            x = _conv_transpose_time_major(nxt, x, elu=elu, owned=owned)
            i += 2
        else:
            if isinstance(layer, StreamableConv1d):
                x = _conv_time_major(layer, x, elu=None, owned=owned)
            elif isinstance(layer, StreamableConvTranspose1d):
                x = _conv_transpose_time_major(layer, x, elu=None, owned=owned)
            elif isinstance(layer, SEANetResnetBlock):
                x = _resblock_time_major(layer, x)
            elif isinstance(layer, StreamableLSTM):
                x = _lstm_time_major(layer, _write(x))
            elif elu is not None:
                x = _write(x, alpha=elu, owned=owned)
            elif isinstance(layer, nn.Identity):
                pass
            else:
                raise TypeError(f"time-major runner does not know {type(layer).__name__}")
            i += 1
        owned = owned or x is not before
    return x


def run_time_major(seq: Iterable[nn.Module], x: torch.Tensor, *, owned: bool = False
                   ) -> torch.Tensor:
    """``seq`` (a Sequential's layers) on ``(B, T, C)`` input -> ``(B, T', C')``, with
    channels-last convolutions and fused elementwise passes (:mod:`codec.cpu_kernels`).

    Equal to ``seq(x.transpose(1, 2)).transpose(1, 2)`` up to float rounding (~1e-7 relative).
    Call under ``torch.inference_mode()``.
    """
    return _write(_run(list(seq), x, owned=owned), owned=True)


def tune_malloc(max_cached: int = 32 << 20) -> bool:
    """Make glibc keep freed memory instead of handing it back to the system (process-wide).

    By default glibc returns the top of its heap to the system once more than ~2x its mmap
    threshold is free, and serves blocks above that threshold with fresh mmaps; each time,
    the next tensor of that size page-faults its memory back in, one fault per 4 KiB page,
    and a codec call allocates and frees tens of MB per layer. This sets
    ``M_MMAP_THRESHOLD`` to ``max_cached`` (glibc caps it at 32 MiB) and ``M_TRIM_THRESHOLD``
    to 1 GiB, so up to that much freed memory stays with the process.
    Opt-in: it changes allocation for the whole process (``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` in the environment do the same from outside). Returns False
    where there is no glibc ``mallopt``.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, int(max_cached)) and
                mallopt(m_trim_threshold, 1 << 30))
