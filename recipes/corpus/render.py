"""MIDI to audio with fluidsynth and a General MIDI soundfont, and the soundfont's licence.

fluidsynth renders in float (no clipping), the clip is mixed to the wanted channel count, cut to
exactly the clip length with a short fade-out, and peak-normalized to a level that follows the
clip's dynamics (soft pieces stay quieter than loud ones). Rendering the same MIDI file with the
same soundfont gives the same samples, so the corpus is deterministic.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

INSTALL_HINT = ("install them with: apt-get install -y fluidsynth fluid-soundfont-gm "
                "(or timgm6mb-soundfont for a 6 MB font)")
# Searched in order when no --soundfont is given: the MIT-licensed FluidR3 first.
SOUNDFONT_PATHS = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/soundfonts/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/TimGM6mb.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/soundfonts/default.sf2",
)
# The fonts a corpus may mix by default (make_corpus draws one per clip), where Debian installs them.
DEFAULT_FONTS = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/TimGM6mb.sf2",
    "/usr/share/sounds/sf3/MuseScore_General_Lite.sf3",
)
# Soundfonts whose licence is known, by file name: (title, licence, copyright holder).
KNOWN_SOUNDFONTS = {
    "FluidR3_GM.sf2": ("Fluid (R3) General MIDI SoundFont", "MIT", "Frank Wen and contributors"),
    "TimGM6mb.sf2": ("TimGM6mb", "GPL-2", "Tim Brechbill, David Bolton"),
    "MuseScore_General_Lite.sf3": ("MuseScore General Lite", "MIT", "S. Christian Collins"),
}
PEAK_DBFS = {"soft": -9.0, "medium": -4.0, "loud": -1.0}
FADE_SECONDS = 0.05


class RenderError(RuntimeError):
    """fluidsynth is missing, failed, or produced no sound."""


@dataclass(frozen=True)
class Soundfont:
    """A soundfont file, what is known of its licence, and the Debian copyright file if any."""

    path: Path
    title: str
    licence: str
    holder: str
    copyright_file: Path | None

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def find_fluidsynth() -> str:
    """The fluidsynth executable, or a :class:`RenderError` that says how to install it."""
    path = shutil.which("fluidsynth")
    if path is None:
        raise RenderError(f"fluidsynth not found on PATH; {INSTALL_HINT}")
    return path


def fluidsynth_version() -> str:
    """``fluidsynth --version``'s version number (renders may differ between versions)."""
    result = subprocess.run([find_fluidsynth(), "--version"], capture_output=True, text=True, timeout=30)
    for word in result.stdout.split():
        if word[:1].isdigit():
            return word
    return "unknown"


def _debian_copyright(path: Path) -> Path | None:
    """The copyright file of the Debian package that installed ``path``, when dpkg knows it."""
    if shutil.which("dpkg-query") is None:
        return None
    try:
        found = subprocess.run(["dpkg-query", "-S", str(path)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if found.returncode != 0 or ":" not in found.stdout:
        return None
    package = found.stdout.split(":", 1)[0].strip()
    copyright_file = Path("/usr/share/doc") / package / "copyright"
    return copyright_file if copyright_file.is_file() else None


def find_soundfont(path: str | os.PathLike | None = None) -> Soundfont:
    """The soundfont at ``path``, or the first installed one of :data:`SOUNDFONT_PATHS`."""
    if path is not None:
        chosen = Path(path)
        if not chosen.is_file():
            raise RenderError(f"--soundfont {chosen}: no such file (expected a .sf2 or .sf3 soundfont)")
    else:
        found = [Path(p) for p in SOUNDFONT_PATHS if Path(p).is_file()]
        if not found:
            raise RenderError(f"no General MIDI soundfont found (looked at {', '.join(SOUNDFONT_PATHS)}); "
                              f"{INSTALL_HINT}, or pass --soundfont")
        chosen = found[0]
    real = chosen.resolve()
    title, licence, holder = KNOWN_SOUNDFONTS.get(real.name, (real.stem, "unknown", "unknown"))
    return Soundfont(path=real, title=title, licence=licence, holder=holder, copyright_file=_debian_copyright(real))


def render_midi(midi_path: Path, soundfont: Soundfont, sample_rate: int) -> np.ndarray:
    """fluidsynth's float render of ``midi_path``: ``(T, 2)`` float32 at ``sample_rate``."""
    executable = find_fluidsynth()
    with tempfile.TemporaryDirectory(prefix="tokenwave-render-") as tmp:
        out = Path(tmp) / "render.wav"
        command = [executable, "-ni", "-q", "-g", "0.5", "-r", str(sample_rate), "-O", "float", "-T", "wav",
                   "-o", "synth.cpu-cores=1", "-F", str(out), str(soundfont.path), str(midi_path)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0 or not out.is_file():
            message = " ".join((result.stderr or result.stdout).split())[-400:]
            raise RenderError(f"fluidsynth failed on {midi_path} (exit {result.returncode}): {message}")
        audio, rate = sf.read(out, dtype="float32", always_2d=True)
    if rate != sample_rate:
        raise RenderError(f"fluidsynth wrote {rate} Hz, expected {sample_rate} Hz")
    return audio


def finish(audio: np.ndarray, *, sample_rate: int, seconds: float, channels: int, dynamics: str) -> np.ndarray:
    """``(T, 2)`` render -> ``(N, channels)`` clip of exactly ``seconds``, faded out, peak-normalized."""
    length = round(seconds * sample_rate)
    audio = audio.mean(axis=1, keepdims=True) if channels == 1 else audio[:, :2]
    if audio.shape[0] < length:
        audio = np.concatenate([audio, np.zeros((length - audio.shape[0], audio.shape[1]), audio.dtype)])
    audio = audio[:length].astype(np.float64)
    fade = min(length, round(FADE_SECONDS * sample_rate))
    audio[length - fade:] *= np.linspace(1.0, 0.0, fade)[:, None]
    peak = float(np.abs(audio).max())
    if not peak > 1e-4:
        raise RenderError("the render is silent (peak below -80 dBFS): the soundfont lacks the instruments?")
    return (audio * (10 ** (PEAK_DBFS[dynamics] / 20) / peak)).astype(np.float32)


def licence_text(soundfont: Soundfont) -> str:
    """What the corpus's LICENSE file says about the audio, with the soundfont's own terms."""
    lines = [
        f"Soundfont: {soundfont.title} ({soundfont.path.name}, {soundfont.size} bytes)",
        f"Soundfont licence: {soundfont.licence}; copyright {soundfont.holder}.",
    ]
    if soundfont.licence == "GPL-2":
        lines.append("The audio is rendered from GPL-2 licensed samples; whether rendered audio is a derived "
                     "work of the samples is not settled. Prefer FluidR3_GM (MIT, Debian package "
                     "fluid-soundfont-gm) for a corpus you redistribute.")
    elif soundfont.licence == "unknown":
        lines.append("The licence of this soundfont is not known to the recipe: check it before you "
                     "redistribute the audio.")
    if soundfont.copyright_file is not None:
        lines += ["", f"--- {soundfont.copyright_file} ---", soundfont.copyright_file.read_text(errors="replace")]
    return "\n".join(lines) + "\n"


__all__ = ["DEFAULT_FONTS", "INSTALL_HINT", "RenderError", "Soundfont", "find_fluidsynth", "find_soundfont", "finish",
           "fluidsynth_version", "licence_text", "render_midi"]
