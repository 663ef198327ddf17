"""The EnCodec LM prior of `.ecdc` files, and entropy coding one chunk's codes with it.

Same architecture and state-dict names as the original release (`encodec.compress` with
`use_lm=True`). The coder needs *bitwise* the reference's probabilities (:mod:`codec.arithmetic`):
`EntropyLM.step` issues the same torch kernels on the same shapes and memory layouts as the
reference's streaming loop, and caches only what gives identical bits (see `_EXACT_KV_ROWS`).
Those bits depend on the CPU kernels (ISA, MKL build, thread count): entropy-coded files are
portable between the two implementations on one kind of machine, not necessarily across
machines; :func:`torch_threads` pins the thread count.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .arithmetic import (ArithmeticDecoder, ArithmeticEncoder, EntropyDecodingError, quantized_cdf,
                         symbol_bounds)

# Keys/values of the rows already seen are cached between steps. The reference recomputes
# them every step with one (N, dim) x (dim, 2 dim) matrix product over the whole window;
# MKL returns a row's result independently of N only once N is past its small-matrix
# kernels (N >= 4 with AVX-512 on the development machine; 8 leaves a margin). While the
# window has at most this many rows it is recomputed exactly like the reference; past it, a
# new row is computed inside a product of this many rows, which gives the same bits as the
# reference's larger product. tests/test_entropy.py checks this on the machine it runs on.
_EXACT_KV_ROWS = 8
_POSITION_CACHE_SIZE = 4096  # frames; 800 bytes each at dim 200


def sin_embedding(positions: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding `(B, T, dim)` of integer `positions` `(B, T, 1)`: cat([cos, sin]).

    Phase `pos / max_period ** (i / (dim/2 - 1))`, computed with the same float32 kernels as
    the reference so the streaming step matches it bitwise.
    """
    half = dim // 2
    index = torch.arange(half, device=positions.device).view(1, 1, -1)
    phase = positions / (max_period ** (index / (half - 1)))
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


class PackedSelfAttention(nn.Module):
    """Multi-head attention parameters named as `nn.MultiheadAttention`'s (q, k, v packed)."""

    def __init__(self, *, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, keys_in: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Offline attention. `x` `(B, T, D)` queries, `keys_in` `(B, S, D)` key/value
        inputs, `allowed` bool `(T, S)` (True = may attend). Returns `(B, T, D)`."""
        B, T, D = x.shape
        S = keys_in.shape[1]
        H = self.num_heads
        w_q, w_kv = self.in_proj_weight.split([D, 2 * D])
        b_q, b_kv = self.in_proj_bias.split([D, 2 * D])
        q = F.linear(x, w_q, b_q).view(B, T, H, D // H).transpose(1, 2)
        k, v = F.linear(keys_in, w_kv, b_kv).view(B, S, 2, H, D // H).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))


class EntropyLayer(nn.Module):
    """Post-norm Transformer layer (self-attention, GELU FFN), as `nn.TransformerEncoderLayer`
    with `norm_first=False`, keeping its parameter names."""

    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = PackedSelfAttention(dim=dim, num_heads=num_heads)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class EntropyTransformer(nn.Module):
    """Input LayerNorm + layers; named `transformer` in the LM for the checkpoint's keys."""

    def __init__(self, *, dim: int, num_layers: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            EntropyLayer(dim=dim, num_heads=num_heads, ffn_dim=ffn_dim) for _ in range(num_layers))


class EntropyLM(nn.Module):
    """The prior used to entropy-code EnCodec codes (`encodec_lm_24khz` / `encodec_lm_48khz`).

    Input at frame t is the sum over codebooks of embeddings of frame t-1's codes (index 0 =
    no frame, code c = index c+1); a causal post-norm Transformer with sinusoidal positions
    attends to the last `past_context` frames; one linear head per codebook gives the
    distribution of every codebook of frame t. As in the reference, attention also sees one
    all-zero "frame" before the first one while it is within `past_context`.

    Args:
        num_codebooks: codebooks the LM was trained for (32 at 24 kHz, 16 at 48 kHz); files
            may use fewer, the first ones.
        card: codebook size (1024).
        past_context: frames of attention context, `int(3.5 * frame_rate)` in the release.
    """

    def __init__(self, *, num_codebooks: int, card: int, past_context: int, dim: int = 200,
                 num_layers: int = 5, num_heads: int = 8, ffn_dim: int = 800,
                 max_period: float = 10000.0) -> None:
        super().__init__()
        if past_context < 1:
            raise ValueError(f"past_context must be >= 1, got {past_context}")
        self.num_codebooks = num_codebooks
        self.card = card
        self.dim = dim
        self.num_heads = num_heads
        self.past_context = past_context
        self.max_period = max_period
        self._position_cache: dict[int, torch.Tensor] = {}
        self.transformer = EntropyTransformer(
            dim=dim, num_layers=num_layers, num_heads=num_heads, ffn_dim=ffn_dim)
        self.emb = nn.ModuleList(nn.Embedding(card + 1, dim) for _ in range(num_codebooks))
        self.linears = nn.ModuleList(nn.Linear(dim, card) for _ in range(num_codebooks))

    @classmethod
    def for_codec(cls, *, num_codebooks: int, card: int, frame_rate: float) -> "EntropyLM":
        """The released configuration for a codec: 5 layers, dim 200, 3.5 s of context."""
        return cls(num_codebooks=num_codebooks, card=card, past_context=int(3.5 * frame_rate))

    def _check_codebooks(self, num_codebooks: int) -> None:
        if not 1 <= num_codebooks <= self.num_codebooks:
            raise ValueError(
                f"EntropyLM has {self.num_codebooks} codebooks, asked for {num_codebooks}")

    def _embed(self, indices: torch.Tensor) -> torch.Tensor:
        """`indices` `(B, K, T)` (0 = no frame, c+1 = code c) -> normed inputs `(B, T, D)`."""
        # Python's sum (0 + e0 + e1 ...) keeps the reference's float addition order.
        x = sum([self.emb[k](indices[:, k]) for k in range(indices.shape[1])])
        return self.transformer.norm_in(x)

    def _probabilities(self, out: torch.Tensor, num_codebooks: int) -> torch.Tensor:
        """`out` `(B, T, D)` -> probabilities `(B, card, K, T)` (the reference's layout,
        whose softmax over a strided dim fixes the float summation order)."""
        logits = torch.stack([self.linears[k](out) for k in range(num_codebooks)], dim=1)
        return torch.softmax(logits.permute(0, 3, 1, 2), dim=1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Offline priors of every frame of `codes` `(B, K, T)` given the frames before it.

        Returns probabilities `(B, K, T, card)`. Equal to the streaming `step` results within
        float tolerance (not bitwise: use `step` for coding).
        """
        B, K, T = codes.shape
        self._check_codebooks(K)
        indices = torch.cat([codes.new_zeros(B, K, 1), codes[..., :-1] + 1], dim=-1)
        x = self._embed(indices)
        positions = torch.arange(T, device=codes.device).view(1, -1, 1)
        x = x + sin_embedding(positions, self.dim, self.max_period)
        # Key 0 is the all-zero frame before the first; query t sits at key position t + 1.
        delta = torch.arange(1, T + 1).view(-1, 1) - torch.arange(T + 1).view(1, -1)
        allowed = ((delta >= 0) & (delta <= self.past_context)).to(codes.device)
        for layer in self.transformer.layers:
            keys_in = torch.cat([x.new_zeros(B, 1, self.dim), x], dim=1)
            x = layer.norm1(x + layer.self_attn(x, keys_in, allowed))
            x = layer.norm2(x + layer.feed_forward(x))
        return self._probabilities(x, K).permute(0, 2, 3, 1)

    def initial_state(self, num_codebooks: int | None = None, batch_size: int = 1, *,
                      cache_keys: bool = True) -> "EntropyLMState":
        """A fresh streaming state for `num_codebooks` (default: all) codebooks.

        `cache_keys=False` recomputes every layer's keys and values over the whole window at
        each step, as the reference does: slower, but bitwise equal to it at any thread count
        (with several threads MKL splits the reference's large products in ways a cached row
        does not reproduce). The default cache matches it with one thread.
        """
        num_codebooks = self.num_codebooks if num_codebooks is None else num_codebooks
        self._check_codebooks(num_codebooks)
        return EntropyLMState(self, num_codebooks=num_codebooks, batch_size=batch_size,
                              cache_keys=cache_keys)

    def _position(self, offset: int, device: torch.device) -> torch.Tensor:
        """Positional embedding `(1, 1, D)` of one frame, computed as the reference does per
        step (a `(1, 1, 1)` position) and memoised: every 48 kHz chunk reuses offsets 0..149."""
        cached = self._position_cache.get(offset)
        if cached is None or cached.device != device:
            positions = torch.arange(1, device=device).view(1, -1, 1) + offset
            cached = sin_embedding(positions, self.dim, self.max_period)
            if len(self._position_cache) < _POSITION_CACHE_SIZE:
                self._position_cache[offset] = cached
        return cached

    @torch.no_grad()
    def step(self, state: "EntropyLMState", prev_codes: torch.Tensor | None) -> torch.Tensor:
        """One streaming step: the prior of the next frame given the previous frame's codes.

        Args:
            state: from `initial_state`; updated in place.
            prev_codes: `(B, K)` codes of the previous frame, None for the first frame.
        Returns:
            probabilities `(B, K, card)` (a strided view), bitwise equal to the reference
            LMModel called frame by frame with its streaming states (for B == 1).
        """
        B, K = state.batch_size, state.num_codebooks
        if prev_codes is None:
            indices = np.zeros((B, K), dtype=np.int64)
        else:
            if tuple(prev_codes.shape) != (B, K):
                raise ValueError(f"prev_codes must have shape {(B, K)}, got {tuple(prev_codes.shape)}")
            indices = prev_codes.cpu().numpy() + 1
        # Embedding rows summed in numpy: float32 additions in the reference's order
        # (0 + e0 + e1 + ...) give the same bits as torch, at a fraction of the dispatch cost.
        x = np.zeros((B, self.dim), dtype=np.float32)
        for k in range(K):
            x = x + state.embeddings[k][indices[:, k]]
        x = torch.from_numpy(x).to(state.device).view(B, 1, self.dim)
        x = torch.layer_norm(x, *state.norm_in) + self._position(state.offset, state.device)
        for cache in state.layers:
            x = cache.layer_step(x)
        state.offset += 1
        # As `_probabilities`, with plain tensors.
        logits = torch.stack([F.linear(x, w, b) for w, b in state.heads], dim=1)
        return torch.softmax(logits.permute(0, 3, 1, 2), dim=1)[..., 0].transpose(1, 2)


def _norm_args(norm: nn.LayerNorm) -> tuple:
    return (norm.normalized_shape, norm.weight.detach(), norm.bias.detach(), norm.eps)


class _LayerCache:
    """One layer's streaming window: the layer inputs of the last frames (plus the initial
    all-zero frame) and their projected keys and values, contiguous in rows
    `[start, start + length)` of buffers with room to append before compacting."""

    def __init__(self, layer: EntropyLayer, *, batch_size: int, past_context: int,
                 num_heads: int, exact_rows: int) -> None:
        weight = layer.linear1.weight
        self.exact_rows = exact_rows
        dim = weight.shape[1]
        self.num_heads = num_heads
        self.capacity = 2 * (past_context + 1)
        self.inputs = weight.new_zeros(batch_size, self.capacity, dim)
        self.kv = weight.new_zeros(batch_size, self.capacity, 2 * dim)
        self.zero_mask = weight.new_zeros(1, 1, 1, self.capacity)
        self.start = 0
        self.length = 1  # the initial all-zero frame
        self.past_context = past_context
        # Plain tensor references: module attribute lookups cost more than the small ops.
        attn = layer.self_attn
        self.w_q, self.w_kv = attn.in_proj_weight.detach().split([dim, 2 * dim])
        self.b_q, self.b_kv = attn.in_proj_bias.detach().split([dim, 2 * dim])
        self.w_out, self.b_out = attn.out_proj.weight.detach(), attn.out_proj.bias.detach()
        self.w_1, self.b_1 = layer.linear1.weight.detach(), layer.linear1.bias.detach()
        self.w_2, self.b_2 = layer.linear2.weight.detach(), layer.linear2.bias.detach()
        self.norm1 = _norm_args(layer.norm1)
        self.norm2 = _norm_args(layer.norm2)

    def layer_step(self, x: torch.Tensor) -> torch.Tensor:
        """Run the layer on one frame `x` `(B, 1, D)` against the window; returns `(B, 1, D)`."""
        B, _, D = x.shape
        H = self.num_heads
        if self.start + self.length == self.capacity:
            self._compact()
        start = self.start
        end = start + self.length + 1  # window including the new frame
        rows = end - start
        self.inputs.narrow(1, end - 1, 1).copy_(x)
        if rows <= self.exact_rows:
            kv = F.linear(self.inputs.narrow(1, start, rows), self.w_kv, self.b_kv)
            self.kv.narrow(1, start, rows).copy_(kv)
        else:
            kv = F.linear(self.inputs.narrow(1, end - self.exact_rows, self.exact_rows),
                          self.w_kv, self.b_kv)
            self.kv.narrow(1, end - 1, 1).copy_(kv.narrow(1, self.exact_rows - 1, 1))
        window = self.kv.narrow(1, start, rows).view(B, rows, 2, H, D // H)
        q = F.linear(x, self.w_q, self.b_q).view(B, 1, H, D // H).transpose(1, 2)
        k = window.select(2, 0).transpose(1, 2)
        v = window.select(2, 1).transpose(1, 2)
        # The reference passes its (all-false) boolean mask converted to zeros; do the same.
        mask = self.zero_mask.narrow(3, 0, rows)
        out = F.scaled_dot_product_attention(q, k, v, mask, 0.0, False)
        out = F.linear(out.transpose(1, 2).reshape(B, 1, D), self.w_out, self.b_out)
        self.length = min(rows, self.past_context)
        self.start = end - self.length
        x = torch.layer_norm(x + out, *self.norm1)
        y = F.linear(F.gelu(F.linear(x, self.w_1, self.b_1)), self.w_2, self.b_2)
        return torch.layer_norm(x + y, *self.norm2)

    def _compact(self) -> None:
        window = slice(self.start, self.start + self.length)
        for buffer in (self.inputs, self.kv):
            buffer[:, :self.length] = buffer[:, window].clone()
        self.start = 0


class EntropyLMState:
    """Streaming state of an `EntropyLM`: frame offset and one window cache per layer.

    Holds views of the LM's weights: create a new state after changing them."""

    def __init__(self, lm: EntropyLM, *, num_codebooks: int, batch_size: int,
                 cache_keys: bool = True) -> None:
        self.device = lm.linears[0].weight.device
        self.num_codebooks = num_codebooks
        self.batch_size = batch_size
        self.offset = 0
        self.embeddings = [lm.emb[k].weight.detach().cpu().numpy() for k in range(num_codebooks)]
        self.norm_in = _norm_args(lm.transformer.norm_in)
        self.heads = [(lm.linears[k].weight.detach(), lm.linears[k].bias.detach())
                      for k in range(num_codebooks)]
        self.layers = [
            _LayerCache(layer, batch_size=batch_size, past_context=lm.past_context,
                        num_heads=lm.num_heads,
                        exact_rows=_EXACT_KV_ROWS if cache_keys else lm.past_context + 1)
            for layer in lm.transformer.layers]


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the entropy LM with `threads` torch threads (the probabilities, hence the bits,
    depend on the thread count); restores the previous setting."""
    if threads < 1:
        raise ValueError(f"lm_threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    if previous != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if previous != threads:
            torch.set_num_threads(previous)


def encode_chunk(codes: torch.Tensor, lm: EntropyLM, threads: int = 1) -> bytes:
    """Entropy-code one chunk's codes `(K, F)` with a fresh LM state and coder."""
    num_codebooks, num_frames = codes.shape
    codes_np = codes.cpu().numpy()
    coder = ArithmeticEncoder()
    with torch_threads(threads):
        state = lm.initial_state(num_codebooks, cache_keys=threads == 1)
        prev = None
        for t in range(num_frames):
            probs = lm.step(state, prev)
            starts, ends = symbol_bounds(quantized_cdf(probs[0].numpy()), codes_np[:, t])
            coder.push_bounds(starts, ends)
            prev = codes[:, t].view(1, num_codebooks)
    return coder.finish()


def decode_chunk(data: memoryview, pos: int, num_codebooks: int, num_frames: int,
                    lm: EntropyLM, threads: int = 1) -> tuple[torch.Tensor, int]:
    """Entropy-decode one chunk starting at byte `pos`: codes `(K, F)` and the end offset.

    Codes are collected as they decode, so memory grows with the data actually decoded, not
    with the frame count the header claims. Bad data raises EntropyDecodingError naming
    the frame."""
    decoder = ArithmeticDecoder(data, pos)
    decoded: list[list[int]] = []
    with torch_threads(threads):
        state = lm.initial_state(num_codebooks, cache_keys=threads == 1)
        prev = None
        for t in range(num_frames):
            probs = lm.step(state, prev)
            try:
                symbols = decoder.pull_many(quantized_cdf(probs[0].numpy()))
            except EntropyDecodingError as error:
                raise EntropyDecodingError(f"frame {t}: {error}") from None
            decoded.append(symbols)
            prev = torch.tensor([symbols])
    codes = torch.tensor(decoded, dtype=torch.long).reshape(num_frames, num_codebooks).t()
    return codes.contiguous(), decoder.position
