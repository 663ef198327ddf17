"""Kernel choices that fix the last bits of a result, shared by the runners and streaming.

* :func:`cached`: a tensor derived from a weight (prepacked, channels-last, ``|E|^2``), kept on
  its module until the weight changes; :class:`CurrentWeight` does the same for a
  weight-normed convolution's weight.
* :func:`exact_conv` / :func:`exact_pointwise`: a convolution or an elementwise layer on a
  piece of a signal whose outputs carry the bits the one call over the whole signal gives
  them (CPU, float32): the stream (:mod:`codec.stream_layers`) relies on this for codes equal
  to ``model.encode``'s. :func:`reaches_onednn` says which convolution kernel torch takes.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F


class _Cache(dict):
    """Derived tensors kept on a module; empty again after copy.deepcopy or pickling (they
    can hold oneDNN tensors, which have no storage to copy, and are cheap to rebuild)."""

    def __deepcopy__(self, memo: dict) -> "_Cache":
        return _Cache()

    def __reduce__(self):
        return (_Cache, ())


def cached(owner: object, name: str, source: torch.Tensor,
           make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``make(source)``, kept on ``owner`` until ``source`` is replaced or changed in place.

    The entry holds ``source`` itself (so its memory cannot be reused by another tensor), its
    version counter and storage. Inference tensors have no version counter: never cached.
    """
    if source.is_inference():
        return make(source)
    # ``module.to()`` swaps ``param.data`` without a version bump: the storage is checked too.
    state = (source._version, source.data_ptr(), source.dtype, source.device)
    store = owner.__dict__.get("_derived_tensors")
    if store is None:
        store = owner.__dict__["_derived_tensors"] = _Cache()
    entry = store.get(name)
    if entry is not None and entry[0] is source and entry[1] == state:
        return entry[2]
    value = make(source)
    store[name] = (source, state, value)
    return value


# A CPU matrix product (native convolution, the quantizer's distances) rounds its first rows
# differently when it has fewer than 4 (distances) or 12 (1x1 convolutions) of them.
MIN_COLUMNS = 16
# Elementwise CPU kernels (ELU) run 2 vectors at a time and leave the rest (``numel % 32`` for
# float32 with AVX-512) to a scalar loop that rounds differently (exp(x) - 1, not expm1);
# padding a piece to a multiple of this keeps all of it on the vector path, as offline (but
# for offline's own last elements: see :mod:`codec.streaming`).
VECTOR_BLOCK = 64


def reaches_onednn(conv: nn.Conv1d, x: torch.Tensor) -> bool:
    """Whether ``conv(x)`` reaches oneDNN when ``x`` is long, as torch dispatches it.

    torch (``ConvParams::use_mkldnn``) sends a float32 CPU convolution to oneDNN unless it is a
    1x1, unstrided, undilated one at batch < 16 on one thread, or its input has at most 20480
    elements at batch 1 (the short case a stream cannot know about: see :mod:`codec.streaming`).
    """
    if (x.device.type != "cpu" or x.dtype != torch.float32
            or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)):
        return False
    return (conv.kernel_size[0] != 1 or conv.stride[0] != 1 or conv.dilation[0] != 1
            or x.shape[0] >= 16 or torch.get_num_threads() > 1)


class CurrentWeight:
    """A convolution's weight, rebuilt from its weight norm only when that changes.

    oneDNN is ~7x slower on a freshly allocated 8 MiB weight than on one it has seen; the
    rebuilt weight has the same bits as the one the module's forward builds at each call.
    """

    def __init__(self, conv: nn.Conv1d) -> None:
        self.conv = conv
        self.key: tuple | None = None
        self.weight: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        conv = self.conv
        if not hasattr(conv, "current_weight") or conv.folded:
            return conv.weight
        sources = (conv.weight_v, conv.weight_g)
        if any(t.is_inference() for t in sources):  # no version counter to watch
            return conv.current_weight()
        key = tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in sources)
        if key != self.key:
            self.key, self.weight = key, conv.current_weight().detach()
        return self.weight


def exact_conv(conv: nn.Conv1d, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` (no padding) ``(B, C_in, n) -> (B, C_out, m)`` with offline's bits.

    oneDNN convolutions give every output the same bits whatever the input width; the native
    one (im2col and a matrix product) does once the output has ``MIN_COLUMNS`` columns, so a
    narrower piece is zero-extended and cut back. ``weight`` is ``conv``'s current weight.
    """
    stride, dilation = conv.stride[0], conv.dilation[0]
    if reaches_onednn(conv, x):
        # The 2-D call torch's own dispatch makes for a 1-D convolution.
        y = torch.mkldnn_convolution(x.unsqueeze(2), weight.unsqueeze(2), conv.bias, [0, 0],
                                     [1, stride], [1, dilation], conv.groups)
        return y.squeeze(2)
    if x.device.type != "cpu":
        return conv._conv_forward(x, weight, conv.bias)
    span = (weight.shape[-1] - 1) * dilation + 1
    outputs = (x.shape[-1] - span) // stride + 1
    if outputs < MIN_COLUMNS:
        x = F.pad(x, (0, (MIN_COLUMNS - outputs) * stride))
    return conv._conv_forward(x, weight, conv.bias)[..., :outputs]


def exact_pointwise(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for an elementwise module, every element on the CPU's vector path."""
    if x.device.type != "cpu":
        return module(x)
    flat = x.reshape(-1)
    y = module(F.pad(flat, (0, -flat.numel() % VECTOR_BLOCK)))
    return y[: flat.numel()].view(x.shape)


def current_weight(conv: nn.Module) -> torch.Tensor:
    """The weight a convolution's forward uses (rebuilt from weight norm when not folded)."""
    return conv.current_weight() if hasattr(conv, "current_weight") else conv.weight
