"""Codecs by name: loading, untrained stand-ins, and the entropy-coding LM lookup.

:func:`load_codec` turns a name, a checkpoint path or ``random:<preset>`` into a codec ready for
inference, for the command line, the demo and training alike. :func:`random_model` builds an
untrained stand-in with seeded random weights, named ``random_<preset>`` so that an .ecdc file
it wrote names a model :func:`load_codec` rebuilds.

The ``.ecdc`` prior of a codec named ``NAME`` is the file ``<lm name>.th``
(:func:`codec.ecdc.lm_name`: ``encodec_24khz`` -> ``encodec_lm_24khz``, others ``NAME_lm``),
looked for in this order (:func:`entropy_lm_folders`):

1. beside the codec given as a path or name: the folder itself, the folder it is in (where
   ``tokenwave train-codec --out RUN --train-entropy-lm`` writes ``RUN/<lm name>.th``, next to
   the codec ``RUN/<name>``), and a generator folder's ``codec/``;
2. the models folder (:mod:`codec.registry`), where the released ``encodec_lm_24khz`` and
   ``encodec_lm_48khz`` live (downloaded only when allowed).

Untrained stand-ins (models named ``random_<...>``) get a prior with fixed-seed random weights:
any prior decodes what it coded, an untrained one just compresses little. A missing LM raises
:class:`EntropyLMNotFoundError`, whose message names the file, the folders looked in and the
command that makes one.
"""
from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import torch

from . import registry
from .config import PRESETS, EncodecConfig
from .entropy_lm import EntropyLM
from .formats import load_model, remember_weights_id, state_weights_id
from .model import EncodecModel

RANDOM_NAME_PREFIX = "random_"  # names of untrained stand-ins: random_encodec_24khz
RANDOM_SPEC_PREFIX = "random:"  # how a user asks for one: random:encodec_24khz
RANDOM_SEED = 0
GENERATOR_CODEC_DIR = "codec"


class EntropyLMNotFoundError(FileNotFoundError):
    """No entropy-coding LM for a codec; the message says where it looked and how to make one."""


def is_random(model) -> bool:
    """An untrained stand-in with seeded random weights (its name starts with ``random_``)."""
    return model.name.startswith(RANDOM_NAME_PREFIX)


def random_model(preset: str | EncodecConfig, seed: int = RANDOM_SEED) -> EncodecModel:
    """An untrained model with reproducible random weights, for runs with no download.

    A preset name gives the model name ``random_<preset>``; a config keeps its own name. Each
    codebook is drawn from a Gaussian fitted to what the previous stages leave of the encoder's
    output on a fixed noise probe, so every stage spreads its codes over the codebook (an
    untrained quantizer's all-zero codebooks would give code 0 everywhere).

    Raises:
        ValueError: ``preset`` is not a name in :data:`codec.model.PRESETS`.
    """
    if isinstance(preset, EncodecConfig):
        config = preset
    elif preset in PRESETS:
        config = replace(PRESETS[preset], name=f"{RANDOM_NAME_PREFIX}{preset}")
    else:
        raise ValueError(f"unknown preset {preset!r} for a random model; expected one of "
                         f"{', '.join(sorted(PRESETS))}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EncodecModel(config).prepare_for_inference()
        probe = 0.1 * torch.randn(1, config.channels, 2 * config.sample_rate)
        with torch.no_grad():
            residual = model.encoder(probe / probe.pow(2).mean().sqrt() if config.normalize
                                     else probe)[0].T  # (F, D)
            for layer in model.quantizer.vq.layers:
                residual = _seed_codebook(layer._codebook, residual)
    remember_weights_id(model, state_weights_id(model.state_dict()))  # .ecdc files record it
    return model


def _seed_codebook(book, residual: torch.Tensor) -> torch.Tensor:
    """Fill ``book`` from the residual ``(F, D)`` it is to quantize; returns what it leaves.

    Entries of scale sqrt(2 ln M / D) * std: the nearest of M random vectors then removes a fixed
    share of the residual, so more codebooks do better."""
    size, dim = book.codebook_size, residual.shape[1]
    spread = residual.std(0) * math.sqrt(2 * math.log(size) / dim)
    book.embed.copy_(residual.mean(0) + spread * torch.randn(size, dim))
    book.embed_avg.copy_(book.embed)
    book.inited.fill_(1.0)
    return residual - book.decode(book.quantize(residual))


def random_preset(spec: str) -> str | None:
    """The preset of ``random:<preset>`` (any text after the prefix, checked by
    :func:`random_model`) or of a model name ``random_<preset>``; None for other specs."""
    if spec.startswith(RANDOM_SPEC_PREFIX):
        return spec[len(RANDOM_SPEC_PREFIX):]
    if spec.startswith(RANDOM_NAME_PREFIX) and spec[len(RANDOM_NAME_PREFIX):] in PRESETS:
        return spec[len(RANDOM_NAME_PREFIX):]
    return None


def load_codec(spec: str, device: str | torch.device | None = None) -> EncodecModel:
    """A ready-for-inference codec from a name, a checkpoint path or ``random:<preset>``.

    A generator (name or folder) gives its codec; names are looked up as
    :func:`codec.registry.find_codec` does (the models folder, then the shipped ``assets/models``).

    Raises:
        FileNotFoundError: nothing by that name; for a preset name with no file, the message says
            how to run without a download.
        ValueError: ``random:<preset>`` with an unknown preset.
    """
    preset = random_preset(spec)
    if preset is not None:
        return random_model(preset).to(device)
    try:
        return load_model(spec, device=device, inference=True)
    except FileNotFoundError as error:
        if spec not in PRESETS:
            raise
        raise FileNotFoundError(f"{' '.join(str(error).split())} (to run with no download use "
                                f"tokenwave-small, the shipped codec, or {RANDOM_SPEC_PREFIX}{spec}: "
                                f"untrained)") from error


def model_label(model) -> str:
    """The codec's name for messages; an untrained stand-in says so."""
    if is_random(model):
        return f"{model.name} (UNTRAINED random weights, seed {RANDOM_SEED})"
    return model.name


def random_entropy_lm(model, seed: int = RANDOM_SEED) -> EntropyLM:
    """The entropy-coding LM of a random model: the released shape, fixed-seed random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = EntropyLM.for_codec(num_codebooks=model.num_codebooks, card=model.codebook_size,
                                 frame_rate=model.frame_rate)
    return lm.eval()


def entropy_lm_folders(spec: str | os.PathLike | None,
                       models_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders beside the codec ``spec`` (a path, or a name the registry resolves) where its
    LM may be, in the order they are tried; the models folder is not among them."""
    if not spec or str(spec).startswith("random:"):
        return []
    path = Path(spec).expanduser()
    if not path.exists():
        try:
            path = registry.find_codec(os.fspath(spec), models_dir=models_dir, allow_download=False)
        except FileNotFoundError:
            return []
    path = path.resolve()
    folders = [path, path.parent] if path.is_dir() else [path.parent]
    if (path / GENERATOR_CODEC_DIR).is_dir():
        folders.append(path / GENERATOR_CODEC_DIR)
    return list(dict.fromkeys(folders))


def _lm_file(model, folder: Path) -> Path | None:
    from .ecdc import lm_name

    try:
        return registry.find_codec(lm_name(model.name), models_dir=folder, allow_download=False)
    except FileNotFoundError:
        return None


def find_entropy_lm(model, spec: str | os.PathLike | None = None, *,
                    models_dir: str | os.PathLike | None = None) -> Path | None:
    """The file holding ``model``'s LM (nothing is downloaded), or None; see the module docstring."""
    for folder in [*entropy_lm_folders(spec, models_dir), registry.get_models_dir(models_dir)]:
        found = _lm_file(model, folder)
        if found is not None:
            return found
    return None


def has_entropy_lm(model, spec: str | os.PathLike | None = None, *,
                   models_dir: str | os.PathLike | None = None) -> bool:
    """Whether :func:`entropy_lm_for` would find an LM (a random model always has one)."""
    from .ecdc import lm_name

    if is_random(model):
        return True
    if find_entropy_lm(model, spec, models_dir=models_dir) is not None:
        return True
    return lm_name(model.name) in registry.RELEASE_FILES and registry.download_allowed(None)


def entropy_lm_for(model, spec: str | os.PathLike | None = None, *,
                   models_dir: str | os.PathLike | None = None) -> EntropyLM:
    """The entropy-coding LM of ``model`` (loaded from ``spec``, a path or name, when given).

    Raises:
        EntropyLMNotFoundError: none found; the message names the command that trains one.
        codec.ecdc.EcdcError: a file was found but is not an LM for this codec.
    """
    from . import ecdc

    if is_random(model):
        return random_entropy_lm(model)
    folders = entropy_lm_folders(spec, models_dir)
    for folder in folders:
        if _lm_file(model, folder) is not None:
            return ecdc.load_entropy_lm(model, models_dir=folder)
    try:  # the models folder; the released LMs download there when allowed
        return ecdc.load_entropy_lm(model, models_dir=models_dir)
    except FileNotFoundError:
        pass
    raise EntropyLMNotFoundError(missing_lm_message(model, spec, folders, models_dir)) from None


def missing_lm_message(model, spec: str | os.PathLike | None, folders: list[Path],
                       models_dir: str | os.PathLike | None = None) -> str:
    """What is missing, where it was looked for, and how to make or get it."""
    from .ecdc import lm_name

    name = lm_name(model.name)
    root = registry.get_models_dir(models_dir)
    looked = ", ".join(str(f) for f in [*folders, root])
    text = (f"codec {model.name!r} has no entropy-coding LM: no {name}.th in {looked}. ")
    if name in registry.HOW_TO_GET:
        return text + f"To get it: {registry.HOW_TO_GET[name].replace('<folder>', str(root))}."
    source = os.fspath(spec) if spec else model.name
    return text + (f"Train one with `tokenwave train-codec AUDIO_FOLDER --train-entropy-lm --from {source} "
                   f"--out RUN`, then copy RUN/{name}.th into {root} (or beside the codec folder); "
                   f"or leave out entropy coding.")


__all__ = ["EntropyLMNotFoundError", "RANDOM_NAME_PREFIX", "RANDOM_SEED", "RANDOM_SPEC_PREFIX",
           "entropy_lm_folders", "entropy_lm_for", "find_entropy_lm", "has_entropy_lm", "is_random",
           "load_codec", "missing_lm_message", "model_label", "random_entropy_lm", "random_model",
           "random_preset"]
