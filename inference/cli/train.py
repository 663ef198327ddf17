"""``tokenwave prepare``, ``make-text-encoder`` and ``finetune``: token caches, a caption-built
T5 and LM training from the CLI.

    tokenwave prepare DATA --model MODEL --out CACHE [--segment-seconds 30] [--text-embeddings]
    tokenwave make-text-encoder --captions DATA --out T5 [--vocab-size 1000 --d-model 256 ...]
    tokenwave finetune --model MODEL --data CACHE --out RUN [--steps ... --resume]
    tokenwave finetune --from-scratch SIZE --t5 T5 --train-text-encoder --data CACHE --out RUN
    tokenwave finetune --model MODEL --data CACHE --out RUN --lora 8    # adapters alone -> RUN/model
    tokenwave merge-lora RUN/model MERGED                                # base + adapters -> a generator
    accelerate launch --multi_gpu --num_processes 4 -m inference finetune ...   # DDP
    accelerate launch --multi_gpu --num_processes 2 -m inference finetune ... --cpu   # DDP on CPU (gloo)

``DATA`` is a folder of audio with ``.txt``/``.json`` captions or a ``.jsonl`` manifest (see
:mod:`lm.corpus`); ``MODEL`` for prepare is a generator (folder or name: its codec and codebook
count are used, and its T5 for ``--text-embeddings``) or a codec alone (name, checkpoint path or
``random:<preset>``). ``finetune`` is :func:`inference.finetune.finetune`; ``--resume`` continues
``--out`` with the settings it was started with (give only ``--out`` and, say, a new
``--stop-after``, or a larger ``--steps`` to train on), from its newest intact checkpoint. The
trained generator lands in ``RUN/model``. ``make-text-encoder`` is
:func:`conditioning.t5_builder.build_text_encoder` over the captions of ``DATA`` (a corpus
folder, ``.jsonl`` manifest or token cache).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields, replace
from pathlib import Path

from codec.pretrained import load_codec

from .common import CliError, parse_device

# CLI option -> FinetuneConfig field, where the names differ.
_RENAMED = {"sample_prompt": "sample_prompts"}


def _generator_spec(spec: str) -> bool:
    """True when ``spec`` names a generator (folder in any generator format, or registry name)."""
    from inference import registry
    from inference.formats import detect_format

    if spec.startswith("random:"):
        return False
    if os.path.exists(spec):
        try:
            detect_format(spec)
        except Exception:  # a codec checkpoint, not a generator
            return False
        return True
    try:
        registry.find_generator(spec)
    except FileNotFoundError:
        return False
    return True


def cmd_prepare(args) -> int:
    from lm.token_cache import CodecTokenizer, prepare_corpus

    device = parse_device(args.device)
    text = None
    if _generator_spec(args.model):
        from inference.generator import MusicGen

        generator = MusicGen.from_pretrained(args.model, device=device, t5_path=args.t5_path)
        codebooks = generator.lm.config.num_codebooks
        if args.codebooks is not None and args.codebooks != codebooks:
            raise CliError(f"--codebooks {args.codebooks}: the model's LM predicts {codebooks} codebooks")
        codec = generator.codec
        if args.text_embeddings:
            from conditioning import T5Conditioner

            text = generator.condition_provider.conditioners["description"]
            if not isinstance(text, T5Conditioner):
                raise CliError(f"--text-embeddings needs a model with a T5 text encoder; {args.model} has a "
                               f"{type(text).__name__}")
    else:
        if args.text_embeddings:
            raise CliError("--text-embeddings needs a generator model (with its T5), not a codec alone")
        codec, codebooks = load_codec(args.model, device), args.codebooks
    try:
        tokenizer = CodecTokenizer(codec, codebooks)
    except ValueError as error:
        raise CliError(str(error)) from None
    spec = str(Path(args.model).resolve()) if os.path.exists(args.model) else args.model
    report = prepare_corpus(args.data, args.out, tokenizer, segment_seconds=args.segment_seconds,
                            min_seconds=args.min_seconds, silence_db=args.silence_db, text_conditioner=text,
                            model_spec=spec, overwrite=args.force, progress=not args.quiet)
    if not args.quiet:
        for skipped in report.skipped:
            print(f"skipped {skipped.source}: {skipped.reason}", file=sys.stderr)
        print(f"prepare: {report.summary()}")
    return 0


def cmd_make_text_encoder(args) -> int:
    from conditioning.t5_builder import TextEncoderSpec, build_text_encoder
    from lm.token_cache import caption_texts

    try:
        spec = TextEncoderSpec(vocab_size=args.vocab_size, d_model=args.d_model, num_layers=args.layers,
                               num_heads=args.heads, d_kv=args.d_kv, d_ff=args.d_ff,
                               feed_forward_proj=args.ff,
                               dropout=args.dropout, case_sensitive=args.case_sensitive, seed=args.seed)
        texts = caption_texts(args.captions)
        built = build_text_encoder(texts, args.out, spec, overwrite=args.force)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        raise CliError(" ".join(str(error).split())) from None
    if not args.quiet:
        note = ("" if built.vocab_size >= args.vocab_size
                else f" (of {args.vocab_size} asked: all the captions support)")
        print(f"make-text-encoder: {len(texts)} caption text(s) -> vocabulary of "
              f"{built.vocab_size} pieces{note}, "
              f"T5 encoder of {built.num_parameters / 1e6:.2f} M parameters, {built.num_bytes / 1e6:.1f} MB "
              f"-> {built.folder}")
    return 0


def _finetune_config(args):
    from lm.finetune import FinetuneConfig, read_run_config

    known = {f.name for f in fields(FinetuneConfig)}
    given = {_RENAMED.get(k, k): v for k, v in vars(args).items() if _RENAMED.get(k, k) in known}
    for name in ("sample_prompts", "betas"):
        if name in given:
            given[name] = tuple(given[name])
    if args.resume:  # the stored settings, but a stop is never carried over
        stored = read_run_config(given["out"])
        return replace(stored, **{"stop_after": None, **given})
    missing = [f"--{name}" for name in ("data",) if name not in given]
    if missing:
        raise CliError(f"{', '.join(missing)} is required (unless --resume continues an existing run)")
    return FinetuneConfig(**given)


def cmd_finetune(args) -> int:
    from inference.finetune import finetune

    try:
        config = _finetune_config(args)
    except (ValueError, TypeError) as error:
        raise CliError(" ".join(str(error).split())) from None
    result = finetune(config, resume=args.resume, progress=not args.quiet)
    if not args.quiet and result.main_process:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()
                          if k in ("train/loss", "valid/loss"))
        shown = f" ({shown})" if shown else ""
        if result.model_dir is not None:
            print(f"finetune: {result.step} steps{shown} -> {result.model_dir}")
        else:
            print(f"finetune: stopped after step {result.step}{shown}; continue with "
                  f"`tokenwave finetune --out {result.out} --resume`")
    return 0


def cmd_merge_lora(args) -> int:
    from inference.formats import SAVE_DTYPES, detect_format, save_generator
    from inference.generator import MusicGen
    from lm.lora import merge_lora

    if detect_format(args.adapter) != "lora":
        raise CliError(f"{args.adapter}: not a LoRA adapter folder (no lora.json); pass the folder "
                       "`tokenwave finetune --lora` wrote (RUN/model)")
    generator = MusicGen.from_pretrained(args.adapter, device=parse_device(args.device), t5_path=args.t5_path)
    merge_lora(generator.lm)
    dtype = SAVE_DTYPES[args.save_dtype] if args.save_dtype else None
    folder = save_generator(generator, args.out, overwrite=args.force, dtype=dtype)
    if not args.quiet:
        print(f"merge-lora: {args.adapter} over its base -> {folder}")
    return 0


def register(commands) -> None:
    """Add the ``prepare`` and ``finetune`` subcommands to ``tokenwave``'s subparsers."""
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    quiet.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks on errors")

    sub = commands.add_parser(
        "prepare", parents=[quiet], help="corpus of captioned audio -> token cache for finetune",
        description="Scan a folder of audio with .txt/.json captions (or a .jsonl manifest), check "
                    "every file (unreadable, empty, too short, silent: skipped and listed), encode it "
                    "with the model's codec "
                    "and cache the codes (and optionally T5 text embeddings) for `tokenwave finetune`.")
    sub.add_argument("data", metavar="DATA", help="corpus folder or .jsonl manifest")
    sub.add_argument("--model", required=True,
                     help="generator (folder or name) whose codec tokenizes the audio, or a codec alone "
                          "(name, checkpoint, random:<preset>)")
    sub.add_argument("--out", required=True, metavar="CACHE", help="cache folder to write")
    sub.add_argument("--segment-seconds", type=float, default=30.0,
                     help="training window recorded as finetune's default (default 30, MusicGen's)")
    sub.add_argument("--min-seconds", type=float, default=1.0,
                     help="skip files shorter than this (default 1)")
    sub.add_argument("--silence-db", type=float, default=-60.0,
                     help="skip files whose peak is below this many dBFS (default -60)")
    sub.add_argument("--codebooks", type=int, help="codebooks to keep (codec models; default all)")
    sub.add_argument("--text-embeddings", action="store_true",
                     help="also cache the model's T5 output for each caption (finetune --use-cached-text)")
    sub.add_argument("--t5-path", metavar="FOLDER", help="T5 folder for audiocraft checkpoints that name one")
    sub.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    sub.add_argument("--force", action="store_true", help="rebuild an existing cache")
    sub.set_defaults(func=cmd_prepare)

    sub = commands.add_parser(
        "make-text-encoder", parents=[quiet], help="corpus captions -> a small random T5 text encoder folder",
        description="Train a sentencepiece unigram vocabulary on a corpus' captions (descriptions "
                    "and metadata) and write it with a randomly initialised T5 encoder as a T5 folder, "
                    "to be trained with the LM: "
                    "tokenwave finetune --from-scratch SIZE --t5 FOLDER --train-text-encoder ...")
    sub.add_argument("--captions", required=True, metavar="DATA",
                     help="corpus folder (.txt/.json sidecars), .jsonl manifest, or token cache")
    sub.add_argument("--out", required=True, metavar="FOLDER", help="T5 folder to write")
    sub.add_argument("--vocab-size", type=int, default=1000,
                     help="largest vocabulary, special ids included (default 1000; small corpora give fewer)")
    sub.add_argument("--d-model", type=int, default=256, help="encoder width (default 256)")
    sub.add_argument("--layers", type=int, default=4, help="encoder blocks (default 4)")
    sub.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    sub.add_argument("--d-kv", type=int, help="width of each head (default d-model / heads)")
    sub.add_argument("--d-ff", type=int, help="feed-forward width (default 4 x d-model)")
    sub.add_argument("--ff", default="relu", choices=("relu", "gated-gelu"),
                     help="feed-forward kind: relu (T5) or gated-gelu (T5 1.1 / flan-t5) (default relu)")
    sub.add_argument("--dropout", type=float, default=0.1, help="T5 dropout while training (default 0.1)")
    sub.add_argument("--case-sensitive", action="store_true",
                     help="keep upper and lower case apart (default: fold)")
    sub.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    sub.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    sub.set_defaults(func=cmd_make_text_encoder)

    sup = argparse.SUPPRESS  # only the options given reach the config (resume keeps the rest)
    sub = commands.add_parser(
        "finetune", parents=[quiet], help="train the LM on a token cache (accelerate; CPU, GPU, multi-GPU)",
        description="Fine-tune a generator's LM on a token cache (or train one from scratch) and write a "
                    "generator folder to OUT/model. Several processes (DDP): accelerate launch --multi_gpu "
                    "--num_processes N -m inference finetune ... (add --cpu for CPU processes)")
    sub.add_argument("--model", default=sup, help="base generator (folder or name); its config is inherited")
    sub.add_argument("--data", default=sup, metavar="CACHE", help="token cache from `tokenwave prepare`")
    sub.add_argument("--out", required=True, metavar="OUT",
                     help="run folder (checkpoints, samples, logs, model)")
    sub.add_argument("--resume", action="store_true", help="continue OUT from its last checkpoint")
    sub.add_argument("--from-scratch", default=sup, metavar="SIZE",
                     help="fresh LM of this preset size (tiny, musicgen_small, ...) instead of the base's")
    sub.add_argument("--codec", default=sup,
                     help="from scratch without --model: codec (default: the cache's)")
    sub.add_argument("--t5", default=sup, metavar="FOLDER",
                     help="from scratch without --model: T5 folder (default: a lookup table of "
                          "caption words)")
    sub.add_argument("--t5-path", default=sup, metavar="FOLDER", help="T5 folder an audiocraft base names")
    sub.add_argument("--train-text-encoder", action="store_true", default=sup,
                     help="train the T5 text encoder with the LM (default: frozen)")
    sub.add_argument("--text-encoder-lr-scale", type=float, default=sup,
                     help="T5 learning rate as a multiple of --lr (default 1)")
    sub.add_argument("--text-pretrain-steps", type=int, default=sup, metavar="N",
                     help="first train the text encoder alone for N steps to tell the genre, key, mode, "
                          "tempo, instruments and moods its captions state (fresh runs; a T5 needs "
                          "--train-text-encoder; default 0)")
    sub.add_argument("--save-dtype", default=sup, choices=("float32", "float16", "bfloat16"),
                     help="storage type of the exported LM and T5 weights (default float32; the others halve "
                          "the folder and load back as float32)")
    sub.add_argument("--steps", type=int, default=sup,
                     help="optimizer steps (default 1000); with --resume a larger total continues the "
                          "run to it")
    sub.add_argument("--batch-size", type=int, default=sup,
                     help="samples per process per micro-batch (default 4)")
    sub.add_argument("--lr", type=float, default=sup, help="peak learning rate (default 1e-4)")
    sub.add_argument("--warmup", type=int, default=sup,
                     help="linear warmup steps (default 100; one >= --steps is cut to steps / 10, "
                          "with a warning)")
    sub.add_argument("--min-lr-ratio", type=float, default=sup,
                     help="cosine floor as a share of --lr (default 0)")
    sub.add_argument("--weight-decay", type=float, default=sup, help="AdamW weight decay (default 0.1)")
    sub.add_argument("--betas", type=float, nargs=2, default=sup, help="AdamW betas (default 0.9 0.95)")
    sub.add_argument("--grad-accum", type=int, default=sup, help="micro-batches per step (default 1)")
    sub.add_argument("--max-grad-norm", type=float, default=sup, help="gradient clipping (default 1.0)")
    sub.add_argument("--mixed-precision", default=sup, choices=("auto", "no", "bf16", "fp16"),
                     help="autocast type (default auto: bf16 on a GPU that has it, else no)")
    sub.add_argument("--grad-checkpointing", action="store_true", default=sup,
                     help="recompute layer activations in backward (less memory)")
    sub.add_argument("--ema", action="store_true", default=sup,
                     help="keep an EMA of the weights for validation, samples and the result")
    sub.add_argument("--ema-decay", type=float, default=sup, help="EMA decay (default 0.99)")
    sub.add_argument("--ema-every", type=int, default=sup, help="steps between EMA updates (default 10)")
    sub.add_argument("--cfg-dropout", type=float, default=sup,
                     help="probability of dropping the whole batch's text (default 0.3)")
    sub.add_argument("--word-dropout", type=float, default=sup, help="per-word text dropout (default 0.3)")
    sub.add_argument("--merge-text-p", type=float, default=sup,
                     help="probability of merging metadata into the caption (default 0.25)")
    sub.add_argument("--drop-desc-p", type=float, default=sup,
                     help="probability of dropping the description on merge (default 0.5)")
    sub.add_argument("--drop-other-p", type=float, default=sup,
                     help="probability of dropping each merged field (default 0.5)")
    sub.add_argument("--use-cached-text", action="store_true", default=sup,
                     help="use the cache's T5 embeddings (no caption augmentation, no word dropout)")
    sub.add_argument("--segment-seconds", type=float, default=sup,
                     help="training window (default: the cache's)")
    sub.add_argument("--start-fraction", type=float, default=sup, metavar="P",
                     help="share of training windows that begin at their clip's start (default 0)")
    sub.add_argument("--start-weight", type=float, default=sup, metavar="W",
                     help="extra loss weight of a window's first frames, where only the caption informs "
                          "the LM (weight 1 + W * exp(-frame / --start-weight-frames); default 0: off)")
    sub.add_argument("--start-weight-frames", type=float, default=sup, metavar="F",
                     help="decay of --start-weight, in frames (default 10)")
    sub.add_argument("--tempo-key", action="store_true", default=sup,
                     help="add tempo (beat clock) and key conditioners, fed from the metadata's bpm/key and, "
                          "when generating, from the prompt's 'N bpm' and '<tonic> major|minor'")
    sub.add_argument("--instrument", action="store_true", default=sup,
                     help="add a lead-instrument conditioner (one embedding per lead instrument of the corpus), "
                          "fed from the metadata's first 'instrument' and, when generating, from the first "
                          "instrument the prompt names")
    sub.add_argument("--instrument-min-items", type=int, default=sup, metavar="N",
                     help="instruments leading fewer training items are left out of its vocabulary (default 5)")
    sub.add_argument("--tempo-key-dropout", type=float, default=sup, metavar="P",
                     help="probability of dropping the tempo, the key or the instrument alone in training "
                          "(default 0.2)")
    sub.add_argument("--valid-fraction", type=float, default=sup,
                     help="share of items held out (default 0.05)")
    sub.add_argument("--eval-every", type=int, default=sup,
                     help="steps between validations (default 250; 0 off)")
    sub.add_argument("--sample-every", type=int, default=sup,
                     help="steps between audio samples (default 0: off)")
    sub.add_argument("--sample-prompt", action="append", default=sup, metavar="TEXT",
                     help="prompt for the samples (repeatable; default: captions of validation items)")
    sub.add_argument("--sample-seconds", type=float, default=sup, help="length of each sample (default 5)")
    sub.add_argument("--save-every", type=int, default=sup, help="steps between checkpoints (default 500)")
    sub.add_argument("--keep-last", type=int, default=sup, help="checkpoints kept (default 3; 0 keeps all)")
    sub.add_argument("--log-every", type=int, default=sup, help="steps between log lines (default 10)")
    sub.add_argument("--log-with", default=sup, choices=("auto", "jsonl", "tensorboard"),
                     help="trackers: JSONL always, TensorBoard too when installed (auto) or required")
    sub.add_argument("--seed", type=int, default=sup, help="random seed (default 0)")
    sub.add_argument("--stop-after", type=int, default=sup, metavar="N",
                     help="stop after step N without exporting (a time-boxed job; continue with --resume)")
    sub.add_argument("--cpu", action="store_true", default=sup,
                     help="train on the CPU even when a GPU is present (several CPU processes: "
                          "under accelerate "
                          "launch --multi_gpu --num_processes N or torchrun)")
    sub.add_argument("--lora", type=int, default=sup, metavar="RANK",
                     help="train only rank-RANK LoRA adapters (base frozen); OUT/model holds them alone")
    sub.add_argument("--lora-alpha", type=float, default=sup, help="LoRA scale alpha / RANK (default RANK)")
    sub.add_argument("--lora-targets", nargs="+", default=sup, metavar="TARGET",
                     help="matrices to adapt: attn (default), self_attn, cross_attention, ffn, all, or "
                          "self_attn.in_proj, self_attn.out_proj, cross_attention.in_proj, "
                          "cross_attention.out_proj, linear1, linear2")
    sub.set_defaults(func=cmd_finetune)

    sub = commands.add_parser(
        "merge-lora", parents=[quiet], help="LoRA adapter folder + its base -> a full generator folder",
        description="Load the base generator a LoRA adapter folder names, fold the adapters into its "
                    "weights and write a plain tokenwave generator folder.")
    sub.add_argument("adapter", metavar="ADAPTER", help="adapter folder (finetune --lora's RUN/model)")
    sub.add_argument("out", metavar="OUT", help="generator folder to write")
    sub.add_argument("--save-dtype", choices=("float32", "float16", "bfloat16"),
                     help="storage type of the LM and T5 weights (default: as loaded, float32)")
    sub.add_argument("--t5-path", metavar="FOLDER", help="T5 folder for an audiocraft base that names one")
    sub.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    sub.add_argument("--force", action="store_true", help="replace an existing non-empty OUT")
    sub.set_defaults(func=cmd_merge_lora)
