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
from lm import cpu_kernels
from lm.gptq import gptq_int4, quantize_lm_calibrated
from lm.quant import QuantConfig, QuantizedWeight, dequantize_int4, quantize_int4, quantize_lm, quantize_state
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
    else:  # the least-squares refits more than make up for the bfloat16 scales
        assert (reference_weight - weight).pow(2).mean() < (_min_max_int4(weight, group) - weight).pow(2).mean()
    x = torch.randn(rows, 256)
    bias = torch.randn(96)
    got = quantized.linear(x, bias)
    assert got.dtype == torch.float32 and got.shape == (rows, 96)
    if bits == 4 and cpu_kernels.available():
        # tokenwave's kernel: int8 activations per group, exact integer sums.
        exact = cpu_kernels.int4_reference(x, quantized.qweight, quantized.scales, quantized.zeros, group).float()
        exact += bias
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
        # int8 activations (one step = a group's max / 127) err by 1-3 % RMS of the product here (the
        # outlier column multiplies its input's rounding by 20); bench/quant_accuracy.py measures models
        product = x @ reference_weight.T
        assert (got - bias - product).norm() < 0.03 * product.norm()
    else:  # torch's kernels multiply bfloat16 activations (and round their output to bfloat16)
        expected = x.bfloat16().float() @ reference_weight.T + bias
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=2e-2 * expected.abs().max().item())
    # Row views (the packed q/k/v projections) equal the rows of the whole product.
    part = quantized[32:64].linear(x)
    torch.testing.assert_close(part, got[:, 32:64] - bias[32:64], rtol=0, atol=1e-2 * got.abs().max().item())


def _min_max_int4(weight: torch.Tensor, group: int) -> torch.Tensor:
    """``weight`` rounded onto each group's min/max range in 16 steps (bfloat16 scale and zero, as
    stored): the plain int4 rounding the fitted one is measured against."""
    groups = weight.reshape(weight.shape[0], -1, group)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).bfloat16().float()
    zero = (low + 8 * scale).bfloat16().float()
    q = torch.round((groups - zero) / scale + 8).clamp(0, 15)
    return ((q - 8) * scale + zero).reshape(weight.shape)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("seed", [0, 1])
def test_int4_rounding_beats_min_max_on_weights_with_outliers(group, seed):
    """A few input channels 8x larger (as trained LMs have) stretch min/max rounding's grid; the
    least-squares refits reconstruct every group at least as well and the whole matrix better
    (measured 0.86-0.90 of the squared error; the clipping search before them: 0.92-1.0), and
    leave each group's errors a far smaller common offset (0.11-0.20 of the summed error; before:
    0.88-1.07), the part a layer with a non-zero mean input amplifies."""
    torch.manual_seed(seed)
    weight = torch.randn(64, 256) * 0.02
    weight[:, torch.randperm(256)[:8]] *= 8
    fitted = dequantize_int4(*quantize_int4(weight, group), group) - weight
    plain = _min_max_int4(weight, group) - weight
    per_group = lambda error: error.reshape(64, -1, group).pow(2).sum(-1)  # noqa: E731
    assert (per_group(fitted) <= per_group(plain) * (1 + 1e-6)).all()
    assert fitted.pow(2).mean() < 0.95 * plain.pow(2).mean()
    offset = lambda error: error.reshape(64, -1, group).sum(-1).abs().mean()  # noqa: E731
    assert offset(fitted) < 0.3 * offset(plain)


def test_int4_rounding_stays_in_the_kernel_format():
    """Packed nibbles, bfloat16 scales > 0 and zeros, all finite, also for constant, zero and tiny
    groups and large values; a weight already on an int4 grid comes back exactly."""
    torch.manual_seed(2)
    weight = torch.randn(32, 128)
    weight[0, :32] = 0.25  # constant group
    weight[1, :32] = 0.0
    weight[2, :32] *= 1e-9
    weight[3] *= 1e4
    nibbles, scales, zeros = quantize_int4(weight, 32)
    assert nibbles.dtype == torch.uint8 and nibbles.shape == (32, 64)
    assert scales.dtype == zeros.dtype == torch.bfloat16 and scales.shape == zeros.shape == (32, 4)
    assert torch.isfinite(scales.float()).all() and (scales.float() > 0).all() and torch.isfinite(zeros.float()).all()
    restored = dequantize_int4(nibbles, scales, zeros, 32)
    assert torch.isfinite(restored).all()
    assert torch.equal(restored[:2, :32], weight[:2, :32])
    assert (restored[2, :32] - weight[2, :32]).abs().max() < 1e-5
    on_grid = dequantize_int4(*quantize_int4(torch.randn(32, 128), 32), 32)
    torch.testing.assert_close(dequantize_int4(*quantize_int4(on_grid, 32), 32), on_grid, rtol=0, atol=1e-6)


@pytest.mark.parametrize("group", [32, 128])
def test_gptq_rounding_fits_the_inputs_it_will_see(group):
    """Inputs that span few directions (with a mean): GPTQ rounding keeps the product with new
    inputs of that kind much closer than rounding the weight alone (measured ~0.12 of the
    squared error), in the same stored format."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=gen) * 0.02
    mixing = torch.randn(48, 256, generator=gen)

    def inputs(n: int) -> torch.Tensor:
        return torch.randn(n, 48, generator=gen) @ mixing + 0.1 * torch.randn(n, 256, generator=gen) + 0.5

    calibration = inputs(512)
    nibbles, scales, zeros = gptq_int4(weight, calibration.T @ calibration / 512, group)
    assert nibbles.dtype == torch.uint8 and nibbles.shape == (64, 128)
    assert scales.dtype == zeros.dtype == torch.bfloat16 and scales.shape == (64, 256 // group)
    new = inputs(512)
    calibrated = (new @ (dequantize_int4(nibbles, scales, zeros, group) - weight).T).pow(2).mean()
    plain = (new @ (dequantize_int4(*quantize_int4(weight, group), group) - weight).T).pow(2).mean()
    assert calibrated < 0.3 * plain


def test_calibrated_lm_is_closer_and_loads_like_any_int4():
    """quantize_lm_calibrated: logits on codes it never saw closer to float32 than quantize_lm's
    (measured 0.056 vs 0.075 of the logits' std), with quantize_lm's exact buffers, so a meta
    model quantized the plain way takes its state dict (the quantized folder's load path)."""
    model = _model()
    sequence, condition = _inputs()
    gen = torch.Generator().manual_seed(10)
    codes = torch.randint(0, CONFIG.card, (16, CONFIG.num_codebooks, 24), generator=gen)
    calibrated = quantize_lm_calibrated(_copy(model), codes, condition=torch.randn(16, 5, CONFIG.dim, generator=gen),
                                        dtype="int4-g32")
    plain = quantize_lm(_copy(model), "int4-g32")
    assert calibrated.quantization == plain.quantization
    with torch.inference_mode():
        reference = model(sequence, condition=condition)
        errors = [(m(sequence, condition=condition) - reference).pow(2).mean().sqrt() for m in (calibrated, plain)]
    assert errors[0] < 0.9 * errors[1]
    state, expected = calibrated.state_dict(), plain.state_dict()
    assert state.keys() == expected.keys()
    assert all(state[k].dtype == expected[k].dtype and state[k].shape == expected[k].shape for k in state)
    assert not all(torch.equal(state[k], expected[k]) for k in state)
    with torch.device("meta"):
        empty = LMModel(CONFIG)
    quantize_lm(empty, "int4-g32")
    empty.load_state_dict(state, assign=True)
    assert torch.equal(empty.eval()(sequence, condition=condition), calibrated(sequence, condition=condition))


def test_calibrated_quantization_refuses_int8_and_leaves_the_model_on_error():
    model = _model()
    sequence, condition = _inputs()
    with torch.inference_mode():
        before = model(sequence, condition=condition)
    with pytest.raises(ValueError, match="calibrated quantization rounds int4"):
        quantize_lm_calibrated(model, sequence, condition=condition, dtype="int8")
    with pytest.raises(ValueError, match="expected codes"):  # the model's own check, mid-calibration
        quantize_lm_calibrated(model, sequence[:, :2], condition=condition)
    assert model.quantization is None and model.training is False
    assert isinstance(model.transformer.layers[0].linear1.weight, nn.Parameter)
    with torch.inference_mode():
        assert torch.equal(model(sequence, condition=condition), before)


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


def test_int4_folder_keeps_the_fitted_rounding(tmp_path, shipped):
    """A saved int4 folder holds quantize_int4's nibbles and bfloat16 scales and zeros as computed
    (nothing re-rounded on save or on the meta-device load), so the loaded weights keep the
    fitted rounding's error, below min/max rounding's."""
    folder = MusicGen.from_pretrained(SHIPPED, device="cpu", dtype="int4").save_pretrained(tmp_path / "q")
    loaded = MusicGen.from_pretrained(folder, device="cpu").lm
    for index in (0, len(loaded.transformer.layers) - 1):
        floats, stored = shipped.lm.transformer.layers[index], loaded.transformer.layers[index]
        for path in ("linear1.weight", "linear2.weight", "self_attn.in_proj_weight"):
            weight, quantized = floats.get_parameter(path).detach(), stored.get_submodule(path)
            expected = dict(zip(("qweight", "scales", "zeros"), quantize_int4(weight, 32)))
            assert all(torch.equal(getattr(quantized, k), v) and getattr(quantized, k).dtype == v.dtype
                       for k, v in expected.items())
            error = (quantized.dequantize() - weight).pow(2).mean()
            assert error < 0.92 * (_min_max_int4(weight, 32) - weight).pow(2).mean(), path


def test_calibrated_shipped_model_saves_a_folder_that_loads(tmp_path, shipped):
    """The offline path: calibrate on the model's own generations, save_pretrained, load (no
    dtype): the same logits."""
    generator = MusicGen.from_pretrained(SHIPPED, device="cpu")
    prompts = ["slow violin", "fast drums"]
    codes = generator.generate(prompts, 1.0, seed=3, return_tokens=True).tokens
    conditions = generator.prepare_conditions(prompts, guided=True)
    quantize_lm_calibrated(generator.lm, codes.repeat(2, 1, 1), condition=conditions.condition,
                           condition_mask=conditions.condition_mask, dtype="int4")
    folder = Path(generator.save_pretrained(tmp_path / "calibrated"))
    assert json.loads((folder / "config.json").read_text())["lm_quantization"]["dtype"] == "int4"
    loaded = MusicGen.from_pretrained(folder, device="cpu")
    assert loaded.lm.quantization == QuantConfig.parse("int4")
    sequence = torch.randint(0, shipped.lm.config.card, (1, 4, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(loaded.lm(sequence), generator.lm(sequence))


def test_readme_calibration_block_runs_as_written(tmp_path, monkeypatch, shipped):
    from test_readme_examples import blocks  # noqa: PLC0415
    [block] = blocks("CPU quantization (int8/int4)", "python")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    loaded = MusicGen.from_pretrained(tmp_path / "tokenwave-small-int4-gptq", device="cpu")
    assert loaded.lm.quantization == QuantConfig.parse("int4")
    assert isinstance(loaded.lm.transformer.layers[0].linear2.weight, QuantizedWeight)


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
    # a quantized LM keeps a bfloat16 cache where lm.cpu_kernels attends it (see test_cpu_kernels)
    assert model.init_state(4, 8).caches[0].keys.dtype == (torch.bfloat16 if cpu_kernels.available()
                                                           else torch.float32)
    model.kv_cache_dtype = torch.float32
    assert model.init_state(4, 8).caches[0].keys.dtype == torch.float32
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


def test_int8_kernel_gets_aligned_rows_from_a_misaligned_checkpoint():
    """A memory-mapped safetensors file can place qweight/scales at any 8-byte offset; torch's int8
    CPU kernel then read out of bounds (a segfault): the weight copies them to aligned memory."""
    torch.manual_seed(0)
    weight = QuantizedWeight.from_float(torch.randn(256, 256), 8)
    x = torch.randn(3, 256)
    with cpu_kernels.using(False):  # torch's kernel (tokenwave's own reads unaligned memory)
        expected = weight.rows_linear(0, 256, x, None)

    def misaligned(t: torch.Tensor) -> torch.Tensor:
        raw = torch.empty(t.numel() * t.element_size() + 64 + 24, dtype=torch.uint8)
        start = (-raw.data_ptr()) % 64 + 24
        view = raw[start:start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t)
        return view

    shifted = QuantizedWeight(misaligned(weight.qweight), misaligned(weight.scales))
    assert shifted.qweight.data_ptr() % 64 == 24
    with cpu_kernels.using(False):
        assert torch.equal(shifted.rows_linear(0, 256, x, None), expected)
    assert shifted.qweight.data_ptr() % 64 == 0
