"""Read and write every EnCodec checkpoint format; :func:`load_model` detects which one it has.

Formats (``Checkpoint.format``):

- ``"original"``: the original release's ``.th`` files, a bare state dict with our key names
  (24 kHz: ``weight_g``/``weight_v``; 48 kHz: plain weights and GroupNorm ``conv.norm.*``).
  A bare state dict does not say its sample rate, causality or padding, so the config comes
  from the release file name, else from the preset whose shapes the tensors match, else from
  ``config=``. A ``<stem>-<hex>.th`` name carries a sha256 prefix, which is verified.
- ``"audiocraft"``: ``compression_state_dict.bin``, ``{'best_state': state dict, 'xp.cfg':
  YAML text, 'version', 'exported': True}``. The YAML is read with ``yaml.safe_load`` and plain
  ``${a.b}`` interpolations are resolved here (OmegaConf's ``to_yaml`` leaves them in). The
  pointer form ``{'pretrained': 'facebook/encodec_32khz'}`` is resolved through
  :mod:`codec.registry` (local files only).
- ``"transformers"``: a folder with ``config.json`` and ``model.safetensors`` or
  ``pytorch_model.bin`` (MusicGen folders too: their ``audio_encoder``). Keys are translated by
  :func:`transformers_key` (ours -> theirs) and its inverse over the expected keys.
- ``"tokenwave"``: a folder with ``config.json`` (``EncodecConfig.to_dict()`` plus
  ``"format": "tokenwave-encodec"`` and ``"format_version"``) and ``model.safetensors`` with our
  key names, weight norm folded or not; it round-trips exactly.

A tokenwave generator folder (``config.json`` with ``"format": "tokenwave-musicgen"``) stands
for the codec in its ``codec/`` subfolder, so a generator's name or folder loads its codec.

Every loaded model carries :func:`weights_id`: the first 8 hex digits of a sha256 over its
tensors as stored (names, dtypes, shapes and bytes, in sorted name order), computed once at load.
``.ecdc`` files of codecs other than the public ones record it, and decoding with other weights is
refused (:mod:`codec.ecdc`).

What the references do, checked against transformers 5.x and the sources of audiocraft and the
original release:

- transformers' conversion of the 32 kHz model sets ``use_conv_shortcut=False`` but leaves
  ``pad_mode`` at its default ``"reflect"``, while audiocraft trained it with ``"constant"``
  padding. MusicGen's released ``compression_state_dict.bin`` is only the pointer
  ``facebook/encodec_32khz`` and audiocraft loads it through transformers' ``EncodecModel``, so
  released MusicGen runs the codec with reflect padding. Each file's own config decides ours;
  the ``encodec_32khz`` preset follows the released model (reflect); audiocraft-trained
  exports carry ``pad_mode: constant`` in their YAML and get it from there.
- transformers' ``encode(bandwidth=None)`` uses the smallest of ``target_bandwidths``; the
  original release and tokenwave use all codebooks. transformers derives the number of
  codebooks from the largest bandwidth:
  ``floor(1000 * bw[-1] / (ceil(sr / hop) * ceil(log2(bins))))``.
- transformers always has the LSTM and knows only ``weight_norm`` and ``time_group_norm``.
  transformers 5 stores weight norm as ``parametrizations.weight.original0`` (g) /
  ``original1`` (v); older files say ``weight_g``/``weight_v``; both are read here. Its
  ``save_pretrained`` writes only safetensors; ``pytorch_model.bin`` comes from 4.x.
- transformers' 48 kHz ``encode`` stacks the chunks' codes, zero-padding the last chunk and
  returning ``last_frame_pad_length``; ``decode`` needs that value back to drop the padding.

Untrusted input: pickles are read only with ``torch.load(..., weights_only=True)``, YAML only
with ``yaml.safe_load``. Anything wrong raises :class:`CheckpointError` naming the file, what
was expected and what was found.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from . import registry
from .conv import NORMS, PAD_MODES, fold_weight_norm
from .model import PRESETS, EncodecConfig, EncodecModel

FORMATS = ("tokenwave", "original", "audiocraft", "transformers")
FORMAT_MARKER = "tokenwave-encodec"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"
AUDIOCRAFT_NAME = "compression_state_dict.bin"
GENERATOR_MARKER = "tokenwave-musicgen"  # a generator folder: its codec is in a subfolder
WEIGHTS_ID_LENGTH = 8
_WEIGHTS_ID_ATTR = "_tokenwave_weights_id"

PathLike = str | os.PathLike
StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: names the file, what was expected and what was found."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read from disk: its format, config and state dict in our key names."""

    format: str
    config: EncodecConfig
    state: StateDict
    path: Path


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
    model = _checked_model(checkpoint)
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
    _checked_model(checkpoint)
    return checkpoint


def state_weights_id(state: StateDict) -> str:
    """First 8 hex digits of a sha256 over ``state``: for each tensor in sorted name order, its
    name, dtype, shape and bytes. Equal for a model in memory and the folder it is saved to."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        digest.update(f"{key}|{dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:WEIGHTS_ID_LENGTH]


def remember_weights_id(model: torch.nn.Module, weights_id: str) -> None:
    """Record the identity of the weights a model was loaded from (see :func:`weights_id`)."""
    setattr(model, _WEIGHTS_ID_ATTR, weights_id)


def weights_id(model: torch.nn.Module) -> str:
    """The identity of ``model``'s weights: the one recorded when it was loaded (its stored
    tensors, whatever folding or dtype change came after), else computed from its state dict now
    (not cached: weights in memory may still change)."""
    cached = getattr(model, _WEIGHTS_ID_ATTR, None)
    return cached if cached is not None else state_weights_id(model.state_dict())


def detect_format(path: PathLike) -> str:
    """Which of :data:`FORMATS` a file or folder holds, from its layout and markers."""
    path = Path(path)
    path = _generator_codec_folder(path) or path
    folder = _folder_of(path)
    if folder is not None:
        config_file = folder / CONFIG_NAME
        if config_file.is_file():
            return "tokenwave" if read_json_file(config_file).get("format") == FORMAT_MARKER \
                else "transformers"
        path = _inner_file(folder)
    return _pickle_kind(_read_pickle(path), path)


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
    path = Path(path)
    config = model.config
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if format == "tokenwave":
        data = {**config.to_dict(), "format": FORMAT_MARKER, "format_version": FORMAT_VERSION}
        return _write_folder(path, {CONFIG_NAME: _json_writer(data),
                                    SAFETENSORS_NAME: _safetensors_writer(state)}, overwrite)
    state = _unfolded(state, config)
    if format == "original":
        target = path / f"{config.name}.th" if path.is_dir() else path
        return _write_file(target, lambda tmp: torch.save(state, tmp), overwrite)
    if format == "audiocraft":
        target = path / AUDIOCRAFT_NAME if path.is_dir() else path
        package = {"best_state": state, "xp.cfg": _audiocraft_yaml(config),
                   "version": f"tokenwave-{FORMAT_VERSION}", "exported": True}
        return _write_file(target, lambda tmp: torch.save(package, tmp), overwrite)
    if format == "transformers":
        data = _transformers_config(config, next(iter(state.values())).dtype)
        weights = {_parametrized_key(transformers_key(k)): v for k, v in state.items()}
        return _write_folder(path, {CONFIG_NAME: _json_writer(data),
                                    SAFETENSORS_NAME: _safetensors_writer(weights)}, overwrite)
    raise ValueError(f"unknown checkpoint format {format!r}; expected one of {FORMATS}")


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


# -- locating and dispatching ---------------------------------------------------------------
def _locate(path_or_name: PathLike, models_dir: PathLike | None) -> Path:
    text = os.fspath(path_or_name)
    if not text.startswith("//pretrained/") and os.path.exists(text):
        return Path(text)
    return registry.resolve(text, models_dir=models_dir)


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


def _generator_codec_folder(path: Path) -> Path | None:
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


def _read(path: Path, models_dir: PathLike | None, config: EncodecConfig | None,
          hops: int) -> Checkpoint:
    path = _generator_codec_folder(path) or path
    folder = _folder_of(path)
    if folder is not None and (folder / CONFIG_NAME).is_file():
        _no_config_override(config, folder)
        return _read_config_folder(folder)
    if folder is not None:
        path = _inner_file(folder)
    _verify_checksum(path)
    obj = _read_pickle(path)
    kind = _pickle_kind(obj, path)
    if kind == "original":
        return _read_original(obj, path, config)
    _no_config_override(config, path)
    if "pretrained" in obj:
        return _follow_pointer(obj["pretrained"], path, models_dir, hops)
    return _read_audiocraft(obj, path)


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
    target = name if os.path.exists(name) else registry.resolve(name, models_dir=models_dir)
    return _read(Path(target), models_dir, None, hops + 1)


# -- low-level file reading -----------------------------------------------------------------
def _read_pickle(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for bad files; all mean "unreadable"
        with open(path, "rb") as file:
            head = file.read(4)
        kind = "a zip archive" if head.startswith(b"PK") else "a pickle" \
            if head[:1] == b"\x80" else f"a file that is neither a zip archive nor a pickle " \
            f"(it starts with {head!r})"
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # torch's first line advises weights_only=False; the line naming the global says more.
        reason = next((line for line in lines if "GLOBAL" in line or "global" in line),
                      lines[0] if lines else type(error).__name__)
        if "Weights only load failed" in str(error):
            reason = "it holds Python objects or code that a weights-only load refuses: " + reason
        if kind.startswith("a file"):
            raise CheckpointError(f"{path}: expected a torch checkpoint, found {kind}") from None
        raise CheckpointError(f"{path}: expected a torch checkpoint of tensors, found {kind} "
                              f"that cannot be loaded ({reason})") from None


def read_safetensors_file(path: PathLike, prefix: str = "", *,
                          keys_only: bool = False) -> StateDict | list[str]:
    """The tensors of a safetensors file whose names start with ``prefix`` (the prefix dropped),
    or with ``keys_only`` just their names (reads the header only; a truncated file is caught
    there too, as the header gives the data's size). The one reader the loaders use: a missing,
    truncated or foreign file raises :class:`CheckpointError` naming it (or FileNotFoundError)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a safetensors file)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            if keys_only:
                return list(file.keys())
            return {key[len(prefix):]: file.get_tensor(key) for key in file.keys()
                    if key.startswith(prefix)}
    except Exception as error:  # SafetensorError, OSError: corrupt, truncated or not safetensors
        size = path.stat().st_size
        raise CheckpointError(f"{path}: expected a safetensors file, found {size} bytes that "
                              f"cannot be read ({' '.join(str(error).split())}); the file is "
                              f"truncated or corrupt: copy or export it again") from None


def read_json_file(path: PathLike, what: str = "a JSON config") -> dict:
    """A JSON object from ``path``; unreadable text, bad JSON or another JSON type raise
    :class:`CheckpointError` naming the file, what was expected and what was found."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected {what})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise CheckpointError(f"{path}: expected {what}, found unreadable text "
                              f"({' '.join(str(error).split())[:200]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected {what} (a JSON object), found "
                              f"{type(data).__name__}")
    return data



def _verify_checksum(path: Path) -> None:
    expected = registry.release_checksum(path.name)
    if expected is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    found = digest.hexdigest()[: len(expected)]
    if found != expected:
        raise CheckpointError(f"{path}: checksum mismatch: the name says sha256 {expected}..., "
                              f"the file's sha256 is {found}...; the file is corrupt or "
                              f"incomplete (a name ending in -<hex>.th carries a sha256 prefix)")


def _tensors(obj: Any, path: Path, what: str) -> StateDict:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected {what} to be a state dict, "
                              f"found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: expected {what} to map names to tensors, found "
                              f"non-tensor entries {_brief([str(k) for k in bad])}")
    return _canonical_weight_norm(obj)


def _canonical_weight_norm(state: StateDict) -> StateDict:
    """Parametrized weight norm (``parametrizations.weight.original0/1``) -> ``weight_g/v``."""
    out = {}
    for key, value in state.items():
        key = key.replace(".parametrizations.weight.original0", ".weight_g")
        out[key.replace(".parametrizations.weight.original1", ".weight_v")] = value
    return out


def _parametrized_key(key: str) -> str:
    """``weight_g``/``weight_v`` -> the parametrization names transformers 5 writes."""
    if key.endswith(".weight_g"):
        return key[: -len("weight_g")] + "parametrizations.weight.original0"
    if key.endswith(".weight_v"):
        return key[: -len("weight_v")] + "parametrizations.weight.original1"
    return key


# -- checking a state against its config ----------------------------------------------------
def _is_folded(state: StateDict, config: EncodecConfig) -> bool:
    return config.norm == "weight_norm" and any(
        k.endswith((".conv.conv.weight", ".convtr.convtr.weight")) for k in state)


def _build(config: EncodecConfig, path: Path) -> EncodecModel:
    _check_supported(config, path)
    try:
        return EncodecModel(config)
    except (ValueError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{path}: its config cannot be built ({error})") from None


def _key_names(config: EncodecConfig, path: Path) -> list[str]:
    """The state-dict keys of a model with ``config``, from a narrow twin built in milliseconds.

    Key names depend on the layout (ratios, residual layers, LSTM, shortcut, norm, codebook
    count), never on widths. (Meta tensors would avoid building, but the first arithmetic on
    one imports torch._dynamo, which costs seconds.)
    """
    twin = replace(config, n_filters=config.compress, dimension=1, codebook_size=2)
    return list(_build(twin, path).state_dict())


def _check_supported(config: EncodecConfig, path: Path) -> None:
    if config.norm not in NORMS:
        raise CheckpointError(f"{path}: unsupported norm {config.norm!r}; expected one of {NORMS}")
    if config.pad_mode not in PAD_MODES:
        raise CheckpointError(f"{path}: unsupported pad mode {config.pad_mode!r}; "
                              f"expected one of {PAD_MODES}")


def _checked_model(checkpoint: Checkpoint) -> EncodecModel:
    """A freshly built model for ``checkpoint``'s config, once its state is known to fit."""
    config, state = checkpoint.config, checkpoint.state
    model = _build(config, checkpoint.path)
    if _is_folded(state, config):
        fold_weight_norm(model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {expected[k]} != {tuple(state[k].shape)}" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_brief(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_brief(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches (expected != found): {_brief(wrong)}")
    if problems:
        raise CheckpointError(f"{checkpoint.path} ({checkpoint.format} format) does not fit the "
                              f"{config.name!r} config: " + "; ".join(problems))
    return model


def _brief(items: list[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# -- original release: bare state dicts -----------------------------------------------------
def _read_original(obj: Any, path: Path, config: EncodecConfig | None) -> Checkpoint:
    state = _tensors(obj, path, "the file")
    if any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in state):
        raise CheckpointError(f"{path}: found transformers key names; expected this file as "
                              f"{PICKLE_WEIGHTS_NAME} in a folder with its {CONFIG_NAME}")
    if config is None:
        release = registry.canonical_name(path.name)
        config = PRESETS.get(release) if release in registry.RELEASE_FILES else None
    if config is None:
        try:
            architecture = _infer_architecture(state, path)
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


def _infer_architecture(state: StateDict, path: Path) -> dict[str, Any]:
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
                              f"{_brief(sorted(state), 3)}")

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


def _preset_name(config: EncodecConfig) -> str | None:
    """The preset that ``config`` is, apart from name and bandwidths; None if none is."""
    for name, preset in PRESETS.items():
        if replace(preset, name=config.name, target_bandwidths=config.target_bandwidths) == config:
            return name
    return None


def _named(config: EncodecConfig, fallback: str) -> EncodecConfig:
    return replace(config, name=_preset_name(config) or fallback)


def _fallback_name(path: Path) -> str:
    if path.name in (AUDIOCRAFT_NAME, CONFIG_NAME, SAFETENSORS_NAME, PICKLE_WEIGHTS_NAME):
        return path.parent.name
    return path.stem.split("-")[0] if registry.release_checksum(path.name) else path.stem


# -- audiocraft -----------------------------------------------------------------------------
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


def _read_audiocraft(package: dict, path: Path) -> Checkpoint:
    best = package["best_state"]
    if isinstance(best, dict) and isinstance(best.get("model"), dict):
        best = best["model"]  # a training checkpoint's best_state wraps the model's
    state = _tensors(best, path, "'best_state'")
    text = package.get("xp.cfg")
    if not isinstance(text, str):
        raise CheckpointError(f"{path}: expected 'xp.cfg' to hold the config as YAML text (as "
                              f"audiocraft.utils.export writes it), found {type(text).__name__}")
    import yaml

    try:
        root = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise CheckpointError(f"{path}: 'xp.cfg' is not valid YAML ({error})") from None
    if not isinstance(root, dict):
        raise CheckpointError(f"{path}: expected 'xp.cfg' to be a YAML mapping")
    return Checkpoint("audiocraft", _audiocraft_config(root, path), state, path)


def _audiocraft_config(root: dict, path: Path) -> EncodecConfig:
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
        preset = PRESETS.get(_preset_name(config) or "")
        bandwidths = preset.target_bandwidths if preset else (
            round(num_codebooks * _bandwidth_per_codebook(config), 6),)
    config = replace(config, target_bandwidths=tuple(bandwidths))
    return config if config.name else _named(config, _fallback_name(path))


def _bandwidth_per_codebook(config: EncodecConfig) -> float:
    return int(math.log2(config.codebook_size)) * config.frame_rate / 1000


def _audiocraft_yaml(config: EncodecConfig) -> str:
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


# -- folders with config.json: tokenwave and transformers -----------------------------------
_TRANSFORMERS_DEFAULTS: dict[str, Any] = dict(  # transformers' EncodecConfig defaults
    target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0], sampling_rate=24_000, audio_channels=1,
    normalize=False, chunk_length_s=None, overlap=None, hidden_size=128, num_filters=32,
    num_residual_layers=1, upsampling_ratios=[8, 5, 4, 2], norm_type="weight_norm",
    kernel_size=7, last_kernel_size=7, residual_kernel_size=3, dilation_growth_rate=2,
    use_causal_conv=True, pad_mode="reflect", compress=2, num_lstm_layers=2,
    trim_right_ratio=1.0, codebook_size=1024, codebook_dim=None, use_conv_shortcut=True)
_MUSICGEN_TYPES = ("musicgen", "musicgen_melody")


def _read_config_folder(folder: Path) -> Checkpoint:
    data = read_json_file(folder / CONFIG_NAME)
    if data.get("format") == FORMAT_MARKER:
        return _read_tokenwave(folder, data)
    prefix = ""
    if data.get("model_type") in _MUSICGEN_TYPES and isinstance(data.get("audio_encoder"), dict):
        data, prefix = data["audio_encoder"], "audio_encoder."
    if data.get("model_type") != "encodec":
        raise CheckpointError(f"{folder / CONFIG_NAME}: expected a tokenwave config (\"format\": "
                              f"\"{FORMAT_MARKER}\") or a transformers EnCodec config (model_type "
                              f"'encodec'), found model_type={data.get('model_type')!r}")
    config = _config_from_transformers(data, folder)
    raw, weights = _read_weights(folder, prefix)
    ours = {transformers_key(k): k for k in _key_names(config, folder)}
    unknown = [k for k in raw if k not in ours]
    if unknown:
        raise CheckpointError(f"{weights}: {len(unknown)} keys that a transformers EnCodec with "
                              f"this config does not have: {_brief(unknown)}")
    return Checkpoint("transformers", config, {ours[k]: v for k, v in raw.items()}, folder)


def _read_weights(folder: Path, prefix: str) -> tuple[StateDict, Path]:
    safetensors_file, pickle_file = folder / SAFETENSORS_NAME, folder / PICKLE_WEIGHTS_NAME
    if safetensors_file.is_file():
        return _canonical_weight_norm(read_safetensors_file(safetensors_file, prefix)), \
            safetensors_file
    if pickle_file.is_file():
        state = _tensors(_read_pickle(pickle_file), pickle_file, "the file")
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, pickle_file
    raise CheckpointError(f"{folder}: expected weights in {SAFETENSORS_NAME} or "
                          f"{PICKLE_WEIGHTS_NAME} next to {CONFIG_NAME}, found "
                          f"{sorted(p.name for p in folder.iterdir())[:10]}")


def _read_tokenwave(folder: Path, data: dict) -> Checkpoint:
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
    return _named(config, folder.name)


def _transformers_codebooks(bandwidths: tuple[float, ...], sample_rate: int,
                            ratios: list[int] | tuple[int, ...], codebook_size: int) -> int:
    """How transformers counts codebooks: from the largest bandwidth, floored."""
    frame_rate = math.ceil(sample_rate / math.prod(ratios))
    return int(1000 * bandwidths[-1] // (frame_rate * math.ceil(math.log2(codebook_size))))


def _transformers_config(config: EncodecConfig, dtype: torch.dtype) -> dict:
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


# -- writing --------------------------------------------------------------------------------
def _unfolded(state: StateDict, config: EncodecConfig) -> StateDict:
    """Folded weights back to ``weight_g``/``weight_v`` for formats that store weight norm.

    ``g = ||w||`` (over all dims but the first), ``v = w``; the refolded weight equals ``w`` to
    rounding, not bit for bit. Unfolded states pass through untouched.
    """
    if not _is_folded(state, config):
        return state
    out = {}
    for key, value in state.items():
        if key.endswith((".conv.conv.weight", ".convtr.convtr.weight")):
            stem = key[: -len("weight")]
            out[stem + "weight_g"] = torch.norm_except_dim(value, 2, 0).contiguous()
            out[stem + "weight_v"] = value
        else:
            out[key] = value
    return out


def _json_writer(data: dict) -> Callable[[Path], None]:
    return lambda path: path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _safetensors_writer(state: StateDict) -> Callable[[Path], None]:
    from safetensors.torch import save_file

    # transformers refuses safetensors files without the "format" metadata.
    return lambda path: save_file(state, str(path), metadata={"format": "pt"})


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give ``path``, and everything in it when it is a folder, the mode a plain ``mkdir`` or
    ``open`` would: 0o777 (folders) or 0o666 (files) less the umask. Temporary names from
    mkdtemp/mkstemp start private (0o700/0o600), and so do files safetensors writes."""
    mask = current_umask()
    for item in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def write_folder_atomically(path: Path, write: Callable[[Path], None], *,
                            overwrite: bool = False) -> Path:
    """Run ``write`` into a temporary folder beside ``path``, then rename it into place.

    A crash leaves either the old folder or the new one, never a half-written one; a
    non-empty existing folder is replaced only with ``overwrite``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} is a non-empty folder; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = tmp.with_suffix(".old")
    try:
        write(tmp)
        honour_umask(tmp)  # mkdtemp makes it 0700: the result must look like any folder
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old.exists():
                os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _write_folder(path: Path, files: dict[str, Callable[[Path], None]],
                  overwrite: bool) -> Path:
    def write(folder: Path) -> None:
        for name, write_file in files.items():
            write_file(folder / name)

    return write_folder_atomically(path, write, overwrite=overwrite)


def _write_file(path: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(name))
        honour_umask(Path(name))  # mkstemp makes it 0600
        os.replace(name, path)
    finally:
        if os.path.exists(name):
            os.remove(name)
    return path


__all__ = ["FORMATS", "Checkpoint", "CheckpointError", "detect_format", "honour_umask", "load_model",
           "read_checkpoint", "read_json_file", "read_safetensors_file", "remember_weights_id",
           "save_model", "state_weights_id", "transformers_key", "weights_id",
           "write_folder_atomically"]
