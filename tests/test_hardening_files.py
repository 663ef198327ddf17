"""Damaged files and file modes (issue 11, items 11 and 13): corrupt weights, tokenizers and
checkpoints are named; resume falls back to the newest intact checkpoint; a larger --steps
continues a finished run; a warmup longer than the run is cut with a warning; saved folders and
files honour the umask."""
from __future__ import annotations

import json
import os
import shutil
import stat
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_data import write_corpus
from test_generator import build_tiny_generator

from codec.formats import CheckpointError, read_json_file, read_safetensors_file, save_model
from codec.model import EncodecConfig
from inference import MusicGen
from inference.cli import main, random_model
from inference.finetune import finetune
from lm import finetune as ft
from lm.run import FinetuneConfig, checkpoint_problem, effective_warmup, list_checkpoints
from lm.token_cache import CodecTokenizer, prepare_corpus

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "models" / "tokenwave-small"
TINY = EncodecConfig(name="tiny_files", sample_rate=8_000, n_filters=2, dimension=8, num_codebooks=2,
                     codebook_size=16, lstm=1, target_bandwidths=(0.4,))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# -- corrupt files are named ----------------------------------------------------------------------
def test_safe_readers_name_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{bad}: expected a JSON config, found unreadable text"):
        read_json_file(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="found list"):
        read_json_file(bad)
    save_model(random_model(TINY), tmp_path / "codec")
    weights = tmp_path / "codec" / "model.safetensors"
    truncate(weights)
    with pytest.raises(CheckpointError, match=rf"{weights}: expected a safetensors file, found \d+ bytes .*truncated"):
        read_safetensors_file(weights, keys_only=True)
    with pytest.raises(FileNotFoundError, match="expected a safetensors file"):
        read_safetensors_file(tmp_path / "none.safetensors")


@pytest.mark.parametrize("damage, named", [
    (lambda folder: truncate(folder / "t5" / "model.safetensors"), "t5/model.safetensors"),
    (lambda folder: (folder / "t5" / "tokenizer.json").write_text("{garbage"), "t5/tokenizer.json"),
    (lambda folder: (folder / "t5" / "spiece.model").write_bytes(b"garbage" * 9), "t5/spiece.model"),
    (lambda folder: (folder / "t5" / "config.json").write_text("nonsense"), "t5/config.json"),
])
def test_a_damaged_t5_folder_is_named(tmp_path, damage, named):
    folder = tmp_path / "model"
    shutil.copytree(SHIPPED, folder)
    damage(folder)
    with pytest.raises(CheckpointError, match=rf"{folder / named}: expected"):
        MusicGen.from_pretrained(folder, device="cpu")


def test_the_cli_names_a_truncated_t5_in_one_line(tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(SHIPPED, folder)
    truncate(folder / "t5" / "model.safetensors")
    code = main(["generate", "piano", "--model", str(folder), "-o", str(tmp_path / "x.wav"), "--duration", "0.1"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "t5/model.safetensors" in err and "SafetensorError" not in err and "Traceback" not in err


# -- resume ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    generator = build_tiny_generator(seed=3)
    generator.save_pretrained(root / "base")
    prepare_corpus(write_corpus(root / "corpus", 4, bad=False), root / "cache", CodecTokenizer(generator.codec),
                   segment_seconds=0.25, model_spec=str(root / "base"))
    return root / "base", root / "cache"


def config_for(setup, out: Path, **overrides) -> FinetuneConfig:
    base, cache = setup
    settings = dict(model=str(base), data=str(cache), out=str(out), steps=4, batch_size=2, lr=3e-3, warmup=1,
                    ema=True, ema_every=1, valid_fraction=0.25, eval_every=0, save_every=1, keep_last=0,
                    log_every=1, seed=5)
    return FinetuneConfig(**{**settings, **overrides})


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("damage", ["truncated weights", "missing weights", "bad state", "truncated optimizer"])
def test_resume_skips_a_damaged_latest_checkpoint(setup, tmp_path, damage):
    straight = finetune(config_for(setup, tmp_path / "straight"))
    out = tmp_path / "run"
    finetune(config_for(setup, out, stop_after=3))
    latest = out / "checkpoints" / ft.checkpoint_name(3)
    if damage == "truncated weights":
        truncate(latest / "model.safetensors")
    elif damage == "missing weights":
        (latest / "model.safetensors").unlink()
    elif damage == "bad state":
        (latest / "state.json").write_text("{")
    else:
        truncate(latest / "optimizer.pt", 0.3)
    assert checkpoint_problem(latest, ema=True) is not None
    assert checkpoint_problem(out / "checkpoints" / ft.checkpoint_name(2), ema=True) is None
    with pytest.warns(UserWarning, match=rf"{latest.name} \(.*{latest}.*\); resuming from {ft.checkpoint_name(2)}"):
        result = finetune(config_for(setup, out), resume=True)
    assert result.step == 4
    # Steps 3 and 4 were redone from step 2: the same run as one never interrupted.
    assert all(torch.equal(a, b) for a, b in zip(weights(result.model_dir).values(),
                                                  weights(straight.model_dir).values()))


def test_resume_with_no_intact_checkpoint_names_them(setup, tmp_path):
    out = tmp_path / "run"
    finetune(config_for(setup, out, stop_after=1))
    truncate(out / "checkpoints" / ft.checkpoint_name(1) / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no intact checkpoint.*step_00000001.*model\.safetensors"):
        finetune(config_for(setup, out), resume=True)


def test_resume_with_more_steps_continues_to_the_new_total(setup, tmp_path, capsys):
    out = tmp_path / "run"
    first = finetune(config_for(setup, out, steps=2))
    assert first.step == 2 and first.model_dir is not None
    code = main(["finetune", "--out", str(out), "--resume", "--steps", "4", "-q"])
    assert code == 0, capsys.readouterr().err
    assert [s for s, _ in list_checkpoints(out)][-1] == 4
    assert json.loads((out / "run.json").read_text())["config"]["steps"] == 4  # later resumes keep the total
    with pytest.raises(ValueError, match=r"step 4, beyond --steps 3"):
        finetune(config_for(setup, out, steps=3), resume=True)
    code = main(["finetune", "--out", str(out), "--resume", "--steps", "3", "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "beyond --steps 3" in err


def test_a_warmup_longer_than_the_run_is_cut_with_a_warning(setup, tmp_path):
    config = config_for(setup, tmp_path / "x", steps=20, warmup=100)
    with pytest.warns(UserWarning, match=r"warmup of 100 steps >= the run's 20 steps.*warmup of 2 steps"):
        assert effective_warmup(config) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert effective_warmup(replace(config, warmup=5)) == 5
    with pytest.warns(UserWarning, match="warmup of 100 steps"):
        result = finetune(replace(config, steps=2, eval_every=0))
    lrs = [json.loads(line)["train/lr"] for line in (result.out / "logs" / "train.jsonl").read_text().splitlines()
           if "train/lr" in line]
    assert lrs[0] == pytest.approx(3e-3)  # no warmup left in a 2-step run: the first step is at the peak


# -- file modes -----------------------------------------------------------------------------------
@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    previous = os.umask(0o022)
    yield set_mask
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_saved_models_honour_the_umask(tmp_path, umask, mask):
    umask(mask)
    model = random_model(TINY)
    folder = save_model(model, tmp_path / "codec")
    assert mode(folder) == 0o777 & ~mask
    assert {mode(p) for p in folder.iterdir()} == {0o666 & ~mask}
    single = save_model(model, tmp_path / "codec.th", format="original")
    assert mode(single) == 0o666 & ~mask
    generator = build_tiny_generator(seed=1)
    exported = generator.save_pretrained(tmp_path / "generator") or tmp_path / "generator"
    assert mode(exported) == 0o777 & ~mask
    assert all(mode(p) == (0o777 if p.is_dir() else 0o666) & ~mask for p in exported.rglob("*"))


def test_codec_training_checkpoints_honour_the_umask(tmp_path, umask):
    from codec.training.loop import CheckpointManager

    umask(0o022)
    saved = CheckpointManager(tmp_path / "checkpoints").save(3, {"kind": "codec", "step": 3})
    assert mode(saved) == 0o755 and mode(next(saved.iterdir())) == 0o644
