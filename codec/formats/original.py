"""The original release's ``.th`` files: a bare state dict with our key names (24 kHz:
``weight_g``/``weight_v``; 48 kHz: plain weights and GroupNorm ``conv.norm.*``).

A bare state dict does not say its sample rate, causality or padding, so the config comes from
the release file name, else from the preset whose shapes the tensors match, else from
``config=``. A ``<stem>-<hex>.th`` name carries a sha256 prefix, which is verified.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from .. import registry
from ..config import PRESETS, EncodecConfig
from .checkpoint import (CONFIG_NAME, PICKLE_WEIGHTS_NAME, Checkpoint, CheckpointError, StateDict,
                         brief, tensors_of, write_pickle)


def read_original(obj: Any, path: Path, config: EncodecConfig | None) -> Checkpoint:
    state = tensors_of(obj, path, "the file")
    if any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in state):
        raise CheckpointError(f"{path}: found transformers key names; expected this file as "
                              f"{PICKLE_WEIGHTS_NAME} in a folder with its {CONFIG_NAME}")
    if config is None:
        release = registry.canonical_codec_name(path.name)
        config = PRESETS.get(release) if release in registry.RELEASE_FILES else None
    if config is None:
        try:
            architecture = infer_architecture(state, path)
        except (IndexError, KeyError, ZeroDivisionError) as error:
            raise CheckpointError(f"{path}: expected EnCodec tensor shapes, found tensors whose "
                                  f"shapes do not fit the layout ({error!r})") from None
        config = next((p for p in PRESETS.values()
                       if all(getattr(p, k) == v for k, v in architecture.items())), None)
        if config is None:
            found = ", ".join(f"{k}={v}" for k, v in architecture.items())
            raise CheckpointError(
                f"{path}: a bare state dict does not say its sample rate, causality or padding, "
                f"and its shapes ({found}) match no preset ({', '.join(PRESETS)}); "
                f"pass config=EncodecConfig(...)")
    return Checkpoint("original", config, state, path)


def infer_architecture(state: StateDict, path: Path) -> dict[str, Any]:
    """The config fields that a state dict's shapes determine (encoder side, quantizer)."""
    kinds: dict[int, str] = {}
    for key in state:
        match = re.match(r"encoder\.model\.(\d+)\.(conv|block|shortcut|lstm)\.", key)
        if match:
            kinds[int(match[1])] = {"block": "res", "shortcut": "res"}.get(match[2], match[2])
    codebooks = [k for k in state
                 if re.fullmatch(r"quantizer\.vq\.layers\.\d+\._codebook\.embed", k)]
    if not kinds or not codebooks:
        raise CheckpointError(f"{path}: expected EnCodec weights (keys 'encoder.model.N.*' and "
                              f"'quantizer.vq.layers.N._codebook.embed'), found keys like "
                              f"{brief(sorted(state), 3)}")

    def conv_weight(index: int, inner: str = "conv.conv") -> torch.Tensor:
        prefix = f"encoder.model.{index}.{inner}"
        for key in (prefix + ".weight_v", prefix + ".weight"):
            if key in state:
                return state[key]
        raise CheckpointError(f"{path}: expected a convolution weight {prefix}.weight(_v)")

    order = sorted(kinds)
    convs = [i for i in order if kinds[i] == "conv"]
    residual = [i for i in order if kinds[i] == "res"]
    lstms = [i for i in order if kinds[i] == "lstm"]
    if len(convs) < 2:
        raise CheckpointError(f"{path}: expected at least a first and a last encoder conv, "
                              f"found conv layers at {convs}")
    first, last, downs = conv_weight(convs[0]), conv_weight(convs[-1]), convs[1:-1]
    defaults = EncodecConfig()
    block = conv_weight(residual[0], "block.1.conv.conv") if residual else None
    lstm_layers = sum(1 for k in state if lstms and
                      re.fullmatch(rf"encoder\.model\.{lstms[0]}\.lstm\.weight_ih_l\d+", k))
    norm_prefix = f"encoder.model.{convs[0]}.conv"
    norm = ("time_group_norm" if f"{norm_prefix}.norm.weight" in state else
            "weight_norm" if f"{norm_prefix}.conv.weight_g" in state else "none")
    return dict(
        channels=first.shape[1], n_filters=first.shape[0], kernel_size=first.shape[-1],
        dimension=last.shape[0], last_kernel_size=last.shape[-1], norm=norm,
        ratios=tuple(conv_weight(i).shape[-1] // 2 for i in reversed(downs)),
        n_residual_layers=sum(1 for i in residual if not downs or i < downs[0]),
        residual_kernel_size=(block.shape[-1] if block is not None
                              else defaults.residual_kernel_size),
        compress=block.shape[1] // block.shape[0] if block is not None else defaults.compress,
        true_skip=not any(k.startswith(f"encoder.model.{i}.shortcut.") for i in residual
                          for k in state),
        lstm=lstm_layers, num_codebooks=len(codebooks),
        codebook_size=state["quantizer.vq.layers.0._codebook.embed"].shape[0],
    )


def write_original(state: StateDict, config: EncodecConfig, path: Path, overwrite: bool) -> Path:
    """``path`` (or ``path/<name>.th`` for an existing folder) holding the bare state dict."""
    target = path / f"{config.name}.th" if path.is_dir() else path
    return write_pickle(target, state, overwrite)
