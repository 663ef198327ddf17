"""Generator and T5 names -> local folders: the models folder, shipped models, the Hugging Face hub.

The models folder is ``models_dir`` when given, else ``$TOKENWAVE_MODELS``, else
``~/.cache/tokenwave`` (the same folder :mod:`codec.registry` uses for codecs). A name is
written as Hugging Face and audiocraft write it (``facebook/musicgen-small``,
``//pretrained/facebook/musicgen-small``, ``musicgen-small``; ``_`` and ``-`` are
interchangeable) and looked up there, first match wins:

1. ``<dir>/<name>`` and ``<dir>/facebook/<name>`` (also with ``-`` and ``_`` swapped);
2. ``<repo>/assets/models/<name>``: model folders shipped with the repository;
3. a hub repository (``facebook/musicgen-small``; a known short name such as ``musicgen-small``
   means its ``facebook/`` repository) in the Hugging Face cache, else downloaded unless offline
   (:mod:`inference.hub`). A revision (``revision=`` or ``name@revision``) skips 1 and 2.

A folder may hold any format :mod:`inference.formats` reads: tokenwave's, transformers'
(``config.json`` + ``model.safetensors``) or audiocraft's (``state_dict.bin`` +
``compression_state_dict.bin``). T5 text encoders are found the same way
(:func:`find_t5`), under their hub names (``t5-base``, ``google-t5/t5-base``,
``google/flan-t5-large``), then in the Hugging Face cache and hub.
"""
from __future__ import annotations

import os
from pathlib import Path

from codec.registry import ENV_MODELS_DIR, SHIPPED_MODELS, ModelNotFoundError, get_models_dir

from . import hub

# Public checkpoints tokenwave knows, and the hub repository to copy each one from.
KNOWN_MODELS: dict[str, str] = {
    "musicgen-small": "facebook/musicgen-small",
    "musicgen-medium": "facebook/musicgen-medium",
    "musicgen-large": "facebook/musicgen-large",
    "musicgen-melody": "facebook/musicgen-melody",
    "musicgen-melody-large": "facebook/musicgen-melody-large",
    "musicgen-stereo-small": "facebook/musicgen-stereo-small",
    "musicgen-stereo-medium": "facebook/musicgen-stereo-medium",
    "musicgen-stereo-large": "facebook/musicgen-stereo-large",
    "musicgen-stereo-melody": "facebook/musicgen-stereo-melody",
    "musicgen-stereo-melody-large": "facebook/musicgen-stereo-melody-large",
    "audiogen-medium": "facebook/audiogen-medium",
}
# The model the repository ships (assets/models/tokenwave-small; recipes/tokenwave_small.sh).
DEFAULT_MODEL = "tokenwave-small"
_T5_ORGS = ("", "google-t5", "google", "t5")


def canonical_generator_name(name: str) -> str:
    """``//pretrained/facebook/musicgen-small``, ``facebook/musicgen_small`` -> ``musicgen-small``."""
    name = name.strip()
    for prefix in ("//pretrained/", "facebook/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace("_", "-") if name.replace("_", "-") in KNOWN_MODELS else name


def _spellings(name: str) -> list[str]:
    out = [name]
    for variant in (name.replace("_", "-"), name.replace("-", "_")):
        if variant not in out:
            out.append(variant)
    return out


def generator_candidates(name: str, models_dir: str | os.PathLike | None = None) -> list[Path]:
    """Every folder ``name`` may be stored at, in the order they are tried."""
    root = get_models_dir(models_dir)
    plain = canonical_generator_name(name)
    paths: list[Path] = []
    for spelling in _spellings(plain):
        paths += [root / spelling, root / "facebook" / spelling]
    paths += [SHIPPED_MODELS / spelling for spelling in _spellings(plain)]
    return paths


def _is_model_folder(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def hub_repo(name: str) -> str | None:
    """The hub repository generator ``name`` means (``musicgen-small`` -> ``facebook/musicgen-small``;
    ``org/name`` as is), or None for a name that cannot be one."""
    repo, _ = hub.split_revision(name)
    if canonical_generator_name(repo) in KNOWN_MODELS and (repo.startswith("facebook/") or "/" not in repo):
        return KNOWN_MODELS[canonical_generator_name(repo)]
    return repo if "/" in repo and hub.is_repo_id(repo) else None


def find_generator(name: str, *, models_dir: str | os.PathLike | None = None,
                   revision: str | None = None, local_files_only: bool = False) -> Path:
    """The local folder (or audiocraft ``state_dict.bin``) holding generator ``name``; raises
    :class:`ModelNotFoundError` naming every place looked at and how to get the model, or the
    hub's reason (:class:`inference.hub.HubError`: gated, no such repository, download failed)."""
    plain_name, revision = hub.split_revision(name, revision)
    paths = [] if revision is not None else generator_candidates(plain_name, models_dir)
    for path in paths:
        if _is_model_folder(path):
            return path
    repo, hub_note = hub_repo(plain_name), ""
    if repo is not None:
        try:
            return hub.resolve(repo, revision=revision, local_files_only=local_files_only)
        except hub.NotCachedError as error:
            hub_note = f"\nHugging Face: {error}"
    plain = canonical_generator_name(plain_name)
    looked = "\n  ".join(str(p) for p in paths)
    root = get_models_dir(models_dir)
    if repo is not None:
        hint = (f"run `tokenwave download {repo}` while online, or copy the Hugging Face repository {repo} "
                f"(transformers or audiocraft files) into {root / plain}")
    else:
        hint = (f"{name!r} is neither an existing path nor a known model name "
                f"({', '.join(KNOWN_MODELS)}); put a model folder at one of these paths")
    raise ModelNotFoundError(f"model {name!r} not found; looked at:\n  {looked}\nTo get it: {hint}. "
                             f"The models folder is set by models_dir= or ${ENV_MODELS_DIR}.{hub_note}")


def is_t5_folder(path: Path) -> bool:
    """A transformers T5 folder: ``config.json`` and a tokenizer (``spiece.model`` or ``tokenizer.json``)."""
    return path.is_dir() and (path / "config.json").is_file() and (
        (path / "spiece.model").is_file() or (path / "tokenizer.json").is_file())


def t5_candidates(name: str, *, near: str | os.PathLike | None = None,
                  models_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders a T5 named ``name`` (``t5-base``, ``google/flan-t5-large``) may be in, in order:
    ``near`` itself, ``near/<name>``, ``near/t5``, then ``<models dir>/<org>/<name>``."""
    base = name.strip().rsplit("/", 1)[-1]
    paths: list[Path] = []
    if near is not None:
        near = Path(near)
        paths += [near, near / base, near / "t5"]
    root = get_models_dir(models_dir)
    if "/" in name:
        paths.append(root / name.strip())
    paths += [root / org / base if org else root / base for org in _T5_ORGS]
    unique: list[Path] = []
    for path in paths:
        if path not in unique:
            unique.append(path)
    return unique


def find_t5(name: str, *, near: str | os.PathLike | None = None, t5_path: str | os.PathLike | None = None,
            models_dir: str | os.PathLike | None = None) -> Path:
    """The local T5 folder for ``name``: ``t5_path`` when given, else the first of :func:`t5_candidates`.

    audiocraft checkpoints only name their T5 (``conditioners.description.t5.name``); its
    weights and ``spiece.model`` must be on disk.
    """
    if t5_path is not None:
        path = Path(t5_path)
        if not is_t5_folder(path):
            raise FileNotFoundError(f"t5_path {path}: expected a transformers T5 folder (config.json and "
                                    f"spiece.model or tokenizer.json)")
        return path
    paths = t5_candidates(name, near=near, models_dir=models_dir)
    for path in paths:
        if is_t5_folder(path):
            return path
    hub_note = ""
    repos = hub.t5_repos(name)
    for repo in repos:  # every cache spelling before any download
        if (hit := hub.find_cached(repo)) is not None and is_t5_folder(hit):
            return hit
    if repos:
        try:
            return hub.resolve(repos[0])
        except hub.NotCachedError as error:
            hub_note = f"\nHugging Face: {error}"
    looked = "\n  ".join(str(p) for p in paths)
    raise ModelNotFoundError(
        f"T5 text encoder {name!r} not found; looked at:\n  {looked}\nThe checkpoint names its T5 but "
        f"does not contain it: run `tokenwave download {name}`, copy the Hugging Face repository of "
        f"{name!r} (config.json, model.safetensors, spiece.model) to one of these folders, or pass "
        f"t5_path=.{hub_note}")


__all__ = ["DEFAULT_MODEL", "KNOWN_MODELS", "ModelNotFoundError", "SHIPPED_MODELS",
           "canonical_generator_name", "find_generator", "find_t5", "generator_candidates", "hub_repo",
           "is_t5_folder", "t5_candidates"]
