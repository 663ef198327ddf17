"""Assemble a generator from a checkpoint folder in any supported format; save tokenwave's.

Formats (:func:`detect_format`):

- ``"tokenwave"``: ``config.json`` (``"format": "tokenwave-musicgen"``: LM config, generator
  config, fuser, one spec per conditioner, codec layout), ``model.safetensors`` (LM weights
  with audiocraft's names plus ``condition_provider.*``), ``codec/`` (the codec in
  :mod:`codec.formats`' tokenwave format) and, for T5-conditioned models, ``t5/`` (a
  transformers T5 folder: ``config.json``, ``model.safetensors``, ``tokenizer.json``,
  ``tokenizer_config.json``, ``spiece.model``; fine-tuned or jointly trained weights too). The
  folder is self-contained: nothing outside it is read. Round-trips; ``save_generator(...,
  dtype=torch.bfloat16)`` (or float16) stores the LM, conditioner and T5 weights at half size
  (the codec stays float32), and loading converts them to the requested dtype (float32 by
  default).
- ``"audiocraft"``: ``state_dict.bin`` (``{'best_state', 'xp.cfg': YAML, ...}``) and
  ``compression_state_dict.bin`` (a codec, or the pointer ``{'pretrained':
  'facebook/encodec_32khz'}`` that :mod:`codec.registry` resolves, from the Hugging Face cache
  or hub if need be). The YAML gives the LM, the conditioners, the fuser and the window
  (``dataset.segment_duration``). T5 is not in the checkpoint, only its name
  (``conditioners.description.t5.name``): it is looked for in ``t5_path=``, the folder itself,
  ``<folder>/<name>``, ``<folder>/t5``, ``$TOKENWAVE_MODELS/<name>``, then the Hugging Face
  cache and hub (:func:`inference.registry.find_t5`).
- ``"transformers"``: ``config.json`` (``model_type`` ``musicgen`` or ``musicgen_melody``) and
  ``model.safetensors`` (``text_encoder.*``, ``audio_encoder.*``, ``decoder.*``,
  ``enc_to_dec_proj.*``, ``audio_enc_to_dec_proj.*``), plus the tokenizer files
  (``spiece.model``) that the hub folders carry. Stereo models (``audio_channels: 2``, 8
  codebooks) get the interleaved-stereo codec. There is no window in these files: 30 s, as the
  models were trained (override with ``max_duration=``).

Memory: the LM (up to 3.3B parameters) and, for transformers folders, T5 are built on the
meta device and their tensors assigned (``load_state_dict(assign=True)``) one by one from a
memory-mapped file (``safe_open``; pickles with ``torch.load(weights_only=True, mmap=True)``),
converted straight to the chosen device and dtype, so the weights exist once. The codec (tens
of millions of parameters) is read whole by :mod:`codec.formats`, then assigned the same way.

Quantized LMs (``dtype="int8"``, ``"int4"``, ``"int4-g<N>"``; :mod:`lm.quant`): from a float
checkpoint of any format the matrices are quantized one at a time as they are read, so no full
float copy is held; a tokenwave folder saved from a quantized LM records the quantization
(``"lm_quantization"`` in ``config.json``) and holds the integers and scales, which load as
they are (no dequantizing, no float weights).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from codec.conv import fold_weight_norm
from codec.formats import (CheckpointError, read_checkpoint, read_json_file, read_safetensors_file,
                           remember_weights_id, save_model, state_weights_id)
from codec.model import EncodecModel, InterleavedStereo
from conditioning import (
    FUSER_PRESETS,
    ChromaConditioner,
    ChromaConfig,
    ConditionFuser,
    ConditionProvider,
    FuserConfig,
    LUTConditioner,
    T5Conditioner,
)
from conditioning.text import quiet_transformers, read_spiece
from inference.loaders import read_audiocraft_lm, transformers_to_audiocraft_lm
from lm import LMConfig, LMModel, stereo_delays
from lm.quant import QuantConfig, is_matrix_key, is_quant_spec, is_quantized_key, quantize_lm, quantize_state

from . import hub, registry
from .generator import AUDIOGEN_CONFIG, AudioGen, GeneratorConfig, MusicGen

FORMAT_MARKER = "tokenwave-musicgen"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CODEC_DIR = "codec"
T5_DIR = "t5"
AUDIOCRAFT_LM = "state_dict.bin"
AUDIOCRAFT_CODEC = "compression_state_dict.bin"
PREPROCESSOR_NAME = "preprocessor_config.json"
MUSICGEN_TYPES = ("musicgen", "musicgen_melody")
TRANSFORMERS_WINDOW = 30.0  # MusicGen's training window; the transformers files do not carry it
PROVIDER_PREFIX = "condition_provider."

StateDict = dict[str, torch.Tensor]


# -- public API ----------------------------------------------------------------------------------
def detect_format(path: str | os.PathLike) -> str:
    """``"tokenwave"``, ``"audiocraft"`` or ``"transformers"`` for a generator folder (or an
    audiocraft ``state_dict.bin``)."""
    path = Path(path)
    if path.is_file() and path.name == AUDIOCRAFT_LM:
        return "audiocraft"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such generator folder")
    if (path / CONFIG_NAME).is_file():
        data = _read_json(path / CONFIG_NAME)
        if data.get("format") == FORMAT_MARKER:
            return "tokenwave"
        if data.get("model_type") in MUSICGEN_TYPES:
            return "transformers"
    if (path / AUDIOCRAFT_LM).is_file():
        return "audiocraft"
    found = sorted(p.name for p in path.iterdir())[:10]
    raise CheckpointError(f"{path}: expected a generator folder: {CONFIG_NAME} with \"format\": "
                          f"\"{FORMAT_MARKER}\" (tokenwave), {CONFIG_NAME} with model_type musicgen or "
                          f"musicgen_melody (transformers), or {AUDIOCRAFT_LM} (audiocraft); found {found}")


def load_generator(path_or_name: str | os.PathLike, *, cls: type[MusicGen] = MusicGen,
                   device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                   t5_path: str | os.PathLike | None = None, models_dir: str | os.PathLike | None = None,
                   max_duration: float | None = None, extend_stride: float | None = None,
                   revision: str | None = None, local_files_only: bool = False) -> MusicGen:
    """Build ``cls`` from a folder in any format, or a model name (:mod:`inference.registry`).

    See :meth:`inference.generator.MusicGen.from_pretrained` for the arguments. A hub name is
    read at ``revision`` (branch, tag or commit); ``local_files_only`` keeps every lookup (the T5
    and codec an audiocraft checkpoint names too) to local folders and the Hugging Face cache.
    """
    if local_files_only and hub.offline_reason() is None:
        with hub.local_files_only():
            return load_generator(path_or_name, cls=cls, device=device, dtype=dtype, t5_path=t5_path,
                                  models_dir=models_dir, max_duration=max_duration,
                                  extend_stride=extend_stride, revision=revision)
    text = os.fspath(path_or_name)
    path = Path(text) if os.path.exists(text) and revision is None else \
        registry.resolve(text, models_dir=models_dir, revision=revision)
    target = _Target(_resolve_device(device), dtype)
    kind = detect_format(path)
    if kind == "audiocraft":
        parts = _load_audiocraft(path, target, cls, t5_path, models_dir)
    elif kind == "transformers":
        parts = _load_transformers(path, target, t5_path)
    else:
        parts = _load_tokenwave(path, target)
    config = parts.pop("config")
    overrides = {k: v for k, v in (("max_duration", max_duration), ("extend_stride", extend_stride))
                 if v is not None}
    if overrides:
        config = replace(config, **overrides)
    return cls(**parts, config=config)


def parse_dtype(dtype: torch.dtype | str | None) -> tuple[torch.dtype, QuantConfig | None]:
    """The LM's float dtype and quantization for a ``dtype=`` argument: a torch dtype, one of
    ``"float32"``, ``"float16"``, ``"bfloat16"``, or ``"int8"`` / ``"int4"`` / ``"int4-g<N>"``
    (weight-only quantization, float32 activations)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32, None
    if dtype in SAVE_DTYPES:
        return SAVE_DTYPES[dtype], None
    if is_quant_spec(dtype):
        return torch.float32, QuantConfig.parse(dtype)
    raise ValueError(f"dtype must be a torch dtype or one of {sorted(SAVE_DTYPES)}, 'int8', 'int4', "
                     f"'int4-g32', 'int4-g64', 'int4-g128'; got {dtype!r}")


SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    codec = generator.codec.model if isinstance(generator.codec, InterleavedStereo) else generator.codec
    specs = {name: _conditioner_spec(c) for name, c in generator.condition_provider.conditioners.items()}
    t5 = [c for c in generator.condition_provider.conditioners.values() if isinstance(c, T5Conditioner)]
    if len(t5) > 1:
        raise ValueError("tokenwave's format holds one T5 conditioner, found several")
    data = {
        "format": FORMAT_MARKER, "format_version": FORMAT_VERSION,
        "lm": generator.lm.config.to_dict(),
        "generator": generator.config.to_dict(),
        "fuser": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(generator.fuser.config).items()},
        "conditioners": specs,
        "codec": {"folder": CODEC_DIR, "stereo": isinstance(generator.codec, InterleavedStereo)},
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
    kept = (lambda k: is_quantized_key(k) or is_matrix_key(k)) if quantization is not None else (lambda k: False)
    state = {k: _stored(v, None if kept(k) else dtype) for k, v in state.items()}  # integers, scales as they are

    def write(folder: Path) -> None:
        from safetensors.torch import save_file

        (folder / CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        save_model(codec, folder / CODEC_DIR, format="tokenwave")
        if t5:
            t5[0].save_pretrained(folder / T5_DIR, dtype=dtype)

    return _write_folder(path, write, overwrite)


def _stored(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach().to("cpu")
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.contiguous()


# -- shared pieces -------------------------------------------------------------------------------
class _Target:
    """Where weights go: device, LM dtype (and quantization), and T5's dtype (float16 T5
    overflows: kept float32)."""

    def __init__(self, device: torch.device, dtype: torch.dtype | str | None) -> None:
        self.requested = dtype
        dtype, self.quant = parse_dtype(dtype)
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point type, found {dtype}")
        self.device, self.dtype = device, dtype
        self.t5_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        self.prequantized = False  # set when the checkpoint holds quantized LM weights

    def lm(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=self.dtype)

    def lm_state(self, state: StateDict) -> StateDict:
        """LM tensors on the target; with a quantization, float matrices are quantized one at a
        time (``state`` is emptied as it is read); a quantized checkpoint's integers, scales and
        bfloat16 heads are kept as stored."""
        if self.prequantized:
            return {k: v.to(self.device) if is_quantized_key(k) or is_matrix_key(k) else self.lm(v)
                    for k, v in state.items()}
        if self.quant is None:
            return {k: self.lm(v) for k, v in state.items()}
        return quantize_state(state, self.quant, convert=self.lm)

    def use_quantization(self, stored: dict | None, where: Path | str) -> None:
        """Adopt a checkpoint's quantization (``config.json``'s ``lm_quantization``)."""
        if stored is None:
            return
        try:
            quant = QuantConfig.from_dict(stored)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{where}: invalid lm_quantization {stored!r} ({error})") from None
        if (self.quant is not None and self.quant != quant) or self.dtype != torch.float32:
            raise CheckpointError(f"{where}: the LM is stored quantized ({quant.name}); load it with "
                                  f"dtype={quant.name!r} or no dtype (asked: {self.requested!r}); other "
                                  f"dtypes need the float checkpoint")
        self.quant, self.prequantized = quant, True

    def t5(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=self.t5_dtype)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available here")
    return device


def _read_json(path: Path) -> dict:
    return read_json_file(path)  # the one safe reader: errors name the file


def _assign(module: nn.Module, state: StateDict, where: Path | str) -> nn.Module:
    """Load ``state`` into a meta-built ``module`` by assignment; every tensor must be given."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as error:  # shape mismatches
        raise CheckpointError(f"{where}: weights do not fit the config: {error}") from None
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not fit the config: missing {_brief(missing)}; "
                              f"unexpected {_brief(unexpected)}")
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{where}: no weights for {_brief(left)}")
    return module


def _brief(items, limit: int = 5) -> str:
    items = sorted(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return (", ".join(items[:limit]) or "none") + more


def _meta_lm(config: LMConfig, state: StateDict, where: Path | str, target: _Target) -> LMModel:
    with torch.device("meta"):
        model = LMModel(config)
        if target.quant is not None:  # the quantized modules, to receive the quantized state
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # int4 -> int8 fallbacks: shown when quantizing
                quantize_lm(model, target.quant)
    return _assign(model, state, where).eval()


def _codec(path: Path, device: torch.device, stereo: bool, models_dir: str | os.PathLike | None = None,
           copy: bool = False) -> EncodecModel | InterleavedStereo:
    """A ready codec (weight norm folded, eval, float32) from any format :mod:`codec.formats` reads;
    ``copy`` detaches the weights from the file (which is about to be deleted)."""
    checkpoint = read_checkpoint(path, models_dir=models_dir)
    with torch.device("meta"):
        model = EncodecModel(checkpoint.config)
    if any(k.endswith((".conv.conv.weight", ".convtr.convtr.weight")) for k in checkpoint.state) \
            and checkpoint.config.norm == "weight_norm":
        fold_weight_norm(model)
    state = {k: v.to(device=device, dtype=torch.float32, copy=copy) for k, v in checkpoint.state.items()}
    model = _assign(model, state, checkpoint.path).prepare_for_inference()
    remember_weights_id(model, state_weights_id(checkpoint.state))  # as codec.formats.load_model
    return InterleavedStereo(model) if stereo else model


class _Weights:
    """The tensors of ``model.safetensors`` or of a sharded set (``model.safetensors.index.json``),
    read lazily from the memory-mapped files."""

    def __init__(self, folder: Path, name: str = WEIGHTS_NAME) -> None:
        single, index = folder / name, folder / (name + ".index.json")
        if single.is_file():
            self.files = dict.fromkeys(self._keys_of(single), single)
        elif index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: expected a 'weight_map' from names to shard files")
            self.files = {key: folder / file for key, file in weight_map.items()}
        else:
            raise CheckpointError(f"{folder}: expected the weights in {name} (or shards listed in "
                                  f"{index.name}); found {sorted(p.name for p in folder.iterdir())[:10]}")
        self.where = single if single.is_file() else index

    @staticmethod
    def _keys_of(path: Path) -> list[str]:
        return read_safetensors_file(path, keys_only=True)  # a truncated file is caught here

    def keys(self) -> list[str]:
        return list(self.files)

    def groups(self, groups: list[list[str]], convert: Callable[[torch.Tensor], torch.Tensor]
               ) -> Iterator[StateDict]:
        """The tensors group by group, each converted as soon as it is read.

        The files are opened per group: a memory map keeps every page read through it resident
        (and counted in RSS) until it is closed, so holding one open across groups would keep
        a whole float checkpoint resident while it is being quantized.
        """
        from safetensors import safe_open

        for keys in groups:
            with ExitStack() as stack:
                handles: dict[Path, Any] = {}
                out = {}
                for key in keys:
                    path = self.files[key]
                    if path not in handles:
                        if not path.is_file():
                            raise CheckpointError(f"{self.where}: shard {path.name} is missing")
                        handles[path] = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                    out[key] = convert(handles[path].get_tensor(key))
            yield out


def _torch_load(path: Path) -> Any:
    """A pickled checkpoint, memory-mapped when its format allows, tensors only."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):  # only the legacy (non-zip) format refuses mmap
            raise CheckpointError(f"{path}: expected a torch checkpoint of tensors ({error})") from None
    except Exception as error:
        raise CheckpointError(f"{path}: expected a torch checkpoint of tensors, found one that cannot be "
                              f"loaded ({' '.join(str(error).split())[:300]})") from None
    return torch.load(path, map_location="cpu", weights_only=True)


def _provider_state(state: StateDict) -> StateDict:
    return {k[len(PROVIDER_PREFIX):]: v for k, v in state.items() if k.startswith(PROVIDER_PREFIX)}


def _load_provider(provider: ConditionProvider, state: StateDict, target: _Target, where: Path | str, *,
                   t5_loaded: bool = False) -> ConditionProvider:
    """Conditioner weights (output projections, lookup tables; fine-tuned T5 weights unless
    ``t5_loaded``: they came with the T5 folder)."""
    try:
        missing, unexpected = provider.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise CheckpointError(f"{where}: conditioner weights do not fit: {' '.join(str(error).split())}") \
            from None
    missing = [k for k in missing if not (t5_loaded and ".t5." in k)]
    if missing or unexpected:
        raise CheckpointError(f"{where}: conditioner weights do not fit: missing {_brief(missing)}; "
                              f"unexpected {_brief(unexpected)}")
    for conditioner in provider.conditioners.values():
        if isinstance(conditioner, T5Conditioner):
            # A trained T5 (a submodule) keeps the dtype it was loaded in, as a frozen one does:
            # T5 overflows in float16. Only the projection takes the LM's dtype.
            conditioner.to(device=target.device)
            if conditioner.output_proj is not None:
                conditioner.output_proj.to(dtype=target.dtype)
        else:
            conditioner.to(device=target.device, dtype=target.dtype)
    return provider.eval()


# -- tokenwave -----------------------------------------------------------------------------------
def _conditioner_spec(conditioner: nn.Module) -> dict:
    if isinstance(conditioner, T5Conditioner):
        return {"kind": "t5", "folder": T5_DIR, "output_dim": None if conditioner.output_proj is None
                else conditioner.output_dim, "finetune": conditioner.finetune,
                "word_dropout": conditioner.word_dropout, "empty_is_null": conditioner.empty_is_null}
    if isinstance(conditioner, LUTConditioner):
        return {"kind": "lut", "vocab": list(conditioner.tokenizer.index), "dim": conditioner.dim,
                "output_dim": conditioner.output_dim, "split_words": conditioner.tokenizer.split_words}
    if isinstance(conditioner, ChromaConditioner):
        return {"kind": "chroma", "chroma": asdict(conditioner.config), "match_length": conditioner.match_length,
                "output_dim": conditioner.output_proj.out_features}
    raise ValueError(f"tokenwave's format cannot store a {type(conditioner).__name__} conditioner")


def _conditioner_from_spec(name: str, spec: dict, folder: Path, target: _Target) -> nn.Module:
    kind = spec.get("kind")
    try:
        if kind == "t5":
            t5_folder = folder / spec["folder"]
            _check_t5_files(t5_folder)
            try:
                with quiet_transformers():
                    return T5Conditioner.from_pretrained(
                        t5_folder, output_dim=spec["output_dim"], finetune=spec["finetune"],
                        word_dropout=spec["word_dropout"], empty_is_null=spec["empty_is_null"],
                        dtype=target.t5_dtype)
            except (OSError, ValueError, RuntimeError, TypeError) as error:
                if isinstance(error, (CheckpointError, FileNotFoundError)):
                    raise
                raise CheckpointError(f"{t5_folder}: expected a transformers T5 folder, found one that cannot "
                                      f"be loaded ({' '.join(str(error).split())[:300]})") from None
        if kind == "lut":
            return LUTConditioner(vocab=spec["vocab"], dim=spec["dim"], output_dim=spec["output_dim"],
                                  split_words=spec["split_words"])
        if kind == "chroma":
            return ChromaConditioner(output_dim=spec["output_dim"], config=ChromaConfig(**spec["chroma"]),
                                     match_length=spec["match_length"])
    except KeyError as error:
        raise CheckpointError(f"{folder / CONFIG_NAME}: conditioner {name!r} lacks {error}") from None
    raise CheckpointError(f"{folder / CONFIG_NAME}: conditioner {name!r} has unknown kind {kind!r} "
                          f"(expected t5, lut or chroma)")


_T5_JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _check_t5_files(folder: Path) -> None:
    """Read the T5 folder's JSON files and weights header with the safe readers, so a truncated
    ``model.safetensors`` or a garbage tokenizer is named, rather than raised by transformers."""
    for name in _T5_JSON_FILES:
        if (folder / name).is_file():
            read_json_file(folder / name, f"the T5 {name}")
    if (folder / "model.safetensors").is_file():
        read_safetensors_file(folder / "model.safetensors", keys_only=True)
    spiece = folder / "spiece.model"
    if spiece.is_file():
        from sentencepiece import SentencePieceProcessor

        try:
            SentencePieceProcessor(model_file=str(spiece))
        except Exception as error:  # sentencepiece raises OSError or RuntimeError for bad files
            raise CheckpointError(f"{spiece}: expected a sentencepiece model, found {spiece.stat().st_size} "
                                  f"bytes that cannot be read ({' '.join(str(error).split())[:200]})") from None


def _load_tokenwave(folder: Path, target: _Target) -> dict:
    data = _read_json(folder / CONFIG_NAME)
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
    weights = _Weights(folder)
    lm_keys = [k for k in weights.keys() if not k.startswith(PROVIDER_PREFIX)]
    provider_keys = [k for k in weights.keys() if k.startswith(PROVIDER_PREFIX)]
    layers: dict[str, list[str]] = defaultdict(list)
    for key in lm_keys:
        match = _LAYER_INDEX.search(key)
        layers[match[1] if match else "rest"].append(key)
    groups = weights.groups([*layers.values(), provider_keys], lambda t: t)
    lm_state = {}
    for _ in layers:  # one layer at a time: a quantized LM never holds its float weights
        lm_state.update(target.lm_state(next(groups)))
    provider_state = {k: target.lm(v) for k, v in next(groups).items()}
    lm = _meta_lm(lm_config, lm_state, weights.where, target)
    provider = ConditionProvider({name: _conditioner_from_spec(name, spec, folder, target)
                                  for name, spec in specs.items()})
    provider = _load_provider(provider, _provider_state(provider_state), target, weights.where, t5_loaded=True)
    codec = _codec(folder / codec_spec.get("folder", CODEC_DIR), target.device, bool(codec_spec.get("stereo")))
    return dict(lm=lm, codec=codec, condition_provider=provider, fuser=ConditionFuser(fuser), config=config)


# -- transformers ----------------------------------------------------------------------------------
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
_LM_PREFIXES = ("decoder.", "enc_to_dec_proj.", "audio_enc_to_dec_proj.")


def _transformers_lm_config(data: dict, where: Path) -> LMConfig:
    decoder = data.get("decoder")
    if not isinstance(decoder, dict):
        raise CheckpointError(f"{where}: expected a 'decoder' section in the MusicGen config")
    melody = data.get("model_type") == "musicgen_melody"
    card, channels = int(decoder["vocab_size"]), int(decoder.get("audio_channels", 1))
    problems = []
    if decoder.get("scale_embedding"):
        problems.append("scale_embedding=true")
    if decoder.get("cross_attention_hidden_size") not in (None, decoder["hidden_size"]):
        problems.append(f"cross_attention_hidden_size={decoder['cross_attention_hidden_size']}")
    if decoder.get("bos_token_id", card) != card:
        problems.append(f"bos_token_id={decoder.get('bos_token_id')} (expected the special token {card})")
    if channels not in (1, 2):
        problems.append(f"audio_channels={channels}")
    if problems:
        raise CheckpointError(f"{where}: unsupported MusicGen decoder settings: {', '.join(problems)}")
    num_codebooks = int(decoder["num_codebooks"])
    return LMConfig(
        dim=int(decoder["hidden_size"]), num_heads=int(decoder["num_attention_heads"]),
        num_layers=int(decoder["num_hidden_layers"]), ffn_dim=int(decoder["ffn_dim"]),
        num_codebooks=num_codebooks, card=card, cross_attention=not melody,
        activation=decoder.get("activation_function", "gelu"),
        delays=tuple(stereo_delays(num_codebooks // 2)) if channels == 2 else None)


def _transformers_lm_state(weights: _Weights, target: _Target) -> StateDict:
    """Decoder and projection weights in audiocraft names, translated one layer at a time (q, k, v
    are packed per layer), so only one layer's worth of extra memory is ever held."""
    groups: dict[str, list[str]] = defaultdict(list)
    for key in weights.keys():
        if key.startswith(_LM_PREFIXES) and not key.endswith("embed_positions.weights"):
            match = _LAYER_INDEX.search(key)
            groups[match[1] if match else "rest"].append(key)
    state: StateDict = {}
    for group in weights.groups(list(groups.values()), lambda t: t):
        try:
            translated = transformers_to_audiocraft_lm(group)
        except KeyError as error:
            raise CheckpointError(f"{weights.where}: {error.args[0]}") from None
        state.update(target.lm_state(translated))  # quantized here, one layer at a time
    return state


def _transformers_t5(data: dict, weights: _Weights, target: _Target) -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    text = data.get("text_encoder")
    if not isinstance(text, dict) or text.get("model_type") not in ("t5", None):
        raise CheckpointError(f"{weights.where.parent / CONFIG_NAME}: expected a T5 text_encoder, found "
                              f"{None if not isinstance(text, dict) else text.get('model_type')!r}")
    config = T5Config.from_dict({k: v for k, v in text.items() if k != "model_type"})
    with torch.device("meta"):
        encoder = T5EncoderModel(config)
    prefix = "text_encoder."
    (state,) = weights.groups([[k for k in weights.keys() if k.startswith(prefix)]], target.t5)
    state = {k[len(prefix):]: v for k, v in state.items()}
    tied = "encoder.embed_tokens.weight"
    if tied not in state and "shared.weight" in state:
        state[tied] = state["shared.weight"]  # transformers stores the tied embedding once
    return _assign(encoder, state, weights.where).eval()


def _transformers_tokenizer(folder: Path, t5_path: str | os.PathLike | None):
    """The T5 tokenizer and the bytes of its ``spiece.model`` (None when there is only tokenizer.json)."""
    from transformers import T5Tokenizer

    source = Path(t5_path) if t5_path is not None else folder
    if not ((source / "spiece.model").is_file() or (source / "tokenizer.json").is_file()):
        raise CheckpointError(f"{source}: no T5 tokenizer (spiece.model or tokenizer.json); the hub "
                              f"folders carry one next to config.json, or pass t5_path= to a T5 folder")
    _check_t5_files(source)
    return T5Tokenizer.from_pretrained(str(source)), read_spiece(source)


def _chroma_config_from_transformers(folder: Path, chroma_length: int) -> ChromaConfig:
    """MusicgenMelody's feature extractor settings (preprocessor_config.json, else its defaults)."""
    extractor = _read_json(folder / PREPROCESSOR_NAME) if (folder / PREPROCESSOR_NAME).is_file() else {}
    rate = int(extractor.get("sampling_rate", 32_000))
    n_fft = int(extractor.get("n_fft", 16_384))
    hop = int(extractor.get("hop_length", 4_096))
    # transformers gives the chroma length in frames; ours derives it from a duration. Half a
    # sample keeps the floor in the frame count from rounding down.
    duration = ((chroma_length - 1) * hop + 0.5) / rate
    config = ChromaConfig(sample_rate=rate, num_chroma=int(extractor.get("num_chroma", 12)), n_fft=n_fft,
                          hop_length=hop, argmax=True, duration=duration)
    if config.chroma_length != chroma_length:
        raise CheckpointError(f"{folder}: chroma_length {chroma_length} cannot be expressed with n_fft "
                              f"{n_fft} and hop {hop}")
    return config


def _transformers_codec(folder: Path, data: dict, weights: _Weights, device: torch.device,
                        stereo: bool) -> EncodecModel | InterleavedStereo:
    """The audio encoder; :mod:`codec.formats` reads one weights file, so the codec of a sharded
    folder (tens of millions of parameters) is handed to it as a folder of its own."""
    if (folder / WEIGHTS_NAME).is_file():
        return _codec(folder, device, stereo)
    from safetensors.torch import save_file

    prefix = "audio_encoder."
    (state,) = weights.groups([[k for k in weights.keys() if k.startswith(prefix)]], lambda t: t)
    with tempfile.TemporaryDirectory(prefix="tokenwave-codec-") as tmp:
        (Path(tmp) / CONFIG_NAME).write_text(json.dumps(data["audio_encoder"]), encoding="utf-8")
        save_file({k[len(prefix):]: v.contiguous() for k, v in state.items()}, str(Path(tmp) / WEIGHTS_NAME),
                  metadata={"format": "pt"})
        return _codec(Path(tmp), device, stereo, copy=True)


def _load_transformers(folder: Path, target: _Target, t5_path: str | os.PathLike | None) -> dict:
    where = folder / CONFIG_NAME
    data = _read_json(where)
    weights = _Weights(folder)
    try:
        lm_config = _transformers_lm_config(data, where)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: not a usable MusicGen config ({error})") from None
    state = _transformers_lm_state(weights, target)
    provider_state = _provider_state(state)
    lm_state = {k: v for k, v in state.items() if not k.startswith(PROVIDER_PREFIX)}
    lm = _meta_lm(lm_config, lm_state, weights.where, target)

    encoder = _transformers_t5(data, weights, target)
    projected = "conditioners.description.output_proj.weight" in provider_state
    tokenizer, spiece = _transformers_tokenizer(folder, t5_path)
    text = T5Conditioner(encoder=encoder, tokenizer=tokenizer, output_dim=lm_config.dim if projected else None,
                         empty_is_null=False, spiece_model=spiece)
    conditioners: dict[str, nn.Module] = {"description": text}
    fuser = FUSER_PRESETS["text2music"]
    if data.get("model_type") == "musicgen_melody":
        chroma = _chroma_config_from_transformers(folder, int(data.get("chroma_length", 235)))
        conditioners["self_wav"] = ChromaConditioner(output_dim=lm_config.dim, config=chroma, match_length=True)
        fuser = FUSER_PRESETS["chroma2music"]
    provider = _load_provider(ConditionProvider(conditioners), provider_state, target, weights.where)
    stereo = int(data["decoder"].get("audio_channels", 1)) == 2
    codec = _transformers_codec(folder, data, weights, target.device, stereo)
    config = GeneratorConfig(max_duration=TRANSFORMERS_WINDOW, extend_stride=18.0, mask_condition_padding=True)
    return dict(lm=lm, codec=codec, condition_provider=provider, fuser=ConditionFuser(fuser), config=config)


# -- audiocraft ------------------------------------------------------------------------------------
_INTERPOLATION = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")


def _cfg_get(root: dict, dotted: str, default: Any = KeyError, depth: int = 0) -> Any:
    """``root['a']['b']`` for ``'a.b'``, following whole-value ``${x.y}`` references (OmegaConf's)."""
    node: Any = root
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is KeyError:
                raise KeyError(f"'{dotted}' is missing from the audiocraft config (xp.cfg)")
            return default
        node = node[part]
    if isinstance(node, str) and (match := _INTERPOLATION.match(node)):
        if depth > 10:
            raise KeyError(f"'{dotted}': references nest too deep")
        return _cfg_get(root, match[1], default, depth + 1)
    return node


def _audiocraft_conditioner(name: str, spec: dict, xp_cfg: dict, dim: int, folder: Path, target: _Target,
                            t5_path, models_dir) -> nn.Module:
    kind = spec.get("model")
    options = {k: _cfg_get(xp_cfg, f"conditioners.{name}.{kind}.{k}") for k in (spec.get(kind) or {})}
    if kind == "t5":
        if options.get("normalize_text"):
            raise CheckpointError(f"{folder}: conditioners.{name}.t5.normalize_text=true (spacy text "
                                  f"normalization) is not supported")
        t5 = registry.find_t5(str(options["name"]), near=folder, t5_path=t5_path, models_dir=models_dir)
        _check_t5_files(t5)
        with quiet_transformers():
            return T5Conditioner.from_pretrained(t5, output_dim=dim, finetune=bool(options.get("finetune", False)),
                                                 word_dropout=float(options.get("word_dropout", 0.0)),
                                                 empty_is_null=True, dtype=target.t5_dtype)
    if kind in ("chroma_stem", "chroma"):
        n_fft = 2 ** int(options.get("radix2_exp", 12))
        config = ChromaConfig(sample_rate=int(options.get("sample_rate", _cfg_get(xp_cfg, "sample_rate"))),
                              num_chroma=int(options.get("n_chroma", 12)), n_fft=n_fft, hop_length=n_fft // 4,
                              argmax=bool(options.get("argmax", False)),
                              duration=float(_cfg_get(xp_cfg, "dataset.segment_duration")))
        # audiocraft's MusicGen.get_pretrained switches match_len_on_eval on for inference.
        return ChromaConditioner(output_dim=dim, config=config, match_length=True)
    raise CheckpointError(f"{folder}: conditioner {name!r} of type {kind!r} is not supported (t5, chroma_stem)")


def _audiocraft_fuser(xp_cfg: dict) -> FuserConfig:
    fuser = xp_cfg.get("fuser") or {}
    lists = {mode: tuple(fuser.get(mode) or ()) for mode in ("cross", "prepend", "sum", "input_interpolate")}
    return FuserConfig(**lists, cross_attention_pos_emb=bool(fuser.get("cross_attention_pos_emb", False)),
                       cross_attention_pos_emb_scale=float(fuser.get("cross_attention_pos_emb_scale", 1.0)))


def _load_audiocraft(path: Path, target: _Target, cls: type[MusicGen], t5_path, models_dir) -> dict:
    folder = path.parent if path.is_file() else path
    lm_file = path if path.is_file() else folder / AUDIOCRAFT_LM
    package = _torch_load(lm_file)
    try:
        checkpoint = read_audiocraft_lm(package)
    except ValueError as error:
        raise CheckpointError(f"{lm_file}: {str(error).removeprefix('<dict>: ')}") from None
    xp_cfg = checkpoint.xp_cfg
    lm = _meta_lm(checkpoint.config, target.lm_state(dict(checkpoint.lm_state)), lm_file, target)
    dim = checkpoint.config.dim
    try:
        specs = xp_cfg.get("conditioners") or {}
        conditioners = {name: _audiocraft_conditioner(name, spec, xp_cfg, dim, folder, target, t5_path, models_dir)
                        for name, spec in specs.items()}
        fuser = _audiocraft_fuser(xp_cfg)
        window = float(_cfg_get(xp_cfg, "dataset.segment_duration"))
        channels = int(_cfg_get(xp_cfg, "channels", 1))
        stereo = bool(_cfg_get(xp_cfg, "interleave_stereo_codebooks.use", False)) or channels == 2
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{lm_file}: unsupported audiocraft config: {error}") from None
    provider = ConditionProvider(conditioners)
    fine_tuned = {k for k in provider.state_dict() if ".t5." in k}
    provider_state = _provider_state(checkpoint.condition_state)
    if fine_tuned - set(provider_state):
        raise CheckpointError(f"{lm_file}: T5 is marked fine-tuned but its weights are not in the checkpoint")
    provider = _load_provider(provider, provider_state, target, lm_file)
    codec_file = folder / AUDIOCRAFT_CODEC
    if not codec_file.is_file():
        raise CheckpointError(f"{folder}: expected {AUDIOCRAFT_CODEC} next to {lm_file.name}")
    codec = _codec(codec_file, target.device, stereo, models_dir)
    audiogen = _cfg_get(xp_cfg, "solver", None) == "audiogen" or issubclass(cls, AudioGen)
    stride = (AUDIOGEN_CONFIG if audiogen else cls.default_config).extend_stride
    config = GeneratorConfig(max_duration=window, extend_stride=stride if stride and stride < window else None,
                             mask_condition_padding=False)
    return dict(lm=lm, codec=codec, condition_provider=provider, fuser=ConditionFuser(fuser), config=config)


# -- writing -------------------------------------------------------------------------------------
def _write_folder(path: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    from codec.formats import write_folder_atomically

    return write_folder_atomically(path, write, overwrite=overwrite)


__all__ = ["FORMAT_MARKER", "FORMAT_VERSION", "SAVE_DTYPES", "detect_format", "load_generator", "parse_dtype",
           "save_generator"]
