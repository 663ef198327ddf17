"""tokenwave's own folders: ``config.json`` (``EncodecConfig.to_dict()`` plus ``"format":
"tokenwave-encodec"`` and ``"format_version"``) and ``model.safetensors`` with our key names,
weight norm folded or not; it round-trips exactly.

A tokenwave generator folder (``config.json`` with ``"format": "tokenwave-musicgen"``) stands
for the codec in its ``codec/`` subfolder, so a generator's name or folder loads its codec.
"""
from __future__ import annotations

from pathlib import Path

from ..config import EncodecConfig
from ..files import read_json_file, read_safetensors_file
from .checkpoint import (CONFIG_NAME, SAFETENSORS_NAME, Checkpoint, CheckpointError, StateDict,
                         json_writer, safetensors_writer, write_folder)

FORMAT_MARKER = "tokenwave-encodec"
FORMAT_VERSION = 1
GENERATOR_MARKER = "tokenwave-musicgen"  # a generator folder: its codec is in a subfolder


def generator_codec_folder(path: Path) -> Path | None:
    """The codec subfolder of a tokenwave generator folder; None for anything else."""
    config_file = path / CONFIG_NAME
    if not (path.is_dir() and config_file.is_file()):
        return None
    data = read_json_file(config_file)
    if data.get("format") != GENERATOR_MARKER:
        return None
    spec = data.get("codec")
    name = spec.get("folder", "codec") if isinstance(spec, dict) else None
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        raise CheckpointError(f"{config_file}: expected 'codec': {{'folder': NAME}} naming a "
                              f"subfolder, found {spec!r:.80}")
    if not (path / name).is_dir():
        raise CheckpointError(f"{path}: a tokenwave generator folder whose codec folder {name}/ "
                              f"is missing")
    return path / name


def read_tokenwave(folder: Path, data: dict) -> Checkpoint:
    version = data.pop("format_version", None)
    data.pop("format")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{folder / CONFIG_NAME}: expected format_version <= "
                              f"{FORMAT_VERSION}, found {version!r} (from a newer tokenwave?)")
    try:
        config = EncodecConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{folder / CONFIG_NAME}: not a valid EncodecConfig ({error})") \
            from None
    weights = folder / SAFETENSORS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{folder}: expected {SAFETENSORS_NAME} next to {CONFIG_NAME}")
    return Checkpoint("tokenwave", config, read_safetensors_file(weights), folder)


def write_tokenwave(state: StateDict, config: EncodecConfig, path: Path, overwrite: bool) -> Path:
    """A tokenwave folder: the config with its format marker, and the weights as they are."""
    data = {**config.to_dict(), "format": FORMAT_MARKER, "format_version": FORMAT_VERSION}
    return write_folder(path, {CONFIG_NAME: json_writer(data),
                               SAFETENSORS_NAME: safetensors_writer(state)}, overwrite)
