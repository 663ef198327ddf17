"""The corpus recipe: captions state the facts the MIDI was played from; builds are deterministic.

Caption checks read the facts back from the written MIDI file (tempo event, program changes,
key signature) rather than from the parameters that made it. The build tests render a tiny
corpus with fluidsynth (skipped when fluidsynth or a GM soundfont is not installed:
``apt-get install -y fluidsynth timgm6mb-soundfont``).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

mido = pytest.importorskip("mido")
sf = pytest.importorskip("soundfile")

from recipes.corpus import make_corpus, render  # noqa: E402
from recipes.corpus.captions import caption, metadata, tempo_word  # noqa: E402
from recipes.corpus.compose import compose, sample_spec, swung  # noqa: E402
from recipes.corpus.instruments import DRUM_CHANNEL, DRUM_KITS, instrument  # noqa: E402
from recipes.corpus.styles import STYLES  # noqa: E402

BPM = re.compile(r"(\d+)\s*(?:bpm|BPM|beats per minute)")
KEY = re.compile(r"\b([A-G][#b]?) (major|minor)\b")


def midi_facts(midi: mido.MidiFile) -> dict:
    """Tempo (bpm), key signature, time signature and the program of every channel, as written."""
    facts: dict = {"programs": {}}
    for track in midi.tracks:
        for message in track:
            if message.type == "set_tempo":
                facts["bpm"] = mido.tempo2bpm(message.tempo)
            elif message.type == "key_signature":
                facts["key"] = message.key
            elif message.type == "time_signature":
                facts["meter"] = (message.numerator, message.denominator)
            elif message.type == "program_change":
                facts["programs"][message.channel] = message.program
    return facts


def check_caption_against_midi(text: str, meta: dict, midi: mido.MidiFile) -> None:
    facts = midi_facts(midi)
    bpm = round(facts["bpm"])
    assert meta["bpm"] == bpm
    for number in BPM.findall(text):
        assert int(number) == bpm, text
    corpus = meta["tokenwave_corpus"]
    assert corpus["tempo_word"] == tempo_word(bpm)
    featured = corpus["featured"]
    program = facts["programs"][DRUM_CHANNEL if featured["role"] == "drums" else
                                next(p["channel"] for p in corpus["parts"] if p["role"] == featured["role"])]
    assert featured["program"] == program
    names = (DRUM_KITS[program], "drums") if featured["role"] == "drums" else instrument(program).names
    assert any(name in text.lower() for name in names), (text, names)
    for part in corpus["parts"]:  # every part plays the program the metadata names
        assert facts["programs"][part["channel"]] == part["program"]
        assert part["name"] in meta["instrument"]
    tonic, mode = meta["key"].split()
    assert facts["key"] == tonic + ("m" if mode == "minor" else "")
    for named in KEY.findall(text):  # a key a caption names is the MIDI file's key
        assert " ".join(named) == meta["key"], text
    assert facts["meter"] == (corpus["beats_per_bar"], 4)


def check_score_caption_against_midi(text: str, meta: dict, midi: mido.MidiFile) -> None:
    """A score clip: bpm, key and the lead (top voice, channel 0) instrument as the MIDI file has them."""
    facts = midi_facts(midi)
    bpm = round(facts["bpm"])
    assert meta["bpm"] == bpm
    for number in BPM.findall(text):
        assert int(number) == bpm, text
    for named in KEY.findall(text):
        assert " ".join(named) == meta["key"], text
    tonic, mode = meta["key"].split()
    assert facts["key"] == tonic + ("m" if mode == "minor" else "")
    corpus = meta["tokenwave_corpus"]
    assert facts["programs"][0] == corpus["featured"]["program"] == corpus["programs"][0]
    assert any(name in text.lower() for name in instrument(corpus["featured"]["program"]).names), text
    assert corpus["tempo_word"] == tempo_word(bpm)
    assert facts["meter"] == (corpus["beats_per_bar"], 4)


def test_captions_state_what_the_midi_plays():
    styles, with_bpm = set(), 0
    for index in range(120):
        spec = sample_spec(7, index)
        text = caption(spec)
        meta = metadata(spec, text)
        check_caption_against_midi(text, meta, compose(spec, 4.0))
        styles.add(spec.style)
        with_bpm += bool(BPM.search(text))
    assert styles == set(STYLES)  # 120 clips cover every style
    assert 30 < with_bpm < 110  # numbers in some captions, not all


def test_specs_depend_on_seed_and_index_only():
    assert sample_spec(3, 5) == sample_spec(3, 5)
    assert caption(sample_spec(3, 5)) == caption(sample_spec(3, 5))
    assert sample_spec(3, 5) != sample_spec(4, 5)
    first = compose(sample_spec(3, 5), 3.0)
    again = compose(sample_spec(3, 5), 3.0)
    assert [list(t) for t in first.tracks] == [list(t) for t in again.tracks]
    assert len({caption(sample_spec(0, i)) for i in range(50)}) == 50


def test_midi_covers_the_clip_and_swing_moves_offbeats():
    spec = sample_spec(1, 2)
    midi = compose(spec, 5.0)
    assert midi.length >= 5.0
    assert swung(1.5, 0.64) == pytest.approx(1.64)
    assert swung(2.0, 0.64) == 2.0 and swung(2.25, 0.5) == 2.25


# -- rendering --------------------------------------------------------------------------------------
def _soundfont() -> Path | None:
    if shutil.which("fluidsynth") is None:
        return None
    for path in ("/usr/share/sounds/sf2/TimGM6mb.sf2", *render.SOUNDFONT_PATHS):  # the small font is faster
        if Path(path).is_file():
            return Path(path)
    return None


SOUNDFONT = _soundfont()
needs_fluidsynth = pytest.mark.skipif(SOUNDFONT is None, reason="fluidsynth or a GM soundfont is not installed "
                                      "(apt-get install -y fluidsynth timgm6mb-soundfont)")


def build(out: Path, *extra: str) -> int:
    return make_corpus.main(["--out", str(out), "--clips", "3", "--clip-seconds", "2", "--seed", "11",
                             "--soundfont", str(SOUNDFONT), "--valid-fraction", "0.4", "-q", *extra])


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.suffix in (".wav", ".mid", ".txt", ".json")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    if SOUNDFONT is None:
        pytest.skip("fluidsynth or a GM soundfont is not installed")
    out = tmp_path_factory.mktemp("corpus")
    assert build(out, "--workers", "2") == 0
    return out


@needs_fluidsynth
def test_tiny_corpus_builds_with_captions_that_match(corpus):
    clips = sorted(corpus.glob("*/*.wav"))
    assert len(clips) == 3
    assert {p.parent.name for p in clips} <= {"train", "valid"}
    for wav in clips:
        audio, rate = sf.read(wav, dtype="float32", always_2d=True)
        assert rate == 32_000 and audio.shape == (64_000, 1)
        assert 0.05 < np.abs(audio).max() <= 0.9  # normalized below full scale, not silent
        meta = json.loads(wav.with_suffix(".json").read_text())
        text = wav.with_suffix(".txt").read_text().strip()
        assert meta["description"] == text
        assert meta["tokenwave_corpus"]["split"] == wav.parent.name
        midi = mido.MidiFile(wav.with_suffix(".mid"))
        if meta["tokenwave_corpus"]["source"] == "score":
            check_score_caption_against_midi(text, meta, midi)
        else:
            check_caption_against_midi(text, meta, midi)
    assert "licence" in (corpus / "LICENSE").read_text().lower()
    assert "make_corpus.py" in (corpus / "README.md").read_text()


@needs_fluidsynth
def test_corpus_reads_as_tokenwave_prepare_data(corpus):
    from lm.corpus import scan_corpus

    result = scan_corpus(corpus)
    assert len(result.entries) == 3 and not result.skipped
    for entry in result.entries:
        meta = json.loads(entry.path.with_suffix(".json").read_text())
        assert entry.meta.description == meta["description"]
        assert entry.meta.bpm == meta["bpm"]
        assert entry.meta.key == meta["key"].lower()


@needs_fluidsynth
def test_build_is_deterministic_and_resumable(corpus, tmp_path):
    again = tmp_path / "again"
    assert build(again, "--workers", "1") == 0
    assert files(again) == files(corpus)  # same bytes, whatever the number of workers

    victim = next(again.glob("*/*.json"))
    victim.unlink()
    kept = {p: p.stat().st_mtime_ns for p in again.glob("*/*.wav") if p.with_suffix(".json").exists()}
    assert build(again, "--workers", "1") == 0
    assert victim.is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # complete clips were skipped
    assert files(again) == files(corpus)

    with pytest.raises(SystemExit, match="other settings"):
        build(again, "--sample-rate", "16000")


def test_missing_fluidsynth_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    assert make_corpus.main(["--out", str(tmp_path / "x"), "--clips", "1", "-q"]) == 2
    assert "apt-get install -y fluidsynth" in capsys.readouterr().err


# -- score clips (music21) ---------------------------------------------------------------------------
def test_score_clips_state_what_the_midi_plays():
    """Excerpts of music21's scores: the caption's bpm, key and lead instrument are the MIDI file's, the
    key is the score's analysed key moved by the clip's transposition, and the notes fill the clip."""
    pytest.importorskip("music21")
    from recipes.corpus import scores
    from recipes.corpus.captions import piece_caption, piece_metadata

    collections = set()
    for index in range(24):
        piece = scores.sample_piece(5, index, 4.0)
        assert piece == scores.sample_piece(5, index, 4.0)  # drawn from (seed, index) alone
        text = piece_caption(piece)
        meta = piece_metadata(piece, text)
        midi = scores.compose_piece(piece)
        check_score_caption_against_midi(text, meta, midi)
        assert round(midi_facts(midi)["bpm"]) == piece.tempo
        _, _, score_tonic, score_mode, _ = scores.read_score(piece.source)
        assert piece.mode == score_mode and (piece.tonic - score_tonic - piece.transpose) % 12 == 0
        assert midi.length >= 4.0
        collections.add(piece.collection)
    assert collections == set(scores.COLLECTIONS)


def test_a_corpus_with_scores_needs_music21(monkeypatch, tmp_path, capsys):
    from recipes.corpus import scores

    def missing():
        raise scores.ScoreError("the score part of the corpus needs music21: pip install music21")

    monkeypatch.setattr(scores, "music21_version", missing)
    if SOUNDFONT is None:
        pytest.skip("fluidsynth or a GM soundfont is not installed")
    assert build(tmp_path / "x") == 2
    assert "pip install music21" in capsys.readouterr().err
    assert build(tmp_path / "y", "--score-fraction", "0") == 0  # procedural songs only: no music21


def test_an_excerpt_that_is_all_rest_is_drawn_again(monkeypatch):
    """A score with a long rest: windows that fall inside it hold no notes, or none until the clip's
    end, and are drawn again (the first looped forever, the second failed a build as silent)."""
    pytest.importorskip("music21")
    from recipes.corpus import scores

    sparse = (*(scores.ScoreNote(float(b), 1.0, 60 + b % 5, 0) for b in range(4)), scores.ScoreNote(38.0, 1.0, 62, 0))
    monkeypatch.setattr(scores, "read_score", lambda relative: (sparse, 4, 0, "major", 0.0))
    for index in range(40):
        piece = scores.sample_piece(2, index, 4.0)
        assert piece.notes and all(0 <= n.start for n in piece.notes)
        assert min(n.start for n in piece.notes) <= 0.9 * 4.0 * piece.tempo / 60  # sounds within the clip


@needs_fluidsynth
def test_the_readme_rebuild_command_rebuilds_the_same_corpus(tmp_path):
    """The command a corpus README prints is accepted by that corpus (same settings, soundfont
    weights included) and finds every clip already there."""
    import shlex

    out = tmp_path / "c"
    assert make_corpus.main(["--out", str(out), "--clips", "2", "--clip-seconds", "2", "--seed", "4", "-q"]) == 0
    command = next(line.strip() for line in (out / "README.md").read_text().splitlines()
                   if line.strip().startswith("python recipes/corpus/make_corpus.py"))
    before = files(out)
    assert make_corpus.main(shlex.split(command)[2:] + ["-q"]) == 0
    assert files(out) == before
