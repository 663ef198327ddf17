"""The pieces a fine-tuning step is made of: the trained module, MusicGen's loss, the learning-rate
schedule, the weight EMA, AdamW's parameter groups and gradient checkpointing.

Recipe (audiocraft's MusicGen solver unless said otherwise): cross-entropy per codebook on the
valid positions of the delay pattern (``LMModel.compute_predictions``), averaged over codebooks;
AdamW (betas 0.9/0.95, weight decay 0.1 on matrices only, as nanoGPT) with linear warmup and
cosine decay to ``min_lr_ratio``; an optional EMA of the weights (audiocraft: decay 0.99 every
10 steps). The text encoder always runs in float32 (T5 overflows in fp16).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from conditioning import ConditionProvider, summed_input
from conditioning.base import Condition

from .model import LMModel


class ConditionedLM(nn.Module):
    """The LM with its condition provider and fuser: the one module that is wrapped (DDP) and
    trained. Its state-dict keys are ``lm.*`` and ``condition_provider.*``."""

    def __init__(self, *, lm: LMModel, condition_provider: ConditionProvider, fuser: nn.Module,
                 mask_condition_padding: bool) -> None:
        super().__init__()
        self.lm = lm
        self.condition_provider = condition_provider
        self.fuser = fuser
        self.mask_condition_padding = mask_condition_padding

    def _description(self, captions: list[str | None] | None,
                     text_states: tuple[torch.Tensor, torch.Tensor] | None) -> Condition:
        if text_states is None:
            return self.condition_provider({"description": captions})["description"]
        hidden, mask = text_states  # cached T5 output: only the projection runs
        conditioner = self.condition_provider.conditioners["description"]
        projection = conditioner.output_proj
        if projection is not None:
            hidden = projection(hidden.to(projection.weight.dtype))
        return Condition(hidden * mask[..., None].to(hidden.dtype), mask)

    def forward(self, codes: torch.Tensor, *, captions: list[str | None] | None = None,
                text_states: tuple[torch.Tensor, torch.Tensor] | None = None,
                musical: dict[str, list] | None = None, start_frames: list[int] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """codes ``(B, K, T)``, B captions (None = null) or cached T5 states ``((B, S, D), (B, S))``
        -> logits ``(B, K, T, card)`` and the valid-prediction mask ``(B, K, T)``.

        ``musical``: the ``bpm``/``key`` values of the samples (None = null) for a model that sums
        them into its input (:mod:`conditioning.musical`); ``start_frames``: where each window
        starts in its clip (the beat clock's phase)."""
        with torch.autocast(device_type=codes.device.type, enabled=False):  # T5 overflows in fp16
            conditions = {"description": self._description(captions, text_states)}
        frame_input = None
        if self.fuser.config.sum:
            steps = self.lm.pattern_provider.get_pattern(codes.shape[-1]).num_steps
            frame_input = summed_input(self.condition_provider, self.fuser,
                                       musical or {"bpm": [None] * codes.shape[0]}, steps=steps,
                                       start_frames=start_frames if start_frames is not None else 0)
        param = self.lm.emb[0].weight
        empty = torch.zeros(codes.shape[0], 0, self.lm.config.dim, dtype=param.dtype, device=param.device)
        fused = self.fuser(empty, conditions)
        condition = condition_mask = None
        if fused.cross is not None:
            condition = fused.cross.to(param.dtype)
            condition_mask = fused.cross_mask if self.mask_condition_padding else None
        prefix = fused.input if fused.prepend_length else None
        return self.lm.compute_predictions(codes, condition=condition, condition_mask=condition_mask,
                                           prefix=prefix, frame_input=frame_input)


def codebook_cross_entropy(logits: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor,
                           frame_weights: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MusicGen's loss: cross-entropy of each codebook over its valid positions, averaged over
    codebooks (codebooks with no valid position are left out of the average).

    logits ``(B, K, T, card)`` (NaN where invalid), codes ``(B, K, T)``, mask ``(B, K, T)`` bool.
    Returns the loss (scalar), and per codebook the summed cross-entropy ``(K,)`` and the number
    of positions ``(K,)`` (float64, for exact sums across batches and processes).
    ``frame_weights`` ``(T,)``: the loss is then each codebook's weighted mean over its positions
    (weight by frame index); the sums and counts stay unweighted, so logged losses keep their meaning.
    """
    K = codes.shape[1]
    sums, counts, means = [], [], []
    for k in range(K):
        valid = mask[:, k]
        ce = F.cross_entropy(logits[:, k][valid].float(), codes[:, k][valid], reduction="none")
        count = valid.sum()
        sums.append(ce.detach().sum())
        counts.append(count)
        if count > 0:
            if frame_weights is None:
                means.append(ce.sum() / count)
            else:
                w = frame_weights.to(ce.device, ce.dtype).expand(valid.shape)[valid]
                means.append((ce * w).sum() / w.sum())
    if not means:
        raise ValueError("the batch holds no valid position to predict (windows shorter than the pattern?)")
    loss = torch.stack(means).mean()
    return loss, torch.stack(sums).double(), torch.stack(counts).double()


def start_weights(frames: int, weight: float, decay_frames: float) -> torch.Tensor | None:
    """Loss weight ``1 + weight * exp(-t / decay_frames)`` of window frame ``t`` (None when
    ``weight`` is 0). Why: only a window's first frames lack audio context, so only there must the
    LM read its caption; unweighted they are a few per cent of the loss and the caption stays unused."""
    if not weight:
        return None
    return 1.0 + weight * torch.exp(-torch.arange(frames, dtype=torch.float32) / decay_frames)


def cosine_schedule(*, warmup: int, total: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier of step ``i`` (0-based): linear warmup over ``warmup`` steps to 1, then cosine
    decay to ``min_ratio`` at step ``total``."""
    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = min(1.0, (i - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def validation_metrics(totals: torch.Tensor) -> dict[str, float]:
    """Validation loss (mean over codebooks of each codebook's mean cross-entropy) and perplexities
    from ``totals (2, K)``: summed cross-entropy and position count per codebook; {} when empty."""
    if not totals[1].sum():
        return {}
    per_codebook = [float(totals[0, k] / totals[1, k]) for k in range(totals.shape[1]) if totals[1, k]]
    out = {"valid/loss": sum(per_codebook) / len(per_codebook)}
    out["valid/ppl"] = math.exp(out["valid/loss"])
    for k, ce in enumerate(per_codebook):
        out[f"valid/ppl_{k}"] = math.exp(ce)
    return out


class EMA:
    """Exponential moving average of parameters, in float32, updated every ``every`` steps:
    ``ema = decay * ema + (1 - decay) * param`` (audiocraft's ModuleDictEMA)."""

    def __init__(self, named: dict[str, nn.Parameter], *, decay: float, every: int) -> None:
        self.params = named
        self.decay = decay
        self.every = every
        self.shadow = {name: p.detach().float().clone() for name, p in named.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after optimizer step number ``step`` (1-based)."""
        if step % self.every:
            return
        for name, param in self.params.items():
            self.shadow[name].mul_(self.decay).add_(param.detach().float(), alpha=1 - self.decay)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The parameters hold the EMA weights inside the block, their own weights after it."""
        saved = {name: p.detach().clone() for name, p in self.params.items()}
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(saved[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.cpu() for name, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            missing, unexpected = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
            raise ValueError(f"EMA state does not fit the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)


def is_text_encoder(name: str) -> bool:
    """Whether a ``ConditionedLM`` parameter belongs to a T5 encoder (``...conditioners.<n>.t5.*``)."""
    return ".t5." in name


def param_groups(named: dict[str, nn.Parameter], *, lr: float, weight_decay: float,
                 text_encoder_lr_scale: float) -> list[dict[str, Any]]:
    """AdamW groups: LM (and projections) then text encoder, each split into matrices (weight
    decay) and vectors (none, as nanoGPT). The text encoder's learning rate is scaled; LambdaLR
    applies the one schedule to every group's own rate."""
    groups = []
    for text, scale in ((False, 1.0), (True, text_encoder_lr_scale)):
        params = [p for n, p in named.items() if is_text_encoder(n) == text]
        for decay in (True, False):
            chosen = [p for p in params if (p.dim() >= 2) == decay]
            if chosen or not text:  # the two LM groups always exist: logs read group 0's rate
                groups.append({"params": chosen, "lr": lr * scale,
                               "weight_decay": weight_decay if decay else 0.0})
    return groups


def unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors safetensors can write: a tensor that shares memory with an earlier one (T5's
    tied embeddings, saved under two names) is copied, so both names load back."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if identity in seen else tensor.contiguous()
        seen.add(identity)
    return out


def set_gradient_checkpointing(lm: LMModel, enabled: bool = True) -> None:
    """Recompute each transformer layer's activations in the backward pass (saves memory; costs
    about one extra forward). Parameter names are unchanged."""
    from torch.utils.checkpoint import checkpoint

    for layer in lm.transformer.layers:
        if not enabled:
            layer.__dict__.pop("forward", None)
            continue
        plain = type(layer).forward.__get__(layer)

        def checkpointed(x, *, _plain=plain, _layer=layer, **kwargs):
            if not (_layer.training and torch.is_grad_enabled()):
                return _plain(x, **kwargs)
            return checkpoint(_plain, x, use_reentrant=False, **kwargs)

        layer.forward = checkpointed


__all__ = [
    "EMA", "ConditionedLM", "codebook_cross_entropy", "cosine_schedule", "is_text_encoder", "param_groups",
    "set_gradient_checkpointing", "start_weights", "unshared", "validation_metrics",
]
