"""Decoding steps that never wait for the host, so that a CUDA graph can replay them.

:meth:`lm.LMModel.generate` runs each step from Python: slicing by a Python offset, a cache
that grows, ``torch.multinomial`` (which checks its input with ``.item()``). On a GPU that
costs a host round trip and a few hundred kernel launches per step, more than the arithmetic
of a MusicGen-small step. :class:`StaticDecoder` runs the same step on static buffers:

- the step index lives in a device tensor (``offset``); the previous column of the pattern
  sequence is read with ``index_select`` and the new one written with ``index_copy_``;
- self-attention writes the KV cache at a tensor position and attends over the whole cache
  under a mask (:meth:`lm.transformer.Transformer.forward` with ``position=``);
- guidance, temperature, top-k / top-p are tensor arithmetic; the draw is the one
  ``torch.multinomial`` makes for one sample (``argmax(p / q)`` with ``q ~ Exp(1)`` from the
  same generator) without its host-side check, so on CPU a seeded run draws exactly the
  tokens the eager path draws;
- the delay pattern's bookkeeping (special token where no code sits, prompt codes kept) is
  ``torch.where`` on precomputed masks.

The same :meth:`StaticDecoder.step` runs on CPU (tests compare it with the eager path) and
on CUDA, where after ``warmup`` eager steps it is captured once into a ``torch.cuda.CUDAGraph``
and each later step is one ``replay()``. The first step (the prompt and prefix prefill) stays
eager: its length depends on the prompt.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .sampling import classifier_free_guidance, guide_batched, sampling_probs
from .transformer import KVCache

UNKNOWN = -1  # positions of the pattern sequence not generated yet


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of ``probs (..., card)`` -> indices ``(...)``; no host synchronization.

    ``argmax(p / q)`` with ``q ~ Exp(1)`` picks index i with probability ``p_i / sum(p)``
    (the exponential race); it is how ``torch.multinomial`` draws one sample, from the same
    generator stream, minus the ``.item()`` check of its input.
    """
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)


def sample_on_device(logits: torch.Tensor, *, use_sampling: bool = True, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 0.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """:func:`lm.sampling.sample_next_token` for ``logits (..., card)``, without host syncs.

    The branches depend on the arguments only, never on tensor values.
    """
    if not use_sampling or temperature <= 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    if top_p > 0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        kept = sorted_probs * (mass_before <= top_p)
        choice = draw(kept / kept.sum(dim=-1, keepdim=True), generator)
        return torch.gather(order, -1, choice.unsqueeze(-1)).squeeze(-1)
    if top_k > 0:
        kth = torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1).values[..., -1:]
        kept = probs * (probs >= kth)
        return draw(kept / kept.sum(dim=-1, keepdim=True), generator)
    return draw(probs, generator)


class DecodeStream:
    """One forward pass per step: its KV caches, condition keys/values and masks, and rows.

    ``rows`` is B (no guidance, or one half of two-step guidance) or 2B (batched guidance).
    """

    def __init__(self, *, caches: list[KVCache], rows: int,
                 cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
                 cross_mask: torch.Tensor | None, key_mask: torch.Tensor | None) -> None:
        self.caches = caches
        self.rows = rows
        self.cross_kv = cross_kv
        self.cross_mask = cross_mask
        self.key_mask = key_mask


class StaticDecoder:
    """Runs decoding steps ``offset, offset + 1, ...`` of a pattern sequence on static buffers.

    Args:
        lm: the :class:`~lm.model.LMModel` (eval mode).
        sequence: the pattern sequence ``(B, K, S)`` (long), written in place; positions not
            generated yet hold :data:`UNKNOWN`, prompt codes are kept.
        valid: ``(K, S)`` true where a code (not the special token) sits.
        streams: the forward passes of a step (one, or two for two-step guidance), their
            caches already holding the positions before ``offset`` (the eager prefill).
        offset: the first sequence step this decoder generates.
        prefix_length: positions of a prepended condition in front of the sequence.
        guidance: ``"none"``, ``"batched"`` (one stream of 2B rows) or ``"two_step"``.
        cfg_coef, use_sampling, temperature, top_k, top_p, generator: as in ``generate``.
        use_graph: capture and replay a CUDA graph (None: when the buffers are on CUDA).
        warmup: eager steps before the capture (allocator and kernel autotuning settle).
        record_logits: keep each step's guided logits ``(B, K, card)`` float32 in ``logits``
            (a static buffer, overwritten every step), for tests and diagnostics.
    """

    def __init__(self, lm, *, sequence: torch.Tensor, valid: torch.Tensor, streams: Sequence[DecodeStream],
                 offset: int, prefix_length: int = 0, guidance: str = "none", cfg_coef: float = 3.0,
                 use_sampling: bool = True, temperature: float = 1.0, top_k: int = 250, top_p: float = 0.0,
                 generator: torch.Generator | None = None, use_graph: bool | None = None,
                 warmup: int = 2, record_logits: bool = False) -> None:
        if guidance not in ("none", "batched", "two_step"):
            raise ValueError(f"guidance must be 'none', 'batched' or 'two_step', got {guidance!r}")
        if guidance == "two_step" and len(streams) != 2:
            raise ValueError(f"two-step guidance needs 2 streams, got {len(streams)}")
        if guidance != "two_step" and len(streams) != 1:
            raise ValueError(f"guidance {guidance!r} needs 1 stream, got {len(streams)}")
        self.lm = lm
        self.sequence = sequence
        self.valid = valid.to(sequence.device)
        self.streams = list(streams)
        self.steps = sequence.shape[-1]
        self.host_offset = offset  # the host's copy, to bound the steps without reading the device
        self.offset = torch.tensor([offset], dtype=torch.long, device=sequence.device)
        self.prefix_length = prefix_length
        self.guidance = guidance
        self.cfg_coef = cfg_coef
        self.sampling = dict(use_sampling=use_sampling, temperature=temperature, top_k=top_k, top_p=top_p)
        self.generator = generator
        on_cuda = sequence.device.type == "cuda"
        self.use_graph = on_cuda if use_graph is None else use_graph
        if self.use_graph and not on_cuda:
            raise ValueError(f"CUDA graphs need CUDA tensors; the sequence is on {sequence.device}")
        if self.use_graph and generator is not None and use_sampling and temperature > 0 \
                and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            raise RuntimeError("this torch cannot replay a CUDA graph with a user torch.Generator "
                               "(no CUDAGraph.register_generator_state); pass generator=None or use_graph=False")
        self.warmup = warmup
        self.record_logits = record_logits
        self.logits: torch.Tensor | None = None
        self._eager_steps = 0
        self._graph = None

    # -- the step -------------------------------------------------------------------------------
    def _logits(self, previous: torch.Tensor, stream: DecodeStream, position: torch.Tensor) -> torch.Tensor:
        """Logits ``(rows, K, card)`` float32 of one forward pass."""
        x = previous if stream.rows == previous.shape[0] else previous.repeat(stream.rows // previous.shape[0], 1, 1)
        hidden = self.lm.transformer(self.lm.embed(x), position=position, caches=stream.caches,
                                     key_mask=stream.key_mask, cross_kv=stream.cross_kv,
                                     cross_mask=stream.cross_mask)
        return self.lm.heads(hidden)[:, :, 0].float()

    def _step(self) -> None:
        """One step, entirely on the device: read, forward, guide, sample, write, advance."""
        offset = self.offset
        previous = self.sequence.index_select(2, offset - 1)  # (B, K, 1)
        position = offset - 1 + self.prefix_length  # where the previous column sits in the cache
        outputs = [self._logits(previous, stream, position) for stream in self.streams]
        if self.guidance == "two_step":
            logits = classifier_free_guidance(outputs[0], outputs[1], self.cfg_coef)
        elif self.guidance == "batched":
            logits = guide_batched(outputs[0], self.cfg_coef)
        else:
            logits = outputs[0]
        if self.record_logits:
            if self.logits is None:  # allocated by the first (eager) step, then reused
                self.logits = torch.empty_like(logits)
            self.logits.copy_(logits)
        token = sample_on_device(logits, generator=self.generator, **self.sampling)
        valid = self.valid.index_select(1, offset).squeeze(1)  # (K,)
        token = torch.where(valid, token, self.lm.special_token_id)
        current = self.sequence.index_select(2, offset).squeeze(2)
        written = torch.where(current == UNKNOWN, token, current)
        self.sequence.index_copy_(2, offset, written.unsqueeze(2))
        offset.add_(1)

    # -- running it -----------------------------------------------------------------------------
    def step(self) -> None:
        """Generate the next sequence step (eagerly, or by replaying the captured graph)."""
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


__all__ = ["DecodeStream", "StaticDecoder", "UNKNOWN", "draw", "sample_on_device"]
