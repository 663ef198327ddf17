"""Build a captioned music corpus offline: procedural songs rendered with fluidsynth.

    python recipes/corpus/make_corpus.py --out data/music --hours 3 --seed 0
    tokenwave prepare data/music/train --model MODEL --out cache/train   # then finetune

Needs Debian's ``fluidsynth`` and a General MIDI soundfont (``apt-get install -y fluidsynth
fluid-soundfont-gm``, or ``timgm6mb-soundfont``) and the ``mido`` package. Clip ``i`` is drawn
from ``(seed, i)`` alone (:mod:`compose`), so the corpus is the same for any ``--workers`` and a
larger ``--hours`` only adds clips. A clip is complete once its ``.json`` exists (written last,
each file written to a temporary name and renamed): a re-run skips complete clips and redoes the
rest, so an interrupted build resumes. A re-run with other settings into the same folder is refused.

Output layout::

    OUT/corpus.json          the settings (and the recipe version) the clips were built with
    OUT/README.md, LICENSE   what the corpus is, how to rebuild it, the soundfont's licence
    OUT/train/000000.wav     the clip (PCM 16-bit, --sample-rate, --channels)
    OUT/train/000000.mid     the MIDI it was rendered from
    OUT/train/000000.txt     its caption
    OUT/train/000000.json    audiocraft metadata (description, genre, moods, keywords, instrument, bpm,
                             key) + every parameter under "tokenwave_corpus"
    OUT/valid/...            the held-out split (--valid-fraction of the clips, drawn per clip)
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import soundfile as sf  # noqa: E402

from codec.files import atomic_write, read_json_file, write_json_file  # noqa: E402
from recipes.corpus import render, scores  # noqa: E402
from recipes.corpus.captions import caption, metadata, piece_caption, piece_metadata  # noqa: E402
from recipes.corpus.compose import clip_random, compose, sample_spec  # noqa: E402
from recipes.corpus.styles import STYLES  # noqa: E402

FORMAT = "tokenwave-music-corpus"
# Bump when a change to the recipe changes what a (seed, index) pair renders: resuming a corpus
# built by another version would mix two recipes.
RECIPE_VERSION = 2
# Default soundfonts and how often each plays a clip, when installed (recipe version 2: several fonts
# for more timbres; MuseScore's .sf3 is 5x slower to load, so it plays fewer clips).
SOUNDFONT_WEIGHTS = {"FluidR3_GM.sf2": 0.6, "TimGM6mb.sf2": 0.3, "MuseScore_General_Lite.sf3": 0.1}
SCORE_FRACTION = 0.3
SETTINGS_NAME = "corpus.json"
SPLITS = ("train", "valid")


@dataclass(frozen=True)
class Settings:
    """What determines every clip; stored in ``corpus.json`` and checked on resume."""

    seed: int
    clip_seconds: float
    sample_rate: int
    channels: int
    valid_fraction: float
    soundfonts: tuple[str, ...]
    soundfont_bytes: tuple[int, ...]
    soundfont_weights: tuple[float, ...]
    score_fraction: float
    music21: str | None  # the version whose corpus and key analysis the score clips come from
    recipe_version: int = RECIPE_VERSION

    def to_dict(self) -> dict:
        data = {"format": FORMAT, **asdict(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


@dataclass(frozen=True)
class ClipJob:
    """One clip to build: its index, split and folder, and the soundfonts it draws one from."""

    index: int
    split: str
    folder: Path
    settings: Settings
    soundfonts: tuple[render.Soundfont, ...]

    @property
    def stem(self) -> Path:
        return self.folder / self.split / f"{self.index:06d}"


@dataclass(frozen=True)
class ClipResult:
    index: int
    split: str
    rendered: bool  # False: already complete, skipped
    seconds: float


def split_of(seed: int, index: int, valid_fraction: float) -> str:
    """``valid`` for a ``valid_fraction`` share of clips, drawn per clip (stable as the corpus grows)."""
    return "valid" if clip_random(seed, index, "split").random() < valid_fraction else "train"


def is_complete(stem: Path) -> bool:
    return stem.with_suffix(".json").is_file() and stem.with_suffix(".wav").is_file()


def build_clip(job: ClipJob) -> ClipResult:
    """Compose, render and caption one clip (skipped when already complete); errors name the clip."""
    try:
        return _build_clip(job)
    except (render.RenderError, scores.ScoreError) as error:
        raise type(error)(f"clip {job.index} ({job.stem}): {error}") from None


def _build_clip(job: ClipJob) -> ClipResult:
    stem, settings = job.stem, job.settings
    if is_complete(stem):
        return ClipResult(job.index, job.split, False, settings.clip_seconds)
    stem.parent.mkdir(parents=True, exist_ok=True)
    draw = clip_random(settings.seed, job.index, "source")
    soundfont = draw.choices(job.soundfonts, weights=settings.soundfont_weights)[0]
    if draw.random() < settings.score_fraction:
        piece = scores.sample_piece(settings.seed, job.index, settings.clip_seconds)
        midi, dynamics = scores.compose_piece(piece), piece.dynamics
        text = piece_caption(piece)
        meta = piece_metadata(piece, text)
    else:
        spec = sample_spec(settings.seed, job.index)
        midi, dynamics = compose(spec, settings.clip_seconds), spec.dynamics
        text = caption(spec)
        meta = metadata(spec, text)
        meta["tokenwave_corpus"]["source"] = "procedural"
    midi_path = stem.with_suffix(".mid")
    atomic_write(midi_path, lambda tmp: midi.save(filename=str(tmp)), overwrite=True)
    audio = render.render_midi(midi_path, soundfont, settings.sample_rate)
    audio = render.finish(audio, sample_rate=settings.sample_rate, seconds=settings.clip_seconds,
                          channels=settings.channels, dynamics=dynamics)
    atomic_write(stem.with_suffix(".wav"),
                 lambda tmp: sf.write(tmp, audio, settings.sample_rate, subtype="PCM_16", format="WAV"),
                 overwrite=True)
    meta["tokenwave_corpus"].update(split=job.split, corpus_seed=settings.seed,
                                    clip_seconds=settings.clip_seconds, sample_rate=settings.sample_rate,
                                    soundfont=soundfont.path.name)
    atomic_write(stem.with_suffix(".txt"), lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"),
                 overwrite=True)
    write_json_file(stem.with_suffix(".json"), meta)
    return ClipResult(job.index, job.split, True, settings.clip_seconds)


def check_settings(out: Path, settings: Settings) -> None:
    """Refuse to resume a corpus built with other settings; record ours otherwise."""
    path = out / SETTINGS_NAME
    if path.is_file():
        stored = read_json_file(path, "the corpus settings")
        ours = settings.to_dict()
        differ = {k: (stored.get(k), v) for k, v in ours.items() if stored.get(k) != v}
        if differ:
            shown = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differ.items())
            raise SystemExit(f"make_corpus: {out} holds a corpus built with other settings ({shown}); "
                             f"use another --out or the same settings")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json_file(path, settings.to_dict())


def plan(out: Path, settings: Settings, soundfonts: tuple[render.Soundfont, ...], clips: int) -> list[ClipJob]:
    return [ClipJob(i, split_of(settings.seed, i, settings.valid_fraction), out, settings, soundfonts)
            for i in range(clips)]


def run_jobs(jobs: list[ClipJob], workers: int, quiet: bool) -> list[ClipResult]:
    """Build the clips, in ``workers`` processes when more than one (fluidsynth is single-threaded)."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), unit="clip", disable=quiet, desc="corpus")
    results = []
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(build_clip(job))
                bar.update()
        else:
            with multiprocessing.get_context().Pool(min(workers, len(jobs))) as pool:
                for result in pool.imap_unordered(build_clip, jobs, chunksize=1):
                    results.append(result)
                    bar.update()
    finally:
        bar.close()
    return sorted(results, key=lambda r: r.index)


def _examples(out: Path, split: str, count: int) -> list[str]:
    files = sorted((out / split).glob("*.txt"))[:count]
    return [f"- `{split}/{f.stem}.wav`: {f.read_text(encoding='utf-8').strip()}" for f in files]


def write_readme(out: Path, settings: Settings, soundfonts: tuple[render.Soundfont, ...], clips: int,
                 command: str) -> None:
    """README.md (what, how many, how to rebuild) and LICENSE (the recipe's and the soundfonts' terms)."""
    sidecars = [read_json_file(p, "a clip's metadata")["tokenwave_corpus"]
                for split in SPLITS for p in sorted((out / split).glob("*.json"))]
    counts = Counter(meta["split"] for meta in sidecars)
    sources = Counter(meta.get("collection", "procedural song") for meta in sidecars)
    fonts = Counter(meta["soundfont"] for meta in sidecars)
    hours = {split: counts[split] * settings.clip_seconds / 3600 for split in SPLITS}
    readme = [
        "# tokenwave music corpus",
        "",
        "Procedural compositions (melody, chords, bass, drums) in "
        f"{len(STYLES)} styles ({', '.join(STYLES)}) and excerpts of human-composed scores from the music21 "
        "corpus (Bach chorales, Ryan's Mammoth Collection dance tunes; transposed, at drawn tempi, dynamics "
        "and instruments), written as MIDI and rendered with fluidsynth and General MIDI soundfonts. Every "
        "caption is written from the parameters the music was played from.",
        "",
        f"- clips: {counts['train']} train ({hours['train']:.2f} h), {counts['valid']} valid "
        f"({hours['valid']:.2f} h), {settings.clip_seconds:g} s each",
        "- sources: " + ", ".join(f"{name} {n}" for name, n in sorted(sources.items())),
        f"- audio: {settings.sample_rate} Hz, {settings.channels} channel(s), 16-bit WAV",
        f"- seed {settings.seed}, held-out fraction {settings.valid_fraction:g}, score fraction "
        f"{settings.score_fraction:g} (music21 {settings.music21}), recipe version {settings.recipe_version}",
        *(f"- soundfont: {font.title} (`{font.path.name}`), licence {font.licence}, {fonts[font.path.name]} clips"
          for font in soundfonts),
        "",
        f"Rebuild (the same files, byte for byte, with the same soundfonts, music21 and fluidsynth "
        f"{render.fluidsynth_version()}):",
        "",
        f"    {command}",
        "",
        "Each `NNNNNN.wav` has its MIDI (`.mid`), its caption (`.txt`) and audiocraft metadata (`.json`:",
        "description, genre, moods, keywords, instrument, bpm, key; all parameters under "
        "`tokenwave_corpus`).",
        "Tokenize a split with `tokenwave prepare OUT/train --model MODEL --out CACHE`.",
        "",
        "Examples:",
        "",
        *_examples(out, "train", 5),
        "",
    ]
    (out / "README.md").write_text("\n".join(readme), encoding="utf-8")
    licence = [
        "Compositions, MIDI files and captions: generated by tokenwave's recipes/corpus (MIT licence, like",
        "tokenwave). Score clips are arrangements of public-domain works (J. S. Bach's chorales, the tunes of",
        "Ryan's Mammoth Collection, 1883) as encoded in the music21 corpus (see music21's corpus licence).",
        "",
        "Audio: rendered from the MIDI files with the soundfonts below; their samples' licences apply.",
        "",
        *(render.licence_text(font) for font in soundfonts),
    ]
    (out / "LICENSE").write_text("\n".join(licence), encoding="utf-8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder (resumed when it exists)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--hours", type=float, help="hours of audio (rounded up to whole clips)")
    size.add_argument("--clips", type=int, help="number of clips (instead of --hours)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    parser.add_argument("--soundfont", type=Path, action="append",
                        help="GM soundfont (.sf2/.sf3), repeatable: clips draw one each (default: those of "
                             f"{', '.join(SOUNDFONT_WEIGHTS)} that are installed, weights "
                             f"{', '.join(f'{w:g}' for w in SOUNDFONT_WEIGHTS.values())}; else TimGM6mb)")
    parser.add_argument("--score-fraction", type=float, default=SCORE_FRACTION,
                        help=f"share of clips from music21 scores (default {SCORE_FRACTION:g}; 0: procedural "
                             "songs only, no music21 needed)")
    parser.add_argument("--sample-rate", type=int, default=32_000, help="Hz (default 32000)")
    parser.add_argument("--channels", type=int, default=1, choices=(1, 2),
                        help="1 (default, mixed down) or 2")
    parser.add_argument("--clip-seconds", type=float, default=10.0, help="seconds per clip (default 10)")
    parser.add_argument("--valid-fraction", type=float, default=0.05, help="held-out share (default 0.05)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="parallel renders (default: CPUs)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    args = parser.parse_args(argv)
    if args.hours is not None and not args.hours > 0:
        parser.error(f"--hours must be positive, got {args.hours}")
    if args.clips is not None and args.clips < 1:
        parser.error(f"--clips must be at least 1, got {args.clips}")
    if not 0.5 <= args.clip_seconds <= 600:
        parser.error(f"--clip-seconds must be in [0.5, 600], got {args.clip_seconds}")
    if not 8_000 <= args.sample_rate <= 96_000:
        parser.error(f"--sample-rate must be in [8000, 96000] Hz, got {args.sample_rate}")
    if not 0 <= args.score_fraction <= 1:
        parser.error(f"--score-fraction must be in [0, 1], got {args.score_fraction}")
    if not 0 <= args.valid_fraction < 1:
        parser.error(f"--valid-fraction must be in [0, 1), got {args.valid_fraction}")
    return args


def choose_soundfonts(paths: list[Path] | None) -> tuple[tuple[render.Soundfont, ...], tuple[float, ...]]:
    """The soundfonts clips draw from, and their weights: the given ones equally, else the installed
    defaults of :data:`SOUNDFONT_WEIGHTS` (else whatever :func:`render.find_soundfont` finds)."""
    if paths:
        fonts = tuple(render.find_soundfont(p) for p in paths)
        return fonts, tuple(1.0 for _ in fonts)
    found = [(render.find_soundfont(p), SOUNDFONT_WEIGHTS[Path(p).name]) for p in render.DEFAULT_FONTS
             if Path(p).is_file() and Path(p).name in SOUNDFONT_WEIGHTS]
    if not found:
        return (render.find_soundfont(None),), (1.0,)
    return tuple(f for f, _ in found), tuple(w for _, w in found)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        render.find_fluidsynth()
        soundfonts, weights = choose_soundfonts(args.soundfont)
        music21 = scores.music21_version() if args.score_fraction > 0 else None
    except (render.RenderError, scores.ScoreError) as error:
        print(f"make_corpus: {error}", file=sys.stderr)
        return 2
    clips = args.clips if args.clips is not None else math.ceil(args.hours * 3600 / args.clip_seconds - 1e-9)
    settings = Settings(seed=args.seed, clip_seconds=args.clip_seconds, sample_rate=args.sample_rate,
                        channels=args.channels, valid_fraction=args.valid_fraction,
                        soundfonts=tuple(f.path.name for f in soundfonts),
                        soundfont_bytes=tuple(f.size for f in soundfonts), soundfont_weights=weights,
                        score_fraction=args.score_fraction, music21=music21)
    check_settings(args.out, settings)
    began = time.perf_counter()
    results = run_jobs(plan(args.out, settings, soundfonts, clips), args.workers, args.quiet)
    elapsed = time.perf_counter() - began
    size = f"--clips {clips}" if args.clips is not None else f"--hours {args.hours:g}"
    fonts = "".join(f"--soundfont {f.path} " for f in soundfonts) if args.soundfont else ""  # else the defaults
    command = (f"python recipes/corpus/make_corpus.py --out {args.out} {size} --seed {args.seed} {fonts}"
               f"--score-fraction {args.score_fraction:g} --sample-rate {args.sample_rate} --channels {args.channels} "
               f"--clip-seconds {args.clip_seconds:g} --valid-fraction {args.valid_fraction:g}")
    write_readme(args.out, settings, soundfonts, clips, command)
    if not args.quiet:
        rendered = [r for r in results if r.rendered]
        seconds = sum(r.seconds for r in rendered)
        print(f"make_corpus: {len(rendered)} clips rendered ({seconds / 3600:.2f} h of audio, "
              f"{seconds / max(elapsed, 1e-9):.0f}x real time), "
              f"{len(results) - len(rendered)} already there; "
              f"{args.out} ({', '.join(f'{f.path.name} ({f.licence})' for f in soundfonts)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
