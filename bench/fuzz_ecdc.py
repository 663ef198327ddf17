"""Longer fuzzing of the .ecdc reader than the test suite runs.

Builds valid files from random codes (24 and 48 kHz layouts, with and without the entropy
LM), mutates them (truncation, bit flips, byte overwrites, insertions, spliced headers,
absurd metadata) and decodes each with a tiny codec. Every case must end in `EcdcError` or in
audio of the declared shape; anything else is printed and counted. Reports outcomes, the
slowest case and peak memory. Run from the repo root:

    OMP_NUM_THREADS=1 python -m bench.fuzz_ecdc --seconds 120 --seed 0
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import struct
import sys
import time
import traceback
from collections import Counter
from dataclasses import replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from codec import EncodecModel, EncodedFrame, ecdc  # noqa: E402
from codec.ecdc import CodecLayout, EcdcError, EcdcHeader  # noqa: E402
from codec.entropy_lm import EntropyLM  # noqa: E402
from codec.model import PRESETS  # noqa: E402

NAMES = ("encodec_24khz", "encodec_48khz")


def tiny_codec(name: str) -> EncodecModel:
    return EncodecModel(replace(PRESETS[name], n_filters=2, dimension=8, lstm=0)).eval()


def valid_file(rng: random.Random, model: EncodecModel, lm: EntropyLM) -> bytes:
    layout = CodecLayout.from_model(model)
    length = rng.randint(1, int(2.5 * layout.sample_rate))
    num_codebooks = rng.randint(1, layout.num_codebooks)
    use_lm = rng.random() < 0.5
    gen = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    frames = []
    for num_frames in layout.chunk_frames(length):
        codes = torch.randint(0, layout.codebook_size, (1, num_codebooks, num_frames), generator=gen)
        scale = torch.rand(1, 1, generator=gen) + 1e-3 if layout.normalize else None
        frames.append(EncodedFrame(codes, scale))
    body = io.BytesIO()
    ecdc.write_body(body, frames, layout, lm if use_lm else None)
    return EcdcHeader(model.name, length, num_codebooks, use_lm).to_bytes() + body.getvalue()


def weird_value(rng: random.Random):
    return rng.choice([0, -1, 1, 2 ** 31, 2 ** 32 + 5, 2 ** 63, 10 ** 30, 10 ** 4000 // 10 ** 3990,
                       1.5, float("inf"), True, None, "8", [], {"a": 1}, "encodec_24khz"])


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    kind = rng.randrange(8)
    if kind == 0:  # truncate
        return bytes(data[:rng.randrange(len(data))])
    if kind == 1:  # bit flips
        for _ in range(rng.randint(1, 16)):
            bit = rng.randrange(8 * len(data))
            data[bit // 8] ^= 1 << (bit % 8)
        return bytes(data)
    if kind == 2:  # overwrite a run with random bytes
        start = rng.randrange(len(data))
        for i in range(start, min(len(data), start + rng.randint(1, 32))):
            data[i] = rng.randrange(256)
        return bytes(data)
    if kind == 3:  # insert or append bytes
        at = rng.randrange(len(data) + 1)
        return bytes(data[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
                     + data[at:])
    if kind == 4:  # header struct fields
        magic = rng.choice([b"ECDC", b"ECDD", b"\0\0\0\0"])
        version = rng.choice([0, 0, 1, 255])
        old = struct.unpack_from("!I", data, 5)[0] if len(data) >= 9 else 0
        size = rng.choice([0, 1, 2 ** 16, 2 ** 32 - 1, old + 1, max(0, old - 1)])
        return struct.pack("!4sBI", magic, version, size) + bytes(data[9:])
    # metadata: change or drop a field (of a header that still parses)
    try:
        header, offset = ecdc.read_header(bytes(data))
    except EcdcError:
        return mutate(rng, bytes(data)) if rng.random() < 0.9 else bytes(data)
    meta = {"m": header.model_name, "al": header.audio_length, "nc": header.num_codebooks,
            "lm": header.use_lm}
    key = rng.choice(list(meta))
    if kind == 5:
        meta[key] = weird_value(rng)
    elif kind == 6:
        del meta[key]
    else:
        meta[key] = meta[key] + rng.choice([-1, 1, 7]) if key in ("al", "nc") else weird_value(rng)
    raw = json.dumps(meta).encode()
    return struct.pack("!4sBI", b"ECDC", 0, len(raw)) + raw + bytes(data[offset:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-lm", action="store_true",
                        help="use the released LM size (dim 200, 5 layers) instead of a tiny one")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    models = {name: tiny_codec(name) for name in NAMES}
    lms = {}
    for name, model in models.items():
        if args.full_lm:
            lm = EntropyLM.for_codec(num_codebooks=model.num_codebooks, card=model.codebook_size,
                                     frame_rate=model.frame_rate)
        else:
            lm = EntropyLM(num_codebooks=model.num_codebooks, card=model.codebook_size,
                           past_context=int(3.5 * model.frame_rate), dim=16, num_layers=1,
                           num_heads=2, ffn_dim=32)
        lms[name] = lm.eval()

    outcomes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    slowest = (0.0, "")
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        name = rng.choice(NAMES)
        data = valid_file(rng, models[name], lms[name])
        for _ in range(rng.randint(1, 3)):
            data = mutate(rng, data) if data else data
        start = time.perf_counter()
        try:
            wav, _ = ecdc.decompress(data, models[name], lm=lms[name])
            header, _ = ecdc.read_header(data)
            assert wav.shape == (models[name].channels, header.audio_length), wav.shape
            outcomes["decoded"] += 1
        except EcdcError as error:
            outcomes["EcdcError"] += 1
            errors[str(error).split(":")[0][:60]] += 1
        except Exception:  # noqa: BLE001 - what this script looks for
            outcomes["UNEXPECTED"] += 1
            print("unexpected exception for", data[:80], "...", file=sys.stderr)
            traceback.print_exc()
        elapsed = time.perf_counter() - start
        if elapsed > slowest[0]:
            slowest = (elapsed, f"{len(data)} bytes, {data[9:90]!r}")

    total = sum(outcomes.values())
    print(f"{total} cases in {args.seconds:g} s (seed {args.seed}, "
          f"{'released-size' if args.full_lm else 'tiny'} LM)")
    for outcome, count in outcomes.most_common():
        print(f"  {outcome:<12}{count:>8}")
    print("most frequent errors:")
    for message, count in errors.most_common(12):
        print(f"  {count:>6}  {message}")
    print(f"slowest case: {slowest[0] * 1000:.0f} ms ({slowest[1]})")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if outcomes["UNEXPECTED"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
