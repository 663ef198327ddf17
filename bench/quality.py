"""Measured quality: the codec against Opus on held-out clips, and a generator's text adherence.

    python -m bench.quality --data runs/train_small/corpus/valid                 # Opus + measures
    python -m bench.quality --data CORPUS/valid --codec runs/train_small/codec/codec \\
        --generator runs/train_small/lm/model --json quality.json

**Codec** (``--codec``: a name, a path or ``random:<preset>``): each of the first ``--clips`` clips
of ``--data`` goes through the codec at each bandwidth it was trained for (``--codebooks`` to
choose) and through Opus at 6 kbps and at the codec's full bitrate (``--opus-kbps`` to choose),
all scored against the original at the codec's sample rate with the codec trainer's validation
metrics: mel distance (mean |log10 mel| difference, lower is better), SI-SNR (dB) and, when the
``visqol-python`` package imports, ViSQOL MOS-LQO (audio mode, 48 kHz; on the first
``--visqol-clips`` clips only: it takes ~10 s per 10 s clip on one core). Without ``--codec``
the Opus rows run alone at the clips' own rate.

Opus (libopus through the ``opuslib`` package) is fed 48 kHz audio (soxr, as for every
resampling here): at 48 kHz the encoder chooses its coded audio bandwidth from the bitrate as it
does in real use (narrow/wideband SILK at 6 kbps, fullband CELT at 24+ kbps), whereas 16 kHz input
would cap it at 8 kHz of audio at any bitrate. Bitrate is hard CBR (VBR off) with 20 ms frames, so
every packet has the size the bitrate allows, as a codec emitting a fixed number of codes per
frame does; the table also gives the bitrate measured from packet sizes (no container overhead),
which differs where Opus cannot go as low as asked (a packet has a whole number of bytes, 6 at the
least here). The decoder's output lags the input by the encoder's lookahead (312 samples at 48
kHz in libopus 1.3: 2.5 ms of CELT overlap + 4 ms of delay compensation); it is dropped exactly,
so that sample ``n`` out is sample ``n`` in (checked by tests/test_quality.py). That holds exactly
for CELT (fullband, 24+ kbps here); in SILK modes (6 and 12 kbps) libopus's fixed compensation
leaves the decoded waveform 1-3 samples (at 32 kHz) off, the phase of SILK's own resamplers. It
is left as Opus delivers it: a search for the best lag would favour Opus over the codec, and
SI-SNR at those rates is near or below 0 dB with or without it (about 2 dB apart on the corpus).

**Text adherence** (:mod:`bench.adherence`): the instrument-family classifier, the tempo reader
(both trained on the train split ``--train``, default beside ``--data``) and the mode estimator
are validated on the corpus and, with ``--generator``, applied to generations of prompts that vary
one attribute at a time.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from codec import audio as audio_io
from codec.model import EncodecModel
from codec.training.buzz import buzz_db
from codec.training.losses import MelDistance, si_snr

OPUS_RATE = 48_000
OPUS_FRAME_MS = (2.5, 5.0, 10.0, 20.0, 40.0, 60.0)
OPUS_BANDWIDTHS = {1101: "NB", 1102: "MB", 1103: "WB", 1104: "SWB", 1105: "FB"}  # 4 / 6 / 8 / 12 / 20 kHz


# -- Opus -----------------------------------------------------------------------------------------
def _opuslib():
    try:
        import opuslib
    except Exception as error:  # ImportError, or opuslib's bare Exception when libopus is missing
        raise RuntimeError(f"Opus needs the opuslib package and libopus (pip install opuslib; "
                           f"apt-get install libopus0): {error}") from None
    return opuslib


def opus_available() -> bool:
    """Whether ``opuslib`` imports and finds libopus."""
    try:
        _opuslib()
    except RuntimeError:
        return False
    return True


def opus_roundtrip(wav: torch.Tensor, sample_rate: int, *, kbps: float, frame_ms: float = 20.0,
                   application: str = "audio") -> tuple[torch.Tensor, float, str]:
    """Encode and decode ``(C, T)`` audio (C 1 or 2) with Opus at ``kbps``, hard CBR, at 48 kHz.

    Returns ``(decoded (C, T) at sample_rate, measured kbps, coded audio bandwidth)``; sample
    ``n`` of the output is aligned with sample ``n`` of the input (the lookahead is removed).
    """
    if wav.dim() != 2 or wav.shape[0] not in (1, 2):
        raise ValueError(f"Opus takes (channels, samples) audio with 1 or 2 channels, got {tuple(wav.shape)}")
    if frame_ms not in OPUS_FRAME_MS:
        raise ValueError(f"Opus frames are {', '.join(f'{f:g}' for f in OPUS_FRAME_MS)} ms, got {frame_ms}")
    if not 0.5 <= kbps <= 512:
        raise ValueError(f"Opus bitrates lie between 0.5 and 512 kbps, got {kbps}")
    opuslib = _opuslib()
    channels, length = wav.shape
    pcm = audio_io.resample(wav.float(), sample_rate, OPUS_RATE)
    encoder = opuslib.Encoder(OPUS_RATE, channels, application)
    encoder.bitrate = round(kbps * 1000)
    encoder.vbr = 0
    decoder = opuslib.Decoder(OPUS_RATE, channels)
    delay = int(encoder.lookahead)
    frame = round(OPUS_RATE * frame_ms / 1000)
    # Zeros after the end flush the lookahead: the last input sample leaves the decoder `delay` later.
    frames = math.ceil((pcm.shape[1] + delay) / frame)
    padded = torch.nn.functional.pad(pcm, (0, frames * frame - pcm.shape[1]))
    interleaved = padded.T.contiguous().numpy()  # (samples, channels): Opus's layout
    decoded, sizes, bands = [], 0, Counter()
    for i in range(frames):
        packet = encoder.encode_float(interleaved[i * frame:(i + 1) * frame].tobytes(), frame)
        sizes += len(packet)
        out = decoder.decode_float(packet, frame)
        decoded.append(torch.frombuffer(bytearray(out), dtype=torch.float32).view(frame, channels))
        bands[OPUS_BANDWIDTHS.get(int(decoder.bandwidth), "?")] += 1
    aligned = torch.cat(decoded).T[:, delay:delay + pcm.shape[1]]
    back = audio_io.resample(aligned, OPUS_RATE, sample_rate)
    back = torch.nn.functional.pad(back, (0, max(0, length - back.shape[1])))[:, :length]
    measured = sizes * 8 / (frames * frame / OPUS_RATE) / 1000
    return back, measured, bands.most_common(1)[0][0]


# -- metrics --------------------------------------------------------------------------------------
def visqol_available() -> bool:
    try:
        import visqol  # noqa: F401
    except ImportError:
        return False
    return True


class Scorer:
    """Mel distance and SI-SNR (and ViSQOL on request) of decoded ``(C, T)`` audio against the
    original, both at ``sample_rate``: the codec trainer's validation metrics; with ``buzz_rate``,
    the buzz at multiples of that frame rate (:func:`codec.training.buzz.buzz_db`)."""

    def __init__(self, sample_rate: int, buzz_rate: float | None = None) -> None:
        self.sample_rate = sample_rate
        self.mel = MelDistance(sample_rate)
        self.buzz_rate = buzz_rate

    def __call__(self, reference: torch.Tensor, decoded: torch.Tensor, *, visqol: bool = False) -> dict:
        ref, out = reference[None].float(), decoded[None].float()
        with torch.no_grad():
            scores = {"mel_distance": float(self.mel(out, ref)[0]), "si_snr": float(si_snr(out, ref)[0])}
            if self.buzz_rate:
                scores["buzz_db"] = buzz_db(reference, decoded, self.sample_rate, self.buzz_rate)
        if visqol:
            from codec.training.validate import visqol_score

            scores["visqol"] = visqol_score(reference, decoded, self.sample_rate)
        return scores


def default_codebooks(model: EncodecModel) -> list[int]:
    """The codebook counts of the bandwidths the codec was trained for (as its trainer picks
    them), and all of its codebooks."""
    from codec.training.loop import codebook_choices

    return sorted(set(codebook_choices(model)) | {model.num_codebooks})


def _codec_roundtrip(model: EncodecModel, num_codebooks: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(wav: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            frames = model.encode(wav[None], num_codebooks=num_codebooks)
            return model.decode(frames)[0, :, : wav.shape[-1]].float()
    return run


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def codec_quality(clips: Sequence[torch.Tensor], sample_rate: int, *, model: EncodecModel | None = None,
                  codebooks: Sequence[int] | None = None, opus_kbps: Sequence[float] | None = None,
                  opus_frame_ms: float = 20.0, visqol_clips: int = 0, with_opus: bool = True,
                  log: Callable[[str], None] = lambda _: None) -> list[dict]:
    """Score the codec (when given) and Opus on clips ``(C, T)`` at ``sample_rate``.

    With a model, clips are first converted to its rate and channels; ``codebooks`` defaults to
    :func:`default_codebooks` and ``opus_kbps`` to 6 kbps and the codec's full bitrate. Opus
    rows are left out when libopus is not installed. Returns one dict per system with
    ``system``, ``kbps``, ``measured_kbps``, ``mel_distance``, ``si_snr``, ``buzz_db`` (at the codec's
    frame rate, else Opus's), ``visqol`` (None when not measured), ``visqol_clips``, ``clips`` and
    ``per_clip`` (the per-clip scores). ``with_opus=False`` leaves the Opus rows out.
    """
    if not clips:
        raise ValueError("no clips to score")
    if model is not None:
        clips = [audio_io.convert_audio(c.float(), sample_rate, model.sample_rate, model.channels) for c in clips]
        sample_rate = model.sample_rate
        counts = list(codebooks) if codebooks else default_codebooks(model)
        full = model.num_codebooks * model.bandwidth_per_codebook
        opus_kbps = list(opus_kbps) if opus_kbps else sorted({6.0, round(full, 3)})
    else:
        counts = []
        opus_kbps = list(opus_kbps) if opus_kbps else [6.0]
    scorer = Scorer(sample_rate, buzz_rate=model.frame_rate if model is not None else 1000 / opus_frame_ms)
    if visqol_clips and not visqol_available():
        log("ViSQOL: visqol-python is not installed, reported as n/a")
        visqol_clips = 0
    systems: list[tuple[str, float, Callable]] = []
    for n in counts:
        run = _codec_roundtrip(model, model.resolve_codebooks(n))
        systems.append((f"{model.name} ({n} codebook{'s' if n > 1 else ''})", n * model.bandwidth_per_codebook,
                        lambda wav, run=run: (run(wav), None, "")))
    if not with_opus:
        pass
    elif opus_available():
        for kbps in opus_kbps:
            systems.append((f"opus {kbps:g} kbps", kbps, lambda wav, kbps=kbps: opus_roundtrip(
                wav, sample_rate, kbps=kbps, frame_ms=opus_frame_ms)))
    else:
        log("Opus: opuslib/libopus not found, Opus rows left out (pip install opuslib; apt-get install libopus0)")
    rows = []
    for name, kbps, roundtrip in systems:
        started = time.perf_counter()
        per_clip, measured, bands = [], [], Counter()
        for index, clip in enumerate(clips):
            decoded, rate, band = roundtrip(clip)
            per_clip.append(scorer(clip, decoded, visqol=index < visqol_clips))
            measured.append(kbps if rate is None else rate)
            bands[band] += 1
        row = {"system": name + (f" ({bands.most_common(1)[0][0]})" if bands.most_common(1)[0][0] else ""),
               "kbps": kbps, "measured_kbps": statistics.fmean(measured), "clips": len(clips),
               "mel_distance": statistics.fmean(s["mel_distance"] for s in per_clip),
               "si_snr": statistics.fmean(s["si_snr"] for s in per_clip),
               "buzz_db": statistics.fmean(s["buzz_db"] for s in per_clip),
               "visqol": _mean([s.get("visqol") for s in per_clip]), "visqol_clips": min(visqol_clips, len(clips)),
               "per_clip": per_clip}
        rows.append(row)
        log(f"{row['system']}: {time.perf_counter() - started:.1f} s")
    return rows


def quality_table(rows: Sequence[dict]) -> str:
    """A markdown table of :func:`codec_quality` rows."""
    lines = ["| system | kbps | measured kbps | mel distance | SI-SNR (dB) | frame-rate buzz (dB) | ViSQOL | clips |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        visqol = "n/a" if r["visqol"] is None else f"{r['visqol']:.2f} ({r['visqol_clips']} clips)"
        lines.append(f"| {r['system']} | {r['kbps']:.2f} | {r['measured_kbps']:.2f} | {r['mel_distance']:.3f} | "
                     f"{r['si_snr']:.2f} | {r['buzz_db']:.2f} | {visqol} | {r['clips']} |")
    return "\n".join(lines)


# -- the command ----------------------------------------------------------------------------------
def load_clips(folder: str | Path, count: int | None) -> tuple[list[torch.Tensor], int, list[str]]:
    """The first ``count`` ``.wav`` files of ``folder`` (sorted) as ``(C, T)``; one shared rate."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--data {folder}: no such folder (expected a corpus split such as CORPUS/valid)")
    paths = sorted(folder.glob("*.wav"))[:count]
    if not paths:
        raise FileNotFoundError(f"--data {folder}: no .wav files")
    clips, rates = [], set()
    for path in paths:
        wav, rate = audio_io.read_audio(path)
        clips.append(wav)
        rates.add(rate)
    if len(rates) > 1:
        raise ValueError(f"--data {folder}: clips at several sample rates {sorted(rates)}; expected one")
    return clips, rates.pop(), [p.name for p in paths]


def _numbers(text: str, kind: type) -> list:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="runs/train_small/corpus/valid",
                        help="held-out corpus split (default: train_small.sh's, %(default)s)")
    parser.add_argument("--train", default=None, help="corpus train split for the classifier (default: DATA/../train)")
    parser.add_argument("--codec", action="append", default=None,
                        help="codec name, folder or random:<preset>; a generator folder's codec is FOLDER/codec "
                             "(default: Opus only); repeatable: each codec is scored on the same clips, Opus "
                             "rows at the first one's rate")
    parser.add_argument("--generator", default=None, help="generator name or folder (default: measures only)")
    parser.add_argument("--clips", type=int, default=8, help="held-out clips for codec quality (default 8)")
    parser.add_argument("--codebooks", type=lambda t: _numbers(t, int), default=None,
                        help="codebook counts to score, e.g. 1,2,4 (default: the trained bandwidths and all)")
    parser.add_argument("--opus-kbps", type=lambda t: _numbers(t, float), default=None,
                        help="Opus bitrates (default: 6 and the codec's full bitrate)")
    parser.add_argument("--opus-frame-ms", type=float, default=20.0, help="Opus frame length (default 20)")
    parser.add_argument("--visqol-clips", type=int, default=2,
                        help="clips per system scored by ViSQOL (default 2; 0 off)")
    parser.add_argument("--no-adherence", action="store_true", help="skip the measures and the generator")
    parser.add_argument("--train-clips", type=int, default=None, help="train clips for the classifier (default all)")
    parser.add_argument("--min-family-clips", type=int, default=10,
                        help="leave out families featured in fewer train clips (default 10)")
    parser.add_argument("--codec-classifier", action="store_true",
                        help="also train a family classifier on codec round trips of the train clips and "
                             "report how it reads the generations (a diagnostic next to the real-clip one)")
    parser.add_argument("--no-tempo-reader", action="store_true",
                        help="read tempo with the autocorrelation estimator only (the measure before the "
                             "reader trained on the corpus's train clips)")
    parser.add_argument("--per-prompt", type=int, default=2, help="generations per prompt (default 2)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per generation (default 8)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per generate() call (default 8)")
    parser.add_argument("--tempos", type=lambda t: _numbers(t, int), default=[70, 100, 140],
                        help="prompted tempos (default 70,100,140)")
    parser.add_argument("--continuation", type=int, default=0, metavar="PER_FAMILY",
                        help="also continue this many held-out clips per family from their first seconds and "
                             "read the family after the prompt, beside their codec round trips (default 0: off)")
    parser.add_argument("--continuation-prompt", type=float, default=2.0,
                        help="seconds of each clip given as the continuation's prompt (default 2)")
    parser.add_argument("--continuation-seconds", type=float, default=10.0,
                        help="continue each clip to this length; shorter clips are left out (default 10)")
    parser.add_argument("--cfg-coef", type=float, default=None,
                        help="classifier-free guidance (default: the generator's own, 3 for MusicGen)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write every number (per clip too) to this file")
    return parser


def _json_ready(value):
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def _log(text: str) -> None:
    print(f"[quality] {text}", file=sys.stderr, flush=True)


def _codec_section(args, report: dict) -> None:
    from codec.pretrained import load_codec, model_label

    clips, rate, names = load_clips(args.data, args.clips)
    models = [load_codec(name, torch.device(args.device)) for name in args.codec or []]
    model = models[0] if models else None
    if models:
        report["codec"] = ", ".join(model_label(m) for m in models)
    _log(f"codec quality on {len(clips)} clips of {args.data}")
    rows = []
    for index, each in enumerate(models or [None]):
        rows += codec_quality(clips, rate, model=each, codebooks=args.codebooks, opus_kbps=args.opus_kbps,
                              opus_frame_ms=args.opus_frame_ms, visqol_clips=args.visqol_clips,
                              with_opus=index == len(models or [None]) - 1, log=_log)
    report["codec_quality"] = {"clips": names, "rows": rows}
    print(f"## Codec quality ({report.get('codec', 'no codec')}; {len(clips)} clip{'s' * (len(clips) > 1)} "
          f"of {args.data}, scored at {model.sample_rate if model else rate} Hz)\n")
    print(quality_table(rows) + "\n")


def codec_roundtrip(codec):
    """``(audio (C, T), rate) -> mono analysis-rate audio`` through ``codec``'s encode and decode:
    how the adherence measures read the real clips' own codes (the ceiling of a generator)."""
    from bench import adherence

    def roundtrip(wav: torch.Tensor, rate: int) -> torch.Tensor:
        x = audio_io.convert_audio(wav.float(), rate, codec.sample_rate, codec.channels)  # (C, T)
        device = next(codec.parameters()).device
        with torch.inference_mode():
            y = codec.decode(codec.encode(x[None].to(device)))[0, :, : x.shape[-1]]
        return adherence.as_analysis_audio(y.cpu(), codec.sample_rate)

    return roundtrip


def _adherence_section(args, report: dict) -> None:
    from bench import adherence

    settings = adherence.AdherenceSettings(
        train_clips=args.train_clips, min_family_clips=args.min_family_clips, per_prompt=args.per_prompt,
        batch=args.batch, seed=args.seed, tempos=tuple(args.tempos), codec_classifier=args.codec_classifier,
        tempo_reader=not args.no_tempo_reader, continuation=args.continuation,
        continuation_prompt=args.continuation_prompt, continuation_seconds=args.continuation_seconds)
    generate = roundtrip = continue_fn = None
    if args.continuation and not args.generator:
        raise ValueError("--continuation continues clips with a generator's LM: give --generator MODEL too")
    if args.generator:
        from inference import MusicGen

        generator = MusicGen.from_pretrained(args.generator, device=args.device)
        guidance = {} if args.cfg_coef is None else {"cfg_coef": args.cfg_coef}
        generate = adherence.musicgen_generate_fn(generator, args.duration, **guidance)
        roundtrip = codec_roundtrip(generator.codec)
        if args.continuation:
            from bench.continuation import musicgen_continue_fn

            continue_fn = musicgen_continue_fn(generator, settings.continuation_seconds, **guidance)
        report["generator"] = args.generator
        report["cfg_coef"] = generator.default_sampling.cfg_coef if args.cfg_coef is None else args.cfg_coef
    train = args.train or str(Path(args.data).parent / "train")
    result = adherence.run_adherence(train, args.data, generate, settings, log=_log, roundtrip=roundtrip,
                                     continue_fn=continue_fn)
    report["adherence"] = result
    guided = f", guidance {report['cfg_coef']:g}" if args.generator else ""
    print(f"## Text adherence ({args.generator or 'no generator: measures only'}{guided})\n")
    print(adherence.adherence_tables(result) + "\n")


def main(argv: list[str] | None = None) -> int:
    from inference.cli import CliError

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict = {"data": str(args.data)}
    try:
        _codec_section(args, report)
        if not args.no_adherence:
            _adherence_section(args, report)
    except (CliError, FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.json:
        Path(args.json).write_text(json.dumps(_json_ready(report), indent=1))
        _log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
