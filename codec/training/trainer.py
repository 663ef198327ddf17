"""Codec training, the EnCodec recipe (paper, section 3.4), with accelerate.

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

The step loop, checkpoints, exact resume and logging are :mod:`codec.training.loop`'s; the
result is the codec as a tokenwave model folder ``out_dir/<name>/`` (:func:`codec.formats.
load_model` reads it). All randomness of a step (quantizer dropout, the discriminator's coin,
k-means initialization, dead-code replacement) is seeded from ``(seed, step)``.

Several processes: gradients are averaged by DDP and the balancer averages its gradient norms
over processes. The quantizer's EMA codebooks learn from every process's latents (counts and
sums all-reduced, k-means and dead-code draws made by process 0 over the gathered latents; see
:mod:`codec.quantization`): given the latents, they are those one process would learn from the
whole batch. The balanced gradient is normalised per item and summed over each process's clips,
as in audiocraft, so the per-process batch (not the global one) sets its size relative to the
commitment loss's.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..formats import read_checkpoint, save_model
from ..formats.checkpoint import unfolded
from ..model import EncodecModel
from ..quantization import EuclideanCodebook
from .balancer import Balancer
from .data import RandomClips
from .discriminator import DEFAULT_WINDOWS, MultiScaleSTFTDiscriminator
from .ema import WeightAverage
from .loop import LoopConfig, TrainingLoop, codebook_choices
from .losses import (
    MelDistance,
    MelStatisticsLoss,
    MultiResolutionSTFTLoss,
    MultiScaleMelLoss,
    feature_matching_loss,
    frame_periodic_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    l1_time_loss,
)
from .run import mix_seed
from .validate import codec_metrics

TRAIN_PARTS = ("all", "decoder")
DISC_PRECISIONS = ("same", "bf16")
LOSS_WEIGHTS: dict[str, dict[str, float]] = {
    "paper": {"l1": 0.1, "mel": 1.0, "adv": 3.0, "feat": 3.0},
    "audiocraft": {"l1": 0.1, "mel": 2.0, "adv": 4.0, "feat": 4.0},
    # No discriminator: about twice as fast per step; a cheap warm start (or a whole run on
    # CPU) whose audio is smoother than the adversarial recipe's.
    "reconstruction": {"l1": 0.1, "mel": 1.0},
    # Reconstruction plus the linear-frequency STFT loss (MultiResolutionSTFTLoss), which resolves the
    # narrow lines of a frame-rate buzz that mel bands average away, and the error's frame-locked part
    # (frame_periodic_loss), the buzz itself in the time domain; no discriminator (CPU budget).
    "spectral": {"l1": 0.1, "mel": 1.0, "stft": 1.0, "frame": 1.0},
    # Spectral plus the log-mel band statistics (MelStatisticsLoss: each band's std over time and
    # frame-to-frame change), against the flattened dynamics regression losses leave (no discriminator).
    "timbre": {"l1": 0.1, "mel": 1.0, "stft": 1.0, "frame": 1.0, "stats": 1.0},
    # Timbre plus the MS-STFT discriminator (hinge 1, feature matching 2): fine-tuning a decoder
    # trained without one, the regression losses keep it near its start while the discriminator
    # learns; ~2x slower per step than timbre.
    "timbre_gan": {"l1": 0.1, "mel": 1.0, "stft": 1.0, "frame": 1.0, "stats": 1.0, "adv": 1.0, "feat": 2.0},
}

LOSS_NAMES = ("l1", "mel", "stft", "frame", "stats", "adv", "feat")


def resolve_weights(loss_weights: str | Mapping[str, float]) -> dict[str, float]:
    """A preset's name or a mapping -> the mapping (unchecked; see :meth:`CodecTrainConfig.weights`)."""
    if isinstance(loss_weights, str):
        if loss_weights not in LOSS_WEIGHTS:
            raise ValueError(f"unknown loss_weights {loss_weights!r}; expected one of {sorted(LOSS_WEIGHTS)} "
                             f"or a mapping")
        return dict(LOSS_WEIGHTS[loss_weights])
    return dict(loss_weights)


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
    # "all", or "decoder": the encoder and codebooks frozen (no gradients, no EMA updates, no dead-code
    # re-seeding), so a trained codec's tokens stay exactly the same while its decoder is fine-tuned
    # (e.g. adversarially, to remove artifacts): token caches and LMs trained on them remain valid.
    train_parts: str = "all"
    # "same": the discriminator runs under the run's autocast (``--mixed-precision``); "bf16": under
    # bfloat16 autocast alone, the codec and the losses in float32. The discriminator is most of a
    # decoder fine-tune's step and the part that tolerates bfloat16 best (it only has to tell real
    # from decoded); on a CPU with bfloat16 units its forward and backward run ~1.9x faster.
    disc_precision: str = "same"
    # An exponential moving average of the trained weights (e.g. 0.999: about the last 1,000 steps)
    # is what validation reads and the run exports; None: the weights as trained.
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("disc_windows", "mel_scales"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self.weights()  # validates
        if not 0 <= self.disc_update_prob <= 1:
            raise ValueError(f"disc_update_prob must be in [0, 1], got {self.disc_update_prob}")
        if self.train_parts not in TRAIN_PARTS:
            raise ValueError(f"train_parts must be one of {TRAIN_PARTS}, got {self.train_parts!r}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if self.disc_precision not in DISC_PRECISIONS:
            raise ValueError(f"disc_precision must be one of {DISC_PRECISIONS}, got {self.disc_precision!r}")

    def weights(self) -> dict[str, float]:
        """The balanced losses' weights, zero weights left out."""
        weights = resolve_weights(self.loss_weights)
        unknown = set(weights) - set(LOSS_NAMES)
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}; expected {', '.join(LOSS_NAMES)}")
        weights = {k: float(v) for k, v in weights.items() if v}
        if not weights:
            raise ValueError("all loss weights are zero")
        return weights

    @property
    def adversarial(self) -> bool:
        return bool({"adv", "feat"} & set(self.weights()))


# -- the training forward ----------------------------------------------------------------------
class CodecTrainingModule(nn.Module):
    """``(B, C, T)`` audio -> decoded ``(B, C, T)`` and the commitment loss, with gradients.

    The quantizer runs in float32 outside autocast: half-precision distances would pick
    different codes and the EMA codebook updates would lose precision.
    """

    def __init__(self, model: EncodecModel, *, decoder_only: bool = False) -> None:
        super().__init__()
        self.model = model
        self.decoder_only = decoder_only
        if decoder_only:
            for module in (model.encoder, model.quantizer):
                module.requires_grad_(False)
        self.train(model.training)

    def train(self, mode: bool = True) -> CodecTrainingModule:
        super().train(mode)
        if self.decoder_only:  # frozen parts stay in eval mode: no codebook EMA, no re-seeding
            self.model.encoder.eval()
            self.model.quantizer.eval()
        return self

    def forward(self, wav: torch.Tensor, num_codebooks: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        scale = None
        if model.normalize:  # as EncodecModel.encode: unit RMS per item, restored after
            scale = 1e-8 + wav.mean(dim=1, keepdim=True).pow(2).mean(dim=2, keepdim=True).sqrt()
            wav = wav / scale
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.decoder_only):
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


# -- codec -------------------------------------------------------------------------------------
class CodecTrainer(TrainingLoop):
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
            torch.manual_seed(mix_seed(config.seed, 1 << 40))
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
        self.stft_loss = MultiResolutionSTFTLoss().to(device)
        self.stats_loss = MelStatisticsLoss(sample_rate=model.sample_rate).to(device)
        self.choices = codebook_choices(model)
        self.dead_code_threshold = set_dead_code_threshold(
            model, config.dead_code_threshold,
            latents_per_step=config.batch_size * accelerator.num_processes
            * math.ceil(self.segment_samples / model.config.hop_length))
        decoder_only = config.train_parts == "decoder"
        trained = model.decoder.parameters() if decoder_only else model.parameters()
        gen_opt = torch.optim.Adam(trained, lr=config.lr, betas=config.betas)
        disc_opt = torch.optim.Adam(discriminator.parameters(), lr=config.lr, betas=config.betas)
        self.generator, self.discriminator, self.gen_opt, self.disc_opt = accelerator.prepare(
            CodecTrainingModule(model, decoder_only=decoder_only), discriminator, gen_opt, disc_opt)
        self.valid_batch = self._valid_batch(valid_data)
        self.average = None if config.ema_decay is None else WeightAverage(model, decay=config.ema_decay)

    def _averaged_weights(self):
        """The weight average swapped in (validation, export), or nothing to do without one."""
        return nullcontext() if self.average is None else self.average.applied(self.model)

    def _valid_batch(self, data: RandomClips | None) -> torch.Tensor | None:
        if data is None or not self.config.valid_clips:
            return None
        return torch.stack([data[i] for i in range(self.config.valid_clips)])

    def _disc_autocast(self):
        """The autocast the discriminator runs under (see ``CodecTrainConfig.disc_precision``)."""
        if self.config.disc_precision == "bf16":
            return torch.autocast(device_type=self.accelerator.device.type, dtype=torch.bfloat16)
        return self.accelerator.autocast()

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
            with self._disc_autocast():
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
        if self.average is not None:
            self.average.update(self.model)
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
        if "stft" in weights:
            losses["stft"] = self.stft_loss(decoded, wav)
        if "stats" in weights:
            losses["stats"] = self.stats_loss(decoded, wav)
        if "frame" in weights:
            losses["frame"] = frame_periodic_loss(decoded, wav, hop_length=self.model.config.hop_length,
                                                  frames=min(10, max(2, wav.shape[-1] // self.model.config.hop_length)))
        if self.config.adversarial:
            # The plain module: only the output's gradient is taken here, no DDP involved.
            discriminator = self.plain_discriminator
            with self._disc_autocast():
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
        """Reconstruction metrics of the validation clips per codebook count
        (:func:`~codec.training.validate.codec_metrics`)."""
        if self.valid_batch is None:
            return {}
        with self._averaged_weights():
            return codec_metrics(self.valid_batch.to(self.accelerator.device), self.reconstruct,
                                 choices=self.choices, num_codebooks=self.model.num_codebooks,
                                 kbps_per_codebook=self.model.bandwidth_per_codebook,
                                 sample_rate=self.model.sample_rate, mel_distance=self.mel_distance,
                                 mel_loss=self.mel_loss, visqol_clips=self.config.visqol_clips,
                                 frame_rate=self.model.frame_rate)

    def state_dict(self) -> dict:
        scaler = self.accelerator.scaler
        return {"codec_config": self.model.config.to_dict(),
                "train_config": asdict(self.config),
                "model": self.model.state_dict(),
                "discriminator": self.plain_discriminator.state_dict(),
                "gen_opt": self.gen_opt.state_dict(), "disc_opt": self.disc_opt.state_dict(),
                "balancer": self.balancer.state_dict(),
                "average": None if self.average is None else self.average.state_dict(),
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
        if self.average is not None:  # a run that had none starts its average at the loaded weights
            if state.get("average") is not None:
                self.average.load_state_dict(state["average"])
            else:
                self.average.reset(self.model)
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])

    def load_discriminator(self, state: dict) -> None:
        """Start from another run's discriminator and its optimizer (a checkpoint's ``state``), so a
        changed decoder meets an already trained critic instead of a fresh one that would first
        have to learn what real audio sounds like. The codec and its optimizer are untouched."""
        if not self.config.adversarial:
            raise ValueError("this run trains without a discriminator (its loss weights have no adv/feat)")
        mine = asdict(self.config)
        saved = state.get("train_config", {})
        for key in ("disc_filters", "disc_windows"):
            if _plain(saved.get(key)) != _plain(mine[key]):  # a checkpoint may hold tuples as lists
                raise ValueError(f"the checkpoint's discriminator has {key}={saved.get(key)!r}, this run "
                                 f"{mine[key]!r}: pass the same --{key.replace('_', '-')}")
        self.plain_discriminator.load_state_dict(state["discriminator"])
        self.disc_opt.load_state_dict(state["disc_opt"])

    def export(self) -> Path:
        """Write the codec (its weight average, with ``ema_decay``) as ``out_dir/<name>/`` (tokenwave
        format, weight norm kept)."""
        with self._averaged_weights():
            return save_model(self.model, self.out_dir / self.model.name, overwrite=True)


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


# -- building the models -------------------------------------------------------------------------
def build_codec(config, *, seed: int = 0) -> EncodecModel:
    """A fresh model for ``config`` (an EncodecConfig), weights drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EncodecModel(config)


def load_codec_for_training(path: str | Path, *, name: str | None = None) -> EncodecModel:
    """A checkpoint in any format :mod:`codec.formats` reads, ready to train (weight norm as
    ``weight_g``/``weight_v`` even when the file holds folded weights), renamed to ``name``."""
    checkpoint = read_checkpoint(path)
    config = checkpoint.config if name is None else replace(checkpoint.config, name=name)
    model = EncodecModel(config)
    model.load_state_dict(unfolded(checkpoint.state, checkpoint.config), strict=True)
    return model.train()
