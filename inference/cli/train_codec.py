"""``tokenwave train-codec``: train an EnCodec codec, or its entropy-coding LM, on a folder.

A run writes everything under ``--out DIR``: ``checkpoints/`` (resumable training state, the
last ``--keep-last``), ``train_log.jsonl`` and the model as ``DIR/<name>/`` (tokenwave format;
``--name`` defaults to DIR's name), which ``tokenwave compress|roundtrip --model DIR/<name>``
and :func:`codec.formats.load_model` read. ``--train-entropy-lm`` trains the ``.ecdc`` prior
of a trained codec (``--from``, default ``DIR/<name>``) into ``DIR/<lm name>.th``, with its own
``entropy_lm_checkpoints/`` and ``entropy_lm_log.jsonl``.

A folder that already holds a run is only continued with ``--resume`` (which takes the codec
and the recipe from the checkpoint; flags given again override the recipe's values, for
example a larger ``--steps``). Several processes (DDP): ``accelerate launch --multi_gpu
--num_processes N -m inference train-codec ...``, with ``--cpu`` for CPU processes (gloo; or
``torchrun --nproc_per_node N -m inference train-codec ... --cpu``). ``accelerate launch --cpu
--num_processes N`` starts a single process (accelerate spreads CPU processes only through
mpirun): a warning says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from codec.config import PRESETS, EncodecConfig

from .common import CliError

DEFAULT_PRESET = "encodec_24khz"
# Flags that set a LoopConfig / CodecTrainConfig field of the same name.
_LOOP_FLAGS = ("steps", "batch_size", "segment_seconds", "lr", "seed", "log_every", "valid_every",
               "valid_clips", "checkpoint_every", "keep_last", "num_workers")
_CODEC_FLAGS = ("loss_weights", "disc_update_prob", "disc_filters", "disc_windows", "dead_code_threshold",
                "train_parts", "disc_precision", "ema_decay")


def parse_overrides(items: list[str] | None) -> dict:
    """``["n_filters=16", "ratios=8,5,4,2", "lstm=0"]`` -> typed EncodecConfig overrides."""
    fields = {f.name: f for f in dataclasses.fields(EncodecConfig)}
    defaults = EncodecConfig()
    out = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise CliError(f"--set expects KEY=VALUE with KEY one of {', '.join(sorted(fields))}; "
                           f"got {item!r}")
        if key == "name":
            raise CliError("use --name to name the model, not --set name=...")
        default = getattr(defaults, key)
        text = text.strip()
        try:
            if text.lower() in ("none", "null"):
                value = None
            elif isinstance(default, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                value = text.lower() in ("true", "1")
            elif isinstance(default, tuple):
                kind = type(default[0]) if default else float
                value = tuple(kind(part) for part in text.split(",") if part.strip())
            elif isinstance(default, (int, float)):
                value = type(default)(text)
            else:
                value = text
        except ValueError:
            raise CliError(f"--set {key}: cannot read {text!r} as the type of {key} "
                           f"(default {default!r})") from None
        out[key] = value
    return out


def _model_name(args) -> str:
    """The trained codec's name: stored in its config and in every .ecdc file it writes, where
    it is how `decompress` finds the codec, so it must not be a public codec's."""
    from codec.ecdc import PUBLIC_CODECS

    name = args.name or Path(args.out).resolve().name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise CliError(f"model name {name!r} must be letters, digits, '_', '.' or '-'; "
                       f"give one with --name")
    if name in PUBLIC_CODECS and not args.train_entropy_lm:
        raise CliError(f"model name {name!r} is a public codec's: .ecdc files name their codec, so "
                       f"give the trained one its own name with --name")
    return name


def _window_list(text: str) -> tuple[int, ...]:
    try:
        windows = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated window sizes such as 2048,1024,512, "
                                         f"got {text!r}") from None
    if not windows or any(w < 16 or w & (w - 1) for w in windows):
        raise argparse.ArgumentTypeError(f"discriminator windows must be powers of two of 16 or more, got {text!r}")
    return windows


def _weight_overrides(items: list[str] | None) -> dict[str, float]:
    """``["stats=3", "adv=0"]`` -> ``{"stats": 3.0, "adv": 0.0}`` (0 drops a loss)."""
    from codec.training.trainer import LOSS_NAMES

    out = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in LOSS_NAMES:
            raise CliError(f"--loss-weight expects NAME=VALUE with NAME one of {', '.join(LOSS_NAMES)}; got {item!r}")
        try:
            out[key] = float(text)
        except ValueError:
            raise CliError(f"--loss-weight {key}: {text.strip()!r} is not a number") from None
        if not out[key] >= 0:
            raise CliError(f"--loss-weight {key}: weights are 0 or more, got {text.strip()!r}")
    return out


def _loop_values(args, names: tuple[str, ...]) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _accelerator(args):
    try:
        from accelerate import Accelerator
    except ImportError:
        raise CliError("training needs accelerate: pip install 'tokenwave[train]'") from None
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu,
                              log_with=args.log_with, project_dir=args.out)
    if args.log_with:
        accelerator.init_trackers("tokenwave-train-codec")
    return accelerator


def _corpora(args):
    from codec.training.data import scan_audio_folder, skipped_message

    try:
        corpus = scan_audio_folder(args.data)
        valid = scan_audio_folder(args.valid) if args.valid else corpus
    except (FileNotFoundError, ValueError) as error:
        raise CliError(str(error)) from None
    for found in {id(corpus): corpus, id(valid): valid}.values():
        message = skipped_message(found)
        if message:
            print(f"tokenwave: warning: {message}", file=sys.stderr)
    return corpus, valid


def _clips(corpus, model, segment_seconds: float, seed: int):
    from codec.training.data import RandomClips

    return RandomClips(corpus.files, sample_rate=model.sample_rate, channels=model.channels,
                       segment_samples=round(segment_seconds * model.sample_rate), seed=seed)


def _newest_intact(checkpoints, kind: str) -> tuple[Path, dict]:
    """The checkpoint ``--resume`` continues: the newest intact one (each newer, damaged one
    is named in a warning) and its state."""
    if checkpoints.latest() is None:
        raise CliError(f"--resume: no checkpoint in {checkpoints.root}")
    try:
        return checkpoints.load_latest(kind)
    except FileNotFoundError as error:  # every checkpoint is damaged
        raise CliError(f"--resume: {error}") from None


def cmd_train_codec(args) -> int:
    if args.train_entropy_lm:
        return _train_entropy_lm(args)
    import torch  # noqa: F401  (fail here, not mid-setup, when torch is broken)

    from codec.training.loop import CheckpointManager
    from codec.training.trainer import (CodecTrainConfig, CodecTrainer, build_codec,
                                        load_codec_for_training, resolve_weights)

    out = Path(args.out)
    checkpoints = CheckpointManager(out / CodecTrainer.checkpoint_dir)
    latest = checkpoints.latest()
    values = _loop_values(args, _LOOP_FLAGS + _CODEC_FLAGS)
    if latest is not None and not args.resume:
        raise CliError(f"{out} already holds a training run ({latest.name}); pass --resume to "
                       f"continue it or choose another --out")
    if args.resume:
        latest, state = _newest_intact(checkpoints, CodecTrainer.kind)
        if (args.preset or args.set or args.from_checkpoint or args.name or args.widen_decoder
                or args.decoder_lstm or args.discriminator_from):
            raise CliError("--resume continues the checkpoint's codec and discriminator: leave out --preset, "
                           "--set, --from, --name, --widen-decoder, --decoder-lstm and --discriminator-from")
        model = build_codec(EncodecConfig.from_dict(state["codec_config"]))
        values = {**state["train_config"], **values}
    else:
        name = _model_name(args)
        for flag, given in (("--widen-decoder", args.widen_decoder), ("--decoder-lstm", args.decoder_lstm)):
            if given and (not args.from_checkpoint or values.get("train_parts") != "decoder"):
                raise CliError(f"{flag} changes the decoder of a trained codec to fine-tune it alone: pass "
                               "--from CODEC --train-parts decoder")
        if args.from_checkpoint:
            if args.set or args.preset:
                raise CliError("--from takes the codec's config from the checkpoint: leave out "
                               "--preset and --set")
            try:
                model = load_codec_for_training(args.from_checkpoint, name=name)
                if args.widen_decoder:
                    from codec.training.widen import widen_decoder

                    model = widen_decoder(model, args.widen_decoder, seed=values.get("seed", 0))
                if args.decoder_lstm:
                    from codec.training.widen import add_decoder_lstm

                    model = add_decoder_lstm(model, args.decoder_lstm, seed=values.get("seed", 0))
            except (FileNotFoundError, ValueError) as error:
                raise CliError(str(error)) from None
        else:
            if values.get("train_parts") == "decoder":
                raise CliError("--train-parts decoder fine-tunes the decoder of a trained codec: pass it "
                               "with --from CODEC")
            preset = args.preset or DEFAULT_PRESET
            try:
                codec_config = dataclasses.replace(PRESETS[preset], name=name,
                                                   **parse_overrides(args.set))
            except (TypeError, ValueError) as error:
                raise CliError(f"--set: {error}") from None
            model = build_codec(codec_config, seed=values.get("seed", 0))
    overrides = _weight_overrides(args.loss_weight)
    if overrides:
        values["loss_weights"] = {**resolve_weights(values.get("loss_weights", CodecTrainConfig.loss_weights)),
                                 **overrides}
    try:
        config = CodecTrainConfig(**values)
    except ValueError as error:
        raise CliError(str(error)) from None
    corpus, valid = _corpora(args)
    accelerator = _accelerator(args)
    trainer = CodecTrainer(model, out, config, accelerator=accelerator,
                           valid_data=_clips(valid, model, config.segment_seconds,
                                             config.seed + 1))
    trainer.echo = not args.quiet
    if args.resume:
        trainer.resume(latest)
    elif args.discriminator_from:
        _load_discriminator(trainer, args.discriminator_from)
    if not args.quiet and accelerator.is_main_process:
        print(f"train-codec: {len(corpus.files)} files ({corpus.duration / 3600:.2f} h), "
              f"{model.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
              f"parameters), step {trainer.step} -> {config.steps} on {accelerator.device} "
              f"x{accelerator.num_processes}")
    trainer.fit(_clips(corpus, model, config.segment_seconds, config.seed))
    accelerator.end_training()
    if not args.quiet and accelerator.is_main_process:
        print(f"train-codec: model written to {out / model.name}")
    return 0


def _load_discriminator(trainer, path: str) -> None:
    """Start the run's discriminator (and its optimizer) from another run's checkpoint."""
    from codec.files import CheckpointError
    from codec.training.loop import CheckpointManager

    try:
        trainer.load_discriminator(CheckpointManager.load(path, trainer.kind))
    except (FileNotFoundError, ValueError, CheckpointError) as error:
        raise CliError(f"--discriminator-from {path}: {error}") from None


def _train_entropy_lm(args) -> int:
    import torch

    from codec.entropy_lm import EntropyLM
    from codec.formats import load_model
    from codec.training.entropy_trainer import EntropyLMTrainConfig, EntropyLMTrainer
    from codec.training.loop import CheckpointManager

    out = Path(args.out)
    if args.preset or args.set:
        raise CliError("--train-entropy-lm trains the prior of an existing codec (--from, or "
                       "the one in --out): leave out --preset and --set")
    source = Path(args.from_checkpoint) if args.from_checkpoint else out / _model_name(args)
    try:
        codec = load_model(source, inference=True)
    except (FileNotFoundError, ValueError) as error:
        raise CliError(f"--train-entropy-lm needs a trained codec: {error}") from None
    checkpoints = CheckpointManager(out / EntropyLMTrainer.checkpoint_dir)
    latest = checkpoints.latest()
    if latest is not None and not args.resume:
        raise CliError(f"{out} already holds an entropy-LM run ({latest.name}); pass --resume "
                       f"to continue it or choose another --out")
    values = _loop_values(args, _LOOP_FLAGS)
    if args.resume:
        latest, state = _newest_intact(checkpoints, EntropyLMTrainer.kind)
        values = {**state["train_config"], **values}
    if codec.segment_length is not None:  # .ecdc codes each segment with a fresh LM state
        values["segment_seconds"] = codec.config.segment
    config = EntropyLMTrainConfig(**values)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        lm = EntropyLM.for_codec(num_codebooks=codec.num_codebooks, card=codec.codebook_size,
                                 frame_rate=codec.frame_rate)
    corpus, valid = _corpora(args)
    accelerator = _accelerator(args)
    trainer = EntropyLMTrainer(codec, lm, out, config, accelerator=accelerator,
                               valid_data=_clips(valid, codec, config.segment_seconds,
                                                 config.seed + 1))
    trainer.echo = not args.quiet
    if args.resume:
        trainer.resume(latest)
    elif args.discriminator_from:
        _load_discriminator(trainer, args.discriminator_from)
    trainer.fit(_clips(corpus, codec, config.segment_seconds, config.seed))
    accelerator.end_training()
    if not args.quiet and accelerator.is_main_process:
        from codec.ecdc import lm_name

        print(f"train-codec: entropy LM written to {out / (lm_name(codec.name) + '.th')}")
    return 0


def register(subparsers) -> None:
    """Add ``train-codec`` to the ``tokenwave`` command line."""
    sub = subparsers.add_parser(
        "train-codec", help="train an EnCodec codec (or its entropy-coding LM) on a folder of audio",
        description="Train an EnCodec codec on random clips from a folder of audio with the "
                    "paper's recipe (L1 + multi-scale mel + MS-STFT adversarial and feature "
                    "losses, loss balancer, quantizer dropout, Adam 3e-4 (0.5, 0.9)). The model "
                    "is written to DIR/NAME. Several processes (DDP): `accelerate launch "
                    "--multi_gpu --num_processes N -m inference train-codec ...` (add --cpu for "
                    "CPU processes).")
    sub.add_argument("data", metavar="DATA", help="folder of audio files (searched recursively; "
                     "any rate and channel count, converted to the codec's)")
    sub.add_argument("--out", required=True, metavar="DIR", help="run folder")
    sub.add_argument("--name", help="model name (default: the name of --out)")
    sub.add_argument("--preset", choices=sorted(PRESETS),
                     help=f"architecture to train from scratch (default {DEFAULT_PRESET})")
    sub.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="change a field of the preset, e.g. --set n_filters=16 --set "
                          "num_codebooks=8 --set ratios=8,5,4,2 (repeatable)")
    sub.add_argument("--from", dest="from_checkpoint", metavar="CHECKPOINT",
                     help="start from this codec (any format tokenwave reads); with "
                          "--train-entropy-lm: the codec whose LM to train")
    sub.add_argument("--steps", type=int, help="total training steps (codec default 100000, "
                     "entropy LM 20000)")
    sub.add_argument("--batch-size", type=int, help="clips per step and process (codec 8, LM 16)")
    sub.add_argument("--segment-seconds", type=float,
                     help="clip length (codec 1 s as the paper, LM 5 s)")
    sub.add_argument("--lr", type=float, help="learning rate (codec 3e-4, LM 5e-4)")
    sub.add_argument("--loss-weights", choices=("paper", "audiocraft", "reconstruction", "spectral", "timbre",
                                                "timbre_gan"),
                     help="paper: l1 0.1, mel 1, adv 3, feat 3 (default); audiocraft: 0.1, 2, 4, "
                          "4; reconstruction: l1 0.1, mel 1, no discriminator (~2x faster); spectral: "
                          "reconstruction + linear-frequency STFT 1 + frame-periodic error 1 (against a "
                          "frame-rate buzz; no discriminator); timbre: spectral + log-mel band statistics 1 "
                          "(each band's std over time and frame-to-frame change, against flattened dynamics); "
                          "timbre_gan: timbre + adv 1 + feat 2 (a decoder fine-tuned with the discriminator)")
    sub.add_argument("--loss-weight", action="append", metavar="NAME=VALUE",
                     help="change one weight of --loss-weights (or of the resumed run's), e.g. --loss-weight "
                          "stats=3; 0 drops that loss; NAME: l1, mel, stft, frame, stats, adv, feat (repeatable)")
    sub.add_argument("--dead-code-threshold", type=float,
                     help="EMA uses per step under which a code is re-seeded (default: 2.0 as "
                          "the paper at its 4.7 latents per code per step, scaled down for "
                          "smaller batches)")
    sub.add_argument("--disc-update-prob", type=float,
                     help="probability of a discriminator update per step (default 2/3)")
    sub.add_argument("--disc-filters", type=int,
                     help="discriminator width (default 32 as the paper; less is cheaper, "
                          "e.g. 8 for trials on CPU)")
    sub.add_argument("--disc-windows", type=_window_list, metavar="N,N,...",
                     help="STFT windows of the discriminator's scales (default 1024,2048,512,256,128 as the "
                          "paper; each scale costs about the same, so fewer is cheaper, e.g. 2048,1024,512 on CPU)")
    sub.add_argument("--disc-precision", choices=("same", "bf16"),
                     help="bf16: the discriminator alone under bfloat16 autocast, the codec and losses in float32 "
                          "(on a CPU with bfloat16 units about 1.4x faster adversarial steps); default same (as "
                          "--mixed-precision; a resumed run keeps its own)")
    sub.add_argument("--ema-decay", type=float, metavar="D",
                     help="validate and export an exponential moving average of the trained weights, e.g. "
                          "0.999 (about the last 1,000 steps; steadier than the last step's weights in an "
                          "adversarial run); a resumed run without one starts it at its weights")
    sub.add_argument("--train-parts", choices=("all", "decoder"),
                     help="decoder: freeze the encoder and codebooks of --from's codec and train its decoder "
                          "only, so its tokens stay exactly the same (token caches and LMs made with it stay "
                          "valid); default all")
    sub.add_argument("--widen-decoder", type=int, metavar="FILTERS",
                     help="with --from and --train-parts decoder: first widen the decoder to this base width, "
                          "its output unchanged (new channels start disconnected), so training can use the "
                          "extra width; the model is then stored in tokenwave's format only")
    sub.add_argument("--decoder-lstm", type=int, metavar="LAYERS",
                     help="with --from and --train-parts decoder: first give the decoder an LSTM of this many "
                          "layers after its first convolution (EnCodec's, with its skip connection), its output "
                          "unchanged (the LSTM starts silent), for seconds of context; tokenwave's format only")
    sub.add_argument("--discriminator-from", metavar="CHECKPOINT",
                     help="start the discriminator and its optimizer from another adversarial run's checkpoint "
                          "(a checkpoint folder or its state.pt) with the same discriminator settings, instead "
                          "of a fresh one: fine-tuning a changed decoder against an already trained critic")
    sub.add_argument("--valid", metavar="DIR", help="validation folder (default: other random "
                     "clips of DATA, so not held out)")
    sub.add_argument("--valid-clips", type=int, help="validation clips (default 16; 0 = none)")
    sub.add_argument("--valid-every", type=int, help="steps between validations (default 1000)")
    sub.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 1000)")
    sub.add_argument("--keep-last", type=int, help="checkpoints kept (default 3)")
    sub.add_argument("--log-every", type=int, help="steps between log lines (default 50)")
    sub.add_argument("--num-workers", type=int, help="data loader processes (default 2)")
    sub.add_argument("--seed", type=int, help="seed of weights, clips and every step's draws")
    sub.add_argument("--resume", action="store_true", help="continue the run in --out")
    sub.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                     help="autocast on GPU (the quantizer and losses stay float32)")
    sub.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")
    sub.add_argument("--log-with", metavar="TRACKER",
                     help="also log through accelerate (tensorboard, wandb, ...) into --out")
    sub.add_argument("--train-entropy-lm", action="store_true",
                     help="train the .ecdc entropy-coding LM of a trained codec instead")
    sub.add_argument("-q", "--quiet", action="store_true", help="print no progress")
    sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                     help="show tracebacks on errors")
    sub.set_defaults(func=cmd_train_codec)
