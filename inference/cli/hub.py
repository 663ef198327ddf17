"""``tokenwave download`` and ``tokenwave models``: the Hugging Face cache from the command line.

    tokenwave download NAME [--revision R]   # prefetch into the Hugging Face cache
    tokenwave models                         # what is available locally, with sizes

``download`` takes what ``--model`` takes (``facebook/musicgen-small``, ``musicgen-small``,
``facebook/encodec_32khz``, ``t5-base``) and fetches only the files tokenwave reads
(:mod:`inference.hub`); for an audiocraft checkpoint it also fetches the T5 and codec the
checkpoint only names, so the machine can go offline afterwards. Running it again after an
interrupted download completes it.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from codec.files import read_json_file
from inference import hub

from .common import CliError


def human_size(size: int) -> str:
    """``1536`` -> ``1.5 KB`` (powers of 1000, as the hub shows sizes)."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def disk_size(path: Path) -> int:
    """Bytes under ``path`` (links followed once, as the files they point at)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def repo_for(name: str) -> str:
    """The hub repository a command-line name means; a one-line error when it cannot be one."""
    from inference.registry import hub_repo

    plain, _ = hub.split_revision(name)
    repo = hub_repo(plain) or hub.codec_repo(plain) or (plain if hub.is_repo_id(plain) else None)
    if repo is None:
        raise CliError(f"{name!r} is not a Hugging Face repository name (org/name, e.g. "
                       f"facebook/musicgen-small)")
    return repo


def cmd_download(args) -> int:
    try:
        repo, revision = hub.split_revision(args.name, args.revision)
    except ValueError as error:
        raise CliError(str(error)) from None
    repo = repo_for(repo)
    reason = hub.offline_reason()
    if reason is not None:
        raise CliError(f"cannot download {repo}: downloads are off ({reason}); unset it to download")
    path = hub.download(repo, revision)
    fetched = [(repo, path)]
    for name in hub.dependencies(path):  # an audiocraft checkpoint only names its T5 and codec
        dependency = hub.codec_repo(name) or name
        fetched.append((dependency, hub.download(dependency)))
    if not args.quiet:
        for name, where in fetched:
            folder = where.parent if where.is_file() else where
            print(f"{name}: {folder} ({human_size(disk_size(folder))})")
    return 0


def describe(path: Path) -> str:
    """What a models-folder entry holds, from its files (no weights read)."""
    if path.is_file():
        return "codec (original release)" if path.suffix == ".th" else "checkpoint file"
    config = path / "config.json"
    if config.is_file():
        try:
            if read_json_file(config).get("format") == "tokenwave-musicgen":
                return "generator (tokenwave)"
        except (OSError, ValueError):  # CheckpointError is a ValueError
            return "folder (unreadable config.json)"
    return hub.kind_of(path) or ("codec" if (path / "codec").is_dir() else "folder")


def _local_entries(root: Path) -> list[tuple[str, Path]]:
    if not root.is_dir():
        return []
    entries = []
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir() and path.name == "facebook":
            entries += [(f"facebook/{p.name}", p) for p in sorted(path.iterdir())
                        if not p.name.startswith(".")]
        else:
            entries.append((path.name, path))
    return entries


def _print_local(title: str, entries: list[tuple[str, Path]]) -> None:
    print(title)
    if not entries:
        print("  (none)")
    for name, path in entries:
        print(f"  {name:<40} {describe(path):<26} {human_size(disk_size(path)):>9}")


def cmd_models(args) -> int:
    from codec.registry import ENV_MODELS_DIR, SHIPPED_MODELS, get_models_dir

    _print_local(f"shipped ({SHIPPED_MODELS}):", _local_entries(SHIPPED_MODELS))
    root = get_models_dir()
    source = (f"${ENV_MODELS_DIR}" if os.environ.get(ENV_MODELS_DIR)
              else f"default; set ${ENV_MODELS_DIR} to move it")
    _print_local(f"models folder ({root}; {source}):", _local_entries(root))
    cached = hub.list_cached()
    print(f"Hugging Face cache ({hub.cache_dir()}):")
    if not cached:
        print("  (none)")
    for model in cached:
        refs = ",".join(model.refs) or "-"
        print(f"  {model.repo_id:<40} {model.kind:<26} {human_size(model.size):>9}  {refs} "
              f"{model.commit[:8]}")
    return 0


def register(commands) -> None:
    """Add ``download`` and ``models`` to the ``tokenwave`` sub-commands."""
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks on errors")
    sub = commands.add_parser("download", parents=[quiet], help="fetch a model into the Hugging Face cache",
                              description="Fetch a model (and the T5 and codec an audiocraft "
                                          "checkpoint names) into the Hugging Face cache, for use "
                                          "offline later.")
    sub.add_argument("name", metavar="NAME",
                     help="facebook/musicgen-small, musicgen-small, facebook/encodec_32khz, "
                          "t5-base, ... (NAME@REVISION also works)")
    sub.add_argument("--revision", metavar="R", help="branch, tag or commit (default: main)")
    sub.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    sub.set_defaults(func=cmd_download)
    sub = commands.add_parser("models", parents=[quiet], help="list the models available locally, with sizes",
                              description="List shipped models, the models folder and the models in the "
                                          "Hugging Face cache that tokenwave reads.")
    sub.set_defaults(func=cmd_models)


__all__ = ["cmd_download", "cmd_models", "describe", "disk_size", "human_size", "register", "repo_for"]
