"""tokenwave's int4 x int8 CPU kernel (lm.cpu_kernels): exact against its float64 definition for every
row-block remainder and group size, deterministic across thread counts, NaN in -> NaN out, and the
fallback to torch's kernel when it cannot be compiled."""
from __future__ import annotations

import warnings

import pytest
import torch

from lm import cpu_kernels
from lm.quant import QuantizedWeight, quantize_int4, quantize_int8

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(),
                                  reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")


def _weight(N: int, K: int, group: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return quantize_int4(torch.randn(N, K, generator=gen) * 0.02, group)


@needs_kernel
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_kernel_equals_its_definition(group, rows):
    N, K = 48, 256
    nibbles, scales, zeros = _weight(N, K, group)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    x[0, :group] = 0  # an all-zero group: scale 0
    got = cpu_kernels.int4_linear(x, cpu_kernels.int4_pack(nibbles, scales, zeros, group), N, group)
    exact = cpu_kernels.int4_reference(x, nibbles, scales, zeros, group)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-6 * exact.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("K", [16, 96, 256, 1024])
@pytest.mark.parametrize("rows", [1, 2, 3, 8])
def test_int8_kernel_equals_its_definition_and_float(K, rows):
    gen = torch.Generator().manual_seed(K + rows)
    weight = torch.randn(32, K, generator=gen) * 0.02
    q, scales = quantize_int8(weight)
    x = torch.randn(rows, K, generator=gen) * torch.linspace(0.1, 10, K)  # a wide range across channels
    got = cpu_kernels.int8_linear(x, *cpu_kernels.int8_pack(q, scales))
    exact = cpu_kernels.int8_reference(x, q, scales)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-6 * exact.abs().max().item())
    # the activations' two roundings carry ~15 bits: the product is that of the int8 weight
    product = x.double() @ (q.double() * scales.double()[:, None]).T
    assert (got.double() - product).norm() < 1e-4 * product.norm()


@needs_kernel
def test_kernel_is_deterministic_across_threads():
    nibbles, scales, zeros = _weight(256, 512, 32)
    packed = cpu_kernels.int4_pack(nibbles, scales, zeros, 32)
    x = torch.randn(2, 512)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.int4_linear(x, packed, 256, 32)
        torch.set_num_threads(2)
        two = cpu_kernels.int4_linear(x, packed, 256, 32)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_kernel
def test_non_finite_inputs_give_nan_not_a_number():
    nibbles, scales, zeros = _weight(32, 64, 32)
    packed = cpu_kernels.int4_pack(nibbles, scales, zeros, 32)
    x = torch.randn(3, 64)
    x[0, 5], x[1, 40] = float("nan"), float("inf")
    for out in (cpu_kernels.int4_linear(x, packed, 32, 32),
                cpu_kernels.int8_linear(x, *cpu_kernels.int8_pack(*quantize_int8(torch.randn(32, 64))))):
        assert out[0].isnan().all() and not out[1].isfinite().any() and out[2].isfinite().all()


@needs_kernel
def test_quantized_weight_uses_the_kernel_and_torch_when_told():
    torch.manual_seed(0)
    weight = QuantizedWeight.from_float(torch.randn(64, 128) * 0.02, 4, 32)
    x = torch.randn(2, 128)
    native = weight.linear(x)
    with cpu_kernels.using(False):
        torch_kernel = weight.linear(x)
    exact = cpu_kernels.int4_reference(x, weight.qweight, weight.scales, weight.zeros, 32).float()
    torch.testing.assert_close(native, exact, rtol=1e-5, atol=1e-6)
    assert not torch.equal(native, torch_kernel)  # torch's rounds the activations to bfloat16 instead
    assert (native - torch_kernel).norm() < 0.05 * torch_kernel.norm()
    # bfloat16 activations come back in bfloat16
    assert weight.linear(x.bfloat16()).dtype == torch.bfloat16
    int8 = QuantizedWeight.from_float(torch.randn(64, 128) * 0.02, 8)
    exact = cpu_kernels.int8_reference(x, int8.qweight, int8.scales).float()
    torch.testing.assert_close(int8[16:48].linear(x), exact[:, 16:48], rtol=1e-5, atol=1e-6)


def test_without_a_compiler_it_warns_once_and_torch_kernel_runs(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels.KERNELS, "_library", None)
    monkeypatch.setattr(cpu_kernels.KERNELS, "_failure", None)
    monkeypatch.setenv("TOKENWAVE_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="CPU kernels are unavailable"):
        assert not cpu_kernels.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        assert not cpu_kernels.available()
    assert "no-such-compiler" in cpu_kernels.unavailable_reason() or "x86-64" in cpu_kernels.unavailable_reason()
    assert not list(tmp_path.glob("**/*.so"))  # no half-built library left behind
    torch.manual_seed(0)
    weight = QuantizedWeight.from_float(torch.randn(64, 128) * 0.02, 4, 32)
    x = torch.randn(2, 128)
    expected = x.bfloat16().float() @ weight.dequantize().T
    torch.testing.assert_close(weight.linear(x), expected, rtol=1e-2, atol=1e-2)


@needs_kernel
def test_compiles_into_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels.KERNELS, "_library", None)
    monkeypatch.setattr(cpu_kernels.KERNELS, "_failure", None)
    monkeypatch.setenv("TOKENWAVE_KERNEL_CACHE", str(tmp_path))
    assert cpu_kernels.available()
    built = list(tmp_path.glob("lm_cpu_kernels-*.so"))
    assert len(built) == 1 and list(tmp_path.iterdir()) == built  # the temporary file was renamed


@needs_kernel
@pytest.mark.parametrize("T,masked,D", [(1, False, 64), (15, True, 8), (16, False, 32), (37, True, 40),
                                         (300, False, 64)])
def test_decode_attention_equals_softmax_attention(T, masked, D):
    gen = torch.Generator().manual_seed(T)
    B, H, max_len = 2, 3, 320
    q = torch.randn(B, H, 1, D, generator=gen)
    cache_k = torch.randn(B, H, max_len, D, generator=gen).bfloat16()
    cache_v = torch.randn(B, H, max_len, D, generator=gen).bfloat16()
    k, v = cache_k[:, :, :T], cache_v[:, :, :T]  # views of the cache, as the decoder passes them
    mask = None
    if masked:
        mask = torch.rand(B, 1, 1, T, generator=gen) > 0.4
        mask[..., T - 1] = True  # a query always sees itself
    assert cpu_kernels.attention_fits(q, k)
    got = cpu_kernels.decode_attention(q, k, v, mask)
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=2e-6)


@needs_kernel
def test_quantized_lm_decodes_with_a_bfloat16_cache_like_float32_attention():
    from lm import LMModel, get_preset  # noqa: PLC0415
    from lm.quant import quantize_lm  # noqa: PLC0415

    torch.manual_seed(0)
    model = quantize_lm(LMModel(get_preset("tiny")).eval(), "int4")
    assert model.kv_dtype() == torch.bfloat16  # quantized, on a CPU with the kernels
    with cpu_kernels.using(False):
        assert model.kv_dtype() == torch.float32
    model.kv_cache_dtype = torch.float32
    assert model.kv_dtype() == torch.float32
    model.kv_cache_dtype = None
    condition = torch.randn(2, 5, model.config.dim)
    kwargs = dict(max_gen_len=20, num_samples=1, condition=condition, use_sampling=False, cfg_coef=3.0)
    calls = []
    original = cpu_kernels.decode_attention

    def counted(*args):
        calls.append(args[1].shape[2])
        return original(*args)

    cpu_kernels.decode_attention = counted
    try:
        native = model.generate(**kwargs)
    finally:
        cpu_kernels.decode_attention = original
    assert calls and max(calls) > 10  # every step after the first attended the cache natively
    model.kv_cache_dtype = torch.bfloat16
    with cpu_kernels.using(False):  # the same bfloat16 cache attended by torch's attention
        reference = model.generate(**kwargs)
    assert (native == reference).float().mean() > 0.9



@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
def test_one_copy_of_the_weight_after_packing_and_exact_state(bits):
    torch.manual_seed(0)
    weight = QuantizedWeight.from_float(torch.randn(96, 128) * 0.02, bits, 32)
    original = {name: tensor.clone() for name, tensor in weight.state_dict().items()}
    size = weight.stored_bytes()
    x = torch.randn(2, 128)
    first = weight[32:64].linear(x)  # a row view: the whole weight is packed once
    assert all(t.numel() == 0 for t in weight._buffers.values())  # the portable buffers were dropped
    assert weight.stored_bytes() == size == sum(t.numel() * t.element_size() for t in original.values())
    assert weight.shape == (96, 128) and weight.device.type == "cpu" and "int" in repr(weight)
    state = weight.state_dict()  # rebuilt from the packed form, exactly, without keeping them
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
    assert all(t.numel() == 0 for t in weight._buffers.values())
    assert torch.equal(weight.linear(x)[:, 32:64], first)
    assert torch.equal(weight.qweight, original["qweight"])  # reading a buffer brings it back
    assert torch.equal(weight.dequantize(), QuantizedWeight(*original.values(), group_size=32).dequantize()
                       if bits == 4 else QuantizedWeight(*original.values()).dequantize())
    # new integers replace the packed form
    weight.load_state_dict({k: v.flip(0) for k, v in original.items()})
    assert torch.equal(weight.linear(x), QuantizedWeight(*(v.flip(0) for v in original.values()),
                                                         group_size=32 if bits == 4 else 0).linear(x))
