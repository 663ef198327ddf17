"""Peak RSS of loading a MusicGen-large-sized checkpoint in transformers' format, per LM dtype.

Writes random weights for a ``musicgen_large``-sized decoder (dim 2048, 48 layers, 32 heads,
4 codebooks x 2048: 3.3B parameters) as transformers' sharded ``model-XXXXX-of-XXXXX.safetensors``
(one shard per layer, bfloat16 by default: 6.5 GB on disk instead of 13 GB) with the shipped
model's small T5 as the text encoder and a random 32 kHz EnCodec as the audio encoder. Then,
per ``--dtypes`` entry, a fresh subprocess loads it with ``MusicGen.from_pretrained(folder,
dtype=...)`` and reports its peak RSS (``VmHWM``), the RSS after loading, the LM's weight
bytes, and the process's RSS before loading (torch, transformers imported).

No second copy means: peak RSS <= baseline + what the loaded model holds (+ one layer). A
bfloat16 load of a bfloat16 file maps the file (the weights are the file's pages); an int8 /
int4 load quantizes layer by layer and never holds the float checkpoint.

    python -m bench.load_memory                                  # large, bf16 file: int8, bfloat16
    python -m bench.load_memory --size medium --file-dtype float32 --dtypes float32 int8
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"small": (1024, 24, 16), "medium": (1536, 48, 24), "large": (2048, 48, 32)}  # dim, layers, heads
CODEBOOKS, CARD = 4, 2048
T5 = ROOT / "assets" / "models" / "tokenwave-small" / "t5"


def _decoder_config(dim: int, layers: int, heads: int) -> dict:
    return {"model_type": "musicgen_decoder", "vocab_size": CARD, "hidden_size": dim, "num_hidden_layers": layers,
            "num_attention_heads": heads, "ffn_dim": 4 * dim, "num_codebooks": CODEBOOKS, "audio_channels": 1,
            "activation_function": "gelu", "bos_token_id": CARD, "pad_token_id": CARD,
            "max_position_embeddings": 2048, "dropout": 0.0}


def _layer(i: int, dim: int, dtype: torch.dtype, gen: torch.Generator) -> dict[str, torch.Tensor]:
    prefix = f"decoder.model.decoder.layers.{i}."
    out = {}
    for attn in ("self_attn", "encoder_attn"):
        for proj in ("q", "k", "v", "out"):
            out[f"{prefix}{attn}.{proj}_proj.weight"] = (0.02 * torch.randn(dim, dim, generator=gen)).to(dtype)
    out[prefix + "fc1.weight"] = (0.02 * torch.randn(4 * dim, dim, generator=gen)).to(dtype)
    out[prefix + "fc2.weight"] = (0.02 * torch.randn(dim, 4 * dim, generator=gen)).to(dtype)
    for norm in ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"):
        out[f"{prefix}{norm}.weight"] = torch.ones(dim, dtype=dtype)
        out[f"{prefix}{norm}.bias"] = torch.zeros(dim, dtype=dtype)
    return out


def write_checkpoint(folder: Path, size: str, dtype: torch.dtype) -> float:
    """The sharded transformers folder; returns the weights' size on disk in GB."""
    from safetensors import safe_open  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    from codec.formats import save_model  # noqa: PLC0415
    from codec.pretrained import random_model  # noqa: PLC0415

    dim, layers, heads = SIZES[size]
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        codec_dir = save_model(random_model("encodec_32khz"), Path(tmp) / "codec", format="transformers")
        codec_config = json.loads((Path(codec_dir) / "config.json").read_text())
        with safe_open(str(Path(codec_dir) / "model.safetensors"), "pt") as file:
            audio = {"audio_encoder." + k: file.get_tensor(k) for k in file.keys()}
    with safe_open(str(T5 / "model.safetensors"), "pt") as file:
        text = {"text_encoder." + k: file.get_tensor(k).float() for k in file.keys()}
    t5_config = json.loads((T5 / "config.json").read_text())
    rest = {**audio, **text,
            "enc_to_dec_proj.weight": (0.02 * torch.randn(dim, t5_config["d_model"], generator=gen)).to(dtype),
            "enc_to_dec_proj.bias": torch.zeros(dim, dtype=dtype),
            "decoder.model.decoder.layer_norm.weight": torch.ones(dim, dtype=dtype),
            "decoder.model.decoder.layer_norm.bias": torch.zeros(dim, dtype=dtype)}
    for k in range(CODEBOOKS):
        embedding = 0.02 * torch.randn(CARD + 1, dim, generator=gen)
        rest[f"decoder.model.decoder.embed_tokens.{k}.weight"] = embedding.to(dtype)
        rest[f"decoder.lm_heads.{k}.weight"] = (0.02 * torch.randn(CARD, dim, generator=gen)).to(dtype)
    shards = layers + 1
    weight_map, total = {}, 0
    for index in range(shards):
        state = rest if index == layers else _layer(index, dim, dtype, gen)
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, name))
        total += (folder / name).stat().st_size
        del state
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "musicgen", "decoder": _decoder_config(dim, layers, heads),
        "text_encoder": t5_config, "audio_encoder": codec_config}))
    for name in ("spiece.model", "tokenizer_config.json"):
        if (T5 / name).is_file():
            shutil.copy(T5 / name, folder / name)
    return total / 1e9


_CHILD = """
import json, sys, time, torch
torch.set_num_threads({threads})
from inference.generator import MusicGen
def rss(field='VmRSS'):  # VmHWM: this process's own peak (ru_maxrss keeps the parent's across exec)
    return int(open('/proc/self/status').read().split(field + ':')[1].split()[0]) / 1024
before = rss()
start = time.perf_counter()
generator = MusicGen.from_pretrained({folder!r}, device='cpu', dtype={dtype!r})
seconds = time.perf_counter() - start
lm = generator.lm
weights = sum(t.numel() * t.element_size() for t in [*lm.parameters(), *lm.buffers()]) / 2**20
result = dict(before=before, after=rss(), peak=rss('VmHWM'), lm_mb=weights, seconds=seconds)
if {generate} > 0:  # one prompt, guidance on, as `tokenwave generate` runs it
    start = time.perf_counter()
    generator.generate("an upbeat electronic track with drums", {generate}, seed=0)
    result.update(generate_seconds=time.perf_counter() - start, generate_peak=rss('VmHWM'))
print(json.dumps(result))
"""


def measure(folder: Path, dtype: str, threads: int, generate: float = 0.0) -> dict:
    code = _CHILD.format(threads=threads, folder=str(folder), dtype=dtype, generate=float(generate))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"loading with dtype={dtype} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--size", choices=sorted(SIZES), default="large")
    parser.add_argument("--file-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--dtypes", nargs="+", default=["int8", "bfloat16"],
                        help="LM dtypes to load with, one subprocess each (int4 adds minutes on large: its "
                             "range search)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", metavar="FOLDER", help="write the checkpoint here and keep it")
    parser.add_argument("--reuse", metavar="FOLDER", help="measure a checkpoint --keep wrote before")
    parser.add_argument("--generate", type=float, default=0.0, metavar="SECONDS",
                        help="after loading, generate this much audio (one prompt, guidance on) and report "
                             "the peak RSS through load and generation")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tokenwave-load-") as tmp:
        folder = Path(args.reuse or args.keep or Path(tmp) / "musicgen")
        start = time.perf_counter()
        dim, layers, _ = SIZES[args.size]
        if args.reuse:
            gigabytes = sum(f.stat().st_size for f in folder.glob("model-*.safetensors")) / 1e9
            print(f"{folder}: {gigabytes:.2f} GB of shards (written before; --size must match)\n")
        else:
            gigabytes = write_checkpoint(folder, args.size, getattr(torch, args.file_dtype))
            print(f"musicgen-{args.size}-sized (dim {dim}, {layers} layers) random weights, transformers format, "
                  f"{args.file_dtype}: {gigabytes:.2f} GB in {layers + 1} shards (written in "
                  f"{time.perf_counter() - start:.0f} s)\n")
        extra = f" peak RSS with {args.generate:g} s generated (MB) | generation (s) |" if args.generate else ""
        print("| load dtype | LM weights (MB) | RSS before (MB) | peak RSS (MB) | RSS after (MB) | "
              "peak - before - LM (MB) | load (s) |" + extra)
        print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.generate else ""))
        for dtype in args.dtypes:
            r = measure(folder, dtype, args.threads, args.generate)
            cells = f" {r['generate_peak']:.0f} | {r['generate_seconds']:.0f} |" if args.generate else ""
            print(f"| {dtype} | {r['lm_mb']:.0f} | {r['before']:.0f} | {r['peak']:.0f} | {r['after']:.0f} | "
                  f"{r['peak'] - r['before'] - r['lm_mb']:.0f} | {r['seconds']:.0f} |{cells}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
