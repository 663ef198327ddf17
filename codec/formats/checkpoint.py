"""What every checkpoint format shares: :class:`Checkpoint` (format, config, state dict in our key
names), the check of a state against its config, weight-norm spellings, names, and the
identity of a model's weights (:func:`weights_id`).

Every loaded model carries its weights id: the first 8 hex digits of a sha256 over its tensors
as stored (names, dtypes, shapes and bytes, in sorted name order), computed once at load.
``.ecdc`` files of codecs other than the public ones record it (:mod:`codec.ecdc`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .. import registry
from ..config import PRESETS, EncodecConfig
from ..conv import NORMS, PAD_MODES, fold_weight_norm
from ..files import CheckpointError, StateDict, atomic_write, verify_sha256_prefix
from ..model import EncodecModel

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"
AUDIOCRAFT_NAME = "compression_state_dict.bin"

WEIGHTS_ID_LENGTH = 8
_WEIGHTS_ID_ATTR = "_tokenwave_weights_id"


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read from disk: its format, config and state dict in our key names."""

    format: str
    config: EncodecConfig
    state: StateDict
    path: Path


def state_weights_id(state: StateDict) -> str:
    """First 8 hex digits of a sha256 over ``state``: for each tensor in sorted name order, its
    name, dtype, shape and bytes. Equal for a model in memory and the folder it is saved to."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        digest.update(f"{key}|{dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:WEIGHTS_ID_LENGTH]


def remember_weights_id(model: torch.nn.Module, weights_id: str) -> None:
    """Record the identity of the weights a model was loaded from (see :func:`weights_id`)."""
    setattr(model, _WEIGHTS_ID_ATTR, weights_id)


def weights_id(model: torch.nn.Module) -> str:
    """The identity of ``model``'s weights: the one recorded when it was loaded (its stored
    tensors, whatever folding or dtype change came after), else computed from its state dict now
    (not cached: weights in memory may still change)."""
    cached = getattr(model, _WEIGHTS_ID_ATTR, None)
    return cached if cached is not None else state_weights_id(model.state_dict())


def tensors_of(obj: Any, path: Path, what: str) -> StateDict:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected {what} to be a state dict, "
                              f"found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: expected {what} to map names to tensors, found "
                              f"non-tensor entries {brief([str(k) for k in bad])}")
    return canonical_weight_norm(obj)


def canonical_weight_norm(state: StateDict) -> StateDict:
    """Parametrized weight norm (``parametrizations.weight.original0/1``) -> ``weight_g/v``."""
    out = {}
    for key, value in state.items():
        key = key.replace(".parametrizations.weight.original0", ".weight_g")
        out[key.replace(".parametrizations.weight.original1", ".weight_v")] = value
    return out


def is_folded(state: StateDict, config: EncodecConfig) -> bool:
    return config.norm == "weight_norm" and any(
        k.endswith((".conv.conv.weight", ".convtr.convtr.weight")) for k in state)


def build_model(config: EncodecConfig, path: Path) -> EncodecModel:
    _check_supported(config, path)
    try:
        return EncodecModel(config)
    except (ValueError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{path}: its config cannot be built ({error})") from None


def key_names(config: EncodecConfig, path: Path) -> list[str]:
    """The state-dict keys of a model with ``config``, from a narrow twin built in milliseconds.

    Key names depend on the layout (ratios, residual layers, LSTM, shortcut, norm, codebook
    count), never on widths. (Meta tensors would avoid building, but the first arithmetic on
    one imports torch._dynamo, which costs seconds.)
    """
    twin = replace(config, n_filters=config.compress, decoder_filters=None, dimension=1, codebook_size=2)
    return list(build_model(twin, path).state_dict())


def _check_supported(config: EncodecConfig, path: Path) -> None:
    if config.norm not in NORMS:
        raise CheckpointError(f"{path}: unsupported norm {config.norm!r}; expected one of {NORMS}")
    if config.pad_mode not in PAD_MODES:
        raise CheckpointError(f"{path}: unsupported pad mode {config.pad_mode!r}; "
                              f"expected one of {PAD_MODES}")


def checked_model(checkpoint: Checkpoint) -> EncodecModel:
    """A freshly built model for ``checkpoint``'s config, once its state is known to fit."""
    config, state = checkpoint.config, checkpoint.state
    model = build_model(config, checkpoint.path)
    if is_folded(state, config):
        fold_weight_norm(model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {expected[k]} != {tuple(state[k].shape)}" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {brief(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {brief(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches (expected != found): {brief(wrong)}")
    if problems:
        raise CheckpointError(f"{checkpoint.path} ({checkpoint.format} format) does not fit the "
                              f"{config.name!r} config: " + "; ".join(problems))
    return model


def brief(items: list[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def preset_name(config: EncodecConfig) -> str | None:
    """The preset that ``config`` is, apart from name and bandwidths; None if none is."""
    for name, preset in PRESETS.items():
        if replace(preset, name=config.name, target_bandwidths=config.target_bandwidths) == config:
            return name
    return None


def named(config: EncodecConfig, fallback: str) -> EncodecConfig:
    return replace(config, name=preset_name(config) or fallback)


def fallback_name(path: Path) -> str:
    if path.name in (AUDIOCRAFT_NAME, CONFIG_NAME, SAFETENSORS_NAME, PICKLE_WEIGHTS_NAME):
        return path.parent.name
    return path.stem.split("-")[0] if registry.release_checksum(path.name) else path.stem


def unfolded(state: StateDict, config: EncodecConfig) -> StateDict:
    """Folded weights back to ``weight_g``/``weight_v`` for formats that store weight norm.

    ``g = ||w||`` (over all dims but the first), ``v = w``; the refolded weight equals ``w`` to
    rounding, not bit for bit. Unfolded states pass through untouched.
    """
    if not is_folded(state, config):
        return state
    out = {}
    for key, value in state.items():
        if key.endswith((".conv.conv.weight", ".convtr.convtr.weight")):
            stem = key[: -len("weight")]
            out[stem + "weight_g"] = torch.norm_except_dim(value, 2, 0).contiguous()
            out[stem + "weight_v"] = value
        else:
            out[key] = value
    return out


def json_writer(data: dict) -> Callable[[Path], None]:
    return lambda path: path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def safetensors_writer(state: StateDict) -> Callable[[Path], None]:
    from safetensors.torch import save_file

    # transformers refuses safetensors files without the "format" metadata.
    return lambda path: save_file(state, str(path), metadata={"format": "pt"})


def write_folder(path: Path, files: dict[str, Callable[[Path], None]],
                 overwrite: bool) -> Path:
    """A checkpoint folder of ``files`` (name -> writer), written atomically."""
    def write(folder: Path) -> None:
        for name, write_file in files.items():
            write_file(folder / name)

    return atomic_write(path, write, folder=True, overwrite=overwrite)


def write_pickle(path: Path, obj: Any, overwrite: bool) -> Path:
    """``torch.save(obj)`` to ``path``, written atomically."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), overwrite=overwrite)


def verify_checksum(path: Path) -> None:
    """A release file (``<stem>-<hex>.th``) against the sha256 prefix in its name."""
    expected = registry.release_checksum(path.name)
    if expected is not None:
        verify_sha256_prefix(path, expected)
