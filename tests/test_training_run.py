"""codec.training.run: the run folder, checkpoints, random state and log shared by the trainers."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from codec.files import CheckpointError
from codec.training.run import (
    CheckpointFolder,
    JsonlLog,
    RunFolder,
    load_rng,
    mix_seed,
    refuse_fsdp,
    save_rng,
    warn_world_change,
)


def folder(tmp_path, keep_last=None) -> CheckpointFolder:
    return CheckpointFolder(tmp_path / "checkpoints", marker="state.json", digits=4, keep_last=keep_last)


def save(checkpoints: CheckpointFolder, step: int) -> None:
    checkpoints.write(step, lambda tmp: (tmp / "state.json").write_text(json.dumps({"step": step})))


def test_checkpoints_are_listed_newest_first_and_pruned(tmp_path):
    checkpoints = folder(tmp_path, keep_last=2)
    for step in (3, 1, 12):
        save(checkpoints, step)
    (checkpoints.root / "step_0020").mkdir()  # no marker: not complete
    (checkpoints.root / ".step_0030.tmp").mkdir()  # a crash mid-write
    assert [(s, p.name) for s, p in checkpoints.newest_first()] == [(12, "step_0012"), (3, "step_0003")]
    save(checkpoints, 3)  # the same step again replaces it
    assert not (checkpoints.root / ".step_0030.tmp").exists()
    assert [s for s, _ in checkpoints.newest_first()] == [12, 3]


def test_a_failing_writer_leaves_the_checkpoints_as_they_were(tmp_path):
    checkpoints = folder(tmp_path)
    save(checkpoints, 1)

    def half(tmp):
        (tmp / "state.json").write_text("{")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoints.write(2, half)
    assert [s for s, _ in checkpoints.newest_first()] == [1]
    assert sorted(p.name for p in checkpoints.root.iterdir()) == ["step_0001"]


def test_load_newest_skips_damaged_checkpoints_with_a_warning(tmp_path):
    checkpoints = folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoints.load_newest(lambda path: path)
    for step in (1, 2, 3):
        save(checkpoints, step)

    def load(path):
        if path.name != "step_0001":
            raise CheckpointError(f"{path / 'state.json'}: truncated")
        return "loaded"

    skipped = r"step_0003 \(.*truncated\); step_0002 \(.*\); resuming from step_0001"
    with pytest.warns(UserWarning, match=skipped):
        path, value = checkpoints.load_newest(load)
    assert path.name == "step_0001" and value == "loaded"
    with pytest.raises(FileNotFoundError, match=r"no intact checkpoint.*step_0003.*step_0002.*step_0001"):
        checkpoints.load_newest(lambda path: load(path.with_name("x")))
    def refuse(path):
        raise ValueError(f"{path}: a checkpoint of another kind")

    with pytest.raises(ValueError, match="another kind"):  # anything but damage is not skipped
        checkpoints.load_newest(refuse)


def test_random_state_round_trips_per_rank(tmp_path):
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    save_rng(tmp_path, 1, {"dropout": generator})
    expected = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=generator))
    torch.manual_seed(9), random.seed(9), np.random.seed(9), generator.manual_seed(9)
    assert load_rng(tmp_path, 1, {"dropout": generator})
    found = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=generator))
    assert torch.equal(found[0], expected[0]) and found[1:3] == expected[1:3]
    assert torch.equal(found[3], expected[3])
    assert not load_rng(tmp_path, 0)  # no file of that rank
    (tmp_path / "rng_1.json").write_text("{")
    with pytest.raises(CheckpointError, match="rng_1.json"):
        load_rng(tmp_path, 1, {"dropout": generator})


def test_run_file_log_and_seeds(tmp_path):
    run = RunFolder(tmp_path / "run", folder(tmp_path / "run"), log="logs/train.jsonl")
    assert not run.holds_run()
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        run.read_run_file("demo")
    run.write_run_file({"format": "demo", "config": {"steps": 3}})
    assert run.holds_run() and run.read_run_file("demo")["config"] == {"steps": 3}
    with pytest.raises(ValueError, match="expected format 'other', found 'demo'"):
        run.read_run_file("other")
    with pytest.raises(ValueError, match="needs 'format' and 'config'"):
        run.write_run_file({"config": {}})
    run.log.append({"step": 1, "loss": 0.5})
    JsonlLog(run.log.path).append({"step": 2})
    lines = run.log.path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert mix_seed(0, 1) != mix_seed(1, 0) and mix_seed(3, 4) == mix_seed(3, 4)
    with pytest.warns(UserWarning, match="resuming with 2 process.*written by 1: the clips differ"):
        warn_world_change(1, 2, what="the clips")


def test_fsdp_is_refused(monkeypatch):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    refuse_fsdp(accelerator, command="finetune", why="full weights per process")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match=r"FSDP is not supported by tokenwave finetune \(full weights"):
        refuse_fsdp(accelerator, command="finetune", why="full weights per process")


def test_a_process_without_its_saved_random_state_is_warned_about():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_world_change(2, 2, what="the clips")  # same processes, state restored: silent
    with pytest.warns(UserWarning, match="resuming with 2 process.*written by 2: the streams differ"):
        warn_world_change(2, 2, what="the streams", restored=False)
