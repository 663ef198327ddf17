"""The Gradio demo: music from prompts with any tokenwave generator, and the codec's round trip.

    tokenwave demo [--model PATH_OR_NAME] [--host 127.0.0.1] [--port 7860] [--share]
    python -m demos.app [same options]

**Generate** tab: prompts (one per line, up to :data:`MAX_PROMPTS`, generated as one batch),
duration, top-k, top-p, temperature, guidance, seed; the model (generator folders found in
``$TOKENWAVE_MODELS`` and ``assets/models``, or a folder typed in); an optional audio prompt to
continue and a melody for melody models; a progress bar fed by the generator's per-step
callback; per output a player, a mel spectrogram and a download. With **Stream** ticked, a live
player (``gr.Audio(streaming=True)``) plays the first prompt while it is generated
(:func:`generate_music_stream`; gradio encodes live audio with ffmpeg, which must be installed).
**Codec** tab: upload audio, choose a codec and a bitrate, listen to the round trip through an
``.ecdc`` file beside the original, and read the file's size and real bitrate. The entropy-coding
box is enabled only for codecs that have an LM (found as ``tokenwave compress --lm`` finds it,
:func:`codec.pretrained.entropy_lm_for`); the round trip is also an API endpoint,
``/codec_roundtrip`` (audio file, codec, codebook count, entropy coding), for ``gradio_client``.

With no generator installed, the model list offers an untrained stand-in with fixed random
weights (:func:`random_generator`): the app runs end to end but plays noise, and says so.

The handlers (:func:`generate_music`, :func:`generate_music_stream`, :func:`codec_roundtrip`,
:func:`bitrate_choices`, :func:`model_summary`) are plain functions of plain values that raise :class:`DemoError` on bad
input; :func:`build_app` wires them to widgets and shows every error as a message in the page,
never a stack trace. Requests are queued and ``concurrency`` of them run at once: loaded models
are shared read-only (each generation keeps its own cache and random generator) and loading
happens under a lock. gradio is imported only by :func:`build_app` and :func:`launch`.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import secrets
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from codec import audio as audio_io

MAX_PROMPTS = 4
MAX_DURATION = 120.0  # seconds the demo generates at most per request
MAX_SLIDER_SECONDS = 60.0  # the duration slider's end (longer through the API, up to MAX_DURATION)
MAX_CODEC_SECONDS = 300.0  # longest upload the codec tab takes
DEFAULT_CONCURRENCY = 2
RANDOM_MODEL = "random"  # the model choice of the untrained stand-in
RANDOM_LABEL = "UNTRAINED random model (plays noise; for trying the app)"
WEIGHTS_MARK = "@"  # "<folder>@int8": that checkpoint with int8 / int4 LM weights
QUANTIZED_WEIGHTS = ("int8", "int4")
OUTPUT_MAX_AGE = 2 * 3600.0  # seconds generated files are kept in the work folder
EXAMPLES = (
    "a slow, sad piano ballad in A minor",
    "energetic drums and bass at 140 bpm",
    "a cheerful folk song with acoustic guitar and fiddle",
    "smooth jazz tune with tenor sax, upright bass and brushed drums, 120 bpm",
    "dreamy ambient soundscape with warm pads and celesta",
    "euphoric electronic dance track with saw lead, 128 bpm",
)
# Words the untrained stand-in's lookup-table text encoder knows (others map to "unknown").
RANDOM_VOCAB = tuple(sorted(set(" ".join(EXAMPLES).lower().replace(",", " ").split()) | {
    "rock", "waltz", "hip", "hop", "lo-fi", "funk", "reggae", "march", "lullaby", "classical", "bossa", "nova",
    "happy", "calm", "dark", "fast", "upbeat", "guitar", "strings", "violin", "flute", "synth", "organ", "trumpet"}))

ProgressFn = Callable[[float, str], None]


class DemoError(ValueError):
    """Bad input, or a model that cannot be used: the message is shown in the page."""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# -- models ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelChoice:
    """A dropdown entry: what the user reads, and the folder (or spec) it loads."""

    label: str
    value: str


def find_generators(models_dir: str | os.PathLike | None = None) -> list[ModelChoice]:
    """Generator folders (tokenwave, transformers or audiocraft format) in the models folder
    (``models_dir``, else ``$TOKENWAVE_MODELS``, else ``~/.cache/tokenwave``; also its
    ``facebook/`` subfolder) and in the repository's ``assets/models``."""
    from codec.registry import get_models_dir
    from inference.pretrained import detect_format
    from inference.registry import SHIPPED_MODELS

    found: list[ModelChoice] = []
    for root, prefix in ((get_models_dir(models_dir), ""), (SHIPPED_MODELS, "shipped: ")):
        folders = [p for base in (root, root / "facebook") if base.is_dir() for p in sorted(base.iterdir())]
        for folder in folders:
            try:
                kind = detect_format(folder)
            except Exception:  # not a generator (a codec, a T5, anything else)
                continue
            found.append(ModelChoice(f"{prefix}{folder.relative_to(root)} ({kind})", str(folder.resolve())))
    return found


def model_choices(model_path: str | os.PathLike | None = None,
                  models_dir: str | os.PathLike | None = None) -> tuple[list[ModelChoice], str]:
    """The model dropdown's entries and its default: ``model_path`` (a folder, a registry name,
    or :data:`RANDOM_MODEL`) when given, else the registry's default model when installed, else
    the first found, else the untrained stand-in (always offered last)."""
    from inference import registry

    choices = find_generators(models_dir)
    default = None
    if model_path is not None and os.fspath(model_path) == RANDOM_MODEL:
        default = RANDOM_MODEL
    elif model_path is not None:
        spec = os.fspath(model_path)
        try:
            folder = Path(spec) if os.path.exists(spec) else registry.resolve(spec, models_dir=models_dir)
        except FileNotFoundError as error:
            raise DemoError(f"--model {spec}: {_one_line(error)}") from None
        default = str(folder.resolve())
        if default not in [c.value for c in choices]:
            choices.insert(0, ModelChoice(f"{spec} (--model)", default))
    else:
        try:
            default = str(registry.resolve(registry.DEFAULT_MODEL, models_dir=models_dir).resolve())
        except FileNotFoundError:
            default = None
        if default not in [c.value for c in choices]:
            default = choices[0].value if choices else None
    # the same checkpoints with the LM's matrices quantized at load time (faster on CPUs; lm.quant)
    choices += [ModelChoice(f"{c.label}, {dtype} weights (CPU speed)", f"{c.value}{WEIGHTS_MARK}{dtype}")
                for c in list(choices) for dtype in QUANTIZED_WEIGHTS]
    choices.append(ModelChoice(RANDOM_LABEL, RANDOM_MODEL))
    return choices, default or RANDOM_MODEL


def random_generator(seed: int = 0):
    """An untrained 32 kHz text-to-music generator with fixed random weights, built in about a
    second: a 2-layer LM over 4 codebooks of 2048 codes, a lookup-table text encoder and a small
    random codec. It runs the whole pipeline (text, LM steps with guidance, decoding) and plays
    noise: for trying the app where no trained model is installed."""
    from codec.model import EncodecConfig
    from conditioning import ConditionProvider, LUTConditioner
    from inference.cli import random_model
    from inference.generator import GeneratorConfig, MusicGen
    from lm import LMConfig, LMModel

    codec_config = EncodecConfig(name="random_demo_32khz", sample_rate=32_000, channels=1, causal=False,
                                 ratios=(8, 5, 4, 4), n_filters=8, dimension=32, num_codebooks=4,
                                 codebook_size=2048, true_skip=True, lstm=1, pad_mode="constant",
                                 target_bandwidths=(2.2,))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = LMModel(LMConfig(dim=64, num_heads=4, num_layers=2, ffn_dim=128, num_codebooks=4, card=2048))
        text = LUTConditioner(vocab=RANDOM_VOCAB, dim=16, output_dim=64)
    codec = random_model(codec_config, seed=seed)
    return MusicGen(lm=lm, codec=codec, condition_provider=ConditionProvider({"description": text}),
                    config=GeneratorConfig(max_duration=30.0, extend_stride=18.0))


_LOCK = threading.Lock()
_GENERATORS: dict[str, object] = {}  # RANDOM_MODEL and at most one loaded checkpoint
_CODECS: dict[str, object] = {}


def _generator_key(choice: str | None, path: str | None) -> str:
    spec = (path or "").strip() or (choice or "").strip()
    if not spec:
        raise DemoError("Choose a model, or type the folder of a checkpoint.")
    if spec == RANDOM_MODEL:
        return spec
    folder = Path(spec).expanduser()
    return str(folder.resolve()) if folder.exists() else spec


def load_generator(choice: str | None, path: str | None = None):
    """The generator for a dropdown value or a typed folder/name, loaded once and kept (one
    checkpoint at a time, plus the untrained stand-in)."""
    from inference.generator import MusicGen

    key = _generator_key(choice, path)
    with _LOCK:
        if key not in _GENERATORS:
            if key == RANDOM_MODEL:
                generator = random_generator()
            else:
                try:
                    marked = key.endswith(tuple(WEIGHTS_MARK + d for d in QUANTIZED_WEIGHTS))
                    folder, _, dtype = key.rpartition(WEIGHTS_MARK) if marked else (key, "", None)
                    generator = MusicGen.from_pretrained(folder, dtype=dtype)
                except Exception as error:  # any unreadable folder becomes a message
                    raise DemoError(f"Cannot load the model {key}: {_one_line(error)}") from None
                for other in [k for k in _GENERATORS if k != RANDOM_MODEL]:
                    del _GENERATORS[other]
            _GENERATORS[key] = generator
        return _GENERATORS[key]


def model_summary(choice: str | None, path: str | None = None) -> str:
    """Markdown describing the model (loading it): rates, codebooks, window, conditioning."""
    key = _generator_key(choice, path)
    generator = load_generator(choice, path)
    text = type(generator.condition_provider.conditioners["description"]).__name__
    params = sum(p.numel() for p in generator.lm.parameters()) / 1e6
    lines = [f"**{RANDOM_LABEL if key == RANDOM_MODEL else Path(key).name}**",
             f"{generator.sample_rate} Hz, {generator.channels} channel(s), {generator.lm.config.num_codebooks} "
             f"codebooks at {generator.frame_rate} Hz; LM {params:.3g} M parameters; text: {text}; "
             f"window {generator.max_duration:g} s; melody: {'yes' if generator.has_melody else 'no'}"]
    return "  \n".join(lines)


def load_codec_model(spec: str):
    """A codec from a name, a checkpoint path or ``random:<preset>``, loaded once and kept."""
    from inference.cli import load_codec

    spec = (spec or "").strip()
    if not spec:
        raise DemoError("Choose a codec.")
    with _LOCK:
        if spec not in _CODECS:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            try:
                model = load_codec(spec, device)
            except Exception as error:
                raise DemoError(f"Cannot load the codec {spec}: {_one_line(error)}") from None
            if len(_CODECS) >= 3:
                _CODECS.pop(next(iter(_CODECS)))
            _CODECS[spec] = model
        return _CODECS[spec]


def codec_choices(models_dir: str | os.PathLike | None = None) -> list[ModelChoice]:
    """Codecs to offer: released ones installed in the models folder, the codecs inside
    generator folders, then untrained random stand-ins."""
    from codec.registry import MODEL_NAMES, resolve

    choices = []
    for name in MODEL_NAMES:
        try:
            resolve(name, models_dir=models_dir, allow_download=False)
        except FileNotFoundError:
            continue
        choices.append(ModelChoice(name, name))
    for generator in find_generators(models_dir):
        if (Path(generator.value) / "codec").is_dir():
            choices.append(ModelChoice(f"codec of {generator.label}", str(Path(generator.value) / "codec")))
    for preset in ("encodec_24khz", "encodec_32khz", "encodec_48khz"):
        choices.append(ModelChoice(f"random:{preset} (UNTRAINED: distorts everything)", f"random:{preset}"))
    return choices


def entropy_lm_status(spec: str) -> tuple[bool, str]:
    """Whether the codec has an entropy-coding LM, and a line saying so (or what is missing and
    the command that trains one)."""
    from codec.pretrained import entropy_lm_folders, has_entropy_lm, missing_lm_message

    model = load_codec_model(spec)
    spec = spec.strip()
    if has_entropy_lm(model, spec):
        return True, f"uses the LM of {model.name} (smaller file, slower)"
    return False, missing_lm_message(model, spec, entropy_lm_folders(spec))


def duration_info(window: float | None = None) -> str:
    """The duration slider's note: past the model's window, generation slides."""
    where = f"the model's {window:g} s window" if window else "the model's window"
    return (f"up to {MAX_SLIDER_SECONDS:g} s; beyond {where} the generation slides on: each new part is "
            f"conditioned on the end of the last (slower, and the music may drift)")


def bitrate_choices(spec: str) -> list[tuple[str, int]]:
    """(label, codebook count) pairs for a codec: its target bandwidths, or every count when it
    names fewer than two."""
    model = load_codec_model(spec)
    per = model.bandwidth_per_codebook
    counts = set()
    for bandwidth in model.config.target_bandwidths:
        try:
            counts.add(model.num_codebooks_for_bandwidth(bandwidth))
        except ValueError:
            continue
    if len(counts) < 2:
        counts = set(range(1, model.num_codebooks + 1))
    return [(f"{n * per:g} kbps ({n} codebook{'s' if n > 1 else ''})", n) for n in sorted(counts)]


# -- pictures -------------------------------------------------------------------------------------
_MAGMA = np.array([(0, 0, 4), (59, 15, 112), (140, 41, 129), (222, 73, 104), (254, 159, 109), (252, 253, 191)],
                  dtype=np.float64)


def _mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular filters on the HTK mel scale, ``(n_mels, n_fft // 2 + 1)``."""
    def to_mel(hz):
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    edges = 700.0 * (10 ** (np.linspace(to_mel(30.0), to_mel(sample_rate / 2), n_mels + 2) / 2595.0) - 1.0)
    bins = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / (center - lower)
    falling = (upper - bins) / (upper - center)
    return np.maximum(0.0, np.minimum(rising, falling))


def spectrogram_image(wav: np.ndarray, sample_rate: int, *, width: int = 768, height: int = 160) -> np.ndarray:
    """A log-mel spectrogram of mono audio ``(T,)`` as an RGB image ``(height, width, 3)`` uint8,
    low frequencies at the bottom, 80 dB of range below the loudest bin (numpy only)."""
    n_fft = 2048 if sample_rate > 24_000 else 1024
    hop = n_fft // 4
    signal = np.asarray(wav, dtype=np.float32).reshape(-1)
    if signal.size < n_fft:
        signal = np.pad(signal, (0, n_fft - signal.size))
    frames = np.lib.stride_tricks.sliding_window_view(signal, n_fft)[::hop] * np.hanning(n_fft).astype(np.float32)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    mel = power @ _mel_filters(sample_rate, n_fft, 80).T  # (frames, 80)
    db = 10.0 * np.log10(np.maximum(mel, 1e-12))
    level = np.clip((db - db.max()) / 80.0 + 1.0, 0.0, 1.0)
    columns = np.linspace(0, level.shape[0] - 1, width).round().astype(int)
    rows = np.linspace(level.shape[1] - 1, 0, height).round().astype(int)
    image = level[columns][:, rows].T  # (height, width), high frequencies first
    anchors = np.linspace(0.0, 1.0, len(_MAGMA))
    rgb = np.stack([np.interp(image, anchors, _MAGMA[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


# -- generation -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GeneratedClip:
    """One output: its prompt, the written wav, the audio ``(T, C)`` it holds, a spectrogram."""

    prompt: str
    path: Path
    sample_rate: int
    audio: np.ndarray
    spectrogram: np.ndarray


@dataclass(frozen=True)
class Generation:
    clips: list[GeneratedClip]
    seed: int
    info: str


def parse_prompts(text: str | None) -> list[str]:
    """One prompt per non-blank line."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _number(value, name: str, low: float, high: float, *, integer: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise DemoError(f"{name} must be between {low:g} and {high:g}, got {value}")
    if integer and number != int(number):
        raise DemoError(f"{name} must be a whole number, got {value}")
    return int(number) if integer else number


def _read_upload(path: str | os.PathLike, what: str) -> tuple[torch.Tensor, int]:
    try:
        wav, sample_rate = audio_io.read_audio(path)
    except Exception as error:
        raise DemoError(f"Cannot read the {what} ({Path(path).name}): {_one_line(error)}") from None
    if wav.shape[-1] == 0:
        raise DemoError(f"The {what} holds no audio.")
    if not torch.isfinite(wav).all():
        raise DemoError(f"The {what} holds non-finite samples.")
    return wav, sample_rate


def _workdir(workdir: str | os.PathLike | None) -> Path:
    folder = Path(workdir) if workdir is not None else Path(tempfile.gettempdir()) / "tokenwave-demo"
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in folder.glob("tokenwave-*"):  # outputs of earlier requests, served and downloaded by now
        try:
            if now - old.stat().st_mtime > OUTPUT_MAX_AGE:
                old.unlink()
        except OSError:
            pass
    return folder


def _normalized(wav: torch.Tensor, sample_rate: int, untrained: bool) -> torch.Tensor:
    """Trained models' output at -14 LUFS (peak at most -1 dBFS); the noise of the untrained
    stand-in at a -12 dBFS peak so it is not loud."""
    if untrained or wav.shape[-1] < sample_rate:  # loudness needs 0.4 s; short clips use the peak
        return audio_io.peak_normalize(wav, -12.0 if untrained else -1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return audio_io.loudness_normalize(wav, sample_rate, -14.0, -1.0)
        except ImportError:
            return audio_io.peak_normalize(wav, -1.0)


@dataclass(frozen=True)
class StreamedAudio:
    """A piece of the first prompt's audio, ``(n, C)`` float32 in [-1, 1], while generating."""

    sample_rate: int
    audio: np.ndarray


@dataclass
class _Request:
    """A validated generation request: the loaded generator and what to pass it."""

    generator: object
    batch: list[str]
    seed: int
    untrained: bool
    options: dict
    report: ProgressFn


def _prepare_request(prompts, duration, top_k, top_p, temperature, cfg_coef, seed, model, model_path,
                     audio_prompt, melody, progress: ProgressFn | None) -> _Request:
    """Check the inputs, load the model and the uploads; raise DemoError on bad input."""
    texts = parse_prompts(prompts)
    if not texts and not audio_prompt and not melody:
        raise DemoError("Type a prompt (one per line), or give an audio prompt or a melody.")
    if len(texts) > MAX_PROMPTS:
        raise DemoError(f"At most {MAX_PROMPTS} prompts at once (one per line); got {len(texts)}.")
    duration = _number(duration, "Duration (seconds)", 0.1, MAX_DURATION)
    top_k = _number(top_k, "top-k", 0, 1_000_000, integer=True)
    top_p = _number(top_p, "top-p", 0.0, 1.0)
    temperature = _number(temperature, "Temperature", 0.01, 10.0)
    cfg_coef = _number(cfg_coef, "Guidance", 0.0, 30.0)
    seed = -1 if seed is None or seed == "" else _number(seed, "Seed", -1, 2**63 - 1, integer=True)
    seed = seed if seed >= 0 else secrets.randbelow(2**31)
    report = progress or (lambda fraction, text: None)
    report(0.0, "loading the model")
    generator = load_generator(model, model_path)
    untrained = _generator_key(model, model_path) == RANDOM_MODEL
    batch = texts or [""]
    extra = {}
    for key, path, what in (("audio_prompt", audio_prompt, "audio prompt"), ("melody", melody, "melody")):
        if path:
            wav, sample_rate = _read_upload(path, what)
            extra[key] = (wav[None].expand(len(batch), -1, -1), sample_rate)
    if "melody" in extra and not generator.has_melody:
        raise DemoError("This model has no melody conditioning; remove the melody or choose a melody model.")
    if "audio_prompt" in extra:
        prompt_seconds = extra["audio_prompt"][0].shape[-1] / extra["audio_prompt"][1]
        if prompt_seconds >= duration:
            raise DemoError(f"The audio prompt ({prompt_seconds:.1f} s) must be shorter than the duration "
                            f"({duration:g} s): the output starts with it.")
    shown = [0.0]

    def on_step(step: int, total: int) -> None:
        fraction = step / max(total, 1)
        if fraction - shown[0] >= 0.01 or step == total:
            shown[0] = fraction
            report(fraction, f"generating: step {step} of {total}")

    options = dict(duration=duration, top_k=top_k, top_p=top_p, temperature=temperature, cfg_coef=cfg_coef,
                   seed=seed, progress=on_step, **extra)
    return _Request(generator, batch, seed, untrained, options, report)


def _finish(request: _Request, wav: torch.Tensor, sample_rate: int, elapsed: float,
            workdir: str | os.PathLike | None) -> Generation:
    """Write the clips ``wav (B, C, T)`` (normalized) and describe them."""
    folder = _workdir(workdir)
    name = uuid.uuid4().hex[:10]
    clips = []
    for index, (prompt, row) in enumerate(zip(request.batch, wav)):
        row = _normalized(row.detach().float().cpu(), sample_rate, request.untrained)
        path = audio_io.write_audio(folder / f"tokenwave-{name}-{index}.wav", row, sample_rate)
        clips.append(GeneratedClip(prompt, path, sample_rate, row.T.numpy().copy(),
                                   spectrogram_image(row.mean(0).numpy(), sample_rate)))
    seconds = wav.shape[-1] / sample_rate
    info = (f"{len(clips)} clip(s) of {seconds:.1f} s at {sample_rate} Hz in {elapsed:.1f} s "
            f"({seconds * len(clips) / max(elapsed, 1e-9):.2f}x real time); seed {request.seed}")
    if request.untrained:
        info = f"**{RANDOM_LABEL}**: {info}"
    request.report(1.0, "done")
    return Generation(clips, request.seed, info)


def generate_music(prompts: str | None, duration: float = 10.0, top_k: int = 250, top_p: float = 0.0,
                   temperature: float = 1.0, cfg_coef: float = 3.0, seed: int | None = -1,
                   model: str | None = RANDOM_MODEL, model_path: str | None = "", audio_prompt: str | None = None,
                   melody: str | None = None, *, workdir: str | os.PathLike | None = None,
                   progress: ProgressFn | None = None) -> Generation:
    """Generate one clip per prompt line; writes ``tokenwave-<id>-<i>.wav`` files into ``workdir``.

    ``seed`` < 0 (or None) draws one (reported in ``info``); ``top_k`` 0 turns top-k off;
    ``audio_prompt``/``melody`` are audio file paths; ``progress(fraction, text)`` is called
    while loading and after LM steps.
    """
    request = _prepare_request(prompts, duration, top_k, top_p, temperature, cfg_coef, seed, model, model_path,
                               audio_prompt, melody, progress)
    options = dict(request.options)
    began = time.perf_counter()
    try:
        out = request.generator.generate(request.batch, options.pop("duration"), **options)
    except (ValueError, TypeError) as error:
        raise DemoError(f"Cannot generate: {_one_line(error)}") from None
    return _finish(request, out.wav, out.sample_rate, time.perf_counter() - began, workdir)


def generate_music_stream(prompts: str | None, duration: float = 10.0, top_k: int = 250, top_p: float = 0.0,
                          temperature: float = 1.0, cfg_coef: float = 3.0, seed: int | None = -1,
                          model: str | None = RANDOM_MODEL, model_path: str | None = "",
                          audio_prompt: str | None = None, melody: str | None = None, *,
                          workdir: str | os.PathLike | None = None, progress: ProgressFn | None = None,
                          chunk_seconds: float = 0.5) -> Iterator[StreamedAudio | Generation]:
    """:func:`generate_music` while streaming: yields :class:`StreamedAudio` pieces of the first
    prompt's audio as the model generates them (every ``chunk_seconds``), then the
    :class:`Generation` (the same clips :func:`generate_music` writes for the same seed).

    The pieces are the raw output clipped to [-1, 1] (the files are loudness-normalized once
    complete); the untrained stand-in's noise is scaled to a -12 dBFS peak by its first piece.
    """
    request = _prepare_request(prompts, duration, top_k, top_p, temperature, cfg_coef, seed, model, model_path,
                               audio_prompt, melody, progress)
    generator, options = request.generator, dict(request.options)
    frames = max(1, round(chunk_seconds * generator.frame_rate))
    began = time.perf_counter()
    pieces, gain = [], None
    try:
        stream = generator.generate_stream(request.batch, options.pop("duration"), first_chunk_frames=frames,
                                           chunk_frames=frames, **options)
        for piece in stream:
            pieces.append(piece)
            first = piece[0].detach().float().cpu()  # (C, n): the first prompt
            if gain is None:
                gain = 0.25 / max(float(first.abs().max()), 1e-6) if request.untrained else 1.0
            yield StreamedAudio(generator.sample_rate, (first * gain).clamp(-1, 1).T.numpy().copy())
    except (ValueError, TypeError) as error:
        raise DemoError(f"Cannot generate: {_one_line(error)}") from None
    wav = torch.cat(pieces, dim=-1)
    yield _finish(request, wav, generator.sample_rate, time.perf_counter() - began, workdir)


def wav_bytes(piece: StreamedAudio) -> bytes:
    """A streamed piece as a 16-bit WAV file in memory (what gradio's streaming player takes)."""
    import soundfile  # noqa: PLC0415 -- a core dependency; imported where used

    buffer = io.BytesIO()
    soundfile.write(buffer, piece.audio, piece.sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


# -- codec ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CodecRoundTrip:
    """The decoded audio ``(T, C)`` and its file, the .ecdc file, its size and real bitrate."""

    decoded_path: Path
    ecdc_path: Path
    sample_rate: int
    audio: np.ndarray
    ecdc_bytes: int
    kbps: float
    info: str


def codec_roundtrip(audio_path: str | os.PathLike | None, codec: str, num_codebooks: int | None = None,
                    use_lm: bool = False, *, workdir: str | os.PathLike | None = None) -> CodecRoundTrip:
    """Compress an audio file to .ecdc with ``codec`` at ``num_codebooks`` (None: all) and decode
    the file back; ``use_lm`` entropy-codes with the codec's LM."""
    from codec import ecdc
    from codec.pretrained import EntropyLMNotFoundError, entropy_lm_for
    from inference.cli import model_label

    if not audio_path:
        raise DemoError("Upload an audio file first.")
    wav, sample_rate = _read_upload(audio_path, "upload")
    duration = wav.shape[-1] / sample_rate
    if duration > MAX_CODEC_SECONDS:
        raise DemoError(f"The upload lasts {duration:.0f} s; the demo takes up to {MAX_CODEC_SECONDS:g} s "
                        f"(use `tokenwave compress` for long files).")
    model = load_codec_model(codec)
    try:
        count = model.resolve_codebooks(None if num_codebooks in (None, "") else int(num_codebooks))
    except (TypeError, ValueError) as error:
        raise DemoError(_one_line(error)) from None
    lm = None
    if use_lm:  # the CLI's lookup: beside the codec given, then in the models folder
        try:
            lm = entropy_lm_for(model, codec.strip())
        except (EntropyLMNotFoundError, ValueError) as error:
            raise DemoError(f"No entropy-coding LM for {model.name}: {_one_line(error)}") from None
    device = next(model.parameters()).device
    signal = audio_io.convert_audio(wav, sample_rate, model.sample_rate, model.channels).to(device)
    began = time.perf_counter()
    with torch.inference_mode():
        data = ecdc.compress(signal, model.sample_rate, model, num_codebooks=count, use_lm=lm is not None, lm=lm)
        decoded, rate = ecdc.decompress(data, model=model, lm=lm)
    elapsed = time.perf_counter() - began
    folder = _workdir(workdir)
    stem = f"tokenwave-{uuid.uuid4().hex[:10]}-{Path(audio_path).stem[:40]}"
    ecdc_path = folder / f"{stem}.ecdc"
    ecdc_path.write_bytes(data)
    decoded = decoded.detach().float().cpu()
    decoded_path = audio_io.write_audio(folder / f"{stem}-decoded.wav", decoded, rate)
    kbps = len(data) * 8 / duration / 1000
    original = Path(audio_path).stat().st_size
    nominal = count * model.bandwidth_per_codebook
    info = (f"**{len(data):,} bytes** of .ecdc for {duration:.2f} s: **{kbps:.2f} kbps** real "
            f"(nominal {nominal:g} kbps: {count} codebooks{' + entropy coding' if lm is not None else ''}); "
            f"the upload is {original:,} bytes, {original / max(len(data), 1):.0f}x larger.  \n"
            f"Codec: {model_label(model)}, {model.sample_rate} Hz, {model.channels} channel(s); "
            f"encode + decode {elapsed:.2f} s ({duration / max(elapsed, 1e-9):.1f}x real time).")
    return CodecRoundTrip(decoded_path, ecdc_path, rate, decoded.T.numpy().copy(), len(data), kbps, info)


# -- the app --------------------------------------------------------------------------------------
INTRO = """# tokenwave
Music from a text prompt with a codec language model, and the neural codec on its own.
Models run on this machine; nothing is downloaded."""


def build_app(model_path: str | os.PathLike | None = None, *, models_dir: str | os.PathLike | None = None,
              concurrency: int = DEFAULT_CONCURRENCY, workdir: str | os.PathLike | None = None):
    """The demo as a ``gr.Blocks`` (queued: ``concurrency`` requests run at once). ``model_path``
    (a folder or a registry name) is the default model; see :func:`model_choices`."""
    import gradio as gr

    choices, default = model_choices(model_path, models_dir)
    codecs = codec_choices(models_dir)
    folder = _workdir(workdir)

    def fail(error: Exception) -> gr.Error:
        if isinstance(error, DemoError):
            return gr.Error(str(error), print_exception=False)
        return gr.Error(f"Something went wrong: {_one_line(error)}")

    def clip_updates(result: Generation) -> list:
        updates = []
        for index in range(MAX_PROMPTS):
            if index < len(result.clips):
                clip = result.clips[index]
                label = f"{index + 1}: {clip.prompt or '(no text)'}"
                updates += [gr.update(value=str(clip.path), visible=True, label=label),
                            gr.update(value=clip.spectrogram, visible=True)]
            else:
                updates += [gr.update(value=None, visible=False), gr.update(value=None, visible=False)]
        return [*updates, [str(c.path) for c in result.clips], result.info]

    def on_generate(prompts, duration, top_k, top_p, temperature, cfg_coef, seed, model, path, audio_prompt,
                    melody, stream=False, progress=gr.Progress()):
        """Outputs: the clips' players and spectrograms, the live player, the files, the info."""
        args = (prompts, duration, top_k, top_p, temperature, cfg_coef, seed, model, path, audio_prompt, melody)
        report = lambda fraction, text: progress(fraction, desc=text)  # noqa: E731
        keep = [gr.skip()] * (2 * MAX_PROMPTS)
        try:
            if not stream:
                updates = clip_updates(generate_music(*args, workdir=folder, progress=report))
                yield [*updates[:-2], gr.update(visible=False), *updates[-2:]]
                return
            missing = [tool for tool in ("ffmpeg", "ffprobe") if shutil.which(tool) is None]
            if missing:
                raise DemoError(f"Streaming playback needs {' and '.join(missing)} (gradio encodes live audio "
                                "with ffmpeg and probes files with ffprobe): install them (e.g. apt-get install "
                                "ffmpeg) or untick Stream.")
            opened = False
            for item in generate_music_stream(*args, workdir=folder, progress=report):
                if isinstance(item, Generation):
                    updates = clip_updates(item)
                    yield [*updates[:-2], gr.skip(), *updates[-2:]]
                    continue
                if not opened:  # show the live player before its first chunk
                    opened = True
                    yield [*keep, gr.update(visible=True), gr.skip(), "streaming the first prompt..."]
                yield [*keep, wav_bytes(item), gr.skip(), gr.skip()]
        except Exception as error:
            raise fail(error) from None

    def on_model(model, path):
        """Outputs: the model's summary, and the duration slider's note naming its window."""
        try:
            summary = model_summary(model, path)
            window = load_generator(model, path).max_duration
        except Exception as error:
            return f"Cannot use this model: {_one_line(error)}", gr.skip()
        return summary, gr.update(info=duration_info(window))

    def on_codec_change(codec):
        """Outputs: the bitrates the codec offers, and the entropy-coding box (enabled only
        when the codec has an LM; its note says what is missing otherwise)."""
        try:
            options = bitrate_choices(codec)
            has_lm, note = entropy_lm_status(codec)
        except Exception as error:
            raise fail(error) from None
        per_codebook = load_codec_model(codec).bandwidth_per_codebook
        closest = min(options, key=lambda option: abs(math.log(option[1] * per_codebook / 6.0)))
        lm_box = gr.update(interactive=True, info=note) if has_lm else \
            gr.update(interactive=False, value=False, info=f"unavailable: {note}")
        return gr.update(choices=options, value=closest[1]), lm_box  # the bitrate nearest 6 kbps

    def on_codec(upload, codec, codebooks, use_lm):
        """Compress an audio file to .ecdc with a codec and decode the file back.

        Args:
            upload: the audio file to code.
            codec: a codec name, a codec or generator folder, or random:<preset>.
            codebooks: how many codebooks to keep (the bitrate); empty for all.
            use_lm: entropy-code with the codec's LM.
        Returns: the decoded wav, the .ecdc file, and a note on size and bitrate.
        """
        try:
            result = codec_roundtrip(upload, codec, codebooks, use_lm, workdir=folder)
        except Exception as error:
            raise fail(error) from None
        return str(result.decoded_path), str(result.ecdc_path), result.info

    with gr.Blocks(title="tokenwave", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=3):
                    prompts = gr.Textbox(label=f"Prompt (one per line, up to {MAX_PROMPTS})", lines=3,
                                         placeholder=EXAMPLES[0])
                    with gr.Row():
                        duration = gr.Slider(0.5, MAX_SLIDER_SECONDS, value=10, step=0.5, label="Duration (seconds)",
                                             info=duration_info())
                        seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)")
                    with gr.Accordion("Sampling", open=False):
                        top_k = gr.Slider(0, 1000, value=250, step=1, label="top-k (0: off)")
                        top_p = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="top-p (0: off; wins over top-k)")
                        temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature")
                        cfg_coef = gr.Slider(1.0, 10.0, value=3.0, step=0.1, label="Guidance (1: off)")
                    with gr.Accordion("Audio prompt and melody (optional)", open=False):
                        audio_prompt = gr.Audio(sources=["upload", "microphone"], type="filepath",
                                                label="Continue this audio (the output starts with it)")
                        melody = gr.Audio(sources=["upload", "microphone"], type="filepath",
                                          label="Melody to follow (melody models only)")
                    with gr.Row():
                        generate = gr.Button("Generate", variant="primary", scale=3)
                        stream_box = gr.Checkbox(False, label="Stream", scale=1,
                                             info="play the first prompt while it is generated")
                    gr.Examples(examples=[[e] for e in EXAMPLES], inputs=[prompts], label="Examples")
                with gr.Column(scale=2):
                    model = gr.Dropdown(choices=[(c.label, c.value) for c in choices], value=default, label="Model")
                    model_path = gr.Textbox(label="...or a local checkpoint folder (wins when filled)",
                                            placeholder="/path/to/generator (press Enter)")
                    model_info = gr.Markdown()
            info = gr.Markdown()
            outputs = []
            for index in range(MAX_PROMPTS):
                with gr.Row():
                    outputs.append(gr.Audio(type="filepath", interactive=False, visible=index == 0,
                                            label=f"{index + 1}", scale=2))
                    outputs.append(gr.Image(type="numpy", interactive=False, visible=index == 0,
                                            label="mel spectrogram", scale=3, height=180))
            live = gr.Audio(streaming=True, autoplay=True, interactive=False, visible=False,
                            label="Live: the first prompt as it is generated")
            files = gr.File(label="Download", file_count="multiple", interactive=False, height=120)
            generate.click(on_generate, inputs=[prompts, duration, top_k, top_p, temperature, cfg_coef, seed, model,
                                                model_path, audio_prompt, melody, stream_box],
                           outputs=[*outputs, live, files, info])
            model.change(on_model, [model, model_path], [model_info, duration])
            model_path.submit(on_model, [model, model_path], [model_info, duration])
        with gr.Tab("Codec"):
            with gr.Row():
                with gr.Column():
                    upload = gr.Audio(sources=["upload"], type="filepath", label="Original")
                    codec = gr.Dropdown(choices=[(c.label, c.value) for c in codecs], value=codecs[0].value,
                                        allow_custom_value=True, label="Codec (a name, a folder or random:<preset>)")
                    # Custom values: API callers pass a codebook count; codec_roundtrip checks it.
                    bitrate = gr.Dropdown(choices=[], allow_custom_value=True, label="Bitrate")
                    use_lm = gr.Checkbox(False, label="Entropy coding with the codec's LM (smaller, slower)",
                                         interactive=False, info="choose a codec")
                    compress = gr.Button("Compress and decode", variant="primary")
                with gr.Column():
                    decoded = gr.Audio(type="filepath", interactive=False, label="Round trip (decoded from the .ecdc)")
                    ecdc_file = gr.File(label=".ecdc file", interactive=False, height=120)
                    codec_info = gr.Markdown()
            codec.change(on_codec_change, codec, [bitrate, use_lm])
            compress.click(on_codec, [upload, codec, bitrate, use_lm], [decoded, ecdc_file, codec_info],
                           api_name="codec_roundtrip")
        demo.load(on_model, [model, model_path], [model_info, duration])
        demo.load(on_codec_change, codec, [bitrate, use_lm])
    demo.queue(default_concurrency_limit=max(1, int(concurrency)))
    return demo


def launch(model_path: str | os.PathLike | None = None, *, host: str = "127.0.0.1", port: int | None = 7860,
           share: bool = False, concurrency: int = DEFAULT_CONCURRENCY, models_dir: str | os.PathLike | None = None,
           workdir: str | os.PathLike | None = None, block: bool = True):
    """Build and serve the demo (on ``host``: localhost by default); returns the ``gr.Blocks``.
    ``block=False`` returns once the server runs (``demo.close()`` stops it)."""
    folder = _workdir(workdir)
    demo = build_app(model_path, models_dir=models_dir, concurrency=concurrency, workdir=folder)
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                allowed_paths=[str(folder)], quiet=not block)
    return demo


def main(argv: list[str] | None = None) -> int:
    from inference.cli_demo import add_arguments

    parser = argparse.ArgumentParser(prog="python -m demos.app", description="the tokenwave Gradio demo")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        launch(args.model, host=args.host, port=args.port, share=args.share, concurrency=args.concurrency)
    except DemoError as error:
        parser.exit(1, f"demo: {error}\n")
    return 0


__all__ = ["CodecRoundTrip", "DemoError", "GeneratedClip", "Generation", "ModelChoice", "RANDOM_MODEL",
           "StreamedAudio", "bitrate_choices", "duration_info", "entropy_lm_status",
           "build_app", "codec_choices", "codec_roundtrip", "find_generators", "generate_music",
           "generate_music_stream", "launch",
           "load_codec_model", "load_generator", "main", "model_choices", "model_summary", "random_generator",
           "spectrogram_image", "wav_bytes"]


if __name__ == "__main__":
    raise SystemExit(main())
