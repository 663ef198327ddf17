"""LoRA adapters (lm.lora), ``finetune --lora``, adapter folders (inference.formats.lora), merging.

Tiny models on CPU: test_generator's tiny generator as the base, test_data's synthetic corpus.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_finetune import setup  # noqa: F401  (fixture: base generator folder, token cache)
from test_generator import tiny_lm

from inference import MusicGen
from inference.cli import main
from inference.finetune import finetune
from inference.formats import detect_format
from lm.lora import LoRAConfig, add_lora, has_lora, load_lora, lora_state_dict, merge_lora, train_only_adapters
from lm.run import FinetuneConfig, list_checkpoints
from lm.token_cache import TokenCache
from lm.training import ConditionedLM

CAPTIONS = ["happy rock", None]




def codes_of(cache_dir: Path) -> torch.Tensor:
    cache = TokenCache(cache_dir)
    return torch.from_numpy(np.asarray(cache.tokens(0)[:, :30], np.int64))[None].repeat(2, 1, 1)


@torch.no_grad()
def logits(generator: MusicGen, codes: torch.Tensor) -> torch.Tensor:
    model = ConditionedLM(lm=generator.lm, condition_provider=generator.condition_provider, fuser=generator.fuser,
                          mask_condition_padding=generator.config.mask_condition_padding).eval()
    out, _ = model(codes, captions=CAPTIONS)
    return out.nan_to_num()


def test_zero_initialised_adapters_give_the_base_outputs():
    lm = tiny_lm(1)
    sequence = torch.randint(0, 16, (2, lm.config.num_codebooks, 9))
    condition = torch.randn(2, 3, lm.config.dim)
    with torch.no_grad():
        before = lm(sequence, condition=condition)
    base_weight = lm.transformer.layers[0].linear1.weight.detach().clone()
    config = add_lora(lm, 4, alpha=8, targets=["all"])
    assert config.targets == LoRAConfig(4, targets=("attn", "ffn")).targets and config.scale == 2.0
    with torch.no_grad():
        after = lm(sequence, condition=condition)
    assert torch.equal(before, after)
    assert torch.equal(lm.transformer.layers[0].linear1.weight.base, base_weight)
    trained = train_only_adapters(lm)
    assert trained and all(name.endswith(("lora_A", "lora_B")) for name in trained)
    assert sorted(trained) == sorted(lora_state_dict(lm))
    assert not any(p.requires_grad for n, p in lm.named_parameters() if n not in trained)
    # Gradients reach A and B through every path (packed q/k/v slices, cross-attention, FFN).
    lm(sequence, condition=condition).sum().backward()
    assert all(p.grad is not None for n, p in lm.named_parameters() if n.endswith("lora_A"))


def test_merge_folds_the_adapters_into_plain_weights():
    lm = tiny_lm(2)
    names = set(lm.state_dict())
    add_lora(lm, 3, targets=["self_attn", "linear2"])
    torch.manual_seed(0)
    for name, param in lora_state_dict(lm).items():
        param.data = torch.randn_like(param) * 0.1  # a trained adapter
    sequence = torch.randint(0, 16, (2, lm.config.num_codebooks, 9))
    condition = torch.randn(2, 3, lm.config.dim)
    with torch.no_grad():
        adapted = lm(sequence, condition=condition)
        assert not torch.allclose(adapted, tiny_lm(2)(sequence, condition=condition), atol=1e-3)
        merge_lora(lm)
        merged = lm(sequence, condition=condition)
    assert not has_lora(lm) and set(lm.state_dict()) == names
    assert torch.allclose(adapted, merged, atol=1e-5)


def test_adapters_refuse_what_does_not_fit():
    lm = tiny_lm(0)
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        add_lora(lm, 0)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        add_lora(lm, 2, targets=["q_proj"])
    with pytest.raises(ValueError, match="exceeds the smallest"):
        add_lora(lm, 1000)
    add_lora(lm, 2)
    with pytest.raises(ValueError, match="already holds"):
        add_lora(lm, 2)
    other = tiny_lm(0)
    add_lora(other, 4)
    with pytest.raises(ValueError, match="shape"):
        load_lora(lm, lora_state_dict(other))


def test_finetune_with_lora_trains_and_exports_the_adapters_alone(setup, tmp_path):  # noqa: F811
    base, cache = setup
    out = tmp_path / "run"
    config = FinetuneConfig(model=str(base), data=str(cache), out=str(out), steps=3, batch_size=2, lr=2e-2,
                            warmup=0, eval_every=0, save_every=3, seed=2, lora=4, lora_alpha=8,
                            lora_targets=("attn", "ffn"))
    result = finetune(config)
    adapter = result.model_dir
    assert detect_format(adapter) == "lora"
    assert sorted(p.name for p in adapter.iterdir()) == ["lora.json", "lora.safetensors"]
    info = json.loads((adapter / "lora.json").read_text())
    assert info["base"] == str(base.resolve()) and info["lora"]["rank"] == 4 and info["lora"]["alpha"] == 8
    state = load_file(str(adapter / "lora.safetensors"))
    assert state and all(k.endswith((".lora_A", ".lora_B")) for k in state)
    assert (adapter / "lora.safetensors").stat().st_size < (base / "model.safetensors").stat().st_size / 2

    # Only the adapters changed: every other trained tensor of the last checkpoint is the base's.
    base_state = load_file(str(base / "model.safetensors"))
    checkpoint = load_file(str(list_checkpoints(out)[-1][1] / "model.safetensors"))
    changed, unmatched = [], []
    for key, value in checkpoint.items():
        if key.endswith(("lora_A", "lora_B")):
            continue
        plain = key.removeprefix("lm.").removesuffix(".base")
        if plain not in base_state:
            unmatched.append(key)
        elif not torch.equal(value, base_state[plain]):
            changed.append(key)
    assert not changed and not unmatched, (changed[:5], unmatched[:5])
    assert len(checkpoint) > len(state)
    assert any(state[k].abs().max() > 0 for k in state if k.endswith("lora_B"))  # B left zero: trained

    # base + adapter = the trained model (its final weights, rebuilt from the checkpoint).
    codes = codes_of(cache)
    loaded = MusicGen.from_pretrained(adapter, device="cpu")
    trained = MusicGen.from_pretrained(base, device="cpu")
    add_lora(trained.lm, config.lora_config())
    trained.lm.load_state_dict({k.removeprefix("lm."): v for k, v in checkpoint.items() if k.startswith("lm.")})
    assert has_lora(loaded.lm) and torch.equal(logits(loaded, codes), logits(trained, codes))
    assert not torch.allclose(logits(loaded, codes), logits(MusicGen.from_pretrained(base, device="cpu"), codes))

    # A generator holding adapters is not saved as a full folder; merged, it is.
    with pytest.raises(ValueError, match="merge them first"):
        loaded.save_pretrained(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    merge_lora(loaded.lm)
    merged_folder = loaded.save_pretrained(tmp_path / "merged")
    assert detect_format(merged_folder) == "tokenwave"
    merged = MusicGen.from_pretrained(merged_folder, device="cpu")
    assert not has_lora(merged.lm)
    assert torch.allclose(logits(merged, codes), logits(trained, codes), atol=1e-5)


def test_a_lora_run_resumes_to_the_uninterrupted_adapters(setup, tmp_path):  # noqa: F811
    base, cache = setup
    config = FinetuneConfig(model=str(base), data=str(cache), out=str(tmp_path / "a"), steps=4, batch_size=2,
                            lr=1e-2, warmup=0, eval_every=0, save_every=2, seed=1, lora=2)
    straight = finetune(config)
    stopped = replace(config, out=str(tmp_path / "b"), stop_after=3)
    assert finetune(stopped).model_dir is None
    resumed = finetune(replace(stopped, stop_after=None), resume=True)
    a, b = (load_file(str(result.model_dir / "lora.safetensors")) for result in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="cannot resume"):
        finetune(replace(config, lora=3), resume=True)


def test_lora_config_errors():
    with pytest.raises(ValueError, match="from_scratch"):
        FinetuneConfig(from_scratch="tiny", data="c", out="o", lora=4)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        FinetuneConfig(model="m", data="c", out="o", lora=4, lora_targets=("nope",))


def test_cli_finetune_lora_generate_and_merge(setup, tmp_path, capsys):  # noqa: F811
    base, cache = setup
    run = tmp_path / "run"
    args = ["finetune", "--model", str(base), "--data", str(cache), "--out", str(run), "--steps", "2",
            "--batch-size", "2", "--eval-every", "0", "--lr", "1e-2", "-q"]
    assert main(args + ["--lora", "0"]) == 1
    err = capsys.readouterr().err
    assert "LoRA rank must be an integer >= 1, found 0" in err and "Traceback" not in err
    assert not run.exists()
    assert main(args + ["--lora", "2", "--lora-targets", "bogus"]) == 1
    assert "unknown LoRA target" in capsys.readouterr().err
    assert main(args + ["--lora", "2", "--lora-targets", "self_attn", "ffn"]) == 0
    assert detect_format(run / "model") == "lora"

    song = tmp_path / "song.wav"
    assert main(["generate", "calm piano", "-o", str(song), "--model", str(run / "model"), "--duration", "0.05",
                 "--seed", "0", "-q"]) == 0
    assert song.is_file()
    assert main(["merge-lora", str(run / "model"), str(tmp_path / "merged")]) == 0
    assert "merge-lora:" in capsys.readouterr().out
    assert detect_format(tmp_path / "merged") == "tokenwave"
    assert main(["merge-lora", str(base), str(tmp_path / "other")]) == 1
    assert "not a LoRA adapter folder" in capsys.readouterr().err and not (tmp_path / "other").exists()
    codes = codes_of(cache)
    adapted = MusicGen.from_pretrained(run / "model", device="cpu")
    merged = MusicGen.from_pretrained(tmp_path / "merged", device="cpu")
    assert torch.allclose(logits(adapted, codes), logits(merged, codes), atol=1e-5)


def test_low_precision_weights_refuse_wrapped_matrices_clearly():
    lm = tiny_lm(0)
    add_lora(lm, 2)
    with pytest.raises(ValueError, match="merge the adapters first"):
        lm.low_precision_weights()
    merge_lora(lm)
    lm.low_precision_weights()  # plain matrices again: converted
    assert lm.linears[0].weight.dtype == torch.bfloat16


def test_adapters_refuse_a_base_that_changed_since(setup, tmp_path):  # noqa: F811
    """An adapter records its base LM's fingerprint; loaded over a base whose weights changed under
    the same path (a new release of the model, say) it is refused, naming what to do. Adapters
    written before the fingerprint existed still load."""
    import shutil

    from codec.files import CheckpointError

    base, cache = setup
    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    config = FinetuneConfig(model=str(copy), data=str(cache), out=str(tmp_path / "run"), steps=1, batch_size=2,
                            warmup=0, eval_every=0, save_every=1, seed=2, lora=2)
    adapter = finetune(config).model_dir
    info = json.loads((adapter / "lora.json").read_text())
    assert len(info["base_weights"]) == 8
    MusicGen.from_pretrained(adapter, device="cpu")  # the base it was trained over: fine

    weights = copy / "model.safetensors"
    state = load_file(str(weights))
    from safetensors.torch import save_file
    first = next(k for k in sorted(state) if not k.startswith("condition_provider."))  # an LM weight
    state[first] = state[first] + 0.01
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="trained over other weights"):
        MusicGen.from_pretrained(adapter, device="cpu")

    del info["base_weights"]  # an adapter from before the fingerprint: loads as it did
    (adapter / "lora.json").write_text(json.dumps(info))
    assert has_lora(MusicGen.from_pretrained(adapter, device="cpu").lm)
