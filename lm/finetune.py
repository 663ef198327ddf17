"""Fine-tune a MusicGen LM (or train one from scratch) on a token cache, with ``accelerate``.

    from lm.finetune import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(model="musicgen-small", data="cache/", out="runs/mine"))
    MusicGen.from_pretrained(result.model_dir)

The base is any generator ``MusicGen.from_pretrained`` loads (tokenwave, transformers or
audiocraft folders, or a name): its LM config, conditioner, fuser, codec and window are
inherited, never re-specified. ``from_scratch="musicgen_small"`` (any ``lm.PRESETS`` name) builds
a fresh LM of that size instead, with the codebook count and vocabulary of the cache's codec;
the codec and text conditioner then come from ``model`` when given, else from ``codec`` (default:
the codec the cache was made with) and ``t5`` (a T5 folder; default: a lookup table over the
corpus' caption words).

The T5 text encoder is frozen (as in MusicGen) unless ``train_text_encoder`` (which decides,
whatever the base folder's conditioner spec says): it is then trained with the LM (learning rate
``lr * text_encoder_lr_scale``, same schedule), and it is in the checkpoints, the EMA and the
exported folder's ``t5/``. Meant for a small T5 built from the corpus' captions (``tokenwave
make-text-encoder``, :mod:`conditioning.t5_builder`). It always runs in float32. ``save_dtype``
bfloat16/float16 halves the exported LM and T5 weights (loaded back as float32).

Recipe (audiocraft's MusicGen solver unless said otherwise): cross-entropy per codebook on the
valid positions of the delay pattern (``LMModel.compute_predictions``), averaged over codebooks;
frames past an item's end (items shorter than the window) are padded with the special token and
masked out. Condition dropout for classifier-free guidance nulls the whole batch's text with
probability ``cfg_dropout`` (0.3), then each word is dropped with ``word_dropout`` (0.3); captions
are augmented from metadata (:mod:`lm.data`). AdamW (betas 0.9/0.95, weight decay 0.1 on matrices
only, as nanoGPT) with linear warmup and cosine decay to ``min_lr_ratio``, gradient clipping at
1.0, gradient accumulation, mixed precision (bf16/fp16 autocast with fp32 master weights; the
text encoder always runs in fp32, as T5 overflows in fp16), optional gradient checkpointing of
each transformer layer, optional EMA of the weights (audiocraft: decay 0.99 every 10 steps),
used for validation, samples and the exported model.

Output folder::

    OUT/run.json               the run's config (resume reads it)
    OUT/base/                  from-scratch runs: the initial generator (resume rebuilds from it)
    OUT/checkpoints/step_N/    model.safetensors, ema.safetensors, optimizer.pt, state.json,
                               rng_<rank>.safetensors + rng_<rank>.json (every process's RNGs)
    OUT/samples/step_N/        generated wavs and their prompts
    OUT/logs/train.jsonl       metrics (and TensorBoard event files when tensorboard is installed)
    OUT/model/                 the result: a tokenwave generator folder (from_pretrained, generate)

Checkpoints are written into ``checkpoints/.step_N.tmp``, every file fsynced, then renamed: a
crash while writing leaves the previous checkpoints intact, and resume ignores temporary
folders. Resume restores the weights, optimizer, scheduler, gradient scaler, EMA, the torch/
python/numpy RNGs and the dropout generators of every process, and the step; batches are a pure
function of the step (:class:`lm.data.SegmentBatches`), so on CPU a resumed run is bitwise the
run that was never interrupted. Hyper-parameters cannot change on resume (only the run-control
fields in :data:`RESUMABLE_FIELDS`), except ``steps``: a larger total continues the run to it
(the cosine decay then stretches to the new total from the resumed step, so the learning rate
rises again), and ``run.json`` records the new total. Resume starts from the newest intact
checkpoint: one with a missing, truncated or unreadable file is skipped with a warning naming it.
A ``warmup`` that would fill the whole run (``warmup >= steps``) is cut to ``steps // 10`` with a
warning.

Several GPUs or machines: ``accelerate launch --multi_gpu --num_processes N [--num_machines M
--machine_rank R --main_process_ip ...] -m inference finetune ...`` runs DDP. Several CPU
processes (gloo): the same command with ``--cpu`` after ``finetune``, or ``torchrun
--nproc_per_node N -m inference finetune ... --cpu``; not ``accelerate launch --cpu
--num_processes N``, which starts one process (accelerate spreads CPU processes only through
mpirun; a warning says so). Every process takes its own ``batch_size`` samples per micro-batch
(samples ``p`` of :class:`lm.data.SegmentBatches`; the global batch is ``batch_size * processes
* grad_accum``), gradients are averaged by DDP, logged metrics and validation are reduced over
the processes, and the main process writes checkpoints, logs, samples and the result. The loss
of each micro-batch is its own per-codebook token mean (audiocraft's), so N processes x B equal
one process x N*B (up to float rounding; tests/test_distributed.py) when every window is full;
with items shorter than the window, each micro-batch's tokens weigh by its own token count.
Changing the number of processes on resume changes the data order (a warning says so).

FSDP: refused. This loop keeps full weights on every process for its EMA, checkpoints
(optimizer state saved once, by the main process) and export; under FSDP those hold shards, so
they would silently save partial state. Models up to MusicGen-large (3.3B) fine-tune with DDP on
80 GB GPUs with ``--mixed-precision bf16 --grad-checkpointing`` and a small per-GPU batch.
Checked with torch 2.13 and accelerate 1.15 on CPU (gloo): accelerate keeps an FSDP plugin only
for GPU-like devices, so ``cpu=True`` runs DDP whatever the FSDP settings (refused here rather
than silently replaced); and torch's ``fully_shard`` applied per transformer layer fails in the
forward with "aten.mm.default got mixed torch.Tensor and DTensor", because ``LMModel.hidden``
projects every layer's cross-attention keys and values before running the layers, outside the
sharded layers' own forwards (sharding only the whole module runs, but keeps whole parameters
during compute). FSDP support would need that projection moved into each layer,
``accelerator.get_state_dict`` (or ``torch.distributed.checkpoint``) for weights and EMA, and
per-rank optimizer shards.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from conditioning import ClassifierFreeGuidanceDropout, ConditionProvider, LUTConditioner, T5Conditioner
from conditioning.base import Condition
from conditioning.dropout import drop_words

from .data import (
    CaptionAugmentation,
    SegmentBatches,
    TokenCache,
    caption_vocabulary,
    codec_fingerprint,
    plain_caption,
    text_encoder_fingerprint,
    validation_batches,
    write_json_atomic,
)
from .model import LMModel, get_preset
from .patterns import stereo_delays

RUN_FORMAT = "tokenwave-finetune"
RUN_VERSION = 1
RUN_FILE = "run.json"
BASE_DIR = "base"
MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
SAMPLES_DIR = "samples"
LOGS_DIR = "logs"
LOG_FILE = "train.jsonl"
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
# Fields that may differ when a run is resumed: they steer the run, not the result.
RESUMABLE_FIELDS = frozenset({"out", "data", "stop_after", "eval_every", "sample_every", "save_every", "keep_last",
                              "log_every", "sample_prompts", "sample_seconds", "log_with", "t5_path", "cpu",
                              "save_dtype", "steps"})
SAVE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class FinetuneConfig:
    """One training run; see the module docstring. Steps count optimizer updates.

    ``model``: base generator (folder or name); ``from_scratch``: an LM preset name for a fresh
    LM (``model``, if given, then only provides the codec and the text encoder);
    ``codec``/``t5``: from-scratch codec spec and T5 folder; ``t5_path``: the T5 folder an
    audiocraft base names. ``segment_seconds`` None uses the cache's. ``stop_after`` ends the
    run after that step without exporting (as if killed), for tests and time-boxed jobs.
    ``mixed_precision`` "auto" is bf16 on a GPU that supports it, else "no".
    ``train_text_encoder`` trains the T5 with the LM at ``lr * text_encoder_lr_scale``;
    ``save_dtype`` is the storage type of the exported LM and T5 weights.
    """

    data: str
    out: str
    model: str | None = None
    from_scratch: str | None = None
    codec: str | None = None
    t5: str | None = None
    t5_path: str | None = None
    train_text_encoder: bool = False
    text_encoder_lr_scale: float = 1.0
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-4
    warmup: int = 100
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"
    grad_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = 0.99
    ema_every: int = 10
    cfg_dropout: float = 0.3
    word_dropout: float = 0.3
    merge_text_p: float = 0.25
    drop_desc_p: float = 0.5
    drop_other_p: float = 0.5
    use_cached_text: bool = False
    segment_seconds: float | None = None
    valid_fraction: float = 0.05
    eval_every: int = 250
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ()
    sample_seconds: float = 5.0
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    seed: int = 0
    stop_after: int | None = None
    cpu: bool = False
    log_with: str = "auto"
    save_dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "sample_prompts", tuple(self.sample_prompts))
        if self.model is None and self.from_scratch is None:
            raise ValueError("give a base model (model=/--model) or an LM size to train from scratch "
                             "(from_scratch=/--from-scratch)")
        positive = ("steps", "batch_size", "grad_accum", "ema_every", "log_every")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, found {getattr(self, name)}")
        for name in ("warmup", "eval_every", "sample_every", "save_every", "keep_last"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, found {getattr(self, name)}")
        for name in ("cfg_dropout", "word_dropout", "min_lr_ratio", "ema_decay"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], found {getattr(self, name)}")
        if not self.lr > 0 or not self.max_grad_norm > 0:
            raise ValueError(f"lr and max_grad_norm must be positive, found {self.lr}, {self.max_grad_norm}")
        if not self.text_encoder_lr_scale > 0:
            raise ValueError(f"text_encoder_lr_scale must be positive, found {self.text_encoder_lr_scale}")
        if self.train_text_encoder and self.use_cached_text:
            raise ValueError("train_text_encoder needs the live text encoder; it cannot use cached text embeddings "
                             "(use_cached_text)")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype must be one of {SAVE_DTYPES}, found {self.save_dtype!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, found {self.mixed_precision!r}")
        if self.log_with not in ("auto", "jsonl", "tensorboard"):
            raise ValueError(f"log_with must be auto, jsonl or tensorboard, found {self.log_with!r}")
        if self.segment_seconds is not None and not self.segment_seconds > 0:
            raise ValueError(f"segment_seconds must be positive, found {self.segment_seconds}")
        if not self.sample_seconds > 0:
            raise ValueError(f"sample_seconds must be positive, found {self.sample_seconds}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be >= 1, found {self.stop_after}")
        self.augmentation()  # checks the caption probabilities

    def augmentation(self) -> CaptionAugmentation:
        return CaptionAugmentation(self.merge_text_p, self.drop_desc_p, self.drop_other_p)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown FinetuneConfig fields {sorted(unknown)}")
        return cls(**data)


class FinetuneResult(NamedTuple):
    """out: the run folder; model_dir: the exported generator (None when stopped early);
    step: optimizer steps done; metrics: the last logged and validation values (averaged over
    processes); main_process: whether this process is the one that wrote the outputs."""

    out: Path
    model_dir: Path | None
    step: int
    metrics: dict[str, float]
    main_process: bool = True


# -- the trained module --------------------------------------------------------------------------
class ConditionedLM(nn.Module):
    """The LM with its condition provider and fuser: the one module that is wrapped (DDP) and
    trained. Its state-dict keys are ``lm.*`` and ``condition_provider.*``."""

    def __init__(self, *, lm: LMModel, condition_provider: ConditionProvider, fuser: nn.Module,
                 mask_condition_padding: bool) -> None:
        super().__init__()
        self.lm = lm
        self.condition_provider = condition_provider
        self.fuser = fuser
        self.mask_condition_padding = mask_condition_padding

    def _description(self, captions: list[str | None] | None,
                     text_states: tuple[torch.Tensor, torch.Tensor] | None) -> Condition:
        if text_states is None:
            return self.condition_provider({"description": captions})["description"]
        hidden, mask = text_states  # cached T5 output: only the projection runs
        conditioner = self.condition_provider.conditioners["description"]
        projection = conditioner.output_proj
        if projection is not None:
            hidden = projection(hidden.to(projection.weight.dtype))
        return Condition(hidden * mask[..., None].to(hidden.dtype), mask)

    def forward(self, codes: torch.Tensor, *, captions: list[str | None] | None = None,
                text_states: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """codes ``(B, K, T)``, B captions (None = null) or cached T5 states ``((B, S, D), (B, S))``
        -> logits ``(B, K, T, card)`` and the valid-prediction mask ``(B, K, T)``."""
        with torch.autocast(device_type=codes.device.type, enabled=False):  # T5 overflows in fp16
            conditions = {"description": self._description(captions, text_states)}
        param = self.lm.emb[0].weight
        empty = torch.zeros(codes.shape[0], 0, self.lm.config.dim, dtype=param.dtype, device=param.device)
        fused = self.fuser(empty, conditions)
        condition = condition_mask = None
        if fused.cross is not None:
            condition = fused.cross.to(param.dtype)
            condition_mask = fused.cross_mask if self.mask_condition_padding else None
        prefix = fused.input if fused.prepend_length else None
        return self.lm.compute_predictions(codes, condition=condition, condition_mask=condition_mask, prefix=prefix)


def codebook_cross_entropy(logits: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MusicGen's loss: cross-entropy of each codebook over its valid positions, averaged over
    codebooks (codebooks with no valid position are left out of the average).

    logits ``(B, K, T, card)`` (NaN where invalid), codes ``(B, K, T)``, mask ``(B, K, T)`` bool.
    Returns the loss (scalar), and per codebook the summed cross-entropy ``(K,)`` and the number
    of positions ``(K,)`` (float64, for exact sums across batches and processes).
    """
    K = codes.shape[1]
    sums, counts, means = [], [], []
    for k in range(K):
        valid = mask[:, k]
        ce = F.cross_entropy(logits[:, k][valid].float(), codes[:, k][valid], reduction="sum")
        count = valid.sum()
        sums.append(ce.detach())
        counts.append(count)
        if count > 0:
            means.append(ce / count)
    if not means:
        raise ValueError("the batch holds no valid position to predict (windows shorter than the pattern?)")
    loss = torch.stack(means).mean()
    return loss, torch.stack(sums).double(), torch.stack(counts).double()


def cosine_schedule(*, warmup: int, total: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier of step ``i`` (0-based): linear warmup over ``warmup`` steps to 1, then cosine
    decay to ``min_ratio`` at step ``total``."""
    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = min(1.0, (i - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class EMA:
    """Exponential moving average of parameters, in float32, updated every ``every`` steps:
    ``ema = decay * ema + (1 - decay) * param`` (audiocraft's ModuleDictEMA)."""

    def __init__(self, named: dict[str, nn.Parameter], *, decay: float, every: int) -> None:
        self.params = named
        self.decay = decay
        self.every = every
        self.shadow = {name: p.detach().float().clone() for name, p in named.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after optimizer step number ``step`` (1-based)."""
        if step % self.every:
            return
        for name, param in self.params.items():
            self.shadow[name].mul_(self.decay).add_(param.detach().float(), alpha=1 - self.decay)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The parameters hold the EMA weights inside the block, their own weights after it."""
        saved = {name: p.detach().clone() for name, p in self.params.items()}
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(saved[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.cpu() for name, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ValueError(f"EMA state does not fit the model: missing {sorted(set(self.shadow) - set(state))[:5]}, "
                             f"unexpected {sorted(set(state) - set(self.shadow))[:5]}")
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)


def _is_text_encoder(name: str) -> bool:
    """Whether a ``ConditionedLM`` parameter belongs to a T5 encoder (``...conditioners.<n>.t5.*``)."""
    return ".t5." in name


def _param_groups(named: dict[str, nn.Parameter], config: FinetuneConfig) -> list[dict[str, Any]]:
    """AdamW groups: LM (and projections) then text encoder, each split into matrices (weight
    decay) and vectors (none, as nanoGPT). The text encoder's learning rate is scaled; LambdaLR
    applies the one schedule to every group's own rate."""
    groups = []
    for text, scale in ((False, 1.0), (True, config.text_encoder_lr_scale)):
        params = [p for n, p in named.items() if _is_text_encoder(n) == text]
        for decay in (True, False):
            chosen = [p for p in params if (p.dim() >= 2) == decay]
            if chosen or not text:  # the two LM groups always exist: logs read group 0's rate
                groups.append({"params": chosen, "lr": config.lr * scale,
                               "weight_decay": config.weight_decay if decay else 0.0})
    return groups


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors safetensors can write: a tensor that shares memory with an earlier one (T5's
    tied embeddings, saved under two names) is copied, so both names load back."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if identity in seen else tensor.contiguous()
        seen.add(identity)
    return out


def set_gradient_checkpointing(lm: LMModel, enabled: bool = True) -> None:
    """Recompute each transformer layer's activations in the backward pass (saves memory; costs
    about one extra forward). Parameter names are unchanged."""
    from torch.utils.checkpoint import checkpoint

    for layer in lm.transformer.layers:
        if not enabled:
            layer.__dict__.pop("forward", None)
            continue
        plain = type(layer).forward.__get__(layer)

        def checkpointed(x, *, _plain=plain, _layer=layer, **kwargs):
            if not (_layer.training and torch.is_grad_enabled()):
                return _plain(x, **kwargs)
            return checkpoint(_plain, x, use_reentrant=False, **kwargs)

        layer.forward = checkpointed


# -- building the generator ----------------------------------------------------------------------
def _load_codec(spec: str, device: torch.device):
    """A codec from a codec spec (name, path, random:<preset>) or from a generator folder."""
    from inference.pretrained import detect_format

    if os.path.isdir(spec):
        try:
            detect_format(spec)
        except Exception:  # not a generator folder: a codec folder
            pass
        else:
            from inference.generator import MusicGen

            return MusicGen.from_pretrained(spec, device=device).codec
    from inference.cli import load_codec

    return load_codec(spec, device)


def _scratch_generator(config: FinetuneConfig, cache: TokenCache, train_indices: list[int], device: torch.device):
    """A generator with a fresh LM of size ``config.from_scratch``; see the module docstring."""
    from codec.model import InterleavedStereo
    from inference.generator import GeneratorConfig, MusicGen

    base = MusicGen.from_pretrained(config.model, device=device, t5_path=config.t5_path) if config.model else None
    stereo = bool(cache.codec.get("stereo_interleaved"))
    K = cache.num_codebooks
    preset = get_preset(config.from_scratch)
    delays = tuple(stereo_delays(K // 2)) if stereo else None
    lm_config = replace(preset, num_codebooks=K, card=cache.card, delays=delays, cross_attention=True)
    lm = LMModel(lm_config).to(device)
    if base is not None:
        codec = base.codec
        text = base.condition_provider.conditioners["description"]
        if isinstance(text, T5Conditioner):
            text = T5Conditioner(encoder=text.encoder, tokenizer=text.tokenizer, output_dim=lm_config.dim,
                                 empty_is_null=text.empty_is_null, spiece_model=text.spiece_model)
        else:
            text = None
    else:
        spec = config.codec or cache.index.get("model")
        if not spec:
            raise ValueError("training from scratch needs a codec: pass --codec (the cache does not name one)")
        codec = _load_codec(spec, device)
        text = None
        if config.t5:
            text = T5Conditioner.from_pretrained(config.t5, output_dim=lm_config.dim, empty_is_null=True)
    if stereo and not isinstance(codec, InterleavedStereo):
        codec = InterleavedStereo(codec)
    if text is None:
        vocab = caption_vocabulary(cache.items[i].meta for i in train_indices)
        text = LUTConditioner(vocab=vocab or ["music"], dim=lm_config.dim, output_dim=lm_config.dim)
    window = config.segment_seconds or cache.segment_seconds
    generator_config = GeneratorConfig(max_duration=window, extend_stride=round(0.6 * window, 6))
    return MusicGen(lm=lm, codec=codec, condition_provider=ConditionProvider({"description": text.to(device)}),
                    config=generator_config)


def _check_generator(generator, cache: TokenCache) -> None:
    if generator.has_melody:
        raise ValueError("fine-tuning melody models is not supported: their chroma condition needs the audio, "
                         "which the token cache does not keep")
    lm = generator.lm.config
    if (lm.num_codebooks, lm.card) != (cache.num_codebooks, cache.card):
        raise ValueError(f"the model predicts {lm.num_codebooks} codebooks of {lm.card} codes; the cache at "
                         f"{cache.path} holds {cache.num_codebooks} of {cache.card}: prepare it with this model")
    mine = codec_fingerprint(generator.codec)
    if cache.codec.get("fingerprint") != mine:
        codec = getattr(generator.codec, "model", generator.codec)  # the mono model of interleaved stereo
        raise ValueError(f"the cache at {cache.path} was encoded with codec {cache.codec.get('name')!r} (fingerprint "
                         f"{cache.codec.get('fingerprint')}), the model's codec is {codec.name!r} (fingerprint "
                         f"{mine}); run `tokenwave prepare` with --model set to this model")


# -- checkpoints --------------------------------------------------------------------------------
def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    root = Path(out) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith("step_") and (path / "state.json").is_file():
            try:
                found.append((int(path.name[5:]), path))
            except ValueError:
                continue
    return sorted(found)


def checkpoint_problem(folder: Path, *, ema: bool) -> str | None:
    """Why ``folder`` cannot be resumed from (a missing, truncated or unreadable file, named), or
    None. Reads the JSON files, the safetensors headers (which give the data's size, so a
    truncated file shows) and the optimizer archive's directory, not the tensors."""
    import zipfile

    from codec.formats import CheckpointError, read_json_file, read_safetensors_file

    try:
        state = read_json_file(folder / "state.json", "a checkpoint state")
        if not isinstance(state.get("step"), int) or not isinstance(state.get("scheduler"), dict):
            return f"{folder / 'state.json'}: expected 'step' and 'scheduler', found keys {sorted(state)[:8]}"
        for name in ["model.safetensors", *(["ema.safetensors"] if ema else [])]:
            read_safetensors_file(folder / name, keys_only=True)
        for rng in sorted(folder.glob("rng_*.safetensors")):
            read_safetensors_file(rng, keys_only=True)
            read_json_file(rng.with_suffix(".json"), "a random-state file")
        optimizer = folder / "optimizer.pt"
        if not optimizer.is_file():
            return f"{optimizer}: missing"
        if not zipfile.is_zipfile(optimizer):
            return (f"{optimizer}: expected a torch checkpoint (a zip archive), found "
                    f"{optimizer.stat().st_size} bytes that are not one (truncated?)")
    except (CheckpointError, FileNotFoundError) as error:
        return " ".join(str(error).split())
    return None


def intact_checkpoint(out: str | os.PathLike, *, ema: bool) -> Path:
    """The newest checkpoint of a run that :func:`checkpoint_problem` finds nothing wrong with;
    each newer, damaged one is named in a warning. Raises FileNotFoundError when there is none."""
    found = list_checkpoints(out)
    if not found:
        raise FileNotFoundError(f"{out}: no complete checkpoint to resume from")
    damaged: list[str] = []
    for _, folder in reversed(found):
        problem = checkpoint_problem(folder, ema=ema)
        if problem is None:
            if damaged:
                warnings.warn(f"skipping damaged checkpoint(s): {'; '.join(damaged)}; resuming from {folder.name} "
                              f"instead", stacklevel=3)
            return folder
        damaged.append(f"{folder.name} ({problem})")
    raise FileNotFoundError(f"{out}: no intact checkpoint to resume from: {'; '.join(damaged)}; start a new run "
                            "(another --out) or restore a checkpoint")


def effective_warmup(config: FinetuneConfig, *, warn: bool = True) -> int:
    """``config.warmup``, cut to ``steps // 10`` (with a warning) when it would fill the whole run,
    whose learning rate would then never reach ``lr``."""
    if config.warmup < config.steps:
        return config.warmup
    warmup = config.steps // 10
    if warn:
        warnings.warn(f"warmup of {config.warmup} steps >= the run's {config.steps} steps: the learning rate "
                      f"would never reach {config.lr:g}; using a warmup of {warmup} steps (give --warmup below "
                      f"--steps)", stacklevel=3)
    return warmup


def _fsync_folder(folder: Path) -> None:
    """fsync every file of ``folder``, then the folder itself."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_safe_python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _json_safe_numpy_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


@dataclass
class _RNG:
    """The random streams of one process that training draws from."""

    cfg_dropout: ClassifierFreeGuidanceDropout
    word_generator: torch.Generator

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"torch_cpu": torch.get_rng_state(), "cfg_dropout": self.cfg_dropout.generator.get_state(),
               "word_dropout": self.word_generator.get_state()}
        if torch.cuda.is_available():
            for i, state in enumerate(torch.cuda.get_rng_state_all()):
                out[f"cuda_{i}"] = state
        return out

    def restore(self, tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
        torch.set_rng_state(tensors["torch_cpu"])
        self.cfg_dropout.generator.set_state(tensors["cfg_dropout"])
        self.word_generator.set_state(tensors["word_dropout"])
        cuda = [tensors[f"cuda_{i}"] for i in range(len(tensors)) if f"cuda_{i}" in tensors]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
        version, internal, gauss = data["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = data["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# -- logging ------------------------------------------------------------------------------------
def _jsonl_tracker_class():
    from accelerate.tracking import GeneralTracker

    class JSONLTracker(GeneralTracker):
        """accelerate tracker appending one JSON object per ``log`` call to ``logs/train.jsonl``."""

        name = "jsonl"
        requires_logging_directory = True
        main_process_only = True

        def __init__(self, run_name: str, logging_dir: str | os.PathLike) -> None:
            super().__init__()
            self.run_name = run_name
            self.path = Path(logging_dir) / LOG_FILE

        @property
        def tracker(self) -> Path:
            return self.path

        def _append(self, record: dict[str, Any]) -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

        def store_init_configuration(self, values: dict) -> None:
            self._append({"event": "config", "time": time.time(), **values})

        def log(self, values: dict, step: int | None = None, **kwargs) -> None:
            self._append({"step": step, "time": time.time(), **values})

    return JSONLTracker


def _trackers(config: FinetuneConfig, logs: Path) -> list:
    trackers: list = [_jsonl_tracker_class()("tokenwave-finetune", logs)]
    if config.log_with in ("auto", "tensorboard"):
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            if config.log_with == "tensorboard":
                raise ImportError("--log-with tensorboard needs the tensorboard package (pip install tensorboard)")
        else:
            trackers.append("tensorboard")
    return trackers


def _hparams(config: FinetuneConfig, **extra: Any) -> dict[str, Any]:
    """TensorBoard's hparams take scalars and strings only."""
    values = {**config.to_dict(), **extra}
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}


def _check_launch(accelerator) -> None:
    """Refuse FSDP, and launches whose processes would not train together."""
    from accelerate.utils import DistributedType

    from codec.training.launch import check_processes

    if (accelerator.distributed_type == DistributedType.FSDP
            or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
        raise ValueError("FSDP is not supported by tokenwave finetune (see lm.finetune's docs; on CPU accelerate "
                         "would silently run DDP instead); launch without --use_fsdp or an FSDP accelerate config")
    check_processes(accelerator, command="finetune", cpu_hint="pass --cpu to tokenwave finetune (cpu=True)")


# -- the run ------------------------------------------------------------------------------------
def _stream_seed(seed: int, stream: int, rank: int) -> int:
    return (seed * 1_000_003 + stream * 7_919 + rank) % (2 ** 63)


def _mixed_precision(config: FinetuneConfig) -> str:
    on_gpu = torch.cuda.is_available() and not config.cpu
    if config.mixed_precision == "auto":
        return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
    if config.mixed_precision == "fp16" and not on_gpu:
        raise ValueError("--mixed-precision fp16 needs a GPU; use no (or bf16) on CPU")
    return config.mixed_precision


def read_run_config(out: str | os.PathLike) -> FinetuneConfig:
    """The config a run folder was started with (``OUT/run.json``)."""
    from codec.formats import read_json_file

    path = Path(out) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{out}: no {RUN_FILE}; nothing to resume there")
    data = read_json_file(path, "a finetune run file")
    if data.get("format") != RUN_FORMAT:
        raise ValueError(f"{path}: expected format {RUN_FORMAT!r}, found {data.get('format')!r}")
    return FinetuneConfig.from_dict(data["config"])


def _check_resume(stored: FinetuneConfig, config: FinetuneConfig) -> None:
    a, b = stored.to_dict(), config.to_dict()
    changed = sorted(k for k in a if k not in RESUMABLE_FIELDS and a[k] != b[k])
    if changed:
        detail = ", ".join(f"{k}: {a[k]!r} -> {b[k]!r}" for k in changed[:6])
        raise ValueError(f"cannot resume {config.out} with different settings ({detail}); a resumed run must use "
                         f"the settings it started with (only {', '.join(sorted(RESUMABLE_FIELDS))} may change)")


class _Run:
    """State and steps of one training run (one per process)."""

    def __init__(self, config: FinetuneConfig, *, resume: bool, progress: bool) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.config = config
        self.out = Path(config.out)
        self.progress = progress
        self.cache = TokenCache(config.data)
        self.train_indices, self.valid_indices = self.cache.split(config.valid_fraction, config.seed)
        self.accelerator = Accelerator(
            cpu=config.cpu, mixed_precision=_mixed_precision(config), log_with=_trackers(config, self.out / LOGS_DIR),
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / LOGS_DIR)))
        acc = self.accelerator
        _check_launch(acc)
        self.rank, self.world = acc.process_index, acc.num_processes
        self.checkpoint = self._prepare_folder(resume)

        set_seed(config.seed)  # the same initial weights on every process
        self.generator = self._build_generator()
        _check_generator(self.generator, self.cache)
        self._set_text_encoder_training()
        if acc.is_main_process and not resume:
            if config.from_scratch:
                self.generator.save_pretrained(self.out / BASE_DIR, overwrite=True)
            write_json_atomic(self.out / RUN_FILE, {"format": RUN_FORMAT, "version": RUN_VERSION,
                                                    "config": config.to_dict(), "cache_items": len(self.cache)})
        acc.wait_for_everyone()
        self._setup_text()
        self._setup_data()
        self._setup_model()
        self.rng = _RNG(ClassifierFreeGuidanceDropout(config.cfg_dropout, seed=_stream_seed(config.seed, 1, self.rank)),
                        torch.Generator().manual_seed(_stream_seed(config.seed, 2, self.rank)))
        self.rng.cfg_dropout.train()
        set_seed(_stream_seed(config.seed, 3, self.rank))  # training streams differ per process
        self.step = 0
        if self.checkpoint is not None:
            self._load_state(self.checkpoint)
            if self.step > config.steps:
                raise ValueError(f"{self.checkpoint} is at step {self.step}, beyond --steps {config.steps}: give "
                                 f"--steps above {self.step} to train on, or leave it out")
            if acc.is_main_process and read_run_config(self.out).steps != config.steps:
                self._record_steps()
        global_batch = config.batch_size * self.world * config.grad_accum
        acc.init_trackers("tokenwave-finetune", config=_hparams(
            config, processes=self.world, distributed_type=acc.distributed_type.value, global_batch_size=global_batch))
        if self.checkpoint is not None:
            acc.log({"event_resumed_from": float(self.step)}, step=self.step)
        if progress and acc.is_main_process:
            print(f"finetune: {self.world} process(es) ({acc.distributed_type.value} on {acc.device}), {global_batch} "
                  f"windows per step ({config.batch_size} per process x {self.world} x {config.grad_accum} "
                  f"micro-batches), from step {self.step}", file=sys.stderr, flush=True)

    def _set_text_encoder_training(self) -> None:
        """The run's ``train_text_encoder`` decides whether a T5 trains, whatever the base's spec
        says; before the from-scratch base is saved, so a resumed run rebuilds the same module."""
        text = self.generator.condition_provider.conditioners["description"]
        if isinstance(text, T5Conditioner):
            text.set_finetune(self.config.train_text_encoder)
        elif self.config.train_text_encoder:
            raise ValueError(f"train_text_encoder needs a T5 text encoder (--t5 FOLDER, e.g. from `tokenwave "
                             f"make-text-encoder`, or a base model with one); this model's text conditioner is a "
                             f"{type(text).__name__}, which is always trained")

    def _setup_text(self) -> None:
        """Cached text states or live captions; word dropout is applied by the run for every
        conditioner kind, so a T5 conditioner's own is paused (and restored on export)."""
        self.text = self.generator.condition_provider.conditioners["description"]
        self.cached_text = self.config.use_cached_text
        self.word_dropout = self.config.word_dropout
        if self.cached_text:
            self._check_cached_text()
            if self.word_dropout or self.config.merge_text_p:
                warnings.warn("cached text embeddings: caption augmentation and word dropout are off", stacklevel=4)
            self.word_dropout = 0.0
        self._own_word_dropout = getattr(self.text, "word_dropout", None)
        if self._own_word_dropout is not None:
            self.text.word_dropout = 0.0

    def _setup_data(self) -> None:
        config = self.config
        seconds = config.segment_seconds or self.cache.segment_seconds
        self.segment_frames = max(1, round(seconds * self.cache.frame_rate))
        special = self.generator.lm.special_token_id
        augmentation = CaptionAugmentation(0, 0, 0) if self.cached_text else config.augmentation()
        self.batches = SegmentBatches(self.cache, self.train_indices, segment_frames=self.segment_frames,
                                      batch_size=config.batch_size, special_token=special, seed=config.seed,
                                      augmentation=augmentation)
        self.valid_batches = validation_batches(self.cache, self.valid_indices[self.rank::self.world],
                                                segment_frames=self.segment_frames, batch_size=config.batch_size,
                                                special_token=special)

    def _setup_model(self) -> None:
        """The trained module (weights from the checkpoint when resuming), EMA, optimizer, schedule."""
        config, acc = self.config, self.accelerator
        module = ConditionedLM(lm=self.generator.lm, condition_provider=self.generator.condition_provider,
                               fuser=self.generator.fuser,
                               mask_condition_padding=self.generator.config.mask_condition_padding)
        module.requires_grad_(True)
        module.train()
        if config.grad_checkpointing:
            set_gradient_checkpointing(module.lm)
        self.module = module
        named = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.params = list(named.values())
        self.ema = EMA(named, decay=config.ema_decay, every=config.ema_every) if config.ema else None
        if self.checkpoint is not None:
            self._load_weights(self.checkpoint)
        self.model = acc.prepare(module)
        optimizer = torch.optim.AdamW(_param_groups(named, config), lr=config.lr, betas=config.betas, eps=1e-8)
        warmup = effective_warmup(config, warn=acc.is_main_process)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_schedule(warmup=warmup, total=config.steps, min_ratio=config.min_lr_ratio))
        self.optimizer = acc.prepare(optimizer)

    # -- setup helpers -----------------------------------------------------------------------------
    def _prepare_folder(self, resume: bool) -> Path | None:
        if resume:
            _check_resume(read_run_config(self.out), self.config)
            stored = json.loads((self.out / RUN_FILE).read_text(encoding="utf-8")).get("cache_items")
            if stored != len(self.cache):
                warnings.warn(f"the run started on {stored} cached items, {self.cache.path} holds {len(self.cache)}: "
                              "the data order differs from an uninterrupted run", stacklevel=3)
            return intact_checkpoint(self.out, ema=self.config.ema)
        if (self.out / RUN_FILE).exists() or list_checkpoints(self.out):
            raise FileExistsError(f"{self.out} already holds a training run; pass --resume to continue it or choose "
                                  "another --out")
        self.accelerator.wait_for_everyone()  # every process has looked before the main one writes
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        return None

    def _record_steps(self) -> None:
        """A resumed run with a new ``steps`` total: ``run.json`` keeps it for later resumes."""
        data = json.loads((self.out / RUN_FILE).read_text(encoding="utf-8"))
        data["config"]["steps"] = self.config.steps
        write_json_atomic(self.out / RUN_FILE, data)

    def _build_generator(self):
        from inference.generator import MusicGen

        device = self.accelerator.device
        if self.config.from_scratch:
            if self.checkpoint is not None:  # the initial generator was saved when the run started
                return MusicGen.from_pretrained(self.out / BASE_DIR, device=device)
            return _scratch_generator(self.config, self.cache, self.train_indices, device)
        return MusicGen.from_pretrained(self.config.model, device=device, t5_path=self.config.t5_path)

    def _check_cached_text(self) -> None:
        info = self.cache.text_encoder
        if info is None:
            raise ValueError(f"{self.cache.path} holds no text embeddings; run prepare with --text-embeddings")
        if not isinstance(self.text, T5Conditioner) or self.text.finetune:
            raise ValueError("cached text embeddings need a frozen T5 text conditioner")
        if info.get("fingerprint") != text_encoder_fingerprint(self.text):
            raise ValueError(f"{self.cache.path}: its text embeddings come from another T5 than this model's")

    def _load_weights(self, folder: Path) -> None:
        from codec.formats import read_safetensors_file as load_file

        state = load_file(folder / "model.safetensors")
        missing, unexpected = self.module.load_state_dict(state, strict=False)
        if not self.config.train_text_encoder:
            missing = [k for k in missing if not _is_text_encoder(k)]  # a frozen T5 is not in the checkpoint
        if missing or unexpected:
            raise ValueError(f"{folder}: weights do not fit the model (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        if self.ema is not None:
            self.ema.load_state_dict(load_file(folder / "ema.safetensors"))

    def _load_state(self, folder: Path) -> None:
        from codec.formats import CheckpointError, read_json_file
        from codec.formats import read_safetensors_file as load_file

        state = read_json_file(folder / "state.json", "a checkpoint state")
        try:
            optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a damaged archive
            raise CheckpointError(f"{folder / 'optimizer.pt'}: expected the optimizer state, found a file that "
                                  f"cannot be loaded ({' '.join(str(error).split())[:200]})") from None
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        rank_file = folder / f"rng_{self.rank}.safetensors"
        if state.get("world") != self.world or not rank_file.is_file():
            warnings.warn(f"resuming with {self.world} process(es), checkpoint written by {state.get('world')}: the "
                          "data order and random streams differ from an uninterrupted run", stacklevel=3)
        if rank_file.is_file():
            data = read_json_file(folder / f"rng_{self.rank}.json", "a random-state file")
            self.rng.restore(load_file(rank_file), data)

    # -- training ----------------------------------------------------------------------------------
    def _inputs(self, captions: list[str | None], items: list[int]) -> dict[str, Any]:
        captions = self.rng.cfg_dropout({"description": captions})["description"]
        device = self.accelerator.device
        if not self.cached_text:
            if self.word_dropout > 0:
                captions = drop_words(captions, self.word_dropout, self.rng.word_generator)
            return {"captions": captions}
        states = [None if c is None else self.cache.text_states(i) for c, i in zip(captions, items)]
        width = int(self.cache.text_encoder["dim"])
        length = max([1] + [s.shape[0] for s in states if s is not None])
        hidden = torch.zeros(len(states), length, width)
        mask = torch.zeros(len(states), length, dtype=torch.long)
        for row, s in enumerate(states):
            if s is not None:
                hidden[row, :s.shape[0]] = s
                mask[row, :s.shape[0]] = 1
        return {"text_states": (hidden.to(device), mask.to(device))}

    def train_step(self) -> dict[str, float]:
        config, acc = self.config, self.accelerator
        K = self.cache.num_codebooks
        ce_sum = torch.zeros(K, dtype=torch.float64)
        counts = torch.zeros(K, dtype=torch.float64)
        loss_total = 0.0
        for micro in range(config.grad_accum):
            batch = self.batches.batch(self.step, micro=micro, grad_accum=config.grad_accum, rank=self.rank,
                                       world=self.world)
            inputs = self._inputs(batch.captions, batch.items)
            codes = batch.codes.to(acc.device)
            sync = nullcontext() if micro == config.grad_accum - 1 else acc.no_sync(self.model)
            with sync:
                logits, mask = self.model(codes, **inputs)
                mask = mask & batch.frame_mask.to(acc.device)[:, None, :]
                loss, sums, count = codebook_cross_entropy(logits, codes, mask)
                acc.backward(loss / config.grad_accum)
            loss_total += float(loss.detach()) / config.grad_accum
            ce_sum += sums.cpu()
            counts += count.cpu()
        grad_norm = acc.clip_grad_norm_(self.params, config.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.step)
        metrics = {"train/loss": loss_total, "train/lr": lr, "train/tokens": float(counts.sum()),
                   "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}
        for k in range(K):
            metrics[f"train/ce_{k}"] = float(ce_sum[k] / counts[k]) if counts[k] else float("nan")
        return metrics

    # -- evaluation and samples ----------------------------------------------------------------------
    @contextmanager
    def _inference_weights(self) -> Iterator[None]:
        """Eval mode, with the EMA weights when the run keeps them."""
        self.module.eval()
        try:
            with self.ema.swapped() if self.ema is not None else nullcontext():
                yield
        finally:
            self.module.train()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (mean over codebooks of the per-codebook mean cross-entropy) and
        perplexities, reduced over processes."""
        acc = self.accelerator
        K = self.cache.num_codebooks
        totals = torch.zeros(2, K, dtype=torch.float64, device=acc.device)
        with self._inference_weights(), acc.autocast():
            for batch in self.valid_batches:
                codes = batch.codes.to(acc.device)
                inputs = {"captions": batch.captions}
                if self.cached_text:
                    inputs = self._plain_text_states(batch.items)
                logits, mask = self.module(codes, **inputs)
                mask = mask & batch.frame_mask.to(acc.device)[:, None, :]
                _, sums, count = codebook_cross_entropy(logits, codes, mask)
                totals[0] += sums.to(acc.device)
                totals[1] += count.to(acc.device)
        if self.world > 1:
            totals = acc.reduce(totals, reduction="sum")
        totals = totals.cpu()
        if not totals[1].sum():
            return {}
        per_codebook = [float(totals[0, k] / totals[1, k]) for k in range(K) if totals[1, k]]
        out = {"valid/loss": sum(per_codebook) / len(per_codebook)}
        out["valid/ppl"] = math.exp(out["valid/loss"])
        for k, ce in enumerate(per_codebook):
            out[f"valid/ppl_{k}"] = math.exp(ce)
        return out

    def _plain_text_states(self, items: list[int]) -> dict[str, Any]:
        saved = self.rng.cfg_dropout.training
        self.rng.cfg_dropout.eval()  # no condition dropout, no random draw
        try:
            return self._inputs([plain_caption(self.cache.items[i].meta) for i in items], items)
        finally:
            self.rng.cfg_dropout.train(saved)

    def sample_prompts(self) -> list[str | None]:
        if self.config.sample_prompts:
            return list(self.config.sample_prompts)
        source = self.valid_indices or self.train_indices
        prompts = [plain_caption(self.cache.items[i].meta) for i in source[:3]]
        return [p or "" for p in prompts]

    def write_samples(self) -> Path | None:
        """Generate one clip per sample prompt with a fixed seed (main process only)."""
        if not self.accelerator.is_main_process:
            return None
        from codec import audio as audio_io

        folder = self.out / SAMPLES_DIR / checkpoint_name(self.step)
        folder.mkdir(parents=True, exist_ok=True)
        prompts = self.sample_prompts()
        # In float32: the codec's decoder does not run under autocast (and samples are rare).
        with self._inference_weights():
            out = self.generator.generate(prompts, self.config.sample_seconds, seed=self.config.seed)
        for i, wav in enumerate(out.wav):
            audio_io.write_audio(folder / f"sample_{i}.wav", wav.float().cpu(), out.sample_rate, normalize="peak")
        write_json_atomic(folder / "prompts.json", {"step": self.step, "prompts": prompts})
        return folder

    # -- checkpoints and export --------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_N`` atomically (all processes take part); prune to keep_last."""
        from safetensors.torch import save_file

        acc = self.accelerator
        root = self.out / CHECKPOINTS_DIR
        final = root / checkpoint_name(self.step)
        tmp = root / f".{final.name}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        save_file({k: v.contiguous() for k, v in self.rng.tensors().items()}, str(tmp / f"rng_{self.rank}.safetensors"))
        (tmp / f"rng_{self.rank}.json").write_text(json.dumps(
            {"python": _json_safe_python_state(), "numpy": _json_safe_numpy_state()}), encoding="utf-8")
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_file(_unshared(self.module.state_dict()), str(tmp / "model.safetensors"))
            if self.ema is not None:
                save_file(self.ema.state_dict(), str(tmp / "ema.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            (tmp / "state.json").write_text(json.dumps({
                "step": self.step, "world": self.world, "scheduler": self.scheduler.state_dict(),
                "scaler": scaler, "config": self.config.to_dict()}, indent=1), encoding="utf-8")
            from codec.formats import honour_umask

            honour_umask(tmp)  # safetensors writes 0600 files
            _fsync_folder(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_folder(root)
            if self.config.keep_last:
                for _, old in list_checkpoints(self.out)[:-self.config.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def export(self) -> Path:
        """Write the trained generator (EMA weights when kept) to ``OUT/model``."""
        target = self.out / MODEL_DIR
        if self.accelerator.is_main_process:
            if self._own_word_dropout is not None:
                self.text.word_dropout = self._own_word_dropout
            from inference.pretrained import save_generator

            dtype = None if self.config.save_dtype == "float32" else getattr(torch, self.config.save_dtype)
            try:
                with self._inference_weights():
                    save_generator(self.generator, target, overwrite=True, dtype=dtype)
            finally:
                if self._own_word_dropout is not None:
                    self.text.word_dropout = 0.0
        self.accelerator.wait_for_everyone()
        return target

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> FinetuneResult:
        config, acc = self.config, self.accelerator
        metrics: dict[str, float] = {}
        window: list[dict[str, float]] = []
        started = time.perf_counter()
        end = config.steps if config.stop_after is None else min(config.steps, config.stop_after)
        while self.step < end:
            window.append(self.train_step())
            step = self.step
            if step % config.log_every == 0 or step == end:
                metrics = self._log(window, time.perf_counter() - started)
                window, started = [], time.perf_counter()
            if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
                valid = self.evaluate()
                if valid:
                    acc.log(valid, step=step)
                    metrics.update(valid)
                    self._print(step, valid)
            if config.sample_every and step % config.sample_every == 0:
                self.write_samples()
                acc.wait_for_everyone()
            if (config.save_every and step % config.save_every == 0) or step == config.steps:
                self.save_checkpoint()
        model_dir = self.export() if self.step >= config.steps else None
        acc.end_training()
        return FinetuneResult(self.out, model_dir, self.step, metrics, acc.is_main_process)

    def _log(self, window: list[dict[str, float]], seconds: float) -> dict[str, float]:
        keys = [key for key in window[0] if key != "train/tokens"]
        means = torch.tensor([float(np.mean([m[key] for m in window])) for key in keys], dtype=torch.float64)
        tokens = torch.tensor(sum(m["train/tokens"] for m in window), dtype=torch.float64)
        if self.world > 1:  # every process's share: mean of the metrics, sum of the tokens
            device = self.accelerator.device
            means = self.accelerator.reduce(means.to(device), reduction="mean").cpu()
            tokens = self.accelerator.reduce(tokens.to(device), reduction="sum").cpu()
        values = dict(zip(keys, means.tolist()))
        values["train/tokens_per_s"] = float(tokens) / max(seconds, 1e-9)
        values["train/steps_per_s"] = len(window) / max(seconds, 1e-9)
        self.accelerator.log(values, step=self.step)
        self._print(self.step, values)
        return values

    def _print(self, step: int, values: dict[str, float]) -> None:
        if not (self.progress and self.accelerator.is_main_process):
            return
        shown = {"train/loss": "loss {:.4f}", "train/lr": "lr {:.2e}", "train/tokens_per_s": "{:.0f} tok/s",
                 "valid/loss": "valid loss {:.4f}", "valid/ppl": "valid ppl {:.2f}"}
        text = ", ".join(fmt.format(values[k]) for k, fmt in shown.items() if k in values)
        print(f"step {step}/{self.config.steps}: {text}", file=sys.stderr, flush=True)


def finetune(config: FinetuneConfig, *, resume: bool = False, progress: bool = False) -> FinetuneResult:
    """Train as ``config`` says; ``resume`` continues ``config.out`` from its last checkpoint.

    Runs in every process of an ``accelerate launch``; returns in each. ``progress`` prints a
    line per log interval on the main process.
    """
    return _Run(config, resume=resume, progress=progress).run()


__all__ = [
    "ConditionedLM", "EMA", "FinetuneConfig", "FinetuneResult", "RESUMABLE_FIELDS", "checkpoint_name",
    "checkpoint_problem", "codebook_cross_entropy", "cosine_schedule", "effective_warmup", "finetune",
    "intact_checkpoint", "list_checkpoints", "read_run_config",
    "set_gradient_checkpointing",
]
