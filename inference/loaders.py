"""MusicGen LM checkpoint formats: audiocraft ``state_dict.bin`` and the transformers layout.

Our ``LMModel`` uses audiocraft's parameter names, so an audiocraft file loads directly; the
transformers layout (split q/k/v projections, other names) is translated here and only here.

audiocraft LM file: ``torch.save({'best_state': state_dict, 'xp.cfg': YAML text, ...})``; the
state dict holds the LM and the conditioners' output projections
(``condition_provider.conditioners.<name>.output_proj.*``), not T5 itself.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from lm.model import LMConfig, LMModel

# transformers decoder-layer names -> audiocraft names (q/k/v are packed separately).
_LAYER_NAMES = {
    "self_attn.out_proj": "self_attn.out_proj",
    "encoder_attn.out_proj": "cross_attention.out_proj",
    "fc1": "linear1",
    "fc2": "linear2",
    "self_attn_layer_norm": "norm1",
    "encoder_attn_layer_norm": "norm_cross",
    "final_layer_norm": "norm2",
}
_ATTENTIONS = {"self_attn": "self_attn", "encoder_attn": "cross_attention"}
# transformers' condition projections -> audiocraft conditioner output projections.
_CONDITION_NAMES = {
    "enc_to_dec_proj": "condition_provider.conditioners.description.output_proj",
    "audio_enc_to_dec_proj": "condition_provider.conditioners.self_wav.output_proj",
}
_DECODER = re.compile(r"^(?:decoder\.)?model\.decoder\.(.+)$")
_HEAD = re.compile(r"^(?:decoder\.)?lm_heads\.(\d+)\.(weight|bias)$")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_PROJ = re.compile(r"^(self_attn|encoder_attn)\.([qkv])_proj$")


def transformers_to_audiocraft_lm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Translate a transformers MusicGen state dict to audiocraft / tokenwave LM names.

    Accepts ``MusicgenForCausalLM`` keys (``model.decoder.*``, ``lm_heads.*``) or the composite
    ``MusicgenForConditionalGeneration`` ones (``decoder.model.decoder.*``, ``decoder.lm_heads.*``,
    ``enc_to_dec_proj.*``). Text and audio encoder weights are skipped (they are not part of the
    LM); any other key raises.
    """
    out: dict[str, torch.Tensor] = {}
    packed: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key.startswith(("text_encoder.", "audio_encoder.")) or key.endswith("embed_positions.weights"):
            continue
        if head := _HEAD.match(key):
            out[f"linears.{head[1]}.{head[2]}"] = value
            continue
        name, _, kind = key.rpartition(".")
        if name in _CONDITION_NAMES:
            out[f"{_CONDITION_NAMES[name]}.{kind}"] = value
            continue
        decoder = _DECODER.match(key)
        if decoder is None:
            raise KeyError(f"unexpected key {key!r} in a transformers MusicGen state dict")
        inner = decoder[1]
        if inner.startswith("embed_tokens."):
            out["emb." + inner[len("embed_tokens."):]] = value
        elif inner.startswith("layer_norm."):
            out["out_norm." + inner[len("layer_norm."):]] = value
        elif layer := _LAYER.match(inner):
            index, module, kind = layer[1], layer[2], layer[3]
            prefix = f"transformer.layers.{index}."
            if proj := _PROJ.match(module):
                packed.setdefault((prefix + _ATTENTIONS[proj[1]], kind), {})[proj[2]] = value
            elif module in _LAYER_NAMES:
                out[f"{prefix}{_LAYER_NAMES[module]}.{kind}"] = value
            else:
                raise KeyError(f"unexpected decoder-layer key {key!r}")
        else:
            raise KeyError(f"unexpected decoder key {key!r}")
    for (attention, kind), parts in packed.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise KeyError(f"{attention}: expected q, k and v projection {kind}s, found {sorted(parts)}")
        out[f"{attention}.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def audiocraft_to_transformers_lm(state_dict: dict[str, torch.Tensor], *, composite: bool = True
                                  ) -> dict[str, torch.Tensor]:
    """Inverse of :func:`transformers_to_audiocraft_lm`.

    ``composite`` picks ``MusicgenForConditionalGeneration`` names (with the condition
    projections as ``enc_to_dec_proj``); otherwise ``MusicgenForCausalLM`` names, where the
    conditioner projections have no place and raise.
    """
    decoder = "decoder.model.decoder." if composite else "model.decoder."
    heads = "decoder.lm_heads." if composite else "lm_heads."
    layer_names = {v: k for k, v in _LAYER_NAMES.items()}
    attentions = {v: k for k, v in _ATTENTIONS.items()}
    conditions = {v: k for k, v in _CONDITION_NAMES.items()}
    layer = re.compile(r"^transformer\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    packed = re.compile(r"^(self_attn|cross_attention)\.in_proj$")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name, _, kind = key.rpartition(".")
        if key.startswith("emb."):
            out[decoder + "embed_tokens." + key[len("emb."):]] = value
        elif key.startswith("out_norm."):
            out[decoder + "layer_norm." + key[len("out_norm."):]] = value
        elif key.startswith("linears."):
            out[heads + key[len("linears."):]] = value
        elif name in conditions:
            if not composite:
                raise KeyError(f"{key!r} has no place in a MusicgenForCausalLM state dict")
            out[f"{conditions[name]}.{kind}"] = value
        elif match := layer.match(key.replace("in_proj_weight", "in_proj.weight")
                                  .replace("in_proj_bias", "in_proj.bias")):
            index, module, kind = match.groups()
            prefix = f"{decoder}layers.{index}."
            if proj := packed.match(module):
                for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{prefix}{attentions[proj[1]]}.{part}_proj.{kind}"] = chunk
            elif module in layer_names:
                out[f"{prefix}{layer_names[module]}.{kind}"] = value
            else:
                raise KeyError(f"unexpected layer key {key!r}")
        else:
            raise KeyError(f"unexpected key {key!r} in an audiocraft LM state dict")
    return out


# -- audiocraft state_dict.bin ------------------------------------------------------------------

@dataclass
class AudiocraftLMCheckpoint:
    """A parsed audiocraft LM file: our config, the LM weights, the conditioner weights, the YAML."""

    config: LMConfig
    lm_state: dict[str, torch.Tensor]
    condition_state: dict[str, torch.Tensor]  # 'condition_provider.*' keys, names unchanged
    xp_cfg: dict[str, Any]


def read_audiocraft_lm(source: str | os.PathLike | dict) -> AudiocraftLMCheckpoint:
    """Read an audiocraft ``state_dict.bin`` (path, or the dict ``torch.load`` returned).

    The file is loaded with ``weights_only=True`` and its ``xp.cfg`` parsed with ``yaml.safe_load``.
    """
    name = "<dict>" if isinstance(source, dict) else os.fspath(source)
    if isinstance(source, dict):
        package = source
    else:
        if not os.path.isfile(name):
            raise FileNotFoundError(f"{name}: no such audiocraft LM file")
        try:
            package = torch.load(name, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{name}: not a loadable torch file ({exc})") from exc
    if not isinstance(package, dict) or "best_state" not in package or "xp.cfg" not in package:
        found = sorted(package) if isinstance(package, dict) else type(package).__name__
        raise ValueError(f"{name}: expected an audiocraft LM file, a dict with 'best_state' and 'xp.cfg'; "
                         f"found {found}")
    state = package["best_state"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{name}: 'best_state' must map names to tensors")
    xp_cfg = package["xp.cfg"]
    if isinstance(xp_cfg, str):
        try:
            xp_cfg = yaml.safe_load(xp_cfg)
        except yaml.YAMLError as exc:
            raise ValueError(f"{name}: 'xp.cfg' is not valid YAML ({exc})") from exc
    if not isinstance(xp_cfg, dict):
        raise ValueError(f"{name}: 'xp.cfg' must be a YAML mapping, found {type(xp_cfg).__name__}")
    try:
        config = lm_config_from_audiocraft(xp_cfg)
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{name}: unsupported LM config: {exc}") from exc
    condition_state = {k: v for k, v in state.items() if k.startswith("condition_provider.")}
    lm_state = {k: v for k, v in state.items() if not k.startswith("condition_provider.")}
    return AudiocraftLMCheckpoint(config=config, lm_state=lm_state, condition_state=condition_state,
                                  xp_cfg=xp_cfg)


def lm_config_from_audiocraft(xp_cfg: dict[str, Any]) -> LMConfig:
    """Our :class:`LMConfig` from audiocraft's experiment config (``transformer_lm``,
    ``codebooks_pattern``, ``fuser``, ``classifier_free_guidance``)."""
    if "transformer_lm" not in xp_cfg:
        raise KeyError("the config has no 'transformer_lm' section")
    lm = xp_cfg["transformer_lm"]
    unsupported = {
        "norm": ("layer_norm",), "layer_scale": (None,), "qk_layer_norm": (False,),
        "qk_layer_norm_cross": (False,), "kv_repeat": (1,), "past_context": (None,), "causal": (True,),
    }
    for key, allowed in unsupported.items():
        if key in lm and lm[key] not in allowed:
            raise ValueError(f"transformer_lm.{key}={lm[key]!r} is not supported (expected {allowed[0]!r})")
    fuser = xp_cfg.get("fuser") or {}
    cross = bool(lm.get("cross_attention", False)) or bool(fuser.get("cross"))
    pattern_cfg = xp_cfg.get("codebooks_pattern") or {}
    modeling = pattern_cfg.get("modeling") or lm.get("q_modeling") or "delay"
    options = pattern_cfg.get(modeling) or {}
    allowed_options = {"delay": {"delays", "flatten_first", "empty_initial"}, "parallel": set(),
                       "unroll": {"flattening", "delays"}, "coarse_first": {"delays"}}
    if modeling not in allowed_options:
        raise ValueError(f"codebooks_pattern.modeling={modeling!r} is not supported "
                         f"(expected one of {sorted(allowed_options)})")
    extra = set(options) - allowed_options[modeling]
    if extra:
        raise ValueError(f"codebooks_pattern.{modeling} has unknown options {sorted(extra)}")
    guidance = xp_cfg.get("classifier_free_guidance") or {}
    dim = int(lm["dim"])
    return LMConfig(
        dim=dim, num_heads=int(lm["num_heads"]), num_layers=int(lm["num_layers"]),
        ffn_dim=int(lm.get("hidden_scale", 4) * dim), num_codebooks=int(lm["n_q"]), card=int(lm["card"]),
        cross_attention=cross, positional_embedding=lm.get("positional_embedding", "sin"),
        max_period=float(lm.get("max_period", 10_000.0)), norm_first=bool(lm.get("norm_first", False)),
        bias_attn=bool(lm.get("bias_attn", True)), bias_ff=bool(lm.get("bias_ff", True)),
        bias_proj=bool(lm.get("bias_proj", True)), activation=lm.get("activation", "gelu"),
        dropout=float(lm.get("dropout", 0.0)), pattern=modeling,
        delays=options.get("delays"), flatten_first=int(options.get("flatten_first", 0)),
        empty_initial=int(options.get("empty_initial", 0)), flattening=options.get("flattening"),
        cfg_coef=float(guidance.get("inference_coef", 3.0)),
        two_step_cfg=bool(lm.get("two_step_cfg", False)))


def load_audiocraft_lm(source: str | os.PathLike | dict) -> tuple[LMModel, AudiocraftLMCheckpoint]:
    """Build an :class:`LMModel` from an audiocraft ``state_dict.bin`` (eval mode, strict load)."""
    checkpoint = read_audiocraft_lm(source)
    name = "<dict>" if isinstance(source, dict) else os.fspath(source)
    model = LMModel(checkpoint.config)
    try:
        missing, unexpected = model.load_state_dict(checkpoint.lm_state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{name}: weights do not match the config: {exc}") from exc
    if missing or unexpected:
        raise ValueError(f"{name}: weights do not match the config: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    return model.eval(), checkpoint
