"""audiocraft checkpoints: an LM file ``state_dict.bin`` and its ``compression_state_dict.bin``.

``state_dict.bin``: ``torch.save({'best_state': state_dict, 'xp.cfg': YAML text, ...})``; the
state dict holds the LM (with our parameter names: it loads directly) and the conditioners' output
projections (``condition_provider.conditioners.<name>.output_proj.*``), not T5 itself. The YAML
gives the LM, the conditioners, the fuser and the window (``dataset.segment_duration``).
``compression_state_dict.bin``: a codec, or the pointer ``{'pretrained': 'facebook/encodec_32khz'}``
that :mod:`codec.registry` resolves (from the Hugging Face cache or hub if need be). T5 is only
named (``conditioners.description.t5.name``): it is looked for in ``t5_path=``, the folder
itself, ``<folder>/<name>``, ``<folder>/t5``, ``$TOKENWAVE_MODELS/<name>``, then the Hugging Face
cache and hub (:func:`inference.registry.find_t5`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from codec.files import read_pickle
from codec.formats import CheckpointError
from codec.formats.audiocraft import xp_config
from conditioning import ChromaConditioner, ChromaConfig, ConditionFuser, ConditionProvider, FuserConfig, \
    T5Conditioner
from conditioning.text import quiet_transformers
from lm.model import LMConfig, LMModel

from .. import registry
from ..config import AUDIOGEN_CONFIG, GeneratorConfig
from .loading import (GeneratorParts, LoadTarget, check_t5_files, load_provider, meta_lm, provider_state,
                      ready_codec)

AUDIOCRAFT_LM = "state_dict.bin"
AUDIOCRAFT_CODEC = "compression_state_dict.bin"


# -- the LM file ------------------------------------------------------------------------------------
@dataclass
class AudiocraftLMCheckpoint:
    """A parsed audiocraft LM file: our config, the LM weights, the conditioner weights, the YAML."""

    config: LMConfig
    lm_state: dict[str, torch.Tensor]
    condition_state: dict[str, torch.Tensor]  # 'condition_provider.*' keys, names unchanged
    xp_cfg: dict[str, Any]


def read_audiocraft_lm(source: str | os.PathLike | dict) -> AudiocraftLMCheckpoint:
    """Read an audiocraft ``state_dict.bin`` (path, or the dict :func:`codec.files.read_pickle` returned).

    The file is loaded with ``weights_only=True`` and its ``xp.cfg`` parsed with ``yaml.safe_load``.
    """
    name = "<dict>" if isinstance(source, dict) else os.fspath(source)
    if isinstance(source, dict):
        package = source
    else:
        if not os.path.isfile(name):
            raise FileNotFoundError(f"{name}: no such audiocraft LM file")
        try:
            package = read_pickle(name)
        except CheckpointError as error:
            reason = str(error).removeprefix(f"{name}: ")
            raise CheckpointError(f"{name}: not a loadable torch file ({reason})") from None
    if not isinstance(package, dict) or "best_state" not in package or "xp.cfg" not in package:
        found = sorted(package) if isinstance(package, dict) else type(package).__name__
        raise ValueError(f"{name}: expected an audiocraft LM file, a dict with 'best_state' and 'xp.cfg'; "
                         f"found {found}")
    state = package["best_state"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{name}: 'best_state' must map names to tensors")
    xp_cfg = xp_config(package, name)
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


# -- folders --------------------------------------------------------------------------------------
_INTERPOLATION = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")


def _cfg_get(root: dict, dotted: str, default: Any = KeyError, depth: int = 0) -> Any:
    """``root['a']['b']`` for ``'a.b'``, following whole-value ``${x.y}`` references (OmegaConf's)."""
    node: Any = root
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is KeyError:
                raise KeyError(f"'{dotted}' is missing from the audiocraft config (xp.cfg)")
            return default
        node = node[part]
    if isinstance(node, str) and (match := _INTERPOLATION.match(node)):
        if depth > 10:
            raise KeyError(f"'{dotted}': references nest too deep")
        return _cfg_get(root, match[1], default, depth + 1)
    return node


def _audiocraft_conditioner(name: str, spec: dict, xp_cfg: dict, dim: int, folder: Path, target: LoadTarget,
                            t5_path, models_dir) -> nn.Module:
    kind = spec.get("model")
    options = {k: _cfg_get(xp_cfg, f"conditioners.{name}.{kind}.{k}") for k in (spec.get(kind) or {})}
    if kind == "t5":
        if options.get("normalize_text"):
            raise CheckpointError(f"{folder}: conditioners.{name}.t5.normalize_text=true (spacy text "
                                  f"normalization) is not supported")
        t5 = registry.find_t5(str(options["name"]), near=folder, t5_path=t5_path, models_dir=models_dir)
        check_t5_files(t5)
        with quiet_transformers():
            return T5Conditioner.from_pretrained(t5, output_dim=dim,
                                                 finetune=bool(options.get("finetune", False)),
                                                 word_dropout=float(options.get("word_dropout", 0.0)),
                                                 empty_is_null=True, dtype=target.t5_dtype)
    if kind in ("chroma_stem", "chroma"):
        n_fft = 2 ** int(options.get("radix2_exp", 12))
        config = ChromaConfig(sample_rate=int(options.get("sample_rate", _cfg_get(xp_cfg, "sample_rate"))),
                              num_chroma=int(options.get("n_chroma", 12)), n_fft=n_fft, hop_length=n_fft // 4,
                              argmax=bool(options.get("argmax", False)),
                              duration=float(_cfg_get(xp_cfg, "dataset.segment_duration")))
        # audiocraft's MusicGen.get_pretrained switches match_len_on_eval on for inference.
        return ChromaConditioner(output_dim=dim, config=config, match_length=True)
    raise CheckpointError(f"{folder}: conditioner {name!r} of type {kind!r} is not supported "
                          f"(t5, chroma_stem)")


def _audiocraft_fuser(xp_cfg: dict) -> FuserConfig:
    fuser = xp_cfg.get("fuser") or {}
    lists = {mode: tuple(fuser.get(mode) or ()) for mode in ("cross", "prepend", "sum", "input_interpolate")}
    return FuserConfig(**lists, cross_attention_pos_emb=bool(fuser.get("cross_attention_pos_emb", False)),
                       cross_attention_pos_emb_scale=float(fuser.get("cross_attention_pos_emb_scale", 1.0)))


def load_audiocraft(path: Path, target: LoadTarget, default_config: GeneratorConfig, t5_path, models_dir
                    ) -> GeneratorParts:
    """An audiocraft LM file (or its folder) and the codec next to it. The window is the YAML's;
    the stride AudioGen's for an AudioGen solver, else ``default_config``'s (the class's)."""
    folder = path.parent if path.is_file() else path
    lm_file = path if path.is_file() else folder / AUDIOCRAFT_LM
    package = read_pickle(lm_file, mmap=True)
    try:
        checkpoint = read_audiocraft_lm(package)
    except ValueError as error:
        raise CheckpointError(f"{lm_file}: {str(error).removeprefix('<dict>: ')}") from None
    xp_cfg = checkpoint.xp_cfg
    lm = meta_lm(checkpoint.config, target.lm_state(dict(checkpoint.lm_state)), lm_file, target)
    dim = checkpoint.config.dim
    try:
        specs = xp_cfg.get("conditioners") or {}
        conditioners = {
            name: _audiocraft_conditioner(name, spec, xp_cfg, dim, folder, target, t5_path, models_dir)
            for name, spec in specs.items()}
        fuser = _audiocraft_fuser(xp_cfg)
        window = float(_cfg_get(xp_cfg, "dataset.segment_duration"))
        channels = int(_cfg_get(xp_cfg, "channels", 1))
        stereo = bool(_cfg_get(xp_cfg, "interleave_stereo_codebooks.use", False)) or channels == 2
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{lm_file}: unsupported audiocraft config: {error}") from None
    provider = ConditionProvider(conditioners)
    fine_tuned = {k for k in provider.state_dict() if ".t5." in k}
    conditioner_state = provider_state(checkpoint.condition_state)
    if fine_tuned - set(conditioner_state):
        raise CheckpointError(f"{lm_file}: T5 is marked fine-tuned but its weights are not in the checkpoint")
    provider = load_provider(provider, conditioner_state, target, lm_file)
    codec_file = folder / AUDIOCRAFT_CODEC
    if not codec_file.is_file():
        raise CheckpointError(f"{folder}: expected {AUDIOCRAFT_CODEC} next to {lm_file.name}")
    codec = ready_codec(codec_file, target.device, stereo, models_dir)
    audiogen = _cfg_get(xp_cfg, "solver", None) == "audiogen"
    stride = (AUDIOGEN_CONFIG if audiogen else default_config).extend_stride
    config = GeneratorConfig(max_duration=window, mask_condition_padding=False,
                             extend_stride=stride if stride and stride < window else None)
    return GeneratorParts(lm, codec, provider, ConditionFuser(fuser), config)
