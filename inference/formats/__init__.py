"""Generator checkpoint formats, one module each: read any of them, write tokenwave's.

- ``"tokenwave"`` (:mod:`.tokenwave`): our self-contained folder; round-trips.
- ``"transformers"`` (:mod:`.transformers`): a Hugging Face MusicGen / MusicGen-melody folder,
  the only place its LM keys are translated to ours.
- ``"audiocraft"`` (:mod:`.audiocraft`): ``state_dict.bin`` + ``compression_state_dict.bin``.
- a LoRA adapter folder (:mod:`.lora`): its base generator, read by name, with the adapters applied.

:func:`read_generator` returns the parts a generator is built from; it never builds one (the
generator class is passed in through ``MusicGen.from_pretrained``, which calls it), so the
dependency points one way: :mod:`inference.generator` imports this package, not the reverse.
Shared machinery (meta-device loading, quantize-as-you-read) is in :mod:`.loading`.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from codec.formats import CheckpointError, read_json_file

from .. import hub, registry
from ..config import GeneratorConfig
from .audiocraft import AUDIOCRAFT_LM, load_audiocraft
from .loading import CONFIG_NAME, SAVE_DTYPES, GeneratorParts, LoadTarget, parse_dtype
from .lora import apply_adapter, is_adapter, read_adapter, save_generator
from .tokenwave import FORMAT_MARKER, FORMAT_VERSION, load_tokenwave
from .transformers import MUSICGEN_TYPES, load_transformers


def detect_format(path: str | os.PathLike) -> str:
    """``"tokenwave"``, ``"audiocraft"``, ``"transformers"`` or ``"lora"`` (an adapter folder)
    for a generator folder (or an audiocraft ``state_dict.bin``)."""
    path = Path(path)
    if path.is_file() and path.name == AUDIOCRAFT_LM:
        return "audiocraft"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such generator folder")
    if is_adapter(path):
        return "lora"
    if (path / CONFIG_NAME).is_file():
        data = read_json_file(path / CONFIG_NAME)
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


def read_generator(path_or_name: str | os.PathLike, *, default_config: GeneratorConfig,
                   device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                   t5_path: str | os.PathLike | None = None, models_dir: str | os.PathLike | None = None,
                   max_duration: float | None = None, extend_stride: float | None = None,
                   revision: str | None = None, local_files_only: bool = False) -> GeneratorParts:
    """The parts of a generator from a folder in any format, or a model name (:mod:`inference.registry`).

    See :meth:`inference.generator.MusicGen.from_pretrained` for the arguments; ``default_config``
    is the generator class's, which gives an audiocraft checkpoint its stride. A hub name is read
    at ``revision`` (branch, tag or commit); ``local_files_only`` keeps every lookup (the T5 and
    codec an audiocraft checkpoint names too) to local folders and the Hugging Face cache.
    """
    if local_files_only and hub.offline_reason() is None:
        with hub.local_files_only():
            return read_generator(path_or_name, default_config=default_config, device=device, dtype=dtype,
                                  t5_path=t5_path, models_dir=models_dir, max_duration=max_duration,
                                  extend_stride=extend_stride, revision=revision)
    text = os.fspath(path_or_name)
    path = Path(text) if os.path.exists(text) and revision is None else \
        registry.find_generator(text, models_dir=models_dir, revision=revision)
    if is_adapter(path):  # the base by name, then the adapters over its LM
        adapter = read_adapter(path)
        parts = read_generator(adapter.base, default_config=default_config, device=device, dtype=dtype,
                               t5_path=t5_path or adapter.t5_path, models_dir=models_dir,
                               max_duration=max_duration, extend_stride=extend_stride)
        apply_adapter(parts.lm, adapter, path)
        return parts
    target = LoadTarget(device, dtype)
    kind = detect_format(path)
    if kind == "audiocraft":
        parts = load_audiocraft(path, target, default_config, t5_path, models_dir)
    elif kind == "transformers":
        parts = load_transformers(path, target, t5_path)
    else:
        parts = load_tokenwave(path, target)
    overrides = {k: v for k, v in (("max_duration", max_duration), ("extend_stride", extend_stride))
                 if v is not None}
    if overrides:
        parts = parts._replace(config=replace(parts.config, **overrides))
    return parts


__all__ = ["FORMAT_MARKER", "FORMAT_VERSION", "SAVE_DTYPES", "GeneratorParts", "detect_format", "parse_dtype",
           "read_generator", "save_generator"]
