"""Loss balancer (EnCodec paper, section 3.4; audiocraft's ``Balancer``).

Each loss ``i`` has a gradient ``g_i`` with respect to the model's output (the decoded audio).
Instead of back-propagating ``sum_i w_i g_i``, whose mix depends on each loss's scale, the
balancer back-propagates

    sum_i  R * (w_i / sum_j w_j) * g_i / <|g_i|>

where ``<|g_i|>`` is an exponential moving average (decay 0.999, bias-corrected) of the L2 norm
of ``g_i`` and ``R`` is a reference norm (1). So ``w_i / sum_j w_j`` is the share of the
output gradient that loss ``i`` contributes, whatever its scale: the weights say what fraction
of the update each loss gets. With ``per_batch_item`` the norm is taken per batch item and
averaged (audiocraft's default), so it does not grow with the batch size.

Only the output gradient is computed here; the caller back-propagates it through the model
(together with losses kept out of the balance, such as the commitment loss) in one backward.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import autograd


class Balancer:
    """Gradient-norm-based weighting of losses that all depend on one output tensor."""

    def __init__(self, weights: Mapping[str, float], *, balance_grads: bool = True,
                 total_norm: float = 1.0, ema_decay: float = 0.999, per_batch_item: bool = True,
                 epsilon: float = 1e-12) -> None:
        if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"balancer weights must be non-negative with a positive sum, "
                             f"got {dict(weights)}")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.weights = dict(weights)
        self.balance_grads = balance_grads
        self.total_norm = total_norm
        self.ema_decay = ema_decay
        self.per_batch_item = per_batch_item
        self.epsilon = epsilon
        # Bias-corrected EMA: average = total / weight with total, weight both decayed.
        self._ema_total: dict[str, float] = {}
        self._ema_weight: dict[str, float] = {}
        self.metrics: dict[str, float] = {}

    @property
    def ratios(self) -> dict[str, float]:
        total = sum(self.weights.values())
        return {name: w / total for name, w in self.weights.items()}

    def _norm(self, grad: torch.Tensor) -> torch.Tensor:
        if self.per_batch_item:
            return grad.flatten(1).norm(dim=1).mean()
        return grad.norm()

    def _average(self, norms: dict[str, torch.Tensor]) -> dict[str, float]:
        """Update the EMAs with this step's norms (averaged over processes) and return them."""
        values = torch.stack([norms[name] for name in norms]).detach().double()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(values)
            values /= torch.distributed.get_world_size()
        out = {}
        for name, value in zip(norms, values.tolist()):
            self._ema_total[name] = self.ema_decay * self._ema_total.get(name, 0.0) + value
            self._ema_weight[name] = self.ema_decay * self._ema_weight.get(name, 0.0) + 1.0
            out[name] = self._ema_total[name] / self._ema_weight[name]
        return out

    def scales(self, norms: Mapping[str, float]) -> dict[str, float]:
        """The factor each loss's gradient gets, given its (averaged) gradient norm."""
        if not self.balance_grads:
            return {name: self.weights[name] for name in norms}
        ratios = self.ratios
        return {name: ratios[name] * self.total_norm / (self.epsilon + norm)
                for name, norm in norms.items()}

    def output_gradient(self, losses: Mapping[str, torch.Tensor], output: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient to back-propagate from ``output`` and the effective loss (a detached
        scalar, ``sum_i scale_i * loss_i``, for logging).

        ``losses`` must have the same names as the weights and each depend on ``output``.
        """
        if set(losses) != set(self.weights):
            raise ValueError(f"balancer has weights for {sorted(self.weights)}, got losses "
                             f"{sorted(losses)}")
        grads, norms = {}, {}
        for name, loss in losses.items():
            (grad,) = autograd.grad(loss, [output], retain_graph=True)
            grads[name] = grad
            norms[name] = self._norm(grad)
        averaged = self._average(norms)
        scales = self.scales(averaged)
        out = torch.zeros_like(output)
        effective = torch.zeros((), dtype=torch.float32, device=output.device)
        for name, grad in grads.items():
            out.add_(grad, alpha=scales[name])
            effective += scales[name] * losses[name].detach().float()
        self.metrics = {**{f"grad_norm_{n}": float(v) for n, v in averaged.items()},
                        **{f"scale_{n}": s for n, s in scales.items()}}
        return out, effective

    def state_dict(self) -> dict:
        return {"ema_total": dict(self._ema_total), "ema_weight": dict(self._ema_weight)}

    def load_state_dict(self, state: Mapping) -> None:
        self._ema_total = {k: float(v) for k, v in state["ema_total"].items()}
        self._ema_weight = {k: float(v) for k, v in state["ema_weight"].items()}
