"""Weight-only int8 / int4 quantization of the LM's matrices, for decoding on a CPU.

A decoding step multiplies a few rows (batch x guidance) by every matrix of the model, so
its time is the time to read the weights. Storing them in 8 or 4 bits reads 4x / 8x fewer
bytes than float32. :func:`quantize_lm` replaces each matrix weight ``(N, K)`` (attention
projections, feed-forward, and optionally the output heads) by a :class:`QuantizedWeight`
at the same place in the module tree; :func:`lm.transformer.linear` calls its
:meth:`QuantizedWeight.linear`. Embeddings, norms, biases and activations stay float32.

- int8: one scale per output row (``w ~ q * scale``, ``q`` in [-127, 127]).
- int4: per group of ``group_size`` inputs a scale and a zero point (``w ~ (q - 8) * scale
  + zero``, ``q`` in [0, 15]), two values per byte (even column in the low nibble).

Scales and zeros are stored in bfloat16 (rounded before the weights are quantized against
them), since torch's CPU kernels take them so. The kernels are ``aten._weight_int8pack_mm``
and ``aten._weight_int4pack_mm_for_cpu`` (with ``_convert_weight_to_int4pack_for_cpu``);
in this torch they are fast only for bfloat16 activations (float32 inputs take a scalar
path ~40x slower), so activations are cast to bfloat16 for the product and the result back
to the activations' dtype: the product rounds like the ``bf16-weights`` mode does. The
int4 kernel's packed layout depends on the CPU (its row blocks), so files hold the portable
nibble layout and each process packs on first use. Elsewhere (CUDA) the weight is
dequantized to the activations' dtype and multiplied with ``F.linear``.

Shapes the int4 kernel cannot take (``K`` not a multiple of the group size, ``N`` not a
multiple of 16) fall back to int8 for that matrix, with a warning naming them. The
decisions depend on shapes only, so a meta-device model quantized with the same
:class:`QuantConfig` has the exact buffers of a saved one: that is how a quantized folder
loads without ever holding float weights.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from codec.config import DictConfig

QUANT_DTYPES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32  # the most accurate; the kernel runs as fast at 32, 64, 128 (bench/quant_accuracy.py)
HEADS_MODES = ("bf16", "int8", "float32")
STATE_NAMES = ("qweight", "scales", "zeros")  # a QuantizedWeight's tensors in a state dict
_INT4_ROW_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs N % 16 == 0


@dataclass(frozen=True)
class QuantConfig(DictConfig):
    """How the LM's matrices are stored: ``dtype`` int8 or int4, int4's ``group_size``, and the
    output heads' storage (``heads``: bf16 matrices, int8, or float32)."""

    dtype: str
    group_size: int = DEFAULT_GROUP_SIZE
    heads: str = "bf16"

    def __post_init__(self) -> None:
        if self.dtype not in QUANT_DTYPES:
            raise ValueError(f"quantization dtype must be one of {QUANT_DTYPES}, got {self.dtype!r}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, got {self.group_size!r}")
        if self.heads not in HEADS_MODES:
            raise ValueError(f"heads must be one of {HEADS_MODES}, got {self.heads!r}")

    @classmethod
    def parse(cls, spec: str | QuantConfig) -> QuantConfig:
        """``"int8"``, ``"int4"`` or ``"int4-g32"`` / ``"int4-g64"`` / ``"int4-g128"``."""
        if isinstance(spec, QuantConfig):
            return spec
        name, _, group = str(spec).partition("-g")
        if name not in QUANT_DTYPES or (group and (name != "int4" or not group.isdigit())):
            raise ValueError(f"unknown quantization {spec!r}; expected int8, int4 or int4-g<N> with N in "
                             f"{GROUP_SIZES}")
        return cls(name, int(group) if group else DEFAULT_GROUP_SIZE)

    @property
    def name(self) -> str:
        return self.dtype if self.dtype == "int8" or self.group_size == DEFAULT_GROUP_SIZE \
            else f"int4-g{self.group_size}"


def is_quant_spec(value: object) -> bool:
    """True for a :class:`QuantConfig` or a string :meth:`QuantConfig.parse` accepts."""
    if isinstance(value, QuantConfig):
        return True
    if not isinstance(value, str):
        return False
    try:
        QuantConfig.parse(value)
    except ValueError:
        return False
    return True


# -- the arithmetic --------------------------------------------------------------------------------
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight (N, K)`` -> ``q (N, K)`` int8 and per-row ``scales (N,)`` bfloat16."""
    weight = weight.float()
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
    q = torch.round(weight / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


CLIP_RATIOS = (1.0, 0.9, 0.8)  # int4: range shrinks tried per group (more cost load time, gain little)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight (N, K)`` -> nibbles ``(N, K/2)`` uint8, ``scales`` and ``zeros (N, K/group)`` bfloat16.

    Asymmetric per group: a range ``[r * min, r * max]`` maps onto [0, 15] and
    ``w ~ (q - 8) * scale + zero``; per group, the ``r`` of :data:`CLIP_RATIOS` with the least
    squared error wins (clipping a rare large weight buys a finer grid for all the others).
    """
    N, K = weight.shape
    groups = weight.float().reshape(N, K // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    best = None
    for ratio in CLIP_RATIOS:
        scales = ((high - low) * ratio / 15).clamp(min=1e-6).to(torch.bfloat16)
        zeros = (low * ratio + 8 * scales.float()).to(torch.bfloat16)
        q = torch.round((groups - zeros.float()[..., None]) / scales.float()[..., None] + 8).clamp(0, 15)
        error = ((q - 8) * scales.float()[..., None] + zeros.float()[..., None] - groups).pow(2).sum(-1)
        if best is None:
            best = [error, q, scales, zeros]
            continue
        better = error < best[0]
        best[0] = torch.where(better, error, best[0])
        best[1] = torch.where(better[..., None], q, best[1])
        best[2] = torch.where(better, scales, best[2])
        best[3] = torch.where(better, zeros, best[3])
    _, q, scales, zeros = best
    q = q.to(torch.uint8).reshape(N, K)
    return q[:, 0::2] | (q[:, 1::2] << 4), scales, zeros


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


# -- the module ----------------------------------------------------------------------------------
class QuantizedWeight(nn.Module):
    """A weight ``(N, K)`` stored in int8 or int4; stands where the float weight stood.

    ``weight[a:b]`` is a view of rows ``a:b`` (the packed attention projections slice q, k, v)
    and :meth:`linear` is ``F.linear`` with this weight. The int4 kernel's packed form is
    built per row range on first use on a CPU and kept (not saved).
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                 group_size: int = 0) -> None:
        super().__init__()
        self.bits = 8 if zeros is None else 4
        self.group_size = group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        if zeros is not None:
            self.register_buffer("zeros", zeros)
        self._packs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_float(cls, weight: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> QuantizedWeight:
        if bits == 8:
            return cls(*quantize_int8(weight))
        return cls(*quantize_int4(weight, group_size), group_size=group_size)

    @property
    def shape(self) -> torch.Size:
        N, packed = self.qweight.shape
        return torch.Size((N, packed * (2 if self.bits == 4 else 1)))

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"int{self.bits}, shape={tuple(self.shape)}{group}"

    def __getitem__(self, rows: slice) -> _Rows:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("a quantized weight can only be sliced by contiguous rows")
        return _Rows(self, start, stop)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` for ``x (..., K)``; returns ``(..., N)`` in x's dtype."""
        return _Rows(self, 0, self.shape[0]).linear(x, bias)

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The float32 weight (rows ``start:stop``) these integers stand for."""
        rows = slice(start, stop)
        if self.bits == 8:
            return dequantize_int8(self.qweight[rows], self.scales[rows])
        return dequantize_int4(self.qweight[rows], self.scales[rows], self.zeros[rows], self.group_size)

    def _int4_pack(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The CPU kernel's packed weight and ``(K/group, n, 2)`` scales-and-zeros for rows
        ``start:stop``, built once per range (and again if the buffers were replaced)."""
        cached = self._packs.get((start, stop))
        if cached is not None and cached[2] is self.qweight:
            return cached[0], cached[1]
        values = unpack_int4(self.qweight[start:stop]).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 2)
        scale_zeros = torch.stack([self.scales[start:stop], self.zeros[start:stop]], dim=-1)
        scale_zeros = scale_zeros.transpose(0, 1).contiguous()
        self._packs[(start, stop)] = (packed, scale_zeros, self.qweight)
        return packed, scale_zeros

    def _apply(self, fn, recurse: bool = True):
        self._packs.clear()  # moved or converted: the packs belong to the old buffers
        return super()._apply(fn, recurse)


class _Rows:
    """Rows ``start:stop`` of a :class:`QuantizedWeight` (what ``weight[a:b]`` returns)."""

    def __init__(self, weight: QuantizedWeight, start: int, stop: int) -> None:
        self.weight, self.start, self.stop = weight, start, stop

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.stop - self.start, self.weight.shape[1]))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        w, (n, K) = self.weight, self.shape
        if x.shape[-1] != K:
            raise ValueError(f"input has {x.shape[-1]} features, the weight takes {K}")
        if x.device.type != "cpu":
            out = F.linear(x, w.dequantize(self.start, self.stop).to(x.dtype), None)
        else:
            rows = x.reshape(-1, K).to(torch.bfloat16).contiguous()  # the kernels' fast path
            if w.bits == 8:
                out = torch.ops.aten._weight_int8pack_mm(rows, w.qweight[self.start:self.stop],
                                                         w.scales[self.start:self.stop])
            else:
                packed, scale_zeros = w._int4_pack(self.start, self.stop)
                out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, w.group_size, scale_zeros)
            out = out.to(x.dtype).reshape(*x.shape[:-1], n)
        return out if bias is None else out + bias.to(out.dtype)


# -- the model -----------------------------------------------------------------------------------
def _matrices(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(state-dict name, owner module, attribute) of every matrix weight :func:`quantize_lm` stores."""
    for i, layer in enumerate(model.transformer.layers):
        prefix = f"transformer.layers.{i}."
        for attn_name in ("self_attn", "cross_attention"):
            attn = getattr(layer, attn_name)
            if attn is not None:
                yield prefix + attn_name + ".in_proj_weight", attn, "in_proj_weight"
                yield prefix + attn_name + ".out_proj.weight", attn.out_proj, "weight"
        yield prefix + "linear1.weight", layer.linear1, "weight"
        yield prefix + "linear2.weight", layer.linear2, "weight"
    for k, head in enumerate(model.linears):
        yield f"linears.{k}.weight", head, "weight"


def is_matrix_key(key: str) -> bool:
    """True for the state-dict names :func:`_matrices` yields."""
    if key.startswith("linears."):
        return key.endswith(".weight")
    return key.startswith("transformer.layers.") and key.endswith(
        ("attn.in_proj_weight", "attention.in_proj_weight", ".out_proj.weight", ".linear1.weight", ".linear2.weight"))


def int4_fits(shape: tuple[int, int], group_size: int, row_blocks: int = 1) -> bool:
    """Whether the int4 CPU kernel takes an ``(N, K)`` weight used in ``row_blocks`` row slices."""
    N, K = shape
    return K % group_size == 0 and (N // row_blocks) % _INT4_ROW_MULTIPLE == 0


def storage(name: str, shape: tuple[int, ...], config: QuantConfig) -> str:
    """How matrix ``name`` of ``shape`` is stored: ``"int8"``, ``"int4"``, ``"bf16"`` or ``"float32"``.

    Shapes only: a meta model and a state dict reach the same decision.
    """
    if name.startswith("linears."):
        return config.heads
    if config.dtype == "int8":
        return "int8"
    return "int4" if int4_fits(tuple(shape), config.group_size, 3 if "in_proj" in name else 1) else "int8"


def _stored(weight: torch.Tensor, kind: str, group_size: int) -> QuantizedWeight | torch.Tensor:
    if kind == "int8":
        return QuantizedWeight.from_float(weight, 8)
    if kind == "int4":
        return QuantizedWeight.from_float(weight, 4, group_size)
    return weight.to(torch.bfloat16) if kind == "bf16" else weight


def quantize_lm(model: nn.Module, dtype: str | QuantConfig = "int8", *, group_size: int | None = None,
                heads: str | None = None) -> nn.Module:
    """Store ``model``'s (an :class:`~lm.model.LMModel`) matrices in int8 or int4, in place.

    ``dtype``: ``"int8"``, ``"int4"``, ``"int4-g<N>"`` or a :class:`QuantConfig`;
    ``group_size`` / ``heads`` override its fields. The output heads are stored in bfloat16
    by default (``heads="int8"`` quantizes them, ``"float32"`` leaves them). Works on a
    meta-device model (buffers of the right shapes, for loading a quantized folder). Sets
    ``model.quantization`` and returns ``model``.
    """
    config = QuantConfig.parse(dtype)
    overrides = {k: v for k, v in (("group_size", group_size), ("heads", heads)) if v is not None}
    if overrides:
        config = QuantConfig(**{**config.to_dict(), **overrides})
    if getattr(model, "quantization", None) is not None:
        raise ValueError(f"the model is already quantized ({model.quantization.name})")
    fallback = []
    for name, owner, attribute in _matrices(model):
        weight = getattr(owner, attribute).detach()
        kind = storage(name, tuple(weight.shape), config)
        if kind == "int8" and config.dtype == "int4" and not name.startswith("linears."):
            fallback.append(name)
        stored = _stored(weight, kind, config.group_size)
        if isinstance(stored, QuantizedWeight):
            _replace(owner, attribute, stored)
        else:
            getattr(owner, attribute).data = stored
        del weight, stored
    if fallback:
        warnings.warn(f"int4-g{config.group_size}: {len(fallback)} matrices stored in int8 instead (in_features "
                      f"not a multiple of {config.group_size}, or rows not a multiple of {_INT4_ROW_MULTIPLE}): "
                      f"{', '.join(fallback[:4])}{' ...' if len(fallback) > 4 else ''}", stacklevel=2)
    model.quantization = config
    return model


def _replace(owner: nn.Module, attribute: str, value: nn.Module) -> None:
    delattr(owner, attribute)
    setattr(owner, attribute, value)


def is_quantized_key(key: str) -> bool:
    """True for the state-dict entries of a :class:`QuantizedWeight` (``...weight.qweight``)."""
    owner, _, leaf = key.rpartition(".")
    return leaf in STATE_NAMES and is_matrix_key(owner)


def quantize_state(state: dict[str, torch.Tensor], config: QuantConfig,
                   convert: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, torch.Tensor]:
    """A float LM state dict -> the state dict of the same LM after :func:`quantize_lm`.

    Tensor by tensor: each is converted (``convert``: to float32 on the target device) and each
    matrix quantized and dropped before the next, so at most one float matrix is held besides
    the integers. ``state`` is emptied as it is read.
    """
    out: dict[str, torch.Tensor] = {}
    for key in list(state):
        tensor = convert(state.pop(key))
        if not is_matrix_key(key):
            out[key] = tensor
            continue
        stored = _stored(tensor, storage(key, tuple(tensor.shape), config), config.group_size)
        if isinstance(stored, QuantizedWeight):
            out.update({f"{key}.{leaf}": value for leaf, value in stored.state_dict().items()})
        else:
            out[key] = stored
        del tensor, stored
        release_freed_memory()
    return out


@lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    Quantizing allocates float temporaries between the integer tensors it keeps; glibc keeps
    the freed space in its heap, so without this the peak RSS of a load-time quantization
    grows by about the float checkpoint's size (measured by ``bench/load_memory.py``).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


__all__ = ["DEFAULT_GROUP_SIZE", "GROUP_SIZES", "QUANT_DTYPES", "QuantConfig", "QuantizedWeight",
           "dequantize_int4", "dequantize_int8", "int4_fits", "is_matrix_key", "is_quant_spec",
           "is_quantized_key", "quantize_int4", "quantize_int8", "quantize_lm", "quantize_state", "storage"]
