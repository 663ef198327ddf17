"""audiocraft's ``compression_state_dict.bin``: ``{'best_state': state dict, 'xp.cfg': YAML
text, 'version', 'exported': True}``.

The YAML is read with ``yaml.safe_load`` and whole-value ``${a.b}`` interpolations are resolved
here (OmegaConf's ``to_yaml`` leaves them in). An audiocraft-trained 32 kHz export carries
``pad_mode: constant`` in its YAML and gets it from there. Written files add a ``tokenwave``
section (name, target bandwidths) that audiocraft ignores.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import PRESETS, EncodecConfig
from .checkpoint import (AUDIOCRAFT_NAME, Checkpoint, CheckpointError, StateDict, fallback_name,
                         named, preset_name, tensors_of, write_pickle)
from .tokenwave import FORMAT_VERSION


_AUDIOCRAFT_SEANET_DEFAULTS: dict[str, Any] = dict(  # audiocraft's SEANet class defaults
    channels=1, dimension=128, n_filters=32, n_residual_layers=3, ratios=[8, 5, 4, 2],
    activation="ELU", activation_params={"alpha": 1.0}, norm="none", norm_params={},
    kernel_size=7, last_kernel_size=7, residual_kernel_size=3, dilation_base=2, causal=False,
    pad_mode="reflect", true_skip=True, compress=2, lstm=0, disable_norm_outer_blocks=0,
    trim_right_ratio=1.0, final_activation=None, final_activation_params=None)
_SEANET_FIELDS = ("channels", "dimension", "n_filters", "n_residual_layers", "ratios", "norm",
                  "kernel_size", "last_kernel_size", "residual_kernel_size", "dilation_base",
                  "causal", "pad_mode", "true_skip", "compress", "lstm")
_INTERPOLATION = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")
_MISSING = object()


def _yaml_get(root: dict, dotted: str, default: Any = _MISSING, *, path: Path,
              depth: int = 0) -> Any:
    """``root['a']['b']`` for ``'a.b'``, following whole-value ``${x.y}`` interpolations."""
    node: Any = root
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _MISSING:
                raise CheckpointError(f"{path}: expected '{dotted}' in the audiocraft config "
                                      f"(xp.cfg), found no such entry")
            return default
        node = node[part]
    return _yaml_value(root, node, path=path, depth=depth)


def _yaml_value(root: dict, value: Any, *, path: Path, depth: int = 0) -> Any:
    if isinstance(value, str) and "${" in value:
        match = _INTERPOLATION.match(value)
        if match is None or depth > 10:
            raise CheckpointError(f"{path}: cannot resolve {value!r} in the audiocraft config; "
                                  f"only whole-value ${{a.b}} references are supported")
        return _yaml_get(root, match[1], path=path, depth=depth + 1)
    return value


def read_audiocraft(package: dict, path: Path) -> Checkpoint:
    best = package["best_state"]
    if isinstance(best, dict) and isinstance(best.get("model"), dict):
        best = best["model"]  # a training checkpoint's best_state wraps the model's
    state = tensors_of(best, path, "'best_state'")
    return Checkpoint("audiocraft", audiocraft_config(xp_config(package, path), path), state, path)


def xp_config(package: dict, path: Path | str) -> dict:
    """The experiment config an audiocraft export holds under ``'xp.cfg'`` (YAML text, as
    audiocraft.utils.export writes it, or an already parsed mapping): the codec's and the LM's
    readers share it."""
    root = package.get("xp.cfg")
    if isinstance(root, str):
        import yaml

        try:
            root = yaml.safe_load(root)
        except yaml.YAMLError as error:
            raise CheckpointError(f"{path}: 'xp.cfg' is not valid YAML ({error})") from None
    if not isinstance(root, dict):
        raise CheckpointError(f"{path}: expected 'xp.cfg' to hold the config as a YAML mapping (as "
                              f"audiocraft.utils.export writes it), found {type(root).__name__}")
    return root


def audiocraft_config(root: dict, path: Path) -> EncodecConfig:
    get = lambda key, default=_MISSING: _yaml_get(root, key, default, path=path)  # noqa: E731
    kind = get("compression_model", None)
    if kind != "encodec":
        what = "an audiocraft LM checkpoint (its codec is in compression_state_dict.bin)" \
            if "lm_model" in root or "transformer_lm" in root else f"compression_model={kind!r}"
        raise CheckpointError(f"{path}: expected an EnCodec compression model, found {what}")
    for key, wanted in (("encodec.autoencoder", "seanet"), ("encodec.quantizer", "rvq")):
        if get(key, wanted) != wanted:
            raise CheckpointError(f"{path}: expected {key}={wanted!r}, found {get(key)!r}")
    seanet = {k: _yaml_value(root, v, path=path) for k, v in (get("seanet", {}) or {}).items()}
    sides = {}
    for side in ("encoder", "decoder"):
        overrides = {k: _yaml_value(root, v, path=path)
                     for k, v in (seanet.get(side) or {}).items()}
        sides[side] = {**_AUDIOCRAFT_SEANET_DEFAULTS,
                       **{k: v for k, v in seanet.items() if k not in ("encoder", "decoder")},
                       **overrides}
    encoder, decoder = sides["encoder"], sides["decoder"]
    for key in _SEANET_FIELDS:
        if encoder[key] != decoder[key]:
            raise CheckpointError(f"{path}: the audiocraft config gives the encoder and decoder "
                                  f"different {key} ({encoder[key]!r} vs {decoder[key]!r}); "
                                  f"tokenwave builds both from one config")
    unsupported = [
        f"{side}.{key}={value!r}" for side, values in sides.items() for key, value, ok in (
            ("activation", values["activation"], values["activation"] == "ELU"),
            ("activation_params", values["activation_params"],
             float((values["activation_params"] or {}).get("alpha", 1.0)) == 1.0),
            ("disable_norm_outer_blocks", values["disable_norm_outer_blocks"],
             not values["disable_norm_outer_blocks"]),
            ("final_activation", values["final_activation"], values["final_activation"] is None),
            ("norm_params", values["norm_params"],
             not values["norm_params"] or values["norm"] != "time_group_norm"),
        ) if not ok]
    if unsupported:
        raise CheckpointError(f"{path}: unsupported SEANet settings {unsupported}; tokenwave "
                              f"builds ELU(1) SEANets with the norm on every layer")
    sample_rate = int(get("encodec.sample_rate", None) or get("sample_rate"))
    channels = int(get("encodec.channels", None) or get("channels", encoder["channels"]))
    if channels != encoder["channels"]:
        raise CheckpointError(f"{path}: encodec.channels={channels} but seanet.channels="
                              f"{encoder['channels']}")
    num_codebooks, bins = int(get("rvq.n_q", 8)), int(get("rvq.bins", 1024))
    tokenwave = get("tokenwave", None) or {}
    fields_ = {k: encoder[k] for k in _SEANET_FIELDS}
    fields_.update(ratios=tuple(encoder["ratios"]), trim_right_ratio=decoder["trim_right_ratio"])
    config = EncodecConfig(
        name=tokenwave.get("name", ""), sample_rate=sample_rate, num_codebooks=num_codebooks,
        codebook_size=bins, normalize=bool(get("encodec.renormalize", None) or
                                           get("encodec.renorm", False)),
        target_bandwidths=(0.0,), **fields_)
    bandwidths = tokenwave.get("target_bandwidths")
    if bandwidths is None:
        preset = PRESETS.get(preset_name(config) or "")
        bandwidths = preset.target_bandwidths if preset else (
            round(num_codebooks * config.bandwidth_per_codebook, 6),)
    config = replace(config, target_bandwidths=tuple(bandwidths))
    return config if config.name else named(config, fallback_name(path))


def audiocraft_yaml(config: EncodecConfig) -> str:
    import yaml

    if config.segment is not None:
        raise ValueError(f"{config.name} encodes in {config.segment} s chunks, which audiocraft's "
                         f"EncodecModel cannot express; save it as 'tokenwave', 'original' or "
                         f"'transformers'")
    if config.causal and config.normalize:
        raise ValueError("audiocraft refuses causal models that renormalize")
    seanet = {k: list(v) if isinstance(v, tuple) else v
              for k, v in config.to_dict().items() if k in _SEANET_FIELDS}
    seanet.update(activation="ELU", activation_params={"alpha": 1.0}, norm_params={},
                  disable_norm_outer_blocks=0, encoder={},
                  decoder={"trim_right_ratio": config.trim_right_ratio, "final_activation": None,
                           "final_activation_params": None})
    data = {
        "compression_model": "encodec", "sample_rate": config.sample_rate,
        "channels": config.channels,
        "encodec": {"autoencoder": "seanet", "quantizer": "rvq",
                    "sample_rate": config.sample_rate, "channels": config.channels,
                    "causal": config.causal, "renormalize": config.normalize},
        "seanet": seanet,
        "rvq": {"n_q": config.num_codebooks, "q_dropout": False, "bins": config.codebook_size,
                "decay": 0.99, "kmeans_init": True, "kmeans_iters": 50,
                "threshold_ema_dead_code": 2},
        # Not audiocraft's: what only tokenwave reads back (audiocraft ignores extra sections).
        "tokenwave": {"name": config.name, "target_bandwidths": list(config.target_bandwidths)},
    }
    return yaml.safe_dump(data, sort_keys=False)


def write_audiocraft(state: StateDict, config: EncodecConfig, path: Path, overwrite: bool) -> Path:
    """``path`` (or ``path/compression_state_dict.bin`` for an existing folder)."""
    target = path / AUDIOCRAFT_NAME if path.is_dir() else path
    package = {"best_state": state, "xp.cfg": audiocraft_yaml(config),
               "version": f"tokenwave-{FORMAT_VERSION}", "exported": True}
    return write_pickle(target, package, overwrite)
