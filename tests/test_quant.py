"""Weight-only int8 / int4 quantization of the LM (lm.quant): kernels against the dequantized
reference, whole-model closeness, load-time quantization from float checkpoints, the quantized
tokenwave folder, the CLI's ``--dtype int8|int4`` with the shipped model, and CUDA (skipped
without one)."""
from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from inference import MusicGen, cli
from lm import LMModel, get_preset
from lm.quant import QuantConfig, QuantizedWeight, quantize_lm, quantize_state
from t5_fixture import tiny_t5_folder  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "models" / "tokenwave-small"
# dim 64 takes every int4 group size up to 64 without fallback; 16 heads' rows are multiples of 16
CONFIG = replace(get_preset("tiny"), dim=64, ffn_dim=128, card=32)


def _model(seed: int = 0) -> LMModel:
    torch.manual_seed(seed)
    return LMModel(CONFIG).eval()


def _copy(model: LMModel) -> LMModel:
    other = LMModel(model.config).eval()
    other.load_state_dict(model.state_dict())
    return other


def _inputs(batch: int = 2, steps: int = 12):
    gen = torch.Generator().manual_seed(1)
    sequence = torch.randint(0, CONFIG.card, (batch, CONFIG.num_codebooks, steps), generator=gen)
    return sequence, torch.randn(batch, 5, CONFIG.dim, generator=gen)


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32), (4, 64), (4, 128)])
@pytest.mark.parametrize("rows", [1, 2, 8, 33])
def test_quantized_linear_matches_dequantized_matmul(bits, group, rows):
    torch.manual_seed(0)
    weight = torch.randn(96, 256) * 0.02
    weight[:, 3] *= 20  # an outlier input channel
    quantized = QuantizedWeight.from_float(weight, bits, group)
    reference_weight = quantized.dequantize()
    if bits == 8:  # the integers stand for the weight to within half a step of their grid
        assert ((reference_weight - weight).abs() <= 0.5 * quantized.scales.float()[:, None] + 1e-6).all()
    else:  # the clipping search makes up for the bfloat16 scales: as close as float32 min-max rounding
        groups = weight.reshape(96, -1, group)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        step = (high - low) / 15
        plain = (torch.round((groups - low) / step) * step + low).reshape(weight.shape)
        assert (reference_weight - weight).pow(2).mean() < 1.02 * (plain - weight).pow(2).mean()
    x = torch.randn(rows, 256)
    bias = torch.randn(96)
    got = quantized.linear(x, bias)
    # The kernels multiply bfloat16 activations (and round their output to bfloat16).
    expected = x.bfloat16().float() @ reference_weight.T + bias
    assert got.dtype == torch.float32 and got.shape == (rows, 96)
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=2e-2 * expected.abs().max().item())
    # Row views (the packed q/k/v projections) equal the rows of the whole product.
    part = quantized[32:64].linear(x)
    torch.testing.assert_close(part, got[:, 32:64] - bias[32:64], rtol=0, atol=1e-2 * got.abs().max().item())


def test_quantize_lm_keeps_logits_and_greedy_tokens_close():
    model = _model()
    sequence, condition = _inputs()
    with torch.inference_mode():
        reference = model(sequence, condition=condition)
    scale = reference.std()
    # measured on this model: int8 rms 0.007, int4-g32 0.08 (of the logits' std)
    for spec, tolerance, agree in (("int8", 0.02, 0.97), ("int4-g32", 0.15, 0.85)):
        quantized = quantize_lm(_copy(model), spec)
        with torch.inference_mode():
            got = quantized(sequence, condition=condition)
        rms = (got - reference).pow(2).mean().sqrt() / scale
        assert rms < tolerance, (spec, rms)
        assert (got.argmax(-1) == reference.argmax(-1)).float().mean() >= agree, spec
    greedy = dict(max_gen_len=16, num_samples=2, condition=torch.cat([condition, torch.zeros_like(condition)]),
                  use_sampling=False)
    tokens = model.generate(**greedy)
    quantized_tokens = quantize_lm(_copy(model), "int8").generate(**greedy)
    assert (tokens == quantized_tokens).float().mean() >= 0.9
    # the static-cache path runs the same quantized product
    quantized = quantize_lm(_copy(model), "int4-g32")
    assert torch.equal(quantized.generate(**greedy), quantized.generate(**greedy, fast=True))


def test_quantize_lm_replaces_matrices_and_keeps_the_rest():
    model = quantize_lm(_model(), "int4", group_size=32)
    layer = model.transformer.layers[0]
    for weight in (layer.self_attn.in_proj_weight, layer.cross_attention.out_proj.weight, layer.linear2.weight):
        assert isinstance(weight, QuantizedWeight) and weight.bits == 4 and weight.group_size == 32
    assert model.linears[0].weight.dtype == torch.bfloat16  # heads: bf16 by default
    assert model.emb[0].weight.dtype == torch.float32 and layer.norm1.weight.dtype == torch.float32
    assert model.quantization == QuantConfig("int4", 32, "bf16")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_lm(model, "int8")
    heads = quantize_lm(_model(), "int8", heads="int8")
    assert isinstance(heads.linears[0].weight, QuantizedWeight)


def test_int4_falls_back_to_int8_where_the_kernel_cannot_go():
    model = LMModel(get_preset("tiny")).eval()  # dim 32: not a multiple of group size 64
    with pytest.warns(UserWarning, match=r"int4-g64: \d+ matrices stored in int8"):
        quantize_lm(model, "int4-g64")
    layer = model.transformer.layers[0]
    assert layer.linear1.weight.bits == 8  # in_features 32
    assert layer.linear2.weight.bits == 4  # in_features 64


@pytest.mark.parametrize("spec", ["int5", "int4-g48", "int8-g32", "float8"])
def test_unknown_quantization_is_refused(spec):
    with pytest.raises(ValueError, match="int8, int4|group size must be one of"):
        quantize_lm(_model(), spec)


@pytest.mark.parametrize("spec", ["int8", "int4-g32"])
def test_quantize_state_equals_quantizing_the_model(spec):
    """Load-time quantization (tensor by tensor) gives the buffers of quantize_lm, and a meta
    model quantized the same way takes them by assignment."""
    model = _model()
    quantized = quantize_lm(_copy(model), spec)
    state = quantize_state(dict(model.state_dict()), QuantConfig.parse(spec))
    expected = quantized.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) and state[k].dtype == expected[k].dtype for k in state)
    with torch.device("meta"):
        empty = LMModel(CONFIG)
    quantize_lm(empty, spec)
    empty.load_state_dict(state, assign=True)
    sequence, condition = _inputs()
    assert torch.equal(empty.eval()(sequence, condition=condition), quantized(sequence, condition=condition))


@pytest.fixture(scope="module")
def shipped() -> MusicGen:
    if not (SHIPPED / "config.json").is_file():
        pytest.skip("the shipped model is not in assets/models")
    return MusicGen.from_pretrained(SHIPPED, device="cpu")


@pytest.mark.parametrize("spec", ["int8", "int4"])
def test_quantized_folder_round_trip(tmp_path, shipped, spec):
    generator = MusicGen.from_pretrained(SHIPPED, device="cpu", dtype=spec)
    assert generator.lm.quantization == QuantConfig.parse(spec)
    folder = Path(generator.save_pretrained(tmp_path / "quantized"))
    config = json.loads((folder / "config.json").read_text())
    assert config["lm_quantization"]["dtype"] == spec
    assert (folder / "model.safetensors").stat().st_size < 0.8 * (SHIPPED / "model.safetensors").stat().st_size
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as file:
        stored = file.get_tensor("transformer.layers.0.linear1.weight.qweight")
    assert stored.dtype == (torch.int8 if spec == "int8" else torch.uint8)

    loaded = MusicGen.from_pretrained(folder, device="cpu")  # no dtype: the folder's quantization
    assert loaded.lm.quantization == generator.lm.quantization
    assert isinstance(loaded.lm.transformer.layers[0].linear1.weight, QuantizedWeight)
    sequence = torch.randint(0, shipped.lm.config.card, (1, 4, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(loaded.lm(sequence), generator.lm(sequence))
    assert torch.equal(MusicGen.from_pretrained(folder, device="cpu", dtype=spec).lm(sequence), loaded.lm(sequence))
    other = "int4" if spec == "int8" else "int8"
    with pytest.raises(Exception, match=f"stored quantized \\({spec}\\).*dtype='{spec}'"):
        MusicGen.from_pretrained(folder, device="cpu", dtype=other)


def test_load_time_quantization_equals_quantizing_after_loading(shipped):
    loaded = MusicGen.from_pretrained(SHIPPED, device="cpu", dtype="int4-g32")
    reference = quantize_lm(_lm_copy(shipped.lm), "int4-g32")
    assert loaded.lm.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in loaded.lm.state_dict().items())


def _lm_copy(lm: LMModel) -> LMModel:
    other = LMModel(lm.config).eval()
    other.load_state_dict(lm.state_dict())
    return other


def test_transformers_checkpoint_quantizes_at_load(tmp_path, tiny_t5_folder):  # noqa: F811
    """The transformers layout (q, k, v separate) is packed, then quantized, layer by layer."""
    from test_musicgen_oracle import build_and_save  # noqa: PLC0415
    build_and_save(tmp_path / "hf", tiny_t5_folder)
    float_model = MusicGen.from_pretrained(tmp_path / "hf", device="cpu")
    quantized = MusicGen.from_pretrained(tmp_path / "hf", device="cpu", dtype="int8")
    expected = quantize_lm(_lm_copy(float_model.lm), "int8").state_dict()
    assert quantized.lm.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in quantized.lm.state_dict().items())


def test_audiocraft_checkpoint_quantizes_at_load(tmp_path, tiny_t5_folder):  # noqa: F811
    from test_generator import AUDIOCRAFT_YAML, build_tiny_generator, write_audiocraft  # noqa: PLC0415
    generator = build_tiny_generator(t5_folder=tiny_t5_folder, seed=3)
    write_audiocraft(tmp_path / "ac", generator, AUDIOCRAFT_YAML)
    quantized = MusicGen.from_pretrained(tmp_path / "ac", device="cpu", dtype="int8", t5_path=tiny_t5_folder)
    expected = quantize_lm(_lm_copy(generator.lm), "int8").state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in quantized.lm.state_dict().items())


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("spec", ["int8", "int4"])
def test_cli_generates_with_a_quantized_shipped_model(tmp_path, capsys, shipped, spec):
    from codec import audio  # noqa: PLC0415
    out = tmp_path / f"{spec}.wav"
    code, stdout, err = _run(capsys, "generate", "calm piano", "-o", out, "--model", SHIPPED, "--duration", "1",
                             "--seed", "0", "--dtype", spec, "--subtype", "FLOAT")
    assert code == 0, err
    wav, rate = audio.read_audio(out)
    assert rate == shipped.sample_rate and wav.shape[-1] == shipped.sample_rate
    assert wav.abs().max() > 1e-4 and torch.isfinite(wav).all()
    expected = MusicGen.from_pretrained(SHIPPED, device="cpu", dtype=spec).generate("calm piano", 1.0, seed=0).wav[0]
    torch.testing.assert_close(wav, expected, atol=1e-5, rtol=0)


def test_cli_refuses_a_mismatched_dtype_for_a_quantized_folder(tmp_path, capsys, shipped):
    folder = MusicGen.from_pretrained(SHIPPED, device="cpu", dtype="int8").save_pretrained(tmp_path / "q")
    code, _, err = _run(capsys, "generate", "calm piano", "-o", tmp_path / "x.wav", "--model", folder,
                        "--duration", "0.1", "--dtype", "int4")
    assert code != 0 and "stored quantized (int8)" in err and err.count("\n") == 1
    assert not (tmp_path / "x.wav").exists()


def test_bf16_kv_cache_stays_close():
    model = quantize_lm(_model(), "int8")
    condition = torch.cat([_inputs()[1], torch.zeros(2, 5, CONFIG.dim)])
    args = dict(max_gen_len=12, num_samples=2, condition=condition, use_sampling=False)
    state = model.init_state(4, 8)
    assert state.caches[0].keys.dtype == torch.float32
    tokens = model.generate(**args)
    model.kv_cache_dtype = torch.bfloat16
    assert model.init_state(4, 8).caches[0].keys.dtype == torch.bfloat16
    low = model.generate(**args)
    # bfloat16 attention rounds differently over the static cache (fast=True): near-ties may flip
    assert (low == model.generate(**args, fast=True)).float().mean() >= 0.9
    assert (low == tokens).float().mean() >= 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", ["int8", "int4-g32"])
def test_quantized_model_runs_on_cuda(spec):
    model = quantize_lm(_model(), spec)
    sequence, condition = _inputs()
    with torch.inference_mode():
        cpu = model(sequence, condition=condition)
        cuda = model.to("cuda")(sequence.cuda(), condition=condition.cuda()).cpu()
    torch.testing.assert_close(cuda, cpu, rtol=0, atol=0.05 * cpu.std().item())


def test_quantized_weight_is_not_a_parameter():
    """Optimizers and the bf16-weights pass must not see the integer buffers as weights."""
    model = quantize_lm(_model(), "int8")
    names = {name for name, _ in model.named_parameters()}
    assert not any("linear1" in n or "in_proj" in n for n in names)
    assert all(isinstance(m, nn.Module) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.state_dict()


def test_demo_offers_quantized_weights(shipped):
    from demos import app  # noqa: PLC0415
    choices, default = app.model_choices(SHIPPED)
    values = [c.value for c in choices]
    assert f"{default}@int8" in values and f"{default}@int4" in values
    generator = app.load_generator(f"{default}@int8")
    assert generator.lm.quantization == QuantConfig.parse("int8")
    assert app.load_generator(default).lm.quantization is None
