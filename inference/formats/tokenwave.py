"""tokenwave's generator folder: written by :func:`save_generator`, read by :func:`load_tokenwave`.

``config.json`` (``"format": "tokenwave-musicgen"``: LM config, generator config, fuser, one
spec per conditioner, codec layout), ``model.safetensors`` (LM weights with audiocraft's names
plus ``condition_provider.*``), ``codec/`` (the codec in :mod:`codec.formats`' tokenwave format)
and, for T5-conditioned models, ``t5/`` (a transformers T5 folder: ``config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``, ``spiece.model``;
fine-tuned or jointly trained weights too). The folder is self-contained: nothing outside it is
read. Round-trips; ``save_generator(..., dtype=torch.bfloat16)`` (or float16) stores the LM,
conditioner and T5 weights at half size (the codec stays float32), and loading converts them to
the requested dtype (float32 by default). A folder saved from a quantized LM records the
quantization (``"lm_quantization"``) and holds the integers and scales, which load as they are.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from codec.files import atomic_write
from codec.formats import CheckpointError, read_json_file, save_model
from conditioning import (BeatConditioner, ChromaConditioner, ChromaConfig, ConditionFuser, ConditionProvider,
                          FuserConfig, InstrumentConditioner, KeyConditioner, LUTConditioner, T5Conditioner)
from conditioning.text import quiet_transformers
from lm import LMConfig
from lm.quant import is_matrix_key, is_quantized_key

from ..config import GeneratorConfig
from .loading import (CONFIG_NAME, PROVIDER_PREFIX, SAVE_DTYPES, WEIGHTS_NAME, GeneratorParts, LoadTarget,
                      Weights, check_t5_files, group_by_layer, load_provider, meta_lm, provider_state,
                      ready_codec)

if TYPE_CHECKING:  # the generator imports this package, never the reverse
    from ..generator import MusicGen

FORMAT_MARKER = "tokenwave-musicgen"
FORMAT_VERSION = 1
CODEC_DIR = "codec"
T5_DIR = "t5"


def save_generator(generator: MusicGen, path: str | os.PathLike, *, overwrite: bool = False,
                   dtype: torch.dtype | None = None) -> Path:
    """Write ``generator`` in tokenwave's folder format (atomically); returns the folder.

    An existing non-empty folder is replaced only with ``overwrite=True``. ``dtype`` (float32,
    float16 or bfloat16; default: as they are) is the storage type of the LM, conditioner and T5
    weights; the codec is always written in float32.
    """
    if dtype is not None and dtype not in SAVE_DTYPES.values():
        raise ValueError(f"dtype must be one of {sorted(SAVE_DTYPES)}, found {dtype}")
    path = Path(path)
    codec = generator.codec.base_model
    specs = {name: _conditioner_spec(c) for name, c in generator.condition_provider.conditioners.items()}
    t5 = [c for c in generator.condition_provider.conditioners.values() if isinstance(c, T5Conditioner)]
    if len(t5) > 1:
        raise ValueError("tokenwave's format holds one T5 conditioner, found several")
    data = {
        "format": FORMAT_MARKER, "format_version": FORMAT_VERSION,
        "lm": generator.lm.config.to_dict(),
        "generator": generator.config.to_dict(),
        "fuser": {k: list(v) if isinstance(v, tuple) else v
                  for k, v in asdict(generator.fuser.config).items()},
        "conditioners": specs,
        "codec": {"folder": CODEC_DIR, "stereo": generator.codec.interleaved},
    }
    if dtype is not None:  # informative: loading converts to the dtype asked for
        data["weights_dtype"] = str(dtype).removeprefix("torch.")
    quantization = getattr(generator.lm, "quantization", None)
    if quantization is not None:
        data["lm_quantization"] = quantization.to_dict()
    state = dict(generator.lm.state_dict())
    for key, value in generator.condition_provider.state_dict().items():
        if ".t5." not in key:  # a fine-tuned T5 is written as the t5/ folder
            state[PROVIDER_PREFIX + key] = value
    def kept(key: str) -> bool:  # a quantized LM's integers and scales are stored as they are
        return quantization is not None and (is_quantized_key(key) or is_matrix_key(key))

    state = {k: _stored(v, None if kept(k) else dtype) for k, v in state.items()}

    def write(folder: Path) -> None:
        from safetensors.torch import save_file

        (folder / CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        save_model(codec, folder / CODEC_DIR, format="tokenwave")
        if t5:
            t5[0].save_pretrained(folder / T5_DIR, dtype=dtype)

    return atomic_write(path, write, folder=True, overwrite=overwrite)


def _stored(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach().to("cpu")
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.contiguous()


def _conditioner_spec(conditioner: nn.Module) -> dict:
    if isinstance(conditioner, T5Conditioner):
        return {"kind": "t5", "folder": T5_DIR, "output_dim": None if conditioner.output_proj is None
                else conditioner.output_dim, "finetune": conditioner.finetune,
                "word_dropout": conditioner.word_dropout, "empty_is_null": conditioner.empty_is_null}
    if isinstance(conditioner, LUTConditioner):
        return {"kind": "lut", "vocab": list(conditioner.tokenizer.index), "dim": conditioner.dim,
                "output_dim": conditioner.output_dim, "split_words": conditioner.tokenizer.split_words}
    if isinstance(conditioner, ChromaConditioner):
        return {"kind": "chroma", "chroma": asdict(conditioner.config),
                "match_length": conditioner.match_length,
                "output_dim": conditioner.output_proj.out_features}
    if isinstance(conditioner, BeatConditioner):
        return {"kind": "beat", "dim": conditioner.dim, "frame_rate": conditioner.frame_rate,
                "harmonics": list(conditioner.harmonics)}
    if isinstance(conditioner, KeyConditioner):
        return {"kind": "key", "dim": conditioner.dim}
    if isinstance(conditioner, InstrumentConditioner):
        return {"kind": "instrument", "dim": conditioner.dim, "vocabulary": list(conditioner.vocabulary)}
    raise ValueError(f"tokenwave's format cannot store a {type(conditioner).__name__} conditioner")


def _conditioner_from_spec(name: str, spec: dict, folder: Path, target: LoadTarget) -> nn.Module:
    kind = spec.get("kind")
    try:
        if kind == "t5":
            t5_folder = folder / spec["folder"]
            check_t5_files(t5_folder)
            try:
                with quiet_transformers():
                    return T5Conditioner.from_pretrained(
                        t5_folder, output_dim=spec["output_dim"], finetune=spec["finetune"],
                        word_dropout=spec["word_dropout"], empty_is_null=spec["empty_is_null"],
                        dtype=target.t5_dtype)
            except (OSError, ValueError, RuntimeError, TypeError) as error:
                if isinstance(error, (CheckpointError, FileNotFoundError)):
                    raise
                reason = " ".join(str(error).split())[:300]
                raise CheckpointError(f"{t5_folder}: expected a transformers T5 folder, found one that "
                                      f"cannot be loaded ({reason})") from None
        if kind == "lut":
            return LUTConditioner(vocab=spec["vocab"], dim=spec["dim"], output_dim=spec["output_dim"],
                                  split_words=spec["split_words"])
        if kind == "chroma":
            return ChromaConditioner(output_dim=spec["output_dim"], config=ChromaConfig(**spec["chroma"]),
                                     match_length=spec["match_length"])
        if kind in ("beat", "key", "instrument"):
            try:
                if kind == "key":
                    return KeyConditioner(dim=spec["dim"])
                if kind == "instrument":
                    vocabulary = spec["vocabulary"]
                    if not isinstance(vocabulary, list):
                        raise TypeError(f"vocabulary must be a list of names, found {type(vocabulary).__name__}")
                    return InstrumentConditioner(dim=spec["dim"], vocabulary=vocabulary)
                return BeatConditioner(dim=spec["dim"], frame_rate=spec["frame_rate"], harmonics=spec["harmonics"])
            except (TypeError, ValueError) as error:
                raise CheckpointError(f"{folder / CONFIG_NAME}: conditioner {name!r} ({kind}) has invalid "
                                      f"settings {spec!r} ({error})") from None
    except KeyError as error:
        raise CheckpointError(f"{folder / CONFIG_NAME}: conditioner {name!r} lacks {error}") from None
    raise CheckpointError(f"{folder / CONFIG_NAME}: conditioner {name!r} has unknown kind {kind!r} "
                          f"(expected t5, lut, chroma, beat, key or instrument)")


def load_tokenwave(folder: Path, target: LoadTarget) -> GeneratorParts:
    """A tokenwave generator folder (see the module docstring)."""
    data = read_json_file(folder / CONFIG_NAME)
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{folder / CONFIG_NAME}: expected format_version <= {FORMAT_VERSION}, found "
                              f"{version!r} (written by a newer tokenwave?)")
    try:
        lm_config = LMConfig.from_dict(data["lm"])
        config = GeneratorConfig.from_dict(data["generator"])
        fuser = FuserConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["fuser"].items()})
        specs, codec_spec = data["conditioners"], data["codec"]
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{folder / CONFIG_NAME}: not a valid tokenwave generator config ({error})") \
            from None
    target.use_quantization(data.get("lm_quantization"), folder / CONFIG_NAME)
    weights = Weights(folder)
    lm_keys = [k for k in weights.keys() if not k.startswith(PROVIDER_PREFIX)]
    provider_keys = [k for k in weights.keys() if k.startswith(PROVIDER_PREFIX)]
    layers = group_by_layer(lm_keys)
    groups = weights.groups([*layers, provider_keys], lambda t: t)
    lm_state = {}
    for _ in layers:  # one layer at a time: a quantized LM never holds its float weights
        lm_state.update(target.lm_state(next(groups)))
    conditioner_state = {k: target.lm(v) for k, v in next(groups).items()}
    lm = meta_lm(lm_config, lm_state, weights.where, target)
    provider = ConditionProvider({name: _conditioner_from_spec(name, spec, folder, target)
                                  for name, spec in specs.items()})
    provider = load_provider(provider, provider_state(conditioner_state), target, weights.where,
                             t5_loaded=True)
    codec_folder = folder / codec_spec.get("folder", CODEC_DIR)
    codec = ready_codec(codec_folder, target.device, bool(codec_spec.get("stereo")))
    return GeneratorParts(lm, codec, provider, ConditionFuser(fuser), config)
