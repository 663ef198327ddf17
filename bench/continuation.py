"""Does a generator keep a timbre it is given? The family read of continuations of real clips.

A text-to-music model that misreads its instrument can fail in three places: the codec cannot carry
the timbre (the round trip of real clips already reads wrong), the LM cannot keep a timbre going
(it drifts even from a right start), or the LM cannot pick the timbre from the text alone. The
adherence bench's family sweep sees only their sum. This measure separates the first two: each
held-out clip's first seconds (its codes, as an audio prompt) and its own caption are continued to
the clip's length, and the family classifier reads the windows after the prompt, of the
continuation and of the codec round trip of the same clip. Continuations near the round trip: the
LM keeps the timbre, and what the family sweep loses beyond it is in choosing the timbre from text.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from codec import audio as audio_io

from .adherence import (CorpusClip, FamilyClassifier, RoundTrip, _pct, accuracy_report, as_analysis_audio,
                        timbre_features)

# (captions, prompt audio (B, C, T) at rate, rate, seed) -> (audio (B, C, T') continuing each prompt, its rate)
ContinueFn = Callable[[list[str | None], torch.Tensor, int, int], tuple[torch.Tensor, int]]
WINDOW_SECONDS = 2.5  # timbre_features' window


def musicgen_continue_fn(generator, duration: float, **options) -> ContinueFn:
    """Adapt a :class:`inference.MusicGen`: continue each prompt to ``duration`` seconds (the output
    includes the prompt), sampling ``options`` as :meth:`MusicGen.generate` takes them."""
    def continue_(captions: list[str | None], prompts: torch.Tensor, rate: int, seed: int) -> tuple[torch.Tensor, int]:
        return generator.generate(list(captions), duration, audio_prompt=(prompts, rate), seed=seed, **options)
    return continue_


def pick_clips(clips: Sequence[CorpusClip], families: Sequence[str], per_family: int) -> list[CorpusClip]:
    """The first ``per_family`` clips (by name) of each family, families in ``families``' order."""
    if per_family < 1:
        raise ValueError(f"per_family must be >= 1, got {per_family}")
    return [c for family in families for c in [c for c in clips if c.family == family][:per_family]]


def continuation_report(clips: Sequence[CorpusClip], *, classifier: FamilyClassifier, families: Sequence[str],
                        continue_fn: ContinueFn, roundtrip: RoundTrip, prompt_seconds: float = 2.0,
                        seconds: float = 10.0, batch: int = 8, seed: int = 0) -> dict:
    """Family accuracy on the windows after the prompt: of continuations and of round trips, same clips.

    Each clip is cut to ``seconds`` (clips shorter are left out, counted in ``"too_short"``); its first
    ``prompt_seconds`` are the prompt. Windows of :data:`WINDOW_SECONDS` that overlap the prompt are
    not read. Call ``i`` of ``continue_fn`` gets ``batch`` clips and seed ``seed + i``.
    """
    first = math.ceil(prompt_seconds / WINDOW_SECONDS - 1e-9)
    if not 0 < prompt_seconds < seconds or (first + 1) * WINDOW_SECONDS > seconds + 1e-9:
        raise ValueError(f"need 0 < prompt_seconds < seconds with a whole {WINDOW_SECONDS:g} s window after the "
                         f"prompt; got prompt_seconds={prompt_seconds:g}, seconds={seconds:g}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    kept, audio, too_short = [], [], 0
    for clip in clips:
        wav, rate = audio_io.read_audio(clip.audio)
        length = round(seconds * rate)
        if wav.shape[-1] < length:
            too_short += 1
            continue
        kept.append(clip)
        audio.append((wav[:, :length], rate))
    truth = [families.index(c.family) for c in kept]
    coded, continued = [], []
    for i, start in enumerate(range(0, len(kept), batch)):
        group = audio[start:start + batch]
        rate = group[0][1]
        if any(r != rate for _, r in group):
            raise ValueError("continuation needs the clips of one batch at one sample rate")
        prompts = torch.stack([w[:, :round(prompt_seconds * rate)] for w, _ in group])
        out, out_rate = continue_fn([c.caption for c in kept[start:start + batch]], prompts, rate, seed + i)
        if out.dim() != 3 or out.shape[0] != len(group):
            raise ValueError(f"the continuation returned audio shaped {tuple(out.shape)} for {len(group)} "
                             f"prompts; expected ({len(group)}, C, T)")
        continued += [timbre_features(as_analysis_audio(item, out_rate))[first:] for item in out]
        coded += [timbre_features(roundtrip(w, r))[first:] for w, r in group]
    result = {"clips": len(kept), "too_short": too_short, "prompt_seconds": prompt_seconds, "seconds": seconds,
              "windows_from_s": first * WINDOW_SECONDS}
    if kept:
        result["roundtrip"] = accuracy_report(classifier.predict(coded), truth, families)
        result["continued"] = accuracy_report(classifier.predict(continued), truth, families)
    return result


def continuation_table(report: dict) -> str:
    """Markdown: the two accuracies, then per family."""
    if not report.get("clips"):
        return "No clip long enough to continue."
    rt, co = report["roundtrip"], report["continued"]
    lines = [f"Continuations of {report['clips']} held-out clips ({report['prompt_seconds']:g} s of each as the "
             f"prompt, its own caption, continued to {report['seconds']:g} s), read from "
             f"{report['windows_from_s']:g} s on:\n",
             "| audio | family accuracy | balanced |", "|---|---|---|",
             f"| codec round trip | {_pct(rt['accuracy'])} | {_pct(rt['balanced_accuracy'])} |",
             f"| continued by the LM | {_pct(co['accuracy'])} | {_pct(co['balanced_accuracy'])} |", "",
             "| family | " + " | ".join(rt["per_class"]) + " |", "|---" * (len(rt["per_class"]) + 1) + "|",
             "| round trip | " + " | ".join(_pct(v) for v in rt["per_class"].values()) + " |",
             "| continued | " + " | ".join(_pct(co["per_class"][f]) for f in rt["per_class"]) + " |"]
    return "\n".join(lines)


__all__ = ["ContinueFn", "continuation_report", "continuation_table", "musicgen_continue_fn", "pick_clips"]
