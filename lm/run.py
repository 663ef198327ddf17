"""One fine-tuning run's settings and files: :class:`FinetuneConfig`, the run folder, its
checkpoints, the random streams they keep and the JSONL log.

Run folder::

    OUT/run.json               the run's config (resume reads it)
    OUT/checkpoints/step_N/    model.safetensors, ema.safetensors, optimizer.pt, state.json,
                               rng_<rank>.safetensors + rng_<rank>.json (every process's RNGs)
    OUT/samples/step_N/        generated wavs and their prompts
    OUT/logs/train.jsonl       metrics (and TensorBoard event files when tensorboard is installed)

(:mod:`inference.finetune` adds ``OUT/base/``, the initial generator of a from-scratch run, and
``OUT/model/``, the result.) The folder, its checkpoints, random state and log are those of
:mod:`codec.training.run`, shared with the codec trainers: checkpoints are written into
``checkpoints/.step_N.tmp``, every file fsynced, then renamed, so a crash while writing leaves
the previous checkpoints intact, and resume ignores temporary folders. Hyper-parameters cannot
change on resume (only the run-control fields in :data:`RESUMABLE_FIELDS`), except ``steps``: a
larger total continues the run to it (the cosine decay then stretches to the new total from the
resumed step, so the learning rate rises again), and ``run.json`` records the new total.
Resume starts from the newest intact checkpoint: one with a missing, truncated or unreadable
file is skipped with a warning naming it. A ``warmup`` that would fill the whole run
(``warmup >= steps``) is cut to ``steps // 10`` with a warning.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from codec.config import DictConfig
from codec.files import CheckpointError, read_json_file, read_pickle, read_safetensors_file
from codec.training.run import CheckpointFolder, RunFolder, check_rng_files, jsonl_tracker, save_rng

from .corpus import CaptionAugmentation
from .lora import DEFAULT_TARGETS, LoRAConfig
from .training import EMA, unshared

RUN_FORMAT = "tokenwave-finetune"
RUN_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
SAMPLES_DIR = "samples"
LOGS_DIR = "logs"
LOG_FILE = "train.jsonl"
STATE_FILE = "state.json"  # in every checkpoint folder: what lists it
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
# Fields that may differ when a run is resumed: they steer the run, not the result.
RESUMABLE_FIELDS = frozenset({"out", "data", "stop_after", "eval_every", "sample_every", "save_every",
                              "keep_last", "log_every", "sample_prompts", "sample_seconds", "log_with",
                              "t5_path", "cpu", "save_dtype", "steps"})
SAVE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class FinetuneConfig(DictConfig):
    """One training run; see the module docstring. Steps count optimizer updates.

    ``model``: base generator (folder or name); ``from_scratch``: an LM preset name for a fresh
    LM (``model``, if given, then only provides the codec and the text encoder);
    ``codec``/``t5``: from-scratch codec spec and T5 folder; ``t5_path``: the T5 folder an
    audiocraft base names. ``segment_seconds`` None uses the cache's. ``stop_after`` ends the
    run after that step without exporting (as if killed), for tests and time-boxed jobs.
    ``mixed_precision`` "auto" is bf16 on a GPU that supports it, else "no".
    ``train_text_encoder`` trains the T5 with the LM at ``lr * text_encoder_lr_scale``;
    ``text_pretrain_steps`` first trains the text encoder alone to tell the attributes its
    captions state (:mod:`lm.text_pretrain`), on a fresh run only.
    ``start_fraction``: share of training windows that begin at their clip's first frame;
    ``start_weight``: extra loss weight of a window's first frames (decaying over
    ``start_weight_frames``; :func:`lm.training.start_weights`), where the caption is all the LM has.
    ``tempo_key``: add the beat-clock and key conditioners (:mod:`conditioning.musical`) to a base
    that lacks them, fed from the metadata's ``bpm``/``key``; each is also dropped alone with
    probability ``tempo_key_dropout`` (so captions without them still work). ``instrument``: add the
    lead-instrument conditioner (:mod:`conditioning.instrument`; its vocabulary: the lead instruments
    of at least ``instrument_min_items`` training items), dropped alone in the same way.
    ``save_dtype`` is the storage type of the exported LM and T5 weights. ``lora``: train only
    rank-``lora`` adapters on ``lora_targets`` (scale ``lora_alpha / lora``; :mod:`lm.lora`)
    and export them alone.
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
    text_pretrain_steps: int = 0
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
    start_fraction: float = 0.0
    start_weight: float = 0.0
    start_weight_frames: float = 10.0
    tempo_key: bool = False
    tempo_key_dropout: float = 0.2
    instrument: bool = False
    instrument_min_items: int = 5
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
    lora: int | None = None
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "sample_prompts", tuple(self.sample_prompts))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.model is None and self.from_scratch is None:
            raise ValueError("give a base model (model=/--model) or an LM size to train from scratch "
                             "(from_scratch=/--from-scratch)")
        positive = ("steps", "batch_size", "grad_accum", "ema_every", "log_every")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, found {getattr(self, name)}")
        for name in ("warmup", "text_pretrain_steps", "eval_every", "sample_every", "save_every", "keep_last"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, found {getattr(self, name)}")
        for name in ("cfg_dropout", "word_dropout", "min_lr_ratio", "ema_decay", "start_fraction",
                     "tempo_key_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], found {getattr(self, name)}")
        if not self.lr > 0 or not self.max_grad_norm > 0:
            raise ValueError(f"lr and max_grad_norm must be positive, found {self.lr}, {self.max_grad_norm}")
        if not self.text_encoder_lr_scale > 0:
            raise ValueError(f"text_encoder_lr_scale must be positive, found {self.text_encoder_lr_scale}")
        if self.train_text_encoder and self.use_cached_text:
            raise ValueError("train_text_encoder needs the live text encoder; it cannot use cached text "
                             "embeddings (use_cached_text)")
        if self.text_pretrain_steps and self.use_cached_text:
            raise ValueError("text_pretrain_steps trains the text encoder: it cannot use cached text "
                             "embeddings (use_cached_text)")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype must be one of {SAVE_DTYPES}, found {self.save_dtype!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, "
                             f"found {self.mixed_precision!r}")
        if self.log_with not in ("auto", "jsonl", "tensorboard"):
            raise ValueError(f"log_with must be auto, jsonl or tensorboard, found {self.log_with!r}")
        if int(self.instrument_min_items) < 1:
            raise ValueError(f"instrument_min_items must be >= 1, found {self.instrument_min_items}")
        if (self.tempo_key or self.instrument) and self.lora is not None:
            raise ValueError("tempo_key/instrument add new conditioners, which a LoRA run would leave untrained; "
                             "train them in a full fine-tune first, then add adapters")
        if not self.start_weight >= 0 or not self.start_weight_frames > 0:
            raise ValueError(f"start_weight must be >= 0 and start_weight_frames positive, found "
                             f"{self.start_weight}, {self.start_weight_frames}")
        if self.segment_seconds is not None and not self.segment_seconds > 0:
            raise ValueError(f"segment_seconds must be positive, found {self.segment_seconds}")
        if not self.sample_seconds > 0:
            raise ValueError(f"sample_seconds must be positive, found {self.sample_seconds}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be >= 1, found {self.stop_after}")
        self.augmentation()  # checks the caption probabilities
        self.lora_config()  # checks the rank, alpha and targets

    def lora_config(self) -> LoRAConfig | None:
        """The adapters to train (None: the whole model trains)."""
        if self.lora is None:
            return None
        if self.from_scratch or self.train_text_encoder:
            raise ValueError("lora adapts a trained base model's LM: it cannot be combined with from_scratch "
                             "or train_text_encoder")
        return LoRAConfig(self.lora, self.lora_alpha, self.lora_targets)

    def precision(self) -> str:
        """accelerate's ``mixed_precision``: "auto" is bf16 on a GPU that supports it, else "no"."""
        on_gpu = torch.cuda.is_available() and not self.cpu
        if self.mixed_precision == "auto":
            return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
        if self.mixed_precision == "fp16" and not on_gpu:
            raise ValueError("--mixed-precision fp16 needs a GPU; use no (or bf16) on CPU")
        return self.mixed_precision

    def augmentation(self) -> CaptionAugmentation:
        return CaptionAugmentation(self.merge_text_p, self.drop_desc_p, self.drop_other_p)


# -- checkpoints --------------------------------------------------------------------------------
def run_folder(out: str | os.PathLike, keep_last: int = 0) -> RunFolder:
    """The run folder ``out`` (:mod:`codec.training.run`); saving keeps the newest ``keep_last``
    checkpoints (0: all)."""
    checkpoints = CheckpointFolder(Path(out) / CHECKPOINTS_DIR, marker=STATE_FILE, digits=8,
                                   keep_last=keep_last)
    return RunFolder(out, checkpoints, log=f"{LOGS_DIR}/{LOG_FILE}")


def checkpoint_name(step: int) -> str:
    """``step_NNNNNNNN``: the checkpoint (and samples) folder of ``step``."""
    return run_folder(".").checkpoints.name(step)


def list_checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the complete checkpoints of a run, oldest first."""
    return run_folder(out).checkpoints.newest_first()[::-1]


def checkpoint_problem(folder: Path, *, ema: bool) -> str | None:
    """Why ``folder`` cannot be resumed from (a missing, truncated or unreadable file, named), or
    None. Reads the JSON files, the safetensors headers (which give the data's size, so a
    truncated file shows) and the optimizer archive's directory, not the tensors."""
    import zipfile

    try:
        state = read_json_file(folder / STATE_FILE, "a checkpoint state")
        if not isinstance(state.get("step"), int) or not isinstance(state.get("scheduler"), dict):
            return f"{folder / STATE_FILE}: expected 'step' and 'scheduler', found keys {sorted(state)[:8]}"
        for name in ["model.safetensors", *(["ema.safetensors"] if ema else [])]:
            read_safetensors_file(folder / name, keys_only=True)
        check_rng_files(folder)
        optimizer = folder / "optimizer.pt"
        if not optimizer.is_file():
            return f"{optimizer}: missing"
        if not zipfile.is_zipfile(optimizer):
            return (f"{optimizer}: expected a torch checkpoint (a zip archive), found "
                    f"{optimizer.stat().st_size} bytes that are not one (truncated?)")
    except (CheckpointError, FileNotFoundError) as error:
        return " ".join(str(error).split())
    return None


def check_checkpoint(folder: Path, *, ema: bool) -> Path:
    """``folder`` when resume can use it, else :class:`CheckpointError` naming the problem:
    the loader :meth:`CheckpointFolder.load_newest` takes (it skips such checkpoints)."""
    problem = checkpoint_problem(folder, ema=ema)
    if problem is not None:
        raise CheckpointError(problem)
    return folder


def effective_warmup(config: FinetuneConfig, *, warn: bool = True) -> int:
    """``config.warmup``, cut to ``steps // 10`` (with a warning) when it would fill the whole run,
    whose learning rate would then never reach ``lr``."""
    if config.warmup < config.steps:
        return config.warmup
    warmup = config.steps // 10
    if warn:
        warnings.warn(f"warmup of {config.warmup} steps >= the run's {config.steps} steps: the learning "
                      f"rate would never reach {config.lr:g}; using a warmup of {warmup} steps (give "
                      f"--warmup below --steps)", stacklevel=3)
    return warmup


def save_checkpoint(accelerator, run: RunFolder, *, step: int, generators: dict[str, torch.Generator],
                    module: torch.nn.Module, ema: EMA | None, optimizer: torch.optim.Optimizer,
                    scheduler: Any, config: FinetuneConfig) -> Path:
    """Write ``checkpoints/step_N`` atomically (every process writes its random state with
    ``generators``, the main process the rest), then prune to ``keep_last``."""
    from safetensors.torch import save_file

    checkpoints = run.checkpoints
    if accelerator.is_main_process:
        checkpoints.begin(step)
    accelerator.wait_for_everyone()
    tmp = checkpoints.temporary(step)
    save_rng(tmp, accelerator.process_index, generators)
    accelerator.wait_for_everyone()
    final = checkpoints.root / checkpoints.name(step)
    if accelerator.is_main_process:
        save_file(unshared(module.state_dict()), str(tmp / "model.safetensors"))
        if ema is not None:
            save_file(ema.state_dict(), str(tmp / "ema.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        (tmp / STATE_FILE).write_text(json.dumps({
            "step": step, "world": accelerator.num_processes, "scheduler": scheduler.state_dict(),
            "scaler": scaler, "config": config.to_dict()}, indent=1), encoding="utf-8")
        checkpoints.commit(step, tmp)
    accelerator.wait_for_everyone()
    return final


def read_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A checkpoint's ``state.json`` and optimizer state (the random state: :func:`load_rng`)."""
    return (read_json_file(folder / STATE_FILE, "a checkpoint state"),
            read_pickle(folder / "optimizer.pt"))


# -- random streams ---------------------------------------------------------------------------------
def stream_seed(seed: int, stream: int, rank: int) -> int:
    """The seed of random stream ``stream`` of process ``rank``: each process draws its own."""
    return (seed * 1_000_003 + stream * 7_919 + rank) % (2 ** 63)


# -- logging ------------------------------------------------------------------------------------
def trackers(config: FinetuneConfig, logs: Path) -> list:
    """accelerate's ``log_with``: the JSONL log, and TensorBoard when asked for or installed."""
    found: list = [jsonl_tracker(logs / LOG_FILE, RUN_FORMAT)]
    if config.log_with in ("auto", "tensorboard"):
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            if config.log_with == "tensorboard":
                raise ImportError("--log-with tensorboard needs the tensorboard package "
                                  "(pip install tensorboard)") from None
        else:
            found.append("tensorboard")
    return found


def hparams(config: FinetuneConfig, **extra: Any) -> dict[str, Any]:
    """TensorBoard's hparams take scalars and strings only."""
    values = {**config.to_dict(), **extra}
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}


# -- run.json -------------------------------------------------------------------------------------
def write_run_file(run: RunFolder, config: FinetuneConfig, cache_items: int) -> None:
    """``OUT/run.json`` of a new run."""
    run.write_run_file({"format": RUN_FORMAT, "version": RUN_VERSION, "config": config.to_dict(),
                        "cache_items": cache_items})


def read_run_config(out: str | os.PathLike) -> FinetuneConfig:
    """The config a run folder was started with (``OUT/run.json``)."""
    return FinetuneConfig.from_dict(run_folder(out).read_run_file(RUN_FORMAT)["config"])


def check_resume(config: FinetuneConfig, cache_items: int) -> None:
    """Refuse to resume ``config.out`` with other hyper-parameters; warn when the cache changed."""
    stored = run_folder(config.out).read_run_file(RUN_FORMAT)
    a, b = FinetuneConfig.from_dict(stored["config"]).to_dict(), config.to_dict()
    changed = sorted(k for k in a if k not in RESUMABLE_FIELDS and a[k] != b[k])
    if changed:
        detail = ", ".join(f"{k}: {a[k]!r} -> {b[k]!r}" for k in changed[:6])
        raise ValueError(f"cannot resume {config.out} with different settings ({detail}); a resumed run must "
                         f"use the settings it started with (only {', '.join(sorted(RESUMABLE_FIELDS))} may "
                         "change)")
    if stored.get("cache_items") != cache_items:
        warnings.warn(f"the run started on {stored.get('cache_items')} cached items, {config.data} holds "
                      f"{cache_items}: the data order differs from an uninterrupted run", stacklevel=4)


def record_steps(run: RunFolder, steps: int) -> None:
    """A resumed run with a new ``steps`` total: ``run.json`` keeps it for later resumes."""
    data = run.read_run_file(RUN_FORMAT)
    data["config"]["steps"] = steps
    run.write_run_file(data)


__all__ = [
    "RESUMABLE_FIELDS", "FinetuneConfig", "check_checkpoint", "check_resume", "checkpoint_name",
    "checkpoint_problem", "effective_warmup", "hparams", "list_checkpoints", "read_checkpoint",
    "read_run_config", "record_steps", "run_folder", "save_checkpoint", "stream_seed", "trackers",
    "write_run_file",
]
