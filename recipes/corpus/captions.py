"""Captions in varied natural phrasing, and audiocraft-style metadata, from a clip's parameters.

Every fact a caption states comes from the :class:`~compose.SongSpec` the MIDI was played from:
the instrument it names first is the featured part's GM program (by its name or a synonym from
:mod:`instruments`), a tempo written as a number is the MIDI tempo, the key is the MIDI key, the
tempo word follows the bpm (:func:`tempo_word`). Which facts a caption states, their order and
wording are drawn from the clip's ``caption_seed``.
"""
from __future__ import annotations

import random

from .compose import SongSpec
from .instruments import DRUM_KITS, instrument
from .styles import STYLES

TEMPO_WORDS = {"slow": ("slow", "slow-paced", "leisurely"),
               "moderate": ("mid-tempo", "moderately paced", "medium-tempo"),
               "upbeat": ("upbeat", "lively", "brisk"), "fast": ("fast", "fast-paced", "up-tempo")}
DYNAMICS_PHRASES = {"soft": ("played softly", "quiet and gentle", "soft and delicate"),
                    "medium": ("", "", "at a comfortable volume"),
                    "loud": ("played loud", "loud and punchy", "big and powerful")}
CRESCENDO_PHRASES = ("that slowly builds", "building in intensity", "growing louder as it goes")


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
    key = key if rng.random() < 0.6 else ""
    bpm = bpm if rng.random() < 0.6 else ""
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
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text + ("." if rng.random() < 0.4 else "")


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


__all__ = ["caption", "metadata", "tempo_word"]
