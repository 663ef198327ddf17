"""bench/continuation.py: the family read of continued held-out clips beside their round trips.

A synthetic two-family corpus of 6 s clips (as tests/test_quality.py's, longer, so that whole
2.5 s windows follow the prompt) and stand-in continuations: one that keeps the prompt's timbre,
one that turns every clip into the same family, one from a tiny random MusicGen (shapes, seeding).
"""
from __future__ import annotations

import json

import pytest
import torch
from test_quality import FAMILIES, follow_prompt, song, write_corpus

from bench import adherence, quality
from bench.continuation import continuation_report, continuation_table, musicgen_continue_fn, pick_clips

SECONDS = 6.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("continuation")
    write_corpus(root / "train", 12, seed=0, seconds=SECONDS)
    write_corpus(root / "valid", 6, seed=100, seconds=SECONDS)
    return root


def exact(wav, rate):
    return adherence.as_analysis_audio(wav, rate)


def keep_timbre(captions, prompts, rate, seed):
    """Continues each prompt in the family its caption names (the prompt kept, as MusicGen returns it)."""
    out = []
    for i, (caption, prompt) in enumerate(zip(captions, prompts)):
        family = next(f for f, (name, _) in FAMILIES.items() if caption.endswith(name))
        rest = song(family, 100, 0, "major", SECONDS, seed * 10 + i)[prompt.shape[-1]:]
        out.append(torch.cat([prompt.mean(0), rest])[None])
    return torch.stack(out), rate


def trained_classifier(folder, families):
    train = adherence.read_corpus(folder)
    return adherence.train_classifier([adherence.timbre_features(adherence.load_mono(c.audio)) for c in train],
                                      [families.index(c.family) for c in train], len(families), seed=0)


def test_reads_the_windows_after_the_prompt(corpus):
    clips = adherence.read_corpus(corpus / "valid")
    assert clips[0].caption == "a tune led by piano"
    picked = pick_clips(clips, ["brass", "keys"], 2)
    assert [c.family for c in picked] == ["brass", "brass", "keys", "keys"]
    families = ["brass", "keys"]
    classifier = trained_classifier(corpus / "train", families)
    kept = continuation_report(picked, classifier=classifier, families=families, continue_fn=keep_timbre,
                               roundtrip=exact, prompt_seconds=2.0, seconds=SECONDS, batch=3)
    assert kept["clips"] == 4 and kept["too_short"] == 0 and kept["windows_from_s"] == 2.5
    assert kept["roundtrip"]["accuracy"] == kept["continued"]["accuracy"] == 1.0

    def drift(captions, prompts, rate, seed):  # every continuation turns into keys after the prompt
        wav, rate = keep_timbre(["piano"] * len(captions), prompts, rate, seed)
        return wav, rate

    drifted = continuation_report(picked, classifier=classifier, families=families, continue_fn=drift,
                                  roundtrip=exact, prompt_seconds=2.0, seconds=SECONDS)
    assert drifted["continued"]["accuracy"] == 0.5 and drifted["roundtrip"]["accuracy"] == 1.0
    assert drifted["continued"]["confusion"] == {"brass": {"keys": 2}, "keys": {"keys": 2}}
    table = continuation_table(drifted)
    assert "| continued by the LM | 50 % | 50 % |" in table and "| codec round trip | 100 % |" in table

    # a prompt reaching into the only window left leaves nothing to read; clips shorter than asked are counted
    with pytest.raises(ValueError, match="whole 2.5 s window"):
        continuation_report(picked, classifier=classifier, families=families, continue_fn=keep_timbre,
                            roundtrip=exact, prompt_seconds=4.0, seconds=SECONDS)
    short = continuation_report(picked, classifier=classifier, families=families, continue_fn=keep_timbre,
                                roundtrip=exact, prompt_seconds=2.0, seconds=8.0)
    assert short["clips"] == 0 and short["too_short"] == 4 and "No clip" in continuation_table(short)
    with pytest.raises(ValueError, match="expected \\(2, C, T\\)"):
        continuation_report(picked[:2], classifier=classifier, families=families, roundtrip=exact,
                            continue_fn=lambda c, p, r, s: (torch.zeros(1, 1, 10), r), seconds=SECONDS)


def test_run_adherence_and_the_cli_report_it(corpus, tmp_path, capsys):
    settings = adherence.AdherenceSettings(min_family_clips=2, continuation=2, continuation_seconds=SECONDS)
    result = adherence.run_adherence(corpus / "train", corpus / "valid", follow_prompt, settings, log=lambda _: None,
                                     roundtrip=exact, continue_fn=keep_timbre)
    assert result["continuation"]["continued"]["accuracy"] == 1.0
    assert "### Continuations" in adherence.adherence_tables(result)
    off = adherence.run_adherence(corpus / "train", corpus / "valid", None, settings, log=lambda _: None)
    assert "continuation" not in off  # no continue_fn, no round trip: nothing to compare

    from codec.model import EncodecConfig
    from conditioning import ConditionProvider, LUTConditioner
    from inference.cli import random_model
    from inference.generator import GeneratorConfig, MusicGen
    from lm import LMConfig, LMModel

    torch.manual_seed(0)
    codec = random_model(EncodecConfig(name="tiny800", sample_rate=800, channels=1, causal=False, ratios=(2, 2),
                                       n_filters=4, dimension=8, num_codebooks=2, codebook_size=16, lstm=0,
                                       true_skip=True, target_bandwidths=(1.6,)))
    lm = LMModel(LMConfig(dim=16, num_heads=2, num_layers=1, ffn_dim=32, num_codebooks=2, card=16)).eval()
    text = LUTConditioner(vocab=["piano", "trumpet"], dim=4, output_dim=16)
    generator = MusicGen(lm=lm, codec=codec, condition_provider=ConditionProvider({"description": text}),
                         config=GeneratorConfig(max_duration=SECONDS, extend_stride=SECONDS / 2))
    continue_fn = musicgen_continue_fn(generator, SECONDS, cfg_coef=2.0)
    prompts = torch.randn(2, 1, 1600) * 0.1
    wav, rate = continue_fn(["a tune led by piano", None], prompts, 800, 3)
    assert wav.shape == (2, 1, round(SECONDS * 800)) and rate == 800
    assert torch.equal(wav, continue_fn(["a tune led by piano", None], prompts, 800, 3)[0])
    families = ["brass", "keys"]
    report = continuation_report(pick_clips(adherence.read_corpus(corpus / "valid"), families, 1),
                                 classifier=trained_classifier(corpus / "train", families), families=families,
                                 continue_fn=continue_fn, roundtrip=quality.codec_roundtrip(codec), seconds=SECONDS)
    assert report["clips"] == 2 and 0 <= report["continued"]["accuracy"] <= 1

    # the command line: --continuation with a generator folder
    folder = generator.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "q.json"
    code = quality.main(["--data", str(corpus / "valid"), "--clips", "1", "--visqol-clips", "0",
                         "--generator", str(folder),
                         "--min-family-clips", "2", "--per-prompt", "1", "--duration", "1", "--continuation", "1",
                         "--continuation-seconds", str(SECONDS), "--json", str(out)])
    assert code == 0 and "### Continuations" in capsys.readouterr().out
    assert json.loads(out.read_text())["adherence"]["continuation"]["clips"] == 2
    assert quality.main(["--data", str(corpus / "valid"), "--clips", "1", "--visqol-clips", "0",
                         "--continuation", "1"]) == 1
    assert "give --generator MODEL too" in capsys.readouterr().err
