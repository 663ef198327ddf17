"""The General MIDI programs the corpus plays, named the way captions name them.

Programs are 0-based (GM program 1, "Acoustic Grand Piano", is 0 here and in MIDI messages).
Each instrument has a canonical caption name, a few synonyms a caption may use instead, a
coarse family (for captions and for instrument-family classifiers trained on the corpus) and
the note range it plays a melody in. Drum kits are programs on MIDI channel 10 (bank 128);
a soundfont that lacks one falls back to the standard kit, so any kit is safe to ask for.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Instrument:
    """program: GM program (0-127); name: caption name; low/high: melody range (MIDI notes)."""

    program: int
    name: str
    family: str
    low: int
    high: int
    synonyms: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Every way a caption may name this instrument, canonical name first."""
        return (self.name, *self.synonyms)


_TABLE = (
    Instrument(0, "piano", "keys", 55, 84, ("grand piano", "acoustic piano")),
    Instrument(4, "electric piano", "keys", 55, 81, ("rhodes", "electric keys")),
    Instrument(6, "harpsichord", "keys", 55, 84),
    Instrument(7, "clavinet", "keys", 55, 79, ("funky clavinet",)),
    Instrument(8, "celesta", "mallets", 67, 91),
    Instrument(10, "music box", "mallets", 67, 91),
    Instrument(11, "vibraphone", "mallets", 60, 84, ("vibes",)),
    Instrument(12, "marimba", "mallets", 60, 84),
    Instrument(16, "organ", "organ", 55, 81, ("hammond organ", "drawbar organ")),
    Instrument(19, "church organ", "organ", 55, 81, ("pipe organ",)),
    Instrument(21, "accordion", "organ", 60, 81),
    Instrument(22, "harmonica", "woodwinds", 60, 84, ("blues harp",)),
    Instrument(24, "nylon guitar", "guitar", 52, 76, ("classical guitar", "nylon-string guitar")),
    Instrument(25, "acoustic guitar", "guitar", 52, 76, ("steel-string guitar",)),
    Instrument(26, "jazz guitar", "guitar", 52, 76, ("hollow-body guitar",)),
    Instrument(27, "electric guitar", "guitar", 52, 79, ("clean electric guitar", "clean guitar")),
    Instrument(29, "overdriven guitar", "guitar", 52, 79, ("crunchy guitar", "overdrive guitar")),
    Instrument(30, "distorted guitar", "guitar", 52, 79, ("distortion guitar", "heavy guitar")),
    Instrument(32, "upright bass", "bass", 28, 50, ("double bass", "acoustic bass")),
    Instrument(33, "bass guitar", "bass", 28, 52, ("electric bass", "fingered bass")),
    Instrument(34, "picked bass", "bass", 28, 52, ("picked bass guitar",)),
    Instrument(36, "slap bass", "bass", 28, 52, ("slapped bass",)),
    Instrument(38, "synth bass", "bass", 28, 52, ("analog bass", "synthesizer bass")),
    Instrument(39, "deep synth bass", "bass", 28, 52, ("sub bass",)),
    Instrument(40, "violin", "strings", 62, 91, ("solo violin",)),
    Instrument(42, "cello", "strings", 48, 72, ("solo cello",)),
    Instrument(45, "pizzicato strings", "strings", 55, 81, ("plucked strings",)),
    Instrument(46, "harp", "strings", 55, 86, ("concert harp",)),
    Instrument(48, "strings", "strings", 55, 84, ("string section", "string ensemble")),
    Instrument(49, "slow strings", "strings", 55, 84, ("lush strings",)),
    Instrument(50, "synth strings", "synth", 55, 84, ("string synth",)),
    Instrument(52, "choir", "voice", 55, 79, ("choir voices", "vocal choir")),
    Instrument(56, "trumpet", "brass", 58, 82),
    Instrument(57, "trombone", "brass", 46, 70),
    Instrument(58, "tuba", "brass", 28, 50),
    Instrument(59, "muted trumpet", "brass", 58, 82, ("harmon-muted trumpet",)),
    Instrument(60, "french horn", "brass", 50, 74, ("horn",)),
    Instrument(61, "brass section", "brass", 55, 79, ("brass", "horn section")),
    Instrument(64, "soprano sax", "woodwinds", 60, 84, ("soprano saxophone",)),
    Instrument(65, "alto sax", "woodwinds", 56, 80, ("alto saxophone",)),
    Instrument(66, "tenor sax", "woodwinds", 50, 75, ("tenor saxophone",)),
    Instrument(68, "oboe", "woodwinds", 60, 86),
    Instrument(70, "bassoon", "woodwinds", 40, 67),
    Instrument(71, "clarinet", "woodwinds", 52, 84),
    Instrument(72, "piccolo", "woodwinds", 74, 96),
    Instrument(73, "flute", "woodwinds", 62, 91),
    Instrument(75, "pan flute", "woodwinds", 62, 88, ("pan pipes",)),
    Instrument(80, "square lead", "synth", 60, 84, ("chiptune lead", "square-wave synth")),
    Instrument(81, "saw lead", "synth", 60, 84, ("sawtooth synth", "synth lead")),
    Instrument(88, "synth pad", "synth", 55, 79, ("new age pad", "pad")),
    Instrument(89, "warm pad", "synth", 55, 79, ("soft synth pad",)),
    Instrument(90, "polysynth", "synth", 55, 79, ("poly synth",)),
    Instrument(94, "halo pad", "synth", 55, 79, ("airy pad",)),
    Instrument(105, "banjo", "guitar", 55, 79),
    Instrument(110, "fiddle", "strings", 62, 88, ("country fiddle",)),
    Instrument(114, "steel drums", "mallets", 60, 84, ("steelpan",)),
)

INSTRUMENTS: dict[int, Instrument] = {instrument.program: instrument for instrument in _TABLE}

# GM drum kits (programs on channel 10) and their caption names.
DRUM_KITS: dict[int, str] = {0: "drums", 8: "room drums", 16: "power drums", 24: "electronic drums",
                             25: "808 drums", 32: "jazz drums", 40: "brushed drums", 48: "orchestral percussion"}
DRUM_CHANNEL = 9  # MIDI channel 10, 0-based


def instrument(program: int) -> Instrument:
    """The table entry of GM ``program``; raises a clear error for programs the recipe never plays."""
    try:
        return INSTRUMENTS[program]
    except KeyError:
        raise KeyError(f"GM program {program} is not in the corpus instrument table "
                       f"(known: {sorted(INSTRUMENTS)})") from None


__all__ = ["DRUM_CHANNEL", "DRUM_KITS", "INSTRUMENTS", "Instrument", "instrument"]
