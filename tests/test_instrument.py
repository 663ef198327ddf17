"""Lead-instrument conditioning (conditioning.instrument): parsing, the vocabulary, the conditioner,
the generator reading the prompt, saving/loading and fine-tuning with ``instrument``. Tiny models."""
from __future__ import annotations

import json

import pytest
import torch
from test_data import write_corpus
from test_finetune import config_for
from test_generator import build_tiny_generator

from conditioning import InstrumentConditioner, instrument_vocabulary, parse_instrument
from conditioning.instrument import lead_instrument
from conditioning.musical import caption_attributes
from inference import MusicGen
from inference.finetune import add_instrument, add_tempo_key, finetune
from lm.corpus import TrackMeta
from lm.run import FinetuneConfig
from lm.token_cache import CodecTokenizer, prepare_corpus

VOCAB = ("alto sax", "bass guitar", "flute", "harp", "piano", "sax", "violin")


# -- parsing and the vocabulary --------------------------------------------------------------------
@pytest.mark.parametrize("text, name", [
    ("instrumental tune led by flute; upbeat, at 100 bpm, in C major", "flute"),
    ("An ALTO SAX lead over piano and bass guitar", "alto sax"),  # the longest name at the first mention
    ("alto  sax, smooth", "alto sax"),  # spacing does not matter
    ("a harpsichord minuet with a harmonica", None),  # whole words only: not "harp"
    ("piano-led ballad, violin later", "piano"),
    ("drums and synth", None),
    ("", None),
    (None, None),
])
def test_parse_instrument_finds_the_first_named(text, name):
    assert parse_instrument(text, VOCAB) == name


def test_the_lead_is_the_first_listed_instrument_and_rare_ones_are_left_out():
    metas = [TrackMeta.from_dict({"instrument": names}) for names in
             (["Flute", "piano"], ["flute"], "piano, bass guitar", ["violin"], [], None)]
    assert [lead_instrument(m) for m in metas] == ["flute", "flute", "piano", "violin", None, None]
    assert instrument_vocabulary(metas) == ("flute", "piano", "violin")
    assert instrument_vocabulary(metas, min_items=2) == ("flute",)


@pytest.mark.parametrize("vocabulary, message", [([], "1-64 characters"), (["flute", " "], "1-64 characters"),
                                                 (["flute", "Flute"], "repeats")])
def test_a_bad_vocabulary_is_refused(vocabulary, message):
    with pytest.raises(ValueError, match=message):
        InstrumentConditioner(dim=4, vocabulary=vocabulary)


def test_the_conditioner_starts_at_zero_and_unknown_names_are_null():
    conditioner = InstrumentConditioner(dim=4, vocabulary=VOCAB)
    with torch.no_grad():
        conditioner.embedding.weight.copy_(torch.arange(28.0).view(7, 4) + 1)
    condition = conditioner.encode(["Flute", None, "tuba", "piano"])
    assert condition.embeddings.shape == (4, 1, 4) and condition.mask.tolist() == [[1], [0], [0], [1]]
    assert torch.equal(condition.embeddings[0, 0], conditioner.embedding.weight[VOCAB.index("flute")])
    assert condition.embeddings[1:3].abs().sum() == 0
    fresh = InstrumentConditioner(dim=4, vocabulary=VOCAB)
    assert fresh.encode(["flute"]).embeddings.abs().sum() == 0


# -- the generator ---------------------------------------------------------------------------------
def instrument_generator(seed: int = 3, tempo_key: bool = True) -> MusicGen:
    generator = build_tiny_generator(seed=seed)
    if tempo_key:
        add_tempo_key(generator)
    add_instrument(generator, VOCAB)
    return generator


def test_an_added_instrument_conditioner_leaves_the_output_unchanged_until_trained():
    base, added = build_tiny_generator(seed=3), instrument_generator(seed=3, tempo_key=False)
    assert added.fuser.config.sum == ("instrument",)
    prompt = "calm flute tune"
    assert torch.equal(base.generate(prompt, 0.1, seed=1).wav, added.generate(prompt, 0.1, seed=1).wav)
    both = instrument_generator(seed=3, tempo_key=False)
    add_tempo_key(both)  # tempo and key can come after the instrument
    assert both.fuser.config.sum == ("bpm", "key", "instrument")
    with pytest.raises(ValueError, match="already sums"):
        add_tempo_key(build_generator_with_key_only())


def build_generator_with_key_only() -> MusicGen:
    from dataclasses import replace

    from conditioning import ConditionFuser, KeyConditioner
    generator = build_tiny_generator(seed=3)
    generator.condition_provider.conditioners["key"] = KeyConditioner(dim=generator.lm.config.dim)
    generator.fuser = ConditionFuser(replace(generator.fuser.config, sum=("key",)))
    return generator


def test_the_prompt_s_instrument_changes_the_generation_and_survives_saving(tmp_path):
    generator = instrument_generator()
    prompts = ("happy tune led by flute at 120 bpm", "happy tune led by violin at 120 bpm",
               "happy tune led by kazoo at 120 bpm", "happy tune at 120 bpm")
    untrained = {text: generator.generate(text, 0.2, seed=1, return_tokens=True, use_sampling=False).tokens
                 for text in prompts}
    with torch.no_grad():
        generator.condition_provider.conditioners["instrument"].embedding.weight.normal_(0, 2.0)
    tokens = {text: generator.generate(text, 0.2, seed=1, return_tokens=True, use_sampling=False).tokens
              for text in prompts}
    assert not torch.equal(tokens[prompts[0]], untrained[prompts[0]])
    assert not torch.equal(tokens[prompts[0]], tokens[prompts[1]])
    for text in prompts[2:]:  # an unknown instrument or none: the null condition, whatever the embeddings
        assert torch.equal(tokens[text], untrained[text])
    assert caption_attributes(list(prompts), generator.condition_provider)["instrument"] == [
        "flute", "violin", None, None]
    generator.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["conditioners"]["instrument"] == {"kind": "instrument", "dim": generator.lm.config.dim,
                                                    "vocabulary": list(VOCAB)}
    loaded = MusicGen.from_pretrained(tmp_path / "model", device="cpu")
    for text, codes in tokens.items():
        assert torch.equal(loaded.generate(text, 0.2, seed=1, return_tokens=True, use_sampling=False).tokens, codes)


@pytest.mark.parametrize("spec", [{"kind": "instrument", "dim": 8, "vocabulary": "flute"},
                                  {"kind": "instrument", "dim": 8, "vocabulary": []},
                                  {"kind": "instrument", "dim": 8}])
def test_a_folder_with_a_bad_instrument_spec_is_refused_clearly(tmp_path, spec):
    from codec.formats import CheckpointError
    instrument_generator().save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["conditioners"]["instrument"] = spec
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="conditioner 'instrument'"):
        MusicGen.from_pretrained(tmp_path / "model", device="cpu")


# -- fine-tuning -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def instrument_setup(tmp_path_factory):
    """A tiny base and a cache whose json captions name a lead instrument (flute or piano)."""
    root = tmp_path_factory.mktemp("instrument")
    generator = build_tiny_generator(seed=3)
    generator.save_pretrained(root / "base")
    corpus = write_corpus(root / "corpus", count=8, bad=False)
    for i, path in enumerate(sorted(corpus.glob("*.json"))):
        data = json.loads(path.read_text())
        data["instrument"] = ["flute", "piano"] if i % 2 else ["piano"]
        path.write_text(json.dumps(data))
    prepare_corpus(corpus, root / "cache", CodecTokenizer(generator.codec), segment_seconds=0.25,
                   model_spec=str(root / "base"))
    return root / "base", root / "cache"


def test_finetune_with_instrument_learns_the_corpus_leads(instrument_setup, tmp_path):
    out = tmp_path / "run"
    finetune(config_for(instrument_setup, out, instrument=True, instrument_min_items=2, tempo_key=True, ema=False,
                        sample_every=0, valid_fraction=0.0, eval_every=0))
    generator = MusicGen.from_pretrained(out / "model", device="cpu")
    assert generator.fuser.config.sum == ("bpm", "key", "instrument")
    conditioner = generator.condition_provider.conditioners["instrument"]
    assert conditioner.vocabulary == ("flute", "piano")
    assert (conditioner.embedding.weight.abs().sum(-1) > 0).all()  # both were trained
    assert generator.generate("calm flute at 120 bpm", 0.05, seed=0).wav.shape == (1, 1, 40)


def test_finetune_refuses_instrument_without_instrument_metadata(tmp_path):
    generator = build_tiny_generator(seed=3)
    with pytest.raises(ValueError, match="no instrument is named as the lead"):
        add_instrument(generator, ())
    with pytest.raises(ValueError, match="instrument_min_items"):
        FinetuneConfig(data="d", out="o", model="m", instrument=True, instrument_min_items=0)
    with pytest.raises(ValueError, match="LoRA"):
        FinetuneConfig(data="d", out="o", model="m", instrument=True, lora=4)


def test_cli_finetune_instrument_then_generate(instrument_setup, tmp_path, capsys):
    from inference.cli import main
    base, cache = instrument_setup
    run = tmp_path / "run"
    assert main(["finetune", "--model", str(base), "--data", str(cache), "--out", str(run), "--steps", "2",
                 "--batch-size", "2", "--eval-every", "0", "--instrument", "--instrument-min-items", "9", "-q"]) == 1
    assert "no instrument is named as the lead" in capsys.readouterr().err
    assert main(["finetune", "--model", str(base), "--data", str(cache), "--out", str(tmp_path / "run2"),
                 "--steps", "2", "--batch-size", "2", "--eval-every", "0", "--instrument",
                 "--instrument-min-items", "2", "-q"]) == 0
    generator = MusicGen.from_pretrained(tmp_path / "run2" / "model", device="cpu")
    assert generator.fuser.config.sum == ("instrument",)
    out = tmp_path / "song.wav"
    assert main(["generate", "calm piano", "-o", str(out), "--model", str(tmp_path / "run2" / "model"),
                 "--duration", "0.05", "--seed", "0", "-q"]) == 0
    assert out.is_file()


def test_the_readme_block_runs(capsys):
    from test_readme_examples import blocks
    (block,) = blocks("The lead instrument: an instrument embedding", "python")
    exec(block, {})
    assert capsys.readouterr().out.strip() == "alto sax"
