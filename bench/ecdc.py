"""Benchmark .ecdc compress/decompress against the original `encodec` package, one thread.

Both implementations get the same random weights (codec and entropy LM), the same audio and
bandwidth; the table gives seconds (best of `--repeats`), x real time, file size and whether
the bytes and decoded audio agree. Run from the repo root:

    OMP_NUM_THREADS=1 python -m bench.ecdc --seconds 10 --model encodec_24khz --bandwidth 6
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from codec import EncodecModel, ecdc  # noqa: E402
from codec.entropy_lm import EntropyLM  # noqa: E402
from oracles import import_encodec  # noqa: E402


def build(model_name: str, bandwidth: float, seed: int):
    """Reference model + LM and ours with the same random weights."""
    encodec = import_encodec()
    from encodec.model import LMModel

    reference_compress = importlib.import_module("encodec.compress")
    ctor = {"encodec_24khz": encodec.EncodecModel.encodec_model_24khz,
            "encodec_48khz": encodec.EncodecModel.encodec_model_48khz}[model_name]
    torch.manual_seed(seed)
    ref = ctor(pretrained=False)
    ref.name = model_name
    ref.set_target_bandwidth(bandwidth)
    ref_lm = LMModel(ref.quantizer.n_q, ref.quantizer.bins, num_layers=5, dim=200,
                     past_context=int(3.5 * ref.frame_rate)).eval()
    ref.get_lm_model = lambda: ref_lm
    # The reference decoder builds its model by name (a download); hand it the one above.
    reference_compress.MODELS[model_name] = lambda: ref
    ours = EncodecModel.from_preset(model_name)
    ours.load_state_dict(ref.state_dict())
    ours.prepare_for_inference()
    lm = EntropyLM.for_codec(num_codebooks=ours.num_codebooks, card=ours.codebook_size,
                             frame_rate=ours.frame_rate)
    lm.load_state_dict(ref_lm.state_dict())
    return reference_compress, ref, ours, lm.eval()


def test_audio(channels: int, sample_rate: int, seconds: float, seed: int) -> torch.Tensor:
    """A few drifting tones plus noise: something with structure for the codec."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    wav = sum(0.1 * torch.sin(2 * torch.pi * f * t * (1 + 0.05 * torch.sin(t)))
              for f in (220.0, 330.0, 440.0, 1250.0))
    wav = wav + 0.02 * torch.randn(len(t), generator=gen)
    return wav.expand(channels, -1).contiguous().float()


def best_time(fn, repeats: int):
    """Best wall-clock and best CPU seconds over `repeats` runs, and the last result. On a
    shared machine the CPU time (one thread) is the better estimate of a dedicated core."""
    wall, cpu, result = float("inf"), float("inf"), None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return (wall, cpu), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="encodec_24khz", choices=["encodec_24khz", "encodec_48khz"])
    parser.add_argument("--bandwidth", type=float, default=6.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    reference, ref, ours, lm = build(args.model, args.bandwidth, args.seed)
    wav = test_audio(ours.channels, ours.sample_rate, args.seconds, args.seed)
    duration = wav.shape[-1] / ours.sample_rate
    print(f"{args.model}, {args.bandwidth:g} kbps, {duration:.1f} s of audio, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")
    print("x RT = audio seconds per second; wall clock, and CPU time of this process")
    print(f"{'implementation':<15}{'LM':<4}{'compress s':>11}{'x RT':>6}{'(cpu)':>7}"
          f"{'decompress s':>13}{'x RT':>6}{'(cpu)':>7}{'bytes':>7}{'kbps':>6}  same bytes/audio")
    for use_lm in (False, True):
        with torch.no_grad():
            t_rc, ref_bytes = best_time(lambda: reference.compress(ref, wav, use_lm=use_lm),
                                        args.repeats)
            t_oc, our_bytes = best_time(
                lambda: ecdc.compress(wav, ours.sample_rate, ours, bandwidth=args.bandwidth,
                                      use_lm=use_lm, lm=lm, lm_threads=args.threads),
                args.repeats)
            t_rd, (ref_wav, _) = best_time(lambda: reference.decompress(ref_bytes), args.repeats)
            t_od, (our_wav, _) = best_time(
                lambda: ecdc.decompress(our_bytes, ours, lm=lm, lm_threads=args.threads),
                args.repeats)
        same = our_bytes == ref_bytes
        diff = (our_wav - ref_wav).abs().max().item()
        for label, t_c, t_d, size in (("encodec (ref)", t_rc, t_rd, len(ref_bytes)),
                                      ("tokenwave", t_oc, t_od, len(our_bytes))):
            print(f"{label:<15}{'yes' if use_lm else 'no':<4}{t_c[0]:>11.3f}"
                  f"{duration / t_c[0]:>6.1f}{duration / t_c[1]:>7.1f}{t_d[0]:>13.3f}"
                  f"{duration / t_d[0]:>6.1f}{duration / t_d[1]:>7.1f}{size:>7}"
                  f"{8 * size / duration / 1000:>6.2f}"
                  + (f"  {same} / {diff:.1e}" if label == "tokenwave" else ""))
        print(f"{'speed-up (wall, cpu)':<19}{t_rc[0] / t_oc[0]:>7.2f}x{t_rc[1] / t_oc[1]:>12.2f}x"
              f"{t_rd[0] / t_od[0]:>8.2f}x{t_rd[1] / t_od[1]:>12.2f}x")

if __name__ == "__main__":
    main()
