"""LM generation speed: tokenwave (static-cache decoder, CUDA graph) vs transformers' MusicGen, same weights.

MusicGen-small- and -medium-sized decoders (small: dim 1024, 24 layers, 16 heads; medium: dim
1536, 48 layers, 24 heads; 4 codebooks of 2048) with random weights, cross-attention to a
random projected condition, classifier-free guidance on (twice the rows), top-k 250 sampling.
In one run, per size and batch:

- ``transformers``: ``MusicgenForCausalLM.generate`` with a dynamic cache; ``tf-static``: with a
  ``StaticCache``; on CUDA ``tf-compile``: static cache with transformers' own ``torch.compile``
  of the forward (``--no-compile`` skips it; a failure is reported, not fatal);
- ``tw``: ``LMModel.generate(fast=False)`` (:mod:`lm.static_decoder`, each step attending over the
  cache written so far); ``tw-graph``: ``fast=True`` (the same step with static shapes over the
  whole cache, captured in a CUDA graph on CUDA, uncaptured on CPU; the capture is
  part of every timed call); on CPU also ``tw-bf16w`` (bfloat16 matrix weights, float32
  activations), ``tw-int8`` and ``tw-int4`` (weight-only int8 / int4 matrices, groups of 32, :mod:`lm.quant`;
  ``--no-quant`` skips them), each with its logit error against float32; int4 runs on
  tokenwave's kernel (:mod:`lm.cpu_kernels`) where it runs, and then ``tw-int4-torch`` is the same
  model on torch's ``_weight_int4pack_mm_for_cpu``;
- ``first audio``: for tokenwave, the time from ``MusicGen.generate_stream`` to its first audio
  chunk (``--first-chunk-frames`` frames through a random full-size 32 kHz EnCodec decoder;
  the text encoder is a lookup table, so T5 time is not included).

Then the codec: decoding speed of the random 32 kHz EnCodec, offline and streamed
(``--chunk-frames`` per push), in times real time.

    python -m bench.generate --threads 2 --sizes small --layers 4 --steps 24 --batch 1 2   # CPU smoke
    python -m bench.generate --device cuda --sizes small medium --batch 1 4 16 --steps 256

CPU comparison of fp32 / bf16-weights / int8 / int4 with transformers, MusicGen-small-sized
(about 5 minutes on 2 cores), then medium-sized quantized rows only (the float32 and
transformers models are still built: about 14 GB of memory):

    python -m bench.generate --threads 2 --sizes small --batch 1 4 --steps 24 --repeats 3
    python -m bench.generate --threads 2 --sizes medium --batch 1 --steps 16 --repeats 3 --impls tw-int8 tw-int4

``--impls`` keeps the named implementations only. The peak RSS printed at the end is the
process's (the float32 source model included); what loading one format costs is
``bench/load_memory.py``'s.

Timings on a shared machine are noisy: implementations run in interleaved rounds and the
median round counts; compare numbers from one run only.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import resource
import statistics
import time
from collections.abc import Callable

import torch

from inference.formats.transformers import transformers_to_audiocraft_lm
from lm import LMConfig, LMModel, cpu_kernels
from lm.quant import quantize_lm, quantize_state, stored_bytes

SIZES = {
    "small": dict(dim=1024, num_heads=16, num_layers=24, ffn_dim=4096),
    "medium": dict(dim=1536, num_heads=24, num_layers=48, ffn_dim=6144),
}
CODEBOOKS, CARD = 4, 2048


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_models(size: str, layers: int | None, device: torch.device, dtype: torch.dtype):
    """transformers' MusicgenForCausalLM and our LMModel holding the same random weights."""
    import transformers  # noqa: PLC0415 -- only the benchmark needs it

    s = dict(SIZES[size], num_codebooks=CODEBOOKS, card=CARD)
    if layers:
        s["num_layers"] = layers
    config = transformers.MusicgenDecoderConfig(
        vocab_size=CARD, hidden_size=s["dim"], num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"], ffn_dim=s["ffn_dim"], num_codebooks=CODEBOOKS,
        pad_token_id=CARD, bos_token_id=CARD, max_position_embeddings=4096, dropout=0.0)
    reference = transformers.MusicgenForCausalLM(config).eval()
    ours = LMModel(LMConfig(**s)).eval()
    ours.load_state_dict(transformers_to_audiocraft_lm(reference.state_dict()))
    return reference.to(device, dtype), ours.to(device, dtype)


def make_condition(batch: int, dim: int, device: torch.device, dtype: torch.dtype, length: int = 20):
    """Rows [conditional; unconditional]: random text-like states, then the null condition."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[:, length // 2:] = torch.rand(batch, length - length // 2, generator=gen) > 0.5
    condition = torch.randn(batch, length, dim, generator=gen) * mask[..., None]
    condition = torch.cat([condition, torch.zeros_like(condition)]).to(device, dtype)
    return condition, torch.cat([mask, torch.zeros_like(mask)]).to(device)


# -- runners: each returns seconds for `steps` pattern steps -------------------------------------------

def reference_runner(reference, cache: str, max_len: int) -> Callable:
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache, StaticCache  # noqa: PLC0415

    statics: dict[int, StaticCache] = {}  # one per batch size, reset between runs (compiled code keeps it)
    # transformers 5.x names the generate/forward argument ``cache``; 4.x named it ``past_key_values``.
    cache_arg = "cache" if "cache" in inspect.signature(reference.forward).parameters else "past_key_values"

    def run(batch: int, steps: int, condition, mask) -> float:
        device = reference.device
        bos = torch.full((batch * CODEBOOKS, 1), CARD, device=device)
        if cache == "dynamic":
            self_cache = DynamicCache()
        else:
            if batch not in statics:
                statics[batch] = StaticCache(config=reference.config, max_cache_len=max_len)
            self_cache = statics[batch]
            with torch.inference_mode():
                self_cache.reset()
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            # An encoder-decoder cache and an explicit decoder mask: transformers' CausalLM generate
            # would otherwise build a decoder-only cache (and fail) and mask the BOS column.
            reference.generate(bos, attention_mask=torch.ones_like(bos), encoder_hidden_states=condition,
                               encoder_attention_mask=mask, guidance_scale=3.0, do_sample=True, top_k=250,
                               decoder_start_token_id=CARD, num_return_sequences=1, max_new_tokens=steps,
                               disable_compile=cache != "compile",
                               **{cache_arg: EncoderDecoderCache(self_cache, DynamicCache())})
        sync(device)
        return time.perf_counter() - start

    return run


def ours_runner(model: LMModel, fast: bool) -> Callable:
    def run(batch: int, steps: int, condition, mask) -> float:
        device = model.emb[0].weight.device
        frames = steps - (model.num_codebooks - 1)  # the delay pattern adds K-1 steps
        sync(device)
        start = time.perf_counter()
        model.generate(max_gen_len=frames, num_samples=batch, condition=condition, condition_mask=mask,
                       top_k=250, cfg_coef=3.0, fast=fast)
        sync(device)
        return time.perf_counter() - start

    return run


def torch_kernel(run: Callable) -> Callable:
    """``run`` with int4 products on torch's kernel instead of :mod:`lm.cpu_kernels`'s."""
    def wrapped(*args) -> float:
        with cpu_kernels.using(False):
            return run(*args)

    return wrapped


def build_generator(lm: LMModel, device: torch.device):
    """A MusicGen around ``lm``: a lookup-table text conditioner and a random full-size 32 kHz codec."""
    from conditioning import ConditionProvider, LUTConditioner  # noqa: PLC0415
    from codec.pretrained import random_model  # noqa: PLC0415
    from inference.generator import GeneratorConfig, MusicGen  # noqa: PLC0415

    text = LUTConditioner(vocab=["calm", "piano"], dim=32, output_dim=lm.config.dim)
    return MusicGen(lm=lm, codec=random_model("encodec_32khz"), condition_provider=ConditionProvider(
        {"description": text}), config=GeneratorConfig(max_duration=30.0, extend_stride=18.0)).to(device)


def first_audio(generator, batch: int, steps: int, first_chunk_frames: int, fast: bool) -> float:
    """Seconds from the call to the first audio chunk of ``generate_stream``."""
    device = generator.device
    duration = (steps - CODEBOOKS + 1) / generator.frame_rate
    sync(device)
    start = time.perf_counter()
    stream = generator.generate_stream(["calm piano"] * batch, duration, first_chunk_frames=first_chunk_frames,
                                       top_k=250, cfg_coef=3.0, fast=fast, seed=0)
    chunk = next(stream)
    sync(device)
    elapsed = time.perf_counter() - start
    stream.close()
    assert chunk.shape[0] == batch
    return elapsed


def quantized_copy(model: LMModel, spec: str) -> LMModel:
    """``model`` with int8/int4 matrices, built without a second float copy (meta + assign)."""
    with torch.device("meta"):
        quantized = LMModel(model.config)
    quantize_lm(quantized, spec)
    quantized.load_state_dict(quantize_state(dict(model.state_dict()), quantized.quantization), assign=True)
    return quantized.eval()


def accuracy(model: LMModel, low: LMModel, condition, mask, length: int = 48) -> dict:
    """Teacher-forced logits of a low-precision variant against float32 on one random sequence."""
    gen = torch.Generator().manual_seed(1)
    sequence = torch.randint(0, CARD, (condition.shape[0], CODEBOOKS, length), generator=gen)
    with torch.inference_mode():
        ref = model(sequence, condition=condition, condition_mask=mask).float()
        got = low(sequence, condition=condition, condition_mask=mask).float()
    err = (got - ref).abs()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean()
    return {"max_abs_err": err.max().item(), "logit_std": ref.std().item(),
            "rel_rms_err": (err.pow(2).mean().sqrt() / ref.std()).item(),
            "kl_nats": kl.item(), "top1_agree": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def codec_speed(device: torch.device, seconds: float, chunk_frames: int, repeats: int) -> None:
    """Decode ``seconds`` of random codes with the random 32 kHz codec, offline and streamed."""
    from codec.pretrained import random_model  # noqa: PLC0415
    from inference.generator import CodecStream  # noqa: PLC0415

    codec = random_model("encodec_32khz").to(device)
    frames = int(seconds * codec.frame_rate)
    codes = torch.randint(0, codec.codebook_size, (1, codec.num_codebooks, frames), device=device)

    def offline() -> float:
        sync(device)
        start = time.perf_counter()
        codec.decode(codes)
        sync(device)
        return time.perf_counter() - start

    def streamed() -> float:
        stream = CodecStream(codec)
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            for piece in codes.split(chunk_frames, dim=-1):
                stream.push(piece)
            stream.flush()
        sync(device)
        return time.perf_counter() - start

    offline(), streamed()  # warm-up
    best = [min(run() for _ in range(repeats)) for run in (offline, streamed)]
    print(f"\ncodec: random encodec_32khz decoder, {seconds:g} s of codes ({frames} frames), best of {repeats}")
    print(f"  offline decode     {1000 * best[0]:9.1f} ms  {seconds / best[0]:8.1f}x real time")
    print(f"  streamed, {chunk_frames:>3} fr  {1000 * best[1]:9.1f} ms  {seconds / best[1]:8.1f}x real time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="LM dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=None,
                        help="default: small and medium on CUDA, small on CPU")
    parser.add_argument("--layers", type=int, help="fewer layers than the size has, for a quick smoke run")
    parser.add_argument("--steps", type=int, help="pattern steps per run (default 256 on CUDA, 24 on CPU)")
    parser.add_argument("--batch", type=int, nargs="+", help="default 1 4 16 on CUDA, 1 4 on CPU")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best is kept")
    parser.add_argument("--first-chunk-frames", type=int, default=10, help="frames of the first streamed chunk")
    parser.add_argument("--chunk-frames", type=int, default=25, help="frames per push in the codec benchmark")
    parser.add_argument("--codec-seconds", type=float, default=10.0)
    parser.add_argument("--no-compile", action="store_true", help="skip transformers + torch.compile (CUDA)")
    parser.add_argument("--no-reference", action="store_true", help="skip transformers altogether")
    parser.add_argument("--no-bf16", action="store_true", help="CPU: skip the bfloat16-weights variant")
    parser.add_argument("--no-quant", action="store_true", help="CPU: skip the int8 / int4 variants")
    parser.add_argument("--int4", default="int4", help="the int4 variant (int4 = int4-g32, int4-g64, int4-g128)")
    parser.add_argument("--impls", nargs="+", help="run only these implementations (e.g. tw-int8 tw-int4)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    sizes = args.sizes or (["small", "medium"] if cuda else ["small"])
    steps = args.steps or (256 if cuda else 24)
    batches = args.batch or ([1, 4, 16] if cuda else [1, 4])
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"

    print(f"{where}; {dtype}; CFG on, top-k 250; {steps} steps per run; median of {args.repeats}; "
          f"first audio after {args.first_chunk_frames} frames")
    print(f"{'size':<10}{'impl':<13}{'batch':>6}{'rows':>6}{'ms/step':>10}{'steps/s':>9}{'vs tf':>8}"
          f"{'first audio':>13}")
    for size in sizes:
        reference, ours = build_models(size, args.layers, device, dtype)
        runners: list[tuple[str, Callable]] = []
        if not args.no_reference:
            runners.append(("transformers", reference_runner(reference, "dynamic", steps + 8)))
            runners.append(("tf-static", reference_runner(reference, "static", steps + 8)))
            if cuda and not args.no_compile:
                runners.append(("tf-compile", reference_runner(copy.deepcopy(reference), "compile", steps + 8)))
        runners += [("tw", ours_runner(ours, fast=False)), ("tw-graph", ours_runner(ours, fast=True))]
        low = None
        variants: dict[str, LMModel] = {}  # CPU weight formats, for first audio and accuracy
        if not cuda and not args.no_bf16 and dtype == torch.float32 and _wanted("tw-bf16w", args.impls):
            low = variants["tw-bf16w"] = copy.deepcopy(ours).low_precision_weights(torch.bfloat16)
        if not cuda and not args.no_quant and dtype == torch.float32:
            for name, spec in (("tw-int8", "int8"), ("tw-int4", args.int4)):
                if _wanted(name, args.impls):
                    variants[name] = quantized_copy(ours, spec)
        runners += [(name, ours_runner(model, fast=False)) for name, model in variants.items()]
        if "tw-int4" in variants and cpu_kernels.available() and _wanted("tw-int4-torch", args.impls):
            runners.append(("tw-int4-torch", torch_kernel(ours_runner(variants["tw-int4"], fast=False))))
        if args.impls:
            runners = [(name, run) for name, run in runners if name in args.impls]
        generator = build_generator(ours, device)
        label = size if not args.layers else f"{size}/{args.layers}L"
        for batch in batches:
            condition, mask = make_condition(batch, ours.config.dim, device, dtype)
            alive = []
            for name, run in runners:  # warm-up (compiles); a failing implementation is reported and dropped
                try:
                    run(batch, 8, condition, mask)
                    alive.append((name, run))
                except Exception as error:  # noqa: BLE001 -- report and go on
                    print(f"{label:<10}{name:<13}{batch:>6}  failed: {type(error).__name__}: "
                          f"{' '.join(str(error).split())[:120]}")
            times: dict[str, list[float]] = {name: [] for name, _ in alive}
            for _ in range(args.repeats):  # rounds interleave the implementations: they share the load
                for name, run in alive:
                    times[name].append(run(batch, steps, condition, mask))
            best = {name: statistics.median(values) for name, values in times.items()}
            ttfa = {}
            firsts = [("tw", ours, False), ("tw-graph", ours, True)]
            firsts += [(name, model, False) for name, model in variants.items()]
            for name, model, fast in firsts:
                if name not in best:
                    continue
                generator.lm = model
                first_audio(generator, batch, 2 * args.first_chunk_frames, args.first_chunk_frames, fast)  # warm-up
                ttfa[name] = statistics.median(first_audio(generator, batch, steps, args.first_chunk_frames, fast)
                                               for _ in range(args.repeats))
            generator.lm = ours
            base = steps / best["transformers"] if "transformers" in best else None
            for name, elapsed in best.items():
                rate = steps / elapsed
                versus = f"{rate / base:7.2f}x" if base else f"{'-':>8}"
                first = f"{1000 * ttfa[name]:10.0f} ms" if name in ttfa else f"{'-':>13}"
                print(f"{label:<10}{name:<13}{batch:>6}{2 * batch:>6}{1000 / rate:>10.1f}{rate:>9.2f}{versus}{first}")
        for name, model in variants.items():
            condition, mask = make_condition(1, ours.config.dim, device, dtype)
            acc = accuracy(ours, model, condition, mask)
            weights = stored_bytes(model) / 1e6
            print(f"{label} {name} vs float32 (teacher-forced logits, 48 steps): "
                  + ", ".join(f"{k} {v:.4g}" for k, v in acc.items()) + f"; LM weights {weights:.0f} MB")
        del reference, ours, low, variants, generator, runners
        if cuda:
            torch.cuda.empty_cache()
    print(f"\npeak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
          f"(the float32 source model and every variant above; the loading "
          f"footprint of one format: python -m bench.load_memory)")
    if not args.impls:
        codec_speed(device, args.codec_seconds, args.chunk_frames, args.repeats)


def _wanted(name: str, impls: list[str] | None) -> bool:
    return impls is None or name in impls


if __name__ == "__main__":
    main()
