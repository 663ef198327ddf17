"""Checks of how a training command was launched, shared by ``train-codec`` and ``finetune``."""
from __future__ import annotations

import os
import warnings


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
