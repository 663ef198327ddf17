"""EnCodec building blocks and EncodecModel behaviour on tiny configs (milliseconds each).

Compatibility with the original release is in test_encodec_oracle.py; here: padding and
length rules, bandwidth handling and errors, residual VQ training features, stereo
interleaving, 48 kHz chunking, ragged batches, weight-norm folding, the inference runners of
codec.fast and dtype/device handling.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from codec import EncodecModel, EncodedFrame, InterleavedStereo
from codec.conv import (StreamableConv1d, StreamableConvTranspose1d, fold_weight_norm, pad1d)
from codec.runners import pad_time_major, run_channel_major, run_time_major
from codec.model import linear_overlap_add
from codec.quantization import ResidualVectorQuantizer

TINY = dict(n_filters=4, dimension=16, num_codebooks=4, codebook_size=32)
PRESET_NAMES = ("encodec_24khz", "encodec_48khz", "encodec_32khz", "encodec_16khz")


def tiny(preset: str = "encodec_24khz", seed: int = 0, **overrides) -> EncodecModel:
    """A preset's architecture at 4 filters, codebooks from N(0, 1) so that codes vary."""
    torch.manual_seed(seed)
    if preset == "encodec_48khz":
        overrides.setdefault("segment", 0.02)  # 960-sample chunks keep the tests fast
    model = EncodecModel.from_preset(preset, **{**TINY, **overrides})
    with torch.no_grad():
        for layer in model.quantizer.vq.layers:
            layer._codebook.embed.normal_()
            layer._codebook.inited.fill_(1.0)
    return model.eval()


def noise(model: EncodecModel, length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(batch, model.channels, length, generator=gen)


# -- lengths and padding ------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["encodec_24khz", "encodec_32khz"])
@pytest.mark.parametrize("length", [1, 2, 319, 320, 321, 641, 1283])
def test_l_samples_give_ceil_l_over_hop_frames_and_back_frames_times_hop(preset, length):
    model = tiny(preset)
    frames = model.encode(noise(model, length, batch=2))
    assert len(frames) == 1 and frames[0].scale is None
    assert frames[0].codes.shape == (2, model.num_codebooks, math.ceil(length / model.hop_length))
    audio = model.decode(frames)
    assert audio.shape == (2, 1, frames[0].codes.shape[-1] * model.hop_length)
    assert model(noise(model, length)).shape == (1, 1, length)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kernel,stride,dilation", [(7, 1, 1), (3, 1, 2), (4, 2, 1), (16, 8, 1),
                                                    (1, 1, 1)])
@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_streamable_conv_gives_ceil_length_over_stride(kernel, stride, dilation, causal, pad_mode):
    conv = StreamableConv1d(3, 5, kernel, stride=stride, dilation=dilation, causal=causal,
                            pad_mode=pad_mode)
    for length in (1, 2, 5, 17, 64):
        assert conv(torch.randn(2, 3, length)).shape == (2, 5, math.ceil(length / stride))


@pytest.mark.parametrize("causal", [True, False])
def test_streamable_transposed_conv_gives_length_times_stride(causal):
    conv = StreamableConvTranspose1d(4, 2, 10, stride=5, causal=causal)
    for frames in (1, 3, 8):
        assert conv(torch.randn(1, 4, frames)).shape == (1, 2, frames * 5)


def test_reflect_pad_of_an_input_shorter_than_the_pad():
    # Zero-extend to 4 samples, reflect, drop the extension again (the references' rule).
    x = torch.tensor([[[5.0]]])
    assert pad1d(x, (2, 3), mode="reflect").flatten().tolist() == [0, 0, 5, 0, 0, 0]
    x = torch.tensor([[[1.0, 2.0]]])
    assert pad1d(x, (3, 1), mode="reflect").flatten().tolist() == [0, 0, 2, 1, 2, 0]
    assert pad1d(x, (1, 1), mode="reflect").flatten().tolist() == [2, 1, 2, 1]


@pytest.mark.parametrize("mode", ["reflect", "constant", "replicate"])
@pytest.mark.parametrize("length,left,right", [(1, 2, 3), (2, 3, 1), (3, 3, 0), (9, 2, 4),
                                               (9, 0, 0), (4, 0, 5)])
def test_time_major_pad_equals_pad1d(mode, length, left, right):
    x = torch.randn(2, 3, length)
    want = pad1d(x, (left, right), mode=mode)
    got = pad_time_major(x.transpose(1, 2).contiguous(), left, right, mode)
    assert torch.equal(got.transpose(1, 2), want)


# -- codebooks and bandwidth --------------------------------------------------------------------
def test_bandwidth_maps_to_codebooks_and_bad_requests_raise():
    model = tiny("encodec_24khz", num_codebooks=32, codebook_size=1024)  # 0.75 kbps each
    for kbps, count in {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32, 0.75: 1, 0.1: 1,
                        2.0: 2}.items():
        assert model.num_codebooks_for_bandwidth(kbps) == count
    assert model.resolve_codebooks() == 32  # neither argument: every codebook
    with pytest.raises(ValueError, match="at most 24 kbps"):
        model.encode(noise(model, 400), bandwidth=25.0)
    with pytest.raises(ValueError, match="positive"):
        model.resolve_codebooks(bandwidth=0.0)
    for bad in (0, 33, -1):
        with pytest.raises(ValueError, match="between 1 and 32"):
            model.encode(noise(model, 400), num_codebooks=bad)
    with pytest.raises(ValueError, match="not both"):
        model.encode(noise(model, 400), num_codebooks=2, bandwidth=1.5)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_every_codebook_count_works_and_is_a_prefix(preset):
    model = tiny(preset).prepare_for_inference()
    wav = noise(model, 700)
    full = model.encode(wav)
    for count in range(1, model.num_codebooks + 1):
        frames = model.encode(wav, num_codebooks=count)
        for got, want in zip(frames, full):
            assert torch.equal(got.codes, want.codes[:, :count])
        assert model.decode(frames).shape[-1] >= wav.shape[-1]
    assert model.bandwidth_per_codebook == model.bits_per_codebook * model.frame_rate / 1000


def test_wrong_shapes_and_values_raise_clear_errors():
    model = tiny("encodec_24khz")
    with pytest.raises(ValueError, match=r"\(batch, channels, samples\)"):
        model.encode(torch.randn(1, 400))
    with pytest.raises(ValueError, match="expects 1 channel"):
        model.encode(torch.randn(1, 2, 400))
    with pytest.raises(ValueError, match="empty"):
        model.encode(torch.randn(1, 1, 0))
    with pytest.raises(ValueError, match="lie in"):
        model.decode(torch.full((1, 2, 3), model.codebook_size))
    with pytest.raises(ValueError, match="between 1 and"):
        model.decode(torch.zeros(1, model.num_codebooks + 1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="no frames"):
        model.decode([])
    with pytest.raises(ValueError, match="one chunk"):
        frame = EncodedFrame(torch.zeros(1, 2, 3, dtype=torch.long), None)
        model.decode([frame, frame])
    with pytest.raises(ValueError, match="item 1 is a tensor of shape"):
        model.encode_batch([torch.randn(1, 10), torch.randn(1, 1, 10)])
    with pytest.raises(ValueError, match="expects 1 channel"):
        model.encode_batch([torch.randn(2, 10)])
    with pytest.raises(ValueError, match=r"item 0 has shape"):
        model.decode_batch([torch.zeros(1, 2, 3, dtype=torch.long)])
    with pytest.raises(ValueError, match="unknown EnCodec preset"):
        EncodecModel.from_preset("encodec_44khz")


# -- residual VQ training -----------------------------------------------------------------------
def _rvq(**kwargs) -> ResidualVectorQuantizer:
    torch.manual_seed(0)
    return ResidualVectorQuantizer(dimension=8, num_codebooks=3, codebook_size=16,
                                   kmeans_iters=5, **kwargs).train()


def test_kmeans_init_on_the_first_training_batch():
    rvq = _rvq()
    books = [layer._codebook for layer in rvq.vq.layers]
    assert all(book.inited.item() == 0 and book.embed.abs().sum() == 0 for book in books)
    rvq(torch.randn(4, 8, 50) + 3.0)
    assert all(book.inited.item() == 1 and book.embed.abs().sum() > 0 for book in books)
    # The centroids: two tight clusters give two groups of codes, one at each centre.
    book = _rvq().vq.layers[0]._codebook
    centres = torch.stack([torch.full((8,), -4.0), torch.full((8,), 4.0)])
    data = centres.repeat_interleave(100, dim=0) + 0.01 * torch.randn(200, 8)
    book._init_from(data)
    nearest = torch.cdist(book.embed, centres).min(dim=1).values
    assert nearest.max() < 0.1 and book.cluster_size.sum() == 200


def test_ema_moves_the_codebook_toward_the_data():
    rvq = _rvq(threshold_ema_dead_code=0.0)
    book = rvq.vq.layers[0]._codebook
    rvq(torch.randn(4, 8, 50))
    target = torch.randn(4, 8, 50) + 10.0
    before = (book.embed - 10.0).abs().mean()
    for _ in range(20):
        rvq(target)
    assert (book.embed - 10.0).abs().mean() < before
    assert book.cluster_size.sum() > 0


def test_dead_codes_are_replaced_by_batch_vectors():
    book = _rvq(threshold_ema_dead_code=2.0).vq.layers[0]._codebook
    with torch.no_grad():
        book.embed.fill_(1e3)
        book.cluster_size.fill_(5.0)
        book.cluster_size[:4] = 1.0  # codes 0-3 below the threshold of 2
    rows = torch.randn(40, 8) - 5.0
    book._expire_dead_codes(rows)
    replaced = book.embed[:4]
    assert (replaced[:, None] == rows[None]).all(-1).any(-1).all()  # each is a batch vector
    assert (book.embed[4:] == 1e3).all()  # live codes kept


def test_dead_code_replacement_survives_the_training_step():
    # encodec/audiocraft lose the replacement in the EMA step right after it; we keep it
    rvq = _rvq(threshold_ema_dead_code=2.0)
    book = rvq.vq.layers[0]._codebook
    rvq(torch.randn(2, 8, 40))
    with torch.no_grad():
        book.cluster_size.zero_()
        book.embed_avg.fill_(1e3)
    batch = torch.randn(1, 8, 40) - 5.0
    rvq(batch)
    rows = batch.transpose(1, 2).reshape(-1, 8)
    assert torch.cdist(book.embed, rows).min(dim=1).values.max() < 1.0


def test_straight_through_gradient_reaches_the_encoder_and_commitment_loss_is_positive():
    model = tiny("encodec_24khz")
    model.train()
    for layer in model.quantizer.vq.layers:
        layer._codebook.inited.fill_(1.0)
    wav = noise(model, 960)
    latent = model.encoder(wav)
    result = model.quantizer(latent, num_codebooks=2)
    assert result.penalty.item() > 0 and result.codes.shape == (1, 2, 3)
    loss = model.decoder(result.quantized).pow(2).mean() + result.penalty
    loss.backward()
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_quantizer_dropout_varies_the_codebook_count_in_training_only():
    rvq = _rvq(quantizer_dropout=True)
    data = torch.randn(2, 8, 20)
    torch.manual_seed(1)
    counts = {rvq(data).num_codebooks for _ in range(30)}
    assert counts == {1, 2, 3}
    assert rvq(data, num_codebooks=2).num_codebooks == 2  # an explicit count wins
    rvq.eval()
    assert {rvq(data).num_codebooks for _ in range(5)} == {3}


# -- stereo and chunking --------------------------------------------------------------------------
def test_interleaved_stereo_layout_and_round_trip():
    mono = tiny("encodec_32khz").prepare_for_inference()
    stereo = InterleavedStereo(mono)
    wav = noise(mono, 1000, batch=2).repeat(1, 2, 1)
    wav[:, 1] *= -0.5
    codes = stereo.encode(wav, num_codebooks=3)
    assert codes.shape == (2, 6, math.ceil(1000 / mono.hop_length))
    for b in range(2):
        for channel in range(2):
            alone = mono.encode_to_codes(wav[b: b + 1, channel: channel + 1], num_codebooks=3)
            assert torch.equal(codes[b: b + 1, channel::2], alone)  # [L0, R0, L1, R1, ...]
    audio = stereo.decode(codes)
    assert audio.shape == (2, 2, codes.shape[-1] * mono.hop_length)
    for channel in range(2):
        want = mono.decode(codes[:, channel::2])
        assert (audio[:, channel: channel + 1] - want).abs().max() < 1e-6
    with pytest.raises(ValueError, match="mono"):
        InterleavedStereo(tiny("encodec_48khz"))
    with pytest.raises(ValueError, match=r"\(B, 2, T\)"):
        stereo.encode(wav[:, :1])


@pytest.mark.parametrize("length,chunks", [(1, 1), (950, 1), (960, 2), (1900, 2), (1901, 3),
                                           (4000, 5)])
def test_48khz_chunks_count_scales_and_lengths(length, chunks):
    model = tiny("encodec_48khz").prepare_for_inference()  # 960-sample segments, stride 950
    assert (model.segment_length, model.segment_stride) == (960, 950)
    wav = noise(model, length, batch=2)
    wav[1] *= 0.01
    frames = model.encode(wav, num_codebooks=2)
    assert len(frames) == chunks == len(range(0, length, 950))
    for i, frame in enumerate(frames):
        piece = wav[..., i * 950: i * 950 + 960]
        rms = piece.mean(dim=1).pow(2).mean(dim=-1).sqrt()
        assert torch.allclose(frame.scale.flatten(), 1e-8 + rms)
        assert frame.codes.shape == (2, 2, math.ceil(piece.shape[-1] / model.hop_length))
    audio = model.decode(frames)
    last = frames[-1].codes.shape[-1] * model.hop_length
    assert audio.shape == (2, 2, 950 * (chunks - 1) + last)
    # the quiet item decodes 100x quieter: scales are multiplied back
    ratio = audio[1].abs().mean() / audio[0].abs().mean()
    assert 0.005 < ratio < 0.02


def test_silent_chunk_gets_a_tiny_scale_and_stays_finite():
    model = tiny("encodec_48khz")
    frames = model.encode(torch.zeros(1, 2, 960))
    assert frames[0].scale.item() == pytest.approx(1e-8)
    assert torch.isfinite(model.decode(frames)).all()


def test_overlap_add_cross_fades_and_keeps_single_coverage():
    a, b = torch.ones(1, 10), 3 * torch.ones(1, 10)
    out = linear_overlap_add([a, b], stride=6)
    assert out.shape == (1, 16)
    assert torch.allclose(out[0, :6], torch.ones(6))
    assert torch.allclose(out[0, 10:], 3 * torch.ones(6))
    assert (out[0, 6:10].diff() > 0).all()  # linear fade from the first to the second


# -- ragged batches ---------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["encodec_24khz", "encodec_48khz"])
@pytest.mark.parametrize("exact", [True, False])
def test_batches_of_different_lengths_equal_encoding_each_alone(preset, exact):
    model = tiny(preset).prepare_for_inference(exact_codes=exact)
    lengths = [700, 2000, 700, 1, 2000, 2901]
    wavs = [noise(model, n, seed=i)[0] for i, n in enumerate(lengths)]
    batched = model.encode_batch(wavs, num_codebooks=3)
    assert len(batched) == len(wavs)
    for wav, frames in zip(wavs, batched):
        alone = model.encode(wav[None], num_codebooks=3)
        assert len(frames) == len(alone)
        for got, want in zip(frames, alone):
            assert torch.equal(got.codes, want.codes)
            assert (got.scale is None and want.scale is None) or torch.equal(got.scale, want.scale)
    decoded = model.decode_batch(batched)
    for frames, audio in zip(batched, decoded):
        want = model.decode(frames)[0]
        assert audio.shape == want.shape
        assert (audio - want).abs().max() < 1e-5
    assert model.encode_batch([]) == [] and model.decode_batch([]) == []


def test_decode_batch_takes_code_tensors_of_different_lengths():
    model = tiny("encodec_32khz").prepare_for_inference()
    codes = [torch.randint(0, model.codebook_size, (k, f)) for k, f in [(4, 5), (2, 9), (4, 5)]]
    for item, audio in zip(codes, model.decode_batch(codes)):
        assert audio.shape == (1, item.shape[-1] * model.hop_length)
        assert (audio - model.decode(item[None])[0]).abs().max() < 1e-5


def test_equal_length_chunks_are_stacked_when_codes_need_not_be_bitwise(monkeypatch):
    """48 kHz: the full chunks of a file go through the encoder as one batch."""
    model = tiny("encodec_48khz").prepare_for_inference(exact_codes=False)
    calls = []
    original = run_time_major

    def spy(seq, x, **kwargs):
        calls.append(x.shape[0])
        return original(seq, x, **kwargs)

    monkeypatch.setattr("codec.model.run_time_major", spy)
    model.encode(noise(model, 5000))  # 6 chunks: 5 of 960 samples and one of 250
    assert sorted(calls) == [1, 5]


# -- weight norm and inference mode ----------------------------------------------------------------
def test_folding_weight_norm_changes_no_output_bit():
    model = tiny("encodec_24khz")
    wav = noise(model, 1000, batch=2)
    with torch.no_grad():
        latent = model.encoder(wav)
        audio = model.decoder(latent)
    folded = copy.deepcopy(model)
    count = fold_weight_norm(folded)
    assert count == sum(1 for m in model.modules() if hasattr(m, "weight_g"))
    assert not any(k.endswith(("weight_g", "weight_v")) for k in folded.state_dict())
    assert fold_weight_norm(folded) == 0  # idempotent
    with torch.no_grad():
        assert torch.equal(folded.encoder(wav), latent)
        assert torch.equal(folded.decoder(latent), audio)


def test_prepare_for_inference_and_outputs_usable_afterwards():
    model = tiny("encodec_24khz")
    assert model.inference_runner is None
    model.prepare_for_inference()
    assert model.inference_runner == "exact" and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(k.endswith("weight_g") for k in model.state_dict())
    frames = model.encode(noise(model, 700))
    audio = model.decode(frames)
    assert not frames[0].codes.is_inference() and not audio.is_inference()
    audio *= 0.5  # ordinary tensors: in-place edits work outside inference mode
    frames[0].codes[..., 0] = 0
    assert model.prepare_for_inference(exact_codes=False).inference_runner == "fast"
    assert model.eval().inference_runner == "fast"
    assert model.train().inference_runner is None  # training goes through the modules again


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_runners_against_the_modules(preset):
    model = tiny(preset).prepare_for_inference()
    for length in (1, 7, 333, 2000):
        wav = noise(model, length, batch=2)
        with torch.inference_mode():
            latent = model.encoder(wav)
            audio = model.decoder(latent)
            assert torch.equal(run_channel_major(model.encoder.model, wav), latent)
            assert torch.equal(run_channel_major(model.decoder.model, latent), audio)
            fast_latent = run_time_major(model.encoder.model, wav.transpose(1, 2))
            fast_audio = run_time_major(model.decoder.model, latent.transpose(1, 2))
        assert (fast_latent.transpose(1, 2) - latent).abs().max() < 1e-5 * latent.abs().max()
        assert (fast_audio.transpose(1, 2) - audio).abs().max() < 1e-5 * audio.abs().max()


@pytest.mark.parametrize("preset", ["encodec_24khz", "encodec_48khz"])
def test_time_major_without_onednn_and_in_float64(preset, monkeypatch):
    """The plain-op fallback (no prepacked oneDNN kernels, or a dtype they do not take)."""
    model = tiny(preset).prepare_for_inference()
    wav = noise(model, 1500, batch=2)
    with torch.inference_mode():
        latent = model.encoder(wav)
        want = model.decoder(latent)
        monkeypatch.setattr("codec.runners._HAS_ONEDNN", False)
        got = run_time_major(model.decoder.model, latent.transpose(1, 2)).transpose(1, 2)
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    monkeypatch.undo()
    wide = copy.deepcopy(model).prepare_for_inference(dtype=torch.float64, exact_codes=False)
    codes = wide.encode(wav.double(), num_codebooks=2)
    assert all(torch.equal(a.codes, b.codes)
               for a, b in zip(codes, model.encode(wav, num_codebooks=2)))
    assert (wide.decode(codes).float() - model.decode(codes)).abs().max() < 1e-5


def test_encode_and_decode_run_in_inference_mode(monkeypatch):
    model = tiny("encodec_24khz").prepare_for_inference(exact_codes=False)
    modes = []
    original = run_time_major

    def spy(seq, x, **kwargs):
        modes.append(torch.is_inference_mode_enabled())
        return original(seq, x, **kwargs)

    monkeypatch.setattr("codec.model.run_time_major", spy)
    model.decode(model.encode(noise(model, 900)))
    assert modes == [True, True]


def test_cached_weights_follow_new_weights():
    model = tiny("encodec_32khz").prepare_for_inference()
    codes = torch.randint(0, model.codebook_size, (1, 4, 6))
    model.decode(codes)  # fills the channels-last weight cache
    other = tiny("encodec_32khz", seed=1).prepare_for_inference(exact_codes=True)
    model.load_state_dict(other.state_dict())  # in-place copies
    assert (model.decode(codes) - other.decode(codes)).abs().max() < 1e-6
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.mul_(0.5)
    fresh = copy.deepcopy(model)
    fresh.__dict__.pop("_runner")  # module forward: no caches involved
    with torch.no_grad():
        want = fresh.decode(codes)
    assert (model.decode(codes) - want).abs().max() < 1e-6


def test_bfloat16_runs_on_cpu_with_documented_error():
    # Measured on full-size random models: audio error ~0.5% (24/32 kHz) to ~1.3% (48 kHz) of
    # the signal norm, codes 97-100% equal. bfloat16 is for GPUs; on CPU it is a fallback.
    model = tiny("encodec_32khz")
    f32 = copy.deepcopy(model).prepare_for_inference()
    bf16 = copy.deepcopy(model).prepare_for_inference(dtype=torch.bfloat16)
    assert next(bf16.encoder.parameters()).dtype == torch.bfloat16
    assert bf16.quantizer.vq.layers[0]._codebook.embed.dtype == torch.float32
    wav = noise(model, 2000)
    codes = f32.encode(wav)[0].codes
    assert (bf16.encode(wav)[0].codes == codes).float().mean() > 0.8
    want, got = f32.decode(codes), bf16.decode(codes)
    assert got.dtype == torch.float32
    assert (got - want).norm() / want.norm() < 0.05


def test_cuda_paths_skip_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: test_cuda_half_precision runs instead")
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_half_precision(dtype):
    model = tiny("encodec_24khz")
    cpu = copy.deepcopy(model).prepare_for_inference()
    gpu = copy.deepcopy(model).prepare_for_inference("cuda", dtype)
    wav = noise(model, 3000)
    codes = cpu.encode(wav)[0].codes
    got = gpu.encode(wav)[0].codes
    assert got.device.type == "cuda" and (got.cpu() == codes).float().mean() > 0.8
    audio = gpu.decode(codes.cuda())
    assert audio.dtype == torch.float32
    want = cpu.decode(codes)
    tolerance = 1e-4 if dtype == torch.float32 else 0.05
    assert (audio.cpu() - want).norm() / want.norm() < tolerance
