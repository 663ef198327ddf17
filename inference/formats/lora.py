"""LoRA adapter folders: the adapters of a fine-tuned LM alone, loaded over their base by name.

    OUT/model/lora.json          {"format": "tokenwave-lora", "base": NAME_OR_PATH, "t5_path": ...,
                                  "lora": {"rank": 8, "alpha": null, "targets": [...]},
                                  "base_weights": "1a2b3c4d"}  (fingerprint of the base LM)
    OUT/model/lora.safetensors   <matrix>.lora_A / .lora_B (:func:`lm.lora.lora_state_dict`)

``tokenwave finetune --lora RANK`` writes one; ``MusicGen.from_pretrained(FOLDER)`` (and so
``tokenwave generate --model FOLDER``) reads ``base``, loads that generator (a name or a path;
a local base is recorded as an absolute path), checks that its LM is the one the adapters
were trained over (``base_weights``; a base released again under the same name is refused)
and applies the adapters unmerged;
``lm.lora.merge_lora`` folds them in, and ``tokenwave merge-lora`` writes the merged generator.
A generator whose LM holds adapters is not written by :func:`save_generator` (its state would
not be a plain LM's): save the adapters with :func:`save_adapter`, or merge first.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from codec.files import CheckpointError, atomic_write, read_json_file, read_safetensors_file
from codec.formats.checkpoint import state_weights_id
from lm.lora import LoRAConfig, add_lora, has_lora, load_lora, lora_state_dict, merge_lora

from .tokenwave import save_generator as _save_tokenwave

if TYPE_CHECKING:  # the generator imports this package, never the reverse
    from ..generator import MusicGen

ADAPTER_MARKER = "tokenwave-lora"
ADAPTER_VERSION = 1
ADAPTER_CONFIG = "lora.json"
ADAPTER_WEIGHTS = "lora.safetensors"


class Adapter(NamedTuple):
    """A read adapter folder: its base generator (name or path), T5 folder, config and weights."""

    base: str
    t5_path: str | None
    config: LoRAConfig
    state: dict[str, torch.Tensor]
    base_weights: str | None = None  # fingerprint of the base LM trained over (None: not recorded)


def is_adapter(path: str | os.PathLike) -> bool:
    """True for a folder holding ``lora.json``."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def base_spec(model: str) -> str:
    """How an adapter names its base: a local folder as an absolute path, else the name."""
    return str(Path(model).resolve()) if os.path.exists(model) else model


def base_fingerprint(lm: nn.Module) -> str | None:
    """The identity of the LM's base weights (adapters left out, float32 values, plain parameter
    names): what an adapter was trained over and must be loaded over. None for a quantized LM
    (its weights no longer hold the base's values)."""
    state = {}
    for key, value in lm.state_dict().items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        if not value.is_floating_point():
            return None
        state[key.removesuffix(".base")] = value.float()
    return state_weights_id(state)


def save_adapter(lm: nn.Module, folder: str | os.PathLike, *, base: str, t5_path: str | None = None,
                 dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write ``lm``'s adapters and the name of the generator they go over (atomically)."""
    if not has_lora(lm):
        raise ValueError("the LM holds no LoRA adapters to save")
    state = {k: v.detach().to("cpu", dtype if dtype is not None else v.dtype).contiguous()
             for k, v in lora_state_dict(lm).items()}
    data = {"format": ADAPTER_MARKER, "format_version": ADAPTER_VERSION, "base": base_spec(base),
            "t5_path": None if t5_path is None else base_spec(t5_path), "lora": lm.lora.to_dict(),
            "base_weights": base_fingerprint(lm)}

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        (tmp / ADAPTER_CONFIG).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    return atomic_write(folder, write, folder=True, overwrite=overwrite)


def read_adapter(folder: str | os.PathLike) -> Adapter:
    """An adapter folder's base, config and weights; a foreign or damaged one raises
    :class:`CheckpointError` naming the file."""
    folder = Path(folder)
    data = read_json_file(folder / ADAPTER_CONFIG, "a LoRA adapter config")
    version = data.get("format_version")
    if data.get("format") != ADAPTER_MARKER or not isinstance(version, int) or version > ADAPTER_VERSION:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: expected \"format\": \"{ADAPTER_MARKER}\" with "
                              f"format_version <= {ADAPTER_VERSION}, found {data.get('format')!r} "
                              f"version {version!r}")
    try:
        config = LoRAConfig.from_dict(data["lora"])
        base = data["base"]
        if not isinstance(base, str) or not base:
            raise ValueError(f"base must name a generator, found {base!r}")
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: not a valid LoRA adapter config ({error})") from None
    return Adapter(base, data.get("t5_path"), config, read_safetensors_file(folder / ADAPTER_WEIGHTS),
                   data.get("base_weights"))


def apply_adapter(lm: nn.Module, adapter: Adapter, source: str | os.PathLike) -> nn.Module:
    """Wrap ``lm`` as the adapter says and load its weights (adapters the LM already holds are
    merged first); a mismatch names ``source``."""
    if has_lora(lm):
        merge_lora(lm)
    found = base_fingerprint(lm) if adapter.base_weights else None
    if found is not None and found != adapter.base_weights:
        raise CheckpointError(f"{source}: these adapters were trained over other weights than {adapter.base}'s "
                              f"now (base fingerprint {adapter.base_weights}, found {found}): the base has "
                              f"changed since (e.g. a newer release of the model); load the adapters over the "
                              f"base they were trained on, or train them again")
    try:
        add_lora(lm, adapter.config)
        load_lora(lm, adapter.state)
    except ValueError as error:
        merge_lora(lm)  # leave the base as it was
        raise CheckpointError(f"{source}: {error} (base {adapter.base})") from None
    return lm


def save_generator(generator: MusicGen, path: str | os.PathLike, *, overwrite: bool = False,
                   dtype: torch.dtype | None = None) -> Path:
    """:func:`inference.formats.tokenwave.save_generator`, refusing an LM that holds adapters."""
    if has_lora(generator.lm):
        raise ValueError("this generator's LM holds LoRA adapters: merge them first "
                         "(lm.lora.merge_lora(generator.lm)) or save the adapters alone (save_adapter)")
    return _save_tokenwave(generator, path, overwrite=overwrite, dtype=dtype)


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "Adapter", "apply_adapter", "base_fingerprint", "base_spec",
           "is_adapter",
           "read_adapter", "save_adapter", "save_generator"]
