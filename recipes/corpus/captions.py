"""Captions in varied natural phrasing, and audiocraft-style metadata, from a clip's parameters.

Every fact a caption states comes from the :class:`~compose.SongSpec` the MIDI was played from:
the instrument it names first is the featured part's GM program (by its name or a synonym from
:mod:`instruments`), a tempo written as a number is the MIDI tempo, the key is the MIDI key, the
tempo word follows the bpm (:func:`tempo_word`). Which facts a caption states, their order and
wording are drawn from the clip's ``caption_seed``.
"""
from __future__ import annotations

import random

from pathlib import Path

from .compose import SongSpec
from .instruments import DRUM_KITS, INSTRUMENTS, instrument
from .scores import GENRE, NOUNS, Piece
from .styles import STYLES

TEMPO_WORDS = {"slow": ("slow", "slow-paced", "leisurely"),
               "moderate": ("mid-tempo", "moderately paced", "medium-tempo"),
               "upbeat": ("upbeat", "lively", "brisk"), "fast": ("fast", "fast-paced", "up-tempo")}
DYNAMICS_PHRASES = {"soft": ("played softly", "quiet and gentle", "soft and delicate"),
                    "medium": ("", "", "at a comfortable volume"),
                    "loud": ("played loud", "loud and punchy", "big and powerful")}
CRESCENDO_PHRASES = ("that slowly builds", "building in intensity", "growing louder as it goes")
# How often a caption states the key (with its mode), the bpm and the genre (recipe version 2 states
# them more often than version 1's 0.6 / 0.6 / sometimes: prompts that name them should be followed).
KEY_SHARE, BPM_SHARE, GENRE_SHARE = 0.9, 0.85, 0.6


def tempo_word(bpm: int) -> str:
    """slow (< 76 bpm), moderate (< 100), upbeat (< 128), fast."""
    if bpm < 76:
        return "slow"
    if bpm < 100:
        return "moderate"
    if bpm < 128:
        return "upbeat"
    return "fast"


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _part_name(spec: SongSpec, role: str, rng: random.Random) -> str | None:
    part = spec.part(role)
    if part is None:
        return None
    if role == "drums":
        return DRUM_KITS[part.program] if rng.random() < 0.5 else "drums"
    names = instrument(part.program).names
    return names[0] if rng.random() < 0.6 else rng.choice(names)


def caption(spec: SongSpec) -> str:
    """One caption for the clip, e.g. ``"a slow, sad piano ballad in A minor"``."""
    rng = random.Random(spec.caption_seed)
    style = STYLES[spec.style]
    noun = rng.choice(style.nouns)
    tempo = rng.choice(TEMPO_WORDS[tempo_word(spec.tempo)])
    mood = _join(list(spec.moods))
    featured = spec.featured
    lead = _part_name(spec, featured.role, rng)
    others = [name for role in ("harmony", "bass", "drums") if role != featured.role
              and (name := _part_name(spec, role, rng)) is not None]
    if spec.arrangement == "solo":
        others = []
    key = rng.choice((f" in {spec.key_name}", f" in the key of {spec.key_name}", f", {spec.key_name}"))
    bpm = rng.choice((f" at {spec.tempo} bpm", f", {spec.tempo} BPM", f" at {spec.tempo} beats per minute",
                      f" around {spec.tempo} bpm"))
    key = key if rng.random() < KEY_SHARE else ""
    bpm = bpm if rng.random() < BPM_SHARE else ""
    dynamics = rng.choice(DYNAMICS_PHRASES[spec.dynamics])
    if spec.crescendo:
        dynamics = rng.choice(CRESCENDO_PHRASES)
    extra = f", {dynamics}" if dynamics and rng.random() < 0.5 else ""

    if spec.arrangement == "rhythm section":
        energy = "energetic" if spec.tempo >= 110 or spec.dynamics == "loud" else mood
        names = list(dict.fromkeys([lead, *others]))
        pieces = _join(names[::-1] if rng.random() < 0.5 else names)
        text = rng.choice((
            f"{energy} {pieces}{bpm}{key}",
            f"{_article(tempo)} {tempo} {style.genre} groove of {pieces}{bpm}",
            f"{pieces} only: {_article(mood)} {mood} {noun}{bpm}{key}",
        ))
    elif spec.arrangement == "solo":
        text = rng.choice((
            f"{_article(tempo)} {tempo}, {mood} {noun} for solo {lead}{key}{bpm}",
            f"solo {lead}: {_article(mood)} {mood}, {tempo} {noun}{key}{bpm}",
            f"{mood} {lead} solo, {tempo}{key}{bpm}",
        ))
    else:
        accompaniment = _join(others) if others and rng.random() < 0.7 else ""
        with_acc = f" with {accompaniment}" if accompaniment else ""
        backed = f", backed by {accompaniment}" if accompaniment else ""
        text = rng.choice((
            f"{_article(tempo)} {tempo}, {mood} {lead} {noun}{key}{bpm}{with_acc}",
            f"{mood} {noun} featuring {lead}{backed}{bpm}{key}",
            f"{lead} {noun}, {tempo}, {mood}{key}{bpm}{with_acc}",
            f"{_article(noun)} {noun} with {lead} lead{', ' + accompaniment if accompaniment else ''}; "
            f"{tempo}, {mood}{key}{bpm}",
            f"instrumental {noun} led by {lead}{backed}; {mood}, {tempo}{bpm}{key}",
        ))
    text = f"{text}{extra}"
    if style.genre not in text and rng.random() < GENRE_SHARE:
        text += rng.choice((f", {style.genre}", f"; genre: {style.genre}", f", {style.genre} style"))
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text + ("." if rng.random() < 0.4 else "")


def piece_caption(piece: Piece) -> str:
    """A caption for a score excerpt, e.g. ``"a slow, solemn Bach chorale for string quartet, violin
    on the top line, in G minor at 66 bpm"``: instrument, tempo, key and mode, mood, genre."""
    rng = random.Random(piece.caption_seed)
    noun = rng.choice(NOUNS[piece.collection])
    tempo = rng.choice(TEMPO_WORDS[tempo_word(piece.tempo)])
    mood = _join(list(piece.moods))
    names = instrument(piece.programs[0]).names
    lead = names[0] if rng.random() < 0.6 else rng.choice(names)
    key = rng.choice((f" in {piece.key_name}", f" in the key of {piece.key_name}", f", {piece.key_name}"))
    bpm = rng.choice((f" at {piece.tempo} bpm", f", {piece.tempo} BPM", f" around {piece.tempo} bpm"))
    key = key if rng.random() < KEY_SHARE else ""
    bpm = bpm if rng.random() < BPM_SHARE else ""
    genre = GENRE[piece.collection]
    if piece.ensemble == "solo":
        text = rng.choice((
            f"{_article(tempo)} {tempo}, {mood} {noun} for solo {lead}{key}{bpm}",
            f"solo {lead}: {_article(mood)} {mood}, {tempo} {noun}{key}{bpm}",
            f"instrumental {noun} led by {lead}; {mood}, {tempo}{bpm}{key}",
        ))
    else:
        group = piece.ensemble
        text = rng.choice((
            f"{_article(tempo)} {tempo}, {mood} {noun} for {group}, {lead} on the melody{key}{bpm}",
            f"{mood} {noun} played by {group} with {lead} lead; {tempo}{bpm}{key}",
            f"instrumental {noun} led by {lead}, {group}; {mood}, {tempo}{bpm}{key}",
        ))
    if rng.random() < GENRE_SHARE:
        text += rng.choice((f", {genre}", f"; genre: {genre}", f", {genre} style"))
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text + ("." if rng.random() < 0.4 else "")


def piece_metadata(piece: Piece, description: str) -> dict:
    """The sidecar of a score clip: the same fields as :func:`metadata` (the featured part is the top voice)."""
    lead = instrument(piece.programs[0])
    return {
        "title": f"{piece.collection}: {Path(piece.source).stem} (clip {piece.index})",
        "description": description,
        "genre": GENRE[piece.collection],
        "moods": list(piece.moods),
        "keywords": list(dict.fromkeys([piece.collection, tempo_word(piece.tempo), piece.dynamics, piece.ensemble,
                                        lead.family, "instrumental"])),
        "instrument": list(dict.fromkeys(p for p in (_program_name(q) for q in piece.programs) if p)),
        "bpm": piece.tempo,
        "key": piece.key_name,
        "tokenwave_corpus": {
            "index": piece.index, "source": "score", "collection": piece.collection, "score": piece.source,
            "ensemble": piece.ensemble, "programs": list(piece.programs), "tempo": piece.tempo,
            "beats_per_bar": piece.beats_per_bar, "tonic": piece.tonic, "mode": piece.mode, "key": piece.key_name,
            "transpose": piece.transpose, "dynamics": piece.dynamics, "reverb": piece.reverb,
            "moods": list(piece.moods), "caption_seed": piece.caption_seed,
            "featured": {"role": "lead", "program": lead.program, "name": lead.name, "family": lead.family},
            "tempo_word": tempo_word(piece.tempo),
            "time_signature": f"{piece.beats_per_bar}/4",
        },
    }


def _program_name(program: int) -> str | None:
    return INSTRUMENTS[program].name if program in INSTRUMENTS else None


def metadata(spec: SongSpec, description: str) -> dict:
    """The ``<name>.json`` sidecar: audiocraft's fields (read by ``tokenwave prepare``) first, then
    the full parameters under ``tokenwave_corpus`` (ignored by training, kept for evaluation)."""
    style = STYLES[spec.style]
    featured = spec.featured
    instruments = [p.name for p in spec.parts]
    family = "drums" if featured.role == "drums" else instrument(featured.program).family
    return {
        "title": f"{spec.style} #{spec.index}",
        "description": description,
        "genre": style.genre,
        "moods": list(spec.moods),
        "keywords": list(dict.fromkeys([spec.style, tempo_word(spec.tempo), spec.dynamics, spec.arrangement, family,
                                        "instrumental"])),
        "instrument": list(dict.fromkeys(instruments)),
        "bpm": spec.tempo,
        "key": spec.key_name,
        "tokenwave_corpus": {
            **spec.to_dict(),
            "featured": {"role": featured.role, "program": featured.program, "name": featured.name,
                         "family": family},
            "tempo_word": tempo_word(spec.tempo),
            "time_signature": spec.time_signature,
        },
    }


__all__ = ["caption", "metadata", "piece_caption", "piece_metadata", "tempo_word"]
