"""Human-composed scores from the music21 corpus (installed with ``pip install music21``, no download),
arranged and played into MIDI alongside the procedural songs.

Two collections: Bach's four-part chorales (played by an ensemble: string quartet, brass, woodwinds,
saxophones, organ, choir, piano or harpsichord) and the dance tunes of Ryan's Mammoth Collection in
duple or triple meter over quarter notes (played on one instrument). Each clip draws, from its own
seed: the piece, an excerpt starting on a bar line, a transposition (-5..+6 semitones, then whole
octaves to the instruments' range), a tempo, dynamics (note velocities), reverb and the
instruments. The key and mode a caption states are music21's key analysis of the piece,
transposed: they hold for the notes played. The bpm is quarter notes per minute, as in the MIDI.
"""
from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from pathlib import Path

import mido

from .compose import MAJOR_NAMES, MINOR_NAMES, TICKS_PER_BEAT, clip_random
from .instruments import instrument

COLLECTIONS = {"chorale": 0.55, "fiddle tune": 0.45}
TEMPO = {"chorale": (56, 104), "fiddle tune": (72, 150)}
# Ensembles for four-part chorales: (name, programs soprano -> bass). Programs outside the caption table
# (viola 41, baritone sax 67) only ever play inner or bass voices, which captions name by the ensemble.
ENSEMBLES = (
    ("string quartet", (40, 40, 41, 42)),
    ("string orchestra", (48, 48, 48, 48)),
    ("brass quartet", (56, 60, 57, 58)),
    ("woodwind quartet", (73, 68, 71, 70)),
    ("saxophone quartet", (64, 65, 66, 67)),
    ("church organ", (19, 19, 19, 19)),
    ("choir", (52, 52, 52, 52)),
    ("piano", (0, 0, 0, 0)),
    ("harpsichord", (6, 6, 6, 6)),
)
TUNE_LEADS = (40, 110, 73, 75, 72, 71, 68, 22, 21, 0, 6, 24, 25, 46, 11, 12, 56, 65, 80)
MOODS = {("chorale", "major"): ("serene", "peaceful", "noble", "hopeful", "warm"),
         ("chorale", "minor"): ("solemn", "mournful", "somber", "melancholic", "reflective"),
         ("fiddle tune", "major"): ("cheerful", "lively", "carefree", "joyful", "rustic"),
         ("fiddle tune", "minor"): ("wistful", "haunting", "brooding", "bittersweet", "plaintive")}
GENRE = {"chorale": "classical", "fiddle tune": "folk"}
NOUNS = {"chorale": ("chorale", "hymn", "Bach chorale", "baroque chorale"),
         "fiddle tune": ("fiddle tune", "folk tune", "dance tune", "traditional tune")}
VELOCITY = {"soft": 52, "medium": 74, "loud": 98}


class ScoreError(RuntimeError):
    """music21 is missing, or a score cannot be used."""


@dataclass(frozen=True)
class ScoreNote:
    start: float  # quarter notes from the start of the piece
    length: float
    pitch: int
    voice: int  # 0 = the top part


@dataclass(frozen=True)
class Piece:
    """A score excerpt as played: every fact a caption states, and the notes."""

    index: int
    collection: str
    source: str  # the score's path inside the music21 corpus
    ensemble: str
    programs: tuple[int, ...]  # one per voice, top first
    tempo: int
    beats_per_bar: int
    tonic: int
    mode: str
    transpose: int
    dynamics: str
    reverb: int
    moods: tuple[str, ...]
    notes: tuple[ScoreNote, ...]
    caption_seed: int

    @property
    def key_name(self) -> str:
        return f"{(MAJOR_NAMES if self.mode == 'major' else MINOR_NAMES)[self.tonic]} {self.mode}"

    @property
    def midi_key(self) -> str:
        """The key as a MIDI key-signature event spells it (as :attr:`compose.SongSpec.midi_key`)."""
        return self.key_name.split()[0] + ("m" if self.mode == "minor" else "")

    @property
    def lead_name(self) -> str:
        return instrument(self.programs[0]).name

    @property
    def family(self) -> str:
        return instrument(self.programs[0]).family


def music21_version() -> str:
    try:
        import music21
    except ImportError:
        raise ScoreError("the score part of the corpus needs music21: pip install music21 "
                         "(or --score-fraction 0 for procedural songs only)") from None
    return music21.__version__


@functools.lru_cache(maxsize=1)
def score_files() -> dict[str, tuple[str, ...]]:
    """The candidate scores of each collection, as sorted paths relative to music21's corpus folder."""
    music21_version()
    from music21 import corpus

    root = Path(corpus.__file__).parent
    chorales = sorted(str(p.relative_to(root)) for p in (root / "bach").glob("bwv*.mxl"))
    tunes = sorted(str(p.relative_to(root)) for p in (root / "ryansMammoth").rglob("*.abc"))
    if not chorales or not tunes:
        raise ScoreError(f"music21's corpus at {root} lacks the Bach chorales or Ryan's Mammoth Collection")
    return {"chorale": tuple(chorales), "fiddle tune": tuple(tunes)}


@functools.lru_cache(maxsize=64)
def read_score(relative: str) -> tuple[tuple[ScoreNote, ...], int, int, str, float]:
    """``(notes, beats_per_bar, tonic, mode, first_bar_offset)`` of a score, ties merged; raises
    :class:`ScoreError` for scores the recipe does not play (not x/4 meter, unusual key analysis)."""
    from music21 import corpus, meter

    root = Path(corpus.__file__).parent
    score = corpus.parse(str(root / relative)).stripTies()
    signatures = list(score.recurse().getElementsByClass(meter.TimeSignature))
    if not signatures or signatures[0].denominator != 4 or signatures[0].numerator not in (2, 3, 4):
        raise ScoreError(f"{relative}: meter {signatures[0].ratioString if signatures else '?'} is not 2/4, 3/4 or 4/4")
    key = score.analyze("key")
    if key.mode not in ("major", "minor"):
        raise ScoreError(f"{relative}: key analysis gave mode {key.mode!r}")
    parts = list(score.parts) or [score]
    notes = []
    for voice, part in enumerate(parts[:4]):
        for element in part.flatten().notes:
            length = float(element.quarterLength)
            if length <= 0:
                continue
            for pitch in element.pitches:
                notes.append(ScoreNote(float(element.getOffsetInHierarchy(part)), length, int(pitch.midi), voice))
    if len(notes) < 8:
        raise ScoreError(f"{relative}: only {len(notes)} notes")
    # A pickup bar: bar lines fall at multiples of the bar length after the first full bar.
    measures = list(parts[0].getElementsByClass("Measure"))
    first_bar = 0.0
    if len(measures) > 1 and measures[0].duration.quarterLength < signatures[0].barDuration.quarterLength:
        first_bar = float(measures[1].offset)
    return tuple(notes), signatures[0].numerator, key.tonic.pitchClass, key.mode, first_bar


def _fit_octaves(pitches: list[int], low: int, high: int) -> int:
    """Whole octaves that move the median of ``pitches`` closest to the middle of ``[low, high]``."""
    median = sorted(pitches)[len(pitches) // 2]
    return 12 * round(((low + high) / 2 - median) / 12)


def sample_piece(seed: int, index: int, clip_seconds: float) -> Piece:
    """The score excerpt of clip ``index`` (drawn from ``(seed, index)`` alone)."""
    rng = clip_random(seed, index, "score")
    files = score_files()
    collection = rng.choices(list(COLLECTIONS), weights=list(COLLECTIONS.values()))[0]
    for _ in range(50):  # draw until a usable score and excerpt (most are)
        relative = rng.choice(files[collection])
        try:
            notes, beats_per_bar, tonic, mode, first_bar = read_score(relative)
        except ScoreError:
            continue
        except Exception:  # noqa: BLE001 - a score music21 cannot read is skipped like an unusable one
            continue
        tempo = rng.randint(*TEMPO[collection])
        transpose = rng.randint(-5, 6)
        dynamics = rng.choices(("soft", "medium", "loud"), weights=(0.3, 0.5, 0.2))[0]
        reverb = rng.randint(30, 90)
        voices = 1 + max(n.voice for n in notes)
        if collection == "chorale":
            ensemble, programs = rng.choice(ENSEMBLES)
            programs = programs[:voices]
            shift = transpose
        else:
            lead = rng.choice(TUNE_LEADS)
            ensemble, programs = "solo", (lead,) * voices
            spec = instrument(lead)
            top = [n.pitch + transpose for n in notes if n.voice == 0] or [n.pitch + transpose for n in notes]
            shift = transpose + _fit_octaves(top, spec.low, spec.high)
        # The excerpt: from a bar line, the clip plus a bar long; the piece repeats when shorter.
        beats = clip_seconds * tempo / 60 + beats_per_bar
        end = max(n.start + n.length for n in notes)
        bars = max(1, math.floor((end - first_bar) / beats_per_bar))
        bar_starts = [first_bar + k * beats_per_bar for k in range(bars)]
        start = rng.choice([b for b in bar_starts if b + beats <= end] or [first_bar])
        repeats = math.ceil((start + beats) / end) + 1
        played = [ScoreNote(n.start + r * end - start, n.length, min(127, max(0, n.pitch + shift)), n.voice)
                  for r in range(repeats) for n in notes if start <= n.start + r * end < start + beats]
        # An excerpt silent for (nearly) the whole clip, all rest or its first note in the last
        # tenth, is drawn again.
        if played and min(n.start for n in played) <= 0.9 * clip_seconds * tempo / 60:
            break
    else:
        raise ScoreError(f"no usable {collection} excerpt found in 50 draws")
    moods_pool = MOODS[(collection, mode)]
    moods = tuple(rng.sample(moods_pool, k=rng.choice((1, 1, 2))))
    return Piece(index=index, collection=collection, source=relative, ensemble=ensemble, programs=tuple(programs),
                 tempo=tempo, beats_per_bar=beats_per_bar, tonic=(tonic + transpose) % 12, mode=mode,
                 transpose=transpose, dynamics=dynamics, reverb=reverb, moods=moods,
                 notes=tuple(sorted(played, key=lambda n: (n.start, n.voice, n.pitch))),
                 caption_seed=rng.getrandbits(32))


def compose_piece(piece: Piece) -> mido.MidiFile:
    """Type-1 MIDI: a conductor track, then one track (and channel) per voice; the top voice a
    little louder, velocities humanized from the clip's seed."""
    rng = random.Random(piece.caption_seed ^ 0x5EED)
    midi = mido.MidiFile(type=1, ticks_per_beat=TICKS_PER_BEAT)
    conductor = mido.MidiTrack()
    conductor.append(mido.MetaMessage("time_signature", numerator=piece.beats_per_bar, denominator=4, time=0))
    conductor.append(mido.MetaMessage("key_signature", key=piece.midi_key, time=0))
    conductor.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(piece.tempo), time=0))
    midi.tracks.append(conductor)
    for voice, program in enumerate(piece.programs):
        track = mido.MidiTrack()
        channel = voice if voice < 9 else voice + 1
        track.append(mido.Message("program_change", channel=channel, program=program, time=0))
        for control, value in ((7, 110 if voice == 0 else 92), (10, 40 + 16 * voice), (91, piece.reverb)):
            track.append(mido.Message("control_change", channel=channel, control=control, value=min(127, value)))
        events = []
        for note in (n for n in piece.notes if n.voice == voice):
            on = round(note.start * TICKS_PER_BEAT)
            off = max(on + 10, round((note.start + note.length) * TICKS_PER_BEAT) - 6)
            velocity = VELOCITY[piece.dynamics] + (8 if voice == 0 else 0) + rng.randint(-6, 6)
            events += [(on, 1, note.pitch, max(1, min(127, velocity))), (off, 0, note.pitch, 0)]
        now = 0
        for tick, order, pitch, velocity in sorted(events):
            kind = "note_on" if order else "note_off"
            track.append(mido.Message(kind, channel=channel, note=pitch, velocity=velocity, time=tick - now))
            now = tick
        track.append(mido.MetaMessage("end_of_track", time=0))
        midi.tracks.append(track)
    return midi


__all__ = ["COLLECTIONS", "ENSEMBLES", "Piece", "ScoreError", "ScoreNote", "compose_piece", "music21_version",
           "read_score", "sample_piece", "score_files"]
