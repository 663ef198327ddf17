"""Training under several processes: DDP over gloo, on CPU, as CI runs it.

``tokenwave finetune`` and ``tokenwave train-codec`` are launched as 2 processes with
``accelerate launch --multi_gpu --num_processes 2 -m inference ... --cpu`` (torchrun underneath;
``accelerate launch --cpu --num_processes 2`` would start one process). Nothing comes from the
user's setup: the accelerate config is a file in tmp_path, HF_HOME points into tmp_path, the
port is a free one, GPUs are hidden. Data parallelism is checked in numbers: 2 processes x B
give, up to float rounding, the weights, losses and gradient norms of 1 process x 2B (LM), and
the codebooks of the EMA quantizer (k-means init, dead-code replacement and EMA statistics over
every process's latents) are those one process learns from the whole batch.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from test_codec_training import TINY_SETS
from test_data import write_corpus
from test_generator import WINDOW, build_tiny_generator

from codec import audio
from codec.formats import load_model
from codec.quantization import ResidualVectorQuantizer
from codec.training.loop import CheckpointManager, LoopConfig
from codec.training.loop import TrainingLoop as _TrainingLoop
from inference import MusicGen
from inference.finetune import finetune
from lm import finetune as ft
from lm.run import FinetuneConfig, list_checkpoints
from lm.token_cache import CodecTokenizer, prepare_corpus

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="needs torch.distributed with the gloo backend"),
    pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                       reason="multi-process training runs through accelerate (pip install accelerate)"),
]

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 300  # seconds; a launch takes a few on an idle core
# Variables of an enclosing launch that would change how the children start.
_LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID")
ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_processes: 2
num_machines: 1
machine_rank: 0
main_process_port: 0
mixed_precision: 'no'
use_cpu: false
"""


def launch(tmp: Path, *argv) -> subprocess.CompletedProcess:
    """``accelerate launch`` 2 processes of ``python -m inference *argv``; never a GPU, the
    network or ~/.cache (port 0: accelerate picks a free one)."""
    config = tmp / "accelerate.yaml"
    config.write_text(ACCELERATE_CONFIG)
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(tmp / "hf"), CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_processes", "2", "--main_process_port", "0", "-m", "inference", *map(str, argv)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def metrics_by_step(log: list[dict]) -> dict[int, dict[str, float]]:
    """Losses, perplexities, gradient norms and learning rates of each step (not timings)."""
    out: dict[int, dict[str, float]] = {}
    for record in log:
        if "event" not in record:
            out.setdefault(record["step"], {}).update(
                {k: v for k, v in record.items() if k.startswith(("train/loss", "train/ce_", "train/grad_norm",
                                                                   "train/lr", "valid/"))})
    return out


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=atol, msg=key)


# -- LM fine-tuning -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory):
    """(base generator, token cache): items of 1-2 s, so every 0.25 s window is full and each
    process's micro-batch holds as many valid tokens as the others. Condition padding is masked:
    MusicGen's unmasked padding makes a row depend on the longest caption of its batch, which
    per-process batches change (the model's property, not data parallelism's)."""
    root = tmp_path_factory.mktemp("distributed_lm")
    generator = build_tiny_generator(seed=3, config=replace(WINDOW, mask_condition_padding=True))
    generator.save_pretrained(root / "base")
    prepare_corpus(write_corpus(root / "corpus", bad=False), root / "cache", CodecTokenizer(generator.codec),
                   segment_seconds=0.25, model_spec=str(root / "base"))
    return root / "base", root / "cache"


LR = 3e-3
# Adam moves each weight by about LR per step whatever its gradient's size, so a weight whose
# gradient is near zero moves by g / (|g| + eps), which float rounding of g changes: the
# weights agree to 1e-5 relative, or to 0.1% of one step.
WEIGHT_ATOL = 1e-3 * LR


def finetune_args(base: Path, cache: Path, batch_size: int) -> dict:
    """No randomness beyond the data order (no condition or word dropout, no caption merging);
    EMA every step, validation every step (2 held-out items: one per process), a sample at the end."""
    return dict(model=str(base), data=str(cache), steps=2, batch_size=batch_size, lr=LR, warmup=1, save_every=1,
                keep_last=0, eval_every=1, valid_fraction=0.34, log_every=1, ema=True, ema_every=1, cfg_dropout=0.0,
                word_dropout=0.0, merge_text_p=0.0, sample_every=2, sample_prompts=("happy rock",),
                sample_seconds=0.05, seed=7, log_with="jsonl", mixed_precision="no", cpu=True)


def as_cli(settings: dict) -> list[str]:
    argv = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if name == "sample_prompts":
            argv += [arg for prompt in value for arg in ("--sample-prompt", prompt)]
        elif value is True:
            argv.append(flag)
        else:
            argv += [flag, str(value)]
    return argv


def test_finetune_on_two_processes_resumes_and_matches_one_process(lm_setup, tmp_path):
    base, cache = lm_setup
    two, one = tmp_path / "two", tmp_path / "one"
    argv = ["finetune", *as_cli(finetune_args(base, cache, batch_size=2)), "--out", two]
    stopped = launch(tmp_path, *argv, "--stop-after", 1)
    assert "finetune: 2 process(es) (MULTI_CPU" in stopped.stderr and "stopped after step 1" in stopped.stdout
    assert [step for step, _ in list_checkpoints(two)] == [1]
    resumed = launch(tmp_path, "finetune", "--out", two, "--resume")
    assert "from step 1" in resumed.stderr and f"-> {two / 'model'}" in resumed.stdout
    # The reference: one process with the global batch (2 x 2), uninterrupted.
    finetune(FinetuneConfig(out=str(one), **finetune_args(base, cache, batch_size=4)))

    # The main process wrote each checkpoint and log line once; every process its RNG state.
    assert [step for step, _ in list_checkpoints(two)] == [1, 2]
    for _, folder in list_checkpoints(two):
        assert sorted(p.name for p in folder.iterdir()) == [
            "ema.safetensors", "model.safetensors", "optimizer.pt", "rng_0.json", "rng_0.safetensors", "rng_1.json",
            "rng_1.safetensors", "state.json"]
        assert json.loads((folder / "state.json").read_text())["world"] == 2
    assert not list((two / "checkpoints").glob(".*"))  # no temporary folder left
    log = records(two / "logs" / "train.jsonl")
    starts = [r for r in log if r.get("event") == "config"]
    assert len(starts) == 2 and all(r["processes"] == 2 and r["global_batch_size"] == 4 for r in starts)
    assert [r["step"] for r in log if "train/loss" in r] == [1, 2]
    assert [r["step"] for r in log if "valid/loss" in r] == [1, 2]
    assert sorted(p.name for p in (two / "samples").iterdir()) == ["step_00000002"]

    # Data parallelism: the same losses, gradient norms, validation and weights as one process.
    mine, reference = metrics_by_step(log), metrics_by_step(records(one / "logs" / "train.jsonl"))
    assert set(mine) == set(reference) == {1, 2} and all(len(mine[s]) > 10 for s in mine)
    for step, values in reference.items():
        assert mine[step].keys() == values.keys()
        for key, value in values.items():
            assert mine[step][key] == pytest.approx(value, rel=1e-5), (step, key)
    initial = load_file(str(base / "model.safetensors"))
    for (_, ours), (_, theirs) in zip(list_checkpoints(two), list_checkpoints(one)):
        for name in ("model.safetensors", "ema.safetensors"):
            assert_close_weights(load_file(str(ours / name)), load_file(str(theirs / name)), WEIGHT_ATOL)
    # Not vacuous: training moved the weights by far more than the tolerance.
    trained = load_file(str(list_checkpoints(two)[-1][1] / "model.safetensors"))
    assert (trained["lm.linears.0.weight"] - initial["linears.0.weight"]).abs().max() > 100 * WEIGHT_ATOL
    assert_close_weights(load_file(str(two / "model" / "model.safetensors")),
                         load_file(str(one / "model" / "model.safetensors")), WEIGHT_ATOL)

    generator = MusicGen.from_pretrained(two / "model", device="cpu")
    out = generator.generate("happy rock", 0.05, seed=0)
    assert out.wav.shape == (1, 1, 40) and torch.isfinite(out.wav).all()


def test_launch_checks(lm_setup, tmp_path, monkeypatch):
    """FSDP is refused (on CPU accelerate would run DDP instead), so are processes that would
    each train alone; ``accelerate launch --cpu --num_processes N`` (one process) gets a warning."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    for name in ("WORLD_SIZE", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.warns(UserWarning, match="starts a single process"):
        ft._check_launch(accelerator)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="pass --cpu"):
        ft._check_launch(accelerator)
    with pytest.raises(RuntimeError, match="pass cpu=True"):
        _TrainingLoop(tmp_path, LoopConfig(), accelerator)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    base, cache = lm_setup
    with pytest.raises(ValueError, match="FSDP is not supported"):
        finetune(FinetuneConfig(model=str(base), data=str(cache), out=str(tmp_path / "fsdp"), steps=1, cpu=True))


# -- codec training -----------------------------------------------------------------------------

def test_train_codec_on_two_processes_and_resume(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    gen = torch.Generator().manual_seed(0)
    t = torch.arange(int(0.6 * 24_000)) / 24_000
    for i, freq in enumerate((220.0, 330.0, 440.0)):
        wav = 0.3 * torch.sin(2 * math.pi * freq * t) + 0.05 * torch.randn(t.shape, generator=gen)
        audio.write_audio(corpus / f"clip{i}.wav", wav[None], 24_000, subtype="FLOAT")
    out = tmp_path / "run"
    common = [corpus, "--out", out, "--batch-size", 2, "--segment-seconds", 0.1, "--checkpoint-every", 1,
              "--log-every", 1, "--valid-clips", 2, "--valid-every", 2, "--num-workers", 0, "--disc-filters", 4,
              "--cpu"]
    done = launch(tmp_path, "train-codec", *common, "--name", "mini", "--steps", 2, *TINY_SETS)
    assert "on cpu" in done.stdout and " x2" in done.stdout and "model written to" in done.stdout
    done = launch(tmp_path, "train-codec", *common, "--steps", 3, "--resume", "-q")
    assert "resuming with" not in done.stderr  # same number of processes: no warning

    steps = [int(p.name[5:]) for p in CheckpointManager(out / "checkpoints", keep_last=3).all()]
    assert steps == [1, 2, 3] and not list((out / "checkpoints").glob(".*"))
    assert all(CheckpointManager.load(out / "checkpoints" / f"step_{s:09d}", "codec")["world"] == 2 for s in steps)
    log = records(out / "train_log.jsonl")  # written by the main process only: one line per event
    assert [(r["step"], r["processes"]) for r in log if r.get("event") == "start"] == [(0, 2), (2, 2)]
    assert [r["step"] for r in log if "mel" in r] == [1, 2, 3]
    assert [r["step"] for r in log if any(k.startswith("valid_si_snr") for k in r)] == [2, 3]

    model = load_model(out / "mini")
    assert model.num_codebooks == 4 and model.name == "mini"
    assert all(layer._codebook.inited.item() == 1 for layer in model.quantizer.vq.layers)
    wav = audio.read_audio(corpus / "clip0.wav")[0][:, :2400]
    with torch.no_grad():
        decoded = model.decode(model.encode(wav[None]))
    assert decoded.shape[-1] >= 2400 and torch.isfinite(decoded).all()


# -- the quantizer's codebooks under data parallelism ------------------------------------------------

def _train_quantizer(batches: torch.Tensor, rank: int, rows: slice, dead_code_threshold: float = 2.0
                     ) -> tuple[dict, list[torch.Tensor]]:
    """Training forwards on ``batches[s][rows]`` (``(steps, B, D, T)``), each step's global RNG
    seeded per process as the codec trainer does; returns the buffers and each step's codes."""
    torch.manual_seed(0)
    quantizer = ResidualVectorQuantizer(dimension=8, num_codebooks=3, codebook_size=16, kmeans_iters=5,
                                        threshold_ema_dead_code=dead_code_threshold).train()
    codes = []
    for step, batch in enumerate(batches):
        torch.manual_seed(1000 * step + rank)
        codes.append(quantizer(batch[rows]).codes)
    return {k: v.clone() for k, v in quantizer.state_dict().items()}, codes


def _quantizer_worker(rank: int, world: int, init_file: str, batches: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        per = batches.shape[1] // world
        state, codes = _train_quantizer(batches, rank, slice(rank * per, (rank + 1) * per))
        torch.save({"state": state, "codes": codes}, Path(out) / f"rank_{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_codebooks_learn_from_every_process_as_one_process_from_the_whole_batch(tmp_path):
    gen = torch.Generator().manual_seed(1)
    centres = 4 * torch.randn(6, 8, generator=gen)  # clustered latents: no near-tie codes
    batches = centres[torch.randint(0, 6, (3, 4, 10), generator=gen)].transpose(-1, -2)
    batches = batches + 0.3 * torch.randn(batches.shape, generator=gen)  # (steps, B=4, D=8, T=10)
    torch.multiprocessing.spawn(_quantizer_worker, args=(2, str(tmp_path / "init"), batches, str(tmp_path)),
                                nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank_{r}.pt", weights_only=True) for r in range(2)]
    whole, whole_codes = _train_quantizer(batches, 0, slice(None))
    alone, _ = _train_quantizer(batches, 0, slice(0, 2))
    no_replacement, _ = _train_quantizer(batches, 0, slice(None), dead_code_threshold=0.0)

    for key in whole:  # every process holds the same codebooks...
        assert torch.equal(parts[0]["state"][key], parts[1]["state"][key]), key
    assert_close_weights(parts[0]["state"], whole)  # ...those of one process given both halves
    for step in range(3):
        assert torch.equal(torch.cat([parts[0]["codes"][step], parts[1]["codes"][step]]), whole_codes[step])
    # The comparison has teeth: k-means, dead-code replacement and EMA all ran, and half the data
    # (what each process had without synchronisation) gives other codebooks.
    embeds = [key for key in whole if key.endswith(".embed")]
    assert all(whole[f"vq.layers.{i}._codebook.inited"].item() == 1 for i in range(3))
    assert any(not torch.allclose(whole[key], no_replacement[key], atol=1e-3) for key in embeds)
    assert all(not torch.allclose(whole[key], alone[key], atol=1e-3) for key in embeds)
