"""Float32 streaming on CPU gives ``model.encode``'s codes bit for bit, for any chunking.

tests/test_streaming.py proves the stream's arithmetic in float64, where rounding noise cannot
flip a code. Here the float32 CPU kernels themselves: each streaming node must call its kernel
in a way that rounds every output as the one offline call over the whole signal does (see
"kernels that round as the offline pass does" in codec/streaming.py). The node-level tests
pin down each such property on the full-size 24 kHz layers; the end-to-end tests stream
seconds of audio in random chunks (a third of them single samples) through the full-size
model, whose first codebook is made of exact ties around the audio's own latents
(:func:`_tie_first_codebook`): there a code flips with any change in its latent's last bits.
Before the kernels were matched, 33-50 % of those codes differed (and the latents of every
frame), so these tests fail without them.

All of it runs on one intra-op thread: with more, torch and oneDNN split the work (and pick
kernels) by thread count, for the offline pass too.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from codec.conv import StreamableConv1d
from codec.lstm import StreamableLSTM
from codec.model import EncodecModel
from codec.kernels import CurrentWeight as _Weight, exact_conv as _conv
from codec.stream_layers import LSTMNode as _LSTM, PointwiseNode as _Pointwise, build_nodes as _build
from codec.streaming import StreamingEncoder

from test_streaming import _audio, _model, _offline_codes, _random_sizes, _stream_encode


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_24khz() -> EncodecModel:
    return _model("encodec_24khz", dtype=torch.float32, tiny=False)


def _tie_first_codebook(model: EncodecModel, audio: torch.Tensor, seed: int = 0
                        ) -> EncodecModel:
    """A copy of ``model`` whose first codewords come in pairs ``z +- u`` around latents ``z``
    of ``audio``: equally near in exact arithmetic, so rounding picks the code of each pair.

    ``|u|`` is 1e-3 of the latents' spread, far below the distance to the other codewords.
    """
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = model.encoder(audio).transpose(1, 2).reshape(-1, model.config.dimension)
        book = model.quantizer.vq.layers[0]._codebook
        pairs = min(latents.shape[0], book.codebook_size // 2)
        offsets = torch.randn(pairs, latents.shape[1], generator=gen)
        offsets *= 1e-3 * latents.std() / offsets.norm(dim=1, keepdim=True)
        book.embed[0: 2 * pairs: 2] = latents[:pairs] + offsets
        book.embed[1: 2 * pairs: 2] = latents[:pairs] - offsets
    return model


def _check_ties(model: EncodecModel, codes: torch.Tensor) -> None:
    """The first codebook's codes of the tied frames are codes of their own pair."""
    pairs = min(codes.shape[0] * codes.shape[-1],
                model.quantizer.vq.layers[0]._codebook.codebook_size // 2)
    first = codes[:, 0].reshape(-1)[:pairs]
    assert torch.equal(first // 2, torch.arange(pairs)), "the tie construction did not hold"


def _pieces(sizes: list[int], total: int) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, min(total, start + size)))
        start += size
    return bounds


# -- one node at a time ------------------------------------------------------------------------

def test_convolutions_give_the_long_input_bits_for_any_width(model_24khz):
    gen = torch.Generator().manual_seed(0)
    convs = [m for net in (model_24khz.encoder, model_24khz.decoder) for m in net.modules()
             if isinstance(m, StreamableConv1d)]
    assert len(convs) == 32
    with torch.no_grad():
        for layer in convs:
            conv = layer.conv.conv
            stride, span = layer.stride, layer.kernel_size
            # Long enough that the module's own forward takes the long-input kernel.
            length = (20480 // conv.in_channels + 64) * stride + span
            x = torch.randn(1, conv.in_channels, length, generator=gen)
            full = layer.conv(x)
            for outputs in (1, 2, 3, 5, 8, 11, 12, 13, 16, 31, 40):
                first = (3 * outputs) % 17
                window = x[..., first * stride: (first + outputs - 1) * stride + span]
                piece = _conv(conv, _Weight(conv)(), window)
                assert torch.equal(piece, full[..., first: first + outputs]), \
                    f"{conv} on {outputs} output columns"


def test_lstm_node_gives_the_one_call_bits_for_any_push_sizes():
    torch.manual_seed(0)
    layer = StreamableLSTM(512, num_layers=2).eval()
    x = torch.randn(1, 512, 60)
    with torch.no_grad():
        full = layer(x)
        for seed in range(3):
            node = _LSTM(layer)
            sizes = [1, 1, 2, 1] + _random_sizes(55, seed, 5)
            streamed = torch.cat([node.push(x[..., a:b]) for a, b in _pieces(sizes, 60)], -1)
            assert torch.equal(streamed, full), f"push sizes {sizes}"


def test_elu_node_keeps_every_element_on_the_vector_path():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 4000, generator=gen)  # 16 * 4000 elements: no scalar tail offline
    node = _Pointwise(nn.ELU())
    sizes = [1, 3, 2] + _random_sizes(3994, 1, 40)
    streamed = torch.cat([node.push(x[..., a:b]) for a, b in _pieces(sizes, 4000)], -1)
    assert torch.equal(streamed, F.elu(x))


def test_every_encoder_layer_streams_bitwise(model_24khz):
    # Layer by layer through the whole encoder: the latents, not only the codes.
    audio = _audio(model_24khz, 16000)
    with torch.no_grad():
        offline = model_24khz.encoder(audio)
        layers = _build(model_24khz.encoder)
        pieces = [layers.push(audio[..., a:b])
                  for a, b in _pieces(_random_sizes(16000, 2, 700), 16000)]
        pieces.append(layers.flush())
    streamed = torch.cat([p for p in pieces if p is not None], -1)
    assert torch.equal(streamed, offline)


# -- the whole encoder -------------------------------------------------------------------------

def test_float32_streamed_codes_equal_offline_24khz(model_24khz):
    length = 3 * 24000 + 160  # 3 s and a half frame; even: see Exactness for odd lengths
    audio = _audio(model_24khz, length, seed=3)
    model = _tie_first_codebook(model_24khz, audio)
    offline = _offline_codes(model, audio)
    assert offline.shape == (1, 32, 226)
    _check_ties(model, offline)
    for seed, largest in ((0, 3 * 320), (1, 4000)):
        streamed = _stream_encode(StreamingEncoder(model), audio,
                                  _random_sizes(length, seed, largest))
        assert torch.equal(streamed, offline), f"chunks up to {largest} samples"


def test_float32_streamed_codes_equal_offline_at_batch_2_and_one_frame_pushes(model_24khz):
    length = 24000 + 1  # any length at batch 2: 2 x 16 channels leave no scalar tail
    audio = _audio(model_24khz, length, batch=2, seed=4)
    model = _tie_first_codebook(model_24khz, audio)
    offline = _offline_codes(model, audio, num_codebooks=8)
    _check_ties(model, offline)
    sizes = [320] * (length // 320) + [length % 320]
    streamed = _stream_encode(StreamingEncoder(model, num_codebooks=8), audio, sizes)
    assert torch.equal(streamed, offline)


def test_float32_streamed_codes_equal_offline_non_causal_16khz():
    length = 16000
    model = _model("encodec_16khz", dtype=torch.float32, tiny=False)
    audio = _audio(model, length, seed=5)
    model = _tie_first_codebook(model, audio)
    offline = _offline_codes(model, audio)
    _check_ties(model, offline)
    streamed = _stream_encode(StreamingEncoder(model), audio, _random_sizes(length, 6, 700))
    assert torch.equal(streamed, offline)
