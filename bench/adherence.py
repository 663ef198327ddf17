"""Text adherence of a text-to-music generator, measured on the captioned corpus's own terms.

Three measures, each first validated on real corpus clips (whose metadata gives the truth) and
only then applied to generated audio:

- **instrument family**: a small classifier on log-mel statistics (:class:`FamilyClassifier`),
  trained on the corpus train split with the featured part's family as the label. Its held-out
  accuracy on the valid split says how far its verdict on generations can be trusted.
- **tempo**: a :class:`~bench.tempo.TempoReader`, a small network on the periodicity of onsets
  trained on the train split's notated tempi (the measure of record), and the fixed
  autocorrelation estimator :func:`~bench.tempo.estimate_tempo` next to it (``tempo_acf``).
  Validated by the median error, the share of clips within 8 % (and within 8 % of half, double, a
  third or three times it: octave errors) of the MIDI tempo, and the rank correlation with it.
- **mode**: :func:`estimate_mode`, whether the chroma profile correlates better with the
  Krumhansl-Kessler major or minor profile on the prompted tonic (validated with the corpus's
  true tonic; the free 24-key estimate :func:`estimate_key` is reported too, and is weak). Its
  verdict on generations is flagged untrusted when its valid accuracy is below ``MODE_TRUST``.

Prompts vary one attribute at a time around a base prompt (:func:`build_prompts`), written with
the corpus captions' own words (:class:`Vocabulary`, read from the metadata sidecars).
Everything runs on the CPU at 16 kHz mono (:data:`ANALYSIS_RATE`): enough bandwidth for timbre,
onsets and pitch, half the cost of 32 kHz.
"""
from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from bench.analysis import ANALYSIS_RATE, FRAME_RATE, NUM_MELS, as_analysis_audio, load_mono, log_mel
from bench.tempo import (TempoReader, estimate_tempo, spearman, sweep_reference, tempo_report,
                         train_tempo_reader)
from codec import audio as audio_io
from conditioning.melody import chroma_filter_bank

if TYPE_CHECKING:  # bench.continuation builds on this module
    from bench.continuation import ContinueFn

PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
# Krumhansl & Kessler's probe-tone ratings (1982), tonic first.
MAJOR_PROFILE = (6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88)
MINOR_PROFILE = (6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17)
MODE_TRUST = 0.7  # corpus mode accuracy below which generated clips get no mode verdict


# -- the corpus ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusClip:
    """One corpus clip and the facts its metadata states (``tokenwave_corpus`` fields)."""

    audio: Path
    family: str  # the featured part's instrument family ("keys", "brass", ...; "drums")
    instrument: str  # the featured part's caption name
    tempo: int  # bpm of the MIDI
    tempo_word: str
    tonic: int  # pitch class, 0 = C
    mode: str  # "major" or "minor"
    caption: str | None = None  # the sidecar's description: what the clip was trained with


def read_corpus(folder: str | Path, *, limit: int | None = None) -> list[CorpusClip]:
    """Clips of one corpus split, sorted by name: every ``.json`` sidecar whose ``.wav`` exists.

    A corpus still being rendered is fine (a clip counts once its ``.json`` is written).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"corpus folder {folder} does not exist (expected a split folder such "
                                f"as CORPUS/valid holding NNNNNN.wav + .json)")
    clips = []
    for sidecar in sorted(folder.glob("*.json")):
        wav = sidecar.with_suffix(".wav")
        if not wav.is_file():
            continue
        try:
            sidecar_json = json.loads(sidecar.read_text())
            facts = sidecar_json["tokenwave_corpus"]
            clips.append(CorpusClip(audio=wav, family=facts["featured"]["family"],
                                    instrument=facts["featured"]["name"], tempo=int(facts["tempo"]),
                                    tempo_word=facts["tempo_word"], tonic=int(facts["tonic"]) % 12,
                                    mode=facts["mode"], caption=sidecar_json.get("description")))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{sidecar}: not a tokenwave corpus sidecar (missing or bad field "
                             f"{error}); expected the metadata recipes/corpus/make_corpus.py writes") from None
        if limit is not None and len(clips) >= limit:
            break
    if not clips:
        raise FileNotFoundError(f"no clips (NNNNNN.json + .wav) in {folder}")
    return clips


# -- features -----------------------------------------------------------------------------------

def timbre_features(wav: torch.Tensor, *, window_seconds: float = 2.5) -> torch.Tensor:
    """Per window of ``window_seconds``: the mean, standard deviation and mean absolute frame-to-frame
    change of each log-mel band, ``(windows, 3 * NUM_MELS)``.

    Windows rather than whole clips give the classifier several examples per clip; a clip shorter
    than one window is one window.
    """
    mel = log_mel(wav)
    size = max(2, round(window_seconds * FRAME_RATE))
    count = max(1, mel.shape[1] // size)
    rows = []
    for i in range(count):
        part = mel[:, i * size:(i + 1) * size] if count > 1 else mel
        change = (part[:, 1:] - part[:, :-1]).abs().mean(1) if part.shape[1] > 1 else torch.zeros(NUM_MELS)
        rows.append(torch.cat([part.mean(1), part.std(1, correction=0), change]))
    return torch.stack(rows)


TIMBRE_PARTS = ("mean", "spread", "change")  # timbre_features' three blocks of NUM_MELS columns


def family_reference(features: Sequence[torch.Tensor], labels: Sequence[str]
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per family, the mean and standard deviation of :func:`timbre_features` over all its clips'
    windows: where real music of that family lies, for :func:`timbre_shift`."""
    pooled: dict[str, list[torch.Tensor]] = {}
    for x, label in zip(features, labels, strict=True):
        pooled.setdefault(label, []).append(x.float())
    out = {}
    for label, rows in pooled.items():
        x = torch.cat(rows)
        out[label] = (x.mean(0), x.std(0, correction=0).clamp(min=1e-4))
    return out


def timbre_shift(features: Sequence[torch.Tensor], labels: Sequence[str],
                 reference: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict | None:
    """How far clips' timbre features sit from real clips of their (prompted) family, in that
    family's standard deviations, averaged over clips and bands for each part (band mean, spread,
    frame-to-frame change): the features the family classifier reads, so a part far from 0 names
    what moves its verdict. ``change`` per family too. None when no clip has a reference."""
    rows: dict[str, list[torch.Tensor]] = {}
    for x, label in zip(features, labels, strict=True):
        if label in reference:
            mean, std = reference[label]
            rows.setdefault(label, []).append((x.float().mean(0) - mean) / std)
    if not rows:
        return None
    per_family = {label: torch.stack(group).view(-1, len(TIMBRE_PARTS), NUM_MELS) for label, group in rows.items()}
    z = torch.cat(list(per_family.values()))
    change = TIMBRE_PARTS.index("change")
    result: dict = {"clips": z.shape[0]}
    result.update({part: float(z[:, i].mean()) for i, part in enumerate(TIMBRE_PARTS)})
    result["change_per_family"] = {label: float(zf[:, change].mean()) for label, zf in per_family.items()}
    return result


# -- instrument family classifier ----------------------------------------------------------------
class FamilyClassifier(nn.Module):
    """Standardized features ``(N, D)`` -> class logits ``(N, num_classes)``: one hidden layer.

    The feature mean and scale of the training set are buffers, so the classifier carries its
    own normalization.
    """

    def __init__(self, *, num_features: int, num_classes: int, hidden: int = 64, dropout: float = 0.2) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("scale", torch.ones(num_features))
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, hidden), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.scale)

    def predict(self, clips: Sequence[torch.Tensor]) -> list[int]:
        """One class per clip from its windows ``(W, D)``: the class of the summed log-probabilities."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            out = [int(F.log_softmax(self(windows), -1).sum(0).argmax()) for windows in clips]
        self.train(was_training)
        return out


def train_classifier(clips: Sequence[torch.Tensor], labels: Sequence[int], num_classes: int, *,
                     hidden: int = 64, steps: int = 400, lr: float = 3e-3, weight_decay: float = 1e-2,
                     seed: int = 0) -> FamilyClassifier:
    """Fit a :class:`FamilyClassifier` on clips given as window features ``(W, D)`` with one label each.

    Full-batch AdamW with class-balanced cross-entropy (the corpus has several times more
    woodwind leads than organ leads; without weights the rare families are never predicted).
    A second to a few seconds on one CPU core for a thousand clips.
    """
    if len(clips) != len(labels) or not clips:
        raise ValueError(f"need one label per clip and some clips, got {len(clips)} clips and {len(labels)} labels")
    if not all(0 <= y < num_classes for y in labels):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {sorted(set(labels))}")
    x = torch.cat([c.float() for c in clips])
    y = torch.cat([torch.full((c.shape[0],), int(label)) for c, label in zip(clips, labels)])
    counts = torch.bincount(y, minlength=num_classes).float()
    weights = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros(()))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FamilyClassifier(num_features=x.shape[1], num_classes=num_classes, hidden=hidden)
        model.mean.copy_(x.mean(0))
        model.scale.copy_(x.std(0, correction=0).clamp(min=1e-4))
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        model.train()
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y, weight=weights).backward()
            optimizer.step()
    return model.eval()


# -- key and mode ---------------------------------------------------------------------------------
_CHROMA_FFT = 4096
# librosa's chroma weights centred on octave 4 (440 Hz), two octaves wide: the melody and chord
# register, with little of the bass and of the drums' noise.
_CHROMA = chroma_filter_bank(sample_rate=ANALYSIS_RATE, n_fft=_CHROMA_FFT, center_octave=4.0)


def chroma_profile(wav: torch.Tensor) -> torch.Tensor:
    """Mono ``(T,)`` -> the clip's pitch-class profile ``(12,)`` (C first), summing to 1.

    Magnitude STFT of 256 ms windows folded to pitch classes, each frame normalized to its
    maximum before the frames are averaged so that loud bars do not dominate.
    """
    window = torch.hann_window(_CHROMA_FFT)
    spec = torch.stft(wav.float(), _CHROMA_FFT, _CHROMA_FFT // 4, window=window, center=True,
                      return_complex=True).abs()
    chroma = _CHROMA @ spec  # (12, frames)
    chroma = chroma / chroma.amax(0, keepdim=True).clamp(min=1e-8)
    profile = chroma.mean(1)
    return profile / profile.sum().clamp(min=1e-8)


def _key_templates() -> torch.Tensor:
    """The 24 Krumhansl-Kessler profiles ``(24, 12)``: row ``t`` major on tonic ``t``, ``12 + t`` minor."""
    rows = [torch.roll(torch.tensor(profile), tonic) for profile in (MAJOR_PROFILE, MINOR_PROFILE)
            for tonic in range(12)]
    return torch.stack(rows)


def _correlations(profile: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    centred = templates - templates.mean(-1, keepdim=True)
    p = profile - profile.mean()
    return (centred @ p) / (centred.norm(dim=-1) * p.norm() + 1e-12)


def estimate_key(wav: torch.Tensor) -> tuple[int, str]:
    """``(tonic pitch class, "major" | "minor")`` of mono audio ``(T,)``: the best of the 24
    Krumhansl-Kessler key profiles by correlation with the chroma profile.

    Weak on the corpus (about 40 % of keys, 70 % of modes right): its minor progressions
    (i-VI-III-VII and the like) sit on the relative major's notes, and the tonic is a guess.
    """
    best = int(_correlations(chroma_profile(wav), _key_templates()).argmax())
    return best % 12, ("major" if best < 12 else "minor")


def estimate_mode(wav: torch.Tensor, tonic: int) -> str:
    """``"major"`` or ``"minor"`` for mono audio ``(T,)`` heard against a known ``tonic`` (pitch
    class): whichever Krumhansl-Kessler profile on that tonic correlates better with the chroma.

    With the tonic given (the prompt states it), the relative-key ambiguity that makes
    :func:`estimate_key` weak is gone: on the corpus this is right for nearly every clip.
    """
    if not 0 <= tonic < 12:
        raise ValueError(f"tonic must be a pitch class 0-11, got {tonic}")
    templates = _key_templates()[[tonic, 12 + tonic]]
    major, minor = _correlations(chroma_profile(wav), templates).tolist()
    return "major" if major >= minor else "minor"


# -- validation on the corpus ---------------------------------------------------------------------
def key_report(wavs: Sequence[torch.Tensor], clips: Sequence[CorpusClip]) -> dict:
    """Free key estimation (mode, key, relative-key confusions) and mode given the true tonic."""
    n = len(clips)
    if n == 0 or len(wavs) != n:
        raise ValueError(f"need one clip per audio (and some), got {len(wavs)} and {n}")
    keys = [estimate_key(wav) for wav in wavs]
    relative = [(clip.tonic + (9 if clip.mode == "major" else 3)) % 12 for clip in clips]
    return {"clips": n,
            "mode_given_tonic": sum(estimate_mode(w, c.tonic) == c.mode for w, c in zip(wavs, clips)) / n,
            "free_mode": sum(m == c.mode for (_, m), c in zip(keys, clips)) / n,
            "free_key": sum(k == (c.tonic, c.mode) for k, c in zip(keys, clips)) / n,
            "relative_key_confusions": sum(m != c.mode and t == r for (t, m), c, r in zip(keys, clips, relative)) / n,
            "major_share": sum(c.mode == "major" for c in clips) / n}


def family_labels(clips: Sequence[CorpusClip], min_clips: int) -> list[str]:
    """Families featured in at least ``min_clips`` clips, most common first (ties by name)."""
    counts = Counter(clip.family for clip in clips)
    return sorted((f for f, c in counts.items() if c >= min_clips), key=lambda f: (-counts[f], f))


def accuracy_report(predicted: Sequence[int], truth: Sequence[int], names: Sequence[str]) -> dict:
    """Accuracy, class-balanced accuracy, majority-class share (chance), per-class accuracy and what
    each class was taken for (``confusion``: true name -> predicted name -> count)."""
    n = len(truth)
    if n == 0 or len(predicted) != n:
        raise ValueError(f"need one prediction per label (and some), got {len(predicted)} and {n}")
    per_class = {}
    for index, name in enumerate(names):
        hits = [p == t for p, t in zip(predicted, truth) if t == index]
        if hits:
            per_class[name] = sum(hits) / len(hits)
    majority = Counter(truth).most_common(1)[0][1]
    return {"clips": n, "accuracy": sum(p == t for p, t in zip(predicted, truth)) / n,
            "balanced_accuracy": statistics.mean(per_class.values()), "chance": majority / n,
            "per_class": per_class, "confusion": {
                name: dict(Counter(names[p] for p, t in zip(predicted, truth) if t == index).most_common())
                for index, name in enumerate(names) if index in truth}}


# -- prompts --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    """A generation prompt and the facts it states; ``attribute`` is the one its sweep varies."""

    text: str
    attribute: str  # "family", "tempo" or "mode"
    family: str
    tempo: int
    tonic: int
    mode: str


@dataclass(frozen=True)
class Vocabulary:
    """The corpus captions' words for what prompts vary, read from the metadata sidecars.

    instruments: family -> the caption name of its most often featured instrument;
    tempo_words: ``(bpm, word)`` pairs seen in the corpus (the word a caption uses at that bpm).
    """

    instruments: dict[str, str]
    tempo_words: tuple[tuple[int, str], ...]

    @classmethod
    def from_corpus(cls, clips: Sequence[CorpusClip]) -> Vocabulary:
        names: dict[str, Counter] = {}
        for clip in clips:
            names.setdefault(clip.family, Counter())[clip.instrument] += 1
        instruments = {family: max(counter.items(), key=lambda kv: (kv[1], kv[0]))[0]
                       for family, counter in sorted(names.items())}
        words = tuple(sorted({(clip.tempo, clip.tempo_word) for clip in clips}))
        return cls(instruments=instruments, tempo_words=words)

    def tempo_word(self, bpm: int) -> str:
        """The word the corpus uses for the nearest bpm it has."""
        return min(self.tempo_words, key=lambda pair: (abs(pair[0] - bpm), pair[0]))[1]


def prompt_text(vocabulary: Vocabulary, family: str, tempo: int, tonic: int, mode: str) -> str:
    """One of the corpus's caption forms ("instrumental <noun> led by <lead>; <tempo>, <bpm>, <key>")."""
    return (f"instrumental tune led by {vocabulary.instruments[family]}; {vocabulary.tempo_word(tempo)}, "
            f"at {tempo} bpm, in {PITCH_CLASSES[tonic]} {mode}")


def build_prompts(vocabulary: Vocabulary, *, families: Sequence[str], base_family: str,
                  tempos: Sequence[int] = (70, 100, 140), base_tempo: int = 100, tonic: int = 0,
                  modes: Sequence[str] = ("major", "minor"), base_mode: str = "major") -> list[Prompt]:
    """Three sweeps around the base prompt, each varying one attribute: the instrument family
    (every one of ``families``), the tempo (``tempos``) and the mode (``modes``, on ``tonic``)."""
    unknown = [f for f in (*families, base_family) if f not in vocabulary.instruments]
    if unknown:
        raise ValueError(f"no instrument name for famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                         f"the corpus has {sorted(vocabulary.instruments)}")

    def make(attribute: str, family=base_family, tempo=base_tempo, mode=base_mode) -> Prompt:
        return Prompt(prompt_text(vocabulary, family, tempo, tonic, mode), attribute, family, tempo, tonic, mode)

    return ([make("family", family=f) for f in families] + [make("tempo", tempo=t) for t in tempos]
            + [make("mode", mode=m) for m in modes])


# -- generations ----------------------------------------------------------------------------------
GenerateFn = Callable[[list[str], int], tuple[torch.Tensor, int]]  # (texts, seed) -> (wav (B, C, T), rate)


def musicgen_generate_fn(generator, duration: float, **options) -> GenerateFn:
    """Adapt a :class:`inference.MusicGen` to :data:`GenerateFn`: ``duration`` seconds per text,
    sampling ``options`` as :meth:`MusicGen.generate` takes them."""
    def generate(texts: list[str], seed: int) -> tuple[torch.Tensor, int]:
        wav, rate = generator.generate(list(texts), duration, seed=seed, **options)
        return wav, rate
    return generate


def generate_clips(generate: GenerateFn, texts: Sequence[str], *, batch: int, seed: int) -> list[torch.Tensor]:
    """Generate one clip per text, ``batch`` texts per call (call ``i`` seeded ``seed + i``), as mono
    ``(T,)`` at :data:`ANALYSIS_RATE`."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    out = []
    for i, start in enumerate(range(0, len(texts), batch)):
        chunk = list(texts[start:start + batch])
        wav, rate = generate(chunk, seed + i)
        if wav.dim() != 3 or wav.shape[0] != len(chunk):
            raise ValueError(f"the generator returned audio shaped {tuple(wav.shape)} for {len(chunk)} "
                             f"prompts; expected ({len(chunk)}, C, T)")
        out.extend(as_analysis_audio(item, rate) for item in wav)
    return out


def score_generations(prompts: Sequence[Prompt], wavs: Sequence[torch.Tensor], *, classifier: FamilyClassifier,
                      families: Sequence[str], min_bpm: float = 50.0, max_bpm: float = 200.0,
                      codec_classifier: FamilyClassifier | None = None,
                      tempo_reader: TempoReader | None = None,
                      reference: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict:
    """Adherence of generated clips (mono ``(T,)`` at :data:`ANALYSIS_RATE`, one per prompt) to the
    attribute each prompt's sweep varies: recognized family (also by ``codec_classifier``, as
    ``"family_codec"``, when given), estimated tempo (by ``tempo_reader`` when given, and then by the
    autocorrelation estimator too, as ``"tempo_acf"``), mode on the prompted tonic. With ``reference``
    (:func:`family_reference` of real clips) also the family clips' :func:`timbre_shift`
    (``"family_timbre_shift"``): which of the features the classifier reads moved."""
    if len(prompts) != len(wavs):
        raise ValueError(f"need one clip per prompt, got {len(wavs)} clips for {len(prompts)} prompts")
    result: dict = {}
    sweep = [(p, w) for p, w in zip(prompts, wavs) if p.attribute == "family"]
    if sweep:
        features = [timbre_features(w) for _, w in sweep]
        truth = [families.index(p.family) for p, _ in sweep]
        readers = {"family": classifier, "family_codec": codec_classifier}
        for name, reader in readers.items():
            if reader is not None:
                result[name] = accuracy_report(reader.predict(features), truth, families)
                result[name]["chance"] = 1 / len(families)  # every family is prompted equally often
        if reference is not None:
            result["family_timbre_shift"] = timbre_shift(features, [p.family for p, _ in sweep], reference)
    sweep = [(p, w) for p, w in zip(prompts, wavs) if p.attribute == "tempo"]
    if sweep:
        prompted = [p.tempo for p, _ in sweep]
        acf = [estimate_tempo(w, min_bpm=min_bpm, max_bpm=max_bpm) for _, w in sweep]
        if tempo_reader is not None:
            result["tempo"] = _tempo_sweep([tempo_reader.read(w) for _, w in sweep], prompted)
            result["tempo_acf"] = _tempo_sweep(acf, prompted)
        else:
            result["tempo"] = _tempo_sweep(acf, prompted)
    sweep = [(p, w) for p, w in zip(prompts, wavs) if p.attribute == "mode"]
    if sweep:
        hits = {}
        for p, w in sweep:
            hits.setdefault(p.mode, []).append(estimate_mode(w, p.tonic) == p.mode)
        result["mode"] = {"clips": len(sweep), "accuracy": sum(map(sum, hits.values())) / len(sweep),
                          "per_mode": {mode: sum(h) / len(h) for mode, h in hits.items()}}
    return result


def _tempo_sweep(estimates: Sequence[float], prompted: Sequence[int]) -> dict:
    per_tempo = {}
    for bpm in sorted(set(prompted)):
        mine = [e for e, t in zip(estimates, prompted) if t == bpm]
        report = {k: v for k, v in tempo_report(mine, [bpm] * len(mine)).items() if k != "spearman"}
        per_tempo[bpm] = {**report, "median_bpm": statistics.median(mine)}
    return {"clips": len(estimates), "per_tempo": per_tempo, "estimates": list(estimates),
            "spearman": spearman(prompted, estimates) if len(set(prompted)) > 1 else float("nan")}


# -- the whole run --------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdherenceSettings:
    """What :func:`run_adherence` measures and how much of it (defaults: a few minutes on 2 cores)."""

    train_clips: int | None = None  # corpus train clips for the classifier (None: all)
    min_family_clips: int = 10  # families featured in fewer train clips are left out
    per_prompt: int = 2  # generations per prompt (repetition r uses tonic TONICS[r % 5])
    batch: int = 8
    seed: int = 0
    tempos: tuple[int, ...] = (70, 100, 140)
    min_bpm: float = 50.0
    max_bpm: float = 200.0
    frame_rate: float = 50.0  # the codec's: line prominence at its multiples measures a frame-rate buzz
    codec_classifier: bool = False  # with a round trip: also a classifier trained on round-tripped train clips
    tempo_reader: bool = True  # tempo read by a TempoReader trained on the train clips (False: autocorrelation only)
    continuation: int = 0  # held-out clips per family continued from their start (bench.continuation; 0: none)
    continuation_prompt: float = 2.0  # seconds of each clip given as the prompt
    continuation_seconds: float = 10.0  # continued to this length


TONICS = (0, 7, 2, 9, 5)  # C G D A F: names without accidentals, so the prompt's spelling is the corpus's


RoundTrip = Callable[[torch.Tensor, int], torch.Tensor]  # (audio (C, T), rate) -> mono (T',) at ANALYSIS_RATE


def validate_measures(train_dir: str | Path, valid_dir: str | Path, settings: AdherenceSettings,
                      log: Callable[[str], None] = print, roundtrip: RoundTrip | None = None
                      ) -> tuple[dict, FamilyClassifier, list[str], Vocabulary]:
    """Train the family classifier and validate all three measures on corpus clips.

    ``roundtrip`` (a codec's encode + decode): the measures are also taken on the held-out clips
    passed through it, under ``results["roundtrip"]``: what a generator that emitted exactly the
    real clips' codes would score, the ceiling of a generator built on that codec. With
    ``settings.codec_classifier`` a second family classifier is trained on the train clips passed
    through it (``results["roundtrip"]["codec_classifier"]``: its accuracy on the round-tripped
    held-out clips): the real-clip classifier reads a codec's timbre shift as another family, this
    one asks only whether the family survives in the codec's own rendering (a diagnostic; the
    measure of record stays the real-clip classifier).
    With ``settings.tempo_reader`` a :class:`~bench.tempo.TempoReader` is trained on the train
    clips' tempi and reads tempo (``results["tempo"]``); the autocorrelation estimator's reports
    move to ``results["tempo_acf"]``.
    ``results["timbre_shift"]``: where the held-out clips (and their round trips) sit against the
    train clips of their family (:func:`timbre_shift`).
    Returns ``(results, classifier, families, vocabulary, codec_classifier or None, tempo_reader or None,
    reference)``, ``reference`` the train clips' :func:`family_reference`.
    """
    train = read_corpus(train_dir, limit=settings.train_clips)
    valid = read_corpus(valid_dir)
    families = family_labels(train, settings.min_family_clips)
    if len(families) < 2:
        raise ValueError(f"{train_dir}: fewer than 2 instrument families with {settings.min_family_clips}+ "
                         f"clips; render more of the corpus or lower --min-family-clips")
    log(f"reading {len(train)} train and {len(valid)} valid clips")
    started = time.perf_counter()
    train_wavs = [load_mono(clip.audio) for clip in train]
    valid_wavs = [load_mono(clip.audio) for clip in valid]
    train_features = [timbre_features(w) for w in train_wavs]
    valid_features = [timbre_features(w) for w in valid_wavs]
    log(f"features in {time.perf_counter() - started:.1f} s")
    labelled = [(x, families.index(c.family)) for x, c in zip(train_features, train) if c.family in families]
    started = time.perf_counter()
    classifier = train_classifier([x for x, _ in labelled], [y for _, y in labelled], len(families),
                                  seed=settings.seed)
    log(f"classifier trained on {len(labelled)} clips in {time.perf_counter() - started:.1f} s")
    held_out = [(x, families.index(c.family)) for x, c in zip(valid_features, valid) if c.family in families]
    results: dict = {"families": families, "train_clips": len(labelled)}
    results["classifier"] = (accuracy_report(classifier.predict([x for x, _ in held_out]),
                                             [y for _, y in held_out], families) if held_out else None)
    reference = family_reference([x for x, _ in labelled], [families[y] for _, y in labelled])
    results["timbre_shift"] = {"valid": timbre_shift([x for x, _ in held_out], [families[y] for _, y in held_out],
                                                     reference)}
    tempo_args = dict(min_bpm=settings.min_bpm, max_bpm=settings.max_bpm)
    acf_key, tempo_reader = "tempo", None
    if settings.tempo_reader:
        started = time.perf_counter()
        tempo_reader = train_tempo_reader(train_wavs, [c.tempo for c in train], seed=settings.seed)
        log(f"tempo reader trained on {len(train)} clips in {time.perf_counter() - started:.1f} s")
        reads = {split: [tempo_reader.read(w) for w in wavs]
                 for split, wavs in (("valid", valid_wavs), ("train", train_wavs))}
        results["tempo"] = {split: tempo_report(reads[split], [c.tempo for c in clips])  # "train": its fit
                            for split, clips in (("valid", valid), ("train", train))}
        acf_key = "tempo_acf"
    acf_reads = {split: [estimate_tempo(w, **tempo_args) for w in wavs]
                 for split, wavs in (("valid", valid_wavs), ("train", train_wavs))}
    results[acf_key] = {split: tempo_report(acf_reads[split], [c.tempo for c in clips])
                        for split, clips in (("valid", valid), ("train", train))}
    valid_tempi = [c.tempo for c in valid]
    sweep_args = dict(tempos=settings.tempos, per_tempo=settings.per_prompt, seed=settings.seed)
    results["tempo_sweep_reference"] = {"valid": sweep_reference(
        (reads if tempo_reader is not None else acf_reads)["valid"], valid_tempi, **sweep_args)}
    results["key"] = {split: key_report(wavs, clips)
                      for split, wavs, clips in (("valid", valid_wavs, valid), ("train", train_wavs, train))}
    results["lines_db"] = {"valid": mean_line_prominence(valid_wavs, settings.frame_rate)}
    if roundtrip is not None:
        started = time.perf_counter()
        coded = [roundtrip(*audio_io.read_audio(clip.audio)) for clip in valid]
        log(f"codec round trips in {time.perf_counter() - started:.1f} s")
        labelled = [(timbre_features(w), families.index(c.family))
                    for w, c in zip(coded, valid) if c.family in families]
        coded_acf = [estimate_tempo(w, **tempo_args) for w in coded]
        results["roundtrip"] = {
            "classifier": (accuracy_report(classifier.predict([x for x, _ in labelled]), [y for _, y in labelled],
                                           families) if labelled else None),
            acf_key: tempo_report(coded_acf, valid_tempi),
            "key": key_report(coded, valid),
            "lines_db": mean_line_prominence(coded, settings.frame_rate)}
        results["timbre_shift"]["valid, codec round trip"] = timbre_shift(
            [x for x, _ in labelled], [families[y] for _, y in labelled], reference)
        coded_reads = coded_acf
        if tempo_reader is not None:
            coded_reads = [tempo_reader.read(w) for w in coded]
            results["roundtrip"]["tempo"] = tempo_report(coded_reads, valid_tempi)
        results["tempo_sweep_reference"]["valid, codec round trip"] = sweep_reference(
            coded_reads, valid_tempi, **sweep_args)
    codec_classifier = None
    if roundtrip is not None and settings.codec_classifier:
        started = time.perf_counter()
        pairs = [(timbre_features(roundtrip(*audio_io.read_audio(c.audio))), families.index(c.family))
                 for c in train if c.family in families]
        codec_classifier = train_classifier([x for x, _ in pairs], [y for _, y in pairs], len(families),
                                            seed=settings.seed)
        log(f"codec-domain classifier: {len(pairs)} train round trips in {time.perf_counter() - started:.1f} s")
        results["roundtrip"]["codec_classifier"] = (accuracy_report(
            codec_classifier.predict([x for x, _ in labelled]), [y for _, y in labelled], families)
            if labelled else None)
    return results, classifier, families, Vocabulary.from_corpus(train), codec_classifier, tempo_reader, reference


def run_adherence(train_dir: str | Path, valid_dir: str | Path, generate: GenerateFn | None = None,
                  settings: AdherenceSettings = AdherenceSettings(),
                  log: Callable[[str], None] = print, roundtrip: RoundTrip | None = None,
                  continue_fn: ContinueFn | None = None) -> dict:
    """Validate the measures on the corpus (and through ``roundtrip``, see :func:`validate_measures`),
    then (with ``generate``) score generations of prompts that vary one attribute at a time.
    With ``settings.continuation``, a ``continue_fn`` (:data:`bench.continuation.ContinueFn`) and a
    ``roundtrip``, also the family read of continued held-out clips (``results["continuation"]``).
    Returns a JSON-ready dict; see :func:`adherence_tables`."""
    results, classifier, families, vocabulary, codec_classifier, tempo_reader, reference = validate_measures(
        train_dir, valid_dir, settings, log, roundtrip)
    if settings.continuation and continue_fn is not None and roundtrip is not None:
        from .continuation import continuation_report, pick_clips  # it builds on this module

        started = time.perf_counter()
        results["continuation"] = continuation_report(
            pick_clips(read_corpus(valid_dir), families, settings.continuation), classifier=classifier,
            families=families, continue_fn=continue_fn, roundtrip=roundtrip,
            prompt_seconds=settings.continuation_prompt, seconds=settings.continuation_seconds,
            batch=settings.batch, seed=settings.seed)
        log(f"continuations in {time.perf_counter() - started:.1f} s")
    if generate is None:
        return results
    base_family = families[0]
    prompts = [prompt for r in range(settings.per_prompt)
               for prompt in build_prompts(vocabulary, families=families, base_family=base_family,
                                           tempos=settings.tempos, tonic=TONICS[r % len(TONICS)])]
    log(f"generating {len(prompts)} clips")
    started = time.perf_counter()
    wavs = generate_clips(generate, [p.text for p in prompts], batch=settings.batch, seed=settings.seed)
    log(f"generated in {time.perf_counter() - started:.1f} s")
    scores = score_generations(prompts, wavs, classifier=classifier, families=families,
                               min_bpm=settings.min_bpm, max_bpm=settings.max_bpm, codec_classifier=codec_classifier,
                               tempo_reader=tempo_reader, reference=reference)
    mode_validity = results["key"]["valid"]["mode_given_tonic"]
    if "mode" in scores:
        scores["mode"]["trusted"] = mode_validity >= MODE_TRUST
    lines = mean_line_prominence(wavs, settings.frame_rate)
    scores["lines"] = {"generated_db": lines, "valid_db": results["lines_db"]["valid"],
                       "buzz_db": lines - results["lines_db"]["valid"], "rate_hz": settings.frame_rate}
    results["generated"] = {"prompts": [p.text for p in prompts[: len(prompts) // settings.per_prompt]],
                            **scores}
    return results


def mean_line_prominence(wavs: Sequence[torch.Tensor], rate_hz: float) -> float:
    """Mean prominence (dB) of the spectral lines at multiples of ``rate_hz`` (up to 7 kHz) over
    clips at :data:`ANALYSIS_RATE`: a codec's frame-rate buzz raises it above real audio's."""
    from codec.training.buzz import line_prominence

    return statistics.fmean(float(line_prominence(w, ANALYSIS_RATE, rate_hz, max_hz=7000.0).mean()) for w in wavs)


# -- tables ---------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.0f} %"


_SHIFT_HEADER = ["| split | clips | band mean | spread | frame-to-frame change |", "|---|---|---|---|---|"]


def _shift_row(split: str, r: dict) -> str:
    return f"| {split} | {r['clips']} | {r['mean']:+.2f} | {r['spread']:+.2f} | {r['change']:+.2f} |"


def adherence_tables(result: dict) -> str:
    """Markdown tables of a :func:`run_adherence` result."""
    lines = ["### Measures validated on the corpus", ""]
    classifier = result["classifier"]
    lines += [f"Instrument-family classifier ({len(result['families'])} families, {result['train_clips']} "
              f"train clips):", "",
              "| split | clips | accuracy | balanced | majority-class share |", "|---|---|---|---|---|"]
    if classifier:
        lines.append(f"| valid | {classifier['clips']} | {_pct(classifier['accuracy'])} | "
                     f"{_pct(classifier['balanced_accuracy'])} | {_pct(classifier['chance'])} |")
    else:
        lines.append("| valid | 0 | n/a | n/a | n/a |")
    coded = result.get("roundtrip")
    if coded and coded["classifier"]:
        r = coded["classifier"]
        lines.append(f"| valid, codec round trip | {r['clips']} | {_pct(r['accuracy'])} | "
                     f"{_pct(r['balanced_accuracy'])} | {_pct(r['chance'])} |")
    shifts = {k: v for k, v in result.get("timbre_shift", {}).items() if v}
    if shifts:
        lines += ["", "What the classifier reads, against the train clips of the same family (standard deviations, "
                  "mean over bands):", "", *_SHIFT_HEADER]
        lines += [_shift_row(split, r) for split, r in shifts.items()]
    lines += ["", "Tempo against the MIDI tempo:", "",
              "| reader | split | clips | median abs error (bpm) | within 8 % | x1/2, x2, x1/3, x3 (within 8 %) "
              "| wrong | Spearman |", "|---|---|---|---|---|---|---|---|"]
    names = {"tempo": "trained reader" if "tempo_acf" in result else "autocorrelation",
             "tempo_acf": "autocorrelation"}
    for key, name in names.items():
        if key not in result:
            continue
        rows = dict(result[key], **({"valid, codec round trip": coded[key]} if coded else {}))
        for split, r in rows.items():
            lines.append(f"| {name} | {split} | {r['clips']} | {r['median_abs_error_bpm']:.1f} | "
                         f"{_pct(r['within_8pct'])} | {_pct(r['octave_errors'])} | {_pct(r['wrong'])} | "
                         f"{r.get('spearman', float('nan')):.2f} |")
    references = result.get("tempo_sweep_reference", {})
    if references:
        first = next(iter(references.values()))
        lines += ["", f"The tempo sweep's Spearman on real music: held-out clips within {_pct(first['tolerance'])} of "
                  f"each prompted tempo, read the same way, in {first['draws']} random sweeps of {first['per_tempo']} "
                  f"per tempo (what a generator playing exactly the prompted tempo would score):", "",
                  "| split | clips per tempo | within 8 % per tempo | Spearman, all clips | sweeps' median "
                  "| 10-90 % | sweeps reaching the target |", "|---|---|---|---|---|---|---|"]
        for split, r in references.items():
            counts = ", ".join(f"{bpm}: {n}" for bpm, n in r["clips"].items())
            if r["spearman"] is None:
                lines.append(f"| {split} | {counts} | n/a | n/a | n/a | n/a | n/a |")
                continue
            s = r["spearman"]
            within = ", ".join(_pct(v) for v in r["within_8pct"].values())
            lines.append(f"| {split} | {counts} | {within} | {r['spearman_all']:.2f} | {s['median']:.2f} | "
                         f"{s['p10']:.2f}-{s['p90']:.2f} | {_pct(s['at_least_target'])} (>= {s['target']:g}) |")
    lines += ["", "Mode (chroma + Krumhansl-Kessler profiles):", "",
              "| split | clips | mode, tonic given | mode, free | key, free | relative-key confusions | major share |",
              "|---|---|---|---|---|---|---|"]
    key_rows = dict(result["key"], **({"valid, codec round trip": coded["key"]} if coded else {}))
    for split, r in key_rows.items():
        lines.append(f"| {split} | {r['clips']} | {_pct(r['mode_given_tonic'])} | {_pct(r['free_mode'])} | "
                     f"{_pct(r['free_key'])} | {_pct(r['relative_key_confusions'])} | {_pct(r['major_share'])} |")
    if "continuation" in result:
        from .continuation import continuation_table

        lines += ["", "### Continuations", "", continuation_table(result["continuation"])]
    generated = result.get("generated")
    if not generated:
        return "\n".join(lines)
    lines += ["", "### Generations", "", "Base prompt and sweeps (one attribute varied at a time), e.g.:", ""]
    lines += [f"- {text}" for text in dict.fromkeys(generated["prompts"])]
    if "family" in generated:
        r, codec = generated["family"], generated.get("family_codec")
        lines += ["", f"Prompted family recognized by the classifier ({r['clips']} clips, chance "
                  f"{_pct(r['chance'])}): **{_pct(r['accuracy'])}**", ""]
        if codec:
            lines += ["| family | recognized | through the codec (classifier trained on round trips) |",
                      "|---|---|---|"]
            lines += [f"| {family} | {_pct(acc)} | {_pct(codec['per_class'].get(family))} |"
                      for family, acc in r["per_class"].items()]
            ceiling = (coded or {}).get("codec_classifier") or {}
            lines += ["", f"Through the codec: **{_pct(codec['accuracy'])}** of the prompted families recognized "
                      f"by a classifier trained on codec round trips of the train clips (it knows "
                      f"{_pct(ceiling.get('accuracy'))} of the round-tripped held-out clips)"]
        else:
            lines += ["| family | recognized |", "|---|---|"]
            lines += [f"| {family} | {_pct(acc)} |" for family, acc in r["per_class"].items()]
    shift = generated.get("family_timbre_shift")
    if shift:
        lines += ["", "The family clips against real clips of the prompted family (as above):", "",
                  *_SHIFT_HEADER, _shift_row("generated", shift)]
    if "tempo" in generated:
        r, acf = generated["tempo"], generated.get("tempo_acf")
        reader = "trained reader" if acf else "autocorrelation"
        lines += ["", f"Tempo ({r['clips']} clips, {reader}): Spearman rank correlation prompted vs estimated "
                  f"**{r['spearman']:.2f}**" if r["spearman"] == r["spearman"] else
                  f"Tempo ({r['clips']} clips, {reader}): rank correlation n/a"]
        if acf:
            lines[-1] += f" (autocorrelation estimator: {acf['spearman']:.2f})"
        lines += ["", "| prompted bpm | median estimate | within 8 % | x1/2, x2, x1/3, x3 |", "|---|---|---|---|"]
        lines += [f"| {bpm} | {t['median_bpm']:.1f} | {_pct(t['within_8pct'])} | {_pct(t['octave_errors'])} |"
                  for bpm, t in r["per_tempo"].items()]
    if "mode" in generated:
        r = generated["mode"]
        verdict = "" if r["trusted"] else (f" (NOT trusted: the estimator is right on under {_pct(MODE_TRUST)} "
                                           "of valid clips)")
        lines += ["", f"Mode on the prompted tonic ({r['clips']} clips): **{_pct(r['accuracy'])}**{verdict}; "
                  + ", ".join(f"{mode} {_pct(acc)}" for mode, acc in r["per_mode"].items())]
    if "lines" in generated:
        r = generated["lines"]
        lines += ["", f"Frame-rate buzz: spectral lines at multiples of {r['rate_hz']:g} Hz stand "
                  f"{r['generated_db']:.2f} dB over their neighbours in the generations, {r['valid_db']:.2f} dB "
                  f"in real held-out clips: **{r['buzz_db']:+.2f} dB**"
                  + (f" (codec round trips of those clips: {coded['lines_db'] - r['valid_db']:+.2f} dB)"
                     if coded else "")]
    return "\n".join(lines)
