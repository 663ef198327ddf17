"""Read and write every EnCodec checkpoint format; :func:`load_model` detects which one it has.

Formats (``Checkpoint.format``), one module each: ``"original"`` (the release's ``.th`` files,
:mod:`.original`), ``"audiocraft"`` (``compression_state_dict.bin``, :mod:`.audiocraft`; the
pointer form ``{'pretrained': 'facebook/encodec_32khz'}`` is resolved through
:mod:`codec.registry`, local files only), ``"transformers"`` (a folder with ``config.json``,
:mod:`.transformers`) and ``"tokenwave"`` (ours, :mod:`.tokenwave`). What they share is in
:mod:`.checkpoint`: the check of a state against its config, and :func:`weights_id`.

Untrusted input: pickles are read only with ``torch.load(..., weights_only=True)``, YAML only
with ``yaml.safe_load`` (:mod:`codec.files`). Anything wrong raises :class:`CheckpointError`
naming the file, what was expected and what was found.

This package builds models, so it imports :mod:`codec.model`; on import it hands
:class:`~codec.model.EncodecModel` its ``from_pretrained``/``save_pretrained``
(:func:`codec.model.use_checkpoint_formats`), so the model never imports the formats.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .. import registry
from ..config import EncodecConfig
from ..files import (CheckpointError, PathLike, read_json_file, read_pickle,
                     read_safetensors_file)
from ..model import EncodecModel, use_checkpoint_formats
from .audiocraft import read_audiocraft, write_audiocraft
from .checkpoint import (AUDIOCRAFT_NAME, CONFIG_NAME, PICKLE_WEIGHTS_NAME, SAFETENSORS_NAME,
                         Checkpoint, checked_model, remember_weights_id, state_weights_id,
                         unfolded, verify_checksum, weights_id)
from .original import read_original, write_original
from .tokenwave import FORMAT_MARKER, generator_codec_folder, read_tokenwave, write_tokenwave
from .transformers import read_transformers, transformers_key, write_transformers

FORMATS = ("tokenwave", "original", "audiocraft", "transformers")
_WRITERS = {"tokenwave": write_tokenwave, "original": write_original,
            "audiocraft": write_audiocraft, "transformers": write_transformers}


# -- public API ---------------------------------------------------------------------------
def load_model(path_or_name: PathLike, *, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, inference: bool = True,
               models_dir: PathLike | None = None,
               config: EncodecConfig | None = None) -> EncodecModel:
    """Any supported checkpoint (file, folder or model name) -> :class:`EncodecModel`.

    ``inference=True`` folds weight norm and switches to eval mode
    (``EncodecModel.prepare_for_inference``). ``config`` is only for bare state dicts whose
    shapes match no preset. Weights are read as float32, then moved to ``device``/``dtype``.
    """
    checkpoint = _read(_locate(path_or_name, models_dir), models_dir, config, hops=0)
    model = checked_model(checkpoint)
    with torch.no_grad():
        model.load_state_dict(checkpoint.state, strict=True)  # copies into float32 tensors
    remember_weights_id(model, state_weights_id(checkpoint.state))
    if inference:
        return model.prepare_for_inference(device, dtype)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def read_checkpoint(path_or_name: PathLike, *, models_dir: PathLike | None = None,
                    config: EncodecConfig | None = None) -> Checkpoint:
    """Read a checkpoint and check it against its config (see :func:`load_model`)."""
    checkpoint = _read(_locate(path_or_name, models_dir), models_dir, config, hops=0)
    checked_model(checkpoint)
    return checkpoint


def detect_format(path: PathLike) -> str:
    """Which of :data:`FORMATS` a file or folder holds, from its layout and markers."""
    path = Path(path)
    path = generator_codec_folder(path) or path
    folder = _folder_of(path)
    if folder is not None:
        config_file = folder / CONFIG_NAME
        if config_file.is_file():
            return "tokenwave" if read_json_file(config_file).get("format") == FORMAT_MARKER \
                else "transformers"
        path = _inner_file(folder)
    return _pickle_kind(read_pickle(path), path)


def save_model(model: EncodecModel, path: PathLike, *, format: str = "tokenwave",
               overwrite: bool = False) -> Path:
    """Write ``model`` in one of :data:`FORMATS`; returns the file or folder written.

    Folders (tokenwave, transformers) and files are written to a temporary name and renamed,
    so a crash never leaves half a checkpoint. An existing non-empty folder or existing file
    is replaced only with ``overwrite=True``. ``original`` and ``audiocraft`` write a file
    (inside ``path`` when it is an existing folder).
    """
    if not isinstance(model, EncodecModel):
        raise TypeError(f"save_model expects an EncodecModel, got {type(model).__name__}")
    if format not in _WRITERS:
        raise ValueError(f"unknown checkpoint format {format!r}; expected one of {FORMATS}")
    config = model.config
    if format != "tokenwave" and config.decoder_differs:
        raise ValueError(f"{format} checkpoints mirror the encoder in the decoder; this codec's decoder is "
                         f"widened or has its own LSTM (filters {config.n_filters} -> {config.decoder_width}, "
                         f"LSTM layers {config.lstm} -> {config.decoder_lstm_layers}): save it with format='tokenwave'")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if format != "tokenwave":  # the foreign formats store weight norm unfolded
        state = unfolded(state, config)
    return _WRITERS[format](state, config, Path(path), overwrite)


# -- locating and dispatching ---------------------------------------------------------------
def _locate(path_or_name: PathLike, models_dir: PathLike | None) -> Path:
    text = os.fspath(path_or_name)
    if not text.startswith("//pretrained/") and os.path.exists(text):
        return Path(text)
    return registry.find_codec(text, models_dir=models_dir)


def _folder_of(path: Path) -> Path | None:
    """The checkpoint folder ``path`` is, or whose weights file it is; None for a lone file."""
    if path.is_dir():
        if (path / CONFIG_NAME).is_file() or (path / AUDIOCRAFT_NAME).is_file():
            return path
        th_files = sorted(path.glob("*.th"))
        if len(th_files) == 1:
            return path
        found = sorted(p.name for p in path.iterdir())[:10]
        raise CheckpointError(f"{path}: expected a checkpoint folder ({CONFIG_NAME} with "
                              f"weights, {AUDIOCRAFT_NAME}, or one .th file), found {found}")
    if path.name in (SAFETENSORS_NAME, PICKLE_WEIGHTS_NAME) and \
            (path.parent / CONFIG_NAME).is_file():
        return path.parent
    if path.suffix == ".safetensors":
        raise CheckpointError(f"{path}: a lone .safetensors file carries no config; expected it "
                              f"as {SAFETENSORS_NAME} in a folder with {CONFIG_NAME}")
    return None


def _inner_file(folder: Path) -> Path:
    """The one checkpoint file of a folder without config.json (see :func:`_folder_of`)."""
    inner = folder / AUDIOCRAFT_NAME
    return inner if inner.is_file() else next(folder.glob("*.th"))


def _read(path: Path, models_dir: PathLike | None, config: EncodecConfig | None,
          hops: int) -> Checkpoint:
    path = generator_codec_folder(path) or path
    folder = _folder_of(path)
    if folder is not None and (folder / CONFIG_NAME).is_file():
        _no_config_override(config, folder)
        return _read_config_folder(folder)
    if folder is not None:
        path = _inner_file(folder)
    verify_checksum(path)
    obj = read_pickle(path)
    kind = _pickle_kind(obj, path)
    if kind == "original":
        return read_original(obj, path, config)
    _no_config_override(config, path)
    if "pretrained" in obj:
        return _follow_pointer(obj["pretrained"], path, models_dir, hops)
    return read_audiocraft(obj, path)


def _pickle_kind(obj: Any, path: Path) -> str:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict (a state dict or an audiocraft package), "
                              f"found {type(obj).__name__}")
    if "pretrained" in obj or "best_state" in obj:
        return "audiocraft"
    return "original"


def _no_config_override(config: EncodecConfig | None, path: Path) -> None:
    if config is not None:
        raise CheckpointError(f"{path} carries its own config; config= is only for bare state "
                              f"dicts (original .th files)")


def _follow_pointer(name: Any, path: Path, models_dir: PathLike | None, hops: int) -> Checkpoint:
    if not isinstance(name, str):
        raise CheckpointError(f"{path}: expected 'pretrained' to name a model, found {name!r}")
    if hops >= 2:
        raise CheckpointError(f"{path}: pointer to {name!r} leads to another pointer; giving up")
    target = name if os.path.exists(name) else registry.find_codec(name, models_dir=models_dir)
    return _read(Path(target), models_dir, None, hops + 1)


def _read_config_folder(folder: Path) -> Checkpoint:
    data = read_json_file(folder / CONFIG_NAME)
    if data.get("format") == FORMAT_MARKER:
        return read_tokenwave(folder, data)
    return read_transformers(folder, data)


use_checkpoint_formats(load_model, save_model)

# CheckpointError, read_json_file, read_safetensors_file: re-exported for inference.formats and tests.
__all__ = ["FORMATS", "Checkpoint", "CheckpointError", "detect_format",
           "load_model", "read_checkpoint", "read_json_file", "read_safetensors_file",
           "remember_weights_id", "save_model", "state_weights_id", "transformers_key",
           "weights_id"]
