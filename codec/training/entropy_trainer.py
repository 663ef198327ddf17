"""Training of the ``.ecdc`` entropy-coding prior on the codes of a frozen codec.

:class:`EntropyLMTrainer` trains an :class:`~codec.entropy.EntropyLM` (the released
architecture): cross-entropy of every codebook of frame t given the frames before it, with the
number of codebooks drawn per step like the codec's quantizer dropout, so one LM serves every
bitrate. It writes, under ``out_dir``, ``entropy_lm_checkpoints/`` and ``entropy_lm_log.jsonl``
(see :mod:`codec.training.loop`) and the LM as ``out_dir/<lm name>.th`` (a state dict, which
:func:`codec.ecdc.load_entropy_lm` finds with ``models_dir=out_dir``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from ..ecdc import lm_name
from ..files import atomic_write
from ..model import EncodecModel
from .data import RandomClips
from .loop import LoopConfig, TrainingLoop, codebook_choices
from .validate import entropy_metrics


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


class EntropyLMTrainer(TrainingLoop):
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
        return entropy_metrics(self.valid_codes, self.evaluate, choices=self.choices,
                               frame_rate=self.codec.frame_rate)

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
        path = self.out_dir / f"{lm_name(self.codec.name)}.th"
        state = {k: v.detach().cpu() for k, v in
                 self.accelerator.unwrap_model(self.wrapped_lm).state_dict().items()}
        return atomic_write(path, lambda tmp: torch.save(state, tmp), overwrite=True)
