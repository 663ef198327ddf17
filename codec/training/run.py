"""A training run's folder, shared by the codec trainers and the LM fine-tuning loop.

One run writes into one folder ``OUT``::

    OUT/run.json                   {"format": ..., "config": {...}, ...}: what the run started with
                                   (the LM loop's; the codec trainers keep it in each checkpoint)
    OUT/<checkpoints>/step_N/      one complete checkpoint per folder (``marker`` file inside)
    OUT/<checkpoints>/.step_N.tmp  a checkpoint being written (ignored; removed by the next save)
    OUT/<log>                      one JSON object per line

:class:`RunFolder` names those paths (each trainer chooses the names), :class:`CheckpointFolder`
writes checkpoints atomically (a crash leaves the previous ones intact), lists them newest
first and loads the newest intact one, warning about each damaged one it skips. The RNG helpers
save and restore every random stream of a process; :func:`mix_seed` derives per-step seeds.
:func:`check_processes` and :func:`refuse_fsdp` check how ``accelerate`` started the processes.
Only the main process writes, except each process's random state (:func:`save_rng`).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from ..files import (CheckpointError, fsync_path, honour_umask, read_json_file, read_safetensors_file,
                     write_json_file)

T = TypeVar("T")
RUN_FILE = "run.json"
_MIX = 0x9E3779B97F4A7C15


# -- seeds and random state ----------------------------------------------------------------------
def mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part and its position (e.g. ``(seed, step, rank)``),
    so a step's randomness is a pure function of the step: resume needs no RNG state."""
    value = 0
    for part in parts:
        value = (value * _MIX + part + 1) % (1 << 63)
    return value


def rng_state(generators: Mapping[str, torch.Generator] | None = None
              ) -> tuple[dict[str, torch.Tensor], dict]:
    """This process's random state: torch (CPU and every CUDA device) and ``generators`` as
    tensors; Python's and NumPy's global states as JSON-safe data."""
    tensors = {"torch_cpu": torch.get_rng_state(),
               **{name: generator.get_state() for name, generator in (generators or {}).items()}}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    data = {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, data


def set_rng_state(tensors: Mapping[str, torch.Tensor], data: Mapping[str, Any],
                  generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only for the devices present)."""
    torch.set_rng_state(tensors["torch_cpu"])
    for name, generator in (generators or {}).items():
        generator.set_state(tensors[name])
    cuda = [tensors[f"cuda_{i}"] for i in range(len(tensors)) if f"cuda_{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    version, internal, gauss = data["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = data["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_rng(folder: Path, rank: int, generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Write process ``rank``'s random state as ``rng_<rank>.safetensors`` + ``rng_<rank>.json``."""
    from safetensors.torch import save_file

    tensors, data = rng_state(generators)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(folder) / f"rng_{rank}.safetensors"))
    (Path(folder) / f"rng_{rank}.json").write_text(json.dumps(data), encoding="utf-8")


def load_rng(folder: Path, rank: int, generators: Mapping[str, torch.Generator] | None = None) -> bool:
    """Restore process ``rank``'s random state from ``folder``; False when it holds none."""
    tensors = Path(folder) / f"rng_{rank}.safetensors"
    if not tensors.is_file():
        return False
    data = read_json_file(tensors.with_suffix(".json"), "a random-state file")
    set_rng_state(read_safetensors_file(tensors), data, generators)
    return True


def check_rng_files(folder: Path) -> None:
    """Raise :class:`CheckpointError` (naming the file) when a random-state file is damaged."""
    for tensors in sorted(Path(folder).glob("rng_*.safetensors")):
        read_safetensors_file(tensors, keys_only=True)
        read_json_file(tensors.with_suffix(".json"), "a random-state file")


# -- launch checks ---------------------------------------------------------------------------------
def check_processes(accelerator, *, command: str, cpu_hint: str) -> None:
    """Refuse processes that would each train alone (all writing one folder), and warn about
    ``accelerate launch --cpu --num_processes N``, which starts a single process.

    ``command`` names the tokenwave subcommand in the advice; ``cpu_hint`` says how to ask
    for CPU processes at the caller's level (a flag or an argument)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        raise RuntimeError(f"launched as {launched} processes but accelerate runs them as one each; "
                           f"for several processes on CPU {cpu_hint}")
    cpu_launch = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true")
    if cpu_launch and "MASTER_ADDR" in os.environ and launched == 1 and accelerator.num_processes == 1:
        warnings.warn("`accelerate launch --cpu --num_processes N` starts a single process (accelerate "
                      "spreads CPU processes only through mpirun); for N CPU processes use `accelerate "
                      f"launch --multi_gpu --num_processes N -m inference {command} ... --cpu` or torchrun",
                      stacklevel=3)


def refuse_fsdp(accelerator, *, command: str, why: str) -> None:
    """Raise ValueError when launched with FSDP, which ``command`` does not support (``why``)."""
    from accelerate.utils import DistributedType

    if (accelerator.distributed_type == DistributedType.FSDP
            or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
        raise ValueError(f"FSDP is not supported by tokenwave {command} ({why}); launch without "
                         "--use_fsdp or an FSDP accelerate config")


def warn_world_change(saved: int | None, current: int, *, what: str, restored: bool = True) -> None:
    """Warn that resuming with another number of processes changes ``what``; so does resuming
    a process whose random state the checkpoint lacks (``restored`` False)."""
    if saved != current or not restored:
        warnings.warn(f"resuming with {current} process(es), checkpoint written by {saved}: {what} "
                      "differ from an uninterrupted run", stacklevel=3)


# -- checkpoints -----------------------------------------------------------------------------------
class CheckpointFolder:
    """``root/step_N/`` folders, each complete once it holds ``marker``; the newest ``keep_last``
    are kept (0 or None: all). ``digits`` pads the step in the name."""

    def __init__(self, root: str | Path, *, marker: str, digits: int, keep_last: int | None = None) -> None:
        self.root = Path(root)
        self.marker = marker
        self.digits = digits
        self.keep_last = keep_last

    def name(self, step: int) -> str:
        return f"step_{step:0{self.digits}d}"

    def newest_first(self) -> list[tuple[int, Path]]:
        """``(step, folder)`` of every complete checkpoint, newest first (temporary ones ignored)."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            if path.name.startswith("step_") and path.is_dir() and (path / self.marker).is_file():
                try:
                    found.append((int(path.name[5:]), path))
                except ValueError:
                    continue
        return sorted(found, reverse=True)

    def temporary(self, step: int) -> Path:
        """Where ``step`` is written before :meth:`commit`: a fixed name, so that every process
        can write its part (e.g. :func:`save_rng`) once the main one has called :meth:`begin`."""
        return self.root / f".{self.name(step)}.tmp"

    def begin(self, step: int) -> Path:
        """Create :meth:`temporary` afresh (main process) and return it."""
        tmp = self.temporary(step)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int, tmp: Path) -> Path:
        """Make ``tmp`` the checkpoint of ``step`` (replacing one of the same step), durably;
        then remove temporary folders left by crashes and prune to ``keep_last``."""
        final = self.root / self.name(step)
        honour_umask(tmp)  # files that safetensors or mkdtemp write start private
        fsync_path(tmp)
        if final.exists():  # the same step saved again (a resumed run): swap it
            old = final.with_name(final.name + ".old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_path(self.root)
        for stale in self.root.glob(".step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        if self.keep_last:
            for _, old in self.newest_first()[self.keep_last:]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def write(self, step: int, write: Callable[[Path], None]) -> Path:
        """One process: ``write(tmp)`` fills the checkpoint, then :meth:`commit`; on an error
        the temporary folder is removed and the existing checkpoints are left as they were."""
        tmp = self.begin(step)
        try:
            write(tmp)
            return self.commit(step, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load_newest(self, load: Callable[[Path], T]) -> tuple[Path, T]:
        """``load`` the newest checkpoint it does not find damaged: each newer one for which
        it raises :class:`CheckpointError` is named in one warning. FileNotFoundError when
        there is no checkpoint, or no intact one (naming each problem)."""
        found = self.newest_first()
        if not found:
            raise FileNotFoundError(f"{self.root}: no complete checkpoint to resume from")
        damaged: list[str] = []
        for _, folder in found:
            try:
                loaded = load(folder)
            except CheckpointError as error:
                damaged.append(f"{folder.name} ({' '.join(str(error).split())})")
                continue
            if damaged:
                warnings.warn(f"skipping damaged checkpoint(s): {'; '.join(damaged)}; resuming from "
                              f"{folder.name} instead", stacklevel=3)
            return folder, loaded
        raise FileNotFoundError(f"{self.root}: no intact checkpoint to resume from: {'; '.join(damaged)}; "
                                "start a new run (another output folder) or restore a checkpoint")


# -- the run folder and its log ------------------------------------------------------------------
class JsonlLog:
    """Appends one JSON object per record to ``path`` (folders made on the first write)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, record: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def jsonl_tracker(path: str | Path, run_name: str):
    """An ``accelerate`` tracker whose ``log`` calls go to a :class:`JsonlLog` with the time."""
    import time

    from accelerate.tracking import GeneralTracker

    class JSONLTracker(GeneralTracker):
        name = "jsonl"
        requires_logging_directory = True
        main_process_only = True

        def __init__(self) -> None:
            super().__init__()
            self.run_name = run_name
            self.log_file = JsonlLog(path)

        @property
        def tracker(self) -> Path:
            return self.log_file.path

        def store_init_configuration(self, values: dict) -> None:
            self.log_file.append({"event": "config", "time": time.time(), **values})

        def log(self, values: dict, step: int | None = None, **kwargs) -> None:
            self.log_file.append({"step": step, "time": time.time(), **values})

    return JSONLTracker()


class RunFolder:
    """The paths of a run in ``out`` (see the module docstring): its ``checkpoints`` and its
    ``log`` file (relative to ``out``) are the trainer's choice."""

    def __init__(self, out: str | Path, checkpoints: CheckpointFolder, *, log: str) -> None:
        self.out = Path(out)
        self.checkpoints = checkpoints
        self.log = JsonlLog(self.out / log)
        self.run_file = self.out / RUN_FILE

    def holds_run(self) -> bool:
        """A run was started here (its run file or a checkpoint exists)."""
        return self.run_file.exists() or bool(self.checkpoints.newest_first())

    def write_run_file(self, data: Mapping[str, Any]) -> Path:
        """Write ``run.json`` (``data`` has a ``"format"`` and a ``"config"``) atomically and durably."""
        if "format" not in data or "config" not in data:
            raise ValueError(f"a run file needs 'format' and 'config', got keys {sorted(data)}")
        return write_json_file(self.run_file, dict(data))

    def read_run_file(self, fmt: str) -> dict[str, Any]:
        """``run.json``, checked to be of format ``fmt``."""
        if not self.run_file.is_file():
            raise FileNotFoundError(f"{self.out}: no {RUN_FILE}; nothing to resume there")
        data = read_json_file(self.run_file, f"a {fmt} run file")
        if data.get("format") != fmt:
            raise ValueError(f"{self.run_file}: expected format {fmt!r}, found {data.get('format')!r}")
        return data
