"""Calibrated int4 (GPTQ), offline: int4 rounding chosen for the inputs a calibration batch
produces, written as an ordinary int4 LM (:mod:`lm.quant`'s buffers, so ``save_pretrained``
writes a folder that loads like any other int4 folder).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import RowSliced
from .quant import (QuantConfig, QuantizedWeight, _check_unquantized, _matrices, _parse, _replace, _store_matrices,
                    storage)
from .quant_rounding import _fit_int4, _pack_int4, _round_int4

GPTQ_DAMPING = 0.01  # added to the inputs' second moments, as a fraction of their mean diagonal

_GPTQ_BLOCK = 128  # columns whose updates are applied together; a multiple of every group size


def gptq_int4(weight: torch.Tensor, moments: torch.Tensor, group_size: int,
              damping: float = GPTQ_DAMPING) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_int4`'s output for ``weight (N, K)``, rounded for the inputs it will see.

    ``moments (K, K)``: the inputs' second moments ``x^T x / n`` over calibration rows. GPTQ
    (Frantar et al., 2022): columns are rounded left to right and each one's error, weighted
    by the inverse moments, is moved onto the columns not yet rounded, so the product with
    inputs like the calibration ones stays close rather than the weight itself. Each group's
    scale and zero are fitted (as :func:`quantize_int4`) to its columns as they stand when
    the group is reached. ``damping`` keeps the inverse finite when the calibration rows
    span fewer than ``K`` directions.
    """
    q, scales, zeros = _gptq(weight.float().clone(), _inverse_factor(moments, damping), group_size)
    return _pack_int4(q), scales.to(torch.bfloat16), zeros.to(torch.bfloat16)


def _inverse_factor(moments: torch.Tensor, damping: float) -> torch.Tensor:
    """The upper Cholesky factor of the damped moments' inverse (float64 arithmetic, float32 out);
    inputs that never fire get a unit diagonal (their columns' errors move nowhere)."""
    moments = moments.double().clone()
    diagonal = moments.diagonal()
    diagonal[diagonal <= 0] = 1
    damp = damping * diagonal.mean()
    for _ in range(4):  # a moment matrix that rounding made slightly indefinite: damp more
        factor, info = torch.linalg.cholesky_ex(moments + damp * torch.eye(len(moments), dtype=moments.dtype,
                                                                          device=moments.device))
        if info.item() == 0:
            inverse = torch.cholesky_inverse(factor)
            return torch.linalg.cholesky(inverse, upper=True).float()
        damp *= 10
    raise ValueError("the calibration inputs' second moments are not positive definite even with damping "
                     f"{damp:.3g}; calibrate with more (or finite) inputs")


def _gptq(weight: torch.Tensor, factor: torch.Tensor,
          group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's column loop on ``weight (N, K)`` (updated in place) -> ``q (N, K)``, ``scales``,
    ``zeros (N, K/group)``, as :func:`_fit_int4` returns them."""
    N, K = weight.shape
    q = torch.empty_like(weight)
    scales = weight.new_empty(N, K // group_size)
    zeros = torch.empty_like(scales)
    for start in range(0, K, _GPTQ_BLOCK):
        stop = min(start + _GPTQ_BLOCK, K)
        block, inverse = weight[:, start:stop], factor[start:stop, start:stop]
        errors = torch.empty_like(block)
        for i in range(stop - start):
            if (start + i) % group_size == 0:
                g = (start + i) // group_size
                _, scale, zero = _fit_int4(block[:, i:i + group_size])
                scales[:, g], zeros[:, g] = scale, zero
            column = block[:, i]
            q[:, start + i] = _round_int4(column[:, None], scale, zero)[:, 0]
            errors[:, i] = (column - ((q[:, start + i] - 8) * scale + zero)) / inverse[i, i]
            block[:, i:].addr_(errors[:, i], inverse[i, i:], alpha=-1)
        weight[:, stop:].addmm_(errors, factor[start:stop, stop:], alpha=-1)
    return q, scales, zeros


class _Calibrating(RowSliced):
    """Stands where a float matrix stands while :func:`quantize_lm_calibrated` runs its batch.

    The first product through rows ``a:b`` rounds the rows not yet rounded with
    :func:`gptq_int4` on that product's inputs, and every product uses the rounded rows, so
    each layer is calibrated on the outputs of the already-quantized layers before it
    (GPTQ's sequential order) in a single forward pass, holding one moment matrix at a time.
    """

    kind = "a quantized weight"

    def __init__(self, weight: torch.Tensor, group_size: int, damping: float) -> None:
        super().__init__()
        N, K = weight.shape
        self.float_weight, self.group_size, self.damping = weight, group_size, damping
        self.q = torch.zeros(N, K, dtype=torch.uint8, device=weight.device)
        self.scales = weight.new_zeros(N, K // group_size, dtype=torch.float32)
        self.zeros = torch.zeros_like(self.scales)
        self.done = torch.zeros(N, dtype=torch.bool, device=weight.device)

    @property
    def shape(self) -> torch.Size:
        return self.float_weight.shape

    def rows_linear(self, start: int, stop: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear(x, rows start:stop, bias)`` with the rows rounded (now, if not yet)."""
        todo = torch.arange(start, stop, device=self.done.device)[~self.done[start:stop]]
        if len(todo):
            inputs = x.reshape(-1, x.shape[-1]).float()
            moments = inputs.T @ inputs / max(len(inputs), 1)
            q, scales, zeros = _gptq(self.float_weight[todo].float(),  # indexing copies
                                     _inverse_factor(moments, self.damping), self.group_size)
            self.q[todo], self.scales[todo], self.zeros[todo] = q.to(torch.uint8), scales, zeros
            self.done[todo] = True
        rows = slice(start, stop)
        weight = self.q[rows].float().reshape(stop - start, -1, self.group_size) - 8
        weight = (weight * self.scales[rows, :, None] + self.zeros[rows, :, None]).reshape(stop - start, -1)
        return F.linear(x, weight.to(x.dtype), bias)

    def result(self) -> QuantizedWeight:
        """The rounded weight; rows no product reached are rounded as :func:`quantize_int4` does."""
        if not self.done.all():
            rest = ~self.done
            groups = self.float_weight[rest].float().reshape(int(rest.sum()), -1, self.group_size)
            q, scales, zeros = _fit_int4(groups)
            self.q[rest], self.scales[rest], self.zeros[rest] = q.flatten(1).to(torch.uint8), scales, zeros
        return QuantizedWeight(_pack_int4(self.q), self.scales.to(torch.bfloat16), self.zeros.to(torch.bfloat16),
                               group_size=self.group_size)


def quantize_lm_calibrated(model: nn.Module, codes: torch.Tensor, *, condition: torch.Tensor | None = None,
                           condition_mask: torch.Tensor | None = None, dtype: str | QuantConfig = "int4",
                           group_size: int | None = None, heads: str | None = None,
                           damping: float = GPTQ_DAMPING) -> nn.Module:
    """:func:`quantize_lm` to int4 with each int4 matrix rounded by :func:`gptq_int4` for the
    inputs it sees while ``model`` is teacher-forced on ``codes (B, K, T)`` (with
    ``condition (B, S, dim)`` / ``condition_mask``, as :meth:`~lm.model.LMModel.compute_predictions`
    takes them; include null-condition rows to calibrate the guided half too).

    Offline, on float weights: it runs that one batch once (its size sets the calibration
    and the memory), quantizing each matrix as the batch reaches it. The result has the
    exact buffers and format of :func:`quantize_lm`'s, so ``save_pretrained`` writes a
    quantized folder that loads like any other. Matrices stored otherwise (output heads,
    int8 fallbacks) are stored as :func:`quantize_lm` stores them.
    """
    config = _parse(dtype, group_size, heads)
    if config.dtype != "int4":
        raise ValueError(f"calibrated quantization rounds int4 matrices, got {config.name!r}; use quantize_lm for int8")
    _check_unquantized(model)
    stand_ins, originals = {}, []
    for name, owner, attribute in _matrices(model):
        weight = getattr(owner, attribute)
        if storage(name, tuple(weight.shape), config) == "int4":
            originals.append((owner, attribute, weight))
            stand_ins[name] = _Calibrating(weight.detach(), config.group_size, damping)
            _replace(owner, attribute, stand_ins[name])
    training = model.training
    try:
        with torch.no_grad():
            model.eval().compute_predictions(codes, condition=condition, condition_mask=condition_mask)
    except BaseException:
        for owner, attribute, weight in originals:
            _replace(owner, attribute, weight)
        raise
    finally:
        model.train(training)
    _store_matrices(model, config, {name: stand_in.result() for name, stand_in in stand_ins.items()})
    return model


__all__ = ["GPTQ_DAMPING", "gptq_int4", "quantize_lm_calibrated"]
