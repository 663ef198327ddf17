"""transformers' MusicGen folders, and the one translation of its LM keys to ours.

A folder: ``config.json`` (``model_type`` ``musicgen`` or ``musicgen_melody``) and
``model.safetensors`` (or shards listed in ``model.safetensors.index.json``: ``text_encoder.*``,
``audio_encoder.*``, ``decoder.*``, ``enc_to_dec_proj.*``, ``audio_enc_to_dec_proj.*``), plus the
tokenizer files (``spiece.model``) that the hub folders carry. Stereo models (``audio_channels:
2``, 8 codebooks) get the interleaved-stereo codec. There is no window in these files: 30 s, as
the models were trained (override with ``max_duration=``).

Our ``LMModel`` uses audiocraft's parameter names; the transformers layout (split q/k/v
projections, other names) is translated here and only here (:func:`transformers_to_audiocraft_lm`,
and back with :func:`audiocraft_to_transformers_lm`).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from codec.formats import CheckpointError, read_json_file
from codec.model import EncodecModel, InterleavedStereo
from conditioning import FUSER_PRESETS, ChromaConditioner, ChromaConfig, ConditionFuser, ConditionProvider, \
    T5Conditioner
from conditioning.text import read_spiece
from lm import LMConfig, stereo_delays

from ..config import MUSICGEN_CONFIG, GeneratorConfig
from .loading import (CONFIG_NAME, PROVIDER_PREFIX, WEIGHTS_NAME, GeneratorParts, LoadTarget, StateDict,
                      Weights, assign, check_t5_files, group_by_layer, load_provider, meta_lm, provider_state,
                      ready_codec)

MUSICGEN_TYPES = ("musicgen", "musicgen_melody")
PREPROCESSOR_NAME = "preprocessor_config.json"
TRANSFORMERS_WINDOW = 30.0  # MusicGen's training window; the transformers files do not carry it

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
_ENCODERS = ("text_encoder.", "audio_encoder.")  # not the LM: read by their own loaders
_LM_PREFIXES = ("decoder.", *(f"{name}." for name in _CONDITION_NAMES))  # a composite folder's LM keys


def _recomputed(key: str) -> bool:
    """The sinusoidal position table: not a weight, we compute it."""
    return key.endswith("embed_positions.weights")


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
        if key.startswith(_ENCODERS) or _recomputed(key):
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



# -- folders --------------------------------------------------------------------------------------
def _transformers_lm_config(data: dict, where: Path) -> LMConfig:
    decoder = data.get("decoder")
    if not isinstance(decoder, dict):
        raise CheckpointError(f"{where}: expected a 'decoder' section in the MusicGen config")
    melody = data.get("model_type") == "musicgen_melody"
    card, channels = int(decoder["vocab_size"]), int(decoder.get("audio_channels", 1))
    problems = []
    if decoder.get("scale_embedding"):
        problems.append("scale_embedding=true")
    if decoder.get("cross_attention_hidden_size") not in (None, decoder["hidden_size"]):
        problems.append(f"cross_attention_hidden_size={decoder['cross_attention_hidden_size']}")
    if decoder.get("bos_token_id", card) != card:
        problems.append(f"bos_token_id={decoder.get('bos_token_id')} (expected the special token {card})")
    if channels not in (1, 2):
        problems.append(f"audio_channels={channels}")
    if problems:
        raise CheckpointError(f"{where}: unsupported MusicGen decoder settings: {', '.join(problems)}")
    num_codebooks = int(decoder["num_codebooks"])
    return LMConfig(
        dim=int(decoder["hidden_size"]), num_heads=int(decoder["num_attention_heads"]),
        num_layers=int(decoder["num_hidden_layers"]), ffn_dim=int(decoder["ffn_dim"]),
        num_codebooks=num_codebooks, card=card, cross_attention=not melody,
        activation=decoder.get("activation_function", "gelu"),
        delays=tuple(stereo_delays(num_codebooks // 2)) if channels == 2 else None)


def _transformers_lm_state(weights: Weights, target: LoadTarget) -> StateDict:
    """Decoder and projection weights in audiocraft names, translated one layer at a time (q, k, v
    are packed per layer), so only one layer's worth of extra memory is ever held."""
    keys = [k for k in weights.keys() if k.startswith(_LM_PREFIXES) and not _recomputed(k)]
    state: StateDict = {}
    for group in weights.groups(group_by_layer(keys), lambda t: t):
        try:
            translated = transformers_to_audiocraft_lm(group)
        except KeyError as error:
            raise CheckpointError(f"{weights.where}: {error.args[0]}") from None
        state.update(target.lm_state(translated))  # quantized here, one layer at a time
    return state


def _transformers_t5(data: dict, weights: Weights, target: LoadTarget) -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    text = data.get("text_encoder")
    if not isinstance(text, dict) or text.get("model_type") not in ("t5", None):
        raise CheckpointError(f"{weights.where.parent / CONFIG_NAME}: expected a T5 text_encoder, found "
                              f"{None if not isinstance(text, dict) else text.get('model_type')!r}")
    config = T5Config.from_dict({k: v for k, v in text.items() if k != "model_type"})
    with torch.device("meta"):
        encoder = T5EncoderModel(config)
    prefix = "text_encoder."
    (state,) = weights.groups([[k for k in weights.keys() if k.startswith(prefix)]], target.t5)
    state = {k[len(prefix):]: v for k, v in state.items()}
    tied = "encoder.embed_tokens.weight"
    if tied not in state and "shared.weight" in state:
        state[tied] = state["shared.weight"]  # transformers stores the tied embedding once
    return assign(encoder, state, weights.where).eval()


def _transformers_tokenizer(folder: Path, t5_path: str | os.PathLike | None):
    """The T5 tokenizer and the bytes of its ``spiece.model`` (None when there is only tokenizer.json)."""
    from transformers import T5Tokenizer

    source = Path(t5_path) if t5_path is not None else folder
    if not ((source / "spiece.model").is_file() or (source / "tokenizer.json").is_file()):
        raise CheckpointError(f"{source}: no T5 tokenizer (spiece.model or tokenizer.json); the hub "
                              f"folders carry one next to config.json, or pass t5_path= to a T5 folder")
    check_t5_files(source)
    return T5Tokenizer.from_pretrained(str(source)), read_spiece(source)


def _chroma_config_from_transformers(folder: Path, chroma_length: int) -> ChromaConfig:
    """MusicgenMelody's feature extractor settings (preprocessor_config.json, else its defaults)."""
    extractor = read_json_file(folder / PREPROCESSOR_NAME) if (folder / PREPROCESSOR_NAME).is_file() else {}
    rate = int(extractor.get("sampling_rate", 32_000))
    n_fft = int(extractor.get("n_fft", 16_384))
    hop = int(extractor.get("hop_length", 4_096))
    # transformers gives the chroma length in frames; ours derives it from a duration. Half a
    # sample keeps the floor in the frame count from rounding down.
    duration = ((chroma_length - 1) * hop + 0.5) / rate
    config = ChromaConfig(sample_rate=rate, num_chroma=int(extractor.get("num_chroma", 12)), n_fft=n_fft,
                          hop_length=hop, argmax=True, duration=duration)
    if config.chroma_length != chroma_length:
        raise CheckpointError(f"{folder}: chroma_length {chroma_length} cannot be expressed with n_fft "
                              f"{n_fft} and hop {hop}")
    return config


def _transformers_codec(folder: Path, data: dict, weights: Weights, device: torch.device,
                        stereo: bool) -> EncodecModel | InterleavedStereo:
    """The audio encoder; :mod:`codec.formats` reads one weights file, so the codec of a sharded
    folder (tens of millions of parameters) is handed to it as a folder of its own."""
    if (folder / WEIGHTS_NAME).is_file():
        return ready_codec(folder, device, stereo)
    from safetensors.torch import save_file

    prefix = "audio_encoder."
    (state,) = weights.groups([[k for k in weights.keys() if k.startswith(prefix)]], lambda t: t)
    with tempfile.TemporaryDirectory(prefix="tokenwave-codec-") as tmp:
        (Path(tmp) / CONFIG_NAME).write_text(json.dumps(data["audio_encoder"]), encoding="utf-8")
        save_file({k[len(prefix):]: v.contiguous() for k, v in state.items()}, str(Path(tmp) / WEIGHTS_NAME),
                  metadata={"format": "pt"})
        return ready_codec(Path(tmp), device, stereo, copy=True)


def load_transformers(folder: Path, target: LoadTarget, t5_path: str | os.PathLike | None) -> GeneratorParts:
    """A transformers MusicGen folder: LM and projections translated, T5 from the folder, the
    audio encoder as the codec; masked cross-attention over padded text, as transformers does."""
    where = folder / CONFIG_NAME
    data = read_json_file(where)
    weights = Weights(folder)
    try:
        lm_config = _transformers_lm_config(data, where)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: not a usable MusicGen config ({error})") from None
    state = _transformers_lm_state(weights, target)
    conditioner_state = provider_state(state)
    lm_state = {k: v for k, v in state.items() if not k.startswith(PROVIDER_PREFIX)}
    lm = meta_lm(lm_config, lm_state, weights.where, target)

    encoder = _transformers_t5(data, weights, target)
    projected = "conditioners.description.output_proj.weight" in conditioner_state
    tokenizer, spiece = _transformers_tokenizer(folder, t5_path)
    text = T5Conditioner(encoder=encoder, tokenizer=tokenizer, empty_is_null=False, spiece_model=spiece,
                         output_dim=lm_config.dim if projected else None)
    conditioners: dict[str, nn.Module] = {"description": text}
    fuser = FUSER_PRESETS["text2music"]
    if data.get("model_type") == "musicgen_melody":
        chroma = _chroma_config_from_transformers(folder, int(data.get("chroma_length", 235)))
        conditioners["self_wav"] = ChromaConditioner(output_dim=lm_config.dim, config=chroma,
                                                     match_length=True)
        fuser = FUSER_PRESETS["chroma2music"]
    provider = load_provider(ConditionProvider(conditioners), conditioner_state, target, weights.where)
    stereo = int(data["decoder"].get("audio_channels", 1)) == 2
    codec = _transformers_codec(folder, data, weights, target.device, stereo)
    config = GeneratorConfig(max_duration=TRANSFORMERS_WINDOW, extend_stride=MUSICGEN_CONFIG.extend_stride,
                             mask_condition_padding=True)
    return GeneratorParts(lm, codec, provider, ConditionFuser(fuser), config)
