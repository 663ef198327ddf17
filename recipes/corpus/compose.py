"""Procedural songs: parameters drawn from a seed (:func:`sample_spec`), played into MIDI (:func:`compose`).

A :class:`SongSpec` holds every choice a caption may mention (style, tempo, key and mode,
instruments, dynamics, moods); the notes themselves come from ``detail_seed``, so the same
spec always gives the same MIDI file. Everything is drawn from ``random.Random`` seeded with a
string made of the corpus seed and the clip index: clip ``i`` is the same whatever the number of
clips, the worker that renders it or the order clips are rendered in.

Music: one chord per bar from a style's progressions (scale degrees, triads or seventh chords,
a major V in harmonic minor), a melody built from 4-bar phrases (a one-bar motif, its sequence on
the next chord, a contrasting bar, a cadence; chord tones on strong beats, steps between), and
accompaniment, bass and drum patterns named by the style. Swing moves off-beat eighths later.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import NamedTuple

import mido

from .instruments import DRUM_CHANNEL, DRUM_KITS, INSTRUMENTS, instrument
from .styles import CRASH, DRUM_PATTERNS, HIGH_TOM, LOW_TOM, MID_TOM, PROGRESSIONS, RHYTHMS, SNARE, STYLES

TICKS_PER_BEAT = 480
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
# Key spellings that read naturally and that MIDI key-signature events accept.
MAJOR_NAMES = ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
MINOR_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "G#", "A", "Bb", "B")
DYNAMICS = ("soft", "medium", "loud")
BASE_VELOCITY = {"soft": 50, "medium": 72, "loud": 96}
ROLE_VELOCITY = {"lead": 10, "harmony": -12, "bass": 0, "drums": 0}
ROLE_CHANNEL = {"lead": 0, "harmony": 1, "bass": 2, "drums": DRUM_CHANNEL}
ROLE_VOLUME = {"lead": 110, "harmony": 82, "bass": 100, "drums": 96}
ROLE_PAN = {"lead": 64, "harmony": 44, "bass": 64, "drums": 70}
# Instruments that can play chords, so one of them can play a piece alone (melody and chords).
POLYPHONIC = frozenset({0, 4, 6, 7, 8, 10, 11, 12, 16, 19, 21, 24, 25, 26, 27, 46, 105})
ARRANGEMENTS = {"band": 0.5, "trio": 0.17, "duo": 0.1, "solo": 0.13, "rhythm section": 0.1}


@dataclass(frozen=True)
class Part:
    """One instrument of a piece: role ``lead``/``harmony``/``bass``/``drums``, its GM program (the
    kit for drums), the pattern it plays and its MIDI channel (0-based; drums on 9)."""

    role: str
    program: int
    pattern: str
    channel: int

    @property
    def name(self) -> str:
        return DRUM_KITS[self.program] if self.role == "drums" else instrument(self.program).name


@dataclass(frozen=True)
class SongSpec:
    """Everything a clip's caption may name, and the seeds of what it does not (the notes)."""

    index: int
    style: str
    arrangement: str
    tempo: int
    beats_per_bar: int
    swing: float
    tonic: int
    mode: str
    progression: tuple[int, ...]
    sevenths: bool
    harmonic_minor: bool
    density: int
    dynamics: str
    crescendo: bool
    moods: tuple[str, ...]
    reverb: int
    parts: tuple[Part, ...]
    detail_seed: int
    caption_seed: int

    @property
    def key_name(self) -> str:
        """``"A minor"``, ``"Eb major"``."""
        names = MAJOR_NAMES if self.mode == "major" else MINOR_NAMES
        return f"{names[self.tonic]} {self.mode}"

    @property
    def midi_key(self) -> str:
        """The key as a MIDI key-signature event spells it: ``"Am"``, ``"Eb"``."""
        names = MAJOR_NAMES if self.mode == "major" else MINOR_NAMES
        return names[self.tonic] + ("m" if self.mode == "minor" else "")

    @property
    def time_signature(self) -> str:
        return f"{self.beats_per_bar}/4"

    def part(self, role: str) -> Part | None:
        return next((p for p in self.parts if p.role == role), None)

    @property
    def featured(self) -> Part:
        """The part a caption names first: the lead, else the chords, else the bass."""
        for role in ("lead", "harmony", "bass", "drums"):
            part = self.part(role)
            if part is not None:
                return part
        raise ValueError(f"clip {self.index} has no parts")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["parts"] = [{**asdict(p), "name": p.name} for p in self.parts]
        data["key"] = self.key_name
        return data


def clip_random(seed: int, index: int, purpose: str) -> random.Random:
    """The random generator of one clip and one purpose; string seeds are hashed the same way on
    every platform and Python version (random's version 2 seeding)."""
    return random.Random(f"tokenwave-corpus/{seed}/{index}/{purpose}")


def _weighted(rng: random.Random, weights: dict[str, float]) -> str:
    names = list(weights)
    return rng.choices(names, weights=[weights[n] for n in names])[0]


def sample_spec(seed: int, index: int) -> SongSpec:
    """The parameters of clip ``index`` of the corpus built with ``seed``."""
    rng = clip_random(seed, index, "spec")
    style = STYLES[rng.choice(sorted(STYLES))]
    tempo = rng.randint(*style.tempo)
    mode = "major" if rng.random() < style.major else "minor"
    tonic = rng.randrange(12)
    progressions = list(PROGRESSIONS[style.progressions][mode])
    if style.progressions in ("blues", "vamp"):
        progressions += PROGRESSIONS["pop"][mode]
    progression = rng.choice(progressions)
    density = rng.choice(style.densities)
    dynamics = rng.choices(DYNAMICS, weights=style.dynamics)[0]
    crescendo = rng.random() < 0.12
    moods_pool = style.moods_major if mode == "major" else style.moods_minor
    moods = tuple(rng.sample(moods_pool, k=rng.choice((1, 1, 2))))
    # Every choice is drawn whatever the arrangement, so arrangements do not shift later draws.
    lead = rng.choice(style.leads)
    harmony = rng.choice([p for p in style.harmonies if p != lead] or list(style.harmonies))
    bass = rng.choice(style.basses)
    kit = rng.choice(style.drum_kits)
    harmony_pattern = rng.choice(style.harmony_patterns)
    bass_pattern = rng.choice(style.bass_patterns)
    drum_pattern = rng.choice(style.drum_patterns) if style.drum_patterns else ""
    with_drums = rng.random() < style.drum_probability
    arrangement = _weighted(rng, ARRANGEMENTS)
    solo_choices = [p for p in style.leads + style.harmonies if p in POLYPHONIC]
    solo = rng.choice(solo_choices) if solo_choices else None
    with_chords = rng.random() < 0.4
    if arrangement == "rhythm section" and style.drum_probability < 0.85:
        arrangement = "band"
    if arrangement == "solo" and solo is None:
        arrangement = "duo"
    if arrangement == "band" and not with_drums:
        arrangement = "trio"

    def part(role: str, program: int, pattern: str) -> Part:
        return Part(role, program, pattern, ROLE_CHANNEL[role])

    parts = {
        "band": [part("lead", lead, "melody"), part("harmony", harmony, harmony_pattern),
                 part("bass", bass, bass_pattern), part("drums", kit, drum_pattern)],
        "trio": [part("lead", lead, "melody"), part("harmony", harmony, harmony_pattern),
                 part("bass", bass, bass_pattern)],
        "duo": [part("lead", lead, "melody"), part("harmony", harmony, harmony_pattern)],
        "solo": [part("lead", solo, "melody"), part("harmony", solo, "arpeggio" if rng.random() < 0.5 else "block")],
        "rhythm section": ([part("harmony", harmony, harmony_pattern)] if with_chords else [])
        + [part("bass", bass, bass_pattern), part("drums", kit, drum_pattern)],
    }[arrangement]
    return SongSpec(index=index, style=style.name, arrangement=arrangement, tempo=tempo,
                    beats_per_bar=style.beats_per_bar, swing=style.swing, tonic=tonic, mode=mode,
                    progression=tuple(progression), sevenths=style.sevenths, harmonic_minor=style.harmonic_minor,
                    density=density, dynamics=dynamics, crescendo=crescendo, moods=moods, reverb=style.reverb,
                    parts=tuple(parts), detail_seed=rng.getrandbits(32), caption_seed=rng.getrandbits(32))


# -- harmony ------------------------------------------------------------------------------------------
class Note(NamedTuple):
    """A note in beats (before swing); velocity is a multiplier of the part's base velocity."""

    start: float
    length: float
    pitch: int
    velocity: float


def _semitones(spec: SongSpec, degree: int, chord_root: int) -> int:
    """Semitones above the tonic of scale ``degree`` (any integer) heard over ``chord_root``."""
    scale = SCALES[spec.mode]
    value = scale[degree % 7] + 12 * (degree // 7)
    if spec.mode == "minor" and spec.harmonic_minor and chord_root % 7 == 4 and degree % 7 == 6:
        value += 1  # the leading tone of a major V in harmonic minor
    return value


def chord_degrees(spec: SongSpec, root: int) -> list[int]:
    """Scale degrees of the chord on ``root``: a triad, or a seventh chord for jazzy styles."""
    return [root + step for step in ((0, 2, 4, 6) if spec.sevenths else (0, 2, 4))]


def chord_pitches(spec: SongSpec, root: int, center: int) -> list[int]:
    """The chord's tones voiced closely around MIDI note ``center``, sorted."""
    pitches = []
    for degree in chord_degrees(spec, root):
        pitch_class = (spec.tonic + _semitones(spec, degree, root)) % 12
        pitch = center - 6 + (pitch_class - (center - 6)) % 12
        pitches.append(pitch)
    return sorted(pitches)


def _bass_root(spec: SongSpec, root: int, program: int) -> int:
    """The chord root in the bass instrument's low register."""
    low = 28 if instrument(program).family == "bass" or program == 58 else 36
    pitch_class = (spec.tonic + _semitones(spec, root, root)) % 12
    return low + (pitch_class - low) % 12


# -- parts --------------------------------------------------------------------------------------------
def _melody(spec: SongSpec, part: Part, chords: list[int], rng: random.Random) -> list[Note]:
    """4-bar phrases: motif, its sequence on the next chord, a contrasting bar, a cadence."""
    inst = INSTRUMENTS[part.program]
    bar = spec.beats_per_bar
    rhythms = RHYTHMS[bar]
    # Degrees whose pitch lies in the instrument's comfortable range (a few semitones inside it).
    base = 12 * ((inst.low + inst.high) // 2 // 12) + spec.tonic - 12
    playable = [d for d in range(-14, 30) if inst.low + 2 <= base + _semitones(spec, d, 0) <= inst.high - 2]
    low, high = min(playable), max(playable)
    current = rng.randint(low + (high - low) // 3, high - (high - low) // 3)

    def chord_tone_near(previous: int, root: int) -> int:
        tones = {d % 7 for d in chord_degrees(spec, root)}
        candidates = [d for d in range(max(low, previous - 4), min(high, previous + 4) + 1) if d % 7 in tones]
        if not candidates:
            return previous
        return rng.choices(candidates, weights=[1.0 / (1 + abs(d - previous)) for d in candidates])[0]

    def step_from(previous: int) -> int:
        move = rng.choices((-2, -1, 0, 1, 2), weights=(0.12, 0.34, 0.12, 0.3, 0.12))[0]
        if previous + move < low or previous + move > high:
            move = -move
        return min(high, max(low, previous + move))

    notes: list[Note] = []
    motif: list[tuple[float, float, int]] = []  # (onset, length, degree offset from the first note)
    rhythm_a, rhythm_b = rng.choice(rhythms[spec.density]), rng.choice(rhythms[spec.density])
    cadence = rng.choice(rhythms[0])
    for index, root in enumerate(chords):
        position = index % 4
        start = index * bar
        if position == 1 and motif and rng.random() < 0.7:  # sequence: the motif on this chord
            first = chord_tone_near(current, root)
            fits = [o for o in (0, -7, 7) if low <= first + o + min(m[2] for m in motif)
                    and first + o + max(m[2] for m in motif) <= high]
            if fits:
                for onset, length, offset in motif:
                    current = first + fits[0] + offset
                    notes.append(Note(start + onset, length, base + _semitones(spec, current, root), 1.0))
                continue
        rhythm = (rhythm_a, rhythm_a, rhythm_b, cadence)[position]
        bar_notes = []
        for onset, length in rhythm:
            strong = onset == 0 or (bar == 4 and onset == 2)
            current = chord_tone_near(current, root) if strong or position == 3 else step_from(current)
            if not strong and spec.density > 0 and rng.random() < 0.08:
                continue  # a breath
            bar_notes.append((onset, length, current))
        if position == 0 and bar_notes:
            motif = [(onset, length, degree - bar_notes[0][2]) for onset, length, degree in bar_notes]
        accent = 1.08 if position == 0 else 1.0
        notes += [Note(start + onset, length, base + _semitones(spec, degree, root), accent)
                  for onset, length, degree in bar_notes]
    return notes


def _strum(pitches: list[int], start: float, length: float, down: bool, velocity: float) -> list[Note]:
    order = pitches if down else pitches[::-1]
    return [Note(start + 0.02 * i, length - 0.02 * i, p, velocity) for i, p in enumerate(order)]


def _harmony(spec: SongSpec, part: Part, chords: list[int], rng: random.Random) -> list[Note]:
    bar = spec.beats_per_bar
    notes: list[Note] = []
    stab_rhythm = rng.choice(((0, 0.75, 1.5, 2.5, 3.25), (0.5, 1.5, 2.25, 3.5), (0, 1.5, 3)))
    for index, root in enumerate(chords):
        start = index * bar
        pitches = chord_pitches(spec, root, 62 if part.pattern != "power" else 52)
        pattern = part.pattern
        if pattern == "block":
            notes += [Note(start, bar, p, 1.0) for p in pitches]
        elif pattern == "half":
            for onset, length in ((0, bar / 2), (bar / 2, bar / 2)) if bar == 4 else ((0, 2), (2, 1)):
                notes += [Note(start + onset, length, p, 1.0 if onset == 0 else 0.85) for p in pitches]
        elif pattern == "pulse":
            for eighth in range(2 * bar):
                notes += [Note(start + eighth / 2, 0.4, p, 1.0 if eighth % 2 == 0 else 0.8) for p in pitches]
        elif pattern in ("arpeggio", "alberti"):
            tones = pitches + [pitches[0] + 12]
            order = [0, 2, 1, 2] if pattern == "alberti" else [0, 1, 2, 3, 2, 1]
            for eighth in range(2 * bar):
                pitch = tones[order[eighth % len(order)] % len(tones)] - (12 if pattern == "alberti" else 0)
                notes.append(Note(start + eighth / 2, 1.0 if pattern == "arpeggio" else 0.5, pitch,
                                  1.0 if eighth % 2 == 0 else 0.85))
        elif pattern == "strum":
            onsets = (0, 1, 1.5, 2.5, 3, 3.5) if bar == 4 else (0, 1, 1.5, 2, 2.5)
            voiced = [pitches[0] - 12] + pitches + [pitches[0] + 12]
            for i, onset in enumerate(onsets):
                end = onsets[i + 1] if i + 1 < len(onsets) else bar
                down = onset == int(onset)
                notes += _strum(voiced, start + onset, end - onset, down, 1.0 if down else 0.8)
        elif pattern == "power":
            root_pitch = pitches[0] if pitches[0] >= 45 else pitches[0] + 12
            for eighth in range(2 * bar):
                notes += [Note(start + eighth / 2, 0.45, p, 1.1 if eighth % 2 == 0 else 0.9)
                          for p in (root_pitch, root_pitch + 7, root_pitch + 12)]
        elif pattern == "offbeat":
            for onset in (1, 3) if bar == 4 else (1, 2):
                notes += [Note(start + onset, 0.35, p, 1.0) for p in pitches]
        elif pattern == "stabs":
            for onset in stab_rhythm if bar == 4 else (0.5, 1.5):
                notes += [Note(start + onset, 0.22, p, 1.0) for p in pitches]
        elif pattern == "waltz":
            for onset in (1, 2):
                notes += [Note(start + onset, 0.8, p, 0.9) for p in pitches]
        elif pattern == "march":
            for onset in (1, 3) if bar == 4 else (1, 2):
                notes += [Note(start + onset, 0.5, p, 0.9) for p in pitches]
        elif pattern == "comp":
            onsets = sorted(rng.sample((0, 0.5, 1.5, 2, 2.5, 3.5) if bar == 4 else (0, 0.5, 1.5, 2), k=2))
            for onset in onsets:
                length = rng.choice((0.4, 0.6, 1.0))
                notes += [Note(start + onset, length, p, rng.uniform(0.8, 1.0)) for p in pitches]
        elif pattern == "bossa":
            onsets = ((0, 1.5, 3) if index % 2 == 0 else (1, 2.5)) if bar == 4 else (0, 1.5)
            for onset in onsets:
                notes += [Note(start + onset, 0.6, p, 0.95) for p in pitches]
        else:
            raise ValueError(f"unknown harmony pattern {pattern!r}")
    return notes


def _bass(spec: SongSpec, part: Part, chords: list[int], rng: random.Random) -> list[Note]:
    bar = spec.beats_per_bar
    notes: list[Note] = []
    for index, root in enumerate(chords):
        start = index * bar
        pitch = _bass_root(spec, root, part.program)
        fifth = pitch + 7 if pitch + 7 <= 55 else pitch - 5
        octave = pitch + 12
        third = pitch + (_semitones(spec, root + 2, root) - _semitones(spec, root, root)) % 12
        next_root = _bass_root(spec, chords[(index + 1) % len(chords)], part.program)
        pattern = part.pattern
        if pattern == "whole":
            steps = [(0, bar, pitch)]
        elif pattern == "half":
            steps = [(0, 2, pitch), (2, 2, fifth)] if bar == 4 else [(0, 3, pitch)]
        elif pattern == "quarters":
            steps = [(b, 1, (pitch, pitch, fifth, pitch)[b % 4]) for b in range(bar)]
        elif pattern == "eighths":
            steps = [(e / 2, 0.45, pitch) for e in range(2 * bar)]
        elif pattern == "root_fifth":
            steps = [(0, 1, pitch), (2, 1, fifth)] if bar == 4 else [(0, 1, pitch)]
        elif pattern == "waltz":
            steps = [(0, 1, pitch if index % 2 == 0 else fifth)]
        elif pattern == "walking":
            approach = next_root + rng.choice((-1, 1))
            line = (pitch, third, fifth, approach) if bar == 4 else (pitch, fifth, approach)
            steps = [(b, 0.9, note) for b, note in enumerate(line)]
        elif pattern == "offbeat":
            steps = [(e + 0.5, 0.4, pitch) for e in range(bar)]
        elif pattern == "octaves":
            steps = [(e / 2, 0.4, pitch if e % 2 == 0 else octave) for e in range(2 * bar)]
        elif pattern == "funk":
            onsets = (0, 0.75, 1.5, 2, 2.75, 3.25, 3.5) if bar == 4 else (0, 0.75, 1.5, 2)
            steps = [(o, 0.22, rng.choice((pitch, pitch, octave, pitch + 10, fifth))) for o in onsets]
        elif pattern == "bossa":
            steps = [(0, 1.5, pitch), (1.5, 0.5, fifth), (2, 1.5, fifth), (3.5, 0.5, pitch)][: 4 if bar == 4 else 2]
        elif pattern == "reggae":
            steps = [(0, 1, pitch), (1.5, 0.5, fifth), (2, 0.5, octave), (2.5, 1, third)]
        elif pattern == "hiphop":
            steps = [(0, 1.5, pitch), (1.75, 0.5, pitch), (2.5, 1, fifth)]
        elif pattern == "pedal":
            tonic = _bass_root(spec, 0, part.program)
            steps = [(0, bar, tonic)]
        else:
            raise ValueError(f"unknown bass pattern {pattern!r}")
        notes += [Note(start + onset, length, note, 1.0 if onset == 0 else 0.9) for onset, length, note in steps]
    return notes


_HIT = {"X": 1.25, "x": 1.0, "g": 0.5}


def _drums(spec: SongSpec, part: Part, bars: int, rng: random.Random) -> list[Note]:
    pattern = DRUM_PATTERNS[part.pattern]
    bar = spec.beats_per_bar
    steps = 4 * bar
    notes: list[Note] = []
    fills = spec.dynamics != "soft" and part.pattern not in ("swing", "bossa", "waltz_ride")
    for index in range(bars):
        start = index * bar
        fill = fills and index % 4 == 3 and rng.random() < 0.5
        for drum, hits in pattern.items():
            for step, hit in enumerate(hits):
                if hit != "." and not (fill and step >= steps - 4):
                    notes.append(Note(start + step / 4, 0.25, drum, _HIT[hit]))
        if fill:
            toms = rng.choice(((SNARE, SNARE, SNARE, SNARE), (SNARE, HIGH_TOM, MID_TOM, LOW_TOM),
                               (HIGH_TOM, HIGH_TOM, LOW_TOM, LOW_TOM)))
            notes += [Note(start + (steps - 4 + i) / 4, 0.25, drum, 0.8 + 0.1 * i) for i, drum in enumerate(toms)]
        if index % 4 == 0 and spec.dynamics != "soft" and (index > 0 or rng.random() < 0.5):
            notes.append(Note(start, 1.0, CRASH, 1.0))
    return notes


# -- MIDI ---------------------------------------------------------------------------------------------
def swung(beat: float, swing: float) -> float:
    """Where ``beat`` falls with swing: each beat's first half stretches to ``swing`` of it."""
    whole = math.floor(beat)
    fraction = beat - whole
    if fraction <= 0.5:
        return whole + fraction * 2 * swing
    return whole + swing + (fraction - 0.5) * 2 * (1 - swing)


def _velocity(spec: SongSpec, role: str, scale: float, beat: float, total: float, rng: random.Random) -> int:
    level = (BASE_VELOCITY[spec.dynamics] + ROLE_VELOCITY[role]) * scale
    if spec.crescendo:
        level *= 0.55 + 0.45 * min(1.0, beat / total)
    return max(1, min(127, round(level + rng.randint(-5, 5))))


def _track(spec: SongSpec, part: Part, notes: list[Note], total_beats: float, rng: random.Random) -> mido.MidiTrack:
    """One part's track: program, mix controllers, then its notes (swing, humanized timing)."""
    track = mido.MidiTrack()
    channel = part.channel
    track.append(mido.MetaMessage("track_name", name=f"{part.role}: {part.name}", time=0))
    track.append(mido.Message("program_change", channel=channel, program=part.program, time=0))
    for control, value in ((7, ROLE_VOLUME[part.role]), (10, ROLE_PAN[part.role]), (91, spec.reverb)):
        track.append(mido.Message("control_change", channel=channel, control=control, value=value, time=0))
    jitter = 3 if part.role == "drums" else 6
    timed: list[list[int]] = []  # [on, off, pitch, velocity] in ticks
    for note in sorted(notes, key=lambda n: (n.start, n.pitch)):
        on = round(swung(note.start, spec.swing) * TICKS_PER_BEAT)
        off = round(swung(note.start + note.length, spec.swing) * TICKS_PER_BEAT) - 8
        if on > 0:
            on = max(0, on + rng.randint(-jitter, jitter))
        timed.append([on, max(on + 10, off), note.pitch, _velocity(spec, part.role, note.velocity, note.start,
                                                                   total_beats, rng)])
    latest: dict[int, list[int]] = {}
    for item in timed:  # a repeated pitch cuts the previous note short instead of being cut by its note-off
        previous = latest.get(item[2])
        if previous is not None and previous[1] > item[0]:
            previous[1] = max(previous[0] + 1, item[0])
        latest[item[2]] = item
    events = []  # (tick, order, pitch, velocity): note-offs (order 0) sort before note-ons at one tick
    for on, off, pitch, velocity in timed:
        events.append((on, 1, pitch, velocity))
        events.append((off, 0, pitch, 0))
    events.sort()
    now = 0
    for tick, order, pitch, velocity in events:
        kind = "note_on" if order == 1 else "note_off"
        track.append(mido.Message(kind, channel=channel, note=pitch, velocity=velocity, time=tick - now))
        now = tick
    end = max(now, round(total_beats * TICKS_PER_BEAT))
    track.append(mido.MetaMessage("end_of_track", time=end - now))
    return track


def compose(spec: SongSpec, seconds: float) -> mido.MidiFile:
    """The MIDI file (type 1: a conductor track, then one track per part) of at least ``seconds``
    plus one bar, so rendering never runs out of music before the clip ends."""
    rng = random.Random(spec.detail_seed)
    bar_seconds = spec.beats_per_bar * 60.0 / spec.tempo
    bars = math.ceil(seconds / bar_seconds) + 1
    chords = [spec.progression[i % len(spec.progression)] for i in range(bars)]
    total_beats = float(bars * spec.beats_per_bar)
    midi = mido.MidiFile(type=1, ticks_per_beat=TICKS_PER_BEAT)
    conductor = mido.MidiTrack()
    conductor.append(mido.MetaMessage("track_name", name=f"tokenwave corpus clip {spec.index}", time=0))
    conductor.append(mido.MetaMessage("time_signature", numerator=spec.beats_per_bar, denominator=4, time=0))
    conductor.append(mido.MetaMessage("key_signature", key=spec.midi_key, time=0))
    conductor.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(spec.tempo), time=0))
    conductor.append(mido.MetaMessage("end_of_track", time=round(total_beats * TICKS_PER_BEAT)))
    midi.tracks.append(conductor)
    for part in spec.parts:
        if part.role == "lead":
            notes = _melody(spec, part, chords, rng)
        elif part.role == "harmony":
            notes = _harmony(spec, part, chords, rng)
        elif part.role == "bass":
            notes = _bass(spec, part, chords, rng)
        else:
            notes = _drums(spec, part, bars, rng)
        midi.tracks.append(_track(spec, part, notes, total_beats, rng))
    return midi


__all__ = ["ARRANGEMENTS", "Note", "Part", "SongSpec", "TICKS_PER_BEAT", "chord_pitches", "clip_random", "compose",
           "sample_spec", "swung"]
