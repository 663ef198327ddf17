"""The accelerate training loop of an LM and its condition provider on a token cache.

    from lm.finetune import train
    result = train(config, build, export_to=out / "model")   # build(BuildContext) -> FinetuneTarget

The loop knows no codec and no generator format: ``build`` (:mod:`inference.finetune`, which is
``tokenwave finetune``) returns the :class:`FinetuneTarget`: the LM, condition provider and fuser
to train, and the outputs that need the whole generator (a new run's initial folder, audio
samples, the exported result). The run folder, checkpoints and resume rules are :mod:`lm.run`'s;
the loss, schedule, EMA and optimizer groups :mod:`lm.training`'s.

Each optimizer step takes ``grad_accum`` micro-batches, a pure function of the step
(:class:`lm.batches.SegmentBatches`: on CPU a resumed run is bitwise the uninterrupted one).
Condition dropout nulls the whole batch's text with probability ``cfg_dropout``, then each word
is dropped with ``word_dropout``; captions are augmented from metadata (:mod:`lm.corpus`).
Gradients are clipped; mixed precision is bf16/fp16 autocast with fp32 master weights (the text
encoder always in fp32); the EMA weights, when kept, serve validation, samples and the export. The
T5 text encoder is frozen unless ``train_text_encoder`` (then at ``lr * text_encoder_lr_scale``).
Resume restores weights, optimizer, scheduler, gradient scaler, EMA, every process's RNGs and the
step.

Every process of an ``accelerate launch`` or ``torchrun`` (DDP; README "Several processes") takes
its own ``batch_size`` samples per micro-batch; metrics and validation are reduced over processes
and the main process writes every file. Each micro-batch's loss is its own per-codebook token mean
(audiocraft's), so N processes x B equal one process x N*B when every window is full. FSDP is
refused: the EMA, checkpoints and export here need full weights on every process.
"""
from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import nn

from codec.files import read_safetensors_file, write_json_file
from codec.training.run import check_processes, load_rng, refuse_fsdp, warn_world_change
from conditioning import ClassifierFreeGuidanceDropout, ConditionProvider, T5Conditioner
from conditioning.dropout import drop_words
from conditioning.musical import musical_value

from .batches import SegmentBatches, validation_batches
from .corpus import CaptionAugmentation, plain_caption
from .lora import train_only_adapters
from .model import LMModel
from .run import (
    LOGS_DIR,
    SAMPLES_DIR,
    FinetuneConfig,
    check_checkpoint,
    check_resume,
    checkpoint_name,
    effective_warmup,
    hparams,
    read_checkpoint,
    read_run_config,
    record_steps,
    run_folder,
    save_checkpoint,
    stream_seed,
    trackers,
    write_run_file,
)
from .text_pretrain import pretrain_text_stage
from .token_cache import TokenCache, text_encoder_fingerprint
from .training import (EMA, ConditionedLM, codebook_cross_entropy, cosine_schedule, is_text_encoder, param_groups,
                       set_gradient_checkpointing, start_weights, validation_metrics)


class FinetuneTarget(Protocol):
    """What a run trains, and the outputs that need the whole generator (built by the caller)."""

    lm: LMModel
    condition_provider: ConditionProvider
    fuser: nn.Module
    mask_condition_padding: bool

    def start(self, out: Path) -> None:
        """A new run in ``out`` (main process): write what a resume will rebuild the target from."""

    def write_samples(self, folder: Path, prompts: list[str | None], seconds: float, seed: int) -> None:
        """Generate and write one clip per prompt into ``folder`` (with the weights as they are)."""

    def export(self, folder: Path, dtype: torch.dtype | None) -> None:
        """Write the trained generator to ``folder`` (``dtype``: storage type of the weights)."""


class BuildContext(NamedTuple):
    """What the builder of a :class:`FinetuneTarget` gets: the device, the token cache and its
    training items, and whether the run resumes (the builder then rebuilds the same target)."""

    device: torch.device
    cache: TokenCache
    train_indices: list[int]
    resuming: bool


class FinetuneResult(NamedTuple):
    """out: the run folder; model_dir: the exported generator (None when stopped early);
    step: optimizer steps done; metrics: the last logged and validation values (averaged over
    processes); main_process: whether this process is the one that wrote the outputs."""

    out: Path
    model_dir: Path | None
    step: int
    metrics: dict[str, float]
    main_process: bool = True


def _check_launch(accelerator) -> None:
    """Refuse FSDP, and launches whose processes would not train together."""
    refuse_fsdp(accelerator, command="finetune",
                why="see lm.finetune's docs; on CPU accelerate would silently run DDP instead")
    check_processes(accelerator, command="finetune", cpu_hint="pass --cpu to tokenwave finetune (cpu=True)")


class _Run:
    """State and steps of one training run (one per process)."""

    def __init__(self, config: FinetuneConfig, build: Callable[[BuildContext], FinetuneTarget], *,
                 resume: bool, progress: bool) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.config = config
        self.out = Path(config.out)
        self.run_folder = run_folder(self.out, config.keep_last)
        self.progress = progress
        self.cache = TokenCache(config.data)
        self.train_indices, self.valid_indices = self.cache.split(config.valid_fraction, config.seed)
        logs = self.out / LOGS_DIR
        self.accelerator = acc = Accelerator(
            cpu=config.cpu, mixed_precision=config.precision(), log_with=trackers(config, logs),
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(logs)))
        _check_launch(acc)
        self.rank, self.world = acc.process_index, acc.num_processes
        self.checkpoint = self._prepare_folder(resume)

        set_seed(config.seed)  # the same initial weights on every process
        resuming = self.checkpoint is not None
        self.target = build(BuildContext(acc.device, self.cache, self.train_indices, resuming))
        self._set_text_encoder_training()
        if acc.is_main_process and not resume:
            self.target.start(self.out)
            write_run_file(self.run_folder, config, len(self.cache))
        acc.wait_for_everyone()
        self._setup_text()
        self._setup_data()
        if config.text_pretrain_steps and self.checkpoint is None:  # else the checkpoint holds its result
            pretrain_text_stage(self.text, self.cache, self.train_indices, self.valid_indices, config, acc, progress)
        self._setup_model()
        seeds = [stream_seed(config.seed, stream, self.rank) for stream in (1, 2, 3)]
        self.cfg_dropout = ClassifierFreeGuidanceDropout(config.cfg_dropout, seed=seeds[0])
        self.word_generator = torch.Generator().manual_seed(seeds[1])
        self.cfg_dropout.train()
        set_seed(seeds[2])  # training streams differ per process
        self.step = 0
        if self.checkpoint is not None:
            self._resume_from(self.checkpoint)
        global_batch = config.batch_size * self.world * config.grad_accum
        acc.init_trackers("tokenwave-finetune", config=hparams(
            config, processes=self.world, distributed_type=acc.distributed_type.value,
            global_batch_size=global_batch))
        if self.checkpoint is not None:
            acc.log({"event_resumed_from": float(self.step)}, step=self.step)
        if progress and acc.is_main_process:
            print(f"finetune: {self.world} process(es) ({acc.distributed_type.value} on {acc.device}), "
                  f"{global_batch} windows per step ({config.batch_size} per process x {self.world} x "
                  f"{config.grad_accum} micro-batches), from step {self.step}", file=sys.stderr, flush=True)

    # -- setup -------------------------------------------------------------------------------------
    def _prepare_folder(self, resume: bool) -> Path | None:
        if resume:
            check_resume(self.config, len(self.cache))
            ema = self.config.ema
            folder, _ = self.run_folder.checkpoints.load_newest(lambda path: check_checkpoint(path, ema=ema))
            return folder
        if self.run_folder.holds_run():
            raise FileExistsError(f"{self.out} already holds a training run; pass --resume to continue it or "
                                  "choose another --out")
        self.accelerator.wait_for_everyone()  # every process has looked before the main one writes
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        return None

    def _set_text_encoder_training(self) -> None:
        """The run's ``train_text_encoder`` decides whether a T5 trains, whatever the base's spec
        says; before a new run's target is saved, so a resumed run rebuilds the same module."""
        text = self.target.condition_provider.conditioners["description"]
        if isinstance(text, T5Conditioner):
            text.set_finetune(self.config.train_text_encoder)
        elif self.config.train_text_encoder:
            raise ValueError(f"train_text_encoder needs a T5 text encoder (--t5 FOLDER, e.g. from `tokenwave "
                             f"make-text-encoder`, or a base model with one); this model's text conditioner "
                             f"is a {type(text).__name__}, which is always trained")

    def _setup_text(self) -> None:
        """Cached text states or live captions; word dropout is applied by the run for every
        conditioner kind, so a T5 conditioner's own is paused (and restored on export)."""
        self.text = self.target.condition_provider.conditioners["description"]
        self.cached_text = self.config.use_cached_text
        self.word_dropout = self.config.word_dropout
        if self.cached_text:
            self._check_cached_text()
            if self.word_dropout or self.config.merge_text_p:
                warnings.warn("cached text embeddings: caption augmentation and word dropout are off",
                              stacklevel=4)
            self.word_dropout = 0.0
        self._own_word_dropout = getattr(self.text, "word_dropout", None)
        if self._own_word_dropout is not None:
            self.text.word_dropout = 0.0

    def _check_cached_text(self) -> None:
        info = self.cache.text_encoder
        if info is None:
            raise ValueError(f"{self.cache.path} holds no text embeddings; run prepare with "
                             "--text-embeddings")
        if not isinstance(self.text, T5Conditioner) or self.text.finetune:
            raise ValueError("cached text embeddings need a frozen T5 text conditioner")
        if info.get("fingerprint") != text_encoder_fingerprint(self.text):
            raise ValueError(f"{self.cache.path}: its text embeddings come from another T5 than this model's")

    def _setup_data(self) -> None:
        config = self.config
        seconds = config.segment_seconds or self.cache.segment_seconds
        frames = max(1, round(seconds * self.cache.frame_rate))
        special = self.target.lm.special_token_id
        augmentation = CaptionAugmentation(0, 0, 0) if self.cached_text else config.augmentation()
        self.batches = SegmentBatches(self.cache, self.train_indices, segment_frames=frames,
                                      batch_size=config.batch_size, special_token=special, seed=config.seed,
                                      augmentation=augmentation, start_fraction=config.start_fraction)
        self.frame_weights = start_weights(self.batches.segment_frames, config.start_weight, config.start_weight_frames)
        self.valid_batches = validation_batches(self.cache, self.valid_indices[self.rank::self.world],
                                                segment_frames=frames, batch_size=config.batch_size,
                                                special_token=special)

    def _setup_model(self) -> None:
        """The trained module (weights from the checkpoint when resuming), EMA, optimizer, schedule."""
        config, acc, target = self.config, self.accelerator, self.target
        module = ConditionedLM(lm=target.lm, condition_provider=target.condition_provider, fuser=target.fuser,
                               mask_condition_padding=target.mask_condition_padding)
        module.requires_grad_(True)
        if config.lora is not None:  # only the adapters train (inference.finetune added them)
            train_only_adapters(module)
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
        groups = param_groups(named, lr=config.lr, weight_decay=config.weight_decay,
                              text_encoder_lr_scale=config.text_encoder_lr_scale)
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=1e-8)
        warmup = effective_warmup(config, warn=acc.is_main_process)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_schedule(warmup=warmup, total=config.steps, min_ratio=config.min_lr_ratio))
        self.optimizer = acc.prepare(optimizer)

    # -- resuming ----------------------------------------------------------------------------------
    def _load_weights(self, folder: Path) -> None:
        state = read_safetensors_file(folder / "model.safetensors")
        missing, unexpected = self.module.load_state_dict(state, strict=False)
        if not self.config.train_text_encoder:
            missing = [k for k in missing if not is_text_encoder(k)]  # a frozen T5 is not in the checkpoint
        if missing or unexpected:
            raise ValueError(f"{folder}: weights do not fit the model (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        if self.ema is not None:
            self.ema.load_state_dict(read_safetensors_file(folder / "ema.safetensors"))

    def _resume_from(self, folder: Path) -> None:
        """Optimizer, schedule, scaler, step and random streams; a larger ``steps`` extends the run."""
        state, optimizer = read_checkpoint(folder)
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        restored = load_rng(folder, self.rank, self._generators())
        warn_world_change(state.get("world"), self.world, what="the data order and random streams",
                          restored=restored)
        if self.step > self.config.steps:
            raise ValueError(f"{folder} is at step {self.step}, beyond --steps {self.config.steps}: give "
                             f"--steps above {self.step} to train on, or leave it out")
        if self.accelerator.is_main_process and read_run_config(self.out).steps != self.config.steps:
            record_steps(self.run_folder, self.config.steps)

    def _generators(self) -> dict[str, torch.Generator]:
        """The run's own random streams, kept in each checkpoint (with torch's, Python's, NumPy's)."""
        return {"cfg_dropout": self.cfg_dropout.generator, "word_dropout": self.word_generator}

    # -- training ----------------------------------------------------------------------------------
    def _inputs(self, captions: list[str | None], items: list[int], starts: list[int], *,
                train: bool = True) -> dict[str, Any]:
        """The module's inputs; ``train`` applies condition and word dropout (validation: none, no draw)."""
        names = self.target.fuser.config.sum  # tempo/key from the metadata, dropped with the caption
        metas = [self.cache.items[i].meta for i in items]
        kept = {"description": captions, **{n: [musical_value(n, m) for m in metas] for n in names}}
        kept = self.cfg_dropout(kept) if train else kept
        captions, out = kept.pop("description"), {}
        if names:
            p = self.config.tempo_key_dropout if train else 0.0
            out = {"start_frames": starts, "musical": {n: [None if p and torch.rand(1, generator=self.word_generator)
                                                            < p else v for v in kept[n]] for n in names}}
        if not self.cached_text:
            if train and self.word_dropout > 0:
                captions = drop_words(captions, self.word_dropout, self.word_generator)
            return {"captions": captions, **out}
        kept = [None if caption is None else item for caption, item in zip(captions, items)]
        hidden, mask = self.cache.padded_text_states(kept)
        return {"text_states": (hidden.to(self.accelerator.device), mask.to(self.accelerator.device)), **out}

    def train_step(self) -> dict[str, float]:
        config, acc = self.config, self.accelerator
        K = self.cache.num_codebooks
        ce_sum = torch.zeros(K, dtype=torch.float64)
        counts = torch.zeros(K, dtype=torch.float64)
        loss_total = 0.0
        for micro in range(config.grad_accum):
            batch = self.batches.batch(self.step, micro=micro, grad_accum=config.grad_accum, rank=self.rank,
                                       world=self.world)
            inputs = self._inputs(batch.captions, batch.items, batch.starts)
            codes = batch.codes.to(acc.device)
            sync = nullcontext() if micro == config.grad_accum - 1 else acc.no_sync(self.model)
            with sync:
                logits, mask = self.model(codes, **inputs)
                mask = mask & batch.frame_mask.to(acc.device)[:, None, :]
                loss, sums, count = codebook_cross_entropy(logits, codes, mask, self.frame_weights)
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

    # -- evaluation and samples --------------------------------------------------------------------
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
                inputs = self._inputs(batch.captions, batch.items, batch.starts, train=False)  # plain captions
                logits, mask = self.module(codes, **inputs)
                mask = mask & batch.frame_mask.to(acc.device)[:, None, :]
                _, sums, count = codebook_cross_entropy(logits, codes, mask)
                totals[0] += sums.to(acc.device)
                totals[1] += count.to(acc.device)
        if self.world > 1:
            totals = acc.reduce(totals, reduction="sum")
        return validation_metrics(totals.cpu())

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
        folder = self.out / SAMPLES_DIR / checkpoint_name(self.step)
        folder.mkdir(parents=True, exist_ok=True)
        prompts = self.sample_prompts()
        # In float32: the codec's decoder does not run under autocast (and samples are rare).
        with self._inference_weights():
            self.target.write_samples(folder, prompts, self.config.sample_seconds, self.config.seed)
        write_json_file(folder / "prompts.json", {"step": self.step, "prompts": prompts})
        return folder

    # -- checkpoints and export --------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_N`` (all processes take part); prune to keep_last."""
        return save_checkpoint(self.accelerator, self.run_folder, step=self.step,
                               generators=self._generators(), module=self.module, ema=self.ema,
                               optimizer=self.optimizer, scheduler=self.scheduler, config=self.config)

    def export(self, folder: Path) -> Path:
        """Write the trained generator (EMA weights when kept) to ``folder``."""
        if self.accelerator.is_main_process:
            if self._own_word_dropout is not None:
                self.text.word_dropout = self._own_word_dropout
            dtype = None if self.config.save_dtype == "float32" else getattr(torch, self.config.save_dtype)
            try:
                with self._inference_weights():
                    self.target.export(folder, dtype)
            finally:
                if self._own_word_dropout is not None:
                    self.text.word_dropout = 0.0
        self.accelerator.wait_for_everyone()
        return folder

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, export_to: Path) -> FinetuneResult:
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
        model_dir = self.export(export_to) if self.step >= config.steps else None
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


def train(config: FinetuneConfig, build: Callable[[BuildContext], FinetuneTarget], *, export_to: Path,
          resume: bool = False, progress: bool = False) -> FinetuneResult:
    """Train the target ``build`` returns as ``config`` says; ``resume`` continues ``config.out``
    from its newest intact checkpoint. A finished run exports the target to ``export_to``.

    Runs in every process of an ``accelerate launch``; returns in each. ``progress`` prints a
    line per log interval on the main process.
    """
    return _Run(config, build, resume=resume, progress=progress).run(Path(export_to))


__all__ = ["BuildContext", "FinetuneConfig", "FinetuneResult", "FinetuneTarget", "read_run_config", "train"]
