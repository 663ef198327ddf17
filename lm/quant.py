"""Weight-only int8 / int4 quantization of the LM's matrices, for decoding on a CPU.

A decoding step multiplies a few rows (batch x guidance) by every matrix of the model, so
its time is the time to read the weights. Storing them in 8 or 4 bits reads 4x / 8x fewer
bytes than float32. :func:`quantize_lm` replaces each matrix weight ``(N, K)`` (attention
projections, feed-forward, and optionally the output heads) by a :class:`QuantizedWeight`
at the same place in the module tree; :func:`lm.transformer.linear` calls its
:meth:`QuantizedWeight.linear`. Embeddings, norms, biases and activations stay float32.

- int8: one scale per output row (``w ~ q * scale``, ``q`` in [-127, 127]).
- int4: per group of ``group_size`` inputs a scale and a zero point (``w ~ (q - 8) * scale
  + zero``, ``q`` in [0, 15]), two values per byte (even column in the low nibble), fitted
  by least squares (:func:`quantize_int4`). Offline, :func:`quantize_lm_calibrated` rounds
  them by GPTQ for the inputs a calibration batch produces instead: same buffers, closer
  products.

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

from . import cpu_kernels
from .transformer import RowSliced

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


# -- the module ----------------------------------------------------------------------------------
class QuantizedWeight(RowSliced):
    """A weight ``(N, K)`` stored in int8 or int4; stands where the float weight stood.

    ``weight[a:b]`` is a view of rows ``a:b`` (the packed attention projections slice q, k, v)
    and :meth:`linear` is ``F.linear`` with this weight. The int4 kernel's packed form is
    built per row range on first use on a CPU and kept (not saved).
    """

    kind = "a quantized weight"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                 group_size: int = 0) -> None:
        super().__init__()
        self.bits = 8 if zeros is None else 4
        self.group_size = group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        if zeros is not None:
            self.register_buffer("zeros", zeros)
        self._packs: dict[tuple, tuple[torch.Tensor, ...]] = {}

    @classmethod
    def from_float(cls, weight: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> QuantizedWeight:
        if bits == 8:
            return cls(*quantize_int8(weight))
        return cls(*quantize_int4(weight, group_size), group_size=group_size)

    @property
    def shape(self) -> torch.Size:
        N, packed = self._buffers["qweight"].shape
        return torch.Size((N, packed * (2 if self.bits == 4 else 1)))

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"int{self.bits}, shape={tuple(self.shape)}{group}"

    def _align(self) -> None:
        """Copy the int8 matrix and scales to 64-byte aligned memory when they are not: a memory-mapped
        safetensors file places a tensor at any 8-byte offset, and torch's int8 CPU kernel reads
        unaligned rows out of bounds (a segfault, not an error)."""
        if self.qweight.data_ptr() % 64 or self.scales.data_ptr() % 64:
            self.qweight = self.qweight.clone()
            self.scales = self.scales.clone()

    def rows_linear(self, start: int, stop: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear(x, rows start:stop, bias)`` for ``x (..., K)``; returns ``(..., n)`` in x's dtype."""
        n, K = stop - start, self.shape[1]
        if x.shape[-1] != K:
            raise ValueError(f"input has {x.shape[-1]} features, the weight takes {K}")
        if x.device.type != "cpu":
            out = F.linear(x, self.dequantize(start, stop).to(x.dtype), None)
        else:
            packed = self._native_pack(start, stop) if cpu_kernels.available() else None
            if packed is not None:  # lm.cpu_kernels: float32 rows in, float32 out
                rows = x.reshape(-1, K).float().contiguous()
                out = (cpu_kernels.int4_linear(rows, packed[0], n, self.group_size) if self.bits == 4
                       else cpu_kernels.int8_linear(rows, *packed))
                out = out.reshape(*x.shape[:-1], n) if x.dtype == torch.float32 else out.to(x.dtype).reshape(
                    *x.shape[:-1], n)
                return out if bias is None else out + bias.to(out.dtype)
            rows = x.reshape(-1, K).to(torch.bfloat16).contiguous()  # torch's kernels' fast path
            if self.bits == 8:
                self._align()
                out = torch.ops.aten._weight_int8pack_mm(rows, self.qweight[start:stop], self.scales[start:stop])
            else:
                packed, scale_zeros = self._int4_pack(start, stop)
                out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, self.group_size, scale_zeros)
            out = out.to(x.dtype).reshape(*x.shape[:-1], n)
        return out if bias is None else out + bias.to(out.dtype)

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

    def _native_pack(self, start: int, stop: int) -> tuple[torch.Tensor, ...] | None:
        """:mod:`lm.cpu_kernels`' packed rows ``start:stop`` (int4: the blocks; int8: blocks and
        scales; None where its shapes do not fit), built once per range. Called per product: reads
        the buffers dict, not module attributes."""
        qweight = self._buffers["qweight"]
        cached = self._packs.get(("native", start, stop))
        if cached is not None and cached[1] is qweight:
            return cached[0]
        rows, packed = slice(start, stop), None
        if self.bits == 4 and cpu_kernels.int4_fits(stop - start, qweight.shape[1] * 2, self.group_size):
            packed = (cpu_kernels.int4_pack(qweight[rows], self.scales[rows], self.zeros[rows], self.group_size),)
        elif self.bits == 8 and cpu_kernels.int8_fits(stop - start, qweight.shape[1]):
            packed = cpu_kernels.int8_pack(qweight[rows], self.scales[rows])
        self._packs[("native", start, stop)] = (packed, qweight)
        return packed

    def _apply(self, fn, recurse: bool = True):
        self._packs.clear()  # moved or converted: the packs belong to the old buffers
        return super()._apply(fn, recurse)


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
    config = _parse(dtype, group_size, heads)
    _check_unquantized(model)
    _store_matrices(model, config, {})
    return model


def _parse(dtype: str | QuantConfig, group_size: int | None, heads: str | None) -> QuantConfig:
    config = QuantConfig.parse(dtype)
    overrides = {k: v for k, v in (("group_size", group_size), ("heads", heads)) if v is not None}
    return QuantConfig(**{**config.to_dict(), **overrides}) if overrides else config


def _check_unquantized(model: nn.Module) -> None:
    if getattr(model, "quantization", None) is not None:
        raise ValueError(f"the model is already quantized ({model.quantization.name})")


def _store_matrices(model: nn.Module, config: QuantConfig, ready: dict[str, QuantizedWeight]) -> None:
    """Store every matrix of ``model`` as ``config`` says (``ready``: already quantized, by name)
    and set ``model.quantization``."""
    fallback = []
    for name, owner, attribute in _matrices(model):
        if name in ready:
            _replace(owner, attribute, ready[name])
            continue
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
                      f"{', '.join(fallback[:4])}{' ...' if len(fallback) > 4 else ''}", stacklevel=3)
    model.quantization = config


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
