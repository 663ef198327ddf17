"""LoRA: low-rank adapters on the LM's projection matrices, for cheap fine-tuning.

    add_lora(lm, rank=8)                 # wrap the attention projections; the start equals the base
    train_only_adapters(module)          # what the training loop calls: only A and B get gradients
    state = lora_state_dict(lm)          # the adapters alone (a few MB for musicgen-small)
    load_lora(base_lm_with_same_adapters, state)
    merge_lora(lm)                       # fold them into the weights: a plain LM again

A matrix ``W (N, K)`` becomes ``W + (alpha / rank) * B @ A`` with ``A (rank, K)`` (nn.Linear's
default init) and ``B (N, rank)`` zero, so before training the output is the base's exactly.
Like :mod:`lm.quant`, the weight is swapped in place for a module (:class:`LoRAWeight`) that
:func:`lm.transformer.linear` calls; row slices (the packed q/k/v projection's
``in_proj_weight[a:b]``) take the matching rows of ``B``, so one adapter covers the packed
q, k and v. The base stays where it was as ``<name>.base`` (a float tensor, or a
:class:`lm.quant.QuantizedWeight`: adapters run over a quantized base, but merge into float only).

Targets (``targets=``): ``self_attn.in_proj``, ``self_attn.out_proj``, ``cross_attention.in_proj``,
``cross_attention.out_proj``, ``linear1``, ``linear2`` (the feed-forward), or the groups
``self_attn``, ``cross_attention``, ``attn`` (the four attention matrices, the default), ``ffn``, ``all``.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from codec.config import DictConfig

from .transformer import RowSliced, linear

MATRICES = ("self_attn.in_proj", "self_attn.out_proj", "cross_attention.in_proj", "cross_attention.out_proj",
            "linear1", "linear2")
GROUPS = {"self_attn": MATRICES[:2], "cross_attention": MATRICES[2:4], "attn": MATRICES[:4],
          "ffn": MATRICES[4:], "all": MATRICES}
DEFAULT_TARGETS = ("attn",)
STATE_NAMES = ("lora_A", "lora_B")


def expand_targets(targets: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Target names and groups -> the matrices they name, in :data:`MATRICES` order."""
    unknown = [t for t in targets if t not in MATRICES and t not in GROUPS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA target(s) {unknown or '(none given)'}; choose from "
                         f"{', '.join((*GROUPS, *MATRICES))}")
    chosen = {m for t in targets for m in GROUPS.get(t, (t,))}
    return tuple(m for m in MATRICES if m in chosen)


@dataclass(frozen=True)
class LoRAConfig(DictConfig):
    """``rank`` of the adapters, ``alpha`` (scale ``alpha / rank``; None: ``rank``, a scale of 1)
    and the matrices they wrap (``targets``, expanded)."""

    rank: int
    alpha: float | None = None
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, found {self.rank!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be positive, found {self.alpha!r}")
        object.__setattr__(self, "targets", expand_targets(tuple(self.targets)))

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else float(self.alpha)) / self.rank


class LoRAWeight(RowSliced):
    """A weight ``(N, K)`` plus ``scale * lora_B @ lora_A``; stands where the weight stood."""

    kind = "a LoRA weight"

    def __init__(self, base: torch.Tensor | nn.Module, rank: int, scale: float) -> None:
        super().__init__()
        N, K = base.shape
        if isinstance(base, nn.Module):  # a QuantizedWeight
            self.base = base
            dtype, self.base_requires_grad = torch.float32, False
        else:
            dtype = base.dtype if base.dtype.is_floating_point else torch.float32
            self.base_requires_grad = base.requires_grad
            self.base = nn.Parameter(base.detach(), requires_grad=False)
        self.rank, self.scale = rank, scale
        self.lora_A = nn.Parameter(torch.empty(rank, K, dtype=dtype, device=base.device))
        self.lora_B = nn.Parameter(torch.zeros(N, rank, dtype=dtype, device=base.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default, as LoRA's paper

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.base.shape)

    @property
    def device(self) -> torch.device:
        return self.lora_A.device

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, rank={self.rank}, scale={self.scale:g}"

    def rows_linear(self, start: int, stop: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear(x, rows start:stop of W + scale * B @ A, bias)``, without forming the sum."""
        out = linear(x, self.base[start:stop], bias)
        hidden = F.linear(x.to(self.lora_A.dtype), self.lora_A)
        return out + (F.linear(hidden, self.lora_B[start:stop]) * self.scale).to(out.dtype)

    def merged(self) -> torch.Tensor:
        """The base plus the adapter, in the base's dtype (summed in float32)."""
        if isinstance(self.base, nn.Module):
            raise ValueError("cannot merge LoRA adapters into a quantized LM: load the base in float "
                             "(no dtype=int8/int4), merge, then quantize")
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
        return (self.base.float() + delta).to(self.base.dtype)


# -- the model -----------------------------------------------------------------------------------
def _sites(lm: nn.Module, matrices: tuple[str, ...]) -> Iterator[tuple[str, nn.Module, str]]:
    """(state-dict name, owner module, attribute) of each matrix of ``matrices`` in ``lm``."""
    for i, layer in enumerate(lm.transformer.layers):
        prefix = f"transformer.layers.{i}."
        for matrix in matrices:
            part, _, kind = matrix.partition(".")
            if not kind:  # linear1 / linear2
                yield f"{prefix}{part}.weight", getattr(layer, part), "weight"
                continue
            attn = getattr(layer, part)
            if attn is None:  # no cross-attention in this LM
                continue
            if kind == "in_proj":
                yield f"{prefix}{part}.in_proj_weight", attn, "in_proj_weight"
            else:
                yield f"{prefix}{part}.out_proj.weight", attn.out_proj, "weight"


def adapters(lm: nn.Module) -> dict[str, LoRAWeight]:
    """The LM's :class:`LoRAWeight` modules by state-dict name (empty: a plain LM)."""
    return {name: module for name, module in lm.named_modules() if isinstance(module, LoRAWeight)}


def has_lora(lm: nn.Module) -> bool:
    return getattr(lm, "lora", None) is not None


def _replace(owner: nn.Module, attribute: str, value: nn.Module | nn.Parameter) -> None:
    delattr(owner, attribute)
    setattr(owner, attribute, value)


def add_lora(lm: nn.Module, rank: int | LoRAConfig, alpha: float | None = None,
             targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS) -> LoRAConfig:
    """Wrap ``lm``'s (an :class:`~lm.model.LMModel`) ``targets`` in rank-``rank`` adapters, in
    place; the wrapped weights are frozen, the rest of the LM is left as it is (see
    :func:`train_only_adapters`). Sets and returns ``lm.lora``."""
    config = rank if isinstance(rank, LoRAConfig) else LoRAConfig(rank, alpha, tuple(targets))
    if has_lora(lm):
        raise ValueError("the LM already holds LoRA adapters: merge_lora(lm) first")
    sites = list(_sites(lm, config.targets))
    if not sites:
        raise ValueError(f"the LM has none of the LoRA targets {list(config.targets)}")
    smallest = min(min(getattr(owner, attribute).shape) for _, owner, attribute in sites)
    if config.rank > smallest:
        raise ValueError(f"LoRA rank {config.rank} exceeds the smallest targeted matrix side ({smallest}); "
                         f"use a rank <= {smallest}")
    for _, owner, attribute in sites:
        _replace(owner, attribute, LoRAWeight(getattr(owner, attribute), config.rank, config.scale))
    lm.lora = config
    return config


def train_only_adapters(module: nn.Module) -> list[str]:
    """Freeze every parameter of ``module`` but the adapters' A and B; returns the trained names."""
    trained = []
    for name, param in module.named_parameters():
        param.requires_grad_(name.rpartition(".")[2] in STATE_NAMES)
        if param.requires_grad:
            trained.append(name)
    if not trained:
        raise ValueError("the module holds no LoRA adapters to train (add_lora first)")
    return trained


def lora_state_dict(lm: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone: ``<matrix name>.lora_A`` / ``.lora_B`` (no base weight)."""
    return {f"{name}.{leaf}": getattr(module, leaf) for name, module in adapters(lm).items()
            for leaf in STATE_NAMES}


def load_lora(lm: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapters (:func:`lora_state_dict`'s form) into ``lm``'s, which :func:`add_lora` made
    with the same rank and targets; names and shapes must match exactly."""
    mine = lora_state_dict(lm)
    missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
    if missing or unexpected:
        raise ValueError(f"the LoRA weights do not fit the LM (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}): another base model, rank or targets?")
    for key, param in mine.items():
        if tuple(state[key].shape) != tuple(param.shape):
            raise ValueError(f"LoRA weight {key} has shape {tuple(state[key].shape)}, the LM's adapter "
                             f"{tuple(param.shape)}: another base model or rank?")
        with torch.no_grad():
            param.copy_(state[key].to(param.dtype))


def merge_lora(lm: nn.Module) -> nn.Module:
    """Fold each adapter into its weight (``W + scale * B @ A``) and drop the wrappers: a plain LM
    with the same outputs (to float rounding). Clears ``lm.lora``; returns ``lm``."""
    wrapped = adapters(lm)
    for module in wrapped.values():  # check all first: nothing changes when one cannot merge
        if isinstance(module.base, nn.Module):
            module.merged()
    for name, module in wrapped.items():
        owner_name, _, attribute = name.rpartition(".")
        owner = lm.get_submodule(owner_name)
        with torch.no_grad():
            weight = nn.Parameter(module.merged(), requires_grad=module.base_requires_grad)
        _replace(owner, attribute, weight)
    lm.lora = None
    return lm


__all__ = ["DEFAULT_TARGETS", "GROUPS", "MATRICES", "LoRAConfig", "LoRAWeight", "adapters", "add_lora",
           "expand_targets", "has_lora", "load_lora", "lora_state_dict", "merge_lora", "train_only_adapters"]
