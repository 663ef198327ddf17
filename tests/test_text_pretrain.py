"""Text-encoder pretraining on the attributes captions state (lm.text_pretrain), tiny and on CPU."""
from __future__ import annotations

import random

import pytest
import torch

from conditioning.text import LUTConditioner
from lm.corpus import CaptionAugmentation, TrackMeta
from lm.text_pretrain import IGNORE, AttributeVocabulary, TextPretrainConfig, pretrain_text_encoder, tempo_band

GENRES = ("rock", "jazz", "folk")
INSTRUMENTS = ("piano", "flute", "violin", "trumpet")
KEYS = ("c major", "a minor", "g major", "e minor")


def metas(count: int, seed: int) -> list[TrackMeta]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        genre, lead, key = rng.choice(GENRES), rng.choice(INSTRUMENTS), rng.choice(KEYS)
        bpm = rng.choice((70.0, 100.0, 150.0))
        out.append(TrackMeta(description=f"{genre} tune led by {lead} in {key} at {int(bpm)} bpm",
                             genre=genre, instrument=f"{lead}, bass", key=key, bpm=bpm, moods=("calm",)))
    return out


def test_labels_count_only_what_the_caption_states():
    vocabulary = AttributeVocabulary.from_metas(metas(200, 0))
    assert set(vocabulary.genre) == set(GENRES) and "bass" in vocabulary.instrument
    meta = TrackMeta(description="x", genre="jazz", instrument="flute, bass", key="a minor", bpm=150.0,
                     moods=("calm",))
    categorical, (instruments, moods) = vocabulary.labels(meta, "jazz tune led by flute in A minor at 150 bpm")
    assert categorical == [vocabulary.genre.index("jazz"), vocabulary.tonic.index("a"), 1, tempo_band(150.0)]
    stated = dict(zip(vocabulary.instrument, instruments))
    assert stated["flute"] == 1.0 and stated["piano"] == 0.0 and stated["bass"] == -1.0  # bass not written
    assert moods == [-1.0]  # "calm" is not in the caption
    # Nothing stated: every categorical label ignored; absent instruments are still known absent.
    categorical, (instruments, _) = vocabulary.labels(meta, "a tune")
    assert categorical == [IGNORE] * 4
    assert dict(zip(vocabulary.instrument, instruments))["flute"] == -1.0
    # "c" must not be read inside other words, nor "a minor" from "a" alone.
    categorical, _ = vocabulary.labels(TrackMeta(description="x", key="c major"), "calm music in a major hall")
    assert categorical[1] == IGNORE and categorical[2] == IGNORE


def lut_encoder(seed: int) -> LUTConditioner:
    torch.manual_seed(seed)
    words = sorted({w for m in metas(300, 9) for w in m.description.lower().split()} | {"bass", "calm"})
    return LUTConditioner(vocab=words, dim=16, output_dim=16)


def accuracy_after(steps: int) -> dict[str, float]:
    encoder = lut_encoder(0)
    config = TextPretrainConfig(steps=max(steps, 1), batch_size=32, lr=1e-2 if steps else 1e-12, word_dropout=0.0,
                                eval_every=max(steps, 1))
    metrics = pretrain_text_encoder(encoder, metas(300, 1), metas(100, 2), config,
                                    augmentation=CaptionAugmentation(0, 0, 0))
    return {k.split("/")[1]: v for k, v in metrics.items() if k.endswith("accuracy")}


def test_pretraining_teaches_the_encoder_what_captions_state():
    before, after = accuracy_after(0), accuracy_after(400)
    assert set(after) == {"genre_accuracy", "tonic_accuracy", "mode_accuracy", "tempo_accuracy"}
    for name in after:  # 3 genres, 4 tonics, 2 modes, 3 tempo bands: near chance before
        assert after[name] > 0.9, (name, before, after)
        assert before[name] < 0.75, (name, before, after)


def test_pretraining_refuses_a_frozen_encoder_and_a_corpus_without_captions():
    encoder = lut_encoder(0).requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        pretrain_text_encoder(encoder, metas(10, 0), [], TextPretrainConfig(steps=1))
    with pytest.raises(ValueError, match="no"):
        pretrain_text_encoder(lut_encoder(0), [TrackMeta()], [], TextPretrainConfig(steps=1))
