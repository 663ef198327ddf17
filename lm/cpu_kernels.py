"""tokenwave's own CPU kernels for decoding (``cpu_kernels.c``), compiled on first use.

- **int4 product.** torch's ``_weight_int4pack_mm_for_cpu`` turns every 4-bit weight into a
  float before multiplying: on two cores it reads packed weights at ~12 GB/s, compute-bound,
  well below what the cores can stream. :func:`int4_linear` quantizes the few activation rows
  of a decoding step to int8 per group instead (``x ~ sx * xq``, ``sx = max|x| / 127``) and
  multiplies nibbles by them with AVX-512 VNNI (``vpdpbusd``: 64 multiply-adds per
  instruction), so a step reads its weights at close to memory speed. The int8 rounding of the
  activations changes the logits about as much as torch's bfloat16 rounding does
  (``bench/quant_accuracy.py`` measures both against float32).
- **int8 product.** The same with int8 weights (one scale per output): torch's
  ``_weight_int8pack_mm`` multiplies in bfloat16; :func:`int8_linear` in VNNI integers, each
  activation group (of up to 128) rounded to int8 twice (the value, then the residual: ~15
  bits, since one int8 rounding of the activations would dominate int8 weights' error).
- **Decoding attention over a bfloat16 KV cache.** A late step of a long generation reads the
  whole self-attention cache of every layer (at 30 s, 1500 positions: ~380 MB in float32 for
  a MusicGen-small-sized model, more than its int4 weights). torch's CPU attention is 8x
  slower on bfloat16 than on float32, so a bfloat16 cache only paid off with
  :func:`decode_attention`: one query per (batch, head), float32 arithmetic on bfloat16 keys
  and values, half the bytes.

They need an x86-64 CPU with AVX-512 VNNI and a C compiler at first use (:mod:`codec.native`
compiles and caches them); where either is missing, :func:`available` is False (with one
warning saying why) and torch's kernels run. ``TOKENWAVE_CPU_KERNELS=0`` (or
:func:`set_enabled` / :func:`using`) turns them off.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from codec import native
from codec.native import set_enabled, using  # noqa: F401  (this module's switch is every kernel's)

BLOCK = 16  # outputs per packed block
SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma")


def _declare(library: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.tw_int4_linear.restype = ctypes.c_int
    library.tw_int4_linear.argtypes = [ptr, i64, i64, ptr, i64, ctypes.c_int, ptr, ctypes.c_int]
    library.tw_int8_linear.restype = ctypes.c_int
    library.tw_int8_linear.argtypes = [ptr, i64, i64, ptr, ptr, i64, ctypes.c_int, ptr, ctypes.c_int]
    library.tw_decode_attention.restype = ctypes.c_int
    library.tw_decode_attention.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, i64, i64, ptr, i64, ctypes.c_float,
                                            ptr, ctypes.c_int]


KERNELS = native.NativeKernels(SOURCE, FLAGS, supported="tw_int4_supported", requirement="AVX-512 VNNI",
                               declare=_declare)


def available() -> bool:
    """Whether the kernels run here (enabled, compiled and supported by this CPU)."""
    return KERNELS.available()


def unavailable_reason() -> str | None:
    return KERNELS.unavailable_reason()


# -- int4 product ---------------------------------------------------------------------------------
def int4_fits(N: int, K: int, group_size: int) -> bool:
    return N % BLOCK == 0 and K % group_size == 0 and group_size % 16 == 0


def int4_pack(nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """lm.quant's portable int4 layout (``(N, K/2)`` nibbles, even column low; ``(N, K/G)``
    bfloat16 scales and zeros) -> the kernel's blocks (see ``cpu_kernels.c``), one uint8 tensor."""
    N, K, G = nibbles.shape[0], nibbles.shape[1] * 2, group_size
    values = torch.stack([nibbles & 15, nibbles >> 4], dim=-1).reshape(N // BLOCK, BLOCK, K // G, 2, G // 8, 4)
    values = values.permute(0, 2, 3, 4, 1, 5)  # block, group, half, vector, output, input
    packed = (values[:, :, 0] | (values[:, :, 1] << 4)).reshape(N // BLOCK, K // G, 8 * G)

    def per_block(t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.bfloat16).reshape(N // BLOCK, BLOCK, K // G).transpose(1, 2).contiguous()
        return t.view(torch.uint8).reshape(N // BLOCK, K // G, 2 * BLOCK)

    return torch.cat([packed, per_block(scales), per_block(zeros)], dim=-1).contiguous()


def int4_unpack(packed: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`int4_pack`'s inverse: the portable nibbles, scales and zeros, exactly."""
    blocks, groups, G = packed.shape[0], packed.shape[1], group_size
    N, K = blocks * BLOCK, groups * G
    weights = packed[..., :8 * G].reshape(blocks, groups, G // 8, BLOCK, 4)
    values = torch.stack([weights & 15, weights >> 4], dim=2)  # block, group, half, vector, output, input
    values = values.permute(0, 4, 1, 2, 3, 5).reshape(N, K)

    def per_row(part: torch.Tensor) -> torch.Tensor:
        return part.contiguous().view(torch.bfloat16).transpose(1, 2).reshape(N, groups).contiguous()

    return (values[:, 0::2] | (values[:, 1::2] << 4), per_row(packed[..., 8 * G:8 * G + 32]),
            per_row(packed[..., 8 * G + 32:]))


def int4_linear(x: torch.Tensor, packed: torch.Tensor, N: int, group_size: int) -> torch.Tensor:
    """``x (M, K)`` float32 contiguous @ the packed weight's ``(N, K)``.T -> ``(M, N)`` float32."""
    M, K = x.shape
    out = torch.empty((M, N), dtype=torch.float32)
    _check(KERNELS.library().tw_int4_linear(x.data_ptr(), M, K, packed.data_ptr(), N, group_size, out.data_ptr(),
                                   torch.get_num_threads()),
           f"int4_linear: x {tuple(x.shape)}, N={N}, group {group_size}")
    return out


def _check(status: int, what: str) -> None:
    if status == -2:
        raise MemoryError(f"{what}: out of memory")
    if status:
        raise ValueError(f"{what}: shapes the kernel does not take")


def int4_reference(x: torch.Tensor, nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """What :func:`int4_linear` computes, in float64 torch operations (for tests): the same int8
    rounding of ``x``, exact sums."""
    M, K = x.shape
    N, G = nibbles.shape[0], group_size
    groups = x.float().reshape(M, K // G, G)
    amax = groups.abs().amax(-1)
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    xq = torch.round(groups * inverse[..., None]).double()  # float32 product, rounded half to even
    q = torch.stack([nibbles & 15, nibbles >> 4], dim=-1).reshape(N, K // G, G).double()
    dot = torch.einsum("mgi,ngi->mng", xq, q) - 8 * xq.sum(-1)[:, None]
    sx = (amax / 127).double()
    products = scales.double()[None] * sx[:, None] * dot + zeros.double()[None] * groups.double().sum(-1)[:, None]
    return products.sum(-1)


# -- int8 product ----------------------------------------------------------------------------------
def int8_group(K: int) -> int | None:
    """The activations' quantization group for an int8 product over ``K`` inputs (None: no kernel)."""
    return next((g for g in (128, 64, 32, 16) if K % g == 0), None)


def int8_fits(N: int, K: int) -> bool:
    return N % BLOCK == 0 and int8_group(K) is not None


def int8_pack(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lm.quant's int8 layout (``(N, K)`` int8, ``(N,)`` scales) -> the kernel's blocks (see
    ``cpu_kernels.c``) and float32 scales."""
    N, K = q.shape
    G = int8_group(K)
    blocks = q.reshape(N // BLOCK, BLOCK, K // G, G // 4, 4)
    packed = blocks.permute(0, 2, 3, 1, 4).reshape(N // BLOCK, K // G, 16 * G).view(torch.uint8)
    sums = blocks.sum(dim=(3, 4), dtype=torch.int32).transpose(1, 2).contiguous()  # (blocks, groups, 16)
    packed = torch.cat([packed, sums.view(torch.uint8).reshape(N // BLOCK, K // G, 64)], dim=-1).contiguous()
    return packed, scales.float().contiguous()


def int8_unpack(packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`int8_pack`'s inverse: the ``(N, K)`` int8 matrix and bfloat16 scales, exactly."""
    blocks, groups = packed.shape[:2]
    G = (packed.shape[2] - 64) // 16
    weights = packed[..., :16 * G].contiguous().view(torch.int8).reshape(blocks, groups, G // 4, BLOCK, 4)
    q = weights.permute(0, 3, 1, 2, 4).reshape(blocks * BLOCK, groups * G).contiguous()
    return q, scales.to(torch.bfloat16)


def int8_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x (M, K)`` float32 contiguous @ the packed int8 weight's ``(N, K)``.T -> ``(M, N)`` float32."""
    M, K = x.shape
    N = scales.shape[0]
    out = torch.empty((M, N), dtype=torch.float32)
    _check(KERNELS.library().tw_int8_linear(x.data_ptr(), M, K, packed.data_ptr(), scales.data_ptr(), N, int8_group(K),
                                   out.data_ptr(), torch.get_num_threads()), f"int8_linear: x {tuple(x.shape)}, N={N}")
    return out


def int8_reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """What :func:`int8_linear` computes, in float64 (for tests): x as two int8 roundings."""
    M, K = x.shape
    G = int8_group(K)
    groups = x.float().reshape(M, K // G, G)
    weights = q.double().reshape(q.shape[0], K // G, G)
    total = 0
    for _ in range(2):  # x, then the residual of its rounding
        amax = groups.abs().amax(-1)
        inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
        xq = torch.round(groups * inverse[..., None])
        dot = torch.einsum("mgi,ngi->mng", xq.double(), weights)
        total = total + (dot * (amax / 127).double()[:, None]).sum(-1)
        groups = torch.addcmul(groups, xq, -(amax / 127)[..., None])  # x - sx xq, rounded as the kernel's fma
    return total * scales.float().double()[None]


# -- decoding attention ------------------------------------------------------------------------------
def attention_fits(q: torch.Tensor, k: torch.Tensor) -> bool:
    """One float32 query per row attending a bfloat16 cache view (rows contiguous), head size <= 256."""
    return (q.dim() == 4 and q.shape[2] == 1 and q.dtype == torch.float32 and k.dtype == torch.bfloat16
            and q.device.type == "cpu" and k.shape[-1] <= 256 and k.stride(-1) == 1
            and k.stride(-2) == k.shape[-1])


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D)) v`` for ``q (B, H, 1, D)`` float32 and ``k, v (B, H, T, D)``
    bfloat16 views of a KV cache (rows contiguous, as :class:`lm.transformer.KVCache` holds them);
    ``mask`` boolean, broadcastable to ``(B, 1, 1, T)``, true = may attend. Returns float32."""
    B, H, _, D = q.shape
    T = k.shape[2]
    if v.stride() != k.stride() or k.shape != v.shape:
        raise ValueError("keys and values must have the same shape and layout")
    mask_bytes, mask_stride = None, 0
    if mask is not None:
        if mask.shape[-2] != 1 or (mask.dim() == 4 and mask.shape[1] != 1):
            raise ValueError(f"decode_attention takes a per-key mask (B, 1, 1, T), got {tuple(mask.shape)}")
        mask_bytes = mask.reshape(mask.shape[0], T).to(torch.uint8).contiguous()
        mask_stride = T if mask_bytes.shape[0] > 1 else 0
    q = q.contiguous()
    out = torch.empty((B, H, 1, D), dtype=torch.float32)
    _check(KERNELS.library().tw_decode_attention(
        q.data_ptr(), B, H, D, k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), T,
        None if mask_bytes is None else mask_bytes.data_ptr(), mask_stride, D ** -0.5, out.data_ptr(),
        torch.get_num_threads()),
        f"decode_attention: q {tuple(q.shape)}, k {tuple(k.shape)}")
    return out
