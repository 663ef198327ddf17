"""Fused elementwise passes for the codec's time-major runner (``cpu_kernels.c``), with torch fallbacks.

Between two convolutions the runner has a normalization (GroupNorm(1, C): statistics of the
whole plane, then a per-channel affine), a residual sum and an ELU. torch spends more time on
those passes than on some convolutions: ``layer_norm`` with an expanded per-channel affine
runs at a third of its plain speed, and ELU's ``expm1`` is ~6x a copy. Here the statistics are
one read (:func:`moments`, double sums) and the rest one read and one write
(:func:`affine_elu`, an ``expm1`` polynomial within ~1 ulp), written straight into a padded
buffer when the next convolution needs one.

The kernels need AVX-512F and a C compiler at first use (:mod:`codec.native`); elsewhere, and
for other dtypes or layouts, the same functions run as torch operations.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import nn

from . import native
from .kernels import cached

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mfma")


def _declare(library: ctypes.CDLL) -> None:
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    library.tw_moments.restype = i32
    library.tw_moments.argtypes = [ptr, i64, i64, i64, ptr, i32]
    library.tw_affine_elu.restype = i32
    library.tw_affine_elu.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i32, ctypes.c_float,
                                      ptr, i64, i32]
    library.tw_lstm_layer.restype = i32
    library.tw_lstm_layer.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i32]


KERNELS = native.NativeKernels(SOURCE, FLAGS, supported="tw_codec_supported", requirement="AVX-512F",
                               declare=_declare)


def available() -> bool:
    return KERNELS.available()


def _planes(t: torch.Tensor) -> bool:
    """float32 CPU ``(B, T, C)`` whose items are each one contiguous plane."""
    return (t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 3 and t.stride(2) == 1
            and (t.shape[1] <= 1 or t.stride(1) == t.shape[2]))


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each item's sum and sum of squares over its ``(T, C)`` plane, float64 ``(B,)`` each."""
    batch = x.shape[0]
    if _planes(x) and available():
        out = torch.empty(batch, 2, dtype=torch.float64)
        status = KERNELS.library().tw_moments(x.data_ptr(), batch, x.shape[1] * x.shape[2], x.stride(0),
                                              out.data_ptr(), torch.get_num_threads())
        if status:
            raise MemoryError("codec moments: out of memory")
        return out[:, 0], out[:, 1]
    flat = x.reshape(batch, -1).double()
    return flat.sum(1), (flat * flat).sum(1)


def affine_elu(x: torch.Tensor, *, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
               add: torch.Tensor | None = None, add_scale: torch.Tensor | None = None,
               alpha: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``elu(x * scale + add * add_scale + shift)`` on ``(B, T, C)``, in one pass.

    ``scale``, ``shift``, ``add_scale`` are per (item, channel) ``(B, C)`` (None: 1, 0, 1);
    ``add`` is None or shaped as ``x``; ``alpha`` None skips the ELU. ``out`` (shaped as ``x``,
    may be ``x`` itself or the middle of a padded buffer) receives the result, else a new tensor.
    """
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    batch, rows, channels = x.shape
    per_channel = [t for t in (scale, shift, add_scale) if t is not None]
    if (_planes(x) and _planes(out) and (add is None or _planes(add)) and available()
            and all(t.dtype == torch.float32 and t.is_contiguous() and t.shape == (batch, channels)
                    for t in per_channel)):
        KERNELS.library().tw_affine_elu(
            x.data_ptr(), batch, rows, channels, x.stride(0), _ptr(scale), _ptr(shift), _ptr(add),
            _ptr(add_scale), 0 if add is None else add.stride(0), alpha is not None,
            0.0 if alpha is None else alpha, out.data_ptr(), out.stride(0), torch.get_num_threads())
        return out
    value = x
    if scale is not None:
        value = value * scale[:, None].to(value.dtype)
    if shift is not None:
        value = value + shift[:, None].to(value.dtype)
    if add is not None:
        value = value + (add if add_scale is None else add * add_scale[:, None].to(add.dtype))
    if alpha is not None:
        return torch._C._nn.elu(value, alpha, 1.0, 1.0, out=out)
    return out.copy_(value) if value is not out else out


def lstm_fits(lstm: nn.LSTM, x: torch.Tensor) -> bool:
    """A plain float32 CPU LSTM (time-major, one direction, no projection, hidden size % 16 == 0)
    where the kernel is faster than torch's: measured on 2 cores, up to 2 sequences at 512 units,
    any number at 1024 (torch's wins on 4+ sequences of 512, whose weights stay in cache)."""
    return (isinstance(lstm, nn.LSTM) and x.dim() == 3 and (x.shape[1] <= 2 or lstm.hidden_size >= 1024)
            and not lstm.batch_first and not lstm.bidirectional
            and lstm.proj_size == 0 and lstm.hidden_size % 16 == 0 and lstm.bias
            and x.dtype == torch.float32 and x.device.type == "cpu"
            and all(w.dtype == torch.float32 and w.device.type == "cpu" for w in lstm.parameters())
            and available())


def _pack_recurrent(w_hh: torch.Tensor) -> torch.Tensor:
    """``W_hh (4H, H)`` -> per 16-unit block, per input, the four gates' 16 weights."""
    hidden = w_hh.shape[1]
    return w_hh.detach().reshape(4, hidden // 16, 16, hidden).permute(1, 3, 0, 2).contiguous()


def lstm(lstm: nn.LSTM, x: torch.Tensor) -> torch.Tensor:
    """``lstm(x)[0]`` for ``x (T, B, C)`` from zero state, where :func:`lstm_fits` holds.

    Per layer, torch multiplies all inputs by ``W_ih`` at once; the recurrence (``W_hh`` once per
    step, gates, state) runs in ``tw_lstm_layer``. Agrees with torch's to float rounding.
    """
    steps, batch, _ = x.shape
    hidden = lstm.hidden_size
    threads = torch.get_num_threads()
    state = torch.zeros(3, batch, hidden)  # h, c, the next h
    for layer in range(lstm.num_layers):
        w_ih = getattr(lstm, f"weight_ih_l{layer}")
        w_hh = cached(lstm, f"_packed_hh_l{layer}", getattr(lstm, f"weight_hh_l{layer}"), _pack_recurrent)
        bias = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
        gin = torch.addmm(bias, x.reshape(steps * batch, -1), w_ih.t())
        out = torch.empty(steps, batch, hidden)
        state.zero_()
        status = KERNELS.library().tw_lstm_layer(gin.data_ptr(), steps, batch, hidden, w_hh.data_ptr(),
                                                 state[0].data_ptr(), state[1].data_ptr(), state[2].data_ptr(),
                                                 out.data_ptr(), threads)
        if status:
            raise ValueError(f"codec lstm: hidden size {hidden} is not a multiple of 16")
        x = out
    return x
