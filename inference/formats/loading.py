"""What the generator formats share: where weights go, lazy reading, assignment into meta models.

Memory: the LM (up to 3.3B parameters) and, for transformers folders, T5 are built on the meta
device and their tensors assigned (``load_state_dict(assign=True)``) one by one from a
memory-mapped file (``safe_open``; pickles with :func:`codec.files.read_pickle` ``mmap=True``),
converted straight to the chosen device and dtype, so the weights exist once. The codec (tens of
millions of parameters) is read whole by :mod:`codec.formats`, then assigned the same way.

Quantized LMs (``dtype="int8"``, ``"int4"``, ``"int4-g<N>"``; :mod:`lm.quant`): from a float
checkpoint of any format the matrices are quantized one at a time as they are read (one
transformer layer at a time, :func:`group_by_layer`), so no full float copy is held; a
checkpoint that holds quantized weights loads them as they are.
"""
from __future__ import annotations

import os
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from codec.conv import fold_weight_norm
from codec.formats import (CheckpointError, read_checkpoint, read_json_file, read_safetensors_file,
                           remember_weights_id, state_weights_id)
from codec.model import EncodecModel, InterleavedStereo
from conditioning import ConditionFuser, ConditionProvider, T5Conditioner
from lm import LMConfig, LMModel
from lm.quant import QuantConfig, is_matrix_key, is_quant_spec, is_quantized_key, quantize_lm, quantize_state

from ..config import GeneratorConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PROVIDER_PREFIX = "condition_provider."
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

StateDict = dict[str, torch.Tensor]


class GeneratorParts(NamedTuple):
    """What every format reader returns: the keyword arguments of a generator's constructor."""

    lm: LMModel
    codec: EncodecModel | InterleavedStereo
    condition_provider: ConditionProvider
    fuser: ConditionFuser
    config: GeneratorConfig


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


class LoadTarget:
    """Where weights go: device, LM dtype (and quantization), and T5's dtype (float16 T5
    overflows: kept float32)."""

    def __init__(self, device: str | torch.device | None, dtype: torch.dtype | str | None) -> None:
        self.device, self.requested = resolve_device(device), dtype
        dtype, self.quant = parse_dtype(dtype)
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point type, found {dtype}")
        self.dtype = dtype
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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when available else CPU; a CUDA device without CUDA raises."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available here")
    return device


def assign(module: nn.Module, state: StateDict, where: Path | str) -> nn.Module:
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


def _brief(items: Iterable[str], limit: int = 5) -> str:
    items = sorted(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return (", ".join(items[:limit]) or "none") + more


def meta_lm(config: LMConfig, state: StateDict, where: Path | str, target: LoadTarget) -> LMModel:
    """The LM built on the meta device (quantized modules when the target quantizes) and
    assigned ``state``; eval mode."""
    with torch.device("meta"):
        model = LMModel(config)
        if target.quant is not None:  # the quantized modules, to receive the quantized state
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # int4 -> int8 fallbacks: shown when quantizing
                quantize_lm(model, target.quant)
    return assign(model, state, where).eval()


def ready_codec(path: Path, device: torch.device, stereo: bool, models_dir: str | os.PathLike | None = None,
                copy: bool = False) -> EncodecModel | InterleavedStereo:
    """A ready codec (weight norm folded, eval, float32) from any format :mod:`codec.formats`
    reads; ``copy`` detaches the weights from the file (which is about to be deleted)."""
    checkpoint = read_checkpoint(path, models_dir=models_dir)
    with torch.device("meta"):
        model = EncodecModel(checkpoint.config)
    if any(k.endswith((".conv.conv.weight", ".convtr.convtr.weight")) for k in checkpoint.state) \
            and checkpoint.config.norm == "weight_norm":
        fold_weight_norm(model)
    state = {k: v.to(device=device, dtype=torch.float32, copy=copy) for k, v in checkpoint.state.items()}
    model = assign(model, state, checkpoint.path).prepare_for_inference()
    remember_weights_id(model, state_weights_id(checkpoint.state))  # as codec.formats.load_model
    return InterleavedStereo(model) if stereo else model


_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def group_by_layer(keys: Iterable[str]) -> list[list[str]]:
    """``keys`` grouped by transformer layer (``.layers.<i>.``), the others in one group: the
    unit weights are read, translated and quantized in."""
    groups: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        match = _LAYER_INDEX.search(key)
        groups[match[1] if match else "rest"].append(key)
    return list(groups.values())


class Weights:
    """The tensors of ``model.safetensors`` or of a sharded set (``model.safetensors.index.json``),
    read lazily from the memory-mapped files."""

    def __init__(self, folder: Path, name: str = WEIGHTS_NAME) -> None:
        single, index = folder / name, folder / (name + ".index.json")
        if single.is_file():
            self.files = dict.fromkeys(read_safetensors_file(single, keys_only=True), single)
        elif index.is_file():  # a truncated file is caught by the reader above
            weight_map = read_json_file(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: expected a 'weight_map' from names to shard files")
            self.files = {key: folder / file for key, file in weight_map.items()}
        else:
            raise CheckpointError(f"{folder}: expected the weights in {name} (or shards listed in "
                                  f"{index.name}); found {sorted(p.name for p in folder.iterdir())[:10]}")
        self.where = single if single.is_file() else index

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
                        handle = safe_open(str(path), framework="pt", device="cpu")
                        handles[path] = stack.enter_context(handle)
                    out[key] = convert(handles[path].get_tensor(key))
            yield out


def provider_state(state: StateDict) -> StateDict:
    """The ``condition_provider.*`` entries of ``state``, prefix removed."""
    return {k[len(PROVIDER_PREFIX):]: v for k, v in state.items() if k.startswith(PROVIDER_PREFIX)}


def load_provider(provider: ConditionProvider, state: StateDict, target: LoadTarget, where: Path | str, *,
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


_T5_JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def check_t5_files(folder: Path) -> None:
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
            reason = " ".join(str(error).split())[:200]
            raise CheckpointError(f"{spiece}: expected a sentencepiece model, found {spiece.stat().st_size} "
                                  f"bytes that cannot be read ({reason})") from None
