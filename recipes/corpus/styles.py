"""Style presets: what each kind of piece draws its tempo, meter, instruments and patterns from.

A :class:`Style` only lists choices; :func:`compose.sample_spec` draws among them with the
clip's random generator, and :mod:`compose` knows how to play every pattern named here.

Drum patterns are written on a 16th-note grid, one string per drum (GM note number), 16 steps
for a 4/4 bar and 12 for a 3/4 bar: ``X`` accent, ``x`` normal, ``g`` ghost note, ``.`` rest.
"""
from __future__ import annotations

from dataclasses import dataclass

# GM percussion notes (channel 10).
KICK, SIDE_STICK, SNARE, CLAP, ELECTRIC_SNARE = 36, 37, 38, 39, 40
CLOSED_HAT, PEDAL_HAT, OPEN_HAT, CRASH, RIDE = 42, 44, 46, 49, 51
LOW_TOM, MID_TOM, HIGH_TOM, SHAKER = 45, 47, 50, 70

DRUM_PATTERNS: dict[str, dict[int, str]] = {
    "rock": {KICK: "x.......x.x.....", SNARE: "....X.......X...", CLOSED_HAT: "X.x.X.x.X.x.X.x."},
    "rock_driving": {KICK: "x...x...x...x...", SNARE: "....X.......X...", CLOSED_HAT: "xxxxxxxxxxxxxxxx"},
    "halftime": {KICK: "x.....x...x.....", SNARE: "........X.......", CLOSED_HAT: "x.x.x.x.x.x.x.x."},
    "ballad": {KICK: "x.........x.....", SIDE_STICK: "....x.......x...", CLOSED_HAT: "x.g.x.g.x.g.x.g."},
    "four_floor": {KICK: "X...X...X...X...", CLAP: "....x.......x...", OPEN_HAT: "..x...x...x...x.",
                   CLOSED_HAT: "g.g.g.g.g.g.g.g."},
    "techno": {KICK: "X...X...X...X...", ELECTRIC_SNARE: "....x.......x...", CLOSED_HAT: "..x...x...x...x.",
               SHAKER: "gggggggggggggggg"},
    "swing": {RIDE: "x...x.x.x...x.x.", PEDAL_HAT: "....x.......x...", KICK: "g...g...g...g..."},
    "boom_bap": {KICK: "x......x..x.....", SNARE: "....X.......X...", CLOSED_HAT: "x.x.x.x.x.x.x.x."},
    "lofi": {KICK: "x.....x...x.....", SNARE: "....x.......x...", CLOSED_HAT: "x.gxx.gxx.gxx.gx"},
    "bossa": {KICK: "x..x....x..x....", SIDE_STICK: "x..x..x...x..x..", CLOSED_HAT: "g.g.g.g.g.g.g.g."},
    "funk": {KICK: "x.x.......x..x..", SNARE: "....X..g.g..X..g", CLOSED_HAT: "xgxgxgxgxgxgxgxg"},
    "reggae": {KICK: "........x.......", SIDE_STICK: "........X.......", CLOSED_HAT: "x.x.x.x.x.x.x.x."},
    "march": {SNARE: "X.xxX.x.X.xxX.x.", KICK: "x.......x......."},
    "train": {KICK: "x.......x.......", SNARE: "g.g.X.g.g.g.X.g."},
    "waltz": {KICK: "x...........", CLOSED_HAT: "....x...x...", SIDE_STICK: "........x..."},
    "waltz_ride": {RIDE: "x...x.xx....", PEDAL_HAT: "....x...x...", KICK: "g..........."},
}

# Chord progressions as scale degrees (0 = tonic), one chord per bar.
PROGRESSIONS: dict[str, dict[str, tuple[tuple[int, ...], ...]]] = {
    "pop": {
        "major": ((0, 4, 5, 3), (0, 5, 3, 4), (0, 3, 4, 0), (0, 3, 0, 4), (5, 3, 0, 4), (0, 4, 3, 4),
                  (0, 1, 4, 0), (0, 2, 3, 4), (0, 3, 5, 4)),
        "minor": ((0, 5, 2, 6), (0, 3, 4, 0), (0, 6, 5, 6), (0, 3, 6, 2), (0, 5, 3, 4), (0, 6, 5, 4),
                  (0, 3, 0, 4), (0, 2, 6, 3)),
    },
    "jazz": {
        "major": ((1, 4, 0, 0), (0, 5, 1, 4), (2, 5, 1, 4), (0, 3, 1, 4)),
        "minor": ((1, 4, 0, 0), (0, 3, 1, 4), (0, 5, 1, 4)),
    },
    "blues": {
        "major": ((0, 0, 0, 0, 3, 3, 0, 0, 4, 3, 0, 4), (0, 3, 4, 3)),
        "minor": ((0, 0, 0, 0, 3, 3, 0, 0, 4, 3, 0, 4), (0, 6, 5, 4)),
    },
    "vamp": {
        "major": ((0, 0, 3, 3), (0, 3, 0, 3), (0, 0, 5, 5)),
        "minor": ((0, 0, 3, 3), (0, 0, 6, 6), (0, 3, 0, 3)),
    },
}

# Melody rhythms: (onset, length) in beats within one bar, by density (0 sparse .. 3 busy).
RHYTHMS: dict[int, dict[int, tuple[tuple[tuple[float, float], ...], ...]]] = {
    4: {
        0: (((0, 2), (2, 2)), ((0, 3), (3, 1)), ((0, 4),), ((0, 1.5), (1.5, 0.5), (2, 2))),
        1: (((0, 1), (1, 1), (2, 1), (3, 1)), ((0, 1), (1, 0.5), (1.5, 0.5), (2, 2)),
            ((0, 1.5), (1.5, 0.5), (2, 1), (3, 1)), ((0, 2), (2, 1), (3, 1))),
        2: (((0, 0.5), (0.5, 0.5), (1, 0.5), (1.5, 0.5), (2, 1), (3, 1)),
            ((0, 1), (1, 0.5), (1.5, 0.5), (2, 0.5), (2.5, 0.5), (3, 1)),
            ((0, 0.5), (0.5, 1), (1.5, 0.5), (2, 1.5), (3.5, 0.5))),
        3: (((0, 0.75), (0.75, 0.75), (1.5, 1), (2.5, 0.5), (3, 0.5), (3.5, 0.5)),
            ((0.5, 1), (1.5, 1), (2.5, 1.5)),
            ((0, 0.25), (0.25, 0.25), (0.5, 0.5), (1, 0.5), (1.5, 1), (2.5, 0.5), (3, 1))),
    },
    3: {
        0: (((0, 2), (2, 1)), ((0, 3),), ((0, 1.5), (1.5, 1.5))),
        1: (((0, 1), (1, 1), (2, 1)), ((0, 1.5), (1.5, 0.5), (2, 1)), ((0, 2), (2, 1))),
        2: (((0, 0.5), (0.5, 0.5), (1, 1), (2, 1)), ((0, 1), (1, 0.5), (1.5, 0.5), (2, 1))),
        3: (((0, 0.5), (0.5, 0.5), (1, 0.5), (1.5, 0.5), (2, 1)), ((0, 0.75), (0.75, 0.25), (1, 1), (2, 1))),
    },
}


@dataclass(frozen=True)
class Style:
    """The choices one style offers (programs are GM, 0-based; weights need not sum to 1).

    nouns: how captions call a piece of this style; genre: the metadata ``genre``; major: the
    probability of a major key; swing: where the off-beat eighth falls (0.5 straight);
    harmonic_minor: minor keys use a major V chord (raised leading tone); reverb: MIDI CC 91.
    """

    name: str
    nouns: tuple[str, ...]
    genre: str
    tempo: tuple[int, int]
    leads: tuple[int, ...]
    harmonies: tuple[int, ...]
    basses: tuple[int, ...]
    harmony_patterns: tuple[str, ...]
    bass_patterns: tuple[str, ...]
    drum_patterns: tuple[str, ...]
    drum_kits: tuple[int, ...]
    drum_probability: float
    densities: tuple[int, ...]
    dynamics: tuple[float, float, float]  # weights of soft, medium, loud
    moods_major: tuple[str, ...]
    moods_minor: tuple[str, ...]
    progressions: str = "pop"
    beats_per_bar: int = 4
    major: float = 0.5
    swing: float = 0.5
    sevenths: bool = False
    harmonic_minor: bool = False
    reverb: int = 40


STYLES: dict[str, Style] = {style.name: style for style in (
    Style("ballad", ("ballad", "ballad instrumental"), "pop", (58, 84), leads=(0, 40, 42, 73, 71, 68, 24, 4, 46, 65),
          harmonies=(0, 48, 49, 88, 89, 4, 24, 46), basses=(32, 33), harmony_patterns=("block", "arpeggio", "half"),
          bass_patterns=("whole", "half"), drum_patterns=("ballad",), drum_kits=(0, 40, 8), drum_probability=0.45,
          densities=(0, 1), dynamics=(0.5, 0.45, 0.05), moods_major=("tender", "romantic", "hopeful", "warm"),
          moods_minor=("sad", "melancholic", "longing", "wistful"), major=0.45, harmonic_minor=True, reverb=70),
    Style("rock", ("rock song", "rock track", "rock instrumental"), "rock", (100, 152), leads=(30, 29, 27, 16, 81),
          harmonies=(30, 29, 27, 25, 16), basses=(33, 34), harmony_patterns=("power", "strum"),
          bass_patterns=("eighths", "root_fifth"), drum_patterns=("rock", "rock_driving", "halftime"),
          drum_kits=(0, 16, 8), drum_probability=0.95, densities=(1, 2), dynamics=(0.0, 0.35, 0.65),
          moods_major=("energetic", "upbeat", "driving", "confident"),
          moods_minor=("dark", "aggressive", "brooding", "intense"), progressions="blues", major=0.55),
    Style("waltz", ("waltz",), "classical", (90, 160), leads=(40, 73, 21, 0, 71, 68, 10),
          harmonies=(0, 48, 21, 45), basses=(32, 33, 58), harmony_patterns=("waltz",), bass_patterns=("waltz",),
          drum_patterns=("waltz",), drum_kits=(0, 40, 48), drum_probability=0.3, densities=(0, 1),
          dynamics=(0.3, 0.6, 0.1), moods_major=("graceful", "elegant", "cheerful", "nostalgic"),
          moods_minor=("melancholic", "mysterious", "bittersweet", "nostalgic"), beats_per_bar=3,
          harmonic_minor=True, reverb=60),
    Style("electronic", ("electronic track", "dance track", "techno track", "house tune"), "electronic", (118, 140),
          leads=(81, 80, 90), harmonies=(88, 89, 90, 94, 50), basses=(38, 39),
          harmony_patterns=("block", "stabs", "pulse"), bass_patterns=("offbeat", "octaves", "eighths"),
          drum_patterns=("four_floor", "techno"), drum_kits=(24, 25), drum_probability=1.0, densities=(1, 2, 3),
          dynamics=(0.0, 0.4, 0.6), moods_major=("euphoric", "energetic", "bright", "uplifting"),
          moods_minor=("hypnotic", "dark", "driving", "moody"), progressions="vamp", major=0.4),
    Style("jazz", ("jazz tune", "swing tune", "jazz piece"), "jazz", (96, 190), leads=(66, 65, 56, 59, 11, 0, 71, 26),
          harmonies=(0, 4, 26, 11), basses=(32,), harmony_patterns=("comp", "block"), bass_patterns=("walking",),
          drum_patterns=("swing",), drum_kits=(32, 40), drum_probability=0.9, densities=(1, 2),
          dynamics=(0.35, 0.55, 0.1), moods_major=("relaxed", "smooth", "playful", "laid-back"),
          moods_minor=("smoky", "moody", "mysterious", "late-night"), progressions="jazz", major=0.6, swing=0.64,
          sevenths=True, harmonic_minor=True, reverb=50),
    Style("hip hop", ("hip hop beat", "lo-fi beat", "lo-fi hip hop track"), "hip hop", (72, 96),
          leads=(4, 11, 73, 59, 0, 12), harmonies=(4, 0, 88, 26), basses=(33, 38, 39),
          harmony_patterns=("block", "half", "comp"), bass_patterns=("half", "hiphop"),
          drum_patterns=("boom_bap", "lofi"), drum_kits=(25, 0, 24), drum_probability=1.0, densities=(1, 2),
          dynamics=(0.3, 0.6, 0.1), moods_major=("chill", "mellow", "laid-back", "warm"),
          moods_minor=("moody", "nostalgic", "gritty", "dreamy"), major=0.4, swing=0.58, sevenths=True),
    Style("folk", ("folk song", "country tune", "folk tune"), "folk", (84, 132), leads=(110, 22, 105, 73, 25, 21),
          harmonies=(25, 24, 105), basses=(32, 33), harmony_patterns=("strum", "arpeggio"),
          bass_patterns=("root_fifth",), drum_patterns=("train", "rock"), drum_kits=(0, 40, 8), drum_probability=0.5,
          densities=(1, 2), dynamics=(0.3, 0.6, 0.1), moods_major=("cheerful", "warm", "rustic", "carefree"),
          moods_minor=("wistful", "somber", "haunting", "rustic"), progressions="blues", major=0.65),
    Style("ambient", ("ambient piece", "ambient soundscape", "atmospheric piece"), "ambient", (50, 76),
          leads=(8, 10, 11, 73, 46, 94, 75, 52), harmonies=(88, 89, 94, 49, 52), basses=(38, 32),
          harmony_patterns=("block",), bass_patterns=("pedal",), drum_patterns=(), drum_kits=(0,),
          drum_probability=0.0, densities=(0,), dynamics=(0.8, 0.2, 0.0),
          moods_major=("dreamy", "peaceful", "serene", "airy"),
          moods_minor=("ethereal", "dark", "introspective", "haunting"), reverb=110),
    Style("bossa nova", ("bossa nova", "bossa nova tune"), "latin", (118, 148), leads=(73, 65, 11, 24, 64),
          harmonies=(24, 0, 4), basses=(32, 33), harmony_patterns=("bossa",), bass_patterns=("bossa",),
          drum_patterns=("bossa",), drum_kits=(0, 40), drum_probability=0.85, densities=(1, 2),
          dynamics=(0.5, 0.5, 0.0), moods_major=("relaxed", "sunny", "breezy", "romantic"),
          moods_minor=("melancholic", "wistful", "sultry", "relaxed"), progressions="jazz", sevenths=True,
          harmonic_minor=True, reverb=50),
    Style("funk", ("funk groove", "funk track"), "funk", (94, 118), leads=(61, 56, 65, 7, 27),
          harmonies=(7, 27, 4, 16), basses=(36, 33), harmony_patterns=("stabs",), bass_patterns=("funk",),
          drum_patterns=("funk",), drum_kits=(0, 8), drum_probability=1.0, densities=(2, 3),
          dynamics=(0.0, 0.5, 0.5), moods_major=("groovy", "funky", "playful", "upbeat"),
          moods_minor=("groovy", "gritty", "tense", "funky"), progressions="vamp", major=0.45, sevenths=True,
          reverb=25),
    Style("classical", ("classical piece", "chamber piece", "piece in classical style"), "classical", (66, 126),
          leads=(40, 73, 68, 71, 42, 0, 6, 60), harmonies=(48, 0, 6, 46, 45), basses=(32, 70, 42),
          harmony_patterns=("alberti", "arpeggio", "block"), bass_patterns=("half", "quarters"), drum_patterns=(),
          drum_kits=(0,), drum_probability=0.0, densities=(1, 2), dynamics=(0.4, 0.5, 0.1),
          moods_major=("elegant", "bright", "graceful", "noble"),
          moods_minor=("dramatic", "somber", "tragic", "stormy"), harmonic_minor=True, reverb=70),
    Style("reggae", ("reggae tune", "reggae groove"), "reggae", (66, 92), leads=(16, 73, 56, 114, 27),
          harmonies=(16, 27, 0), basses=(33,), harmony_patterns=("offbeat",), bass_patterns=("reggae",),
          drum_patterns=("reggae",), drum_kits=(0,), drum_probability=1.0, densities=(1, 2),
          dynamics=(0.2, 0.7, 0.1), moods_major=("sunny", "laid-back", "happy", "easygoing"),
          moods_minor=("rootsy", "moody", "laid-back", "hypnotic"), major=0.55),
    Style("march", ("march", "military march"), "march", (100, 126), leads=(56, 72, 73, 60, 61),
          harmonies=(61, 48, 60), basses=(58, 57), harmony_patterns=("march",), bass_patterns=("half",),
          drum_patterns=("march",), drum_kits=(48, 0), drum_probability=1.0, densities=(1, 2),
          dynamics=(0.0, 0.4, 0.6), moods_major=("triumphant", "proud", "heroic", "festive"),
          moods_minor=("solemn", "heroic", "stern", "dramatic"), major=0.7, harmonic_minor=True),
    Style("lullaby", ("lullaby",), "children", (56, 80), leads=(10, 8, 73, 46, 11), harmonies=(46, 0, 89),
          basses=(32,), harmony_patterns=("arpeggio", "waltz"), bass_patterns=("waltz",), drum_patterns=(),
          drum_kits=(0,), drum_probability=0.0, densities=(0, 1), dynamics=(0.9, 0.1, 0.0),
          moods_major=("gentle", "soothing", "sweet", "innocent"), moods_minor=("gentle", "bittersweet", "wistful"),
          beats_per_bar=3, major=0.75, harmonic_minor=True, reverb=80),
)}

__all__ = ["DRUM_PATTERNS", "PROGRESSIONS", "RHYTHMS", "STYLES", "Style"]
