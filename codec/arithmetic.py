"""The range (arithmetic) coder of `.ecdc` files written with the entropy LM.

Bit-compatible with the original EnCodec release: same quantized CDFs, same coder arithmetic,
so files written by either implementation decode with the other. The quantized
CDF floors `p / 1e-8` in float32, so a one-ulp difference in a probability changes a CDF entry
and desynchronises the decoder: the probabilities must be bitwise the reference's
(:mod:`codec.entropy_lm`).
"""
from __future__ import annotations

import math
from bisect import bisect_left
from typing import Sequence

import numpy as np
import torch

TOTAL_RANGE_BITS = 24
ROUNDOFF = 1e-8
MIN_RANGE = 2

_FULL_RANGE = 1 << TOTAL_RANGE_BITS
_BIT_REVERSED = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


class EntropyDecodingError(ValueError):
    """The entropy-coded bits are truncated or cannot come from the encoder."""


def quantized_cdf(probs: np.ndarray | torch.Tensor) -> np.ndarray:
    """Quantized CDFs over the last axis, as the reference `build_stable_quantized_cdf`.

    Args:
        probs: float32 probabilities `(..., card)`.
    Returns:
        int64 `(..., card)`: `cdf[..., s]` is the exclusive end of symbol `s`'s range in
        `[0, 2**24)`. Every symbol gets at least `MIN_RANGE`.

    The arithmetic is float32 exactly as the reference does it in torch (the Python scalar
    operands are rounded to float32 first), so the integers match bit for bit.
    """
    if isinstance(probs, torch.Tensor):
        probs = probs.detach().cpu().numpy()
    if probs.dtype != np.float32:
        raise TypeError(f"quantized_cdf expects float32 probabilities, got {probs.dtype}")
    card = probs.shape[-1]
    if MIN_RANGE * card > _FULL_RANGE:
        raise ValueError(f"cardinality {card} too large for a {TOTAL_RANGE_BITS}-bit range")
    roundoff = np.float32(ROUNDOFF)
    rounded = np.floor(probs / roundoff) * roundoff
    # (1 - alpha) * 2**24 with alpha = MIN_RANGE * card / 2**24 is an integer below 2**24,
    # hence exact in float32, as in the reference.
    scale = np.float32(_FULL_RANGE - MIN_RANGE * card)
    ranges = np.floor(rounded * scale).astype(np.int64) + MIN_RANGE
    return np.cumsum(ranges, axis=-1)


def symbol_bounds(cdf: np.ndarray, symbols: np.ndarray) -> tuple[list[int], list[int]]:
    """Range bounds of `symbols` `(K,)` in quantized CDFs `cdf` `(K, card)`.

    Returns `(starts, ends)` as Python int lists, ready for `ArithmeticEncoder.push_bounds`.
    """
    rows = np.arange(len(symbols))
    ends = cdf[rows, symbols]
    starts = np.where(symbols > 0, cdf[rows, np.maximum(symbols - 1, 0)], 0)
    return starts.tolist(), ends.tolist()


class ArithmeticEncoder:
    """Range coder producing the same bits as the reference `ArithmeticCoder`.

    The reference scales ranges with `ceil(start * (delta / 2**24))` in Python floats. The
    range width `delta` stays below 2**25 and CDF values below 2**25, so the product is an
    integer below 2**50, exact in a double: plain integer arithmetic gives the same result.
    Bits are emitted most significant first and stored LSB-first in each byte, like the
    reference's 1-bit `BitPacker`; `finish` flushes and pads the last byte with zeros.
    """

    def __init__(self) -> None:
        self._low = 0
        self._high = 0
        self._max_bit = -1
        self._acc = 0  # pending bits, first bit most significant
        self._acc_bits = 0
        self._out = bytearray()
        self._finished = False

    def push(self, symbol: int, cdf: Sequence[int]) -> None:
        """Code one `symbol` with the quantized CDF `cdf` (see `quantized_cdf`)."""
        if not 0 <= symbol < len(cdf):
            raise ValueError(f"symbol {symbol} outside [0, {len(cdf)})")
        self.push_bounds([cdf[symbol - 1] if symbol else 0], [cdf[symbol]])

    def push_bounds(self, starts: Sequence[int], ends: Sequence[int]) -> None:
        """Code a run of symbols given by their CDF ranges `[starts[i], ends[i])`."""
        if self._finished:
            raise RuntimeError("ArithmeticEncoder already finished")
        low, high, max_bit = self._low, self._high, self._max_bit
        acc, acc_bits = self._acc, self._acc_bits
        for start, end in zip(starts, ends):
            delta = high - low + 1
            if delta < _FULL_RANGE:
                # Widen by n bits at once: the reference doubles until delta >= 2**24.
                n = TOTAL_RANGE_BITS + 1 - delta.bit_length()
                low <<= n
                high = (high << n) | ((1 << n) - 1)
                max_bit += n
                delta <<= n
            new_low = low - ((-start * delta) >> TOTAL_RANGE_BITS)  # low + ceil(...)
            high = low + (((end - 1) * delta) >> TOTAL_RANGE_BITS)
            low = new_low
            if low > high:
                raise ValueError(f"empty symbol range [{start}, {end})")
            width = max_bit + 1
            common = width - (low ^ high).bit_length()
            if common > 0:
                kept = width - common
                acc = (acc << common) | (low >> kept)
                acc_bits += common
                mask = (1 << kept) - 1
                low &= mask
                high &= mask
                max_bit = kept - 1
                if acc_bits >= 64:
                    rest = acc_bits & 7
                    self._out += (acc >> rest).to_bytes(acc_bits >> 3, "big")
                    acc &= (1 << rest) - 1
                    acc_bits = rest
        self._low, self._high, self._max_bit = low, high, max_bit
        self._acc, self._acc_bits = acc, acc_bits

    def finish(self) -> bytes:
        """Flush the remaining bits of the range and return all coded bytes."""
        if not self._finished:
            width = self._max_bit + 1
            acc = (self._acc << width) | self._low
            acc_bits = self._acc_bits + width
            pad = -acc_bits % 8
            self._out += (acc << pad).to_bytes((acc_bits + pad) >> 3, "big")
            self._finished = True
        return bytes(self._out).translate(_BIT_REVERSED)


class ArithmeticDecoder:
    """Decoder matching `ArithmeticEncoder` and the reference `ArithmeticDecoder`.

    Reads `data` from byte `offset` on, one byte at a time as bits are needed, so that after
    the last symbol `position` is the end of this coder's bytes, where the next chunk starts.

    Raises `EntropyDecodingError` when the bits run out or when the value falls outside every
    symbol's range (only possible with bits the encoder cannot have produced; the reference
    raises a bare RuntimeError there).
    """

    def __init__(self, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        self._data = data
        self._pos = offset
        self._low = 0
        self._high = 0
        self._current = 0
        self._max_bit = -1
        self._acc = 0
        self._acc_bits = 0

    @property
    def position(self) -> int:
        """Offset of the first byte of `data` not read yet."""
        return self._pos

    def pull(self, cdf: Sequence[int] | np.ndarray) -> int:
        """Decode one symbol coded with the quantized CDF `cdf` (a list or an int64 array)."""
        return self.pull_many([cdf])[0]

    def pull_many(self, cdfs: Sequence[Sequence[int]] | np.ndarray) -> list[int]:
        """Decode one symbol per CDF in `cdfs` (e.g. `quantized_cdf` rows `(K, card)`), in order."""
        data, pos, end_pos = self._data, self._pos, len(self._data)
        low, high, current, max_bit = self._low, self._high, self._current, self._max_bit
        acc, acc_bits = self._acc, self._acc_bits
        symbols = []
        for cdf in cdfs:
            delta = high - low + 1
            if delta < _FULL_RANGE:
                n = TOTAL_RANGE_BITS + 1 - delta.bit_length()
                while acc_bits < n:
                    if pos >= end_pos:
                        raise EntropyDecodingError("entropy-coded stream ended early")
                    acc = (acc << 8) | _BIT_REVERSED[data[pos]]
                    pos += 1
                    acc_bits += 8
                acc_bits -= n
                current = (current << n) | (acc >> acc_bits)
                acc &= (1 << acc_bits) - 1
                low <<= n
                high = (high << n) | ((1 << n) - 1)
                max_bit += n
                delta <<= n
            value = current - low
            # First symbol whose scaled range end reaches `value`:
            # floor((cdf[s] - 1) * delta / 2**24) >= value <=> cdf[s] >= ceil(value * 2**24 / delta) + 1
            threshold = -((-value << TOTAL_RANGE_BITS) // delta) + 1
            if isinstance(cdf, np.ndarray):  # a C search; converting rows to lists costs more
                symbol = int(cdf.searchsorted(threshold))
            else:
                symbol = bisect_left(cdf, threshold)
            if symbol == len(cdf):
                raise EntropyDecodingError("value beyond the last symbol's range")
            start = int(cdf[symbol - 1]) if symbol else 0
            new_low = low - ((-start * delta) >> TOTAL_RANGE_BITS)
            if current < new_low:
                raise EntropyDecodingError("value between two symbol ranges")
            high = low + (((int(cdf[symbol]) - 1) * delta) >> TOTAL_RANGE_BITS)
            low = new_low
            width = max_bit + 1
            common = width - (low ^ high).bit_length()
            if common > 0:
                kept = width - common
                mask = (1 << kept) - 1
                low &= mask
                high &= mask
                current &= mask
                max_bit = kept - 1
            symbols.append(symbol)
        self._pos = pos
        self._low, self._high, self._current, self._max_bit = low, high, current, max_bit
        self._acc, self._acc_bits = acc, acc_bits
        return symbols


def max_symbols_for_bits(num_bits: int, card: int) -> int:
    """Upper bound on how many symbols `num_bits` entropy-coded bits can hold.

    A symbol's range is at most `2**24 - MIN_RANGE * (card - 1)` of `2**24`, so each one
    costs at least `-log2(1 - MIN_RANGE * (card - 1) / 2**24)` bits. Used to reject headers
    that claim absurd lengths before decoding.
    """
    min_bits = -math.log2(1.0 - MIN_RANGE * (card - 1) / _FULL_RANGE)
    return int(num_bits / min_bits) + 1
