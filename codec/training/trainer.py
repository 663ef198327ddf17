"""Codec training (the EnCodec recipe) and entropy-coding LM training, with accelerate.

:class:`CodecTrainer` trains an :class:`~codec.model.EncodecModel` on random clips:

- the generator loss is the balanced sum (:class:`~codec.training.balancer.Balancer`) of the
  time L1, multi-scale mel, hinge adversarial and feature-matching losses, plus the quantizer's
  commitment loss outside the balance (weight 1, as the paper);
- default weights are the paper's (``"paper"``: l1 0.1, mel 1, adversarial 3, feature 3);
  ``"audiocraft"`` gives audiocraft's (0.1, 2, 4, 4). With the balancer only their ratios count;
- the MS-STFT discriminator is updated with probability ``disc_update_prob`` (2/3, the paper's
  24 kHz setting) per step, on the same batch, before the generator;
- quantizer dropout: each step uses the codebooks of one of the model's target bandwidths,
  drawn uniformly (the paper's bitrate sampling), so one model serves every bitrate;
- Adam, lr 3e-4, betas (0.5, 0.9), for both networks; no schedule.

:class:`EntropyLMTrainer` trains the ``.ecdc`` entropy-coding prior
(:class:`~codec.entropy.EntropyLM`, the released architecture) on the codes of a frozen codec:
cross-entropy of every codebook of frame t given frames before it, with the number of
codebooks drawn per step like the codec's so one LM serves every bitrate.

Both write, under ``out_dir``: ``checkpoints/step_NNNNNNNNN/state.pt`` (everything needed to
resume: weights, optimizers, balancer averages, grad scaler, step), written to a temporary
folder and renamed so that a crash leaves the previous checkpoint intact, the last
``keep_last`` kept; a JSON-lines log; and the result: the codec as a tokenwave model folder
``out_dir/<name>/`` (:func:`codec.formats.load_model` reads it) or the LM as
``out_dir/<lm name>.th`` (a state dict, which :func:`codec.ecdc.load_entropy_lm` finds with
``models_dir=out_dir``).

Resume is exact: all randomness of step ``s`` (quantizer dropout, the discriminator's coin,
k-means initialization, dead-code replacement) comes from generators seeded with
``(seed, s)``, and clips from ``(seed, clip index)``; so a run stopped after any checkpoint and
resumed reaches the same parameters as one that never stopped (on the same device and
threads; checked on CPU in the tests).

Several processes: ``accelerate launch --multi_gpu --num_processes N -m inference train-codec
...`` (add ``--cpu`` for CPU processes, gloo; or ``torchrun --nproc_per_node N``). Each process
takes its own clips (``batch_size`` per process), gradients are averaged by DDP, the balancer
averages its gradient norms over processes, and logged losses are averaged over processes.
The quantizer's EMA codebooks learn from every process's latents (counts and sums all-reduced,
k-means and dead-code draws made by process 0 over the gathered latents; see
:mod:`codec.quantization`): given the latents, they are those one process would learn from
the whole batch. The balanced gradient is normalised per item and summed over each process's
clips, as in audiocraft, so the per-process batch (not the global one) sets its size relative
to the commitment loss's. Only the main process writes checkpoints, logs and the model;
checkpoints record the number of processes, and resuming with another number warns that the
clips differ.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ..formats import honour_umask
from ..model import EncodecModel
from ..quantization import EuclideanCodebook
from .balancer import Balancer
from .data import RandomClips, StepBatchSampler
from .launch import check_processes
from .discriminator import DEFAULT_WINDOWS, MultiScaleSTFTDiscriminator
from .losses import (MelDistance, MultiScaleMelLoss, feature_matching_loss,
                     hinge_discriminator_loss, hinge_generator_loss, l1_time_loss, si_snr)

LOSS_WEIGHTS: dict[str, dict[str, float]] = {
    "paper": {"l1": 0.1, "mel": 1.0, "adv": 3.0, "feat": 3.0},
    "audiocraft": {"l1": 0.1, "mel": 2.0, "adv": 4.0, "feat": 4.0},
    # No discriminator: about twice as fast per step; a cheap warm start (or a whole run on
    # CPU) whose audio is smoother than the adversarial recipe's.
    "reconstruction": {"l1": 0.1, "mel": 1.0},
}
CHECKPOINT_FORMAT = "tokenwave-training-state"
CHECKPOINT_VERSION = 1
_MIX = 0x9E3779B97F4A7C15


def _seed(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * _MIX + part + 1) % (1 << 63)
    return value


# -- configs -----------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class CodecTrainConfig(LoopConfig):
    """The EnCodec recipe; defaults are the paper's 24 kHz settings (batch per process)."""

    loss_weights: str | Mapping[str, float] = "paper"
    commitment_weight: float = 1.0
    balance: bool = True
    balancer_ema: float = 0.999
    disc_update_prob: float = 2 / 3
    disc_filters: int = 32
    disc_windows: tuple[int, ...] = DEFAULT_WINDOWS
    mel_scales: tuple[int, ...] = tuple(range(5, 12))
    quantizer_dropout: bool = True
    # EMA usage under which a code is re-seeded from the batch. The references' 2.0 assumes
    # ~5 latents per code per step (64 x 1 s at 75 Hz, 1024 codes); with fewer, most codes sit
    # under it every step and are re-seeded forever, and the codebooks collapse. None = "auto":
    # 2.0 scaled down by the latents a step actually gives each code (at most 2.0).
    dead_code_threshold: float | None = None
    visqol_clips: int = 4  # validation clips scored by ViSQOL when visqol-python is installed

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("disc_windows", "mel_scales"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self.weights()  # validates
        if not 0 <= self.disc_update_prob <= 1:
            raise ValueError(f"disc_update_prob must be in [0, 1], got {self.disc_update_prob}")

    def weights(self) -> dict[str, float]:
        """The balanced losses' weights, zero weights left out."""
        if isinstance(self.loss_weights, str):
            if self.loss_weights not in LOSS_WEIGHTS:
                raise ValueError(f"unknown loss_weights {self.loss_weights!r}; expected one of "
                                 f"{sorted(LOSS_WEIGHTS)} or a mapping")
            weights = LOSS_WEIGHTS[self.loss_weights]
        else:
            weights = dict(self.loss_weights)
        unknown = set(weights) - set(LOSS_WEIGHTS["paper"])
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}; expected l1, mel, adv, feat")
        weights = {k: float(v) for k, v in weights.items() if v}
        if not weights:
            raise ValueError("all loss weights are zero")
        return weights

    @property
    def adversarial(self) -> bool:
        return bool({"adv", "feat"} & set(self.weights()))


@dataclass(frozen=True)
class EntropyLMTrainConfig(LoopConfig):
    """Entropy-LM training: longer clips than the codec's (the LM sees 3.5 s of context)."""

    steps: int = 20_000
    batch_size: int = 16
    segment_seconds: float = 5.0
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    codebook_dropout: bool = True


# -- checkpoints -------------------------------------------------------------------------------
class CheckpointManager:
    """``folder/step_NNNNNNNNN/state.pt``, written atomically, the last ``keep_last`` kept."""

    STATE = "state.pt"

    def __init__(self, folder: str | Path, keep_last: int = 3) -> None:
        self.folder = Path(folder)
        self.keep_last = keep_last

    def all(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.glob("step_*")
                      if p.is_dir() and (p / self.STATE).is_file())

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, step: int, state: dict) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"step_{step:09d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=self.folder))
        try:
            with open(tmp / self.STATE, "wb") as handle:
                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            honour_umask(tmp)  # mkdtemp makes it 0700: give it a plain mkdir's mode
            if final.exists():  # the same step saved again (a resumed run): swap it
                old = final.with_name(final.name + ".old")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for stale in self.folder.glob(".step_*.tmp"):  # left by a crash mid-write
            shutil.rmtree(stale, ignore_errors=True)
        for old in self.all()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @classmethod
    def load(cls, path: str | Path, kind: str) -> dict:
        """Read a checkpoint folder (or its state file) and check it is a ``kind`` state."""
        path = Path(path)
        file = path / cls.STATE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no training checkpoint at {str(path)!r} (expected "
                                    f"{cls.STATE} in a step_* folder)")
        state = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{file}: not a tokenwave training checkpoint")
        if state.get("kind") != kind:
            raise ValueError(f"{file}: a {state.get('kind')!r} checkpoint, expected {kind!r}")
        return state


# -- the training forward ----------------------------------------------------------------------
class CodecTrainingModule(nn.Module):
    """``(B, C, T)`` audio -> decoded ``(B, C, T)`` and the commitment loss, with gradients.

    The quantizer runs in float32 outside autocast: half-precision distances would pick
    different codes and the EMA codebook updates would lose precision.
    """

    def __init__(self, model: EncodecModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, wav: torch.Tensor, num_codebooks: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        scale = None
        if model.normalize:  # as EncodecModel.encode: unit RMS per item, restored after
            scale = 1e-8 + wav.mean(dim=1, keepdim=True).pow(2).mean(dim=2, keepdim=True).sqrt()
            wav = wav / scale
        latent = model.encoder(wav)
        with torch.autocast(device_type=wav.device.type, enabled=False):
            quantized = model.quantizer(latent.float(), num_codebooks)
        out = model.decoder(quantized.quantized.to(latent.dtype))[..., : wav.shape[-1]]
        if scale is not None:
            out = out * scale
        return out, quantized.penalty


def set_dead_code_threshold(model: EncodecModel, threshold: float | None, *,
                            latents_per_step: int) -> float:
    """Set every codebook's dead-code threshold; ``None`` scales the references' 2.0 by the
    latents each code gets per step (``latents_per_step / codebook_size``) relative to the
    paper's ~4.7, never above 2.0. Returns the threshold used."""
    if threshold is None:
        share = latents_per_step / model.config.codebook_size
        threshold = min(2.0, 2.0 * share / 4.7)
    if threshold < 0:
        raise ValueError(f"dead_code_threshold must be >= 0, got {threshold}")
    for module in model.modules():
        if isinstance(module, EuclideanCodebook):
            module.threshold_ema_dead_code = float(threshold)
    return float(threshold)


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


def visqol_score(reference: torch.Tensor, degraded: torch.Tensor, sample_rate: int
                 ) -> float | None:
    """ViSQOL MOS-LQO (audio mode, 48 kHz mono) of ``(C, T)`` clips, or None when the optional
    ``visqol-python`` package is not installed or the clip is under the 1 s it needs."""
    if reference.shape[-1] < sample_rate:
        return None
    try:
        from visqol import VisqolApi
    except ImportError:
        return None
    from .. import audio

    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for name, wav in (("reference.wav", reference), ("degraded.wav", degraded)):
            path = Path(folder) / name
            audio.write_audio(path, audio.convert_audio(wav.float().cpu(), sample_rate, 48_000, 1),
                              48_000, subtype="FLOAT")
            paths.append(str(path))
        api = VisqolApi()
        api.create(mode="audio")
        return float(api.measure(*paths).moslqo)


# -- the loop both trainers share ----------------------------------------------------------------
class _TrainingLoop:
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
        torch.manual_seed(_seed(self.config.seed, self.step, rank + 1))
        return torch.Generator().manual_seed(_seed(self.config.seed, self.step, 0))

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
        """Load ``path`` (default: the latest checkpoint under ``out_dir``)."""
        path = path or self.checkpoints.latest()
        if path is None:
            raise FileNotFoundError(f"nothing to resume: no checkpoint in {self.checkpoints.folder}")
        state = CheckpointManager.load(path, self.kind)
        self.load_state_dict(state)
        self.step = int(state["step"])
        world = state.get("world", 1)
        if world != self.accelerator.num_processes:
            warnings.warn(f"resuming with {self.accelerator.num_processes} process(es), checkpoint "
                          f"written by {world}: the clips of each step differ from an "
                          f"uninterrupted run", stacklevel=2)
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
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / self.log_name, "a") as handle:
            handle.write(json.dumps(record) + "\n")
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
        if self.step >= config.steps:
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


# -- codec -------------------------------------------------------------------------------------
class CodecTrainer(_TrainingLoop):
    """Trains ``model`` (in place) with the EnCodec recipe; see the module docstring.

    Args:
        model: the codec to train, its weight norm not folded; its config's ``name`` names
            the exported folder ``out_dir/<name>``.
        out_dir: where checkpoints, the log and the exported model go.
        config: the recipe.
        valid_data: clips for validation (SI-SNR, mel distance, ViSQOL when installed), at
            every codebook count of :func:`codebook_choices`; the first ``valid_clips``.
        accelerator: an ``accelerate.Accelerator`` (default: a new one).
    """

    kind = "codec"

    def __init__(self, model: EncodecModel, out_dir: str | Path,
                 config: CodecTrainConfig = CodecTrainConfig(), *,
                 valid_data: RandomClips | None = None, accelerator=None) -> None:
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator()
        super().__init__(out_dir, config, accelerator)
        if model.inference_runner is not None:
            raise ValueError("this model was prepared for inference (weight norm folded, frozen); "
                             "load it with codec.formats.load_model(..., inference=False)")
        self.config: CodecTrainConfig = config
        self.model = model.train()
        self.segment_samples = round(config.segment_seconds * model.sample_rate)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(config.seed, 1 << 40))
            discriminator = MultiScaleSTFTDiscriminator(
                filters=config.disc_filters, in_channels=model.channels,
                n_ffts=config.disc_windows)
        if config.adversarial and self.segment_samples < discriminator.min_length:
            raise ValueError(f"clips of {self.segment_samples} samples are shorter than the "
                             f"discriminator's largest window ({discriminator.min_length}); use "
                             f"longer clips or smaller disc_windows")
        self.balancer = Balancer(config.weights(), balance_grads=config.balance,
                                 ema_decay=config.balancer_ema)
        device = accelerator.device
        self.mel_loss = MultiScaleMelLoss(sample_rate=model.sample_rate,
                                          scales=config.mel_scales).to(device)
        self.mel_distance = MelDistance(model.sample_rate).to(device)
        self.choices = codebook_choices(model)
        self.dead_code_threshold = set_dead_code_threshold(
            model, config.dead_code_threshold,
            latents_per_step=config.batch_size * accelerator.num_processes
            * math.ceil(self.segment_samples / model.config.hop_length))
        gen_opt = torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.betas)
        disc_opt = torch.optim.Adam(discriminator.parameters(), lr=config.lr, betas=config.betas)
        self.generator, self.discriminator, self.gen_opt, self.disc_opt = accelerator.prepare(
            CodecTrainingModule(model), discriminator, gen_opt, disc_opt)
        self.valid_batch = self._valid_batch(valid_data)

    def _valid_batch(self, data: RandomClips | None) -> torch.Tensor | None:
        if data is None or not self.config.valid_clips:
            return None
        return torch.stack([data[i] for i in range(self.config.valid_clips)])

    @property
    def plain_discriminator(self) -> MultiScaleSTFTDiscriminator:
        return self.accelerator.unwrap_model(self.discriminator)

    def train_step(self, wav: torch.Tensor) -> dict[str, float]:
        """One discriminator (with probability ``disc_update_prob``) and generator update on
        a batch ``(B, C, T)``; returns the losses as floats."""
        config, accelerator = self.config, self.accelerator
        shared = self._step_generators()
        num_codebooks = self.model.num_codebooks
        if config.quantizer_dropout:
            num_codebooks = self.choices[int(torch.randint(len(self.choices), (1,),
                                                           generator=shared))]
        update_disc = config.adversarial and float(torch.rand(1, generator=shared)) < \
            config.disc_update_prob
        metrics = {"codebooks": float(num_codebooks)}
        with accelerator.autocast():
            decoded, penalty = self.generator(wav, num_codebooks)
        decoded = decoded.float()

        if update_disc:  # real and decoded in one forward: one backward for DDP
            with accelerator.autocast():
                logits, _ = self.discriminator(torch.cat([wav, decoded.detach()]))
            batch = wav.shape[0]
            disc_loss = hinge_discriminator_loss([x[:batch] for x in logits],
                                                 [x[batch:] for x in logits])
            self.disc_opt.zero_grad(set_to_none=True)
            accelerator.backward(disc_loss)
            self.disc_opt.step()
            metrics["disc"] = disc_loss.item()

        losses = self._generator_losses(decoded, wav)
        grad, effective = self.balancer.output_gradient(losses, decoded)
        # One backward of a surrogate whose gradient is the balanced one plus the commitment
        # loss's: works with DDP (one backward per forward) and fp16 loss scaling.
        surrogate = (decoded * grad).sum() + config.commitment_weight * penalty
        self.gen_opt.zero_grad(set_to_none=True)
        accelerator.backward(surrogate)
        self.gen_opt.step()
        metrics.update({name: loss.item() for name, loss in losses.items()})
        metrics.update(commitment=penalty.item(), balanced=effective.item())
        return metrics

    def _generator_losses(self, decoded: torch.Tensor, wav: torch.Tensor
                          ) -> dict[str, torch.Tensor]:
        weights = self.balancer.weights
        losses = {}
        if "l1" in weights:
            losses["l1"] = l1_time_loss(decoded, wav)
        if "mel" in weights:
            losses["mel"] = self.mel_loss(decoded, wav)
        if self.config.adversarial:
            # The plain module: only the output's gradient is taken here, no DDP involved.
            discriminator = self.plain_discriminator
            with self.accelerator.autocast():
                fake_logits, fake_features = discriminator(decoded)
                with torch.no_grad():
                    _, real_features = discriminator(wav)
            if "adv" in weights:
                losses["adv"] = hinge_generator_loss(fake_logits)
            if "feat" in weights:
                losses["feat"] = feature_matching_loss(fake_features, real_features)
        return losses

    @torch.no_grad()
    def reconstruct(self, wav: torch.Tensor, num_codebooks: int) -> torch.Tensor:
        """Decoded ``(B, C, T)`` in eval mode (no codebook updates), in batches."""
        module = self.accelerator.unwrap_model(self.generator)
        was_training = module.training
        module.eval()
        try:
            outs = [module(part.to(self.accelerator.device), num_codebooks)[0].float()
                    for part in wav.split(self.config.batch_size)]
        finally:
            module.train(was_training)
        return torch.cat(outs)

    def validate(self) -> dict[str, float]:
        """SI-SNR (dB), mel distance and (if installed) ViSQOL per codebook count, and the
        reconstruction losses at all codebooks."""
        if self.valid_batch is None:
            return {}
        wav = self.valid_batch.to(self.accelerator.device)
        out: dict[str, float] = {}
        for n in self.choices:
            decoded = self.reconstruct(wav, n)
            kbps = n * self.model.bandwidth_per_codebook
            out[f"valid_si_snr@{kbps:g}kbps"] = si_snr(decoded, wav).mean().item()
            out[f"valid_mel_distance@{kbps:g}kbps"] = self.mel_distance(decoded, wav).mean().item()
        decoded = self.reconstruct(wav, self.model.num_codebooks)
        out["valid_l1"] = l1_time_loss(decoded, wav).item()
        out["valid_mel"] = self.mel_loss(decoded, wav).item()
        scores = [visqol_score(wav[i], decoded[i], self.model.sample_rate)
                  for i in range(min(self.config.visqol_clips, wav.shape[0]))]
        scores = [score for score in scores if score is not None]
        if scores:
            out["valid_visqol"] = sum(scores) / len(scores)
        return out

    def state_dict(self) -> dict:
        scaler = self.accelerator.scaler
        return {"codec_config": self.model.config.to_dict(),
                "train_config": asdict(self.config),
                "model": self.model.state_dict(),
                "discriminator": self.plain_discriminator.state_dict(),
                "gen_opt": self.gen_opt.state_dict(), "disc_opt": self.disc_opt.state_dict(),
                "balancer": self.balancer.state_dict(),
                "scaler": None if scaler is None else scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        saved = dict(state["codec_config"])
        if saved != self.model.config.to_dict():
            mine = self.model.config.to_dict()
            diff = {k: (saved.get(k), mine.get(k)) for k in set(saved) | set(mine)
                    if saved.get(k) != mine.get(k)}
            raise ValueError(f"the checkpoint's codec config differs from this model's "
                             f"(checkpoint, model): {diff}")
        self.model.load_state_dict(state["model"])
        self.plain_discriminator.load_state_dict(state["discriminator"])
        self.gen_opt.load_state_dict(state["gen_opt"])
        self.disc_opt.load_state_dict(state["disc_opt"])
        self.balancer.load_state_dict(state["balancer"])
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])

    def export(self) -> Path:
        """Write the codec as ``out_dir/<name>/`` (tokenwave format, weight norm kept)."""
        from ..formats import save_model

        return save_model(self.model, self.out_dir / self.model.name, overwrite=True)


# -- entropy-coding LM ---------------------------------------------------------------------------
def codec_codes(codec: EncodecModel, wav: torch.Tensor) -> torch.Tensor:
    """Codes ``(B, K, F)`` of the first chunk of ``(B, C, T)`` clips (the whole clip for
    models that encode files whole), with all codebooks: what ``.ecdc`` entropy-codes."""
    return codec.encode(wav)[0].codes


def entropy_lm_loss(lm, codes: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) of every code of ``(B, K, T)`` given the frames before it.

    ``EntropyLM.forward`` gives probabilities; their log, floored far below any probability
    that matters, keeps the gradient finite where one underflows.
    """
    probs = lm(codes)  # (B, K, T, card)
    log_probs = torch.log(probs.float().clamp_min(1e-30))
    return F.nll_loss(log_probs.reshape(-1, probs.shape[-1]), codes.reshape(-1))


class EntropyLMTrainer(_TrainingLoop):
    """Trains ``lm`` (an :class:`~codec.entropy.EntropyLM`) on the codes of the frozen ``codec``.

    The result is ``out_dir/<lm name>.th`` (``codec.ecdc.lm_name(codec.name)``), loadable
    with ``codec.ecdc.load_entropy_lm(codec, models_dir=out_dir)``. Logged losses are in bits
    per code (8 bits per byte of ``.ecdc`` body, before the coder's small overhead).
    """

    kind = "entropy_lm"
    log_name = "entropy_lm_log.jsonl"
    checkpoint_dir = "entropy_lm_checkpoints"

    def __init__(self, codec: EncodecModel, lm, out_dir: str | Path,
                 config: EntropyLMTrainConfig = EntropyLMTrainConfig(), *,
                 valid_data: RandomClips | None = None, accelerator=None) -> None:
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator()
        super().__init__(out_dir, config, accelerator)
        if lm.num_codebooks != codec.num_codebooks or lm.card != codec.codebook_size:
            raise ValueError(f"the LM has {lm.num_codebooks} codebooks of {lm.card}, the codec "
                             f"{codec.num_codebooks} of {codec.codebook_size}")
        self.config: EntropyLMTrainConfig = config
        self.codec = codec.eval().requires_grad_(False).to(accelerator.device)
        self.lm = lm.train()
        self.choices = codebook_choices(codec)
        optimizer = torch.optim.AdamW(lm.parameters(), lr=config.lr, betas=config.betas)
        self.wrapped_lm, self.optimizer = accelerator.prepare(lm, optimizer)
        self.valid_codes = None
        if valid_data is not None and config.valid_clips:
            wav = torch.stack([valid_data[i] for i in range(config.valid_clips)])
            self.valid_codes = codec_codes(self.codec, wav.to(accelerator.device))

    def train_step(self, wav: torch.Tensor) -> dict[str, float]:
        shared = self._step_generators()
        codes = codec_codes(self.codec, wav)
        num_codebooks = codes.shape[1]
        if self.config.codebook_dropout:
            num_codebooks = self.choices[int(torch.randint(len(self.choices), (1,),
                                                           generator=shared))]
        with self.accelerator.autocast():
            loss = entropy_lm_loss(self.wrapped_lm, codes[:, :num_codebooks])
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        if self.config.grad_clip:
            self.accelerator.clip_grad_norm_(self.lm.parameters(), self.config.grad_clip)
        self.optimizer.step()
        return {"bits_per_code": loss.item() / math.log(2), "codebooks": float(num_codebooks)}

    @torch.no_grad()
    def evaluate(self, codes: torch.Tensor) -> float:
        """Bits per code of ``codes`` ``(B, K, F)`` under the LM (eval mode)."""
        lm = self.accelerator.unwrap_model(self.wrapped_lm)
        was_training = lm.training
        lm.eval()
        try:
            return entropy_lm_loss(lm, codes.to(self.accelerator.device)).item() / math.log(2)
        finally:
            lm.train(was_training)

    def validate(self) -> dict[str, float]:
        if self.valid_codes is None:
            return {}
        out = {}
        for n in self.choices:
            bits = self.evaluate(self.valid_codes[:, :n])
            out[f"valid_bits_per_code@{n}"] = bits
            out[f"valid_kbps@{n}"] = bits * n * self.codec.frame_rate / 1000
        return out

    def state_dict(self) -> dict:
        return {"codec_config": self.codec.config.to_dict(), "train_config": asdict(self.config),
                "lm": self.accelerator.unwrap_model(self.wrapped_lm).state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if dict(state["codec_config"]) != self.codec.config.to_dict():
            raise ValueError("the checkpoint's LM was trained for another codec config")
        self.accelerator.unwrap_model(self.wrapped_lm).load_state_dict(state["lm"])
        self.optimizer.load_state_dict(state["optimizer"])

    def export(self) -> Path:
        from .. import audio
        from ..ecdc import lm_name

        path = self.out_dir / f"{lm_name(self.codec.name)}.th"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in
                 self.accelerator.unwrap_model(self.wrapped_lm).state_dict().items()}
        with audio.atomic_output(path) as tmp:
            torch.save(state, tmp)
        return path


# -- building the models -------------------------------------------------------------------------
def build_codec(config, *, seed: int = 0) -> EncodecModel:
    """A fresh model for ``config`` (an EncodecConfig), weights drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EncodecModel(config)


def load_codec_for_training(path: str | Path, *, name: str | None = None) -> EncodecModel:
    """A checkpoint in any format :mod:`codec.formats` reads, ready to train (weight norm as
    ``weight_g``/``weight_v`` even when the file holds folded weights), renamed to ``name``."""
    from ..formats import _unfolded, read_checkpoint

    checkpoint = read_checkpoint(path)
    config = checkpoint.config if name is None else replace(checkpoint.config, name=name)
    model = EncodecModel(config)
    model.load_state_dict(_unfolded(checkpoint.state, checkpoint.config), strict=True)
    return model.train()
