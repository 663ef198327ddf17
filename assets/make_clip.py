"""Render ``assets/clip.wav``: a 4 s mono 24 kHz melody, the input of ``make run``.

Synthesized (no download, no licence question): a plucked-string-like voice with decaying
harmonics plays a short phrase over a soft bass line, with a little noise for texture so
the codec sees more than pure tones. Deterministic: running it again gives the same bytes.

    python assets/make_clip.py [OUT.wav]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 24_000
BEAT = 0.25  # seconds per eighth note at 120 bpm
# (MIDI note, length in eighths): a phrase in C major ending on the tonic.
MELODY = [(72, 1), (76, 1), (79, 1), (84, 1), (83, 2), (79, 2), (81, 1), (79, 1), (77, 1),
          (76, 1), (74, 2), (72, 2)]
BASS = [(48, 4), (43, 4), (45, 4), (48, 4)]


def midi_to_hz(note: int) -> float:
    return 440.0 * 2.0 ** ((note - 69) / 12)


def pluck(freq: float, duration: float, *, harmonics: int = 8, brightness: float = 0.6,
          decay: float = 3.0) -> np.ndarray:
    """A note whose upper harmonics die faster than its fundamental, as a plucked string."""
    t = np.arange(int(duration * SAMPLE_RATE)) / SAMPLE_RATE
    note = np.zeros_like(t)
    for h in range(1, harmonics + 1):
        if h * freq >= SAMPLE_RATE / 2:
            break
        note += brightness ** (h - 1) * np.exp(-decay * h * t) * np.sin(2 * np.pi * h * freq * t)
    attack = np.minimum(1.0, t / 0.005)  # 5 ms attack avoids a click
    release = np.minimum(1.0, (duration - t) / 0.02)
    return note * attack * release


def render(parts: list[tuple[list[tuple[int, int]], float, dict]]) -> np.ndarray:
    total = max(sum(n for _, n in notes) for notes, _, _ in parts) * BEAT
    mix = np.zeros(int(total * SAMPLE_RATE))
    for notes, gain, voice in parts:
        offset = 0
        for pitch, eighths in notes:
            note = gain * pluck(midi_to_hz(pitch), eighths * BEAT, **voice)
            mix[offset: offset + note.size] += note
            offset += int(eighths * BEAT * SAMPLE_RATE)
    return mix


def main(out: str | None = None) -> Path:
    path = Path(out) if out else Path(__file__).with_name("clip.wav")
    mix = render([(MELODY, 0.5, {}), (BASS, 0.35, {"harmonics": 4, "brightness": 0.4,
                                                   "decay": 1.0})])
    noise = np.random.default_rng(0).standard_normal(mix.size) * 0.003
    mix = mix + noise
    mix *= 10 ** (-3 / 20) / np.abs(mix).max()  # peak at -3 dBFS
    sf.write(str(path), mix.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
    return path


if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else None))
