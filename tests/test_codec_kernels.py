"""The codec's fused CPU kernels (codec.cpu_kernels): moments, affine + residual + ELU, the LSTM
recurrence, each against torch's float64 or its own modules; the runner with and without them."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from codec import EncodecModel, cpu_kernels, native
from codec.runners import run_time_major

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(),
                                  reason=f"CPU kernels unavailable: {cpu_kernels.KERNELS.unavailable_reason()}")


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 7, 3), (3, 1000, 48), (1, 40000, 32)])
def test_moments_are_float64_sums(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1])) * 3 + 1
    total, squares = cpu_kernels.moments(x)
    flat = x.double().reshape(shape[0], -1)
    torch.testing.assert_close(total, flat.sum(1), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(squares, (flat * flat).sum(1), rtol=1e-12, atol=1e-9)


@needs_kernel
@pytest.mark.parametrize("channels", [1, 15, 16, 33, 128])
def test_affine_residual_elu_against_float64(channels):
    gen = torch.Generator().manual_seed(channels)
    x, add = torch.randn(2, 37, channels, generator=gen) * 4, torch.randn(2, 37, channels, generator=gen)
    scale, shift, add_scale = (torch.randn(2, channels, generator=gen) for _ in range(3))
    got = cpu_kernels.affine_elu(x, scale=scale, shift=shift, add=add, add_scale=add_scale, alpha=0.7)
    d = lambda t: t.double()  # noqa: E731
    want = F.elu(d(x) * d(scale)[:, None] + d(add) * d(add_scale)[:, None] + d(shift)[:, None], 0.7)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)
    with native.using(False):  # torch's operations compute the same
        torch.testing.assert_close(cpu_kernels.affine_elu(x, scale=scale, shift=shift, add=add,
                                                          add_scale=add_scale, alpha=0.7), got,
                                   rtol=1e-5, atol=1e-5)


@needs_kernel
def test_elu_within_an_ulp_of_expm1_and_special_values():
    x = torch.cat([torch.linspace(-40, 3, 400_001), -torch.logspace(-30, 1, 20_001)]).reshape(1, -1, 1)
    got = cpu_kernels.affine_elu(x, alpha=1.0).double()
    want = F.elu(x.double())
    ulps = (got - want).abs() / (want.abs() * torch.finfo(torch.float32).eps).clamp_min(1e-45)
    assert ulps.max() <= 1.0
    special = torch.tensor([[[float("nan"), float("-inf"), float("inf"), -0.0, -1e-30]]])
    out = cpu_kernels.affine_elu(special, alpha=2.0)[0, 0]
    assert out[0].isnan() and out[1] == -2.0 and out[2] == float("inf") and out[3] == 0 and out[4] == -2e-30


@needs_kernel
def test_affine_writes_into_the_middle_of_a_padded_buffer():
    x = torch.randn(3, 50, 32)
    buffer = torch.full((3, 56, 32), 7.0)
    cpu_kernels.affine_elu(x, alpha=1.0, out=buffer[:, 4:54])
    assert torch.equal(buffer[:, :4], torch.full((3, 4, 32), 7.0))
    assert torch.equal(buffer[:, 54:], torch.full((3, 2, 32), 7.0))
    torch.testing.assert_close(buffer[:, 4:54], F.elu(x), rtol=2e-7, atol=1e-7)


@needs_kernel
@pytest.mark.parametrize("hidden,batch,layers", [(16, 1, 1), (64, 3, 2), (128, 7, 2), (1024, 1, 1)])
def test_lstm_equals_torch(hidden, batch, layers):
    """Every batch block size (up to 6 sequences per pass over the weights, then the rest)."""
    torch.manual_seed(hidden)
    lstm = torch.nn.LSTM(hidden, hidden, layers)
    x = torch.randn(23, batch, hidden)
    with torch.inference_mode():
        want = lstm(x)[0]
        got = cpu_kernels.lstm(lstm, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # new weights: the packed copy follows them
        lstm.weight_hh_l0.mul_(0.5)
    with torch.inference_mode():
        torch.testing.assert_close(cpu_kernels.lstm(lstm, x), lstm(x)[0], rtol=1e-5, atol=1e-6)


def test_lstm_fits_only_plain_float32_lstms():
    x = torch.randn(5, 1, 32)
    assert not cpu_kernels.lstm_fits(torch.nn.LSTM(32, 32, bidirectional=True), x)
    assert not cpu_kernels.lstm_fits(torch.nn.LSTM(32, 24), x)
    assert not cpu_kernels.lstm_fits(torch.nn.LSTM(32, 32).double(), x.double())
    assert cpu_kernels.lstm_fits(torch.nn.LSTM(32, 32), x) == cpu_kernels.available()


@pytest.mark.parametrize("preset", ["encodec_24khz", "encodec_48khz", "encodec_32khz"])
def test_runner_with_and_without_the_kernels(preset):
    """The fused passes (GroupNorm statistics, deferred affine, residual sums, ELU into padded
    buffers, the LSTM) give the modules' output to float rounding, as torch's passes do."""
    torch.manual_seed(0)
    model = EncodecModel.from_preset(preset, n_filters=4, dimension=16, ratios=(4, 2),
                                     n_residual_layers=2, segment=0.05 if preset == "encodec_48khz" else None)
    with torch.no_grad():  # codebooks from N(0, 1) so that codes vary
        for layer in model.quantizer.vq.layers:
            layer._codebook.embed.normal_()
            layer._codebook.inited.fill_(1.0)
    model.prepare_for_inference(exact_codes=False)
    wav = torch.randn(2, model.config.channels, 1999)
    with torch.inference_mode():
        latent = model.encoder(wav)
        audio = model.decoder(latent)
        for enabled in (True, False):
            with native.using(enabled):
                fast_latent = run_time_major(model.encoder.model, wav.transpose(1, 2)).transpose(1, 2)
                fast_audio = run_time_major(model.decoder.model, latent.transpose(1, 2)).transpose(1, 2)
            assert (fast_latent - latent).abs().max() < 1e-5 * latent.abs().max()
            assert (fast_audio - audio).abs().max() < 1e-5 * audio.abs().max()
    with native.using(False):
        off = copy.deepcopy(model).encode(wav)
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(model.encode(wav), off))
