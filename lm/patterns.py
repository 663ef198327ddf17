"""Codebook interleaving patterns: how K parallel code streams become one LM sequence.

A codec frame holds K codes (one per codebook). A pattern lays the codes ``(B, K, T)`` out
over S sequence steps ``(B, K, S)``; at each step the LM predicts, for every codebook, the
code placed there. Step 0 is always empty (all special tokens) so that the first code has
a position to be predicted from. Positions that hold no code carry the special token.

The providers reproduce audiocraft's layouts step for step, so that models trained there
(MusicGen: the delay pattern with delays 0..K-1) read and write the same sequences:

- delay:        codebook k of frame t sits at step 1 + t + delays[k];
- parallel:     delay with all delays 0 (all codebooks of a frame at one step);
- unrolled:     codebooks flattened over several inner steps per frame, optionally delayed;
- coarse-first: all of codebook 0 first, then the other codebooks (delayed among themselves).

Layouts may name frames past ``T`` (the delay pattern's tail does); those positions are
special tokens when the sequence is built, exactly as in audiocraft.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

import torch


class Coord(NamedTuple):
    """One code of the original stream: frame ``t`` of codebook ``k``."""

    t: int
    k: int


Layout = list[list[Coord]]


class Pattern:
    """The layout of ``timesteps`` frames of ``num_codebooks`` codebooks over sequence steps.

    ``layout[s]`` lists the codes placed at step ``s``; ``layout[0]`` is empty. Index tensors
    for building and reverting are computed once per shape and cached.
    """

    def __init__(self, layout: Layout, *, num_codebooks: int, timesteps: int) -> None:
        if not layout or layout[0]:
            raise ValueError("a pattern layout must start with an empty step")
        self.layout = layout
        self.num_codebooks = num_codebooks
        self.timesteps = timesteps
        self._validate()
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _validate(self) -> None:
        last_t = [0] * self.num_codebooks
        for s, coords in enumerate(self.layout):
            ks = [c.k for c in coords]
            if len(set(ks)) != len(ks):
                raise ValueError(f"step {s} holds the same codebook twice: {coords}")
            for c in coords:
                if not 0 <= c.k < self.num_codebooks:
                    raise ValueError(f"step {s}: codebook {c.k} outside 0..{self.num_codebooks - 1}")
                if c.t < last_t[c.k]:
                    raise ValueError(f"step {s}: codebook {c.k} goes back in time ({c.t} < {last_t[c.k]})")
                last_t[c.k] = c.t

    @property
    def num_steps(self) -> int:
        """S: the full sequence length, first empty step included."""
        return len(self.layout)

    @property
    def max_delay(self) -> int:
        """How many steps the layout runs past the last frame (audiocraft's definition)."""
        last = max((c.t + 1 for coords in self.layout[1:] for c in coords), default=0)
        return last - self.timesteps

    @property
    def num_valid_steps(self) -> int:
        """Length of the sequence cut where every later step would be partly past the end."""
        return self.num_steps - self.max_delay

    def _ref_layout(self, keep_only_valid_steps: bool) -> Layout:
        return self.layout[: self.num_valid_steps] if keep_only_valid_steps else self.layout

    def first_step_with_timestep(self, t: int) -> int | None:
        """The first step holding any code of frame ``t`` (where generation resumes after a prompt)."""
        if t > self.timesteps:
            raise ValueError(f"frame {t} is past the pattern's {self.timesteps} frames")
        for s, coords in enumerate(self.layout):
            if any(c.t == t for c in coords):
                return s
        return None

    # -- index tensors (cached) ------------------------------------------------------------

    def sequence_indexes(self, timesteps: int, keep_only_valid_steps: bool,
                         device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Where each sequence position reads from in the flattened codes ``(K*T + 1,)``.

        Returns ``indexes (K, S)`` into codes flattened as ``k * T + t`` with ``K * T`` meaning
        the special token, and ``mask (K, S)`` true where a real code sits.
        """
        key = ("build", timesteps, keep_only_valid_steps)
        if key not in self._cache:
            if timesteps > self.timesteps:
                raise ValueError(f"{timesteps} frames given to a pattern built for {self.timesteps}")
            layout = self._ref_layout(keep_only_valid_steps)
            K = self.num_codebooks
            indexes = torch.full((K, len(layout)), K * timesteps, dtype=torch.long)
            mask = torch.zeros((K, len(layout)), dtype=torch.bool)
            for s, coords in enumerate(layout):
                for c in coords:
                    if c.t < timesteps:
                        indexes[c.k, s] = c.k * timesteps + c.t
                        mask[c.k, s] = True
            self._cache[key] = (indexes, mask)
        indexes, mask = self._cache[key]
        return indexes.to(device), mask.to(device)

    def revert_indexes(self, steps: int, keep_only_valid_steps: bool, is_model_output: bool,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Where each code ``(K, T)`` reads from in a flattened sequence ``(K*S + 1,)``.

        With ``is_model_output`` the layout is shifted by one step: the output at step ``s``
        predicts the codes placed at step ``s + 1``.
        """
        key = ("revert", steps, keep_only_valid_steps, is_model_output)
        if key not in self._cache:
            layout = self._ref_layout(keep_only_valid_steps)
            if steps > len(layout):
                raise ValueError(f"a sequence of {steps} steps is longer than the pattern ({len(layout)})")
            if is_model_output:
                layout = layout[1:]
            K, T = self.num_codebooks, self.timesteps
            indexes = torch.full((K, T), K * steps, dtype=torch.long)
            mask = torch.zeros((K, T), dtype=torch.bool)
            for s, coords in enumerate(layout[:steps]):
                for c in coords:
                    if c.t < T:
                        indexes[c.k, c.t] = c.k * steps + s
                        mask[c.k, c.t] = True
            self._cache[key] = (indexes, mask)
        indexes, mask = self._cache[key]
        return indexes.to(device), mask.to(device)

    # -- public transforms --------------------------------------------------------------------

    def build_sequence(self, codes: torch.Tensor, special_token: int,
                       keep_only_valid_steps: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Interleave codes ``(B, K, T)`` into a sequence ``(B, K, S)``.

        Returns the sequence and ``mask (K, S)`` (true where a code, not the special token, sits).
        """
        B, K, T = self._check(codes, "codes")
        indexes, mask = self.sequence_indexes(T, keep_only_valid_steps, codes.device)
        flat = torch.cat([codes.reshape(B, K * T), codes.new_full((B, 1), special_token)], dim=1)
        return flat[:, indexes.reshape(-1)].reshape(B, K, -1), mask

    def revert_sequence(self, sequence: torch.Tensor, special_token: int,
                        keep_only_valid_steps: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Undo :meth:`build_sequence`: ``(B, K, S)`` -> codes ``(B, K, T)`` and ``mask (K, T)``.

        Frames whose position lies past the given steps come back as ``special_token``.
        """
        B, K, S = self._check(sequence, "sequence")
        indexes, mask = self.revert_indexes(S, keep_only_valid_steps, False, sequence.device)
        flat = torch.cat([sequence.reshape(B, K * S), sequence.new_full((B, 1), special_token)], dim=1)
        return flat[:, indexes.reshape(-1)].reshape(B, K, -1), mask

    def revert_logits(self, logits: torch.Tensor, special_value: float = float("nan"),
                      keep_only_valid_steps: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Align LM outputs ``(B, card, K, S)`` with the codes they predict: ``(B, card, K, T)``.

        The output at step ``s`` predicts step ``s + 1``; codes with no prediction get
        ``special_value`` (NaN makes misuse visible) and ``mask (K, T)`` false.
        """
        if logits.dim() != 4 or logits.shape[2] != self.num_codebooks:
            raise ValueError(f"expected logits (B, card, {self.num_codebooks}, S), got {tuple(logits.shape)}")
        B, card, K, S = logits.shape
        indexes, mask = self.revert_indexes(S, keep_only_valid_steps, True, logits.device)
        flat = torch.cat([logits.reshape(B, card, K * S), logits.new_full((B, card, 1), special_value)], dim=2)
        return flat[:, :, indexes.reshape(-1)].reshape(B, card, K, -1), mask

    def _check(self, x: torch.Tensor, name: str) -> tuple[int, int, int]:
        if x.dim() != 3 or x.shape[1] != self.num_codebooks:
            raise ValueError(f"expected {name} (B, {self.num_codebooks}, L), got {tuple(x.shape)}")
        return x.shape[0], x.shape[1], x.shape[2]


class PatternProvider(ABC):
    """Builds the :class:`Pattern` for a number of frames; patterns are cached per length."""

    def __init__(self, num_codebooks: int) -> None:
        if num_codebooks < 1:
            raise ValueError(f"num_codebooks must be >= 1, got {num_codebooks}")
        self.num_codebooks = num_codebooks
        self._patterns: dict[int, Pattern] = {}

    def get_pattern(self, timesteps: int) -> Pattern:
        """The pattern for ``timesteps`` frames (built once, then reused with its index cache)."""
        if timesteps < 0:
            raise ValueError(f"timesteps must be >= 0, got {timesteps}")
        if timesteps not in self._patterns:
            self._patterns[timesteps] = Pattern(self.layout(timesteps), num_codebooks=self.num_codebooks,
                                                timesteps=timesteps)
        return self._patterns[timesteps]

    @abstractmethod
    def layout(self, timesteps: int) -> Layout:
        """The step-by-step layout for ``timesteps`` frames (first step empty)."""


def _check_sorted(name: str, values: Sequence[int], length: int) -> list[int]:
    values = list(values)
    if len(values) != length:
        raise ValueError(f"{name} must have {length} entries, got {values}")
    if sorted(values) != values or any(v < 0 for v in values):
        raise ValueError(f"{name} must be non-negative and ascending, got {values}")
    return values


class DelayPatternProvider(PatternProvider):
    """Codebook k delayed by ``delays[k]`` steps (MusicGen: 0, 1, ..., K-1).

    For K=3, T=4 and default delays, codes ``c`` become (S = special token)::

        S c0 c1 c2 c3 S  S
        S S  c0 c1 c2 c3 S
        S S  S  c0 c1 c2 c3

    ``flatten_first`` frames are first laid out one code per step; ``empty_initial`` adds
    empty steps after the first one (both as audiocraft's options of the same names).
    """

    def __init__(self, num_codebooks: int, delays: Sequence[int] | None = None,
                 flatten_first: int = 0, empty_initial: int = 0) -> None:
        super().__init__(num_codebooks)
        self.delays = _check_sorted("delays", range(num_codebooks) if delays is None else delays,
                                    num_codebooks)
        self.flatten_first = flatten_first
        self.empty_initial = empty_initial

    def layout(self, timesteps: int) -> Layout:
        out: Layout = [[] for _ in range(1 + self.empty_initial)]
        for t in range(min(timesteps, self.flatten_first)):
            out.extend([Coord(t, k)] for k in range(self.num_codebooks))
        for step in range(self.flatten_first, timesteps + max(self.delays)):
            out.append([Coord(step - d, k) for k, d in enumerate(self.delays)
                        if step - d >= self.flatten_first])
        return out


def stereo_delays(codebooks_per_channel: int) -> list[int]:
    """Delays of stereo MusicGen: left/right codebooks interleaved, each pair shares a delay."""
    return [d for d in range(codebooks_per_channel) for _ in range(2)]


class ParallelPatternProvider(DelayPatternProvider):
    """All codebooks of a frame predicted at the same step."""

    def __init__(self, num_codebooks: int) -> None:
        super().__init__(num_codebooks, [0] * num_codebooks)


class UnrolledPatternProvider(PatternProvider):
    """Codebooks spread over ``max(flattening) + 1`` inner steps per frame.

    ``flattening[k]`` is the inner step of codebook k (codebooks sharing an inner step are
    predicted together); ``delays[k]`` shifts its inner step by whole frames and must be
    equal for codebooks sharing an inner step. Default: fully flattened, no delay.
    """

    def __init__(self, num_codebooks: int, flattening: Sequence[int] | None = None,
                 delays: Sequence[int] | None = None) -> None:
        super().__init__(num_codebooks)
        flattening = _check_sorted("flattening", range(num_codebooks) if flattening is None else flattening,
                                   num_codebooks)
        delays = _check_sorted("delays", [0] * num_codebooks if delays is None else delays, num_codebooks)
        self.groups: dict[int, tuple[list[int], int]] = {}
        for k, (inner, delay) in enumerate(zip(flattening, delays)):
            codebooks, group_delay = self.groups.setdefault(inner, ([], delay))
            if group_delay != delay:
                raise ValueError(f"codebooks flattened to inner step {inner} have different delays "
                                 f"({group_delay} and {delay})")
            codebooks.append(k)
        self.num_inner_steps = max(self.groups) + 1
        self.max_delay = max(delays)

    def layout(self, timesteps: int) -> Layout:
        total = timesteps + self.max_delay
        # Each entry carries its position; entries are then ordered by (position, coords),
        # which is how audiocraft orders ties between inner steps.
        entries: list[tuple[int, list[Coord]]] = [(-1, [])]
        for t in range(total):
            for inner in range(self.num_inner_steps):
                if inner not in self.groups:
                    entries.append((t, []))
                    continue
                codebooks, delay = self.groups[inner]
                if t + delay < total:
                    entries.append((t + delay, [Coord(t, k) for k in codebooks]))
        return [coords for _, coords in sorted(entries)]


class CoarseFirstPatternProvider(PatternProvider):
    """Codebook 0 for all frames first, then codebooks 1..K-1 with ``delays`` (K-1 entries).

    The fine codebooks see the whole coarse stream, so generation must cover the full
    training length.
    """

    def __init__(self, num_codebooks: int, delays: Sequence[int] | None = None) -> None:
        super().__init__(num_codebooks)
        if num_codebooks < 2:
            raise ValueError("the coarse-first pattern needs at least 2 codebooks")
        self.delays = _check_sorted("delays", [0] * (num_codebooks - 1) if delays is None else delays,
                                    num_codebooks - 1)

    def layout(self, timesteps: int) -> Layout:
        out: Layout = [[]]
        out.extend([Coord(t, 0)] for t in range(timesteps))
        for step in range(timesteps + max(self.delays)):
            out.append([Coord(step - d, k + 1) for k, d in enumerate(self.delays) if step - d >= 0])
        return out


_PROVIDERS: dict[str, type[PatternProvider]] = {
    "delay": DelayPatternProvider,
    "parallel": ParallelPatternProvider,
    "unroll": UnrolledPatternProvider,
    "coarse_first": CoarseFirstPatternProvider,
}


def make_pattern_provider(modeling: str, num_codebooks: int, **kwargs) -> PatternProvider:
    """Build a provider by audiocraft's ``codebooks_pattern.modeling`` name and its options."""
    if modeling not in _PROVIDERS:
        raise ValueError(f"unknown codebook pattern {modeling!r}; expected one of {sorted(_PROVIDERS)}")
    return _PROVIDERS[modeling](num_codebooks, **kwargs)
