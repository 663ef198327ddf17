"""transformers' EnCodec folders: ``config.json`` and ``model.safetensors`` or
``pytorch_model.bin`` (MusicGen folders too: their ``audio_encoder``). The one place that
translates transformers' key names for the codec (:func:`transformers_key`).

What transformers does, checked against transformers 5.x:

- its conversion of the 32 kHz model leaves ``pad_mode`` at ``"reflect"`` (audiocraft trained
  it with ``"constant"``), and released MusicGen runs the codec through transformers, so the
  ``encodec_32khz`` preset follows it; each file's own config decides ours;
- ``encode(bandwidth=None)`` uses the smallest of ``target_bandwidths`` (the original release
  and tokenwave use all codebooks); the number of codebooks comes from the largest bandwidth:
  ``floor(1000 * bw[-1] / (ceil(sr / hop) * ceil(log2(bins))))``;
- it always has the LSTM and knows only ``weight_norm`` and ``time_group_norm``; version 5
  stores weight norm as ``parametrizations.weight.original0`` (g) / ``original1`` (v), older
  files ``weight_g``/``weight_v`` (both are read); its ``save_pretrained`` writes only
  safetensors (``pytorch_model.bin`` comes from 4.x);
- its 48 kHz ``encode`` zero-pads the last chunk and returns ``last_frame_pad_length``, which
  ``decode`` needs back to drop the padding.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from ..config import EncodecConfig
from ..files import read_pickle, read_safetensors_file
from .checkpoint import (CONFIG_NAME, PICKLE_WEIGHTS_NAME, SAFETENSORS_NAME, Checkpoint,
                         CheckpointError, StateDict, brief, canonical_weight_norm, json_writer,
                         key_names, named, safetensors_writer, tensors_of, write_folder)
from .tokenwave import FORMAT_MARKER


_TRANSFORMERS_RENAMES = (
    (re.compile(r"^(encoder|decoder)\.model\."), r"\1.layers."),
    (re.compile(r"\.conv\.conv\.|\.convtr\.convtr\."), ".conv."),
    (re.compile(r"\.(conv|convtr)\.norm\."), ".norm."),
    (re.compile(r"^quantizer\.vq\.layers\."), "quantizer.layers."),
    (re.compile(r"\._codebook\."), ".codebook."),
)


def transformers_key(key: str) -> str:
    """Our (original-release) state-dict key -> transformers' key; the one place that knows.

    ``encoder.model.1.block.1.conv.conv.weight_g`` -> ``encoder.layers.1.block.1.conv.weight_g``,
    ``decoder.model.3.convtr.convtr.*`` -> ``decoder.layers.3.conv.*``, ``*.conv.norm.*`` ->
    ``*.norm.*``, ``quantizer.vq.layers.N._codebook.*`` -> ``quantizer.layers.N.codebook.*``.
    Reading inverts it over the keys the config expects, since ``conv`` in transformers can be
    our ``conv.conv`` or ``convtr.convtr``.
    """
    for pattern, replacement in _TRANSFORMERS_RENAMES:
        key = pattern.sub(replacement, key)
    return key


_TRANSFORMERS_DEFAULTS: dict[str, Any] = dict(  # transformers' EncodecConfig defaults
    target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0], sampling_rate=24_000, audio_channels=1,
    normalize=False, chunk_length_s=None, overlap=None, hidden_size=128, num_filters=32,
    num_residual_layers=1, upsampling_ratios=[8, 5, 4, 2], norm_type="weight_norm",
    kernel_size=7, last_kernel_size=7, residual_kernel_size=3, dilation_growth_rate=2,
    use_causal_conv=True, pad_mode="reflect", compress=2, num_lstm_layers=2,
    trim_right_ratio=1.0, codebook_size=1024, codebook_dim=None, use_conv_shortcut=True)
_MUSICGEN_TYPES = ("musicgen", "musicgen_melody")


def read_transformers(folder: Path, data: dict) -> Checkpoint:
    """A transformers EnCodec folder (or a MusicGen folder's ``audio_encoder``), ``data`` being
    its parsed ``config.json``."""
    prefix = ""
    if data.get("model_type") in _MUSICGEN_TYPES and isinstance(data.get("audio_encoder"), dict):
        data, prefix = data["audio_encoder"], "audio_encoder."
    if data.get("model_type") != "encodec":
        raise CheckpointError(f"{folder / CONFIG_NAME}: expected a tokenwave config (\"format\": "
                              f"\"{FORMAT_MARKER}\") or a transformers EnCodec config (model_type "
                              f"'encodec'), found model_type={data.get('model_type')!r}")
    config = _config_from_transformers(data, folder)
    raw, weights = _read_weights(folder, prefix)
    ours = {transformers_key(k): k for k in key_names(config, folder)}
    unknown = [k for k in raw if k not in ours]
    if unknown:
        raise CheckpointError(f"{weights}: {len(unknown)} keys that a transformers EnCodec with "
                              f"this config does not have: {brief(unknown)}")
    return Checkpoint("transformers", config, {ours[k]: v for k, v in raw.items()}, folder)


def _read_weights(folder: Path, prefix: str) -> tuple[StateDict, Path]:
    safetensors_file, pickle_file = folder / SAFETENSORS_NAME, folder / PICKLE_WEIGHTS_NAME
    if safetensors_file.is_file():
        return canonical_weight_norm(read_safetensors_file(safetensors_file, prefix)), \
            safetensors_file
    if pickle_file.is_file():
        state = tensors_of(read_pickle(pickle_file), pickle_file, "the file")
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, pickle_file
    raise CheckpointError(f"{folder}: expected weights in {SAFETENSORS_NAME} or "
                          f"{PICKLE_WEIGHTS_NAME} next to {CONFIG_NAME}, found "
                          f"{sorted(p.name for p in folder.iterdir())[:10]}")


def _config_from_transformers(data: dict, folder: Path) -> EncodecConfig:
    values = {k: data.get(k, default) for k, default in _TRANSFORMERS_DEFAULTS.items()}
    where = folder / CONFIG_NAME
    if values["codebook_dim"] not in (None, values["hidden_size"]):
        raise CheckpointError(f"{where}: codebook_dim={values['codebook_dim']} differs from "
                              f"hidden_size={values['hidden_size']}; tokenwave's quantizer works "
                              f"in the encoder's dimension")
    bandwidths = tuple(float(b) for b in values["target_bandwidths"] or ())
    if not bandwidths:
        raise CheckpointError(f"{where}: expected a non-empty target_bandwidths list")
    num_codebooks = _transformers_codebooks(bandwidths, values["sampling_rate"],
                                            values["upsampling_ratios"], values["codebook_size"])
    if num_codebooks < 1:
        raise CheckpointError(f"{where}: target_bandwidths {list(bandwidths)} give no codebook")
    segment, overlap = values["chunk_length_s"], values["overlap"]
    if segment is not None and overlap is None:
        raise CheckpointError(f"{where}: chunk_length_s={segment} needs an overlap (transformers "
                              f"cannot encode with chunks and no overlap)")
    config = EncodecConfig(
        name="", sample_rate=int(values["sampling_rate"]), channels=int(values["audio_channels"]),
        causal=bool(values["use_causal_conv"]), norm=values["norm_type"],
        pad_mode=values["pad_mode"], ratios=tuple(values["upsampling_ratios"]),
        n_filters=int(values["num_filters"]), dimension=int(values["hidden_size"]),
        num_codebooks=num_codebooks, codebook_size=int(values["codebook_size"]),
        true_skip=not values["use_conv_shortcut"],
        n_residual_layers=int(values["num_residual_layers"]),
        kernel_size=int(values["kernel_size"]), last_kernel_size=int(values["last_kernel_size"]),
        residual_kernel_size=int(values["residual_kernel_size"]),
        dilation_base=int(values["dilation_growth_rate"]), compress=int(values["compress"]),
        lstm=int(values["num_lstm_layers"]), trim_right_ratio=float(values["trim_right_ratio"]),
        normalize=bool(values["normalize"]),
        segment=None if segment is None else float(segment),
        overlap=EncodecConfig.overlap if overlap is None else float(overlap),
        target_bandwidths=bandwidths)
    return named(config, folder.name)


def _transformers_codebooks(bandwidths: tuple[float, ...], sample_rate: int,
                            ratios: list[int] | tuple[int, ...], codebook_size: int) -> int:
    """How transformers counts codebooks: from the largest bandwidth, floored."""
    frame_rate = math.ceil(sample_rate / math.prod(ratios))
    return int(1000 * bandwidths[-1] // (frame_rate * math.ceil(math.log2(codebook_size))))


def transformers_config(config: EncodecConfig, dtype: torch.dtype) -> dict:
    if config.lstm == 0 or config.norm == "none":
        raise ValueError(f"transformers' EnCodec always has an LSTM and a weight or group norm; "
                         f"{config.name} has lstm={config.lstm}, norm={config.norm!r}")
    data = {
        "architectures": ["EncodecModel"], "model_type": "encodec",
        "audio_channels": config.channels, "chunk_length_s": config.segment,
        "codebook_dim": config.dimension, "codebook_size": config.codebook_size,
        "compress": config.compress, "dilation_growth_rate": config.dilation_base,
        "dtype": str(dtype).removeprefix("torch."), "hidden_size": config.dimension,
        "kernel_size": config.kernel_size, "last_kernel_size": config.last_kernel_size,
        "norm_type": config.norm, "normalize": config.normalize,
        "num_filters": config.n_filters, "num_lstm_layers": config.lstm,
        "num_residual_layers": config.n_residual_layers, "overlap": config.overlap,
        "pad_mode": config.pad_mode, "residual_kernel_size": config.residual_kernel_size,
        "sampling_rate": config.sample_rate, "target_bandwidths": list(config.target_bandwidths),
        "trim_right_ratio": config.trim_right_ratio, "upsampling_ratios": list(config.ratios),
        "use_causal_conv": config.causal, "use_conv_shortcut": not config.true_skip,
    }
    implied = _transformers_codebooks(config.target_bandwidths, config.sample_rate,
                                      config.ratios, config.codebook_size)
    if implied != config.num_codebooks:
        raise ValueError(f"transformers derives the codebook count from the largest target "
                         f"bandwidth: {config.target_bandwidths[-1]} kbps gives {implied}, "
                         f"but {config.name} has {config.num_codebooks} codebooks")
    return data


def parametrized_key(key: str) -> str:
    """``weight_g``/``weight_v`` -> the parametrization names transformers 5 writes."""
    if key.endswith(".weight_g"):
        return key[: -len("weight_g")] + "parametrizations.weight.original0"
    if key.endswith(".weight_v"):
        return key[: -len("weight_v")] + "parametrizations.weight.original1"
    return key


def write_transformers(state: StateDict, config: EncodecConfig, path: Path, overwrite: bool) -> Path:
    """A transformers folder: its ``config.json`` and safetensors weights in its key names."""
    data = transformers_config(config, next(iter(state.values())).dtype)
    weights = {parametrized_key(transformers_key(k)): v for k, v in state.items()}
    return write_folder(path, {CONFIG_NAME: json_writer(data),
                               SAFETENSORS_NAME: safetensors_writer(weights)}, overwrite)
