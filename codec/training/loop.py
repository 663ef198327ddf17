"""The step loop both codec trainers share (:class:`TrainingLoop`), its config and checkpoints.

A trainer (:class:`~codec.training.trainer.CodecTrainer`,
:class:`~codec.training.entropy_trainer.EntropyLMTrainer`) defines one step, validation, its
state and its export; the loop logs, validates and checkpoints on schedule. It writes, under
``out_dir`` (a :class:`~codec.training.run.RunFolder`): ``<checkpoint_dir>/step_NNNNNNNNN/
state.pt`` (everything needed to resume: weights, optimizers, step, number of processes; written
atomically, the last ``keep_last`` kept) and a JSON-lines log ``<log_name>``.

Resume is exact: all randomness of step ``s`` comes from generators seeded with ``(seed, s)``
(:func:`~codec.training.run.mix_seed`) and clips from ``(seed, clip index)``, so a run stopped
after any checkpoint and resumed reaches the same parameters as one that never stopped (on the
same device and threads). Resuming without a path starts from the newest intact checkpoint,
skipping damaged ones with a warning.

Several processes (``accelerate launch --multi_gpu --num_processes N -m inference train-codec
...``; add ``--cpu`` for CPU processes): each takes its own clips (``batch_size`` per process),
logged losses are averaged over processes, and only the main process writes checkpoints, logs and
the result. Resuming with another number of processes warns that the clips differ.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..files import read_pickle
from ..model import EncodecModel
from .data import RandomClips, StepBatchSampler
from .run import CheckpointFolder, RunFolder, check_processes, mix_seed, warn_world_change

CHECKPOINT_FORMAT = "tokenwave-training-state"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class LoopConfig:
    """What every training run has: length, batches, optimizer, logging and checkpoints."""

    steps: int = 100_000
    batch_size: int = 8
    segment_seconds: float = 1.0
    lr: float = 3e-4
    betas: tuple[float, float] = (0.5, 0.9)
    seed: int = 0
    log_every: int = 50
    valid_every: int = 1000
    valid_clips: int = 16
    checkpoint_every: int = 1000
    keep_last: int = 3
    num_workers: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        for name in ("steps", "batch_size", "log_every", "valid_every", "checkpoint_every",
                     "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.segment_seconds > 0 or not self.lr > 0:
            raise ValueError(f"segment_seconds and lr must be positive, got "
                             f"{self.segment_seconds} and {self.lr}")
        if self.valid_clips < 0 or self.num_workers < 0:
            raise ValueError("valid_clips and num_workers must be >= 0")


class CheckpointManager(CheckpointFolder):
    """``folder/step_NNNNNNNNN/state.pt``, written atomically, the last ``keep_last`` kept."""

    STATE = "state.pt"

    def __init__(self, folder: str | Path, keep_last: int = 3) -> None:
        super().__init__(folder, marker=self.STATE, digits=9, keep_last=keep_last)

    @property
    def folder(self) -> Path:
        return self.root

    def all(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return [path for _, path in reversed(self.newest_first())]

    def latest(self) -> Path | None:
        found = self.newest_first()
        return found[0][1] if found else None

    def save(self, step: int, state: dict) -> Path:
        def write(folder: Path) -> None:
            with open(folder / self.STATE, "wb") as handle:
                torch.save(state, handle)

        return self.write(step, write)

    @classmethod
    def load(cls, path: str | Path, kind: str) -> dict:
        """Read a checkpoint folder (or its state file) and check it is a ``kind`` state; an
        unreadable (truncated, corrupt) file raises :class:`~codec.files.CheckpointError`."""
        path = Path(path)
        file = path / cls.STATE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no training checkpoint at {str(path)!r} (expected "
                                    f"{cls.STATE} in a step_* folder)")
        state = read_pickle(file)  # CheckpointError (naming the file) when damaged
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{file}: not a tokenwave training checkpoint")
        if state.get("kind") != kind:
            raise ValueError(f"{file}: a {state.get('kind')!r} checkpoint, expected {kind!r}")
        return state

    def load_latest(self, kind: str) -> tuple[Path, dict]:
        """The newest intact ``kind`` checkpoint and its state (damaged newer ones skipped with
        a warning); FileNotFoundError when there is none."""
        return self.load_newest(lambda folder: self.load(folder, kind))


def codebook_choices(model: EncodecModel) -> list[int]:
    """Codebook counts of the model's target bandwidths (the paper samples among these);
    when none fits the model (a tiny test config), 1, 2, 4, ... and the maximum."""
    found = set()
    for bandwidth in model.config.target_bandwidths:
        try:
            found.add(model.num_codebooks_for_bandwidth(bandwidth))
        except ValueError:
            continue
    if not found:
        found = {2 ** i for i in range(int(math.log2(model.num_codebooks)) + 1)}
        found.add(model.num_codebooks)
    return sorted(found)


class TrainingLoop:
    """Step loop, logging, validation and checkpoint schedule; subclasses define a step."""

    kind = ""
    log_name = "train_log.jsonl"
    checkpoint_dir = "checkpoints"

    def __init__(self, out_dir: str | Path, config: LoopConfig, accelerator) -> None:
        check_processes(accelerator, command="train-codec", cpu_hint="pass cpu=True (--cpu)")
        self.out_dir = Path(out_dir)
        self.config = config
        self.accelerator = accelerator
        self.step = 0
        self.checkpoints = CheckpointManager(self.out_dir / self.checkpoint_dir, config.keep_last)
        self.run_folder = RunFolder(self.out_dir, self.checkpoints, log=self.log_name)
        self.history: list[dict] = []
        self.echo = True  # print each log record on stderr

    # subclasses
    def train_step(self, batch: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def export(self) -> Path:
        raise NotImplementedError

    # shared
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _step_generators(self) -> torch.Generator:
        """Seed this step's randomness; returns the generator shared by all processes (for
        decisions every process must make alike)."""
        rank = self.accelerator.process_index
        torch.manual_seed(mix_seed(self.config.seed, self.step, rank + 1))
        return torch.Generator().manual_seed(mix_seed(self.config.seed, self.step, 0))

    def save_checkpoint(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        path = None
        if self.is_main:
            state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                     "kind": self.kind, "step": self.step,
                     "world": self.accelerator.num_processes, **self.state_dict()}
            path = self.checkpoints.save(self.step, state)
            self.export()
        self.accelerator.wait_for_everyone()
        return path

    def resume(self, path: str | Path | None = None) -> Path:
        """Load ``path`` (default: the newest intact checkpoint under ``out_dir``)."""
        if path is None:
            path, state = self.checkpoints.load_latest(self.kind)
        else:
            state = CheckpointManager.load(path, self.kind)
        self.load_state_dict(state)
        self.step = int(state["step"])
        warn_world_change(state.get("world", 1), self.accelerator.num_processes,
                          what="the clips of each step")
        return Path(path)

    def _loader(self, data: RandomClips) -> DataLoader:
        sampler = StepBatchSampler(batch_size=self.config.batch_size, start_step=self.step,
                                   rank=self.accelerator.process_index,
                                   world_size=self.accelerator.num_processes)
        return DataLoader(data, batch_sampler=sampler, num_workers=self.config.num_workers,
                          pin_memory=self.accelerator.device.type == "cuda")

    def _averaged(self, sums: dict[str, float], count: int) -> dict[str, float]:
        """Means over this process's steps since the last log, averaged over processes (every
        process has the same keys: the step's random decisions are shared)."""
        names = sorted(sums)
        values = torch.tensor([sums[name] / count for name in names], dtype=torch.float64)
        if self.accelerator.num_processes > 1:
            device = self.accelerator.device
            values = self.accelerator.reduce(values.to(device), reduction="mean").cpu()
        return dict(zip(names, values.tolist()))

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if not self.is_main:
            return
        self.run_folder.log.append(record)
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=self.step)
        if not self.echo:
            return
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in record.items())
        print(f"[{self.kind}] {text}", file=sys.stderr, flush=True)

    def fit(self, data: RandomClips, *, on_step: Callable[[int], None] | None = None
            ) -> dict[str, float]:
        """Train up to ``config.steps``; returns the last validation metrics (if any)."""
        config = self.config
        last_valid: dict[str, float] = {}
        if self.step >= config.steps:  # nothing left to train: the model is still written (the CLI says so)
            if self.is_main:
                self.export()
            return last_valid
        batches = iter(self._loader(data))
        processes = self.accelerator.num_processes
        self._log({"step": self.step, "event": "start", "processes": processes,
                   "batch_per_process": config.batch_size})
        sums: dict[str, float] = {}
        count, clock = 0, time.perf_counter()
        while self.step < config.steps:
            batch = next(batches).to(self.accelerator.device, non_blocking=True)
            metrics = self.train_step(batch)
            self.step += 1
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
            count += 1
            if on_step is not None:
                on_step(self.step)
            if self.step % config.log_every == 0 or self.step == config.steps:
                elapsed = time.perf_counter() - clock
                self._log({"step": self.step, **self._averaged(sums, count),
                           "steps_per_s": count / elapsed,
                           "audio_s_per_s": count * config.batch_size * config.segment_seconds
                           * processes / elapsed})
                sums, count, clock = {}, 0, time.perf_counter()
            if config.valid_clips and (self.step % config.valid_every == 0
                                       or self.step == config.steps):
                last_valid = self.validate()
                self._log({"step": self.step, **last_valid})
            if self.step % config.checkpoint_every == 0 or self.step == config.steps:
                self.save_checkpoint()
        return last_valid
