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
them). On a CPU the products run on :mod:`lm.cpu_kernels` (int8 activations, VNNI) where it
runs, else on torch's ``aten._weight_int8pack_mm`` and ``aten._weight_int4pack_mm_for_cpu``
(with ``_convert_weight_to_int4pack_for_cpu``), which are fast only for bfloat16 activations
(float32 inputs take a scalar path ~40x slower): activations are then cast to bfloat16 for
the product and the result back. Both kernels want their own packed layouts, so files hold
the portable nibble layout and each process packs on first use. Elsewhere (CUDA) the weight
is dequantized to the activations' dtype and multiplied with ``F.linear``.

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
from .quant_rounding import (dequantize_int4, dequantize_int8, quantize_int4, quantize_int8,  # noqa: F401
                             unpack_int4)
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


# -- the module ----------------------------------------------------------------------------------
class QuantizedWeight(RowSliced):
    """A weight ``(N, K)`` stored in int8 or int4; stands where the float weight stood.

    ``weight[a:b]`` is a view of rows ``a:b`` (the packed attention projections slice q, k, v)
    and :meth:`linear` is ``F.linear`` with this weight. On a CPU where :mod:`lm.cpu_kernels`
    runs, the first product packs the whole weight into its layout, which then stands in for
    the buffers (see ``_native_pack``); elsewhere torch's int4 layout is built per row range
    and kept beside them. Neither is saved: ``state_dict`` gives the portable buffers.
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
        self._packs: dict[tuple, tuple[torch.Tensor, ...]] = {}  # torch's int4 layout, per row range
        self._native: tuple[torch.Tensor, ...] | None = None  # lm.cpu_kernels' layout, all rows; () if none
        self._released: dict[str, tuple[torch.Size, torch.dtype]] = {}  # buffers held only in _native

    @classmethod
    def from_float(cls, weight: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> QuantizedWeight:
        if bits == 8:
            return cls(*quantize_int8(weight))
        return cls(*quantize_int4(weight, group_size), group_size=group_size)

    @property
    def shape(self) -> torch.Size:
        N, packed = self._released["qweight"][0] if self._released else self._buffers["qweight"].shape
        return torch.Size((N, packed * (2 if self.bits == 4 else 1)))

    @property
    def device(self) -> torch.device:
        return self._buffers["qweight"].device  # the placeholder of a packed weight is on it too

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
            native = self._native_pack(start, stop) if cpu_kernels.available() else None
            if native is not None:  # lm.cpu_kernels: float32 rows in, float32 out
                rows = x.reshape(-1, K).float().contiguous()
                out = (cpu_kernels.int4_linear(rows, native[0], n, self.group_size) if self.bits == 4
                       else cpu_kernels.int8_linear(rows, *native))
            elif self.bits == 8:
                self._align()
                rows = x.reshape(-1, K).to(torch.bfloat16).contiguous()  # torch's kernels' fast path
                out = torch.ops.aten._weight_int8pack_mm(rows, self.qweight[start:stop], self.scales[start:stop])
            else:
                rows = x.reshape(-1, K).to(torch.bfloat16).contiguous()
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
        ``start:stop``, built once per range (replacing the buffers drops them: ``_invalidate``)."""
        cached = self._packs.get((start, stop))
        if cached is not None:
            return cached
        values = unpack_int4(self.qweight[start:stop]).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 2)
        scale_zeros = torch.stack([self.scales[start:stop], self.zeros[start:stop]], dim=-1)
        scale_zeros = scale_zeros.transpose(0, 1).contiguous()
        self._packs[(start, stop)] = (packed, scale_zeros)
        return packed, scale_zeros

    # lm.cpu_kernels' layout. Built for all rows on the first product on a CPU; row ranges are views
    # of its 16-row blocks. It then replaces the portable buffers (one copy of the weight in memory:
    # a MusicGen-large-sized int8 LM would otherwise hold 3.2 GB twice); they come back, exactly,
    # when read (state_dict, dequantize, torch's kernels, a device move).
    def _native_pack(self, start: int, stop: int) -> tuple[torch.Tensor, ...] | None:
        """The kernel's rows ``start:stop`` (int4: blocks; int8: blocks and float32 scales), or
        None where its shapes do not fit. Called per product: reads no module attributes."""
        native = self._native if self._native is not None else self._build_native()
        if not native or start % cpu_kernels.BLOCK or stop % cpu_kernels.BLOCK:
            return None
        blocks = native[0][start // cpu_kernels.BLOCK:stop // cpu_kernels.BLOCK]
        return (blocks,) if self.bits == 4 else (blocks, native[1][start:stop])

    def _build_native(self) -> tuple[torch.Tensor, ...]:
        q, scales = self._buffers["qweight"], self._buffers["scales"]
        N, K = self.shape
        native = ()
        if self.bits == 4 and cpu_kernels.int4_fits(N, K, self.group_size):
            native = (cpu_kernels.int4_pack(q, scales, self._buffers["zeros"], self.group_size),)
        elif self.bits == 8 and cpu_kernels.int8_fits(N, K):
            native = cpu_kernels.int8_pack(q, scales)
        self._native = native
        if native:
            self._released = {name: (t.shape, t.dtype) for name, t in self._buffers.items()}
            for name, t in list(self._buffers.items()):
                self._buffers[name] = t.new_empty(0)
            del q, scales
            release_freed_memory()  # int8's blocks are 3 % larger: the freed buffers' holes would not fit them
        return native

    def stored_bytes(self) -> int:
        """Bytes of the portable buffers (what a file holds; the packed forms are as large or
        up to 3 % larger), whether or not they are in memory now."""
        if self._released:
            return sum(shape.numel() * dtype.itemsize for shape, dtype in self._released.values())
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def _portable(self) -> dict[str, torch.Tensor]:
        """The buffers' values rebuilt from the kernel's layout."""
        if self.bits == 4:
            values = cpu_kernels.int4_unpack(self._native[0], self.group_size)
        else:
            values = cpu_kernels.int8_unpack(*self._native)
        return dict(zip(STATE_NAMES, values))

    def _restore(self) -> None:
        if self._released:
            self._buffers.update(self._portable())
            self._released = {}

    def _invalidate(self) -> None:
        self._restore()
        self._packs.clear()
        self._native = None

    def __getattr__(self, name: str):
        if name in STATE_NAMES and self.__dict__.get("_released"):
            self._restore()
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        if name in STATE_NAMES and "_native" in self.__dict__:
            self._invalidate()  # new integers: the packed forms belong to the old ones
        super().__setattr__(name, value)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self._released:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, value in self._portable().items():  # not kept: the packed form stays the only copy
            destination[prefix + name] = value

    def _load_from_state_dict(self, *args, **kwargs):
        self._invalidate()
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse: bool = True):
        self._invalidate()  # moved or converted: the packs belong to the old buffers
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


def stored_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers, quantized matrices at their stored size."""
    quantized = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    skip = {id(t) for m in quantized for t in m._buffers.values()}
    plain = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if id(t) not in skip)
    return plain + sum(m.stored_bytes() for m in quantized)


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
           "is_quantized_key", "quantize_int4", "quantize_int8", "quantize_lm", "quantize_state", "storage",
           "stored_bytes"]
