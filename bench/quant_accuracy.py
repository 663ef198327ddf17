"""Accuracy of the CPU weight formats (bf16-weights, int8, int4) against float32, measured.

Teacher-forced logits (the same code sequence fed to every variant) are compared with the
float32 model's: KL(fp32 || variant) in nats per predicted code, top-1 agreement, and the RMS
error relative to the logits' standard deviation. Conditional rows and the guided logits
(``uncond + 3 * (cond - uncond)``, what sampling sees) are reported. Two models:

- ``small``: a MusicGen-small-sized LM (preset ``musicgen_small``: dim 1024, 24 layers, 16
  heads, 4 codebooks x 2048, cross-attention) with trained-like random weights: matrices
  N(0, 0.02) (residual outputs 0.02 / sqrt(2 * layers)), 8 outlier residual channels whose
  input columns are 8x larger in every matrix reading the residual stream, heads scaled so the
  logits' std is ``--logit-std`` (3 by default), a condition projected from random 768-dim
  "T5" states (20 positions); the teacher-forced codes are random.
- ``shipped``: the shipped model (``assets/models/tokenwave-small``), teacher-forced on the
  codes its float32 weights generate for a few prompts; then each variant generates from the
  same prompts with the same seed and the audio is compared with float32's by the codec
  metric's mel distance (:class:`codec.training.losses.MelDistance`), next to the distance
  between two float32 generations with different seeds (what "other music" scores).

Variants: ``float32``, ``bf16-weights``, ``int8``, ``int4-g32`` / ``-g64`` / ``-g128``;
``+kv-bf16`` adds a bfloat16 KV cache; int4 products run on tokenwave's kernel
(:mod:`lm.cpu_kernels`: int8 activations) where it runs, ``+torch-kernel`` on torch's (bfloat16
activations) instead; ``int4-g<N>+min-max`` rounds the int4 matrices onto
each group's min/max range without the least-squares refits (``quantize_int4(..., steps=0)``),
what the default rounding is measured against; ``int4-g<N>+gptq`` is the offline calibrated
rounding (:func:`lm.gptq.quantize_lm_calibrated`), calibrated on inputs the measurement does
not use: (a) ``--calibration`` other random sequences, (b) the model's float32 generations for
``--calibration`` other prompts (:data:`CALIBRATION_PROMPTS`, another seed). "convert (s)":
the seconds the float32 weights took to convert (for the load-time formats, what loading
with ``dtype=`` adds), on ``--threads`` threads.

    python -m bench.quant_accuracy --which shipped          # about a minute on 1 thread
    python -m bench.quant_accuracy --which small --threads 2 # ~10 minutes (+gptq: most of it)
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable

import torch

from lm import LMModel, get_preset, cpu_kernels
from lm.gptq import quantize_lm_calibrated
from lm.quant import QuantizedWeight, is_quant_spec, quantize_int4, quantize_lm, stored_bytes

VARIANTS = ("bf16-weights", "int8", "int8+torch-kernel", "int4-g32", "int4-g32+torch-kernel", "int4-g32+min-max",
            "int4-g64", "int4-g128", "int4-g32+gptq", "int4-g128+gptq")
EXTRAS = ("", "kv-bf16", "min-max", "gptq", "torch-kernel")
CFG = 3.0


def make_variant(model: LMModel, name: str, calibration: dict | None = None) -> LMModel:
    """A copy of ``model`` in weight format ``name``; see :func:`convert`."""
    variant = copy.deepcopy(model)
    convert(variant, name, model, calibration)
    return variant


def convert(variant: LMModel, name: str, model: LMModel, calibration: dict | None = None) -> float:
    """Store ``variant`` (a copy of ``model``) in weight format ``name``, in place; returns the
    seconds the weights took (quantizing, or rounding to bfloat16). ``"int8+kv-bf16"``: int8
    with a bfloat16 KV cache; ``"int4-g32+min-max"``: int4 rounded onto each group's min/max
    range, without the least-squares refits (``quantize_int4(..., steps=0)``), for comparison;
    ``"int4-g32+gptq"``: :func:`lm.gptq.quantize_lm_calibrated` on ``calibration`` (its
    keyword arguments: codes, condition, condition_mask)."""
    base, _, extra = name.partition("+")
    start = time.perf_counter()
    if extra == "gptq":
        quantize_lm_calibrated(variant, dtype=base, **calibration)
    elif base == "bf16-weights":
        variant.low_precision_weights(torch.bfloat16)
    elif base != "float32":
        quantize_lm(variant, base)
    if extra == "min-max":
        start = time.perf_counter()  # the int4 matrices' plain rounding alone
        _min_max_rounding(variant, model)
    seconds = time.perf_counter() - start
    if extra == "kv-bf16":
        variant.kv_cache_dtype = torch.bfloat16
    return seconds


def kernel_for(name: str):
    """``+torch-kernel`` variants run their int4 products on torch's kernel (bfloat16 activations)
    instead of tokenwave's (:mod:`lm.cpu_kernels`, int8 activations; the default where it runs)."""
    return cpu_kernels.using(not name.endswith("+torch-kernel"))


def check_variant(name: str) -> str:
    """``name`` if :func:`convert` knows it, else a one-line ``ValueError`` (argparse's ``type``)."""
    base, _, extra = name.partition("+")
    if (base in ("float32", "bf16-weights") or is_quant_spec(base)) and extra in EXTRAS \
            and (extra not in ("min-max", "gptq") or base.startswith("int4")) \
            and (extra != "torch-kernel" or base.startswith("int")):
        return name
    raise ValueError(name)


def _min_max_rounding(variant: LMModel, model: LMModel) -> None:
    """Re-round ``variant``'s int4 matrices from ``model``'s float weights with ``steps=0``."""
    floats = dict(model.named_parameters())
    for name, module in variant.named_modules():
        if isinstance(module, QuantizedWeight) and module.bits == 4:
            qweight, scales, zeros = quantize_int4(floats[name].detach(), module.group_size, steps=0)
            module.qweight, module.scales, module.zeros = qweight, scales, zeros  # new buffers: packs rebuilt


def weight_megabytes(model: LMModel) -> float:
    """Bytes of the transformer's and heads' weights (what a decoding step reads), in MB."""
    return (stored_bytes(model.transformer) + stored_bytes(model.linears)) / 1e6


def logit_metrics(reference: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """KL(ref || got) per position, top-1 agreement and RMS error / std(ref), over ``(N, card)``."""
    ref_log, got_log = reference.float().log_softmax(-1), got.float().log_softmax(-1)
    kl = (ref_log.exp() * (ref_log - got_log)).sum(-1).mean()
    err = (got.float() - reference.float()).pow(2).mean().sqrt() / reference.float().std()
    agree = (got.argmax(-1) == reference.argmax(-1)).float().mean()
    return {"kl": kl.item(), "top1": agree.item(), "rel_rms": err.item()}


def teacher_forced(model: LMModel, codes: torch.Tensor, condition: torch.Tensor,
                   mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional logits, guided logits), each ``(N, card)`` over the valid positions.

    ``codes (B, K, T)``; ``condition (2B, S, dim)`` rows [conditional; null].
    """
    with torch.inference_mode():
        logits, valid = model.compute_predictions(torch.cat([codes, codes]), condition=condition,
                                                  condition_mask=mask)
    cond, uncond = logits.float().chunk(2)
    guided = uncond + CFG * (cond - uncond)
    keep = valid.chunk(2)[0]
    return cond[keep], guided[keep]


def accuracy_rows(model: LMModel, codes, condition, mask, variants, calibration: dict) -> list[dict]:
    ref_cond, ref_guided = teacher_forced(model, codes, condition, mask)
    rows = [{"variant": "float32", "mb": weight_megabytes(model), "kl": 0.0, "top1": 1.0, "rel_rms": 0.0,
             "kl_guided": 0.0, "top1_guided": 1.0, "seconds": 0.0}]
    for name in variants:
        start = time.perf_counter()
        variant = copy.deepcopy(model)
        seconds = convert(variant, name, model, calibration)
        with kernel_for(name):
            cond, guided = teacher_forced(variant, codes, condition, mask)
        row = {"variant": name, "mb": weight_megabytes(variant), "seconds": seconds,
               **logit_metrics(ref_cond, cond)}
        guided_metrics = logit_metrics(ref_guided, guided)
        row.update(kl_guided=guided_metrics["kl"], top1_guided=guided_metrics["top1"])
        print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
        rows.append(row)
        del variant
    return rows


def print_table(title: str, rows: list[dict], logit_std: float) -> None:
    print(f"\n{title} (logit std {logit_std:.2f})")
    print("| weights | matrices (MB) | KL (nats) | top-1 agree | RMS err / std | KL guided | top-1 guided | "
          "convert (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['mb']:.0f} | {r['kl']:.2e} | {100 * r['top1']:.1f}% | {r['rel_rms']:.4f} | "
              f"{r['kl_guided']:.2e} | {100 * r['top1_guided']:.1f}% | {r['seconds']:.1f} |")


# -- (a) a MusicGen-small-sized LM with trained-like random weights ----------------------------------
def realistic_small(seed: int, logit_std: float, outliers: int = 8, outlier_scale: float = 8.0) -> LMModel:
    """See the module docstring; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    model = LMModel(get_preset("musicgen_small")).eval()
    config = model.config
    channels = torch.randperm(config.dim, generator=gen)[:outliers]
    residual_std = 0.02 / math.sqrt(2 * config.num_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                continue  # LayerNorm: weight 1, bias 0
            std = residual_std if name.endswith(("out_proj.weight", "linear2.weight")) else 0.02
            param.normal_(0, std, generator=gen)
            if name.endswith(("in_proj_weight", "linear1.weight")) or name.startswith("linears."):
                param[:, channels] *= outlier_scale  # reads the outlier channels of the residual stream
        hidden = torch.randn(256, config.dim, generator=gen)
        hidden = torch.nn.functional.layer_norm(hidden, (config.dim,))
        current = torch.stack([hidden @ head.weight.T for head in model.linears]).std()
        for head in model.linears:
            head.weight.mul_(logit_std / current)
    return model


def small_section(args) -> None:
    gen = torch.Generator().manual_seed(args.seed)
    model = realistic_small(args.seed, args.logit_std)
    B, K, card = args.batch, model.config.num_codebooks, model.config.card
    t5 = 0.2 * torch.randn(B, 20, 768, generator=gen)
    projection = torch.randn(768, model.config.dim, generator=gen) / math.sqrt(768)
    condition = torch.cat([t5 @ projection, torch.zeros(B, 20, model.config.dim)])
    codes = torch.randint(0, card, (B, K, args.frames), generator=gen)
    C = args.calibration
    t5 = 0.2 * torch.randn(C, 20, 768, generator=gen)  # other draws than the measured ones
    calibration = {"codes": torch.randint(0, card, (C, K, args.frames), generator=gen).repeat(2, 1, 1),
                   "condition": torch.cat([t5 @ projection, torch.zeros(C, 20, model.config.dim)])}
    print(f"(a) MusicGen-small-sized LM, trained-like random weights; {B} sequences x {args.frames} frames, "
          f"random codes; +gptq calibrated on {C} other random sequences", flush=True)
    rows = accuracy_rows(model, codes, condition, None, args.variants, calibration)
    ref, _ = teacher_forced(model, codes[:1, :, :8], condition[::B], None)
    print_table("(a) MusicGen-small-sized, teacher-forced logits vs float32", rows, ref.std().item())


# -- (b) the shipped model ------------------------------------------------------------------------
PROMPTS = ("calm piano melody at night", "energetic rock with drums and electric guitar",
           "ambient synth pad, slow and warm", "upbeat jazz with saxophone")
CALIBRATION_PROMPTS = ("a slow sad violin solo", "techno beat with heavy bass", "acoustic folk guitar and voice",
                       "orchestral film score, epic", "lofi hip hop with soft drums", "reggae with offbeat guitar",
                       "solo harp arpeggios", "blues shuffle with harmonica")  # +gptq: none of the measured


def generations(generator, prompts, seconds: float, seed: int, greedy: bool):
    out = generator.generate(list(prompts), seconds, seed=seed, return_tokens=True, use_sampling=not greedy)
    return out.wav, out.tokens


def shipped_section(args) -> None:
    from codec.training.losses import MelDistance  # noqa: PLC0415
    from inference.generator import MusicGen  # noqa: PLC0415

    generator = MusicGen.from_pretrained(args.model, device="cpu")
    prompts = PROMPTS[: args.prompts]
    wav, codes = generations(generator, prompts, args.seconds, args.seed, args.greedy)
    conditions = generator.prepare_conditions(list(prompts), guided=True)
    prompts_in = list(CALIBRATION_PROMPTS[: args.calibration])
    _, calibration_codes = generations(generator, prompts_in, args.seconds, args.seed + 1000, args.greedy)
    calibration_conditions = generator.prepare_conditions(prompts_in, guided=True)
    calibration = {"codes": calibration_codes.repeat(2, 1, 1), "condition": calibration_conditions.condition,
                   "condition_mask": calibration_conditions.condition_mask}
    print(f"(b) {args.model}: teacher forcing on its float32 generations ({len(prompts)} prompts x "
          f"{codes.shape[-1]} frames); +gptq calibrated on its generations for {len(prompts_in)} other prompts",
          flush=True)
    rows = accuracy_rows(generator.lm, codes, conditions.condition, conditions.condition_mask, args.variants,
                         calibration)
    ref, _ = teacher_forced(generator.lm, codes, conditions.condition, conditions.condition_mask)
    print_table(f"(b) {args.model}, teacher-forced logits vs float32", rows, ref.std().item())

    mel = MelDistance(generator.sample_rate)

    def distance(other: torch.Tensor) -> float:
        return mel(other, wav).mean().item()

    other_wav, other_codes = generations(generator, prompts, args.seconds, args.seed + 1, args.greedy)
    mode = "greedy" if args.greedy else f"sampling, seed {args.seed}"
    print(f"\n(b) {args.model}: generations ({len(prompts)} prompts x {args.seconds:g} s, {mode}) vs float32")
    print("| weights | mel distance to fp32 | codes equal to fp32 |")
    print("|---|---:|---:|")
    print(f"| float32, other seed (reference: different music) | {distance(other_wav):.3f} | "
          f"{100 * (other_codes == codes).float().mean().item():.1f}% |")
    lm = generator.lm
    for name in args.generation_variants:
        generator.lm = make_variant(lm, name, calibration)
        with kernel_for(name):
            got_wav, got_codes = generations(generator, prompts, args.seconds, args.seed, args.greedy)
        print(f"| {name} | {distance(got_wav):.3f} | {100 * (got_codes == codes).float().mean().item():.1f}% |",
              flush=True)
    generator.lm = lm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--which", nargs="+", choices=("small", "shipped"), default=["shipped", "small"])
    parser.add_argument("--variants", nargs="+", type=check_variant, default=list(VARIANTS),
                        help=f"default: {' '.join(VARIANTS)}")
    parser.add_argument("--generation-variants", nargs="+", type=check_variant,
                        default=["bf16-weights", "int8", "int8+kv-bf16", "int4-g64", "int4-g32", "int4-g32+gptq"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="tokenwave-small", help="(b): a generator folder or name")
    parser.add_argument("--prompts", type=int, default=4, help=f"(b): prompts (up to {len(PROMPTS)})")
    parser.add_argument("--seconds", type=float, default=5.0, help="(b): seconds generated per prompt")
    parser.add_argument("--greedy", action="store_true", help="(b): greedy decoding instead of sampling")
    parser.add_argument("--batch", type=int, default=2, help="(a): teacher-forced sequences")
    parser.add_argument("--frames", type=int, default=64, help="(a): frames per sequence")
    parser.add_argument("--logit-std", type=float, default=3.0, help="(a): the logits' standard deviation")
    parser.add_argument("--calibration", type=int, default=8,
                        help=f"+gptq: calibration sequences ((b): prompts, up to {len(CALIBRATION_PROMPTS)})")
    args = parser.parse_args(argv)
    if args.calibration < 1:
        parser.error(f"--calibration must be at least 1, got {args.calibration}")
    torch.set_num_threads(args.threads)
    sections: dict[str, Callable] = {"shipped": shipped_section, "small": small_section}
    for which in args.which:
        start = time.perf_counter()
        sections[which](args)
        print(f"({which}: {time.perf_counter() - start:.0f} s)\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
