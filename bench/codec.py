"""Codec speed: tokenwave against the `encodec` package and transformers' EncodecModel.

Every implementation gets the same random weights (codebooks re-drawn so that codes are
non-trivial), the same clip and bandwidth, in one process. Implementations are timed in turns,
round after round, so that they share whatever else the machine is doing; the table gives the
median over rounds as x real time (clip seconds / seconds taken), the ratio of tokenwave to the
fastest reference, whether codes are identical to the reference's and the largest audio error.
The load average before and after is printed: on a shared machine, compare runs with care.
Run from the repo root:

    python -m bench.codec                      # 5 s clips, 2 CPU threads, CUDA too if present
    python -m bench.codec --presets encodec_24khz --repeats 9 --json out.json
    python -m bench.codec --threads 1 --clock cpu   # busy machine: CPU time of one thread

Rows: ``tokenwave`` is ``prepare_for_inference()`` (codes bitwise the reference's, time-major
decoder); ``tokenwave-fast`` is ``prepare_for_inference(exact_codes=False)`` (time-major
encoder too, batched chunks); ``tokenwave-fast-torch`` is the same with tokenwave's fused CPU
kernels off (torch's operations between the convolutions, :mod:`codec.cpu_kernels`).
``--tune-malloc`` makes glibc keep freed memory, for every implementation alike (see
:func:`codec.runners.tune_malloc`).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

try:  # before oracles: transformers chokes on the torchaudio stand-in that encodec needs
    import transformers  # noqa: F401
except ImportError:
    transformers = None

from codec import PRESETS as PRESET_CONFIGS  # noqa: E402
from codec import EncodecModel  # noqa: E402
from codec import cpu_kernels, native  # noqa: E402
from codec.runners import tune_malloc  # noqa: E402
from codec.formats import transformers_key  # noqa: E402
from oracles import import_encodec  # noqa: E402

PRESETS = ("encodec_24khz", "encodec_48khz", "encodec_32khz", "encodec_16khz")
BANDWIDTH = {"encodec_24khz": 6.0, "encodec_48khz": 6.0, "encodec_32khz": 2.2,
             "encodec_16khz": 2.2}


@dataclass
class Runner:
    """One implementation on one preset: ``encode(wav) -> frames``, ``decode(frames) -> wav``,
    and adapters to compare its codes/audio with tokenwave's."""

    name: str
    encode: Callable[[torch.Tensor], object]
    decode: Callable[[object], torch.Tensor]
    codes: Callable[[object], list[torch.Tensor]]
    reference: bool


@dataclass
class Row:
    preset: str
    device: str
    implementation: str
    encode_x: float
    decode_x: float
    encode_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    codes_identical: bool | None = None
    audio_max_err: float | None = None


# -- models -----------------------------------------------------------------------------------
def tokenwave_models(preset: str, seed: int) -> EncodecModel:
    """Our model with random weights and codebooks drawn from N(0, 1)."""
    torch.manual_seed(seed)
    model = EncodecModel.from_preset(preset)
    with torch.no_grad():
        for layer in model.quantizer.vq.layers:
            layer._codebook.embed.normal_()
            layer._codebook.inited.fill_(1.0)
    return model.eval()


def encodec_package_model(preset: str, state: dict, bandwidth: float):
    encodec = import_encodec()
    ctor = {"encodec_24khz": encodec.EncodecModel.encodec_model_24khz,
            "encodec_48khz": encodec.EncodecModel.encodec_model_48khz}.get(preset)
    if ctor is None:
        return None
    model = ctor(pretrained=False)
    model.load_state_dict(state)
    model.set_target_bandwidth(bandwidth)
    return model.eval()


def transformers_config(model: EncodecModel):
    """transformers' EncodecConfig for one of our presets (built offline)."""
    from transformers import EncodecConfig as HFConfig

    cfg = model.config
    return HFConfig(
        target_bandwidths=list(cfg.target_bandwidths), sampling_rate=cfg.sample_rate,
        audio_channels=cfg.channels, normalize=cfg.normalize, chunk_length_s=cfg.segment,
        overlap=cfg.overlap if cfg.segment is not None else None, hidden_size=cfg.dimension,
        num_filters=cfg.n_filters, num_residual_layers=cfg.n_residual_layers,
        upsampling_ratios=list(cfg.ratios), norm_type=cfg.norm, kernel_size=cfg.kernel_size,
        last_kernel_size=cfg.last_kernel_size, residual_kernel_size=cfg.residual_kernel_size,
        dilation_growth_rate=cfg.dilation_base, use_causal_conv=cfg.causal,
        pad_mode=cfg.pad_mode, compress=cfg.compress, num_lstm_layers=cfg.lstm,
        trim_right_ratio=cfg.trim_right_ratio, codebook_size=cfg.codebook_size,
        use_conv_shortcut=not cfg.true_skip)


def transformers_model(model: EncodecModel):
    """transformers' EncodecModel with our weights, or None when transformers is missing."""
    if transformers is None:
        return None
    from transformers import EncodecModel as HFModel

    hf = HFModel(transformers_config(model)).eval()
    expected = set(hf.state_dict())
    state = {}
    for key, value in model.state_dict().items():
        name = transformers_key(key)
        for ours, theirs in ((".weight_g", ".parametrizations.weight.original0"),
                             (".weight_v", ".parametrizations.weight.original1")):
            if name.endswith(ours) and name not in expected:
                name = name[: -len(ours)] + theirs
        state[name] = value
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise RuntimeError(f"transformers key mapping: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    hf.load_state_dict(state)
    return hf


def runners(preset: str, device: str, seed: int, bandwidth: float) -> list[Runner]:
    base = tokenwave_models(preset, seed)
    state = base.state_dict()
    out = []
    for name, exact, kernels in (("tokenwave", True, True), ("tokenwave-fast", False, True),
                                 ("tokenwave-fast-torch", False, False)):
        if name.endswith("-torch") and (device != "cpu" or not cpu_kernels.available()):
            continue
        ours = copy.deepcopy(base).prepare_for_inference(device, exact_codes=exact)

        def encode(w, m=ours, kernels=kernels):
            with native.using(kernels):
                return m.encode(w, bandwidth=bandwidth)

        def decode(f, m=ours, kernels=kernels):
            with native.using(kernels):
                return m.decode(f)

        out.append(Runner(name, encode, decode, lambda f: [frame.codes for frame in f], reference=False))
    ref = encodec_package_model(preset, state, bandwidth)
    if ref is not None:
        ref.to(device)
        out.append(Runner("encodec", ref.encode, ref.decode,
                          lambda f: [codes for codes, _ in f], reference=True))
    hf = transformers_model(base)
    if hf is not None:
        hf.to(device)
        out.append(Runner(
            "transformers",
            lambda w, m=hf: m.encode(w, bandwidth=bandwidth, return_dict=False),
            lambda f, m=hf: m.decode(f[0], f[1], last_frame_pad_length=f[2],
                                     return_dict=False)[0],
            _transformers_codes, reference=True))
    return out


def _transformers_codes(frames) -> list[torch.Tensor]:
    codes, _, pad = frames
    chunks = list(codes)
    if pad:
        chunks[-1] = chunks[-1][..., :-pad]
    return chunks


# -- timing -----------------------------------------------------------------------------------
def test_audio(channels: int, sample_rate: int, seconds: float, seed: int) -> torch.Tensor:
    """``(1, C, T)``: drifting tones plus noise, something with structure for the codec."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    wav = sum(0.1 * torch.sin(2 * torch.pi * f * t * (1 + 0.05 * torch.sin(t)))
              for f in (220.0, 330.0, 440.0, 1250.0))
    wav = wav + 0.02 * torch.randn(channels, len(t), generator=gen)
    return wav[None].float()


def _timed(fn: Callable, arg, device: str, clock: Callable[[], float]) -> tuple[float, object]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = clock()
    out = fn(arg)
    if device == "cuda":
        torch.cuda.synchronize()
    return clock() - start, out


def bench_preset(preset: str, device: str, seconds: float, repeats: int, seed: int,
                 clock: Callable[[], float] = time.perf_counter) -> list[Row]:
    bandwidth = BANDWIDTH[preset]
    impls = runners(preset, device, seed, bandwidth)
    config = PRESET_CONFIGS[preset]
    wav = test_audio(config.channels, config.sample_rate, seconds, seed).to(device)
    times = {impl.name: ([], []) for impl in impls}
    outputs = {}
    with torch.inference_mode():
        for impl in impls:  # warm up, and keep the outputs to compare
            frames = impl.encode(wav)
            outputs[impl.name] = (frames, impl.decode(frames))
        for _ in range(repeats):  # in turns, so that all see the same machine load
            for impl in impls:
                enc_s, frames = _timed(impl.encode, wav, device, clock)
                dec_s, _ = _timed(impl.decode, frames, device, clock)
                times[impl.name][0].append(enc_s)
                times[impl.name][1].append(dec_s)
    length = wav.shape[-1]
    reference = next((impl for impl in impls if impl.reference), impls[0])
    ref_codes = reference.codes(outputs[reference.name][0])
    ref_audio = outputs[reference.name][1][..., :length]
    rows = []
    for impl in impls:
        frames, audio = outputs[impl.name]
        codes = impl.codes(frames)
        identical = len(codes) == len(ref_codes) and all(
            torch.equal(a.cpu(), b.cpu()) for a, b in zip(codes, ref_codes))
        err = (audio[..., :length].float() - ref_audio.float()).abs().max().item()
        enc, dec = times[impl.name]
        rows.append(Row(preset, device, impl.name, seconds / statistics.median(enc),
                        seconds / statistics.median(dec), enc, dec, identical, err))
    return rows


# -- report -----------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    lines = [f"{'preset':<14} {'device':<6} {'implementation':<20} {'encode x':>9} "
             f"{'decode x':>9} {'enc/ref':>8} {'dec/ref':>8}  codes  max|err|"]
    for (preset, device) in dict.fromkeys((r.preset, r.device) for r in rows):
        group = [r for r in rows if (r.preset, r.device) == (preset, device)]
        refs = [r for r in group if r.implementation in ("encodec", "transformers")]
        best_enc = max((r.encode_x for r in refs), default=math.nan)
        best_dec = max((r.decode_x for r in refs), default=math.nan)
        for r in group:
            ratio = ("" if r in refs else
                     f"{r.encode_x / best_enc:8.2f} {r.decode_x / best_dec:8.2f}")
            lines.append(f"{r.preset:<14} {r.device:<6} {r.implementation:<20} "
                         f"{r.encode_x:9.1f} {r.decode_x:9.1f} {ratio:>17}  "
                         f"{'same' if r.codes_identical else 'DIFF':>5}  {r.audio_max_err:.1e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch)")
    parser.add_argument("--devices", nargs="+", default=None,
                        help="default: cpu, and cuda when available")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tune-malloc", action="store_true",
                        help="glibc keeps freed memory (all implementations alike)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this thread's CPU time, blind to other processes on a busy "
                             "machine; needs --threads 1 (worker threads are not counted)")
    parser.add_argument("--json", help="also write the rows (with every timing) here")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu counts the calling thread only: use it with --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    if args.tune_malloc and not tune_malloc():
        print("--tune-malloc: not glibc, ignored", file=sys.stderr)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    load_before = os.getloadavg()
    rows = []
    for device in devices:
        for preset in args.presets:
            if device != "cpu" and args.clock == "cpu":
                continue
            rows += bench_preset(preset, device, args.seconds, args.repeats, args.seed, clock)
            print(table([r for r in rows if r.preset == preset and r.device == device]),
                  file=sys.stderr, flush=True)
    print(f"\n{args.seconds:g} s clips, {args.threads} CPU thread(s), median of {args.repeats} "
          f"rounds, {args.clock} clock; x = real time factor; ratios against the faster "
          f"reference{'; malloc tuned' if args.tune_malloc else ''}")
    load_after = os.getloadavg()
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
          f"torch {torch.__version__}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "torch": torch.__version__,
                       "load_before": load_before, "load_after": load_after,
                       "rows": [asdict(r) for r in rows]}, handle, indent=1)


if __name__ == "__main__":
    main()
