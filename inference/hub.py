"""Hugging Face names -> folders in the Hugging Face cache, fetched with ``huggingface_hub``.

The registries (:mod:`inference.registry` for generators and T5, :mod:`codec.registry` for
codecs) look at paths, ``$TOKENWAVE_MODELS`` and the shipped models first; a name none of them
answers and that is a hub repository (``facebook/musicgen-small``, ``t5-base``,
``google/flan-t5-large``, ``facebook/encodec_32khz``) comes here (:func:`resolve`):

1. the Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
   ``~/.cache/huggingface/hub``; read when called, not when imported): the snapshot the revision
   names (``refs/<revision>`` or a commit hash; default ``main``); with no revision asked for and
   no hub to ask (offline or unreachable), any complete snapshot, newest first;
2. unless offline (``local_files_only=True``, ``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1`` or
   ``TOKENWAVE_OFFLINE=1``), a download with ``snapshot_download`` (the hub's progress bars) of
   only the files tokenwave reads (:func:`select_files`): ``config.json``, the weights
   (safetensors when the repository has them, else ``pytorch_model*.bin``), tokenizer and
   preprocessor files; or, for audiocraft-only repositories (``facebook/audiogen-medium``),
   ``state_dict.bin`` and ``compression_state_dict.bin``.

A snapshot counts only when it is complete (:func:`missing_files`): an interrupted download
leaves a folder that is never loaded half; the next download completes it. A revision is given
with ``revision=`` or as ``name@revision``.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from codec.files import read_json_file, read_pickle

ENV_OFFLINE = "TOKENWAVE_OFFLINE"
OFFLINE_VARIABLES = (ENV_OFFLINE, "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
DEFAULT_ENDPOINT = "https://huggingface.co"
CONFIG = "config.json"
AUDIOCRAFT_LM = "state_dict.bin"
AUDIOCRAFT_CODEC = "compression_state_dict.bin"
# Small files next to the weights that the loaders (or transformers' tokenizer) read.
METADATA_FILES = ("config.json", "generation_config.json", "preprocessor_config.json",
                  "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "spiece.model",
                  "added_tokens.json")
TOKENIZED_TYPES = ("musicgen", "musicgen_melody", "t5")  # configs whose folder needs a tokenizer
CODEC_NAMES = ("encodec_24khz", "encodec_48khz", "encodec_32khz")  # bare names with a facebook/ repo
_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_local_only: contextvars.ContextVar[bool] = contextvars.ContextVar("tokenwave_hub_local_only", default=False)


class HubError(FileNotFoundError):
    """A hub name that cannot be made available locally; the message says why and what to do."""


class NotCachedError(HubError):
    """Offline (or unreachable) and not in the Hugging Face cache."""


class GatedModelError(HubError):
    """The repository is gated: its conditions must be accepted and a token used."""


class MissingRepoError(HubError):
    """No such repository (or revision) on the hub, or a private one without access."""


class DownloadError(HubError):
    """A download that did not finish; what arrived is kept and the next one completes it."""


# -- settings read at call time ------------------------------------------------------------------
def cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub computes it, from the environment *now*."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache",
                                                     "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def endpoint() -> str:
    """``$HF_ENDPOINT`` (a mirror, or the test server) else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline_reason(local_files_only: bool = False) -> str | None:
    """Why nothing may be downloaded (``"HF_HUB_OFFLINE=1"``, ...), or None when downloads are on."""
    if local_files_only or _local_only.get():
        return "local_files_only=True"
    for variable in OFFLINE_VARIABLES:
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{variable}=1"
    return None


@contextlib.contextmanager
def local_files_only(enabled: bool = True) -> Iterator[None]:
    """Within the block, every hub lookup (the T5 and codec a checkpoint names too) is cache-only."""
    token = _local_only.set(_local_only.get() or enabled)
    try:
        yield
    finally:
        _local_only.reset(token)


# -- names -----------------------------------------------------------------------------------------
def split_revision(name: str, revision: str | None = None) -> tuple[str, str | None]:
    """``facebook/musicgen-small@v1`` -> ``("facebook/musicgen-small", "v1")``; ``revision=`` wins
    over none, and two different ones are an error."""
    name = name.strip().removeprefix("//pretrained/")
    if "@" in name:
        name, _, pinned = name.partition("@")
        if revision is not None and revision != pinned:
            raise ValueError(f"{name}: two revisions given ({pinned!r} in the name, "
                             f"{revision!r} as revision=)")
        revision = pinned or None
    return name, revision


def is_repo_id(name: str) -> bool:
    """Whether ``name`` can be a hub model repository (``org/name`` or a legacy ``name``)."""
    return bool(_REPO_ID.match(name)) and ".." not in name and "--" not in name and not name.endswith(".")


def codec_repo(name: str) -> str | None:
    """The hub repository a codec name means (``encodec_32khz`` -> ``facebook/encodec_32khz``), or None."""
    name, _ = split_revision(name)
    if "/" in name:
        return name if is_repo_id(name) else None
    return f"facebook/{name}" if name in CODEC_NAMES else None


def t5_repos(name: str) -> list[str]:
    """Cache spellings of a T5 name: transformers stores ``t5-base`` under that name, newer code
    under ``google-t5/t5-base`` (the hub redirects one to the other)."""
    name, _ = split_revision(name)
    if not is_repo_id(name):
        return []
    return [name, f"google-t5/{name}"] if "/" not in name and name.startswith("t5-") else [name]


# -- what a folder needs -----------------------------------------------------------------------------
def _read_config(folder: Path) -> dict:
    try:
        return read_json_file(folder / CONFIG)
    except (OSError, ValueError):  # missing, unreadable or not a JSON object: nothing known
        return {}


def _missing_weights(folder: Path) -> list[str]:
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return []
        index = folder / f"{single}.index.json"
        if index.is_file():
            try:
                shards = set(read_json_file(index, "a weights index")["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return [index.name + " (unreadable)"]
            return sorted(s for s in shards if not (folder / s).is_file())
    return ["model.safetensors"]


def missing_files(folder: str | os.PathLike) -> list[str]:
    """What ``folder`` lacks to be loaded: the weights (every shard), the tokenizer of a MusicGen or
    T5 folder; ``compression_state_dict.bin`` next to ``state_dict.bin``. Empty when complete.
    Files are checked through the snapshot's links, so a link to a missing blob counts as missing."""
    folder = Path(folder)
    if (folder / CONFIG).is_file():
        missing = _missing_weights(folder)
        needs_tokenizer = _read_config(folder).get("model_type") in TOKENIZED_TYPES
        if needs_tokenizer and not any((folder / f).is_file() for f in ("spiece.model", "tokenizer.json")):
            missing.append("spiece.model")
        return missing
    if (folder / AUDIOCRAFT_LM).is_file():
        return [] if (folder / AUDIOCRAFT_CODEC).is_file() else [AUDIOCRAFT_CODEC]
    return [f"{CONFIG} (or {AUDIOCRAFT_LM})"]


def usable_path(folder: Path) -> Path | None:
    """The path to load from a snapshot: the folder when complete; its ``state_dict.bin`` when only
    the audiocraft files are complete next to an incomplete transformers set; else None."""
    if not missing_files(folder):
        return folder
    if (folder / AUDIOCRAFT_LM).is_file() and (folder / AUDIOCRAFT_CODEC).is_file():
        return folder / AUDIOCRAFT_LM
    return None


def select_files(files: list[str], repo_id: str) -> list[str]:
    """The files of a repository listing that tokenwave reads; see the module docstring."""
    top = [f for f in files if "/" not in f]
    if CONFIG in top:
        safetensors = [f for f in top if f.endswith(".safetensors") or f == "model.safetensors.index.json"]
        pickles = [f for f in top if re.fullmatch(r"pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?", f)]
        return [f for f in METADATA_FILES if f in top] + (safetensors or pickles)
    if AUDIOCRAFT_LM in top:
        return [f for f in (AUDIOCRAFT_LM, AUDIOCRAFT_CODEC) if f in top]
    raise MissingRepoError(f"{repo_id}: the repository has neither {CONFIG} nor {AUDIOCRAFT_LM} (found "
                           f"{sorted(top)[:8]}): not a model tokenwave reads")


# -- the cache -----------------------------------------------------------------------------------
def _repo_cache(repo_id: str, cache: Path) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache / repo_folder_name(repo_id=repo_id, repo_type="model")


def _snapshots(repo_id: str, cache: Path) -> list[Path]:
    root = _repo_cache(repo_id, cache) / "snapshots"
    folders = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    return sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True)


def find_cached(repo_id: str, revision: str | None = None, *, cache: Path | None = None,
                any_snapshot: bool = True) -> Path | None:
    """The usable path of ``repo_id`` at ``revision`` (default ``main``) in the Hugging Face cache,
    or None; with no revision and ``any_snapshot``, else the newest complete snapshot."""
    from huggingface_hub import try_to_load_from_cache

    cache = cache or cache_dir()
    for anchor in (CONFIG, AUDIOCRAFT_LM):  # the file every snapshot of each layout has
        hit = try_to_load_from_cache(repo_id, anchor, cache_dir=str(cache), revision=revision or "main")
        if isinstance(hit, str) and (path := usable_path(Path(hit).parent)) is not None:
            return path
    if revision is None and any_snapshot:  # fetched at a pinned revision, or a main that moved since
        for folder in _snapshots(repo_id, cache):
            if (path := usable_path(folder)) is not None:
                return path
    return None


def _incomplete_note(repo_id: str, cache: Path) -> str:
    partial = [(f, missing_files(f)) for f in _snapshots(repo_id, cache)]
    partial = [(f, m) for f, m in partial if m]
    if not partial:
        return ""
    folder, missing = partial[0]
    return f" (an incomplete download is there, {folder.name[:8]}, missing {', '.join(missing[:3])})"


# -- downloading -----------------------------------------------------------------------------------
def _hub_errors():
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    return GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError


def download(repo_id: str, revision: str | None = None, *, cache: Path | None = None) -> Path:
    """Fetch the files tokenwave reads from ``repo_id`` into the cache; returns the usable path.

    Files already in the cache are not fetched again, so calling this after an interrupted
    download completes it.
    """
    from huggingface_hub import HfApi, snapshot_download

    gated, not_found, no_revision = _hub_errors()
    cache = cache or cache_dir()
    url = endpoint()
    where = f"{repo_id}" + (f" at revision {revision!r}" if revision else "")
    fetch = f"tokenwave download {repo_id}" + ("" if revision is None else f" --revision {revision}")
    info = None
    try:
        info = HfApi(endpoint=url).model_info(repo_id, revision=revision)
        files = select_files([s.rfilename for s in info.siblings or []], repo_id)
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache), endpoint=url,
                                        allow_patterns=files))
    except gated:
        raise GatedModelError(f"{repo_id} is a gated repository: accept its conditions at {url}/{repo_id} "
                              f"and log in (hf auth login, or set HF_TOKEN)") from None
    except no_revision:
        raise MissingRepoError(f"{repo_id} has no revision {revision!r} on {url}") from None
    except not_found:
        raise MissingRepoError(f"no repository {repo_id} on {url} (or it is private: log in with hf auth "
                               f"login, or set HF_TOKEN)") from None
    except HubError:
        raise
    except Exception as error:  # network, disk, server: one message, the cause kept
        detail = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        if info is None:  # nothing fetched: the hub could not be reached
            note = _incomplete_note(repo_id, cache)
            raise NotCachedError(f"{where} is not in the Hugging Face cache ({cache}){note} and {url} "
                                 f"cannot be reached ({detail}): run `{fetch}` when online") from error
        raise DownloadError(f"downloading {where} from {url} failed ({detail}); the files that arrived are "
                            f"kept in {cache}: run `{fetch}` again to complete it") from error
    path = usable_path(folder)
    if path is None:
        raise DownloadError(f"downloading {where} left {folder} without {', '.join(missing_files(folder))}; "
                            f"run `{fetch}` again to complete it")
    return path


def resolve(name: str, *, revision: str | None = None, local_files_only: bool = False) -> Path:
    """The local path of hub repository ``name``: cached, else downloaded unless offline.

    Raises :class:`NotCachedError` (offline or unreachable, with the command that fetches it),
    :class:`GatedModelError`, :class:`MissingRepoError` or :class:`DownloadError`.
    """
    repo_id, revision = split_revision(name, revision)
    if not is_repo_id(repo_id):
        raise MissingRepoError(f"{name!r} is not a Hugging Face repository name (org/name)")
    cache = cache_dir()
    hit = find_cached(repo_id, revision, cache=cache, any_snapshot=False)
    if hit is not None:
        return hit
    fetch = f"tokenwave download {repo_id}" + ("" if revision is None else f" --revision {revision}")
    reason = offline_reason(local_files_only)
    if reason is None:
        try:
            return download(repo_id, revision, cache=cache)
        except NotCachedError:  # the hub cannot be reached: any snapshot is better than none
            if (hit := find_cached(repo_id, revision, cache=cache)) is None:
                raise
            return hit
    if (hit := find_cached(repo_id, revision, cache=cache)) is not None:
        return hit
    raise NotCachedError(f"{repo_id}{'' if revision is None else '@' + revision} is not in the Hugging Face "
                         f"cache ({cache}){_incomplete_note(repo_id, cache)} and downloads are off "
                         f"({reason}): run `{fetch}` while online (the same cache; HF_HOME or HF_HUB_CACHE "
                         f"moves it)")


def resolve_codec(name: str, local_files_only: bool = False) -> Path | None:
    """:mod:`codec.registry`'s hook: the cached or downloaded folder of a codec hub name, else None."""
    repo = codec_repo(name)
    if repo is None:
        return None
    _, revision = split_revision(name)
    return resolve(repo, revision=revision, local_files_only=local_files_only)


def dependencies(path: str | os.PathLike) -> list[str]:
    """Hub names an audiocraft checkpoint only names: its T5 (``conditioners.*.t5.name``) and the
    codec its ``compression_state_dict.bin`` points at. Empty for self-contained folders."""
    import yaml

    path = Path(path)
    folder = path.parent if path.is_file() else path
    audiocraft = path.name == AUDIOCRAFT_LM or not (folder / CONFIG).is_file()
    if not (audiocraft and (folder / AUDIOCRAFT_LM).is_file()):
        return []
    names: list[str] = []
    package = read_pickle(folder / AUDIOCRAFT_LM, mmap=True)
    cfg = yaml.safe_load(package.get("xp.cfg") or "") if isinstance(package, dict) else None
    for spec in ((cfg if isinstance(cfg, dict) else {}).get("conditioners") or {}).values():
        t5 = spec.get("t5") if isinstance(spec, dict) and spec.get("model") == "t5" else None
        if isinstance(t5, dict) and isinstance(t5.get("name"), str):
            names.append(t5["name"])
    if (folder / AUDIOCRAFT_CODEC).is_file():
        pointer = read_pickle(folder / AUDIOCRAFT_CODEC, mmap=True)
        if isinstance(pointer, dict) and isinstance(pointer.get("pretrained"), str):
            names.append(pointer["pretrained"].removeprefix("//pretrained/"))
    return names


# -- listing -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CachedModel:
    """One snapshot in the Hugging Face cache that tokenwave can load."""

    repo_id: str
    commit: str
    refs: tuple[str, ...]
    kind: str
    size: int
    path: Path


def kind_of(folder: Path) -> str | None:
    """``"generator (transformers)"``, ``"generator (audiocraft)"``, ``"codec"``, ``"t5"``, or None."""
    if (folder / CONFIG).is_file():
        model_type = _read_config(folder).get("model_type")
        kinds = {"musicgen": "generator (transformers)", "musicgen_melody": "generator (transformers)",
                 "encodec": "codec", "t5": "t5"}
        if model_type in kinds:
            return kinds[model_type]
    if (folder / AUDIOCRAFT_LM).is_file():
        return "generator (audiocraft)"
    return None


def list_cached(cache: Path | None = None) -> list[CachedModel]:
    """Complete snapshots of the models tokenwave reads, from ``huggingface_hub.scan_cache_dir``."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache = cache or cache_dir()
    try:
        info = scan_cache_dir(str(cache))
    except CacheNotFound:
        return []
    found = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            folder = Path(rev.snapshot_path)
            kind = kind_of(folder)
            if kind is not None and usable_path(folder) is not None:
                found.append(CachedModel(repo.repo_id, rev.commit_hash, tuple(sorted(rev.refs)), kind,
                                         rev.size_on_disk, folder))
    return found


def _register_codec_resolver() -> None:
    from codec import registry as codec_registry

    codec_registry.register_resolver(resolve_codec)


_register_codec_resolver()

__all__ = ["CachedModel", "DownloadError", "ENV_OFFLINE", "GatedModelError", "HubError", "MissingRepoError",
           "NotCachedError", "cache_dir", "codec_repo", "dependencies", "download", "endpoint", "find_cached",
           "is_repo_id", "kind_of", "list_cached", "local_files_only", "missing_files", "offline_reason",
           "resolve", "resolve_codec", "select_files", "split_revision", "t5_repos", "usable_path"]
