"""MusicGen-style language model over K codebooks: config, presets, forward and generation.

``LMModel`` sums one embedding per codebook (``card + 1`` rows, the last being the special
token), runs the :class:`~lm.transformer.Transformer`, normalizes and predicts each codebook
with its own head. The condition arrives already projected to ``dim``: as a cross-attention
source ``(B, S, dim)`` with a mask, and/or as a prefix ``(B, P, dim)`` prepended to the
sequence (MusicGen-melody). Parameter names equal audiocraft's, so its ``state_dict.bin``
loads directly (see ``inference.loaders``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from codec.config import DictConfig

from . import cpu_kernels
from .patterns import PatternProvider, make_pattern_provider, stereo_delays
from .sampling import SamplingConfig, batch_size, check_sampling, guidance_rows
from .static_decoder import UNKNOWN, DecodingState, FrameTracker, Prefix, StaticDecoder
from .transformer import KVCache, Transformer, linear


@dataclass(frozen=True)
class LMConfig(DictConfig):
    """Everything needed to build an :class:`LMModel`; a checkpoint carries one."""

    dim: int = 1024
    num_heads: int = 16
    num_layers: int = 24
    ffn_dim: int = 4096
    num_codebooks: int = 4
    card: int = 2048
    cross_attention: bool = True  # False for prepend-only conditioning (melody) or none
    positional_embedding: str = "sin"
    max_period: float = 10_000.0
    norm_first: bool = True
    bias_attn: bool = False
    bias_ff: bool = False
    bias_proj: bool = False
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0
    # Codebook interleaving (audiocraft's codebooks_pattern); delays None = 0..K-1.
    pattern: str = "delay"
    delays: tuple[int, ...] | None = None
    flatten_first: int = 0
    empty_initial: int = 0
    flattening: tuple[int, ...] | None = None
    # A checkpoint's own guidance settings (audiocraft's inference_coef, two_step_cfg), used by
    # LMModel.generate when not given; unset, they are SamplingConfig's defaults.
    cfg_coef: float = SamplingConfig.cfg_coef
    two_step_cfg: bool = SamplingConfig.two_step_cfg

    def __post_init__(self) -> None:
        for name in ("delays", "flattening"):  # JSON/YAML give lists
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(v) for v in value))
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.positional_embedding != "sin":
            raise ValueError(f"only sinusoidal positions are supported, got {self.positional_embedding!r}")
        if self.activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {self.activation!r}")

    @property
    def special_token_id(self) -> int:
        return self.card

    def pattern_provider(self) -> PatternProvider:
        if self.pattern == "delay":
            kwargs = dict(delays=self.delays, flatten_first=self.flatten_first,
                          empty_initial=self.empty_initial)
        elif self.pattern == "unroll":
            kwargs = dict(flattening=self.flattening, delays=self.delays)
        elif self.pattern == "coarse_first":
            kwargs = dict(delays=self.delays)
        else:
            kwargs = {}
        return make_pattern_provider(self.pattern, self.num_codebooks, **kwargs)


_SMALL = LMConfig()
_MEDIUM = LMConfig(dim=1536, num_heads=24, num_layers=48, ffn_dim=6144)
_LARGE = LMConfig(dim=2048, num_heads=32, num_layers=48, ffn_dim=8192)
_STEREO = dict(num_codebooks=8, delays=tuple(stereo_delays(4)))

PRESETS: dict[str, LMConfig] = {
    "musicgen_small": _SMALL,
    "musicgen_medium": _MEDIUM,
    "musicgen_large": _LARGE,
    "musicgen_melody": replace(_MEDIUM, cross_attention=False),
    "musicgen_stereo_small": replace(_SMALL, **_STEREO),
    "musicgen_stereo_medium": replace(_MEDIUM, **_STEREO),
    "musicgen_stereo_large": replace(_LARGE, **_STEREO),
    # The model the repository ships (assets/models/tokenwave-small): trainable on a CPU.
    "tokenwave_small": LMConfig(dim=256, num_heads=4, num_layers=4, ffn_dim=1024, num_codebooks=4,
                                card=512),
    # Tiny models for tests and smoke runs: built in milliseconds.
    "tiny": LMConfig(dim=32, num_heads=4, num_layers=2, ffn_dim=64, num_codebooks=4, card=16),
    "tiny_prepend": LMConfig(dim=32, num_heads=4, num_layers=2, ffn_dim=64, num_codebooks=4, card=16,
                             cross_attention=False),
    "tiny_stereo": LMConfig(dim=32, num_heads=4, num_layers=2, ffn_dim=64, num_codebooks=8, card=16,
                            delays=tuple(stereo_delays(4))),
}


def get_preset(name: str) -> LMConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown LM preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]


class LMModel(nn.Module):
    """Transformer LM over interleaved codebook sequences ``(B, K, S)`` -> logits ``(B, K, S, card)``."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.pattern_provider = c.pattern_provider()
        self.emb = nn.ModuleList([nn.Embedding(c.card + 1, c.dim) for _ in range(c.num_codebooks)])
        self.transformer = Transformer(
            dim=c.dim, num_heads=c.num_heads, num_layers=c.num_layers, ffn_dim=c.ffn_dim,
            cross_attention=c.cross_attention, norm_first=c.norm_first, bias_attn=c.bias_attn,
            bias_ff=c.bias_ff, activation=c.activation, layer_norm_eps=c.layer_norm_eps,
            dropout=c.dropout, max_period=c.max_period)
        self.out_norm = nn.LayerNorm(c.dim, eps=c.layer_norm_eps) if c.norm_first else None
        self.linears = nn.ModuleList([nn.Linear(c.dim, c.card, bias=c.bias_proj)
                                      for _ in range(c.num_codebooks)])
        self._init_weights()
        self.quantization = None  # an lm.quant.QuantConfig once lm.quant.quantize_lm stored the matrices
        # The self-attention KV cache's dtype; None: see kv_dtype().
        self.kv_cache_dtype: torch.dtype | None = None

    def _init_weights(self) -> None:
        """audiocraft's 'gaussian' init with depth-wise scaling ('current'): std 1/sqrt(fan_in),
        divided by sqrt(2 * depth) inside layer ``depth - 1``, truncated at 3 std."""
        def init(weight: torch.Tensor, fan_in: int, depth: int | None = None) -> None:
            std = 1 / math.sqrt(fan_in) / (math.sqrt(2 * depth) if depth else 1)
            nn.init.trunc_normal_(weight, std=std, a=-3 * std, b=3 * std)

        for emb in self.emb:
            init(emb.weight, self.config.dim)
        for depth, layer in enumerate(self.transformer.layers, start=1):
            for module in layer.modules():
                if isinstance(module, nn.Linear):
                    init(module.weight, module.in_features, depth)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
        for head in self.linears:
            init(head.weight, self.config.dim)
            if head.bias is not None:
                nn.init.zeros_(head.bias)

    @property
    def special_token_id(self) -> int:
        return self.config.card

    @property
    def num_codebooks(self) -> int:
        return self.config.num_codebooks

    def low_precision_weights(self, dtype: torch.dtype = torch.bfloat16) -> LMModel:
        """Store the matrix weights (projections, feed-forward, heads) in ``dtype``; keep
        embeddings, norms, activations and the KV cache in float32.

        Decoding reads every weight once per step, so halving their size nearly halves the
        step on a CPU with bf16 instructions, at about half the logit error of running the
        whole model in bf16 (measured by ``bench/generate.py``). Returns ``self``.
        """
        weights = self.matrix_weights()
        if any(not isinstance(w, torch.Tensor) for w in weights):
            raise ValueError("low-precision weights need plain float matrices; this model's are wrapped "
                             "(LoRA adapters or quantized): merge the adapters first (tokenwave merge-lora), "
                             "or load it in float32")
        for weight in weights:  # the parameter objects themselves: modules keep pointing at them
            weight.data = weight.data.to(dtype)
        return self

    def matrix_weights(self) -> list:
        """The projection, feed-forward and head matrices (tensors, or the modules that wrap
        them: LoRA, quantization), in layer order."""
        out = []
        for layer in self.transformer.layers:
            for attn in (layer.self_attn, layer.cross_attention):
                if attn is not None:
                    out += [attn.in_proj_weight, attn.out_proj.weight]
            out += [layer.linear1.weight, layer.linear2.weight]
        return out + [head.weight for head in self.linears]

    def set_attention_backend(self, backend: str) -> None:
        """'sdpa' (default) or 'xformers' (CUDA only, when installed)."""
        self.transformer.set_attention_backend(backend)

    # -- forward -------------------------------------------------------------------------------

    def embed(self, sequence: torch.Tensor) -> torch.Tensor:
        """Sum of per-codebook embeddings: ``(B, K, S)`` -> ``(B, S, dim)``."""
        if sequence.dim() != 3 or sequence.shape[1] != self.num_codebooks:
            raise ValueError(f"expected a sequence (B, {self.num_codebooks}, S), got {tuple(sequence.shape)}")
        out = self.emb[0](sequence[:, 0])
        for k in range(1, self.num_codebooks):
            out = out + self.emb[k](sequence[:, k])
        return out

    def heads(self, hidden: torch.Tensor) -> torch.Tensor:
        """Transformer output ``(B, S, dim)`` -> logits ``(B, K, S, card)``."""
        if self.out_norm is not None:
            hidden = self.out_norm(hidden)
        return torch.stack([linear(hidden, head.weight, head.bias) for head in self.linears], dim=1)

    def hidden(self, sequence: torch.Tensor, *, condition: torch.Tensor | None = None,
               condition_mask: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
               prefix_mask: torch.Tensor | None = None, state: DecodingState | None = None,
               frame_input: torch.Tensor | None = None) -> torch.Tensor:
        """Transformer output ``(B, S, dim)`` for the sequence positions (prefix outputs dropped).

        Without ``state``: a full causal pass; ``condition (B, S_c, dim)`` is attended through
        cross-attention (``condition_mask (B, S_c)``: true = attend; None = attend to all, as
        audiocraft does; no condition = the null condition), ``prefix (B, P, dim)`` is
        prepended (``prefix_mask (B, P)``).
        ``frame_input (B, >= S, dim)`` is added to the input of each sequence step (row ``s`` to
        step ``s``; :class:`conditioning.BeatConditioner`, :class:`conditioning.KeyConditioner`).
        With ``state``: an incremental step; the condition and frame input live in the state (see
        :meth:`init_state`) and a prefix may only be given on the first step.
        """
        x = self.embed(sequence)
        S = x.shape[1]
        if state is not None:
            if frame_input is not None:
                raise ValueError("with a decoding state, pass frame_input to init_state(), not forward()")
            if state.frame_input is not None:
                start = state.offset - state.prefix_length
                frame_input = state.frame_input[:, start:]
        if frame_input is not None:
            if frame_input.dim() != 3 or frame_input.shape[0] != x.shape[0] or frame_input.shape[1] < S \
                    or frame_input.shape[2] != x.shape[2]:
                raise ValueError(f"expected frame_input ({x.shape[0]}, >={S}, {x.shape[2]}), "
                                 f"got {tuple(frame_input.shape)}")
            x = x + frame_input[:, :S].to(x.dtype)
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        if state is None:
            cross_kv, cross_mask = self._cross_inputs(condition, condition_mask, x.shape[0], x.dtype)
            key_mask = None
            if prefix_mask is not None:
                key_mask = torch.cat([prefix_mask.to(torch.bool),
                                      prefix_mask.new_ones(x.shape[0], S, dtype=torch.bool)], dim=1)
            out = self.transformer(x, key_mask=key_mask, cross_kv=cross_kv, cross_mask=cross_mask)
        else:
            if condition is not None or condition_mask is not None:
                raise ValueError("with a decoding state, pass the condition to init_state(), not forward()")
            if prefix is not None and state.offset:
                raise ValueError("a prefix can only be prepended on the first decoding step")
            if prefix is not None:
                state.prefix_length = prefix.shape[1]
            if prefix_mask is not None:
                if prefix is None or prefix_mask.shape != prefix.shape[:2]:
                    raise ValueError("prefix_mask (B, P) must come with a prefix (B, P, dim)")
                state.key_mask = torch.ones(x.shape[0], state.max_len, dtype=torch.bool, device=x.device)
                state.key_mask[:, : prefix.shape[1]] = prefix_mask.to(torch.bool)
            out = self.transformer(x, start=state.offset, caches=state.caches, key_mask=state.key_mask,
                                   cross_kv=state.cross_kv, cross_mask=state.cross_mask)
            state.offset += x.shape[1]
        return out[:, -S:] if prefix is not None else out

    def forward(self, sequence: torch.Tensor, *, condition: torch.Tensor | None = None,
                condition_mask: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
                prefix_mask: torch.Tensor | None = None, state: DecodingState | None = None,
                frame_input: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, K, S, card)`` for a pattern sequence ``(B, K, S)``; see :meth:`hidden`."""
        return self.heads(self.hidden(sequence, condition=condition, condition_mask=condition_mask,
                                      prefix=prefix, prefix_mask=prefix_mask, state=state,
                                      frame_input=frame_input))

    def compute_predictions(self, codes: torch.Tensor, **condition) -> tuple[torch.Tensor, torch.Tensor]:
        """Training view: codes ``(B, K, T)`` -> logits ``(B, K, T, card)`` aligned with the codes
        they predict, and the mask ``(B, K, T)`` of positions with a valid prediction.

        As audiocraft, the sequence is cut to the pattern's valid steps; invalid logits are NaN.
        """
        B, K, T = codes.shape
        pattern = self.pattern_provider.get_pattern(T)
        sequence, _ = pattern.build_sequence(codes, self.special_token_id, keep_only_valid_steps=True)
        logits = self(sequence, **condition).permute(0, 3, 1, 2)  # (B, card, K, S)
        logits, mask = pattern.revert_logits(logits, float("nan"), keep_only_valid_steps=True)
        return logits.permute(0, 2, 3, 1), mask[None].expand(B, -1, -1)

    def _cross_inputs(self, condition: torch.Tensor | None, condition_mask: torch.Tensor | None,
                      batch_size: int, dtype: torch.dtype):
        """Project the condition to per-layer keys/values and build its boolean mask (true = attend).

        No condition on a cross-attention model means the null condition (zero attention
        output), as MusicGen's unconditional generation uses.
        """
        if not self.config.cross_attention:
            if condition is not None:
                raise ValueError("this model has no cross-attention; pass the condition as a prefix")
            return None, None
        if condition is None:  # the null condition: one zero position nobody may attend to
            condition = torch.zeros(batch_size, 1, self.config.dim, device=self.emb[0].weight.device)
            condition_mask = torch.zeros(batch_size, 1, dtype=torch.bool, device=condition.device)
        if condition.dim() != 3 or condition.shape[0] != batch_size or condition.shape[2] != self.config.dim:
            raise ValueError(f"expected a condition ({batch_size}, S, {self.config.dim}), "
                             f"got {tuple(condition.shape)}")
        condition = condition.to(dtype)
        cross_kv = [layer.cross_attention.project_kv(condition) for layer in self.transformer.layers]
        if condition_mask is None:
            return cross_kv, None
        if condition_mask.shape != condition.shape[:2]:
            raise ValueError(f"condition_mask must be {tuple(condition.shape[:2])}, "
                             f"got {tuple(condition_mask.shape)}")
        allowed = condition_mask.to(torch.bool)
        empty = ~allowed.any(dim=1)
        if empty.any():
            # A row allowed to see nothing (the null condition) must give a zero attention output,
            # as torch SDPA and transformers do: zero values under uniform weights give exactly that,
            # without a per-step fix-up.
            keep = (~empty).to(dtype)[:, None, None, None]
            cross_kv = [(k, v * keep) for k, v in cross_kv]
            allowed = allowed | empty[:, None]
        return cross_kv, (None if allowed.all() else allowed[:, None, None, :])

    def kv_dtype(self) -> torch.dtype:
        """``kv_cache_dtype`` if set; else bfloat16 for a quantized LM on a CPU where
        :mod:`lm.cpu_kernels` runs (a late step reads half the bytes, attended in float32 by its
        kernel); else the embeddings' dtype."""
        param = self.emb[0].weight
        if self.kv_cache_dtype is not None:
            return self.kv_cache_dtype
        if self.quantization is not None and param.device.type == "cpu" and cpu_kernels.available():
            return torch.bfloat16
        return param.dtype

    def init_state(self, batch_size: int, max_len: int, *, condition: torch.Tensor | None = None,
                   condition_mask: torch.Tensor | None = None,
                   frame_input: torch.Tensor | None = None) -> DecodingState:
        """Allocate KV caches for ``max_len`` positions (prefix included), project the condition
        and keep the per-step ``frame_input (batch_size, steps, dim)``."""
        param = self.emb[0].weight
        head_dim = self.config.dim // self.config.num_heads
        caches = [KVCache(batch_size=batch_size, num_heads=self.config.num_heads, max_len=max_len,
                          head_dim=head_dim, dtype=self.kv_dtype(), device=param.device)
                  for _ in self.transformer.layers]
        cross_kv, cross_mask = self._cross_inputs(condition, condition_mask, batch_size, param.dtype)
        if frame_input is not None:
            if frame_input.dim() != 3 or frame_input.shape[0] != batch_size \
                    or frame_input.shape[2] != self.config.dim:
                raise ValueError(f"expected frame_input ({batch_size}, steps, {self.config.dim}), "
                                 f"got {tuple(frame_input.shape)}")
            frame_input = frame_input.to(device=param.device, dtype=param.dtype)
        return DecodingState(caches=caches, cross_kv=cross_kv, cross_mask=cross_mask, frame_input=frame_input)

    # -- generation ---------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, *, max_gen_len: int, prompt: torch.Tensor | None = None,
                 num_samples: int | None = None, condition: torch.Tensor | None = None,
                 condition_mask: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
                 prefix_mask: torch.Tensor | None = None, frame_input: torch.Tensor | None = None,
                 guided: bool | None = None, use_sampling: bool = SamplingConfig.use_sampling,
                 temperature: float = SamplingConfig.temperature, top_k: int = SamplingConfig.top_k,
                 top_p: float = SamplingConfig.top_p, cfg_coef: float | None = None,
                 two_step_cfg: bool | None = None, generator: torch.Generator | None = None,
                 callback: Callable[[int, int], None] | None = None, fast: bool = False) -> torch.Tensor:
        """Generate codes ``(B, K, max_gen_len)``, the prompt included, as audiocraft does.

        Args:
            max_gen_len: total number of frames, prompt frames included.
            prompt: codes ``(B, K, T0)`` to continue, ``T0 < max_gen_len``.
            num_samples: B when there is no prompt (default 1).
            condition: cross-attention source ``(R, S, dim)``, already projected, and
                ``condition_mask (R, S)`` (true = attend; None attends to all positions, as
                audiocraft does). No condition means the null condition (unconditional).
            prefix: ``(R, P, dim)`` prepended to the sequence (melody), ``prefix_mask (R, P)``.
            frame_input: ``(R, >= S, dim)`` added to the input of each of the S sequence steps
                (tempo and key conditioning, :mod:`conditioning.musical`).
                For each, R = 2B holds rows ``[conditional; unconditional]`` for classifier-free
                guidance, R = B no guidance.
            guided: whether the rows are ``[conditional; unconditional]``: the caller that built
                them says so (``inference.MusicGen`` passes what
                :attr:`lm.sampling.SamplingConfig.guided` decided), and the row count is only
                checked against it. None (tensors passed alone): the row count says.
            use_sampling, temperature, top_k, top_p: see :func:`lm.sampling.sample_next_token`;
                checked first by :func:`lm.sampling.check_sampling` (sampling needs temperature > 0).
            cfg_coef: guidance coefficient (default: the config's, 3.0 for MusicGen).
            two_step_cfg: run conditional and unconditional rows as separate passes.
            generator: random generator for reproducible sampling.
            callback: called as ``callback(step, total)`` after every step.
            fast: static shapes for the steps of :class:`lm.static_decoder.StaticDecoder`
                (each attends over the whole preallocated KV cache at a device position), so
                that on CUDA they are captured once into a CUDA graph and replayed; on CPU the
                same step runs uncaptured. Off: each step attends over the positions written
                so far. Same tokens either way for greedy float32 decoding and, on CPU, for
                seeded sampling (the logits differ by float rounding only). Opt-in until the
                CUDA capture has run on a GPU.

        The codes are the concatenation of what :meth:`generate_iter` yields.
        """
        return torch.cat(list(self.generate_iter(
            max_gen_len=max_gen_len, prompt=prompt, num_samples=num_samples, condition=condition,
            condition_mask=condition_mask, prefix=prefix, prefix_mask=prefix_mask, frame_input=frame_input,
            guided=guided,
            use_sampling=use_sampling, temperature=temperature, top_k=top_k, top_p=top_p, cfg_coef=cfg_coef,
            two_step_cfg=two_step_cfg, generator=generator, callback=callback, fast=fast)), dim=-1)

    @torch.inference_mode()
    def generate_iter(self, *, max_gen_len: int, prompt: torch.Tensor | None = None,
                      num_samples: int | None = None, condition: torch.Tensor | None = None,
                      condition_mask: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
                      prefix_mask: torch.Tensor | None = None, frame_input: torch.Tensor | None = None,
                      guided: bool | None = None, use_sampling: bool = SamplingConfig.use_sampling,
                      temperature: float = SamplingConfig.temperature, top_k: int = SamplingConfig.top_k,
                      top_p: float = SamplingConfig.top_p, cfg_coef: float | None = None,
                      two_step_cfg: bool | None = None, generator: torch.Generator | None = None,
                      callback: Callable[[int, int], None] | None = None,
                      fast: bool = False) -> Iterator[torch.Tensor]:
        """:meth:`generate`, yielding codes ``(B, K, n)`` of frames as soon as they are final.

        A frame is final once every codebook of it is sampled: with the delay pattern, frame
        ``t`` completes at sequence step ``t + 1 + max(delays)`` (its most delayed codebook),
        so after the first ``max(delays)`` steps each step completes one frame. The prompt's
        frames come first, before any step. The yielded pieces, in order, make up exactly
        what :meth:`generate` returns; the steps run lazily, as the iterator is consumed.
        Arguments: see :meth:`generate`.
        """
        if self.training:
            raise RuntimeError("call model.eval() before generate()")
        device = self.emb[0].weight.device
        B = batch_size(prompt, num_samples)
        guided = guidance_rows(B, guided, condition, prefix, frame_input)
        cfg_coef = self.config.cfg_coef if cfg_coef is None else cfg_coef
        check_sampling(use_sampling=use_sampling, temperature=temperature, top_k=top_k, top_p=top_p,
                       cfg_coef=cfg_coef)
        two_step = guided and (self.config.two_step_cfg if two_step_cfg is None else two_step_cfg)

        K, T0 = self.num_codebooks, 0 if prompt is None else prompt.shape[-1]
        if T0 >= max_gen_len:
            raise ValueError(f"prompt has {T0} frames; max_gen_len ({max_gen_len}) must be larger")
        pattern = self.pattern_provider.get_pattern(max_gen_len)
        codes = torch.full((B, K, max_gen_len), UNKNOWN, dtype=torch.long, device=device)
        if prompt is not None:
            if prompt.shape[:2] != (B, K):
                raise ValueError(f"expected a prompt ({B}, {K}, T0), got {tuple(prompt.shape)}")
            codes[..., :T0] = prompt
        sequence, valid = pattern.build_sequence(codes, self.special_token_id)
        start = pattern.first_step_with_timestep(T0)
        S = sequence.shape[-1]
        max_len = S + (0 if prefix is None else prefix.shape[1])
        frames = FrameTracker(pattern, T0, device)
        if T0:
            yield frames.take(sequence, T0)

        if frame_input is not None and frame_input.shape[1] < S:
            raise ValueError(f"frame_input covers {frame_input.shape[1]} sequence steps; this generation has {S}")
        streams, prefixes = self._streams(B, guided, two_step, max_len, condition, condition_mask, prefix,
                                          prefix_mask, frame_input)
        decoder = StaticDecoder(self, sequence=sequence, valid=valid, streams=streams, offset=start,
                                guidance="two_step" if two_step else ("batched" if guided else "none"),
                                cfg_coef=cfg_coef, use_sampling=use_sampling, temperature=temperature,
                                top_k=top_k, top_p=top_p, generator=generator, static_shapes=fast)
        for offset in range(start, S):
            if offset == start:
                decoder.prefill(prefixes)  # the prompt and prefix, then the first step
            else:
                decoder.step()
            if callback is not None:
                callback(1 + offset - start, S - start)
            ready = frames.ready_after(offset)
            if ready > frames.done:
                yield frames.take(sequence, ready)

    def _streams(self, B: int, guided: bool, two_step: bool, max_len: int, condition: torch.Tensor | None,
                 condition_mask: torch.Tensor | None, prefix: torch.Tensor | None,
                 prefix_mask: torch.Tensor | None, frame_input: torch.Tensor | None = None
                 ) -> tuple[list[DecodingState], list[Prefix]]:
        """The forward passes run at each step (two for two-step guidance, each on its half of
        the condition rows) and the prefix each prepends."""
        if not two_step:
            rows = 2 * B if guided else B
            state = self.init_state(rows, max_len, condition=condition, condition_mask=condition_mask,
                                    frame_input=frame_input)
            return [state], [(prefix, prefix_mask)]

        def half(x, i):
            return None if x is None else x.chunk(2)[i]

        states = [self.init_state(B, max_len, condition=half(condition, i),
                                  condition_mask=half(condition_mask, i), frame_input=half(frame_input, i))
                  for i in range(2)]
        return states, [(half(prefix, i), half(prefix_mask, i)) for i in range(2)]
