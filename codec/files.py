"""Safe reads and atomic writes: the one place that touches checkpoint and state files.

Reading: :func:`read_json_file`, :func:`read_safetensors_file` and :func:`read_pickle`
(``torch.load(weights_only=True)``: tensors and plain containers, never code) raise
:class:`CheckpointError` naming the file, what was expected and what was found, or
``FileNotFoundError`` for a missing one. :func:`verify_sha256_prefix` checks a release file
against the sha256 prefix in its name.

Writing: :func:`atomic_path` (a context manager) and :func:`atomic_write` (a callback) write
a temporary file or folder beside the target and rename it into place, so a crash leaves the
old result or the new one, never half of one; the result gets the mode a plain
``open``/``mkdir`` would give it under the process's umask (:func:`honour_umask`).
:func:`write_json_file` writes a JSON state file that way and fsyncs it; :func:`fsync_path`
makes a folder's files durable.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

PathLike = str | os.PathLike
StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A file that cannot be read as what it should be: names the file, what was expected and
    what was found."""


# -- reading --------------------------------------------------------------------------------
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


def read_safetensors_file(path: PathLike, prefix: str = "", *,
                          keys_only: bool = False) -> StateDict | list[str]:
    """The tensors of a safetensors file whose names start with ``prefix`` (the prefix dropped),
    or with ``keys_only`` just their names (reads the header only; a truncated file is caught
    there too, as the header gives the data's size). A missing, truncated or foreign file
    raises :class:`CheckpointError` naming it (or FileNotFoundError)."""
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


def read_pickle(path: PathLike, *, mmap: bool = False) -> Any:
    """A torch checkpoint read with ``weights_only=True`` onto the CPU; a file that is not one,
    or that holds objects a weights-only load refuses, raises :class:`CheckpointError`.

    With ``mmap`` the tensors stay memory-mapped (multi-GB generator weights are not copied into
    RAM) when the file allows it; the legacy non-zip format cannot be mapped and is read whole."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        if mmap:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):  # torch's refusal to map names mmap; others are errors
                    raise
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for bad files; all mean "unreadable"
        raise CheckpointError(_unreadable_pickle(path, error)) from None


def _unreadable_pickle(path: Path, error: Exception) -> str:
    with open(path, "rb") as file:
        head = file.read(4)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        return (f"{path}: expected a torch checkpoint, found a file that is neither a zip "
                f"archive nor a pickle (it starts with {head!r})")
    kind = "a zip archive" if head.startswith(b"PK") else "a pickle"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # torch's first line advises weights_only=False; the line naming the global says more.
    reason = next((line for line in lines if "GLOBAL" in line or "global" in line),
                  lines[0] if lines else type(error).__name__)
    if "Weights only load failed" in str(error):
        reason = "it holds Python objects or code that a weights-only load refuses: " + reason
    return (f"{path}: expected a torch checkpoint of tensors, found {kind} that cannot be "
            f"loaded ({reason})")


def verify_sha256_prefix(path: PathLike, expected: str) -> None:
    """Check that the file's sha256 starts with ``expected`` (the hex in a ``<stem>-<hex>.th``
    release name); a mismatch raises :class:`CheckpointError`."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    found = digest.hexdigest()[: len(expected)]
    if found != expected:
        raise CheckpointError(f"{path}: checksum mismatch: the name says sha256 {expected}..., "
                              f"the file's sha256 is {found}...; the file is corrupt or "
                              f"incomplete (a name ending in -<hex>.th carries a sha256 prefix)")


# -- writing --------------------------------------------------------------------------------
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
    for item in [path, *(Path(path).rglob("*") if Path(path).is_dir() else ())]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


class AtomicPath:
    """A temporary file (or, with ``folder``, an empty folder) beside ``path``, renamed to
    ``path`` by :meth:`commit`; :meth:`discard` removes it and leaves ``path`` as it was.

    As a context manager it yields the temporary path and commits when the block succeeds,
    discards on any error. An ``OSError`` that names the hidden temporary file is raised
    naming ``path`` instead (``cannot write '<path>': <reason>``).
    """

    def __init__(self, path: PathLike, *, folder: bool = False, overwrite: bool = False) -> None:
        self.path = Path(path)
        _check_target(self.path, folder, overwrite)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{self.path.name}."
        if folder:
            self.tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=self.path.parent))
        else:
            handle, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=self.path.parent)
            os.close(handle)
            self.tmp = Path(name)

    def commit(self) -> Path:
        """Give the result the umask's mode and rename it into place (see :func:`_replace`)."""
        try:
            honour_umask(self.tmp)
            _replace(self.tmp, self.path)
        except OSError as error:
            self.discard()
            raise self._named(error) from None
        return self.path

    def discard(self) -> None:
        if self.tmp.is_dir():
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            self.tmp.unlink(missing_ok=True)

    def _named(self, error: OSError) -> OSError:
        if error.filename is None or Path(error.filename) != self.tmp:
            return error
        return OSError(error.errno, f"cannot write {str(self.path)!r}: {error.strerror}")

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
            return
        self.discard()
        if isinstance(exc, OSError) and self._named(exc) is not exc:
            raise self._named(exc) from None


def atomic_path(path: PathLike, *, folder: bool = False, overwrite: bool = False) -> AtomicPath:
    """``with atomic_path(path) as tmp:`` write ``tmp``; it becomes ``path`` when the block
    succeeds (:class:`AtomicPath`). An existing file, or a non-empty existing folder, is
    replaced only with ``overwrite``; missing parent folders are created."""
    return AtomicPath(path, folder=folder, overwrite=overwrite)


def atomic_write(path: PathLike, write: Callable[[Path], None], *, folder: bool = False,
                 overwrite: bool = False) -> Path:
    """Run ``write(tmp)`` on a temporary file (or, with ``folder``, an empty folder) beside
    ``path``, then rename it into place; returns ``path`` (see :func:`atomic_path`).

    A crash leaves the old file or folder or the new one, never a half-written one.
    """
    with atomic_path(path, folder=folder, overwrite=overwrite) as tmp:
        write(tmp)
    return Path(path)


def write_json_file(path: PathLike, data: Any, *, overwrite: bool = True) -> Path:
    """Write ``data`` as indented JSON, atomically and durably (the file and its folder are
    fsynced: a state file that a crash must not lose or truncate)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(path, write, overwrite=overwrite)
    _fsync_one(Path(path).parent)  # the rename itself
    return Path(path)


def fsync_path(path: PathLike) -> None:
    """fsync a file, or a folder's files and then the folder itself (so the files, and the
    renames inside the folder, survive a power cut)."""
    path = Path(path)
    for item in [*(p for p in path.iterdir() if p.is_file()), path] if path.is_dir() else [path]:
        _fsync_one(item)


def _fsync_one(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_target(path: Path, folder: bool, overwrite: bool) -> None:
    if folder:
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a folder")
        if path.is_dir() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} is a non-empty folder; pass overwrite=True to "
                                  f"replace it")
    elif path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")


def _replace(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an existing folder is moved aside first and restored if the
    rename fails (``os.replace`` cannot replace a non-empty folder)."""
    if not (tmp.is_dir() and path.exists()):
        os.replace(tmp, path)
        return
    old = tmp.with_suffix(".old")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
