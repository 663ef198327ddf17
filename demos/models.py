"""The models the demo offers, loads once and describes: generators and codecs.

:func:`model_choices` and :func:`codec_choices` fill the dropdowns; :func:`load_generator` and
:func:`load_codec_model` load a choice once and keep it (loading happens under one lock; loaded
models are then shared read-only by concurrent requests); :func:`model_summary`,
:func:`bitrate_choices` and :func:`entropy_lm_status` describe it. With no generator installed,
:data:`RANDOM_MODEL` offers an untrained stand-in (:func:`random_generator`) so the app runs end
to end, playing noise and saying so. Everything raises :class:`DemoError`, whose one-line message
the page shows, on bad input or an unusable model.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from codec import registry as codec_registry
from codec.model import EncodecConfig
from codec.pretrained import (entropy_lm_folders, has_entropy_lm, load_codec, missing_lm_message,
                              random_model)
from conditioning import ConditionProvider, LUTConditioner
from inference import detect_format, registry
from inference.generator import GeneratorConfig, MusicGen
from lm import LMConfig, LMModel

RANDOM_MODEL = "random"  # the model choice of the untrained stand-in
RANDOM_LABEL = "UNTRAINED random model (plays noise; for trying the app)"
WEIGHTS_MARK = "@"  # "<folder>@int8": that checkpoint with int8 / int4 LM weights
QUANTIZED_WEIGHTS = ("int8", "int4")
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
    "rock", "waltz", "hip", "hop", "lo-fi", "funk", "reggae", "march", "lullaby", "classical", "bossa",
    "nova", "happy", "calm", "dark", "fast", "upbeat", "guitar", "strings", "violin", "flute", "synth",
    "organ", "trumpet"}))


class DemoError(ValueError):
    """Bad input, or a model that cannot be used: the message is shown in the page."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


@dataclass(frozen=True)
class ModelChoice:
    """A dropdown entry: what the user reads, and the folder (or spec) it loads."""

    label: str
    value: str


def find_generators(models_dir: str | os.PathLike | None = None) -> list[ModelChoice]:
    """Generator folders (tokenwave, transformers or audiocraft format) in the models folder
    (``models_dir``, else ``$TOKENWAVE_MODELS``, else ``~/.cache/tokenwave``; also its
    ``facebook/`` subfolder) and in the repository's ``assets/models``."""
    found: list[ModelChoice] = []
    roots = ((codec_registry.get_models_dir(models_dir), ""), (registry.SHIPPED_MODELS, "shipped: "))
    for root, prefix in roots:
        folders = [p for base in (root, root / "facebook") if base.is_dir() for p in sorted(base.iterdir())]
        for folder in folders:
            try:
                kind = detect_format(folder)
            except Exception:  # not a generator (a codec, a T5, anything else)
                continue
            found.append(ModelChoice(f"{prefix}{folder.relative_to(root)} ({kind})", str(folder.resolve())))
    return found


def _default_model(model_path: str | os.PathLike | None, choices: list[ModelChoice],
                   models_dir: str | os.PathLike | None) -> str | None:
    """The dropdown's default (see :func:`model_choices`); inserts a ``--model`` folder not found."""
    if model_path is not None and os.fspath(model_path) == RANDOM_MODEL:
        return RANDOM_MODEL
    if model_path is not None:
        spec = os.fspath(model_path)
        try:
            folder = (Path(spec) if os.path.exists(spec)
                      else registry.find_generator(spec, models_dir=models_dir))
        except FileNotFoundError as error:
            raise DemoError(f"--model {spec}: {one_line(error)}") from None
        default = str(folder.resolve())
        if default not in [c.value for c in choices]:
            choices.insert(0, ModelChoice(f"{spec} (--model)", default))
        return default
    try:
        default = str(registry.find_generator(registry.DEFAULT_MODEL, models_dir=models_dir).resolve())
    except FileNotFoundError:
        default = None
    if default not in [c.value for c in choices]:
        default = choices[0].value if choices else None
    return default


def model_choices(model_path: str | os.PathLike | None = None,
                  models_dir: str | os.PathLike | None = None) -> tuple[list[ModelChoice], str]:
    """The model dropdown's entries and its default: ``model_path`` (a folder, a registry name,
    or :data:`RANDOM_MODEL`) when given, else the registry's default model when installed, else
    the first found, else the untrained stand-in (always offered last)."""
    choices = find_generators(models_dir)
    default = _default_model(model_path, choices, models_dir)
    # the same checkpoints with the LM's matrices quantized at load time (faster on CPUs; lm.quant)
    choices += [ModelChoice(f"{c.label}, {dtype} weights (CPU speed)", f"{c.value}{WEIGHTS_MARK}{dtype}")
                for c in list(choices) for dtype in QUANTIZED_WEIGHTS]
    choices.append(ModelChoice(RANDOM_LABEL, RANDOM_MODEL))
    return choices, default or RANDOM_MODEL


def random_generator(seed: int = 0) -> MusicGen:
    """An untrained 32 kHz text-to-music generator with fixed random weights, built in about a
    second: a 2-layer LM over 4 codebooks of 2048 codes, a lookup-table text encoder and a small
    random codec. It runs the whole pipeline (text, LM steps with guidance, decoding) and plays
    noise: for trying the app where no trained model is installed."""
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
_GENERATORS: dict[str, MusicGen] = {}  # RANDOM_MODEL and at most one loaded checkpoint
_CODECS: dict[str, torch.nn.Module] = {}  # the three codecs used last


def generator_key(choice: str | None, path: str | None) -> str:
    """What a dropdown value and a typed folder/name select (the typed one wins when filled)."""
    spec = (path or "").strip() or (choice or "").strip()
    if not spec:
        raise DemoError("Choose a model, or type the folder of a checkpoint.")
    if spec == RANDOM_MODEL:
        return spec
    folder = Path(spec).expanduser()
    return str(folder.resolve()) if folder.exists() else spec


def _load_checkpoint(key: str) -> MusicGen:
    """A generator folder or name, with ``@int8``/``@int4`` quantizing its LM at load time."""
    try:
        marked = key.endswith(tuple(WEIGHTS_MARK + d for d in QUANTIZED_WEIGHTS))
        folder, _, dtype = key.rpartition(WEIGHTS_MARK) if marked else (key, "", None)
        return MusicGen.from_pretrained(folder, dtype=dtype)
    except Exception as error:  # any unreadable folder becomes a message
        raise DemoError(f"Cannot load the model {key}: {one_line(error)}") from None


def load_generator(choice: str | None, path: str | None = None) -> MusicGen:
    """The generator for a dropdown value or a typed folder/name, loaded once and kept (one
    checkpoint at a time, plus the untrained stand-in)."""
    key = generator_key(choice, path)
    with _LOCK:
        if key not in _GENERATORS:
            generator = random_generator() if key == RANDOM_MODEL else _load_checkpoint(key)
            if key != RANDOM_MODEL:
                for other in [k for k in _GENERATORS if k != RANDOM_MODEL]:
                    del _GENERATORS[other]
            _GENERATORS[key] = generator
        return _GENERATORS[key]


def model_summary(choice: str | None, path: str | None = None) -> str:
    """Markdown describing the model (loading it): rates, codebooks, window, conditioning."""
    key = generator_key(choice, path)
    generator = load_generator(choice, path)
    text = type(generator.condition_provider.conditioners["description"]).__name__
    params = sum(p.numel() for p in generator.lm.parameters()) / 1e6
    lines = [f"**{RANDOM_LABEL if key == RANDOM_MODEL else Path(key).name}**",
             f"{generator.sample_rate} Hz, {generator.channels} channel(s), "
             f"{generator.lm.config.num_codebooks} codebooks at {generator.frame_rate} Hz; "
             f"LM {params:.3g} M parameters; text: {text}; window {generator.max_duration:g} s; "
             f"melody: {'yes' if generator.has_melody else 'no'}"]
    return "  \n".join(lines)


def load_codec_model(spec: str):
    """A codec from a name, a checkpoint path or ``random:<preset>``, loaded once and kept."""
    spec = (spec or "").strip()
    if not spec:
        raise DemoError("Choose a codec.")
    with _LOCK:
        if spec not in _CODECS:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            try:
                model = load_codec(spec, device)
            except Exception as error:
                raise DemoError(f"Cannot load the codec {spec}: {one_line(error)}") from None
            if len(_CODECS) >= 3:
                _CODECS.pop(next(iter(_CODECS)))
            _CODECS[spec] = model
        return _CODECS[spec]


def codec_choices(models_dir: str | os.PathLike | None = None) -> list[ModelChoice]:
    """Codecs to offer: released ones installed in the models folder, the codecs inside
    generator folders, then untrained random stand-ins."""
    choices = []
    for name in codec_registry.MODEL_NAMES:
        try:
            codec_registry.find_codec(name, models_dir=models_dir, allow_download=False)
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
    """Whether the codec has an entropy-coding LM (found as ``tokenwave compress --lm`` finds
    it), and a line saying so (or what is missing and the command that trains one)."""
    model = load_codec_model(spec)
    spec = spec.strip()
    if has_entropy_lm(model, spec):
        return True, f"uses the LM of {model.name} (smaller file, slower)"
    return False, missing_lm_message(model, spec, entropy_lm_folders(spec))


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


__all__ = ["DemoError", "EXAMPLES", "ModelChoice", "RANDOM_LABEL", "RANDOM_MODEL", "bitrate_choices",
           "codec_choices", "entropy_lm_status", "find_generators", "generator_key", "load_codec_model",
           "load_generator", "model_choices", "model_summary", "one_line", "random_generator"]
