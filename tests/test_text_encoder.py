"""A T5 text encoder built from corpus captions and trained with the LM (conditioning.t5_builder,
finetune --train-text-encoder), and the self-contained generator folder it is exported to.

The corpus: 30 synthetic captions (mood, genre, two instruments; some with .json metadata) on
half-second noise clips at the tiny test codec's 800 Hz. The T5 is tiny (d_model 16, 1 block),
the LM the "tiny" preset; runs take a few steps of a few milliseconds each.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_finetune import assert_same_run, conditioned
from test_generator import CODEC, SR

from codec.formats import save_model
from conditioning import T5Conditioner
from conditioning.t5_builder import TextEncoderSpec, build_text_encoder, train_sentencepiece
from inference import MusicGen
from inference.cli import main, random_model
from inference.finetune import finetune
from inference.formats import save_generator
from lm.batches import SegmentBatches
from lm.run import FinetuneConfig, list_checkpoints
from lm.token_cache import CodecTokenizer, TokenCache, caption_texts, prepare_corpus
from lm.training import codebook_cross_entropy

ROOT = Path(__file__).resolve().parents[1]
MOODS = ("happy", "calm", "dark", "upbeat", "dreamy", "sad")
GENRES = ("rock", "jazz", "techno", "folk", "ambient")
INSTRUMENTS = ("piano", "guitar", "drums", "synth", "strings")
CAPTIONS = [f"{MOODS[i % 6]} {GENRES[i % 5]} with {INSTRUMENTS[(2 * i) % 5]} and {INSTRUMENTS[(3 * i + 1) % 5]}"
            for i in range(30)]
TINY = TextEncoderSpec(vocab_size=200, d_model=16, num_layers=1, num_heads=2, d_ff=32,
                       relative_attention_num_buckets=8, relative_attention_max_distance=16, seed=1)


def write_captioned_corpus(folder: Path) -> Path:
    """30 clips of 0.5 s; every third one has .json metadata (genre, bpm) instead of a .txt."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, text in enumerate(CAPTIONS):
        t = np.arange(SR // 2) / SR
        wav = 0.3 * np.sin(2 * np.pi * (30 + 9 * i) * t) + 0.1 * rng.standard_normal(t.size)
        sf.write(folder / f"clip{i:02d}.wav", wav.astype(np.float32), SR)
        if i % 3:
            (folder / f"clip{i:02d}.txt").write_text(text, encoding="utf-8")
        else:
            (folder / f"clip{i:02d}.json").write_text(json.dumps(
                {"description": text, "genre": GENRES[i % 5], "bpm": 90 + i}), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Corpus, codec folder, token cache (0.25 s windows) and a tiny caption-built T5 folder."""
    root = tmp_path_factory.mktemp("text_encoder")
    corpus = write_captioned_corpus(root / "corpus")
    codec = random_model(CODEC, seed=5)
    save_model(codec, root / "codec")
    prepare_corpus(corpus, root / "cache", CodecTokenizer(codec), segment_seconds=0.25, min_seconds=0.3,
                   model_spec=str(root / "codec"))
    build_text_encoder(caption_texts(corpus), root / "t5", TINY)
    return {"root": root, "corpus": corpus, "codec": root / "codec", "cache": root / "cache", "t5": root / "t5"}


# -- the vocabulary and the folder ------------------------------------------------------------------

def test_sentencepiece_vocabulary_has_t5_ids_and_transformers_tokenizes_like_sentencepiece(corpus, tmp_path):
    from transformers import T5Tokenizer

    model = train_sentencepiece(CAPTIONS, vocab_size=200)
    assert model == train_sentencepiece(CAPTIONS, vocab_size=200)  # deterministic
    sp = spm.SentencePieceProcessor(model_proto=model)
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]

    folder = corpus["t5"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "spiece.model",
                                                       "tokenizer.json", "tokenizer_config.json"]
    built = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    only_spiece = tmp_path / "only_spiece"  # the sentencepiece model alone is enough for transformers
    only_spiece.mkdir()
    shutil.copy(folder / "spiece.model", only_spiece)
    shutil.copy(folder / "tokenizer_config.json", only_spiece)
    prompts = [*CAPTIONS, "Happy ROCK with Drums", "zither quartet 120 bpm!", ""]
    for tokenizer in (T5Tokenizer.from_pretrained(str(folder)), T5Tokenizer.from_pretrained(str(only_spiece))):
        assert len(tokenizer) == built.get_piece_size()  # no <extra_id_N> sentinels
        assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
        for prompt in prompts:
            assert tokenizer(prompt)["input_ids"] == built.encode(prompt) + [1], prompt
    assert built.encode("Happy ROCK with Drums") == built.encode("happy rock with drums")  # case folded
    assert 2 in built.encode("zither quartet")  # unseen letters are <unk>, not dropped
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == built.get_piece_size() <= 200
    assert (config["d_model"], config["num_layers"], config["num_heads"], config["d_kv"], config["d_ff"]) == \
        (16, 1, 2, 8, 32)


def test_the_built_folder_is_a_t5_the_conditioner_loads_and_is_reproducible(corpus, tmp_path):
    text = T5Conditioner.from_pretrained(corpus["t5"], output_dim=32)
    condition = text.encode(["dark techno with synth", None])
    assert condition.embeddings.shape[0] == 2 and condition.embeddings.shape[2] == 32
    assert condition.mask[1].sum() == 0 and condition.mask[0].sum() > 0
    again = build_text_encoder(caption_texts(corpus["corpus"]), tmp_path / "again", TINY)
    assert again.num_parameters == sum(p.numel() for p in text.encoder.parameters())
    a, b = load_file(str(corpus["t5"] / "model.safetensors")), load_file(str(again.folder / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = build_text_encoder(CAPTIONS, tmp_path / "other", replace(TINY, seed=2))
    assert not torch.equal(load_file(str(other.folder / "model.safetensors"))["shared.weight"], a["shared.weight"])
    with pytest.raises(FileExistsError):
        build_text_encoder(CAPTIONS, tmp_path / "other", TINY)


def test_bad_specs_and_captions_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="multiple of num_heads"):
        TextEncoderSpec(d_model=10, num_heads=4)
    with pytest.raises(ValueError, match="feed_forward_proj"):
        TextEncoderSpec(feed_forward_proj="swiglu")
    with pytest.raises(ValueError, match="12-piece vocabulary.*Vocabulary size is smaller than required_chars"):
        train_sentencepiece(CAPTIONS, vocab_size=12)
    with pytest.raises(ValueError, match="at least one non-empty caption"):
        train_sentencepiece(["", "  "], vocab_size=100)
    (tmp_path / "silent").mkdir()
    sf.write(tmp_path / "silent" / "a.wav", np.zeros(SR, np.float32), SR)
    with pytest.raises(ValueError, match="found none"):
        caption_texts(tmp_path / "silent")


def test_caption_texts_from_a_folder_a_manifest_and_a_cache(corpus, tmp_path):
    texts = caption_texts(corpus["corpus"])
    assert texts[:3] == [CAPTIONS[0], "bpm: 90. genre: rock", CAPTIONS[1]]  # description, then merged metadata
    assert len(texts) == 40
    manifest = tmp_path / "corpus.jsonl"
    manifest.write_text(json.dumps({"path": str(corpus["corpus"] / "clip01.wav"), "description": "calm jazz",
                                    "moods": ["calm"]}) + "\n", encoding="utf-8")
    assert caption_texts(manifest) == ["calm jazz", "moods: calm"]
    assert caption_texts(corpus["cache"]) == texts


def test_set_finetune_and_a_half_size_save(corpus, tmp_path):
    text = T5Conditioner.from_pretrained(corpus["t5"], output_dim=32)
    assert not any(".t5." in f".{k}" for k in text.state_dict()) and len(list(text.parameters())) == 2
    text.set_finetune(True)
    assert text.finetune and any(k.startswith("t5.") for k in text.state_dict())
    assert all(p.requires_grad for p in text.parameters()) and text.encoder.training
    text.eval()
    assert not text.encoder.training
    text.set_finetune(False)
    assert not text.finetune and "t5" not in dict(text.named_children()) and len(list(text.parameters())) == 2
    assert not any(p.requires_grad for p in text.encoder.parameters())

    half = text.save_pretrained(tmp_path / "half", dtype=torch.bfloat16)
    full = corpus["t5"] / "model.safetensors"
    with safe_open(str(half / "model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
        assert handle.get_tensor("shared.weight").dtype == torch.bfloat16
    assert "encoder.embed_tokens.weight" not in keys  # the tied embedding is stored once
    assert (half / "model.safetensors").stat().st_size < 0.6 * full.stat().st_size
    assert (half / "spiece.model").read_bytes() == (corpus["t5"] / "spiece.model").read_bytes()
    loaded = T5Conditioner.from_pretrained(half, output_dim=32)
    assert loaded.encoder.dtype == torch.float32
    assert torch.equal(loaded.encoder.shared.weight, text.encoder.shared.weight.bfloat16().float())
    assert loaded.encoder.encoder.embed_tokens.weight is loaded.encoder.shared.weight


# -- joint training --------------------------------------------------------------------------------

def run_config(corpus, out: Path, **overrides) -> FinetuneConfig:
    settings = dict(from_scratch="tiny", t5=str(corpus["t5"]), train_text_encoder=True, data=str(corpus["cache"]),
                    out=str(out), steps=16, batch_size=4, lr=1e-2, warmup=1, weight_decay=0.0, eval_every=0,
                    save_every=8, log_every=1, seed=0)
    return FinetuneConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def trained(corpus) -> Path:
    out = corpus["root"] / "joint"
    result = finetune(run_config(corpus, out))
    assert result.step == 16 and result.model_dir == out / "model"
    return out


def fixed_batch_loss(generator: MusicGen, cache_dir: Path) -> float:
    cache = TokenCache(cache_dir)
    batch = SegmentBatches(cache, list(range(len(cache))), segment_frames=50, batch_size=8,
                           special_token=generator.lm.special_token_id).batch(0)
    model = conditioned(generator).eval()
    with torch.no_grad():
        logits, mask = model(batch.codes, captions=batch.captions)
        return codebook_cross_entropy(logits, batch.codes, mask & batch.frame_mask[:, None])[0].item()


def test_joint_training_changes_the_text_encoder_and_lowers_the_loss(corpus, trained):
    before = MusicGen.from_pretrained(trained / "base", device="cpu")  # the initial weights
    after = MusicGen.from_pretrained(trained / "model", device="cpu")
    text = after.condition_provider.conditioners["description"]
    assert isinstance(text, T5Conditioner) and text.finetune
    initial = load_file(str(corpus["t5"] / "model.safetensors"))
    exported = load_file(str(trained / "model" / "t5" / "model.safetensors"))
    assert initial.keys() == exported.keys()
    # weight_decay=0: every change comes from gradients of the LM loss, norms included.
    changed = [k for k in initial if not torch.equal(initial[k], exported[k])]
    assert set(changed) == set(initial), sorted(set(initial) - set(changed))
    for key, value in exported.items():
        assert torch.equal(text.encoder.state_dict()[key], value)
    start, end = fixed_batch_loss(before, corpus["cache"]), fixed_batch_loss(after, corpus["cache"])
    assert end < 0.9 * start, (start, end)
    checkpoint = load_file(str(list_checkpoints(trained)[-1][1] / "model.safetensors"))
    prefix = "condition_provider.conditioners.description.t5."
    assert torch.equal(checkpoint[prefix + "shared.weight"], checkpoint[prefix + "encoder.embed_tokens.weight"])
    assert torch.equal(checkpoint[prefix + "shared.weight"], exported["shared.weight"])


def test_a_frozen_text_encoder_stays_as_built(corpus, tmp_path):
    result = finetune(run_config(corpus, tmp_path / "frozen", train_text_encoder=False, steps=2, save_every=2))
    exported = load_file(str(result.model_dir / "t5" / "model.safetensors"))
    initial = load_file(str(corpus["t5"] / "model.safetensors"))
    assert all(torch.equal(initial[k], exported[k]) for k in initial)
    checkpoint = load_file(str(list_checkpoints(result.out)[-1][1] / "model.safetensors"))
    assert not any(".t5." in k for k in checkpoint)


def test_the_flag_decides_for_a_base_model_whatever_its_spec_says(corpus, trained, tmp_path):
    """The exported model's T5 spec says finetune; as a base, only --train-text-encoder trains it."""
    base = trained / "model"
    assert json.loads((base / "config.json").read_text())["conditioners"]["description"]["finetune"]
    before = load_file(str(base / "t5" / "model.safetensors"))
    for train in (True, False):
        result = finetune(FinetuneConfig(model=str(base), data=str(corpus["cache"]), out=str(tmp_path / f"{train}"),
                                         steps=2, batch_size=2, lr=1e-2, warmup=1, weight_decay=0.0, eval_every=0,
                                         train_text_encoder=train))
        after = load_file(str(result.model_dir / "t5" / "model.safetensors"))
        assert all(torch.equal(before[k], after[k]) for k in before) != train
        spec = json.loads((result.model_dir / "config.json").read_text())["conditioners"]["description"]
        assert spec["finetune"] == train


def test_resume_with_the_text_encoder_trained_is_bitwise_the_uninterrupted_run(corpus, tmp_path):
    config = dict(steps=6, batch_size=2, grad_accum=2, ema=True, ema_every=1, cfg_dropout=0.5, word_dropout=0.3,
                  merge_text_p=0.5, valid_fraction=0.2, eval_every=3, save_every=2, keep_last=2,
                  text_encoder_lr_scale=0.5, weight_decay=0.1)
    straight = finetune(run_config(corpus, tmp_path / "straight", **config)).out
    out = tmp_path / "resumed"
    stopped = finetune(run_config(corpus, out, stop_after=3, **config))
    assert stopped.model_dir is None and [s for s, _ in list_checkpoints(out)] == [2]
    finetune(run_config(corpus, out, **config), resume=True)
    assert_same_run(straight, out)
    for run in (straight, out):
        last = list_checkpoints(run)[-1][1]
        assert any(".t5." in k for k in load_file(str(last / "model.safetensors")))
        assert any(".t5." in k for k in load_file(str(last / "ema.safetensors")))
        groups = torch.load(last / "optimizer.pt", weights_only=True)["param_groups"]
        assert len(groups) == 4 and groups[2]["lr"] == pytest.approx(0.5 * groups[0]["lr"])
    a, b = (load_file(str(run / "model" / "t5" / "model.safetensors")) for run in (straight, out))
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- the exported folder -----------------------------------------------------------------------------

GENERATE = """
import json, sys, torch
from inference import MusicGen
generator = MusicGen.from_pretrained(sys.argv[1], device="cpu")
out = generator.generate(["happy rock with piano", "calm jazz"], 1.0, seed=3, return_tokens=True)
print(json.dumps({"shape": list(out.wav.shape), "rate": out.sample_rate, "finite": bool(torch.isfinite(out.wav).all()),
                  "tokens": out.tokens.tolist()}))
"""


def test_the_exported_folder_is_self_contained(corpus, trained, tmp_path):
    """Only the exported folder is left (run, base, T5 source, codec removed); a fresh process with
    the hub offline loads it and generates the tokens this process generated before the move."""
    workspace = tmp_path / "workspace"
    for name in ("t5", "codec"):
        shutil.copytree(corpus[name], workspace / name)
    run = finetune(run_config(corpus, workspace / "run", t5=str(workspace / "t5"), codec=str(workspace / "codec"),
                              steps=2, save_every=0)).out
    expected = MusicGen.from_pretrained(run / "model", device="cpu").generate(
        ["happy rock with piano", "calm jazz"], 1.0, seed=3, return_tokens=True).tokens
    shipped = tmp_path / "shipped"
    shutil.move(str(run / "model"), str(shipped))
    shutil.rmtree(workspace)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", GENERATE, str(shipped)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shape"] == [2, 1, SR] and result["rate"] == SR and result["finite"]
    assert torch.equal(torch.tensor(result["tokens"]), expected)


def test_half_size_export_loads_as_float32(trained, tmp_path):
    generator = MusicGen.from_pretrained(trained / "model", device="cpu")
    half = save_generator(generator, tmp_path / "half", dtype=torch.bfloat16)
    size = {folder: {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
            for folder in (trained / "model", half)}
    for name in ("model.safetensors", "t5/model.safetensors"):
        assert size[half][name] < 0.6 * size[trained / "model"][name], name
    assert json.loads((half / "config.json").read_text())["weights_dtype"] == "bfloat16"
    loaded = MusicGen.from_pretrained(half, device="cpu")
    text = loaded.condition_provider.conditioners["description"]
    assert loaded.lm.linears[0].weight.dtype == torch.float32 and text.encoder.dtype == torch.float32
    assert torch.equal(loaded.lm.linears[0].weight, generator.lm.linears[0].weight.bfloat16().float())
    original = generator.condition_provider.conditioners["description"].encoder.shared.weight
    assert torch.equal(text.encoder.shared.weight, original.bfloat16().float())
    with pytest.raises(ValueError, match="dtype must be one of"):
        save_generator(generator, tmp_path / "int", dtype=torch.int8)
    # A float16 LM keeps its trained T5 in float32 (T5 overflows in float16); only the projection follows.
    fp16 = MusicGen.from_pretrained(half, device="cpu", dtype=torch.float16)
    text = fp16.condition_provider.conditioners["description"]
    assert fp16.lm.linears[0].weight.dtype == torch.float16 and text.output_proj.weight.dtype == torch.float16
    assert text.finetune and text.encoder.dtype == torch.float32


# -- command line ------------------------------------------------------------------------------------

def test_cli_make_text_encoder_and_joint_finetune(corpus, tmp_path, capsys):
    t5 = tmp_path / "t5"
    args = ["make-text-encoder", "--captions", str(corpus["corpus"]), "--out", str(t5), "--vocab-size", "300",
            "--d-model", "16", "--layers", "1", "--heads", "2", "--d-ff", "32", "--dropout", "0"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "40 caption text(s)" in printed and "(of 300 asked" in printed and str(t5) in printed
    assert main(args) == 1 and "non-empty folder" in capsys.readouterr().err
    assert json.loads((t5 / "config.json").read_text())["dropout_rate"] == 0

    run = tmp_path / "run"
    common = ["finetune", "--from-scratch", "tiny", "--data", str(corpus["cache"]), "--steps", "2",
              "--batch-size", "2", "--eval-every", "0", "-q"]
    assert main(common + ["--out", str(run), "--t5", str(t5), "--train-text-encoder", "--text-encoder-lr-scale",
                          "2", "--save-dtype", "bfloat16"]) == 0
    stored = json.loads((run / "run.json").read_text())["config"]
    assert stored["train_text_encoder"] and stored["text_encoder_lr_scale"] == 2 and stored["save_dtype"] == "bfloat16"
    with safe_open(str(run / "model" / "t5" / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor("shared.weight").dtype == torch.bfloat16
    assert MusicGen.from_pretrained(run / "model", device="cpu").generate("dark folk", 0.05, seed=0).wav.shape \
        == (1, 1, 40)

    assert main(common + ["--out", str(tmp_path / "lut"), "--train-text-encoder"]) == 1
    assert "needs a T5 text encoder" in capsys.readouterr().err
    assert main(common + ["--out", str(tmp_path / "cached"), "--t5", str(t5), "--train-text-encoder",
                          "--use-cached-text"]) == 1
    assert "cannot use cached text embeddings" in capsys.readouterr().err


# -- text-encoder pretraining before the LM (lm.text_pretrain) -------------------------------------------

def test_text_pretraining_runs_first_and_a_resumed_run_does_not_repeat_it(corpus, tmp_path, capsys):
    config = dict(steps=4, batch_size=2, save_every=2, ema=True, ema_every=1, weight_decay=0.0, merge_text_p=1.0,
                  drop_other_p=0.0,
                  text_pretrain_steps=12)
    plain = finetune(run_config(corpus, tmp_path / "plain", **{**config, "text_pretrain_steps": 0})).out
    straight = finetune(run_config(corpus, tmp_path / "straight", **config), progress=True).out
    assert "text pretraining 12/12" in capsys.readouterr().err
    a = load_file(str(plain / "model" / "t5" / "model.safetensors"))
    b = load_file(str(straight / "model" / "t5" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the pretraining moved the encoder
    out = tmp_path / "resumed"
    finetune(run_config(corpus, out, stop_after=2, **config))
    capsys.readouterr()
    finetune(run_config(corpus, out, **config), resume=True, progress=True)
    assert "text pretraining" not in capsys.readouterr().err  # its result is in the checkpoint
    assert_same_run(straight, out)


def test_text_pretraining_needs_a_trained_live_text_encoder(corpus, tmp_path):
    with pytest.raises(ValueError, match="add --train-text-encoder"):
        finetune(run_config(corpus, tmp_path / "frozen", train_text_encoder=False, text_pretrain_steps=2))
    with pytest.raises(ValueError, match="cached text"):
        run_config(corpus, tmp_path / "cached", train_text_encoder=False, use_cached_text=True, text_pretrain_steps=2)
