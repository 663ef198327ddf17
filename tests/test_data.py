"""Corpus scanning, caption augmentation, token cache and training batches (lm.corpus, token_cache, batches).

A tiny corpus is synthesized per test: 1-2 s sines and noise at the codec's rate (800 Hz) and
at twice it (resampled), captions as .txt and .json, plus bad files (unreadable bytes, an empty
wav, NaN samples, silence, a 0.3 s clip). The codec is the tiny random one of test_generator.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_generator import CODEC, SR, build_tiny_generator

from codec import audio as audio_io
from codec.model import InterleavedStereo
from inference.cli import random_model
from lm import token_cache as lm_data
from lm.batches import SegmentBatches, validation_batches
from lm.corpus import (
    CaptionAugmentation,
    TrackMeta,
    augment_caption,
    caption_vocabulary,
    plain_caption,
    scan_corpus,
)
from lm.token_cache import CodecTokenizer, TokenCache, codec_fingerprint, prepare_corpus

CAPTIONS = ["happy rock with drums", "calm piano at night", "synth drums", "calm rock", "happy piano synth",
            "night drums"]
BAD = {"unreadable.wav": "unreadable", "empty.wav": "empty", "nan.wav": "non-finite", "silent.wav": "silent",
       "short.wav": "too short"}


def write_corpus(folder: Path, count: int = 6, *, bad: bool = True, seconds: tuple[float, ...] = (1.0, 1.5, 2.0)
                 ) -> Path:
    """``count`` good files (odd ones at 2x the codec rate, captions alternating .txt / .json),
    and with ``bad`` one file of each kind in :data:`BAD`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        sr = SR if i % 2 == 0 else 2 * SR
        t = np.arange(int(sr * seconds[i % len(seconds)])) / sr
        wav = 0.4 * np.sin(2 * np.pi * (40 + 15 * i) * t) + (0.2 if i % 3 == 2 else 0.02) * rng.standard_normal(t.size)
        sf.write(folder / f"track{i}.wav", wav.astype(np.float32), sr)
        if i % 2 == 0:
            (folder / f"track{i}.txt").write_text(CAPTIONS[i % len(CAPTIONS)] + "\n", encoding="utf-8")
        else:
            (folder / f"track{i}.json").write_text(json.dumps(
                {"description": CAPTIONS[i % len(CAPTIONS)], "genre": "Rock", "moods": "happy, calm", "bpm": 120 + i,
                 "key": "C major", "title": f"Song {i}"}), encoding="utf-8")
    if bad:
        (folder / "unreadable.wav").write_bytes(b"RIFF....this is not audio")
        sf.write(folder / "empty.wav", np.zeros(0, np.float32), SR)
        sf.write(folder / "nan.wav", np.full(2 * SR, np.nan, np.float32), SR, subtype="FLOAT")
        sf.write(folder / "silent.wav", np.zeros(2 * SR, np.float32), SR)
        sf.write(folder / "short.wav", 0.5 * np.ones(int(0.3 * SR), np.float32), SR)
    return folder


@pytest.fixture(scope="module")
def codec():
    return random_model(CODEC, seed=0)


# -- metadata and captions -----------------------------------------------------------------------------

def test_metadata_is_normalized_as_audiocraft_does():
    meta = TrackMeta.from_dict({"description": "  Calm  piano ", "genre": "Jazz", "moods": "Happy, hip hop;calm",
                                "keywords": ["Lo-Fi", "", None, "lo-fi"], "bpm": "120.5", "key": "A minor, C major",
                                "instrument": ["Piano", "Bass"], "title": "None", "unknown": 3})
    assert meta.description == "Calm piano" and meta.genre == "jazz"
    assert meta.moods == ("happy", "hip hop", "calm") and meta.keywords == ("lo-fi",)
    assert meta.bpm == 120.5 and meta.key is None and meta.instrument == "piano, bass" and meta.title is None
    assert TrackMeta.from_dict(meta.to_dict()) == meta
    assert TrackMeta.from_dict({"bpm": "fast", "key": "D Dorian"}) == TrackMeta(key="d dorian")
    assert not TrackMeta(title="only a title").has_caption


def test_caption_augmentation_recipe():
    meta = TrackMeta(description="calm piano.", genre="jazz", moods=("happy", "calm"), bpm=120.0, key="c major",
                     title="not merged")
    rng = random.Random(0)
    assert augment_caption(meta, CaptionAugmentation(0.0, 0.0, 0.0), rng) == "calm piano."
    full = augment_caption(meta, CaptionAugmentation(1.0, 0.0, 0.0), rng)
    head, *pairs = full.split(". ")
    assert head == "calm piano"
    assert sorted(pairs) == sorted(["genre: jazz", "moods: happy, calm", "bpm: 120", "key: c major"])
    assert sorted(augment_caption(meta, CaptionAugmentation(1.0, 1.0, 0.0), rng).split(". ")) == sorted(pairs)
    assert augment_caption(meta, CaptionAugmentation(1.0, 0.0, 1.0), rng) == "calm piano."  # all fields dropped
    assert augment_caption(meta, CaptionAugmentation(1.0, 1.0, 1.0), rng) is None  # nothing left: unconditional
    # No description: the fields are always merged (in the plain caption in MERGE_FIELDS order).
    bare = TrackMeta(genre="rock", bpm=90.0)
    assert augment_caption(bare, CaptionAugmentation(0.0, 0.0, 0.0), rng) in ("genre: rock. bpm: 90",
                                                                             "bpm: 90. genre: rock")
    assert plain_caption(bare) == "bpm: 90. genre: rock" and plain_caption(TrackMeta()) is None
    # The probabilities are those given (audiocraft's MusicGen recipe), and seeded draws repeat.
    recipe = CaptionAugmentation()
    draws = [augment_caption(meta, recipe, random.Random(i)) for i in range(4000)]
    merged = np.mean([d != "calm piano." for d in draws])
    assert abs(merged - 0.25 * (1 - 0.5 ** 5)) < 0.03  # unchanged only if all 4 fields and no desc dropped
    no_desc = np.mean([d is None or not d.startswith("calm piano") for d in draws])
    assert abs(no_desc - 0.25 * 0.5) < 0.03
    assert draws == [augment_caption(meta, recipe, random.Random(i)) for i in range(4000)]


def test_caption_vocabulary():
    metas = [TrackMeta(description="Happy rock, happy!"), TrackMeta(description="calm rock", genre="jazz")]
    assert caption_vocabulary(metas) == ["happy", "rock", "calm", "genre", "jazz"]
    assert caption_vocabulary(metas, limit=2) == ["happy", "rock"]


# -- scanning -------------------------------------------------------------------------------------------

def test_scan_folder_reads_sidecars(tmp_path):
    folder = write_corpus(tmp_path / "corpus", 4, bad=False)
    (folder / "track1.txt").write_text("ignored: the json has a description")
    (folder / "track2.json").write_text(json.dumps({"genre": "Pop"}))  # the .txt fills the description
    sf.write(folder / "nocaption.flac", 0.3 * np.ones(SR, np.float32), SR)
    (folder / ".hidden.wav").write_bytes(b"x")
    (folder / "broken.wav").write_bytes(b"x")
    (folder / "broken.json").write_text("{not json")
    entries, skipped = scan_corpus(folder)
    by_name = {e.path.name: e.meta for e in entries}
    assert sorted(by_name) == ["nocaption.flac", "track0.wav", "track1.wav", "track2.wav", "track3.wav"]
    assert by_name["track0.wav"].description == CAPTIONS[0]
    assert by_name["track1.wav"].description == CAPTIONS[1] and by_name["track1.wav"].moods == ("happy", "calm")
    assert by_name["track2.wav"] == TrackMeta(description=CAPTIONS[2], genre="pop")
    assert by_name["nocaption.flac"] == TrackMeta()
    assert [(Path(s.source).name, s.category) for s in skipped] == [("broken.wav", "metadata")]
    assert "broken.json: expected JSON track metadata, found unreadable text" in skipped[0].reason


def test_scan_manifest(tmp_path):
    folder = write_corpus(tmp_path / "audio", 2, bad=False)
    manifest = tmp_path / "train.jsonl"
    lines = [json.dumps({"path": "audio/track0.wav", "description": "from the manifest", "moods": ["Calm"]}),
             "", "{oops", json.dumps({"description": "no path"}),
             json.dumps({"path": str(folder / "track1.wav")}), json.dumps({"path": "audio/missing.wav"})]
    manifest.write_text("\n".join(lines), encoding="utf-8")
    entries, skipped = scan_corpus(manifest)
    assert [(e.path.name, e.meta.description) for e in entries] == [("track0.wav", "from the manifest"),
                                                                    ("track1.wav", None)]
    assert entries[0].meta.moods == ("calm",)
    assert [s.category for s in skipped] == ["metadata", "metadata", "missing"]
    assert skipped[0].source.endswith("train.jsonl:3")
    with pytest.raises(ValueError, match="corpus folder or a .jsonl manifest"):
        scan_corpus(folder / "track0.wav")


# -- prepare ---------------------------------------------------------------------------------------------

def test_prepare_skips_bad_files_and_caches_the_codec_tokens(tmp_path, codec):
    corpus = write_corpus(tmp_path / "corpus")
    report = prepare_corpus(corpus, tmp_path / "cache", CodecTokenizer(codec), segment_seconds=0.5)
    assert report.prepared == 6 and report.resampled == 3 and report.uncaptioned == 0
    assert {Path(s.source).name: s.category for s in report.skipped} == BAD
    assert report.skipped_by_category() == {c: 1 for c in sorted(BAD.values())}
    cache = TokenCache(tmp_path / "cache")
    assert len(cache) == 6 and cache.segment_seconds == 0.5 and cache.num_codebooks == 4 and cache.card == 16
    assert cache.codec["fingerprint"] == codec_fingerprint(codec)
    assert {s["reason"].split(":")[0] for s in cache.index["skipped"]} == set(BAD.values())
    for i, item in enumerate(cache.items):
        wav, sr = audio_io.read_audio(item.source)
        expected = codec.encode_to_codes(audio_io.convert_audio(wav, sr, SR, 1)[None])[0]
        tokens = cache.tokens(i)
        assert tokens.dtype == np.int16 and torch.equal(torch.from_numpy(np.asarray(tokens, np.int64)), expected)
        assert item.frames == expected.shape[-1] and item.seconds == pytest.approx(wav.shape[-1] / sr)
    assert cache.items[1].meta.bpm == 121.0 and cache.items[0].meta.description == CAPTIONS[0]
    # An existing cache is only rebuilt when asked.
    with pytest.raises(FileExistsError, match="not empty"):
        prepare_corpus(corpus, tmp_path / "cache", CodecTokenizer(codec))
    prepare_corpus(corpus, tmp_path / "cache", CodecTokenizer(codec, 2), overwrite=True)
    assert TokenCache(tmp_path / "cache").num_codebooks == 2


def test_prepare_with_only_bad_files_raises_with_the_reasons(tmp_path, codec):
    corpus = tmp_path / "bad"
    corpus.mkdir()
    (corpus / "a.wav").write_bytes(b"junk")
    sf.write(corpus / "b.wav", np.zeros(SR, np.float32), SR)
    with pytest.raises(ValueError, match="no usable audio.*1 silent, 1 unreadable"):
        prepare_corpus(corpus, tmp_path / "cache", CodecTokenizer(codec))
    assert not (tmp_path / "cache" / "index.json").exists()


def test_long_files_are_encoded_in_blocks_with_the_same_codes(tmp_path, codec, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus", 2, bad=False, seconds=(2.0,))
    prepare_corpus(corpus, tmp_path / "whole", CodecTokenizer(codec))
    monkeypatch.setattr(lm_data, "STREAM_ABOVE_SECONDS", 0.5)
    monkeypatch.setattr(lm_data, "BLOCK_SECONDS", 0.3)
    prepare_corpus(corpus, tmp_path / "blocks", CodecTokenizer(codec))
    whole, blocks = TokenCache(tmp_path / "whole"), TokenCache(tmp_path / "blocks")
    for i in range(2):
        assert np.array_equal(whole.tokens(i), blocks.tokens(i))


def test_stereo_tokens_are_interleaved_like_the_generator():
    stereo = InterleavedStereo(random_model(CODEC, seed=1))
    tokenizer = CodecTokenizer(stereo)
    wav = torch.randn(2, SR) * 0.3
    codes = tokenizer.encode(wav, SR)
    assert codes.shape == (8, 200)
    assert torch.equal(torch.from_numpy(codes), stereo.encode(wav[None])[0])
    with pytest.raises(ValueError, match="even"):
        CodecTokenizer(stereo, 3)


# -- batches --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cache(tmp_path_factory, codec) -> TokenCache:
    root = tmp_path_factory.mktemp("batches")
    prepare_corpus(write_corpus(root / "corpus", bad=False), root / "cache", CodecTokenizer(codec),
                   segment_seconds=1.25)
    return TokenCache(root / "cache")


def test_batches_are_a_pure_function_of_the_position(cache):
    special = 16

    def make():
        return SegmentBatches(cache, [0, 1, 2, 3, 4], segment_frames=250, batch_size=2, special_token=special, seed=7)

    a, b = make(), make()
    for step in (0, 3, 11):
        x, y = a.batch(step, micro=1, grad_accum=2), b.batch(step, micro=1, grad_accum=2)
        assert torch.equal(x.codes, y.codes) and x.captions == y.captions and x.items == y.items
    # Each epoch visits every training item once; ranks and micro-batches take distinct positions.
    assert sorted(a.sample(p)[0] for p in range(5)) == [0, 1, 2, 3, 4]
    assert sorted(a.sample(p)[0] for p in range(5, 10)) == [0, 1, 2, 3, 4]
    rank0, rank1 = a.batch(0, rank=0, world=2), a.batch(0, rank=1, world=2)
    assert rank0.items + rank1.items == [a.sample(p)[0] for p in range(4)]
    # Crops: 250-frame windows inside the item; shorter items are padded with the special token.
    batch = a.batch(2)
    for row, item in enumerate(batch.items):
        frames = cache.items[item].frames
        real = int(batch.frame_mask[row].sum())
        assert real == min(frames, 250)
        assert (batch.codes[row, :, real:] == special).all() and (batch.codes[row, :, :real] < special).all()
        tokens = torch.from_numpy(np.asarray(cache.tokens(item), np.int64))
        starts = [s for s in range(frames - real + 1) if torch.equal(tokens[:, s:s + real], batch.codes[row, :, :real])]
        assert starts


def test_windows_are_capped_at_the_longest_item_and_validation_is_fixed(cache):
    batches = SegmentBatches(cache, [0, 3], segment_frames=10_000, batch_size=2, special_token=16)
    assert batches.segment_frames == max(cache.items[0].frames, cache.items[3].frames)
    valid = validation_batches(cache, [1, 2, 5], segment_frames=250, batch_size=2, special_token=16)
    assert [b.items for b in valid] == [[1, 2], [5]]
    assert valid[0].captions == [plain_caption(cache.items[1].meta), plain_caption(cache.items[2].meta)]
    first = torch.from_numpy(np.asarray(cache.tokens(1)[:, :250], np.int64))
    assert torch.equal(valid[0].codes[0, :, :first.shape[1]], first)


def test_a_share_of_windows_begins_at_the_clip_start(cache):
    """start_fraction: that share of windows starts at frame 0; 0 leaves every crop as it was."""
    long_items = [i for i in range(len(cache)) if cache.items[i].frames > 60]
    plain = SegmentBatches(cache, long_items, segment_frames=20, batch_size=4, special_token=16, seed=1)
    off = SegmentBatches(cache, long_items, segment_frames=20, batch_size=4, special_token=16, seed=1,
                         start_fraction=0.0)
    all_start = SegmentBatches(cache, long_items, segment_frames=20, batch_size=4, special_token=16, seed=1,
                               start_fraction=1.0)
    half = SegmentBatches(cache, long_items, segment_frames=20, batch_size=4, special_token=16, seed=1,
                          start_fraction=0.5)
    positions = range(400)
    assert [plain.sample(p) for p in positions] == [off.sample(p) for p in positions]
    assert all(all_start.sample(p)[1] == 0 for p in positions)
    assert sum(plain.sample(p)[1] == 0 for p in positions) < 40
    assert 150 < sum(half.sample(p)[1] == 0 for p in positions) < 260
    assert [half.sample(p)[0] for p in positions] == [plain.sample(p)[0] for p in positions]  # same items
    with pytest.raises(ValueError, match="start_fraction"):
        SegmentBatches(cache, long_items, segment_frames=20, batch_size=4, special_token=16, start_fraction=1.5)


def test_split_is_deterministic(cache):
    train, valid = cache.split(0.2, seed=3)
    assert len(valid) == 1 and sorted(train + valid) == list(range(6))
    assert cache.split(0.2, seed=3) == (train, valid)
    assert cache.split(0.0, seed=3) == (list(range(6)), [])


def test_generator_folder_and_cache_agree_on_the_codec(tmp_path):
    """A generator's codec (saved and reloaded) has the fingerprint of the codec it was built with."""
    generator = build_tiny_generator(seed=0)
    generator.save_pretrained(tmp_path / "gen")
    from inference import MusicGen

    loaded = MusicGen.from_pretrained(tmp_path / "gen", device="cpu")
    assert codec_fingerprint(loaded.codec) == codec_fingerprint(random_model(CODEC, seed=0))
    assert codec_fingerprint(loaded.codec) != codec_fingerprint(random_model(CODEC, seed=1))
