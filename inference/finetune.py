"""Fine-tune a MusicGen generator (or train its LM from scratch) on a token cache: ``tokenwave finetune``.

    from inference.finetune import finetune
    from lm.finetune import FinetuneConfig
    result = finetune(FinetuneConfig(model="musicgen-small", data="cache/", out="runs/mine"))
    MusicGen.from_pretrained(result.model_dir)

This module builds the generator and hands its LM, condition provider and fuser to the training
loop (:func:`lm.finetune.train`), which calls back here for what needs the whole generator: the
initial folder of a new from-scratch run, audio samples, and the exported result.

The base is any generator ``MusicGen.from_pretrained`` loads (tokenwave, transformers or
audiocraft folders, or a name): its LM config, conditioner, fuser, codec and window are
inherited, never re-specified. ``from_scratch="musicgen_small"`` (any ``lm.PRESETS`` name) builds
a fresh LM of that size instead, with the codebook count and vocabulary of the cache's codec;
the codec and text conditioner then come from ``model`` when given, else from ``codec`` (default:
the codec the cache was made with) and ``t5`` (a T5 folder; default: a lookup table over the
corpus' caption words). A trained T5 (``train_text_encoder``, meant for a small T5 built from the
corpus' captions by ``tokenwave make-text-encoder``) is exported in the folder's ``t5/``;
``save_dtype`` bfloat16/float16 halves the exported LM and T5 weights (loaded back as float32).

Besides the run folder of :mod:`lm.run`::

    OUT/base/     from-scratch runs: the initial generator (resume rebuilds from it)
    OUT/model/    the result: a tokenwave generator folder (from_pretrained, generate); with
                  ``lora`` the adapters alone over the base's name (:mod:`inference.formats.lora`)
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from codec import audio as audio_io
from codec.model import EncodecModel, InterleavedStereo
from codec.pretrained import load_codec
from conditioning import (BeatConditioner, ConditionFuser, ConditionProvider, InstrumentConditioner, KeyConditioner,
                          LUTConditioner, T5Conditioner, instrument_vocabulary)
from lm.corpus import caption_vocabulary
from lm.finetune import BuildContext, FinetuneConfig, FinetuneResult, train
from lm.lora import add_lora, has_lora, merge_lora
from lm.model import LMModel, get_preset
from lm.patterns import stereo_delays
from lm.token_cache import TokenCache, codec_fingerprint

from .config import GeneratorConfig
from .formats import detect_format, save_generator
from .formats.lora import save_adapter
from .generator import MusicGen

BASE_DIR = "base"
MODEL_DIR = "model"


def _load_codec(spec: str, device: torch.device) -> EncodecModel | InterleavedStereo:
    """A codec from a codec spec (name, path, random:<preset>) or from a generator folder."""
    if os.path.isdir(spec):
        try:
            detect_format(spec)
        except Exception:  # not a generator folder: a codec folder
            pass
        else:
            return MusicGen.from_pretrained(spec, device=device).codec
    return load_codec(spec, device)


def _scratch_generator(config: FinetuneConfig, cache: TokenCache, train_indices: list[int],
                       device: torch.device) -> MusicGen:
    """A generator with a fresh LM of size ``config.from_scratch``; see the module docstring."""
    base = None
    if config.model:
        base = MusicGen.from_pretrained(config.model, device=device, t5_path=config.t5_path)
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
            raise ValueError("training from scratch needs a codec: pass --codec (the cache does not name "
                             "one)")
        codec = _load_codec(spec, device)
        text = None
        if config.t5:
            text = T5Conditioner.from_pretrained(config.t5, output_dim=lm_config.dim, empty_is_null=True)
    if stereo and not codec.interleaved:
        codec = InterleavedStereo(codec)
    if text is None:
        vocab = caption_vocabulary(cache.items[i].meta for i in train_indices)
        text = LUTConditioner(vocab=vocab or ["music"], dim=lm_config.dim, output_dim=lm_config.dim)
    window = config.segment_seconds or cache.segment_seconds
    generator_config = GeneratorConfig(max_duration=window, extend_stride=round(0.6 * window, 6))
    provider = ConditionProvider({"description": text.to(device)})
    return MusicGen(lm=lm, codec=codec, condition_provider=provider, config=generator_config)


def _check_generator(generator: MusicGen, cache: TokenCache) -> None:
    """The generator predicts the cache's tokens: same codebooks, vocabulary and codec."""
    if generator.has_melody:
        raise ValueError("fine-tuning melody models is not supported: their chroma condition needs the "
                         "audio, which the token cache does not keep")
    lm = generator.lm.config
    if (lm.num_codebooks, lm.card) != (cache.num_codebooks, cache.card):
        raise ValueError(f"the model predicts {lm.num_codebooks} codebooks of {lm.card} codes; the cache "
                         f"at {cache.path} holds {cache.num_codebooks} of {cache.card}: prepare it with this "
                         "model")
    mine = codec_fingerprint(generator.codec)
    if cache.codec.get("fingerprint") != mine:
        codec = getattr(generator.codec, "model", generator.codec)  # the mono model of interleaved stereo
        raise ValueError(f"the cache at {cache.path} was encoded with codec {cache.codec.get('name')!r} "
                         f"(fingerprint {cache.codec.get('fingerprint')}), the model's codec is "
                         f"{codec.name!r} (fingerprint {mine}); run `tokenwave prepare` with --model set to "
                         "this model")


@dataclass
class GeneratorTarget:
    """A generator as the training loop's :class:`lm.finetune.FinetuneTarget`."""

    generator: MusicGen
    from_scratch: bool
    lora_base: str | None = None  # LoRA runs: the base the adapters are exported over
    t5_path: str | None = None

    @property
    def lm(self) -> LMModel:
        return self.generator.lm

    @property
    def condition_provider(self) -> ConditionProvider:
        return self.generator.condition_provider

    @property
    def fuser(self) -> nn.Module:
        return self.generator.fuser

    @property
    def mask_condition_padding(self) -> bool:
        return self.generator.config.mask_condition_padding

    def start(self, out: Path) -> None:
        """A from-scratch run keeps its initial generator: resume rebuilds from ``OUT/base``."""
        if self.from_scratch:
            self.generator.save_pretrained(out / BASE_DIR, overwrite=True)

    def write_samples(self, folder: Path, prompts: list[str | None], seconds: float, seed: int) -> None:
        out = self.generator.generate(prompts, seconds, seed=seed)
        for i, wav in enumerate(out.wav):
            audio_io.write_audio(folder / f"sample_{i}.wav", wav.float().cpu(), out.sample_rate,
                                 normalize="peak")

    def export(self, folder: Path, dtype: torch.dtype | None) -> None:
        if self.lora_base is not None:
            save_adapter(self.lm, folder, base=self.lora_base, t5_path=self.t5_path, dtype=dtype, overwrite=True)
        else:
            save_generator(self.generator, folder, overwrite=True, dtype=dtype)


def add_tempo_key(generator: MusicGen) -> None:
    """Give ``generator`` the beat-clock and key conditioners (summed into the LM input), unless it
    has them; they start at zero, so the generator's output is unchanged until they are trained."""
    if {"bpm", "key"} <= set(generator.fuser.config.sum):
        return
    if {"bpm", "key"} & set(generator.fuser.config.sum):
        raise ValueError(f"the model already sums {list(generator.fuser.config.sum)} into its input")
    dim, device = generator.lm.config.dim, generator.device
    conditioners = generator.condition_provider.conditioners
    conditioners["bpm"] = BeatConditioner(dim=dim, frame_rate=generator.frame_rate).to(device)
    conditioners["key"] = KeyConditioner(dim=dim).to(device)
    generator.fuser = ConditionFuser(replace(generator.fuser.config, sum=("bpm", "key", *generator.fuser.config.sum)))
    generator._check()


def add_instrument(generator: MusicGen, vocabulary: Sequence[str]) -> None:
    """Give ``generator`` a lead-instrument conditioner over ``vocabulary`` (summed into the LM input,
    zero at first), unless it has one; a model that has one keeps its own vocabulary."""
    if "instrument" in generator.fuser.config.sum:
        return
    if not vocabulary:
        raise ValueError("no instrument is named as the lead by enough training items (the first name of "
                         "their 'instrument' metadata); lower --instrument-min-items or add that metadata")
    if generator.lm.config.pattern != "delay":
        raise ValueError(f"instrument conditioning needs one LM step per frame (the delay pattern), "
                         f"not {generator.lm.config.pattern!r}")
    conditioners = generator.condition_provider.conditioners
    conditioners["instrument"] = InstrumentConditioner(dim=generator.lm.config.dim,
                                                       vocabulary=vocabulary).to(generator.device)
    generator.fuser = ConditionFuser(replace(generator.fuser.config,
                                             sum=(*generator.fuser.config.sum, "instrument")))
    generator._check()


def build_target(config: FinetuneConfig, context: BuildContext) -> GeneratorTarget:
    """The generator a run trains: the base, a fresh LM (``from_scratch``), or on resuming a
    from-scratch run the initial generator it saved; checked against the cache."""
    device = context.device
    if config.from_scratch and context.resuming:  # the initial generator was saved when the run started
        generator = MusicGen.from_pretrained(Path(config.out) / BASE_DIR, device=device)
    elif config.from_scratch:
        generator = _scratch_generator(config, context.cache, context.train_indices, device)
    else:
        generator = MusicGen.from_pretrained(config.model, device=device, t5_path=config.t5_path)
    _check_generator(generator, context.cache)
    if config.tempo_key:
        add_tempo_key(generator)
    if config.instrument:
        metas = [context.cache.items[i].meta for i in context.train_indices]
        add_instrument(generator, instrument_vocabulary(metas, min_items=config.instrument_min_items))
    lora = config.lora_config()
    if has_lora(generator.lm):  # a base that is itself an adapter folder: train over the merged model
        merge_lora(generator.lm)
    if lora is not None:
        add_lora(generator.lm, lora)
    return GeneratorTarget(generator, from_scratch=bool(config.from_scratch),
                           lora_base=config.model if lora is not None else None, t5_path=config.t5_path)


def finetune(config: FinetuneConfig, *, resume: bool = False, progress: bool = False) -> FinetuneResult:
    """Train as ``config`` says; ``resume`` continues ``config.out`` from its last intact checkpoint.

    Runs in every process of an ``accelerate launch``; returns in each. ``progress`` prints a
    line per log interval on the main process.
    """
    return train(config, lambda context: build_target(config, context),
                 export_to=Path(config.out) / MODEL_DIR, resume=resume, progress=progress)


__all__ = ["BASE_DIR", "MODEL_DIR", "GeneratorTarget", "build_target", "finetune"]
