"""tokenwave's int4 x int8 CPU kernel (lm.int4_cpu): exact against its float64 definition for every
row-block remainder and group size, deterministic across thread counts, NaN in -> NaN out, and the
fallback to torch's kernel when it cannot be compiled."""
from __future__ import annotations

import warnings

import pytest
import torch

from lm import int4_cpu
from lm.quant import QuantizedWeight, quantize_int4

needs_kernel = pytest.mark.skipif(not int4_cpu.available(),
                                  reason=f"int4 CPU kernel unavailable: {int4_cpu.unavailable_reason()}")


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
    got = int4_cpu.linear(x, int4_cpu.pack(nibbles, scales, zeros, group), N, group)
    exact = int4_cpu.reference(x, nibbles, scales, zeros, group)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-6 * exact.abs().max().item())


@needs_kernel
def test_kernel_is_deterministic_across_threads():
    nibbles, scales, zeros = _weight(256, 512, 32)
    packed = int4_cpu.pack(nibbles, scales, zeros, 32)
    x = torch.randn(2, 512)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = int4_cpu.linear(x, packed, 256, 32)
        torch.set_num_threads(2)
        two = int4_cpu.linear(x, packed, 256, 32)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_kernel
def test_non_finite_inputs_give_nan_not_a_number():
    nibbles, scales, zeros = _weight(32, 64, 32)
    packed = int4_cpu.pack(nibbles, scales, zeros, 32)
    x = torch.randn(3, 64)
    x[0, 5], x[1, 40] = float("nan"), float("inf")
    out = int4_cpu.linear(x, packed, 32, 32)
    assert out[0].isnan().all() and not out[1].isfinite().any() and out[2].isfinite().all()


@needs_kernel
def test_quantized_weight_uses_the_kernel_and_torch_when_told():
    torch.manual_seed(0)
    weight = QuantizedWeight.from_float(torch.randn(64, 128) * 0.02, 4, 32)
    x = torch.randn(2, 128)
    native = weight.linear(x)
    with int4_cpu.using(False):
        torch_kernel = weight.linear(x)
    exact = int4_cpu.reference(x, weight.qweight, weight.scales, weight.zeros, 32).float()
    torch.testing.assert_close(native, exact, rtol=1e-5, atol=1e-6)
    assert not torch.equal(native, torch_kernel)  # torch's rounds the activations to bfloat16 instead
    assert (native - torch_kernel).norm() < 0.05 * torch_kernel.norm()
    # bfloat16 activations come back in bfloat16
    assert weight.linear(x.bfloat16()).dtype == torch.bfloat16


def test_without_a_compiler_it_warns_once_and_torch_kernel_runs(monkeypatch, tmp_path):
    monkeypatch.setattr(int4_cpu, "_library", None)
    monkeypatch.setattr(int4_cpu, "_failure", None)
    monkeypatch.setenv("TOKENWAVE_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="int4 CPU kernel is unavailable"):
        assert not int4_cpu.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        assert not int4_cpu.available()
    assert "no-such-compiler" in int4_cpu.unavailable_reason() or "x86-64" in int4_cpu.unavailable_reason()
    assert not list(tmp_path.glob("**/*.so"))  # no half-built library left behind
    torch.manual_seed(0)
    weight = QuantizedWeight.from_float(torch.randn(64, 128) * 0.02, 4, 32)
    x = torch.randn(2, 128)
    expected = x.bfloat16().float() @ weight.dequantize().T
    torch.testing.assert_close(weight.linear(x), expected, rtol=1e-2, atol=1e-2)


@needs_kernel
def test_compiles_into_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(int4_cpu, "_library", None)
    monkeypatch.setattr(int4_cpu, "_failure", None)
    monkeypatch.setenv("TOKENWAVE_KERNEL_CACHE", str(tmp_path))
    assert int4_cpu.available()
    built = list(tmp_path.glob("int4_cpu-*.so"))
    assert len(built) == 1 and list(tmp_path.iterdir()) == built  # the temporary file was renamed
