"""Peak memory of blockwise encode/decode on long files: does it grow with the file length?

Writes synthetic test files (tones + noise, block by block) to ``--workdir``, then runs each
step in its own process under ``/usr/bin/time -v`` (Debian package ``time``) and prints its
peak resident set size:

* encode: file -> codes (``codec.streaming.encode_file``), codes written to disk as they come;
* decode: codes read back block by block -> file (``codec.streaming.decode_to_file``).

Random weights (seeded, with random codebooks so the codes vary); 6 kbps; one thread.
Target: the 60-minute peak within 1.2x of the 10-minute one and under 1.5 GB. Run from the
repo root (the 60-minute cases take a while on a small CPU):

    python -m bench.memory --minutes 10 60
"""
from __future__ import annotations

import argparse
import os
import re
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CASES = {"24": ("encodec_24khz", 6.0), "48": ("encodec_48khz", 6.0)}
TIME = "/usr/bin/time"
# Bench-only codes file: per encoded frame, '<BHI' (has scale, codebooks K, frames F), then a
# float32 scale if present, then K * F int16 codes.
RECORD = struct.Struct("<BHI")


# -- test files ---------------------------------------------------------------------------------
def make_file(path: Path, sample_rate: int, channels: int, minutes: float) -> None:
    """Tones with a slow vibrato plus noise, written 10 s at a time as 16-bit PCM."""
    import soundfile as sf

    total = int(minutes * 60 * sample_rate)
    if path.exists() and sf.info(str(path)).frames == total:
        return
    rng = np.random.default_rng(0)
    block = 10 * sample_rate
    tmp = path.with_suffix(".tmp.wav")
    with sf.SoundFile(str(tmp), "w", samplerate=sample_rate, channels=channels,
                      subtype="PCM_16") as out:
        for start in range(0, total, block):
            t = np.arange(start, min(total, start + block)) / sample_rate
            tone = sum(0.15 * np.sin(2 * np.pi * f * t * (1 + 0.002 * np.sin(0.3 * t)))
                       for f in (220.0, 331.0, 497.0))
            data = tone[:, None] + 0.05 * rng.standard_normal((t.size, channels))
            out.write(data.astype(np.float32))
    tmp.replace(path)


# -- worker (runs under /usr/bin/time) -----------------------------------------------------------
def build_model(name: str, threads: int):
    import torch

    from codec.model import EncodecModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = EncodecModel.from_preset(name)
    for layer in model.quantizer.vq.layers:
        layer._codebook.embed.normal_()
        layer._codebook.inited.fill_(1.0)
    return model.prepare_for_inference()


def write_codes(frames, path: Path) -> int:
    count = 0
    with open(path, "wb") as out:
        for frame in frames:
            codes = frame.codes[0].to("cpu")
            out.write(RECORD.pack(frame.scale is not None, codes.shape[0], codes.shape[1]))
            if frame.scale is not None:
                out.write(struct.pack("<f", float(frame.scale)))
            out.write(codes.numpy().astype("<i2").tobytes())
            count += codes.shape[1]
    return count


def read_codes(path: Path) -> Iterator:
    import torch

    from codec.model import EncodedFrame

    with open(path, "rb") as src:
        while header := src.read(RECORD.size):
            has_scale, k, f = RECORD.unpack(header)
            scale = torch.tensor([[struct.unpack("<f", src.read(4))[0]]]) if has_scale else None
            codes = np.frombuffer(src.read(2 * k * f), dtype="<i2").reshape(1, k, f)
            yield EncodedFrame(torch.from_numpy(codes.astype(np.int64)), scale)


def worker(args) -> None:
    import soundfile as sf
    import torch

    from codec.streaming import decode_to_file, encode_file

    model = build_model(args.model, args.threads)
    start = time.perf_counter()
    with torch.inference_mode():
        if args.step == "encode":
            frames = write_codes(encode_file(args.audio, model, bandwidth=args.bandwidth,
                                             block_seconds=args.block_seconds), args.codes)
            print(f"frames {frames}")
        elif args.step == "decode":
            length = sf.info(str(args.audio)).frames
            written = decode_to_file(read_codes(args.codes), args.output, model, length=length)
            print(f"samples {written}")
    print(f"seconds {time.perf_counter() - start:.2f}")


# -- driver ---------------------------------------------------------------------------------------
def measure(command: list[str]) -> tuple[float, float, str]:
    """Run ``command`` under /usr/bin/time -v: (peak RSS MiB, wall seconds, stdout)."""
    done = subprocess.run([TIME, "-v", *command], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1])
    seconds = float(re.search(r"^seconds ([\d.]+)", done.stdout, re.M)[1])
    return peak_kb / 1024, seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[10, 60])
    parser.add_argument("--models", nargs="+", choices=sorted(CASES), default=["24", "48"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tokenwave_memory"))
    parser.add_argument("--block-seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("worker")
    run.add_argument("step", choices=["encode", "decode", "idle"])
    for name in ("--audio", "--codes", "--output"):
        run.add_argument(name, type=Path)
    run.add_argument("--model", required=True)
    run.add_argument("--bandwidth", type=float, default=6.0)
    args = parser.parse_args()
    if args.command == "worker":
        worker(args)
        return
    if not os.path.exists(TIME):
        sys.exit(f"{TIME} not found: install Debian's `time` package (apt-get install -y time)")

    args.workdir.mkdir(parents=True, exist_ok=True)
    common = [sys.executable, "-m", "bench.memory", "--threads", str(args.threads),
              "--block-seconds", str(args.block_seconds), "worker"]
    rows = []
    print(f"{'model':<14} {'minutes':>7} {'step':<7} {'peak RSS MiB':>12} {'seconds':>8} "
          f"{'x real time':>11}", flush=True)
    for key in args.models:
        name, bandwidth = CASES[key]
        sample_rate, channels = (24_000, 1) if key == "24" else (48_000, 2)
        peak, _, _ = measure([*common, "idle", "--model", name])
        rows.append((name, 0, "idle", peak))
        print(f"{name:<14} {'-':>7} {'idle':<7} {peak:>12.0f} {'-':>8} {'-':>11}", flush=True)
        for minutes in args.minutes:
            audio = args.workdir / f"{key}k_{minutes:g}min.wav"
            make_file(audio, sample_rate, channels, minutes)
            codes = audio.with_suffix(".codes")
            output = audio.with_name(audio.stem + "_decoded.wav")
            files = ["--model", name, "--bandwidth", str(bandwidth), "--audio", str(audio),
                     "--codes", str(codes), "--output", str(output)]
            for step in ("encode", "decode"):
                peak, seconds, _ = measure([*common, step, *files])
                rows.append((name, minutes, step, peak))
                print(f"{name:<14} {minutes:>7g} {step:<7} {peak:>12.0f} {seconds:>8.1f} "
                      f"{minutes * 60 / seconds:>11.1f}", flush=True)
            output.unlink(missing_ok=True)
    if len(args.minutes) > 1:
        short, long = min(args.minutes), max(args.minutes)
        print(f"\npeak RSS {long:g} min / {short:g} min (target <= 1.2, and < 1536 MiB):")
        for key in args.models:
            name = CASES[key][0]
            for step in ("encode", "decode"):
                peaks = {m: p for n, m, s, p in rows if n == name and s == step}
                ratio = peaks[long] / peaks[short]
                ok = ratio <= 1.2 and peaks[long] < 1536
                print(f"  {name:<14} {step:<7} {ratio:.3f}  ({peaks[short]:.0f} -> "
                      f"{peaks[long]:.0f} MiB) {'ok' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
