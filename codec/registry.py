"""Model names -> local files: the models directory, then the Hugging Face cache and hub.

The directory is ``models_dir`` when given, else ``$TOKENWAVE_MODELS``, else
``~/.cache/tokenwave``. A name such as ``encodec_24khz`` (also written ``facebook/encodec_24khz``,
``//pretrained/facebook/encodec_24khz`` as audiocraft does, or as the release file name
``encodec_24khz-d7cc33bc.th``) is looked up there, first match wins:

1. ``<dir>/<release file name>`` (the original release's ``.th`` files, checksum in the name);
2. ``<dir>/<name>`` (a folder in any format :mod:`codec.formats` reads, or a file);
3. ``<dir>/<name>.th``, ``<dir>/<name>.bin``, ``<dir>/<name>.safetensors``;
4. ``<dir>/facebook/<name>`` (a copy of a Hugging Face repository folder);
5. ``<repo>/assets/models/<name>``: model folders shipped with the repository.

A generator folder found this way (``tokenwave-small``, ``musicgen-small``) stands for its codec:
:mod:`codec.formats` loads the codec inside it.

Then the Hugging Face cache, and a download from the hub unless offline or ``allow_download=False``
(``facebook/encodec_32khz``, ``encodec_24khz`` -> ``facebook/encodec_24khz``): resolvers that
:mod:`inference.hub` registers (:func:`register_resolver`). The original release's ``.th`` files
are downloaded only with ``allow_download=True`` or ``TOKENWAVE_ALLOW_DOWNLOAD=1``: torch.hub
fetches them into the directory and checks the sha256 prefix in the file name.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

ENV_MODELS_DIR = "TOKENWAVE_MODELS"
ENV_ALLOW_DOWNLOAD = "TOKENWAVE_ALLOW_DOWNLOAD"
# Model folders shipped with the repository (the generator tokenwave-small and its codec).
SHIPPED_MODELS = Path(__file__).resolve().parents[1] / "assets" / "models"
RELEASE_URL = "https://dl.fbaipublicfiles.com/encodec/v0/"

# The original release's files; the suffix is the first 8 hex digits of the file's sha256.
RELEASE_FILES: dict[str, str] = {
    "encodec_24khz": "encodec_24khz-d7cc33bc.th",
    "encodec_48khz": "encodec_48khz-7e698e3e.th",
    "encodec_lm_24khz": "encodec_lm_24khz-1608e3c0.th",  # entropy-coding LMs for .ecdc
    "encodec_lm_48khz": "encodec_lm_48khz-7add9fc3.th",
}

# How to get each known model by hand (shown when it is missing).
HOW_TO_GET: dict[str, str] = {
    "encodec_24khz": f"download {RELEASE_URL}{RELEASE_FILES['encodec_24khz']} into the folder, "
                     "or allow the download (allow_download=True or TOKENWAVE_ALLOW_DOWNLOAD=1)",
    "encodec_48khz": f"download {RELEASE_URL}{RELEASE_FILES['encodec_48khz']} into the folder, "
                     "or allow the download (allow_download=True or TOKENWAVE_ALLOW_DOWNLOAD=1)",
    "encodec_lm_24khz": f"download {RELEASE_URL}{RELEASE_FILES['encodec_lm_24khz']} into the "
                        "folder, or allow the download",
    "encodec_lm_48khz": f"download {RELEASE_URL}{RELEASE_FILES['encodec_lm_48khz']} into the "
                        "folder, or allow the download",
    "encodec_32khz": "copy the Hugging Face repository facebook/encodec_32khz (config.json and "
                     "model.safetensors) into <folder>/encodec_32khz/",
    "encodec_16khz": "copy AudioGen's compression_state_dict.bin (Hugging Face repository "
                     "facebook/audiogen-medium) to "
                     "<folder>/encodec_16khz/compression_state_dict.bin",
}
MODEL_NAMES = ("encodec_24khz", "encodec_48khz", "encodec_32khz", "encodec_16khz")

_RELEASE_NAME = re.compile(r"^(?P<name>[A-Za-z0-9_]+)-(?P<sha>[0-9a-f]{8,64})\.th$")
_SUFFIXES = (".th", ".bin", ".safetensors")


class ModelNotFoundError(FileNotFoundError):
    """A model name that no file or folder in the models directory answers (codecs here,
    generators and T5 in :mod:`inference.registry`, which raises this same class)."""


def get_models_dir(directory: str | os.PathLike | None = None) -> Path:
    """The models directory: the argument, else ``$TOKENWAVE_MODELS``, else
    ``~/.cache/tokenwave``."""
    if directory is None:
        directory = os.environ.get(ENV_MODELS_DIR) or Path.home() / ".cache" / "tokenwave"
    return Path(directory).expanduser()


def canonical_codec_name(name: str) -> str:
    """``//pretrained/facebook/encodec_32khz``, ``facebook/encodec_32khz``,
    ``encodec_24khz-d7cc33bc.th`` -> ``encodec_32khz`` / ``encodec_24khz``; others unchanged."""
    name = name.strip()
    if name.startswith("//pretrained/"):
        name = name[len("//pretrained/"):]
    if name.startswith("facebook/"):
        name = name[len("facebook/"):]
    match = _RELEASE_NAME.match(name)
    if match and RELEASE_FILES.get(match["name"]) == name:
        return match["name"]
    return name


def release_checksum(file_name: str) -> str | None:
    """The sha256 prefix a torch-hub style name ``<stem>-<hex>.th`` carries, else None."""
    match = _RELEASE_NAME.match(file_name)
    return match["sha"] if match else None


def codec_candidates(name: str, directory: str | os.PathLike | None = None) -> list[Path]:
    """Every path that ``name`` may be stored at, in the order they are tried."""
    root = get_models_dir(directory)
    plain = canonical_codec_name(name)
    paths = []
    if plain in RELEASE_FILES:
        paths.append(root / RELEASE_FILES[plain])
    paths.append(root / plain)
    paths += [root / f"{plain}{suffix}" for suffix in _SUFFIXES]
    paths.append(root / "facebook" / plain)
    if plain and Path(plain).name == plain and plain not in (".", ".."):
        paths.append(SHIPPED_MODELS / plain)
    return paths


def shipped_names() -> list[str]:
    """Names of the model folders shipped in ``assets/models``."""
    if not SHIPPED_MODELS.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_MODELS.iterdir() if p.is_dir())


def _exists(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def download_allowed(allow_download: bool | None = None) -> bool:
    """``allow_download`` when given, else whether ``$TOKENWAVE_ALLOW_DOWNLOAD`` says yes."""
    if allow_download is not None:
        return allow_download
    return os.environ.get(ENV_ALLOW_DOWNLOAD, "").strip().lower() in ("1", "true", "yes")


def download_release_file(name: str, directory: str | os.PathLike | None = None) -> Path:
    """Fetch one of the original release's files into the models directory (sha256-checked)."""
    import torch.hub

    plain = canonical_codec_name(name)
    if plain not in RELEASE_FILES:
        raise ModelNotFoundError(f"only the original release's files can be downloaded "
                                 f"({sorted(RELEASE_FILES)}), not {name!r}")
    file_name = RELEASE_FILES[plain]
    target = get_models_dir(directory) / file_name
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(RELEASE_URL + file_name, str(target),
                                   hash_prefix=release_checksum(file_name), progress=True)
    return target


# Fallbacks for names no local file answers (the Hugging Face cache and hub): callables
# ``(name, local_files_only) -> Path | None`` (None: not a name they serve; FileNotFoundError:
# theirs but unavailable, the message says why). inference.hub registers one on import and
# through the entry point group below, so codec imports nothing above it.
RESOLVER_ENTRY_POINTS = "tokenwave.resolvers"
_RESOLVERS: list[Callable[[str, bool], Path | None]] = []
_ENTRY_POINTS_LOADED = False


def register_resolver(resolver: Callable[[str, bool], Path | None]) -> None:
    """Add a fallback tried, in order, after every local path (see ``_RESOLVERS``)."""
    if resolver not in _RESOLVERS:
        _RESOLVERS.append(resolver)


def _resolvers() -> list[Callable[[str, bool], Path | None]]:
    global _ENTRY_POINTS_LOADED
    if not _ENTRY_POINTS_LOADED:
        _ENTRY_POINTS_LOADED = True
        from importlib.metadata import entry_points

        for point in entry_points(group=RESOLVER_ENTRY_POINTS):
            try:
                register_resolver(point.load())
            except ImportError:  # its optional dependency (huggingface_hub) is not installed
                continue
    return _RESOLVERS


def _from_resolvers(name: str, *, local_files_only: bool) -> tuple[Path | None, str]:
    """(path, "") from the first resolver that has ``name``, else (None, why the last one had not)."""
    note = ""
    for resolver in _resolvers():
        try:
            found = resolver(name, local_files_only)
        except FileNotFoundError as error:
            note = f"\nHugging Face: {error}"
            continue
        if found is not None:
            return Path(found), ""
    return None, note


def find_codec(name: str, *, models_dir: str | os.PathLike | None = None,
               allow_download: bool | None = None) -> Path:
    """The local file or folder holding ``name``; see the module docstring for the search order.

    Raises :class:`ModelNotFoundError` naming every place looked at and how to get the model.
    """
    paths = codec_candidates(name, models_dir)
    for path in paths:
        if _exists(path):
            return path
    plain = canonical_codec_name(name)
    found, remote_note = _from_resolvers(name, local_files_only=True)  # a cache hit beats a download
    if found is not None:
        return found
    if plain in RELEASE_FILES and download_allowed(allow_download):
        return download_release_file(plain, models_dir)
    if allow_download is not False:
        found, remote_note = _from_resolvers(name, local_files_only=False)
        if found is not None:
            return found
    looked = "\n  ".join(str(p) for p in paths)
    if plain in HOW_TO_GET:
        hint = HOW_TO_GET[plain].replace("<folder>", str(get_models_dir(models_dir)))
    else:
        hint = (f"{name!r} is neither an existing path nor a known model name "
                f"({', '.join([*MODEL_NAMES, *shipped_names()])}); put the checkpoint at one of "
                f"these paths")
    raise ModelNotFoundError(f"model {name!r} not found; looked at:\n  {looked}\n"
                             f"To get it: {hint}. The models folder is set by models_dir= or "
                             f"${ENV_MODELS_DIR}.{remote_note}")
