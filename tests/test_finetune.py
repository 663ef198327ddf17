"""LM fine-tuning (lm.finetune) and the prepare / finetune CLI, on CPU with tiny models.

The base is test_generator's tiny generator (2-layer LM over 4 codebooks of 16 codes, a random
800 Hz codec, a lookup-table or tiny-T5 text conditioner); the corpus is test_data's synthetic
one. Runs take a few steps of a few milliseconds each.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from t5_fixture import tiny_t5_folder  # noqa: F401  (fixture)
from test_data import CAPTIONS, write_corpus
from test_generator import build_tiny_generator

from inference import MusicGen
from inference.cli import main
from inference.finetune import finetune
from lm import finetune as ft
from lm.run import FinetuneConfig, list_checkpoints
from lm.token_cache import CodecTokenizer, TokenCache, encode_text_states, prepare_corpus
from lm.training import (ConditionedLM, codebook_cross_entropy, cosine_schedule, set_gradient_checkpointing,
                         start_weights)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base generator folder, token cache folder) shared by the module's tests."""
    root = tmp_path_factory.mktemp("finetune")
    generator = build_tiny_generator(seed=3)
    generator.save_pretrained(root / "base")
    prepare_corpus(write_corpus(root / "corpus"), root / "cache", CodecTokenizer(generator.codec),
                   segment_seconds=0.25, model_spec=str(root / "base"))
    return root / "base", root / "cache"


def conditioned(generator: MusicGen) -> ConditionedLM:
    return ConditionedLM(lm=generator.lm, condition_provider=generator.condition_provider, fuser=generator.fuser,
                         mask_condition_padding=generator.config.mask_condition_padding)


# -- pieces ---------------------------------------------------------------------------------------------

def test_loss_is_the_mean_over_codebooks_of_the_masked_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 7, requires_grad=True)
    codes = torch.randint(0, 7, (2, 3, 5))
    mask = torch.rand(2, 3, 5) > 0.3
    mask[:, 2] = False  # a codebook with nothing to predict is left out of the mean
    masked = logits.masked_fill(~mask[..., None], float("nan"))  # invalid logits are NaN (as the LM gives)
    loss, sums, counts = codebook_cross_entropy(masked, codes, mask)
    expected = [torch.nn.functional.cross_entropy(logits[:, k][mask[:, k]], codes[:, k][mask[:, k]]) for k in (0, 1)]
    assert torch.allclose(loss, torch.stack(expected).mean())
    assert counts.tolist() == [float(mask[:, k].sum()) for k in range(3)] and sums[2] == 0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[~mask] == 0).all()


def test_start_weights_weigh_a_window_s_first_frames():
    """The weighted loss is each codebook's weighted mean; sums and counts stay unweighted."""
    assert start_weights(8, 0.0, 10.0) is None
    weights = start_weights(6, 4.0, 2.0)
    assert torch.allclose(weights, 1 + 4 * torch.exp(-torch.arange(6.0) / 2))
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 6, 5)
    codes = torch.randint(0, 5, (3, 2, 6))
    mask = torch.rand(3, 2, 6) > 0.2
    plain, sums, counts = codebook_cross_entropy(logits, codes, mask)
    same, _, _ = codebook_cross_entropy(logits, codes, mask, torch.ones(6))
    weighted, wsums, wcounts = codebook_cross_entropy(logits, codes, mask, weights)
    assert torch.allclose(plain, same) and torch.equal(sums, wsums) and torch.equal(counts, wcounts)
    ce = torch.nn.functional.cross_entropy(logits.permute(0, 3, 1, 2), codes, reduction="none")  # (B, K, T)
    w = weights.expand(3, 2, 6) * mask
    expected = torch.stack([(ce[:, k] * w[:, k]).sum() / w[:, k].sum() for k in range(2)]).mean()
    assert torch.allclose(weighted, expected)
    assert not torch.allclose(weighted, plain)


def test_start_options_are_checked():
    with pytest.raises(ValueError, match="start_fraction"):
        FinetuneConfig(data="d", out="o", model="m", start_fraction=2.0)
    with pytest.raises(ValueError, match="start_weight"):
        FinetuneConfig(data="d", out="o", model="m", start_weight=-1.0)
    with pytest.raises(ValueError, match="start_weight"):
        FinetuneConfig(data="d", out="o", model="m", start_weight=1.0, start_weight_frames=0.0)


def test_cosine_schedule():
    factor = cosine_schedule(warmup=4, total=14, min_ratio=0.1)
    assert [factor(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(9) == pytest.approx(0.55) and factor(14) == pytest.approx(0.1) and factor(100) == pytest.approx(0.1)
    values = [factor(i) for i in range(4, 15)]
    assert values == sorted(values, reverse=True)


def test_loss_decreases_on_a_fixed_batch(setup):
    """Overfitting one batch: the loss falls from about ln(16) to a fraction of it."""
    base, cache_dir = setup
    torch.manual_seed(0)
    generator = MusicGen.from_pretrained(base, device="cpu")
    cache = TokenCache(cache_dir)
    from lm.batches import SegmentBatches

    batch = SegmentBatches(cache, list(range(len(cache))), segment_frames=40, batch_size=4,
                           special_token=16).batch(0)
    model = conditioned(generator).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        logits, mask = model(batch.codes, captions=batch.captions)
        loss, _, _ = codebook_cross_entropy(logits, batch.codes, mask & batch.frame_mask[:, None])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 2.0 and losses[-1] < 0.1 * losses[0], losses[::10]


def test_gradient_checkpointing_gives_the_same_gradients(setup):
    base, cache_dir = setup
    cache = TokenCache(cache_dir)
    codes = torch.from_numpy(np.asarray(cache.tokens(0)[:, :30], np.int64))[None].repeat(2, 1, 1)
    grads = []
    for enabled in (False, True):
        generator = MusicGen.from_pretrained(base, device="cpu")
        model = conditioned(generator).train()
        set_gradient_checkpointing(generator.lm, enabled)
        logits, mask = model(codes, captions=["happy rock", None])
        codebook_cross_entropy(logits, codes, mask)[0].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        assert torch.allclose(plain, checkpointed, atol=1e-6)
    set_gradient_checkpointing(generator.lm, False)
    assert "forward" not in vars(generator.lm.transformer.layers[0])


# -- runs ----------------------------------------------------------------------------------------------

def config_for(setup, out: Path, **overrides) -> FinetuneConfig:
    """A run exercising every piece of state: accumulation, EMA, all dropouts, augmentation,
    validation and samples in between, pruned checkpoints."""
    base, cache = setup
    settings = dict(model=str(base), data=str(cache), out=str(out), steps=6, batch_size=2, grad_accum=2, lr=3e-3,
                    warmup=2, ema=True, ema_every=1, cfg_dropout=0.5, word_dropout=0.3, merge_text_p=0.5,
                    valid_fraction=0.2, eval_every=3, sample_every=3, sample_seconds=0.05, save_every=2, keep_last=2,
                    log_every=1, seed=5)
    return FinetuneConfig(**{**settings, **overrides})


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_run(a: Path, b: Path) -> None:
    """Bitwise equal results: exported weights, last checkpoint's weights, EMA and optimizer state."""
    assert weights(a / "model").keys() == weights(b / "model").keys()
    for key, value in weights(a / "model").items():
        assert torch.equal(value, weights(b / "model")[key]), key
    (_, last_a), (_, last_b) = list_checkpoints(a)[-1], list_checkpoints(b)[-1]
    for name in ("model.safetensors", "ema.safetensors"):
        x, y = load_file(str(last_a / name)), load_file(str(last_b / name))
        assert all(torch.equal(x[k], y[k]) for k in x), name
    opt_a = torch.load(last_a / "optimizer.pt", weights_only=True)["state"]
    opt_b = torch.load(last_b / "optimizer.pt", weights_only=True)["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "straight"
    result = finetune(config_for(setup, out))
    assert result.step == 6 and result.model_dir == out / "model"
    return out


def test_uninterrupted_run_layout(uninterrupted):
    out = uninterrupted
    assert [step for step, _ in list_checkpoints(out)] == [4, 6]  # keep_last=2
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_00000003", "step_00000006"]
    assert (out / "samples" / "step_00000003" / "sample_0.wav").is_file()
    records = [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    valid = [r for r in records if "valid/loss" in r]
    assert [r["step"] for r in valid] == [3, 6] and all(f"valid/ppl_{k}" in valid[0] for k in range(4))
    # The result is a generator folder; the exported weights are the EMA ones.
    generator = MusicGen.from_pretrained(out / "model", device="cpu")
    ema = load_file(str(list_checkpoints(out)[-1][1] / "ema.safetensors"))
    assert torch.equal(generator.lm.linears[0].weight, ema["lm.linears.0.weight"])
    assert generator.generate("happy rock", 0.05, seed=0).wav.shape == (1, 1, 40)


def test_the_training_loop_takes_any_target_and_calls_back_for_the_generator_outputs(setup, tmp_path):
    """lm.finetune.train trains the modules a builder returns and leaves the whole-generator
    outputs (initial folder, samples, export) to that target: the seam inference.finetune uses."""
    from lm.finetune import BuildContext, train

    base, _ = setup
    generator = MusicGen.from_pretrained(base, device="cpu")
    before = generator.lm.linears[0].weight.detach().clone()
    calls: list[tuple] = []

    class Target:
        lm, condition_provider, fuser = generator.lm, generator.condition_provider, generator.fuser
        mask_condition_padding = generator.config.mask_condition_padding

        def start(self, out):
            calls.append(("start", out))

        def write_samples(self, folder, prompts, seconds, seed):
            calls.append(("samples", folder.name, len(prompts), seconds, seed))

        def export(self, folder, dtype):
            calls.append(("export", folder, dtype))

    contexts: list[BuildContext] = []
    config = config_for(setup, tmp_path / "run", steps=3, save_every=0, save_dtype="bfloat16")
    result = train(config, lambda context: contexts.append(context) or Target(),
                   export_to=tmp_path / "result")
    assert len(contexts) == 1 and not contexts[0].resuming and contexts[0].device.type == "cpu"
    samples = tmp_path / "run" / "samples" / "step_00000003"
    prompts = json.loads((samples / "prompts.json").read_text())["prompts"]
    assert calls == [("start", tmp_path / "run"), ("samples", "step_00000003", len(prompts), 0.05, 5),
                     ("export", tmp_path / "result", torch.bfloat16)]
    assert result.model_dir == tmp_path / "result" and result.step == 3
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [3]
    assert not torch.equal(generator.lm.linears[0].weight, before)


def test_resume_after_a_stop_is_bitwise_the_uninterrupted_run(setup, tmp_path, uninterrupted):
    out = tmp_path / "resumed"
    stopped = finetune(config_for(setup, out, stop_after=3))  # "killed" after step 3; last checkpoint: step 2
    assert stopped.step == 3 and stopped.model_dir is None and [s for s, _ in list_checkpoints(out)] == [2]
    result = finetune(config_for(setup, out), resume=True)  # redoes step 3 from checkpoint 2
    assert result.step == 6
    assert_same_run(uninterrupted, out)


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(setup, tmp_path, uninterrupted, monkeypatch):
    out = tmp_path / "crashed"
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if "step_00000004" in str(path):
            real_save(obj, path, *args, **kwargs)
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ft.torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        finetune(config_for(setup, out))
    monkeypatch.undo()
    assert (out / "checkpoints" / ".step_00000004.tmp").is_dir()  # the half-written one
    assert [s for s, _ in list_checkpoints(out)] == [2]
    finetune(config_for(setup, out), resume=True)
    assert_same_run(uninterrupted, out)
    assert not (out / "checkpoints" / ".step_00000004.tmp").exists()


def test_resume_refuses_other_settings_and_fresh_runs_refuse_an_used_folder(setup, tmp_path):
    out = tmp_path / "run"
    finetune(config_for(setup, out, steps=2, sample_every=0, eval_every=0))
    with pytest.raises(FileExistsError, match="--resume"):
        finetune(config_for(setup, out, steps=2))
    with pytest.raises(ValueError, match=r"lr: 0.003 -> 0.01"):
        finetune(config_for(setup, out, steps=2, lr=1e-2), resume=True)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        finetune(config_for(setup, tmp_path / "empty"), resume=True)


def test_a_cache_from_another_codec_is_refused(setup, tmp_path):
    base, _ = setup
    other = build_tiny_generator(seed=3, codec_seed=9)
    prepare_corpus(write_corpus(tmp_path / "corpus", 2, bad=False), tmp_path / "cache", CodecTokenizer(other.codec))
    with pytest.raises(ValueError, match="fingerprint"):
        finetune(FinetuneConfig(model=str(base), data=str(tmp_path / "cache"), out=str(tmp_path / "out"), steps=1))


def test_from_scratch_run_resumes_from_its_saved_base(setup, tmp_path):
    _, cache = setup
    out = tmp_path / "scratch"
    config = FinetuneConfig(from_scratch="tiny", data=str(cache), out=str(out), steps=4, batch_size=2, save_every=2,
                            eval_every=0, seed=1, stop_after=3)
    finetune(config)
    assert (out / "base" / "config.json").is_file()
    result = finetune(replace(config, stop_after=None), resume=True)
    generator = MusicGen.from_pretrained(result.model_dir, device="cpu")
    assert generator.lm.config.dim == 32 and generator.lm.config.num_codebooks == 4 and generator.lm.config.card == 16
    assert generator.max_duration == 0.25
    vocab = generator.condition_provider.conditioners["description"].tokenizer.index
    assert {"happy", "rock", "piano"} <= set(vocab)  # a lookup table over the corpus' caption words
    straight = finetune(replace(config, out=str(tmp_path / "straight"), stop_after=None))
    assert torch.equal(weights(result.model_dir)["linears.0.weight"], weights(straight.model_dir)["linears.0.weight"])


def test_cached_text_embeddings_match_the_live_text_encoder(tmp_path, tiny_t5_folder):  # noqa: F811
    generator = build_tiny_generator(seed=2, t5_folder=tiny_t5_folder)
    generator.save_pretrained(tmp_path / "base")
    text = generator.condition_provider.conditioners["description"]
    prepare_corpus(write_corpus(tmp_path / "corpus", 3, bad=False), tmp_path / "cache",
                   CodecTokenizer(generator.codec), segment_seconds=0.2, text_conditioner=text)
    cache = TokenCache(tmp_path / "cache")
    states = [cache.text_states(i) for i in range(3)]
    assert torch.equal(states[0], encode_text_states(text, CAPTIONS[0]))
    codes = torch.from_numpy(np.stack([np.asarray(cache.tokens(i)[:, :20], np.int64) for i in range(3)]))
    length = max(s.shape[0] for s in states)
    hidden = torch.zeros(3, length, states[0].shape[1])
    mask = torch.zeros(3, length, dtype=torch.long)
    for i, s in enumerate(states):
        hidden[i, :s.shape[0]], mask[i, :s.shape[0]] = s, 1
    model = conditioned(generator).eval()
    with torch.no_grad():
        live, _ = model(codes, captions=CAPTIONS[:3])
        cached, _ = model(codes, text_states=(hidden, mask))
    assert torch.allclose(live.nan_to_num(), cached.nan_to_num(), atol=1e-5)
    result = finetune(FinetuneConfig(model=str(tmp_path / "base"), data=str(tmp_path / "cache"),
                                     out=str(tmp_path / "run"), steps=2, batch_size=2, use_cached_text=True,
                                     eval_every=1, valid_fraction=0.3))
    assert math.isfinite(result.metrics["valid/loss"])
    exported = MusicGen.from_pretrained(result.model_dir, device="cpu")
    assert exported.condition_provider.conditioners["description"].word_dropout == text.word_dropout


# -- command line ---------------------------------------------------------------------------------------

def test_cli_prepare_finetune_generate(tmp_path, capsys):
    generator = build_tiny_generator(seed=4)
    generator.save_pretrained(tmp_path / "base")
    corpus = write_corpus(tmp_path / "corpus")
    cache, run = tmp_path / "cache", tmp_path / "run"
    assert main(["prepare", str(corpus), "--model", str(tmp_path / "base"), "--out", str(cache),
                 "--segment-seconds", "0.3", "-q"]) == 0
    assert main(["prepare", str(corpus), "--model", str(tmp_path / "base"), "--out", str(cache)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert main(["prepare", str(corpus), "--model", str(tmp_path / "base"), "--out", str(cache), "--force"]) == 0
    captured = capsys.readouterr()
    assert "prepared 6 file(s)" in captured.out and "skipped 5" in captured.out
    assert "unreadable.wav: unreadable" in captured.err and "short.wav: too short" in captured.err

    args = ["finetune", "--model", str(tmp_path / "base"), "--data", str(cache), "--out", str(run), "--steps", "4",
            "--batch-size", "2", "--save-every", "2", "--eval-every", "2", "--log-every", "2", "--lr", "2e-3",
            "--sample-every", "2", "--sample-prompt", "happy rock", "--sample-seconds", "0.05",
            "--start-fraction", "0.5", "--start-weight", "3", "--start-weight-frames", "4"]
    assert main(args + ["--stop-after", "2"]) == 0
    saved = json.loads((run / "run.json").read_text())
    saved = saved.get("config", saved)
    assert (saved["start_fraction"], saved["start_weight"], saved["start_weight_frames"]) == (0.5, 3.0, 4.0)
    assert "stopped after step 2" in capsys.readouterr().out
    assert main(["finetune", "--out", str(run), "--resume", "--lr", "1"]) == 1
    assert "cannot resume" in capsys.readouterr().err
    assert main(["finetune", "--out", str(run), "--resume"]) == 0
    assert f"-> {run / 'model'}" in capsys.readouterr().out
    assert json.loads((run / "samples" / "step_00000004" / "prompts.json").read_text())["prompts"] == ["happy rock"]

    out = tmp_path / "song.wav"
    assert main(["generate", "calm piano", "-o", str(out), "--model", str(run / "model"), "--duration", "0.05",
                 "--seed", "0", "-q"]) == 0
    assert out.is_file()
    assert main(["finetune", "--out", str(tmp_path / "other")]) == 1
    assert "--data is required" in capsys.readouterr().err


def test_cli_codec_only_cache_and_training_from_scratch(tmp_path, capsys):
    """prepare with a codec checkpoint (no generator), then a fresh LM with that codec."""
    from codec.formats import save_model
    from inference.cli import random_model
    from test_generator import CODEC

    save_model(random_model(CODEC, seed=5), tmp_path / "codec")
    corpus = write_corpus(tmp_path / "corpus", 3, bad=False)
    cache, run = tmp_path / "cache", tmp_path / "run"
    assert main(["prepare", str(corpus), "--model", str(tmp_path / "codec"), "--out", str(cache),
                 "--text-embeddings", "-q"]) == 1
    assert "needs a generator" in capsys.readouterr().err
    assert main(["prepare", str(corpus), "--model", str(tmp_path / "codec"), "--out", str(cache),
                 "--segment-seconds", "0.2", "--codebooks", "3", "-q"]) == 0
    assert main(["finetune", "--from-scratch", "tiny", "--data", str(cache), "--out", str(run), "--steps", "2",
                 "--batch-size", "2", "--eval-every", "0", "-q"]) == 0
    generator = MusicGen.from_pretrained(run / "model", device="cpu")
    assert generator.lm.config.num_codebooks == 3 and generator.codec.name == CODEC.name
    assert generator.generate("happy", 0.05, seed=0, return_tokens=True).tokens.shape == (1, 3, 10)
