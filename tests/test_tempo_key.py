"""Tempo and key conditioning (conditioning.musical): parsing, the beat clock, the LM's per-step input,
the generator's windows, saving/loading and fine-tuning with ``tempo_key``. Tiny models only."""
from __future__ import annotations

import json
import math

import pytest
import torch
from test_finetune import config_for, setup  # noqa: F401  (fixture)
from test_generator import build_tiny_generator

import conditioning.musical as musical
from conditioning import BeatConditioner, ConditionFuser, ConditionProvider, FuserConfig, KeyConditioner
from conditioning.musical import key_index, key_name, parse_key, parse_tempo, summed_input
from inference import MusicGen
from inference.finetune import add_tempo_key, finetune
from lm.model import LMModel, get_preset
from lm.run import FinetuneConfig


# -- parsing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, bpm", [
    ("a rock track with distortion guitar lead; lively, dark, G# minor at 124 bpm, played loud.", 124.0),
    ("A slow hip hop groove of jazz guitar, bass guitar and 808 drums, 74 BPM.", 74.0),
    ("upbeat, energetic at 111 beats per minute", 111.0),
    ("at 92.5 bpm", 92.5),
    ("a tune from 1999 at 5 bpm", None),  # out of range: not a tempo
    ("moderately paced, nostalgic", None),
    (None, None),
])
def test_parse_tempo(text, bpm):
    assert parse_tempo(text) == bpm


@pytest.mark.parametrize("text, key", [
    ("lively, dark, G# minor at 124 bpm", "Ab minor"),
    ("in the key of Eb major", "Eb major"),
    ("a F#min groove", "F# minor"),
    ("in Bb minor, slow", "Bb minor"),
    ("a minor change of plan", None),  # lower-case prose is not a key
    ("C dorian", None),
])
def test_parse_key(text, key):
    assert parse_key(text) == key


def test_key_names_from_metadata_and_indices():
    assert key_name("g# minor") == "Ab minor" and key_name("Eb MAJOR") == "Eb major"
    assert key_name("c major, a minor") is None and key_name("") is None
    assert key_index("C major") == 0 and key_index("c minor") == 1 and key_index("B minor") == 23
    with pytest.raises(ValueError, match="not a key"):
        key_index("H major")


# -- the conditioners ------------------------------------------------------------------------------
def test_the_beat_clock_has_the_stated_period_and_runs_on_from_the_window_start():
    beat = BeatConditioner(dim=8, frame_rate=50, harmonics=(1.0,))
    feats = beat.features(torch.tensor([120.0]), 60, torch.tensor([0]))  # 120 bpm at 50 Hz: 25 frames a beat
    assert torch.allclose(feats[0, 0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(feats[0, 25], feats[0, 0], atol=1e-6)
    assert torch.allclose(feats[0, 50], feats[0, 0], atol=1e-6) and feats[0, 12, 0] < -0.99  # half a beat
    later = beat.features(torch.tensor([120.0]), 20, torch.tensor([37]))
    assert torch.allclose(later[0], feats[0, 37:57], atol=1e-6)
    torch.nn.init.normal_(beat.output_proj.weight)
    cond = beat.encode([120.0, None], frames=10, start_frames=[0, 5])
    assert cond.embeddings.shape == (2, 10, 8) and cond.mask.tolist() == [[1] * 10, [0] * 10]
    assert cond.embeddings[1].abs().sum() == 0 and cond.embeddings[0].abs().sum() > 0
    with pytest.raises(ValueError, match="outside"):
        beat.encode([1000.0], frames=4)


def test_new_conditioners_start_at_zero_and_the_key_embedding_picks_the_key():
    key = KeyConditioner(dim=4)
    assert key.encode(["A minor"]).embeddings.abs().sum() == 0
    torch.nn.init.normal_(key.embedding.weight)
    cond = key.encode(["a minor", None, "C major"])
    assert cond.embeddings.shape == (3, 1, 4) and cond.mask[:, 0].tolist() == [1, 0, 1]
    assert torch.equal(cond.embeddings[0, 0], key.embedding.weight[key_index("A minor")])
    assert cond.embeddings[1].abs().sum() == 0


def test_summed_input_adds_the_clock_and_the_key_per_step():
    provider = ConditionProvider({"bpm": BeatConditioner(dim=6, frame_rate=50), "key": KeyConditioner(dim=6)})
    for p in provider.parameters():
        torch.nn.init.normal_(p)
    fuser = ConditionFuser(FuserConfig(cross=(), sum=("bpm", "key")))
    attributes = {"bpm": [100.0, None], "key": ["D major", "D major"]}
    total = summed_input(provider, fuser, attributes, steps=7, start_frames=3)
    beat = provider.conditioners["bpm"].encode([100.0, None], frames=7, start_frames=3).embeddings
    key = provider.conditioners["key"].encode(["D major"] * 2).embeddings
    assert total.shape == (2, 7, 6) and torch.allclose(total, beat + key)
    assert "bpm" not in provider({"key": ["D major"]})  # time-aligned: only with frames


# -- the LM ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("two_step", [False, True])
def test_decoding_with_a_frame_input_matches_the_teacher_forced_pass(fast, two_step):
    """Greedy codes: each step's argmax under the per-step input equals the full causal pass's."""
    torch.manual_seed(0)
    lm = LMModel(get_preset("tiny")).eval()
    frame_input = 3 * torch.randn(2, 40, 32)
    condition = torch.randn(2, 3, 32)
    codes = lm.generate(max_gen_len=12, num_samples=1, use_sampling=False, frame_input=frame_input,
                        condition=condition, cfg_coef=1.0, two_step_cfg=two_step, fast=fast)
    logits, mask = lm.compute_predictions(codes, condition=condition[:1], frame_input=frame_input[:1])
    assert torch.equal(logits.argmax(-1)[mask], codes[mask])
    plain = lm.generate(max_gen_len=12, num_samples=1, use_sampling=False, condition=condition, cfg_coef=1.0,
                        two_step_cfg=two_step, fast=fast)
    assert not torch.equal(plain, codes)  # the input is used
    with pytest.raises(ValueError, match="frame_input covers 5"):
        lm.generate(max_gen_len=12, num_samples=1, frame_input=frame_input[:, :5], condition=condition)


# -- the generator ---------------------------------------------------------------------------------
def tempo_key_generator(seed: int = 3) -> MusicGen:
    generator = build_tiny_generator(seed=seed)
    add_tempo_key(generator)
    return generator


def test_added_conditioners_leave_the_output_unchanged_until_trained():
    base, added = build_tiny_generator(seed=3), tempo_key_generator(seed=3)
    prompt = "happy rock at 120 bpm in A minor"
    assert added.fuser.config.sum == ("bpm", "key")
    assert torch.equal(base.generate(prompt, 0.1, seed=1).wav, added.generate(prompt, 0.1, seed=1).wav)


def test_the_prompt_s_tempo_and_key_change_the_generation_and_survive_saving(tmp_path):
    generator = tempo_key_generator()
    with torch.no_grad():
        for p in list(generator.condition_provider.conditioners["bpm"].parameters()) + \
                list(generator.condition_provider.conditioners["key"].parameters()):
            p.normal_(0, 2.0)
    tokens = {text: generator.generate(text, 0.2, seed=1, return_tokens=True, use_sampling=False).tokens
              for text in ("happy rock at 120 bpm in A minor", "happy rock at 70 bpm in A minor",
                           "happy rock at 120 bpm in C major")}
    assert len({tuple(t.flatten().tolist()) for t in tokens.values()}) == 3
    generator.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["conditioners"]["bpm"]["kind"] == "beat" and config["fuser"]["sum"] == ["bpm", "key"]
    loaded = MusicGen.from_pretrained(tmp_path / "model", device="cpu")
    for text, codes in tokens.items():
        assert torch.equal(loaded.generate(text, 0.2, seed=1, return_tokens=True, use_sampling=False).tokens, codes)


def test_each_sliding_window_starts_the_beat_clock_at_its_offset(monkeypatch):
    generator = tempo_key_generator()
    seen = []

    def spy(provider, fuser, attributes, *, steps, start_frames=0):
        seen.append((start_frames, steps, attributes["bpm"]))
        return summed_input(provider, fuser, attributes, steps=steps, start_frames=start_frames)

    monkeypatch.setattr("inference.generator.summed_input", spy)
    window = generator.num_frames(generator.max_duration)
    stride = generator._stride_frames(None)
    generator.generate("rock at 100 bpm", 2.5 * generator.max_duration, seed=0)
    assert [s for s, *_ in seen] == [i * stride for i in range(len(seen))] and len(seen) >= 3
    assert seen[0][1] >= window and seen[0][2] == [100.0, None]  # conditional row, then the guidance row


# -- fine-tuning -----------------------------------------------------------------------------------
def test_finetune_with_tempo_key_trains_the_new_conditioners(setup, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    result = finetune(config_for(setup, out, tempo_key=True, ema=False, sample_every=0))
    assert result.step == 6
    generator = MusicGen.from_pretrained(out / "model", device="cpu")
    assert generator.fuser.config.sum == ("bpm", "key")
    beat = generator.condition_provider.conditioners["bpm"].output_proj.weight
    key = generator.condition_provider.conditioners["key"].embedding.weight
    assert beat.abs().sum() > 0  # the cache's json captions carry bpm 121-125 and C major
    assert key[key_index("C major")].abs().sum() > 0 and key[key_index("D major")].abs().sum() == 0
    assert generator.generate("calm rock at 120 bpm in C major", 0.05, seed=0).wav.shape == (1, 1, 40)


def test_tempo_key_options_are_checked():
    with pytest.raises(ValueError, match="tempo_key_dropout"):
        FinetuneConfig(data="d", out="o", model="m", tempo_key=True, tempo_key_dropout=1.5)
    with pytest.raises(ValueError, match="LoRA"):
        FinetuneConfig(data="d", out="o", model="m", tempo_key=True, lora=4)


def test_the_beat_phase_is_exact_over_an_hour():
    beat = BeatConditioner(dim=2, frame_rate=50, harmonics=(1.0,))
    hour = 3600 * 50
    feats = beat.features(torch.tensor([123.0]), 1, torch.tensor([hour]))
    phase = (hour / 50 * 123 / 60) % 1.0
    assert torch.allclose(feats[0, 0], torch.tensor([math.cos(2 * math.pi * phase), math.sin(2 * math.pi * phase)]),
                          atol=1e-5)
    assert musical.MAX_BPM > 200


def test_the_readme_block_runs(capsys):
    from test_readme_examples import blocks
    (block,) = blocks("Tempo and key: a beat clock and a key embedding", "python")
    exec(block, {})
    assert capsys.readouterr().out.strip() == "132.0 Bb minor"


@pytest.mark.parametrize("spec", [{"kind": "beat", "dim": 8, "frame_rate": -50, "harmonics": [1]},
                                  {"kind": "beat", "dim": 8, "frame_rate": 50, "harmonics": 3},
                                  {"kind": "key", "dim": "wide"}, {"kind": "key"}])
def test_a_folder_with_bad_tempo_or_key_settings_is_refused_clearly(tmp_path, spec):
    from codec.formats import CheckpointError
    generator = tempo_key_generator()
    generator.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["conditioners"][spec["kind"] if spec["kind"] == "key" else "bpm"] = spec
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="conditioner '(bpm|key)'"):
        MusicGen.from_pretrained(tmp_path / "model", device="cpu")
