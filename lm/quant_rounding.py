"""The integer arithmetic of :mod:`lm.quant`: rounding float matrices to int8 / int4 and back.

int8: one scale per output row. int4: per group of inputs a scale and a zero point, fitted by
least squares (:func:`quantize_int4`), two values per byte. Scales and zeros are bfloat16
values (what the kernels read).
"""
from __future__ import annotations

import torch

def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight (N, K)`` -> ``q (N, K)`` int8 and per-row ``scales (N,)`` bfloat16."""
    weight = weight.float()
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
    q = torch.round(weight / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


_MIN_SCALE = 1e-6
INT4_FIT_STEPS = 6  # int4: least-squares refits per group; more change the logits' KL by less than noise
_FIT_CHUNK = 1 << 18  # weights fitted at a time on a CPU: the fit's ~40 passes then stay in cache (1.5x faster)


def quantize_int4(weight: torch.Tensor, group_size: int,
                  steps: int = INT4_FIT_STEPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight (N, K)`` -> nibbles ``(N, K/2)`` uint8, ``scales`` and ``zeros (N, K/group)`` bfloat16.

    Asymmetric per group, ``w ~ (q - 8) * scale + zero`` with ``q`` in [0, 15]. Rounding onto
    the group's min/max range is only the start: ``steps`` times, (scale, zero) become the
    least-squares line through the points ``(q - 8, w)`` (rounded to bfloat16, as stored),
    and the integers are rounded again onto that grid (not after the last fit). Each half
    minimises the group's squared error given the other, so a rare large weight stops
    stretching the grid for the rest, and the group's errors sum to about zero: min/max
    rounding leaves them a common offset, which a layer whose inputs have a non-zero mean
    (the feed-forward's second matrix, after GELU) multiplies by the group's summed input.
    Per group the result is never worse than the start. On tokenwave-small and a
    MusicGen-small-sized LM this halves the logits' KL of min/max rounding at groups of 32
    (``bench/quant_accuracy.py``), for 13-16 s instead of ~3 s on the latter's 411 M matrix
    weights on one thread; ``steps=0`` is min/max rounding.
    """
    N, K = weight.shape
    rows = max(1, _FIT_CHUNK // K) if weight.device.type == "cpu" else N
    parts = [_fit_int4(weight[i:i + rows].float().reshape(-1, K // group_size, group_size), steps)
             for i in range(0, N, rows)]
    q, scales, zeros = (torch.cat(tensors) for tensors in zip(*parts))
    return _pack_int4(q.reshape(N, K)), scales.to(torch.bfloat16), zeros.to(torch.bfloat16)


def _fit_int4(groups: torch.Tensor, steps: int = INT4_FIT_STEPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_int4` on ``groups (..., group)`` float32: ``q`` as float32 integers,
    ``scales`` and ``zeros (...)`` as float32 values that are exactly bfloat16."""
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = _bf16(((high - low) / 15).clamp(min=_MIN_SCALE))
    zeros = _bf16(low + 8 * scales)
    q = _round_int4(groups, scales, zeros)
    if steps <= 0:
        return q, scales, zeros
    start = (q, scales, zeros)
    mean_w = groups.mean(dim=-1)
    for step in range(steps):
        if step:
            q = _round_int4(groups, scales, zeros)
        scales, zeros = _fit_line(groups, q, mean_w, scales)
    better = _int4_error(groups, q, scales, zeros) < _int4_error(groups, *start)
    return (torch.where(better[..., None], q, start[0]), torch.where(better, scales, start[1]),
            torch.where(better, zeros, start[2]))


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Values ``(N, K)`` in [0, 15] -> ``(N, K/2)`` uint8, the even column in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def _bf16(values: torch.Tensor) -> torch.Tensor:
    """The float32 values of ``values`` rounded to bfloat16 (what the kernels will read)."""
    return values.to(torch.bfloat16).float()


def _round_int4(groups: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The nearest ``q`` in [0, 15] to each weight (as float32) on the grid ``(q - 8) * scale + zero``."""
    inverse = 1 / scales
    q = groups * inverse[..., None]
    q += (8 - zeros * inverse)[..., None]
    return q.round_().clamp_(0, 15)


def _fit_line(groups: torch.Tensor, q: torch.Tensor, mean_w: torch.Tensor,
              scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares ``(scale, zero)`` of ``w ~ (q - 8) * scale + zero`` per group, in bfloat16
    values; a group whose integers are all equal keeps its scale."""
    n = groups.shape[-1]
    mean_q = q.mean(dim=-1)
    variance = torch.linalg.vecdot(q, q) - n * mean_q * mean_q
    covariance = torch.linalg.vecdot(q, groups) - n * mean_q * mean_w
    fitted = torch.where(variance > 0.5, covariance / variance.clamp(min=0.5), scales)
    scales = _bf16(fitted.clamp(min=_MIN_SCALE))
    return scales, _bf16(mean_w - scales * (mean_q - 8))


def _int4_error(groups: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Squared error of each group's dequantized weights."""
    residual = (q - 8) * scales[..., None]
    residual += zeros[..., None] - groups
    return torch.linalg.vecdot(residual, residual)


def unpack_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """``(N, K/2)`` uint8 -> values ``(N, K)`` uint8 in [0, 15]."""
    return torch.stack([nibbles & 15, nibbles >> 4], dim=-1).reshape(nibbles.shape[0], -1)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]


def dequantize_int4(nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    N = nibbles.shape[0]
    q = unpack_int4(nibbles).float().reshape(N, -1, group_size)
    return ((q - 8) * scales.float()[..., None] + zeros.float()[..., None]).reshape(N, -1)
