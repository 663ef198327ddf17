"""The LM's Transformer: sinusoidal positions, pre-norm layers, self- and cross-attention.

Module and parameter names follow audiocraft's StreamingTransformer (``layers.N.self_attn.
in_proj_weight``, ``.cross_attention.*``, ``.linear1``, ``.norm1``, ``.norm_cross``, ...) so its
checkpoints load with ``load_state_dict``. Attention runs through torch SDPA; xformers'
memory-efficient kernel is used only when asked for, installed and the tensors are on CUDA.

Decoding keeps keys/values in a preallocated :class:`KVCache` per layer and the
cross-attention keys/values of the condition are projected once per generation. A pass at
host positions (``start=``, the prefill) attends over the positions written so far; a step
can instead take its position as a device tensor (``position=``): it then writes the cache
with ``index_copy_`` and attends over the whole cache under a mask, so that no shape or
Python value depends on the step and a CUDA graph can replay it (:mod:`lm.static_decoder`).
Both follow one masking rule, :meth:`Transformer.self_mask`.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels

ATTENTION_BACKENDS = ("sdpa", "xformers")


def sin_embedding(positions: torch.Tensor, dim: int, max_period: float = 10_000.0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding ``(..., T, dim)`` of integer ``positions (..., T)``.

    MusicGen's layout: ``cat([cos(phase), sin(phase)])`` with
    ``phase = pos / max_period ** (i / (dim/2 - 1))`` for ``i < dim/2``.
    Computed in float32 so low-precision models get the same table.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal embedding needs an even dimension, got {dim}")
    half = dim // 2
    exponent = torch.arange(half, device=positions.device, dtype=torch.float32) / (half - 1)
    phase = positions.to(torch.float32).unsqueeze(-1) / (max_period ** exponent)
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1).to(dtype)


class KVCache:
    """Preallocated keys and values ``(B, H, max_len, D)`` of one self-attention layer."""

    def __init__(self, *, batch_size: int, num_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (batch_size, num_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``(B, H, T, D)`` at ``start`` and return all keys/values up to ``start + T``."""
        end = start + keys.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: writing up to position {end}, cache holds {self.max_len}")
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        return self.keys[:, :, :end], self.values[:, :, :end]

    def write_at(self, position: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one step ``(B, H, 1, D)`` at ``position`` (a 1-element long tensor on the cache's
        device) and return the whole cache ``(B, H, max_len, D)``.

        Nothing here reads the position on the host, so a CUDA graph can replay it; the
        caller masks the positions not written yet. A position past the end is not checked
        (that would need the value on the host): ``index_copy_`` then fails on CPU and is
        undefined on CUDA, so callers bound the steps on the host.
        """
        if keys.shape[2] != 1 or position.numel() != 1:
            raise ValueError(f"write_at stores one step at one position, got {keys.shape[2]} steps and "
                             f"{position.numel()} positions")
        self.keys.index_copy_(2, position.reshape(1), keys.to(self.keys.dtype))
        self.values.index_copy_(2, position.reshape(1), values.to(self.values.dtype))
        return self.keys, self.values


@lru_cache(maxsize=1)
def _xformers_ops():
    try:
        from xformers import ops  # noqa: PLC0415 -- optional dependency
    except ImportError:
        return None
    return ops


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
           causal: bool = False, dropout: float = 0.0, backend: str = "sdpa") -> torch.Tensor:
    """Scaled dot-product attention on ``(B, H, T, D)`` tensors; returns ``(B, H, Tq, D)``.

    ``mask`` is boolean (true = may attend), broadcastable to ``(B, H, Tq, Tk)``; callers keep
    at least one allowed key per query, since kernels disagree on empty rows (zeros or NaN).
    ``causal`` applies to square problems only. xformers is used when selected, installed, on
    CUDA and no tensor mask is needed; all else goes through torch SDPA.
    """
    if backend == "xformers" and q.is_cuda and mask is None:
        ops = _xformers_ops()
        if ops is not None:
            bias = ops.LowerTriangularMask() if causal else None
            out = ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_bias=bias, p=dropout)
            return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          dropout_p=dropout)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with two decoding fast paths.

    - Weights stored in a lower precision than the activations (see
      ``LMModel.low_precision_weights``): the product runs in the weights' dtype and comes
      back in the activations' dtype, so norms, residuals and attention stay float32.
    - A few float32 rows on CPU: computed as ``(weight @ x^T)^T``. A decoding step multiplies
      2-8 rows by every weight, where MKL's ``x @ W^T`` kernel runs about half as fast as
      ``W @ x^T`` (measured on AVX-512 CPUs); results agree to float rounding.

    A weight stored in int8/int4 (:class:`lm.quant.QuantizedWeight`, or rows of one) runs its
    own product.
    """
    if not isinstance(weight, torch.Tensor):
        return weight.linear(x, bias)
    if weight.dtype != x.dtype:
        bias = None if bias is None else bias.to(weight.dtype)
        return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or x.dtype != torch.float32 or not 2 <= rows <= 8:
        return F.linear(x, weight, bias)
    out = (weight @ x.reshape(rows, x.shape[-1]).T).T.reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


class RowSliced(nn.Module):
    """A module that stands where a weight ``(N, K)`` stood (int8/int4, LoRA, GPTQ calibration):
    ``weight[a:b]`` is a view of rows ``a:b`` (the packed attention projections slice q, k, v)
    and :meth:`linear` is ``F.linear`` with it. Subclasses give ``shape`` and :meth:`rows_linear`."""

    kind = "this weight"  # for the error message

    def __getitem__(self, rows: slice) -> WeightRows:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError(f"{self.kind} can only be sliced by contiguous rows")
        return WeightRows(self, start, stop)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.rows_linear(0, self.shape[0], x, bias)

    def rows_linear(self, start: int, stop: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear(x, rows start:stop of the weight, bias)``."""
        raise NotImplementedError


class WeightRows:
    """Rows ``start:stop`` of a :class:`RowSliced` weight (what ``weight[a:b]`` returns)."""

    def __init__(self, weight: RowSliced, start: int, stop: int) -> None:
        self.weight, self.start, self.stop = weight, start, stop

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.stop - self.start, self.weight.shape[1]))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.weight.rows_linear(self.start, self.stop, x, bias)


class _PackedAttention(nn.Module):
    """Multi-head attention with q, k, v projections packed in one ``in_proj_weight (3C, C)``."""

    def __init__(self, *, dim: int, num_heads: int, bias: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim)) if bias else None
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.backend = "sdpa"
        self.dropout = 0.0
        nn.init.kaiming_uniform_(self.in_proj_weight, a=math.sqrt(5))  # nn.Linear's default

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, C)`` -> ``(B, H, T, D)``."""
        B, T, _ = x.shape
        return x.reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, T, D)`` -> out_proj of ``(B, T, C)``."""
        B, _, T, _ = x.shape
        return linear(x.transpose(1, 2).reshape(B, T, self.dim), self.out_proj.weight, self.out_proj.bias)

    def _project(self, x: torch.Tensor, part: slice) -> torch.Tensor:
        bias = None if self.in_proj_bias is None else self.in_proj_bias[part]
        return linear(x, self.in_proj_weight[part], bias)

    def _attend(self, q, k, v, mask, causal) -> torch.Tensor:
        return attend(q, k, v, mask=mask, causal=causal, backend=self.backend,
                      dropout=self.dropout if self.training else 0.0)


class SelfAttention(_PackedAttention):
    """Causal self-attention, optionally writing into a :class:`KVCache`."""

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                cache: KVCache | None = None, start: int = 0,
                position: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, T, C)`` at positions ``start..start+T-1``; returns ``(B, T, C)``.

        With a cache, keys/values are written at ``start`` and the queries see every cached
        position before theirs (the caller passes the matching ``mask`` / ``causal``).
        With ``position`` (a 1-element long tensor; T must be 1) the step is written there
        and attends over the whole cache: ``mask`` must hide the positions after it.
        """
        B, T, C = x.shape
        qkv = linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if position is not None:
            if cache is None:
                raise ValueError("a tensor position needs a KV cache")
            k, v = cache.write_at(position, k, v)
        elif cache is not None:
            k, v = cache.write(start, k, v)
        if k.dtype == torch.bfloat16 and cpu_kernels.attention_fits(q, k) and not torch.is_grad_enabled() \
                and cpu_kernels.available():
            return self._merge(cpu_kernels.decode_attention(q, k, v, mask).to(x.dtype))  # one step, float32 math
        # A cache in a lower precision (LMModel.kv_cache_dtype) is attended in its dtype.
        return self._merge(self._attend(q.to(k.dtype), k, v, mask, causal).to(x.dtype))


class CrossAttention(_PackedAttention):
    """Attention from the sequence to a condition; its keys/values can be projected once."""

    def project_kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition ``(B, S, C)`` -> keys and values ``(B, H, S, D)``."""
        C = self.dim
        return (self._split_heads(self._project(source, slice(C, 2 * C))),
                self._split_heads(self._project(source, slice(2 * C, 3 * C))))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, T, C)`` attends to precomputed ``kv``; ``mask (B, 1, 1, S)`` is true where allowed."""
        q = self._split_heads(self._project(x, slice(0, self.dim)))
        return self._merge(self._attend(q, kv[0], kv[1], mask, False))


class TransformerLayer(nn.Module):
    """Self-attention, optional cross-attention, feed-forward; pre-norm (MusicGen) or post-norm."""

    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int, cross_attention: bool,
                 norm_first: bool = True, bias_attn: bool = False, bias_ff: bool = False,
                 activation: str = "gelu", layer_norm_eps: float = 1e-5, dropout: float = 0.0) -> None:
        super().__init__()
        if activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {activation!r}")
        self.norm_first = norm_first
        self.activation = F.gelu if activation == "gelu" else F.relu
        self.dropout = dropout
        self.self_attn = SelfAttention(dim=dim, num_heads=num_heads, bias=bias_attn)
        self.cross_attention = (CrossAttention(dim=dim, num_heads=num_heads, bias=bias_attn)
                                if cross_attention else None)
        self.norm_cross = nn.LayerNorm(dim, eps=layer_norm_eps) if cross_attention else None
        self.linear1 = nn.Linear(dim, ffn_dim, bias=bias_ff)
        self.linear2 = nn.Linear(ffn_dim, dim, bias=bias_ff)
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
        for attn in (self.self_attn, self.cross_attention):
            if attn is not None:
                attn.dropout = dropout

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout else x

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.activation(linear(x, self.linear1.weight, self.linear1.bias))
        return self._drop(linear(self._drop(hidden), self.linear2.weight, self.linear2.bias))

    def forward(self, x: torch.Tensor, *, self_mask: torch.Tensor | None = None, causal: bool = False,
                cache: KVCache | None = None, start: int = 0, position: torch.Tensor | None = None,
                cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                cross_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, T, C)`` -> ``(B, T, C)``; ``cross_kv`` is required iff the layer has cross-attention.

        ``position``: see :meth:`SelfAttention.forward`.
        """
        if (cross_kv is None) != (self.cross_attention is None):
            raise ValueError("cross-attention keys/values must be given exactly when the layer has "
                             f"cross-attention (layer has it: {self.cross_attention is not None})")

        def self_block(h):
            return self._drop(self.self_attn(h, mask=self_mask, causal=causal, cache=cache, start=start,
                                             position=position))

        def cross_block(h):
            return self._drop(self.cross_attention(h, cross_kv, cross_mask))

        if self.norm_first:
            x = x + self_block(self.norm1(x))
            if self.cross_attention is not None:
                x = x + cross_block(self.norm_cross(x))
            return x + self._feed_forward(self.norm2(x))
        x = self.norm1(x + self_block(x))
        if self.cross_attention is not None:
            x = self.norm_cross(x + cross_block(x))
        return self.norm2(x + self._feed_forward(x))


class Transformer(nn.Module):
    """A stack of :class:`TransformerLayer` with sinusoidal positions added to the input."""

    def __init__(self, *, dim: int, num_heads: int, num_layers: int, ffn_dim: int,
                 cross_attention: bool, norm_first: bool = True, bias_attn: bool = False,
                 bias_ff: bool = False, activation: str = "gelu", layer_norm_eps: float = 1e-5,
                 dropout: float = 0.0, max_period: float = 10_000.0) -> None:
        super().__init__()
        self.dim = dim
        self.max_period = max_period
        self.layers = nn.ModuleList([
            TransformerLayer(dim=dim, num_heads=num_heads, ffn_dim=ffn_dim, cross_attention=cross_attention,
                             norm_first=norm_first, bias_attn=bias_attn, bias_ff=bias_ff,
                             activation=activation, layer_norm_eps=layer_norm_eps, dropout=dropout)
            for _ in range(num_layers)])

    def set_attention_backend(self, backend: str) -> None:
        """'sdpa' (default) or 'xformers' (used on CUDA when installed, else SDPA)."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        if backend == "xformers" and _xformers_ops() is None:
            raise ImportError("attention backend 'xformers' requested but xformers is not installed")
        for module in self.modules():
            if isinstance(module, _PackedAttention):
                module.backend = backend

    def forward(self, x: torch.Tensor, *, start: int = 0, caches: list[KVCache] | None = None,
                key_mask: torch.Tensor | None = None,
                cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                cross_mask: torch.Tensor | None = None,
                position: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``x (B, T, C)`` sitting at positions ``start..start+T-1``; returns ``(B, T, C)``.

        ``key_mask (B, >= start+T)`` marks self-attention keys that may be attended (padding of
        a prepended condition is false); ``cross_mask (B, 1, 1, S)`` does the same for the
        condition. Both are boolean.

        ``position`` (a 1-element long tensor, instead of ``start``): one step (T = 1) at that
        position, written into the static ``caches``; attention spans the whole cache with the
        later positions masked. No host synchronization: the step can be graph-captured.
        """
        B, T, C = x.shape
        if position is not None:
            if caches is None or T != 1:
                raise ValueError(f"a tensor position takes one step (got {T}) and KV caches")
            positions, num_keys, host_start = position.reshape(1), caches[0].max_len, None
        else:
            positions = torch.arange(start, start + T, device=x.device)
            num_keys, host_start = start + T, start
        self_mask, causal = self.self_mask(positions, num_keys, key_mask, host_start)
        x = x + sin_embedding(positions, C, self.max_period, dtype=x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, self_mask=self_mask, causal=causal,
                      cache=None if caches is None else caches[i], start=start, position=position,
                      cross_kv=None if cross_kv is None else cross_kv[i], cross_mask=cross_mask)
        return x

    @staticmethod
    def self_mask(queries: torch.Tensor, num_keys: int, key_mask: torch.Tensor | None,
                  start: int | None = None) -> tuple[torch.Tensor | None, bool]:
        """The self-attention rule: a query at position p sees keys ``0..p`` of ``num_keys``, less
        the prefix padding false in ``key_mask (B, >= num_keys)``, but always itself (so padded
        prefix positions, whose outputs nobody attends to, never have an empty row).

        ``queries (T,)``: the query positions. ``start``: their first one when the host knows it
        (None: a device position over the whole static cache). Returns ``(None, True)`` for a
        plain causal square, ``(None, False)`` when one query sees every key, and otherwise a
        boolean mask ``(B or 1, 1, T, num_keys)`` and False.
        """
        T = queries.shape[0]
        if key_mask is None and start is not None:
            if start == 0 and T > 1 and num_keys == T:
                return None, True
            if T == 1 and num_keys == start + 1:
                return None, False
        keys = torch.arange(num_keys, device=queries.device)[None, :]
        queries = queries[:, None]
        allowed = keys <= queries
        if key_mask is not None:
            allowed = allowed & (key_mask[:, None, :num_keys].to(torch.bool) | (keys == queries))
            return allowed[:, None], False
        return allowed[None, None], False
