"""Streaming encode/decode and blockwise file processing against the offline model.

Exactness of codes is checked here in float64 on tiny models and short streams, where any
flip means a bug in the stream's arithmetic. In float32 the stream must also call each CPU
kernel so that it rounds as the offline pass does; that is tested on full-size models in
tests/test_streaming_exact.py (tiny models and short streams fall under the offline pass's
own length-dependent kernels, see Exactness in codec/streaming.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from codec.audio import convert_audio, read_audio
from codec.model import EncodecModel, EncodedFrame
from codec.streaming import (ChunkedStreamingDecoder, ChunkedStreamingEncoder, StreamingDecoder,
                             StreamingEncoder, decode_blocks, decode_to_file, encode_blocks,
                             encode_file)

TINY = dict(n_filters=4, dimension=16, num_codebooks=4, codebook_size=64)


def _spread_codebooks(model: EncodecModel, seed: int = 0) -> EncodecModel:
    """Codebooks drawn from the model's own latents (like k-means init) so codes vary."""
    gen = torch.Generator().manual_seed(seed)
    audio = torch.randn(1, model.channels, model.sample_rate // 4, generator=gen,
                        dtype=torch.float64).to(next(model.parameters()).dtype)
    with torch.no_grad():
        residual = model.encoder(audio).transpose(1, 2).reshape(-1, model.config.dimension)
        for layer in model.quantizer.vq.layers:
            book = layer._codebook
            picks = torch.randint(0, residual.shape[0], (book.codebook_size,), generator=gen)
            noise = torch.randn(book.codebook_size, residual.shape[1], generator=gen)
            book.embed.copy_(residual[picks] + 0.1 * residual.std() * noise.to(residual.dtype))
            book.inited.fill_(1.0)
            residual = residual - book.decode(book.encode(residual))
    return model


def _model(preset: str, dtype=torch.float64, seed: int = 0, tiny: bool = True,
           **overrides) -> EncodecModel:
    torch.manual_seed(seed)
    sizes = TINY if tiny else {}
    model = EncodecModel.from_preset(preset, **{**sizes, **overrides}).to(dtype).eval()
    return _spread_codebooks(model, seed)


def _audio(model: EncodecModel, length: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float64) / model.sample_rate
    tone = 0.4 * torch.sin(2 * torch.pi * 330 * t * (1 + 0.3 * torch.sin(3 * t)))
    noise = 0.1 * torch.randn(batch, model.channels, length, generator=gen, dtype=torch.float64)
    return (tone + noise).to(next(model.parameters()).dtype)


def _random_sizes(total: int, seed: int, largest: int) -> list[int]:
    """Chunk sizes covering ``total``: a mix of 1-sample chunks and random larger ones."""
    gen = torch.Generator().manual_seed(seed)
    sizes, done = [], 0
    while done < total:
        kind = int(torch.randint(0, 3, (1,), generator=gen))
        size = 1 if kind == 0 else int(torch.randint(1, largest + 1, (1,), generator=gen))
        size = min(size, total - done)
        sizes.append(size)
        done += size
    return sizes


def _stream_encode(encoder: StreamingEncoder, audio: torch.Tensor, sizes: list[int]
                   ) -> torch.Tensor:
    pieces, offset = [], 0
    for size in sizes:
        pieces.append(encoder.push(audio[..., offset: offset + size]))
        offset += size
    pieces.append(encoder.flush())
    return torch.cat(pieces, dim=-1)


def _offline_codes(model: EncodecModel, audio: torch.Tensor, num_codebooks=None) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(audio, num_codebooks)[0].codes


# -- layer-wise streaming: codes -------------------------------------------------------------

# The 32 kHz preset reflects (released config), 16 kHz pads with zeros; audiocraft trained
# the 32 kHz one with zeros too.
PRESETS = [("encodec_24khz", {}), ("encodec_32khz", {}), ("encodec_16khz", {}),
           ("encodec_32khz", {"pad_mode": "constant"})]


@pytest.mark.parametrize("preset, overrides", PRESETS)
@pytest.mark.parametrize("seed", [0, 1])
def test_streamed_codes_equal_offline_for_any_chunking(preset, overrides, seed):
    model = _model(preset, seed=seed, **overrides)
    length = 11 * model.hop_length + 37 * (seed + 1)  # a partial last frame
    audio = _audio(model, length, batch=2, seed=seed)
    offline = _offline_codes(model, audio)
    assert offline.unique().numel() > 8, "codes do not vary: the comparison would prove little"
    every_sample = seed == 0 and preset == "encodec_24khz"  # the slowest case, run once
    for largest in ((1, 50, 3 * model.hop_length) if every_sample else (50, 3 * model.hop_length)):
        sizes = [1] * length if largest == 1 else _random_sizes(length, seed + largest, largest)
        streamed = _stream_encode(StreamingEncoder(model), audio, sizes)
        assert torch.equal(streamed, offline), f"chunking with chunks up to {largest} samples"


@pytest.mark.parametrize("length", [1, 5, 319, 320, 321, 2239, 2240, 2241])
@pytest.mark.parametrize("preset, overrides", PRESETS[:3])
def test_streamed_codes_equal_offline_at_stream_edges(length, preset, overrides):
    # Streams shorter than the start's hold-back, and lengths around frame boundaries.
    model = _model(preset, **overrides)
    audio = _audio(model, length)
    offline = _offline_codes(model, audio)
    for sizes in ([length], _random_sizes(length, length, 97)):
        assert torch.equal(_stream_encode(StreamingEncoder(model), audio, sizes), offline)


def test_streamed_codes_full_size_24khz_model():
    model = _model("encodec_24khz", tiny=False)
    length = 9 * 320 + 100
    audio = _audio(model, length)
    offline = _offline_codes(model, audio, num_codebooks=8)
    streamed = _stream_encode(StreamingEncoder(model, bandwidth=6.0), audio,
                              _random_sizes(length, 3, 700))
    assert streamed.shape == (1, 8, 10)
    assert torch.equal(streamed, offline)


def test_float32_stream_codes_agree_up_to_near_ties():
    model = _model("encodec_24khz", dtype=torch.float32)
    length = 13 * model.hop_length
    audio = _audio(model, length)
    offline = _offline_codes(model, audio)
    streamed = _stream_encode(StreamingEncoder(model), audio, _random_sizes(length, 5, 400))
    # float32 rounding depends on chunk lengths; a code may flip only at a near-tie.
    assert (streamed == offline).float().mean() > 0.97


def _emission_points(encoder: StreamingEncoder, audio: torch.Tensor, expected: list[int]) -> None:
    """Check that frame ``f`` comes out exactly when sample ``expected[f]`` has been pushed.

    Pushes up to one sample before each expected point (no new frame may come out), then the
    one sample that completes the frame.
    """
    pushed, frames = 0, 0
    for point in sorted(set(expected)):
        frames += encoder.push(audio[..., pushed: point - 1]).shape[-1]
        assert frames == sum(p <= point - 1 for p in expected)
        frames += encoder.push(audio[..., point - 1: point]).shape[-1]
        assert frames == sum(p <= point for p in expected)
        pushed = point


def test_encoder_emits_each_code_when_its_frame_is_complete():
    model = _model("encodec_24khz", dtype=torch.float32)
    hop, kernel = model.hop_length, model.config.last_kernel_size
    encoder = StreamingEncoder(model, num_codebooks=1)
    assert encoder.lookahead == 0
    # The last conv (kernel 7, reflect) needs frames 1..6 to pad frame 0: 7 codes at once,
    # then each code as soon as its 320 samples are in.
    expected = [kernel * hop] * kernel + [(f + 1) * hop for f in range(kernel, 12)]
    _emission_points(encoder, _audio(model, 12 * hop), expected)
    assert encoder.flush().shape[-1] == 0  # 12 whole frames: nothing left for the end


@pytest.mark.parametrize("preset, lookahead", [("encodec_32khz", 2386), ("encodec_16khz", 1195)])
def test_non_causal_encoder_waits_exactly_its_lookahead(preset, lookahead):
    model = _model(preset, dtype=torch.float32)
    encoder = StreamingEncoder(model, num_codebooks=1)
    assert encoder.lookahead == lookahead
    # Non-causal: the lookahead already brings the samples the start's left pad needs.
    hop = model.hop_length
    expected = [(f + 1) * hop + lookahead for f in range(12)]
    _emission_points(encoder, _audio(model, 12 * hop + lookahead), expected)


# -- layer-wise streaming: audio -------------------------------------------------------------

@pytest.mark.parametrize("preset, overrides", PRESETS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_streamed_decode_matches_offline(preset, overrides, dtype):
    model = _model(preset, dtype=dtype, **overrides)
    codes = _offline_codes(model, _audio(model, 14 * model.hop_length + 5, batch=2))
    with torch.no_grad():
        offline = model.decode(codes)
    for sizes in ([1] * codes.shape[-1], _random_sizes(codes.shape[-1], 7, 4)):
        decoder = StreamingDecoder(model)
        pieces, offset = [], 0
        for size in sizes:
            pieces.append(decoder.push(codes[..., offset: offset + size]))
            offset += size
        pieces.append(decoder.flush())
        streamed = torch.cat(pieces, dim=-1)
        assert streamed.shape == offline.shape
        assert (streamed - offline).abs().max() < 1e-5


@pytest.mark.parametrize("preset", ["encodec_24khz", "encodec_48khz"])
def test_streamed_decode_matches_a_model_prepared_for_inference(preset):
    # Prepared models decode offline with other kernels (time-major, batched segments).
    overrides = {"segment": 0.02} if preset == "encodec_48khz" else {}
    model = _model(preset, dtype=torch.float32, **overrides)
    model.prepare_for_inference()
    frames = model.encode(_audio(model, 4000))
    offline = model.decode(frames)
    streamed = torch.cat(list(decode_blocks(frames, model)), dim=-1)
    assert streamed.shape == offline.shape
    assert (streamed - offline).abs().max() < 1e-5


def test_causal_decoder_gives_a_hop_per_frame_after_the_start():
    model = _model("encodec_24khz", dtype=torch.float32)
    codes = torch.randint(0, model.codebook_size, (1, 2, 12))
    decoder = StreamingDecoder(model)
    sizes = [decoder.push(codes[..., i: i + 1]).shape[-1] for i in range(12)]
    kernel, hop = model.config.kernel_size, model.hop_length
    assert sizes == [0] * (kernel - 1) + [kernel * hop] + [hop] * (12 - kernel)
    assert decoder.flush().shape[-1] == 0  # causal trim: nothing is held back


def test_short_decode_stream_is_all_at_flush():
    model = _model("encodec_24khz")
    codes = torch.randint(0, model.codebook_size, (1, 3, 2))
    decoder = StreamingDecoder(model)
    assert decoder.push(codes).shape == (1, 1, 0)
    out = decoder.flush()
    with torch.no_grad():
        assert torch.allclose(out, model.decode(codes), atol=1e-10)


# -- segment-wise streaming (48 kHz) ---------------------------------------------------------

def _model_48k(dtype=torch.float32) -> EncodecModel:
    # 20 ms segments instead of 1 s keep the test fast; the chunk logic is the same.
    return _model("encodec_48khz", dtype=dtype, segment=0.02)


@pytest.mark.parametrize("length", [300, 950, 960, 1500, 3 * 950 + 20, 4000])
def test_chunked_streaming_matches_offline_48khz(length):
    model = _model_48k()
    audio = _audio(model, length)
    with torch.no_grad():
        offline = model.encode(audio, num_codebooks=2)
        offline_audio = model.decode(offline)
    encoder = ChunkedStreamingEncoder(model, num_codebooks=2)
    frames, offset = [], 0
    for size in _random_sizes(length, length, 700):
        frames += encoder.push(audio[..., offset: offset + size])
        offset += size
    frames += encoder.flush()
    assert len(frames) == len(offline)
    for got, want in zip(frames, offline):
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale)
    decoder = ChunkedStreamingDecoder(model)
    streamed = torch.cat([decoder.push(frame) for frame in frames] + [decoder.flush()], dim=-1)
    assert streamed.shape == offline_audio.shape
    assert (streamed - offline_audio).abs().max() < 1e-6


def test_chunked_encoder_emits_a_segment_as_soon_as_it_is_complete():
    model = _model_48k()
    encoder = ChunkedStreamingEncoder(model)
    segment, stride = model.segment_length, model.segment_stride
    audio = _audio(model, segment + stride)
    assert encoder.push(audio[..., : segment - 1]) == []
    assert len(encoder.push(audio[..., segment - 1: segment])) == 1
    assert len(encoder.push(audio[..., segment:])) == 1  # the second one ends at stride+segment


# -- errors ------------------------------------------------------------------------------------

def test_streaming_rejects_bad_input():
    model = _model("encodec_24khz", dtype=torch.float32)
    encoder = StreamingEncoder(model)
    with pytest.raises(ValueError, match="channel"):
        encoder.push(torch.zeros(1, 2, 10))
    with pytest.raises(ValueError, match=r"\(batch, channels, samples\)"):
        encoder.push(torch.zeros(1, 10))
    encoder.push(torch.zeros(1, 1, 10))
    with pytest.raises(ValueError, match="batch size changed"):
        encoder.push(torch.zeros(2, 1, 10))
    encoder.flush()
    with pytest.raises(RuntimeError, match="reset"):
        encoder.push(torch.zeros(1, 1, 10))
    encoder.reset()
    with pytest.raises(ValueError, match="empty"):
        encoder.flush()
    decoder = StreamingDecoder(model)
    decoder.push(torch.zeros(1, 2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="codebooks changed"):
        decoder.push(torch.zeros(1, 3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="ChunkedStreaming"):
        StreamingEncoder(_model_48k())
    with pytest.raises(ValueError, match="StreamingEncoder"):
        ChunkedStreamingEncoder(model)


# -- long files in blocks ------------------------------------------------------------------------

def _write(path, audio: torch.Tensor, sample_rate: int) -> None:
    sf.write(str(path), audio[0].t().float().numpy(), sample_rate, subtype="FLOAT")


@pytest.mark.parametrize("preset", ["encodec_24khz", "encodec_16khz"])
def test_encode_file_in_blocks_equals_whole_file(tmp_path, preset):
    model = _model(preset)
    length = 23 * model.hop_length + 11
    path = tmp_path / "in.wav"
    _write(path, _audio(model, length), model.sample_rate)
    whole = torch.from_numpy(sf.read(str(path), dtype="float32", always_2d=True)[0].T)
    offline = _offline_codes(model, whole[None].to(torch.float64), num_codebooks=3)
    block_seconds = 1234 / model.sample_rate  # blocks that do not line up with frames
    frames = list(encode_file(path, model, num_codebooks=3, block_seconds=block_seconds))
    assert len(frames) > 3 and all(f.scale is None for f in frames)
    assert torch.equal(torch.cat([f.codes for f in frames], dim=-1), offline)

    out = tmp_path / "out.wav"
    written = decode_to_file(iter(frames), out, model, length=length, subtype="FLOAT")
    with torch.no_grad():
        expected = model.decode(offline)[0, :, :length].float().numpy().T
    decoded, rate = sf.read(str(out), dtype="float32", always_2d=True)
    assert written == length and rate == model.sample_rate
    assert np.abs(decoded - expected).max() < 1e-5


def test_encode_file_48khz_stereo_in_blocks(tmp_path):
    model = _model_48k()
    length = 5 * model.segment_stride + 123
    path = tmp_path / "in.wav"
    _write(path, _audio(model, length), model.sample_rate)
    whole = torch.from_numpy(sf.read(str(path), dtype="float32", always_2d=True)[0].T)[None]
    with torch.no_grad():
        offline = model.encode(whole, num_codebooks=2)
        expected = model.decode(offline)[..., :length]
    frames = list(encode_file(path, model, num_codebooks=2, block_seconds=0.013))
    assert len(frames) == len(offline)
    assert all(torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
               for a, b in zip(frames, offline))
    decoded = torch.cat(list(decode_blocks(frames, model, length=length)), dim=-1)
    assert (decoded - expected).abs().max() < 1e-6


def test_encode_blocks_takes_converted_blocks_of_any_shape():
    model = _model("encodec_24khz")
    audio = _audio(model, 3000)
    offline = _offline_codes(model, audio)
    blocks = [audio[0, :, :1000].numpy(), audio[:, :, 1000:2500], audio[0, :, 2500:]]
    frames = list(encode_blocks(blocks, model))
    assert torch.equal(torch.cat([f.codes for f in frames], dim=-1), offline)


def test_encode_file_converts_rate_and_channels_on_the_way(tmp_path):
    model = _model("encodec_24khz")
    path = tmp_path / "cd.wav"
    gen = torch.Generator().manual_seed(3)
    stereo = 0.3 * torch.randn(2, 4410, generator=gen)
    sf.write(str(path), stereo.t().numpy(), 44100, subtype="FLOAT")
    converted = convert_audio(read_audio(path)[0], 44100, model.sample_rate, model.channels)
    offline = _offline_codes(model, converted[None].to(torch.float64))
    frames = list(encode_file(path, model, block_seconds=0.01))
    assert torch.equal(torch.cat([f.codes for f in frames], dim=-1), offline)


def test_decode_blocks_rejects_scales_for_a_whole_file_model():
    model = _model("encodec_24khz", dtype=torch.float32)
    frame = EncodedFrame(torch.zeros(1, 2, 3, dtype=torch.long), torch.ones(1, 1))
    with pytest.raises(ValueError, match="scale"):
        list(decode_blocks([frame], model))
