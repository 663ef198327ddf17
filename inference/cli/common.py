"""What every ``tokenwave`` command shares: the user-facing error, file/folder jobs, early checks.

Every file command takes a file or a folder (``IN`` a folder -> ``OUT`` a folder with the same
file names, a progress bar over the files). Outputs are written to a temporary file and renamed,
so a failure, Ctrl-C or SIGTERM never leaves a partial file, and an existing output is only
replaced with ``--force``; an output folder that cannot be written is reported before any model
loads.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from codec import audio


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def parse_device(spec: str) -> torch.device:
    """``--device``: a torch device that exists here."""
    try:
        device = torch.device(spec)
    except RuntimeError as error:
        raise CliError(f"--device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {spec}: CUDA is not available here; use --device cpu")
    return device


# -- shared options ---------------------------------------------------------------------------
def common_options() -> argparse.ArgumentParser:
    """``--device``, ``--force``, ``-q`` and ``-v``: a parent parser for the file commands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    common.add_argument("--force", action="store_true", help="overwrite existing outputs")
    common.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    return common


def audio_output_options() -> argparse.ArgumentParser:
    """How written audio is stored and normalized: a parent parser for audio outputs."""
    out_audio = argparse.ArgumentParser(add_help=False)
    out_audio.add_argument("--subtype", default="PCM_16", choices=audio.SUBTYPES,
                           help="sample format of the written audio")
    out_audio.add_argument("--normalize", choices=audio.NORMALIZE_MODES,
                           help="peak (-1 dBFS) or loudness (--target-lufs); default: none")
    out_audio.add_argument("--target-lufs", type=float, default=-14.0,
                           help="loudness target for --normalize loudness (default -14)")
    return out_audio


def check_audio_output_options(args) -> None:
    """Refuse a ``--target-lufs`` no one means (inf, nan, above 0) before anything runs."""
    lufs = getattr(args, "target_lufs", None)
    if lufs is not None and not -70.0 <= lufs <= 0.0:  # nan fails too
        raise CliError(f"--target-lufs must be a loudness between -70 and 0 LUFS, got {lufs}")


def check_audio_target(target: Path) -> None:
    """An output name whose extension the audio writer knows."""
    if target.suffix.lower() not in audio.writable_extensions():
        raise CliError(f"cannot write audio to {target}: use one of "
                       f"{', '.join(audio.writable_extensions())}")


def write_output_audio(path: Path, wav: torch.Tensor, sample_rate: int, args) -> None:
    """Write ``(C, T)`` audio with the ``--subtype``, ``--normalize`` and ``--target-lufs`` options."""
    audio.write_audio(path, wav, sample_rate, subtype=args.subtype, normalize=args.normalize,
                      target_lufs=args.target_lufs)


def speed(duration: float, seconds: float) -> str:
    return f"{duration / max(seconds, 1e-9):.1f}x real time"


# -- jobs: which file goes where --------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    source: Path
    target: Path


def plan_jobs(source: str, target: str, *, inputs: tuple[str, ...], suffix: str,
              force: bool) -> list[Job]:
    """File -> file, or folder -> folder (mirrored relative paths, extension ``suffix``)."""
    src, dst = Path(source), Path(target)
    if not src.exists():
        raise CliError(f"input not found: {source}")
    if src.is_dir():
        if dst.exists() and not dst.is_dir():
            raise CliError(f"input {source} is a folder, so the output must be a folder; "
                           f"{target} is a file")
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in inputs
                       and not p.name.startswith("."))
        if not files:
            raise CliError(f"no input files ({', '.join(inputs)}) in folder {source}")
        jobs = [Job(p, (dst / p.relative_to(src)).with_suffix(suffix)) for p in files]
        seen: dict[Path, Path] = {}
        for job in jobs:
            if job.target in seen:
                raise CliError(f"{seen[job.target]} and {job.source} would both be written to "
                               f"{job.target}")
            seen[job.target] = job.source
    else:
        if dst.is_dir():
            raise CliError(f"output {target} is a folder; give an output file name")
        jobs = [Job(src, dst)]
    for job in jobs:
        if job.target.resolve() == job.source.resolve():
            raise CliError(f"input and output are the same file: {job.source}")
    existing = [job.target for job in jobs if job.target.exists()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise CliError(f"output exists: {existing[0]}{more}; use --force to overwrite")
    check_writable([job.target for job in jobs])
    return jobs


def check_writable(targets: list[Path]) -> None:
    """Fail before any work if an output cannot be written where it is asked for.

    For each output folder, the nearest folder that exists must be a folder (not a file) and
    accept a new file (probed with an anonymous temporary file, which also catches read-only
    mounts and root's exemptions); missing folders below it are created later. The message
    names the user's path, never a temporary file.
    """
    seen: set[Path] = set()
    for target in targets:
        folder = Path(target).absolute().parent
        if folder in seen:
            continue
        seen.add(folder)
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise CliError(f"cannot write {target}: {existing} is a file, not a folder")
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as error:
            raise CliError(f"cannot write {target}: folder {existing} is not writable "
                           f"({error.strerror or one_line(error)})") from None


def run_jobs(jobs: list[Job], work: Callable[[Job], str], args) -> int:
    """Run ``work`` on each job; a failure in folder mode is reported and the rest go on."""
    from tqdm import tqdm

    if len(jobs) == 1:
        jobs[0].target.parent.mkdir(parents=True, exist_ok=True)
        message = work(jobs[0])
        if not args.quiet:
            print(message)
        return 0
    failed = 0
    bar = tqdm(jobs, unit="file", disable=args.quiet, file=sys.stderr)
    for job in bar:
        job.target.parent.mkdir(parents=True, exist_ok=True)
        try:
            message = work(job)
        except Exception as error:  # report it, go on with the other files
            failed += 1
            if args.verbose:
                traceback.print_exc()
            tqdm.write(f"tokenwave: error: {job.source}: {one_line(error)}", file=sys.stderr)
            continue
        if not args.quiet:
            tqdm.write(message)
    if failed:
        raise CliError(f"{failed} of {len(jobs)} files failed")
    return 0
