"""LM generation speed: tokenwave vs transformers' MusicGen with the same random weights.

A MusicGen-small-sized decoder (dim 1024, 24 layers, 16 heads, 4 codebooks, card 2048) with
cross-attention to a random projected condition, classifier-free guidance on (so twice the
rows), top-k 250 sampling. Reports pattern steps per second; tokenwave also with bfloat16
matrix weights (``bf16-w``: activations, norms and cache stay float32) and fully in bfloat16
(``bf16``), with the accuracy each costs (teacher-forced logits against float32).

    python -m bench.generate --threads 2 --steps 24 --batch 1 8

Timings on a shared machine are noisy: implementations run in interleaved rounds and the
best round counts; compare numbers from one run only.
"""
from __future__ import annotations

import argparse
import time

import torch

from inference.loaders import transformers_to_audiocraft_lm
from lm import LMConfig, LMModel

SMALL = dict(dim=1024, num_heads=16, num_layers=24, ffn_dim=4096, num_codebooks=4, card=2048)


def build_models(layers: int):
    """transformers' MusicgenForCausalLM and our LMModel holding the same random weights."""
    import transformers  # noqa: PLC0415 -- only the benchmark needs it

    s = dict(SMALL, num_layers=layers)
    config = transformers.MusicgenDecoderConfig(
        vocab_size=s["card"], hidden_size=s["dim"], num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"], ffn_dim=s["ffn_dim"], num_codebooks=s["num_codebooks"],
        pad_token_id=s["card"], bos_token_id=s["card"], max_position_embeddings=2048, dropout=0.0)
    reference = transformers.MusicgenForCausalLM(config).eval()
    ours = LMModel(LMConfig(**s)).eval()
    ours.load_state_dict(transformers_to_audiocraft_lm(reference.state_dict()))
    return reference, ours


def make_condition(batch: int, length: int = 20, dim: int = 1024):
    """Rows [conditional; unconditional]: random text-like states, then the null condition."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[:, length // 2:] = torch.rand(batch, length - length // 2, generator=gen) > 0.5
    condition = torch.randn(batch, length, dim, generator=gen) * mask[..., None]
    return torch.cat([condition, torch.zeros_like(condition)]), torch.cat([mask, torch.zeros_like(mask)])


def time_reference(reference, batch: int, steps: int, condition, mask) -> float:
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache  # noqa: PLC0415

    card, K = reference.config.vocab_size, reference.config.num_codebooks
    bos = torch.full((batch * K, 1), card)
    start = time.perf_counter()
    with torch.inference_mode():
        # An encoder-decoder cache and an explicit decoder mask: transformers' CausalLM generate
        # would otherwise build a decoder-only cache (and fail) and mask the BOS column.
        reference.generate(bos, attention_mask=torch.ones_like(bos), encoder_hidden_states=condition,
                           encoder_attention_mask=mask, guidance_scale=3.0, do_sample=True, top_k=250,
                           decoder_start_token_id=card, num_return_sequences=1, max_new_tokens=steps,
                           past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()))
    return time.perf_counter() - start


def time_ours(model: LMModel, batch: int, steps: int, condition, mask) -> float:
    frames = steps - (model.num_codebooks - 1)  # the delay pattern adds K-1 steps
    start = time.perf_counter()
    model.generate(max_gen_len=frames, num_samples=batch, condition=condition, condition_mask=mask,
                   top_k=250, cfg_coef=3.0, generator=torch.Generator().manual_seed(0))
    return time.perf_counter() - start


def copy_of(model: LMModel) -> LMModel:
    clone = LMModel(model.config).eval()
    clone.load_state_dict(model.state_dict())
    return clone


def accuracy(model: LMModel, model_bf16: LMModel, condition, mask, length: int = 48) -> dict:
    """Teacher-forced logits of a low-precision variant against float32 on one random sequence."""
    gen = torch.Generator().manual_seed(1)
    sequence = torch.randint(0, model.config.card, (condition.shape[0], model.num_codebooks, length),
                             generator=gen)
    with torch.inference_mode():
        ref = model(sequence, condition=condition, condition_mask=mask).float()
        low = model_bf16(sequence, condition=condition, condition_mask=mask).float()
    err = (low - ref).abs()
    kl = torch.nn.functional.kl_div(low.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean()
    return {"max_abs_err": err.max().item(), "logit_std": ref.std().item(),
            "rel_rms_err": (err.pow(2).mean().sqrt() / ref.std()).item(),
            "kl_nats": kl.item(), "top1_agree": (low.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24, help="pattern steps generated per run")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--layers", type=int, default=24, help="fewer layers for a quick smoke run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best is kept")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 variants")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    reference, ours = build_models(args.layers)
    variants = {"fp32": ours}
    if not args.no_bf16:
        variants["bf16-w"] = copy_of(ours).low_precision_weights(torch.bfloat16)
        variants["bf16"] = copy_of(ours).to(torch.bfloat16)
    runners = [("transformers", "fp32", lambda b, n, c, m: time_reference(reference, b, n, c, m))]
    runners += [("tokenwave", name, lambda b, n, c, m, model=model: time_ours(model, b, n, c, m))
                for name, model in variants.items()]

    print(f"MusicGen-small-sized LM ({args.layers} layers), CFG on, top-k 250, "
          f"{torch.get_num_threads()} threads, {args.steps} steps per run, best of {args.repeats}")
    print(f"{'impl':<13}{'dtype':<7}{'batch':>6}{'rows':>6}{'ms/step':>10}{'steps/s':>9}{'vs tf':>8}")
    for batch in args.batch:
        condition, mask = make_condition(batch)
        for _, _, run in runners:
            run(batch, 4, condition, mask)  # warm-up
        # Rounds interleave the implementations so they share the machine's load; best of rounds.
        best = [float("inf")] * len(runners)
        for _ in range(args.repeats):
            best = [min(b, run(batch, args.steps, condition, mask)) for b, (_, _, run) in zip(best, runners)]
        base = args.steps / best[0]
        for (name, dtype, _), elapsed in zip(runners, best):
            rate = args.steps / elapsed
            print(f"{name:<13}{dtype:<7}{batch:>6}{2 * batch:>6}{1000 / rate:>10.1f}{rate:>9.2f}"
                  f"{rate / base:>7.2f}x")
    condition, mask = make_condition(1)
    for name, model in variants.items():
        if name != "fp32":
            acc = accuracy(ours, model, condition, mask)
            print(f"{name} vs fp32 (teacher-forced logits, 48 steps): "
                  + ", ".join(f"{k} {v:.4g}" for k, v in acc.items()))


if __name__ == "__main__":
    main()
