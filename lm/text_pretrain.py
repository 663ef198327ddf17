"""Teach a from-scratch text encoder what captions say before the LM learns from it.

An LM trained from scratch with its text encoder barely uses the caption: only the first few
frames of a training window lack audio context, so the caption's share of the gradient is
tiny. The held-out loss of tokenwave-small v2 fell by 0.005 nats with its true caption against
none (0.05 at the first frame, where knowing the lead instrument alone is worth 0.6 nats to the
first codebook), and its generations followed prompts at chance.

This stage trains the encoder (and its output projection) alone, on the corpus's captions, to
predict the metadata each caption states: genre, key tonic, mode and a tempo band
(categorical), instruments and moods (multi-label). Every token's output predicts them all, so
any attention pattern of the LM over the caption finds them. A label counts only when its value
is written in that caption (a dropped field teaches nothing false). Captions are drawn with the
run's augmentation and word dropout, as the LM run will see them. Heads are discarded after.
"""
from __future__ import annotations

import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from conditioning import T5Conditioner
from conditioning.dropout import drop_words

from .corpus import CaptionAugmentation, TrackMeta, augment_caption
from .token_cache import TokenCache
from .training import cosine_schedule

CATEGORICAL = ("genre", "tonic", "mode", "tempo")
MULTI_LABEL = ("instrument", "moods")
TEMPO_BANDS = (60.0, 76.0, 92.0, 108.0, 124.0, 140.0, 160.0)  # upper edges, bpm; above: the last band
IGNORE = -100


def _instruments(meta: TrackMeta) -> list[str]:
    return [part.strip().lower() for part in (meta.instrument or "").split(",") if part.strip()]


def tempo_band(bpm: float) -> int:
    return next((i for i, edge in enumerate(TEMPO_BANDS) if bpm < edge), len(TEMPO_BANDS))


def _key_parts(meta: TrackMeta) -> tuple[str, str] | None:
    parts = (meta.key or "").lower().split()
    return (parts[0], parts[1]) if len(parts) == 2 and parts[1] in ("major", "minor") else None


def _says(caption: str, value: str) -> bool:
    return re.search(r"(?<![\w#])" + re.escape(value) + r"(?![\w#])", caption) is not None


@dataclass(frozen=True)
class AttributeVocabulary:
    """The values each attribute takes in a corpus (values seen fewer than ``min_count`` times
    are left out: too rare to learn)."""

    genre: tuple[str, ...]
    tonic: tuple[str, ...]
    instrument: tuple[str, ...]
    moods: tuple[str, ...]

    @classmethod
    def from_metas(cls, metas: Sequence[TrackMeta], min_count: int = 5) -> AttributeVocabulary:
        counts: dict[str, Counter] = {name: Counter() for name in ("genre", "tonic", "instrument", "moods")}
        for meta in metas:
            if meta.genre:
                counts["genre"][meta.genre.lower()] += 1
            if (key := _key_parts(meta)) is not None:
                counts["tonic"][key[0]] += 1
            counts["instrument"].update(_instruments(meta))
            counts["moods"].update(m.lower() for m in meta.moods)
        return cls(**{name: tuple(sorted(v for v, n in c.items() if n >= min_count)) for name, c in counts.items()})

    def sizes(self) -> dict[str, int]:
        return {"genre": len(self.genre), "tonic": len(self.tonic), "mode": 2, "tempo": len(TEMPO_BANDS) + 1,
                "instrument": len(self.instrument), "moods": len(self.moods)}

    def labels(self, meta: TrackMeta, caption: str) -> tuple[list[int], list[list[float]]]:
        """The attributes ``caption`` states about ``meta``: one class per categorical attribute
        (IGNORE when not stated) and 0/1 targets per multi-label value (-1 = not stated)."""
        text = caption.lower()
        genre = meta.genre.lower() if meta.genre else None
        key = _key_parts(meta)
        stated_key = key is not None and _says(text, f"{key[0]} {key[1]}")
        bpm_stated = meta.bpm is not None and _says(text, str(int(round(meta.bpm))))
        categorical = [
            self.genre.index(genre) if genre in self.genre and _says(text, genre) else IGNORE,
            self.tonic.index(key[0]) if stated_key and key[0] in self.tonic else IGNORE,
            int(key[1] == "minor") if stated_key else IGNORE,
            tempo_band(meta.bpm) if bpm_stated else IGNORE,
        ]
        present = set(_instruments(meta))
        moods = {m.lower() for m in meta.moods}
        multi = [[float(v in present) if _says(text, v) or v not in present else -1.0 for v in self.instrument],
                 [float(v in moods) if _says(text, v) or v not in moods else -1.0 for v in self.moods]]
        return categorical, multi


class AttributeHeads(nn.Module):
    """Linear heads over every token of the encoder's (projected) output."""

    def __init__(self, dim: int, sizes: dict[str, int]) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(dim, max(n, 1)) for name, n in sizes.items()})

    def loss(self, hidden: torch.Tensor, mask: torch.Tensor, categorical: torch.Tensor,
             multi: list[torch.Tensor]) -> torch.Tensor:
        """hidden (B, S, D), mask (B, S); categorical (B, 4) classes or IGNORE; multi: per
        multi-label attribute (B, V) targets in {0, 1} or -1 (unknown)."""
        tokens = mask.bool()
        total = hidden.new_zeros(())
        for j, name in enumerate(CATEGORICAL):
            target = categorical[:, j:j + 1].expand(-1, hidden.shape[1]).masked_fill(~tokens, IGNORE)
            if (target != IGNORE).any():
                logits = self.heads[name](hidden)
                total = total + F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE)
        for name, target in zip(MULTI_LABEL, multi):
            if target.shape[1] == 0:
                continue
            known = (target >= 0)[:, None, :] & tokens[..., None]
            if known.any():
                logits = self.heads[name](hidden)
                wide = target[:, None, :].expand_as(logits).clamp(min=0)
                total = total + F.binary_cross_entropy_with_logits(logits[known], wide[known])
        return total

    @torch.no_grad()
    def accuracy(self, hidden: torch.Tensor, mask: torch.Tensor, categorical: torch.Tensor) -> dict[str, float]:
        """Categorical accuracy from the mean of each caption's token outputs."""
        weights = mask.to(hidden.dtype)[..., None]
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        out = {}
        for j, name in enumerate(CATEGORICAL):
            known = categorical[:, j] != IGNORE
            if known.any():
                predicted = self.heads[name](pooled).argmax(-1)
                out[name] = float((predicted[known] == categorical[known, j]).float().mean())
        return out


@dataclass(frozen=True)
class TextPretrainConfig:
    steps: int
    batch_size: int = 64
    lr: float = 1e-3
    word_dropout: float = 0.15
    seed: int = 0
    eval_every: int = 100


def pretrain_text_encoder(encoder: nn.Module, metas: Sequence[TrackMeta], valid_metas: Sequence[TrackMeta],
                          config: TextPretrainConfig, *,
                          augmentation: CaptionAugmentation = CaptionAugmentation(),
                          log: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    """Train ``encoder``'s trainable parameters (a text conditioner: ``encode(captions)`` gives a
    Condition) for ``config.steps`` steps: AdamW, 20 warmup steps, cosine decay. Returns the last
    held-out accuracies (``valid_metas``; empty when there are none)."""
    captioned = [m for m in metas if m.description or m.instrument or m.genre or m.key or m.bpm]
    if not captioned:
        raise ValueError("text-encoder pretraining needs captions or metadata: the corpus has none")
    vocabulary = AttributeVocabulary.from_metas(captioned)
    params = [p for p in encoder.parameters() if p.requires_grad]
    if not params:
        raise ValueError("text-encoder pretraining needs a trainable text encoder (its parameters are frozen)")
    was_training = encoder.training

    def encode(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        condition = encoder.encode(captions)
        return condition.embeddings, condition.mask

    with torch.no_grad():
        probe, _ = encode(["a"])
    heads = AttributeHeads(probe.shape[-1], vocabulary.sizes()).to(probe.device)
    optimizer = torch.optim.AdamW([*params, *heads.parameters()], lr=config.lr, weight_decay=0.01)
    rng = random.Random(f"tokenwave-text-pretrain:{config.seed}")
    generator = torch.Generator().manual_seed(config.seed)

    def draw(pool: Sequence[TrackMeta], count: int, dropout: float):
        chosen = [pool[rng.randrange(len(pool))] for _ in range(count)]
        captions = [augment_caption(m, augmentation, rng) or m.description or "" for m in chosen]
        if dropout:
            dropped = drop_words(captions, dropout, generator)
            captions = [d or c for d, c in zip(dropped, captions)]
        labels = [vocabulary.labels(m, c) for m, c in zip(chosen, captions)]
        categorical = torch.tensor([c for c, _ in labels], dtype=torch.long, device=probe.device)
        multi = [torch.tensor([mu[j] for _, mu in labels], dtype=torch.float32, device=probe.device)
                 .reshape(count, -1) for j in range(len(MULTI_LABEL))]
        return captions, categorical, multi

    def evaluate() -> dict[str, float]:
        if not valid_metas:
            return {}
        eval_rng_state = rng.getstate()
        captions, categorical, _ = draw(valid_metas, min(256, 4 * config.batch_size), 0.0)
        rng.setstate(eval_rng_state)  # evaluation does not shift the training draws
        encoder.eval()
        try:
            with torch.no_grad():
                hidden, mask = encode(captions)
        finally:
            encoder.train()
        return heads.accuracy(hidden.float(), mask, categorical)

    metrics: dict[str, float] = {}
    encoder.train()
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(warmup=min(20, config.steps),
                                                                            total=config.steps))
    for step in range(1, config.steps + 1):
        captions, categorical, multi = draw(captioned, config.batch_size, config.word_dropout)
        hidden, mask = encode(captions)
        loss = heads.loss(hidden.float(), mask, categorical, multi)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*params, *heads.parameters()], 1.0)
        optimizer.step()
        schedule.step()
        if step % config.eval_every == 0 or step == config.steps:
            metrics = {"text_pretrain/loss": float(loss.detach()),
                       **{f"text_pretrain/{k}_accuracy": v for k, v in evaluate().items()}}
            if log is not None:
                log(step, metrics)
    encoder.train(was_training)
    return metrics


def pretrain_text_stage(text: nn.Module, cache: TokenCache, train: Sequence[int], valid: Sequence[int],
                        config, accelerator, progress: bool) -> dict[str, float]:
    """A fine-tuning run's text-pretraining stage on the captions of ``cache``'s ``train`` items
    (``valid`` ones for its accuracy; ``config``: the run's ``lm.run.FinetuneConfig``).
    Every process runs it from the same seed; rank 0's weights are then broadcast, which makes
    them identical even where kernels are not deterministic. Runs before the LM's setup, so the
    EMA and the first checkpoint hold its result."""
    if isinstance(text, T5Conditioner) and not text.finetune:
        raise ValueError("--text-pretrain-steps trains the T5 text encoder: add --train-text-encoder")

    def log(step: int, values: dict[str, float]) -> None:
        accelerator.log(values, step=0)
        if progress and accelerator.is_main_process:
            shown = ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in values.items())
            print(f"text pretraining {step}/{config.text_pretrain_steps}: {shown}", file=sys.stderr, flush=True)

    metas = [cache.items[i].meta for i in train]
    valid_metas = [cache.items[i].meta for i in valid]
    metrics = pretrain_text_encoder(text, metas, valid_metas, TextPretrainConfig(
        steps=config.text_pretrain_steps, lr=config.lr, word_dropout=config.word_dropout, seed=config.seed),
        augmentation=config.augmentation(), log=log)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast
        with torch.no_grad():
            for param in text.parameters():
                param.copy_(broadcast(param.data.to(accelerator.device)).to(param.device))
    return metrics


__all__ = ["AttributeVocabulary", "TextPretrainConfig", "pretrain_text_stage", "pretrain_text_encoder",
           "tempo_band"]
