"""The one LM decode path: an eager prefill, then steps over a preallocated KV cache.

:meth:`lm.LMModel.generate_iter` builds a :class:`StaticDecoder` over the pattern sequence
``(B, K, S)`` and the forward passes of a step (:class:`DecodingState`: one, or two for
two-step guidance). :meth:`StaticDecoder.prefill` runs the prompt (and a prepended condition)
through the caches in one eager pass and generates the first step: its length depends on the
prompt. Every later step is :meth:`StaticDecoder.step`, one function on CPU and CUDA:

- the step index lives in a device tensor; the previous column of the sequence is read with
  ``index_select`` and the new one written with ``index_copy_``;
- guidance, temperature, top-k / top-p and the draw are tensor arithmetic
  (:func:`lm.sampling.sample_next_token`, whose draw is the one ``torch.multinomial`` makes,
  without its host-side check);
- the pattern's bookkeeping (special token where no code sits, prompt codes kept) is
  ``torch.where`` on precomputed masks.

With ``static_shapes`` the step writes the cache at the device position and attends over the
whole cache under a mask, so no shape or Python value depends on the step: on CUDA it is
captured once into a ``torch.cuda.CUDAGraph`` (after ``warmup`` uncaptured steps) and each
later step is one ``replay()``. Without it, the step reads the position from the host and
attends over the positions written so far only, which is cheaper for long generations.
"""
from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .patterns import Pattern
from .sampling import SamplingConfig, classifier_free_guidance, guide_batched, sample_next_token
from .transformer import KVCache

UNKNOWN = -1  # positions of the pattern sequence not generated yet
GUIDANCE = ("none", "batched", "two_step")


@dataclass
class DecodingState:
    """One forward stream of incremental decoding: its caches and condition.

    ``caches`` hold self-attention keys/values per layer, ``cross_kv`` the condition's
    projected keys/values per layer, ``cross_mask`` its boolean mask ``(B, 1, 1, S)``,
    ``key_mask (B, max_len)`` the self-attention keys that may be attended (set when a
    padded prefix is prepended) and ``offset`` the number of positions the eager passes of
    :meth:`lm.LMModel.hidden` processed (a :class:`StaticDecoder` counts its own steps).
    ``frame_input (B, S, dim)``: added to the input embedding of sequence step ``s`` (row ``s``).
    """

    caches: list[KVCache]
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    cross_mask: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    offset: int = 0
    # (B, S, dim) added to the input at each sequence step (the beat clock, a key): step s gets row s.
    frame_input: torch.Tensor | None = None
    prefix_length: int = 0  # prepended positions in the caches: sequence step s sits at s + prefix_length

    @property
    def batch_size(self) -> int:
        return self.caches[0].keys.shape[0]

    @property
    def max_len(self) -> int:
        return self.caches[0].max_len


class FrameTracker:
    """Which frames of a pattern are final after each sequence step, and their codes.

    Frame ``t`` is final at the last step holding one of its codes (prompt frames: before
    any step). Frames are released in order: ``ready_after(s)`` counts the leading frames
    all final after step ``s``.
    """

    def __init__(self, pattern: Pattern, prompt_frames: int, device: torch.device) -> None:
        T, K = pattern.timesteps, pattern.num_codebooks
        last = [-1] * T
        steps = torch.zeros(K, T, dtype=torch.long)
        for s, coords in enumerate(pattern.layout):
            for c in coords:
                if c.t < T:
                    steps[c.k, c.t] = s
                    if c.t >= prompt_frames:
                        last[c.t] = max(last[c.t], s)
        self.final_by = list(itertools.accumulate(last, max))  # frames are released in order
        self.steps = steps.to(device)  # (K, T): the sequence step holding each code
        self.done = 0

    def ready_after(self, step: int) -> int:
        return bisect.bisect_right(self.final_by, step)

    def take(self, sequence: torch.Tensor, ready: int) -> torch.Tensor:
        """Codes ``(B, K, ready - done)`` of the frames released since the last call."""
        index = self.steps[:, self.done: ready]
        self.done = ready
        return sequence.gather(2, index.expand(sequence.shape[0], -1, -1))


Prefix = tuple[torch.Tensor | None, torch.Tensor | None]  # a prepended condition and its mask


class StaticDecoder:
    """Generates sequence steps ``offset, offset + 1, ...`` of a pattern sequence.

    Args:
        lm: the :class:`~lm.model.LMModel` (eval mode).
        sequence: the pattern sequence ``(B, K, S)`` (long), written in place; positions not
            generated yet hold :data:`UNKNOWN`, prompt codes are kept.
        valid: ``(K, S)`` true where a code (not the special token) sits.
        streams: the forward passes of a step (one, or two for two-step guidance), each a
            :class:`DecodingState` with empty caches; :meth:`prefill` fills them.
        offset: the first sequence step this decoder generates (the positions before it are
            the prefill).
        guidance: ``"none"``, ``"batched"`` (one stream of 2B rows) or ``"two_step"``.
        cfg_coef, use_sampling, temperature, top_k, top_p, generator: as in ``generate``.
        static_shapes: attend over the whole cache at a device position (what a CUDA graph
            needs); False: over the positions written so far, the position from the host.
        use_graph: capture and replay a CUDA graph (None: with static shapes on CUDA).
        warmup: uncaptured steps before the capture (allocator and kernel autotuning settle).
        record_logits: keep each step's guided logits ``(B, K, card)`` float32 in ``logits``
            (a static buffer, overwritten every step), for tests and diagnostics.
    """

    def __init__(self, lm, *, sequence: torch.Tensor, valid: torch.Tensor, streams: Sequence[DecodingState],
                 offset: int, guidance: str = "none", cfg_coef: float = SamplingConfig.cfg_coef,
                 use_sampling: bool = SamplingConfig.use_sampling,
                 temperature: float = SamplingConfig.temperature, top_k: int = SamplingConfig.top_k,
                 top_p: float = SamplingConfig.top_p,
                 generator: torch.Generator | None = None, static_shapes: bool = True,
                 use_graph: bool | None = None, warmup: int = 2, record_logits: bool = False) -> None:
        if guidance not in GUIDANCE:
            raise ValueError(f"guidance must be one of {GUIDANCE}, got {guidance!r}")
        if len(streams) != (2 if guidance == "two_step" else 1):
            raise ValueError(f"guidance {guidance!r} needs {2 if guidance == 'two_step' else 1} stream(s), "
                             f"got {len(streams)}")
        self.lm = lm
        self.sequence = sequence
        self.valid = valid.to(sequence.device)
        self.streams = list(streams)
        self.steps = sequence.shape[-1]
        self.first = offset
        self.host_offset = offset  # the host's copy, to bound the steps without reading the device
        self.offset = torch.tensor([offset], dtype=torch.long, device=sequence.device)
        self.prefix_length: int | None = None  # known once prefill() ran
        self.guidance = guidance
        self.cfg_coef = cfg_coef
        self.sampling = dict(use_sampling=use_sampling, temperature=temperature, top_k=top_k, top_p=top_p)
        self.generator = generator
        on_cuda = sequence.device.type == "cuda"
        self.use_graph = (static_shapes and on_cuda) if use_graph is None else use_graph
        if self.use_graph and not on_cuda:
            raise ValueError(f"CUDA graphs need CUDA tensors; the sequence is on {sequence.device}")
        if self.use_graph and not static_shapes:
            raise ValueError("a CUDA graph needs static_shapes=True")
        if self.use_graph and generator is not None and use_sampling and temperature > 0 \
                and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            raise RuntimeError("this torch cannot replay a CUDA graph with a user torch.Generator "
                               "(no CUDAGraph.register_generator_state); "
                               "pass generator=None or use_graph=False")
        self.static_shapes = static_shapes
        self.warmup = warmup
        self.record_logits = record_logits
        self.logits: torch.Tensor | None = None
        self._eager_steps = 0
        self._graph = None

    # -- the steps ------------------------------------------------------------------------------
    def prefill(self, prefixes: Sequence[Prefix] | None = None) -> None:
        """Run the positions before ``offset`` through each stream, then generate step ``offset``.

        ``prefixes``: per stream, a condition ``(rows, P, dim)`` prepended to the sequence and
        its mask ``(rows, P)`` (or ``(None, None)``); they stay in the caches for the steps.
        """
        if self.prefix_length is not None:
            raise RuntimeError("prefill() runs once, before the steps")
        prefixes = list(prefixes) if prefixes is not None else [(None, None)] * len(self.streams)
        if len(prefixes) != len(self.streams):
            raise ValueError(f"{len(self.streams)} stream(s) but {len(prefixes)} prefixes")
        context = self.sequence[..., : self.first]
        outputs = []
        for stream, (prefix, prefix_mask) in zip(self.streams, prefixes):
            hidden = self.lm.hidden(self._rows(context, stream), prefix=prefix, prefix_mask=prefix_mask,
                                    state=stream)
            outputs.append(self.lm.heads(hidden[:, -1:])[:, :, 0].float())  # guidance, sampling in float32
        self.prefix_length = self.streams[0].offset - self.first
        self._choose(outputs)
        self.host_offset += 1

    def _rows(self, x: torch.Tensor, stream: DecodingState) -> torch.Tensor:
        """``x (B, ...)`` repeated up to the stream's rows (2B: batched guidance)."""
        rows = stream.batch_size
        return x if rows == x.shape[0] else x.repeat(rows // x.shape[0], *([1] * (x.dim() - 1)))

    def _logits(self, previous: torch.Tensor, stream: DecodingState) -> torch.Tensor:
        """Logits ``(rows, K, card)`` float32 of one forward pass of the previous column."""
        if self.static_shapes:  # where the previous column sits in the cache
            where = dict(position=self.offset - 1 + self.prefix_length)
        else:
            where = dict(start=self.host_offset - 1 + self.prefix_length)
        x = self.lm.embed(self._rows(previous, stream))
        if stream.frame_input is not None:  # the previous column's step: a device index, graph-safe
            x = x + stream.frame_input.index_select(1, self.offset - 1)
        hidden = self.lm.transformer(x, caches=stream.caches,
                                     key_mask=stream.key_mask, cross_kv=stream.cross_kv,
                                     cross_mask=stream.cross_mask, **where)
        return self.lm.heads(hidden)[:, :, 0].float()

    def _step(self) -> None:
        """One step, entirely on the device: read, forward, then :meth:`_choose`."""
        previous = self.sequence.index_select(2, self.offset - 1)  # (B, K, 1)
        self._choose([self._logits(previous, stream) for stream in self.streams])

    def _choose(self, outputs: list[torch.Tensor]) -> None:
        """Guide the streams' logits, sample, write step ``offset`` (prompt codes kept), advance."""
        if self.guidance == "two_step":
            logits = classifier_free_guidance(outputs[0], outputs[1], self.cfg_coef)
        elif self.guidance == "batched":
            logits = guide_batched(outputs[0], self.cfg_coef)
        else:
            logits = outputs[0]
        if self.record_logits:
            if self.logits is None:  # allocated by the first (uncaptured) step, then reused
                self.logits = torch.empty_like(logits)
            self.logits.copy_(logits)
        offset = self.offset
        token = sample_next_token(logits, generator=self.generator, **self.sampling)
        valid = self.valid.index_select(1, offset).squeeze(1)  # (K,)
        token = torch.where(valid, token, self.lm.special_token_id)
        current = self.sequence.index_select(2, offset).squeeze(2)
        written = torch.where(current == UNKNOWN, token, current)
        self.sequence.index_copy_(2, offset, written.unsqueeze(2))
        offset.add_(1)

    # -- running them ---------------------------------------------------------------------------
    def step(self) -> None:
        """Generate the next sequence step (uncaptured, or by replaying the captured graph)."""
        if self.prefix_length is None:
            raise RuntimeError("call prefill() before step()")
        if self.host_offset >= self.steps:
            raise RuntimeError(f"the sequence has {self.steps} steps, all generated")
        if self._graph is None and self.use_graph and self._eager_steps >= self.warmup:
            self._capture()
        if self._graph is not None:
            self._graph.replay()
        elif self.use_graph:  # warm-up on a side stream, as torch.cuda.graph asks
            side = torch.cuda.Stream(device=self.sequence.device)
            side.wait_stream(torch.cuda.current_stream(self.sequence.device))
            with torch.cuda.stream(side):
                self._step()
            torch.cuda.current_stream(self.sequence.device).wait_stream(side)
            self._eager_steps += 1
        else:
            self._step()
            self._eager_steps += 1
        self.host_offset += 1

    def _capture(self) -> None:
        """Record one step into a CUDA graph. Capturing runs nothing: the buffers only change
        on replay, so the step is the same whether captured or not."""
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None and hasattr(graph, "register_generator_state"):
            graph.register_generator_state(self.generator)
        # thread_local: other threads (the demo serves requests concurrently) may keep using CUDA
        # while this one captures.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._step()
        self._graph = graph

    @property
    def captured(self) -> bool:
        """True once the step runs as a CUDA graph replay."""
        return self._graph is not None


__all__ = ["DecodingState", "FrameTracker", "StaticDecoder", "UNKNOWN"]
