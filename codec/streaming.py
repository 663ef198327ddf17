"""Streaming EnCodec: encode and decode chunk by chunk, and long files in bounded memory.

Layer-wise streaming (:class:`StreamingEncoder`, :class:`StreamingDecoder`)
---------------------------------------------------------------------------
The encoder/decoder are walked layer by layer and each layer keeps its own state: a
convolution keeps the input samples its next windows still need (left context), the LSTM
keeps ``(h, c)`` before and after its last step, a transposed convolution keeps the
overlap-add tail its last input frame adds to the next frame's samples, a residual block
keeps whichever of its two branches ran ahead. Nothing is recomputed from the past but the
LSTM's last step. A layer emits an output sample as soon as no later input can change it,
and each output sums the same products as offline, so the stream gives the offline
``model.encode`` / ``model.decode`` of the whole signal (see Exactness).

This works for every model whose layers can be streamed: the causal 24 kHz model and the
non-causal 32/16 kHz models (weight norm, no chunking). A non-causal convolution is a causal
one that needs ``padding_total // 2`` samples of lookahead; the stream waits for them.
The 48 kHz model normalizes each 1 s chunk as a whole (GroupNorm over time and an RMS scale),
so it streams chunk by chunk instead (:class:`ChunkedStreamingEncoder`/``Decoder``).

Stream start. Offline, every convolution pads its input on the left (reflect: it mirrors
samples ``1..left``; constant: zeros). A layer holds its first outputs back until ``left + 1``
input samples are in (reflect), emits them at once, and from then on adds no delay of its
own. For the causal 24 kHz model the largest hold-back is the encoder's last convolution
(kernel 7 at the frame rate): frame 0 mirrors frames 1..6, so the first 7 codes arrive
together once 7 * 320 = 2240 samples (93 ms) are in. The decoder's first convolution does the
same on code frames: no audio until 7 frames are pushed, then 7 * 320 samples at once. For
the non-causal models the lookahead already covers the mirrored samples: no extra hold-back.

Stream end. Offline, a strided convolution pads the right end so that its last window is
full (``extra`` samples, by reflection or zeros, depending on the total length), a
non-causal one also pads ``padding_total // 2``, and a transposed convolution trims its
output. ``flush()`` knows the total length and does exactly that: the last, partial frame is
encoded with the offline right padding, and a non-causal decoder emits its held-back tail.
Streams too short to have emitted anything run each layer offline at ``flush()``.

Algorithmic latency after the start (asserted by tests/test_streaming.py; the encoder's is
``StreamingEncoder.lookahead`` samples beyond the end of the frame):

* 24 kHz, causal: a code comes out when the last of its frame's 320 samples goes in: 320
  samples = 13.3 ms (the paper's figure), lookahead 0. The decoder turns each pushed frame
  into its 320 samples at once; ``flush()`` returns nothing (the causal trim drops the tail).
* 32 kHz (MusicGen tokenizer): a code needs 2386 samples beyond its 640-sample frame:
  3026 samples = 94.6 ms. The decoder holds back the last 2402 samples (75.1 ms) of what the
  pushed frames span; ``flush()`` returns them.
* 16 kHz (AudioGen tokenizer): 1195 samples beyond the 320-sample frame: 1515 samples =
  94.7 ms; the decoder holds back 1203 samples (75.2 ms).
No approximate windowed mode is needed for the non-causal models: their streams are exact.

Exactness. Offline, each kernel runs once over the whole signal, and on CPU the kernel torch
picks, and so the last bits of every output, depends on the input's shape. The stream calls
each kernel in a way that rounds every output as the long offline call does (tested layer
by layer on the 24 kHz model and end to end at 24 and 16 kHz in
tests/test_streaming_exact.py; measured at 32 kHz): convolutions go to the kernel torch picks for a
long input (oneDNN for float32, whose outputs do not depend on the input width; the native
kernel gets at least ``MIN_COLUMNS`` output columns), elementwise layers run all their
elements on the CPU's vector path, the LSTM runs only calls that reproduce its offline steps
(2 steps or more from a given state), and the quantizer's distances get at least
``MIN_COLUMNS`` rows. Then the streamed codes are ``model.encode``'s bit for bit, in float32
on CPU, for every chunking (1-sample chunks included), except where the offline pass itself
rounds by the total length, which the stream cannot know before it ends:

* Short streams at batch 1. torch runs a convolution whose input has at most 20480 elements
  at batch 1 on its native kernel; the stream assumes the long case. Bitwise from 10881
  samples (0.45 s) at 24 kHz, 8961 (0.28 s) at 32 kHz, 4481 (0.28 s) at 16 kHz (full-size
  models); shorter streams get other last bits (at 24 kHz their codes all agreed in 24
  streams of 0.04-0.45 s, but a near-tie can flip). At batch 2 and more, no such limit.
* The stream end. An elementwise kernel computes the last ``numel % 32`` elements of a
  float32 tensor in a scalar loop with other rounding. With channel counts that are multiples
  of 32 there are none; in the 24 kHz encoder the 16-channel ELU of the first residual block
  leaves the last 16 samples to it when batch x length is odd, so the codes of the last one
  or two frames can then flip at a near-tie.

All on one intra-op thread (more threads split the work, and the scalar tails, by thread;
not measured). In float64 the codes are bitwise for every chunking and length
(tests/test_streaming.py). Measured with one thread, full-size 24 kHz model, codebooks from
the model's own latents: all 211,840 codes of 0.47-3 s streams (batch 1 and 2, even and odd
lengths, chunks of 1 to 3000 samples) equal, against 99.83 % at one-frame pushes before the
kernels were matched; with a first codebook of exact ties, where any change in a latent's
last bits flips a code with even odds, still all equal (3 chunkings of 3 s; 50-67 % of the
tied codes before). The decoder shares the convolution, ELU and LSTM nodes; its transposed
convolutions overlap-add in pieces, so its audio matches ``model.decode`` to float rounding
(24 kHz, one-frame pushes: max 6.7e-8).

Cost: a 1-frame push runs the LSTM over 2 steps and oneDNN on narrow inputs, a constant
cost per frame. 24 kHz full-size encoder, one thread on a shared 2-core machine: real-time
factor 0.84 at one-frame (320-sample) pushes (0.68 before), 0.43 at 960-sample pushes (0.33),
0.13 at 4800 (0.09); offline ``model.encode`` 0.06.

Chunked streaming (:class:`ChunkedStreamingEncoder`, :class:`ChunkedStreamingDecoder`)
--------------------------------------------------------------------------------------
For models that encode in segments (48 kHz: 1 s windows, 0.99 s apart, each scaled by its
RMS): a segment is encoded as soon as its last sample is in, through the model's own
per-segment step, so codes and scales are the offline ones whatever the chunking. The
decoder overlap-adds each decoded segment onto the previous one's 1 % tail with offline's
triangular weights; only that tail is kept. Latency: one segment (1 s) for the encoder; the
decoder emits 0.99 s per segment as it arrives and the last 10 ms at ``flush()``.

Long files
----------
:func:`encode_blocks` / :func:`decode_blocks` turn iterators of audio blocks into iterators of
:class:`~codec.model.EncodedFrame` and back; :func:`encode_file` / :func:`decode_to_file` read
(converting rate and channels) and write files block by block through :mod:`codec.audio`.
Peak memory is set by the block size, not the file length (``bench/memory.py``, 5 s blocks,
one thread: peak RSS 500-575 MiB at 24 kHz and ~415 MiB at 48 kHz stereo, the same for 10 and
60 minute files; ~300-330 MiB of it is torch and the model), and the codes are those of a
whole-file ``model.encode``
(bit for bit, with the exceptions under Exactness).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from typing import Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from . import audio as audio_io
from .conv import StreamableConv1d, StreamableConvTranspose1d, pad1d
from .lstm import StreamableLSTM
from .model import EncodecModel, EncodedFrame, overlap_add_weights
from .seanet import SEANetDecoder, SEANetEncoder, SEANetResnetBlock

# Layers that act on each time step alone, so streaming them needs no state.
POINTWISE = (nn.ELU, nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Identity)

MaybeTensor = Union[torch.Tensor, None]


def _cat(a: MaybeTensor, b: MaybeTensor) -> MaybeTensor:
    if a is None:
        return b
    if b is None:
        return a
    return torch.cat([a, b], dim=-1)


def _length(x: MaybeTensor) -> int:
    return 0 if x is None else x.shape[-1]


def _rest(x: torch.Tensor, start: int) -> MaybeTensor:
    """A compact copy of ``x[..., start:]`` (None if empty).

    A slice would keep the whole block it was cut from alive until the next push.
    """
    return x[..., start:].clone() if start < x.shape[-1] else None


def _check_no_norm(layer: nn.Module, norm: nn.Module) -> None:
    if not isinstance(norm, nn.Identity):
        raise ValueError(f"{type(layer).__name__} has a {type(norm).__name__} normalization over "
                         "the whole time axis, which cannot be streamed layer by layer; models "
                         "that encode in segments stream with ChunkedStreamingEncoder/Decoder")


# -- kernels that round as the offline pass does -------------------------------------------
# The offline pass runs each layer once over the whole signal; which CPU kernel it reaches, and
# so its last bits, depends on the input's shape. The stream calls each kernel with shapes for
# which the bits of an output do not depend on how many others are computed with it (see
# Exactness in the module docstring and tests/test_streaming_exact.py).

# A CPU matrix product (native convolution, the quantizer's distances) rounds its first rows
# differently when it has fewer than 4 (distances) or 12 (1x1 convolutions) of them.
MIN_COLUMNS = 16
# Elementwise CPU kernels (ELU) run 2 vectors at a time and leave the rest (``numel % 32`` for
# float32 with AVX-512) to a scalar loop that rounds differently (exp(x) - 1, not expm1);
# padding a piece to a multiple of this keeps all of it on the vector path, as offline (but
# for offline's own last elements: see Exactness).
VECTOR_BLOCK = 64


def _onednn_conv(conv: nn.Conv1d, x: torch.Tensor) -> bool:
    """Whether ``conv(x)`` reaches oneDNN when ``x`` is long, as torch dispatches it.

    torch (``ConvParams::use_mkldnn``) sends a float32 CPU convolution to oneDNN unless it is a
    1x1, unstrided, undilated one at batch < 16 on one thread, or its input has at most 20480
    elements at batch 1 (the short case the stream cannot know about; see Exactness).
    """
    if (x.device.type != "cpu" or x.dtype != torch.float32
            or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)):
        return False
    return (conv.kernel_size[0] != 1 or conv.stride[0] != 1 or conv.dilation[0] != 1
            or x.shape[0] >= 16 or torch.get_num_threads() > 1)


class _Weight:
    """A convolution's weight, rebuilt from its weight norm only when that changes.

    oneDNN is ~7x slower on a freshly allocated 8 MiB weight than on one it has seen; the
    rebuilt weight has the same bits as the one the module's forward builds at each call.
    """

    def __init__(self, conv: nn.Conv1d) -> None:
        self.conv = conv
        self.key: tuple | None = None
        self.weight: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        conv = self.conv
        if not hasattr(conv, "current_weight") or conv.folded:
            return conv.weight
        sources = (conv.weight_v, conv.weight_g)
        if any(t.is_inference() for t in sources):  # no version counter to watch
            return conv.current_weight()
        key = tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in sources)
        if key != self.key:
            self.key, self.weight = key, conv.current_weight().detach()
        return self.weight


def _conv(conv: nn.Conv1d, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` (no padding) ``(B, C_in, n) -> (B, C_out, m)`` with offline's bits.

    oneDNN convolutions give every output the same bits whatever the input width; the native
    one (im2col and a matrix product) does once the output has ``MIN_COLUMNS`` columns, so a
    narrower piece is zero-extended and cut back. ``weight`` is ``conv``'s current weight.
    """
    stride, dilation = conv.stride[0], conv.dilation[0]
    if _onednn_conv(conv, x):
        # The 2-D call torch's own dispatch makes for a 1-D convolution.
        y = torch.mkldnn_convolution(x.unsqueeze(2), weight.unsqueeze(2), conv.bias, [0, 0],
                                     [1, stride], [1, dilation], conv.groups)
        return y.squeeze(2)
    if x.device.type != "cpu":
        return conv._conv_forward(x, weight, conv.bias)
    span = (weight.shape[-1] - 1) * dilation + 1
    outputs = (x.shape[-1] - span) // stride + 1
    if outputs < MIN_COLUMNS:
        x = F.pad(x, (0, (MIN_COLUMNS - outputs) * stride))
    return conv._conv_forward(x, weight, conv.bias)[..., :outputs]


def _pointwise(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for an elementwise module, every element on the CPU's vector path."""
    if x.device.type != "cpu":
        return module(x)
    flat = x.reshape(-1)
    y = module(F.pad(flat, (0, -flat.numel() % VECTOR_BLOCK)))
    return y[: flat.numel()].view(x.shape)


# -- per-layer streaming nodes ------------------------------------------------------------
# Each node takes ``(B, C, n)`` pieces of its layer's input in order and returns the pieces of
# its output that are final (None when there are none yet); ``flush()`` ends the stream and
# returns the rest, exactly as the layer would have computed it on the whole input.

class _Node:
    def push(self, x: torch.Tensor) -> MaybeTensor:
        raise NotImplementedError

    def flush(self) -> MaybeTensor:
        """The outputs held back for the end of the stream (none for most layers)."""
        return None

    def lookahead(self) -> tuple[int, int]:
        """``(samples, stride)``: input samples beyond an output's own block it waits for."""
        return 0, 1


class _Pointwise(_Node):
    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def push(self, x: torch.Tensor) -> MaybeTensor:
        return _pointwise(self.module, x)


class _Conv(_Node):
    """StreamableConv1d: keeps the padded input from the next output's window onwards.

    Coordinates are those of the offline padded input: ``left`` padding samples, then the
    input. Output ``i`` reads padded samples ``[i * stride, i * stride + kernel)``.
    """

    def __init__(self, layer: StreamableConv1d) -> None:
        _check_no_norm(layer, layer.conv.norm)
        if layer.pad_mode == "circular":
            raise ValueError("circular padding needs the end of the stream at its start")
        self.layer = layer
        self.weight = _Weight(layer.conv.conv)
        self.kernel = layer.kernel_size
        self.stride = layer.stride
        self.left = layer.paddings(layer.kernel_size)[0]  # the left pad does not depend on length
        # Samples the left pad is made from (reflect mirrors samples 1..left).
        self.pad_source = {"reflect": self.left + 1, "replicate": 1}.get(layer.pad_mode, 1)
        # Right pad at the end is at most padding_total - left + stride - 1 samples; reflecting
        # it needs that many plus one real samples at the end of the buffer.
        self.reserve = layer.padding_total - self.left + self.stride
        self.raw: MaybeTensor = None  # input until the left pad can be built
        self.buffer: MaybeTensor = None  # padded input from padded index `start`
        self.start = 0
        self.received = 0
        self.emitted = 0

    def lookahead(self) -> tuple[int, int]:
        return self.kernel - self.stride - self.left, self.stride

    def push(self, x: torch.Tensor) -> MaybeTensor:
        self.received += x.shape[-1]
        if self.buffer is None:
            self.raw = _cat(self.raw, x)
            if self.raw.shape[-1] < self.pad_source:
                return None
            head = self.raw[..., : self.pad_source]
            pad = pad1d(head, (self.left, 0), mode=self.layer.pad_mode)[..., : self.left]
            self.buffer, self.raw = torch.cat([pad, self.raw], dim=-1), None
        else:
            self.buffer = torch.cat([self.buffer, x], dim=-1)
        end = self.start + self.buffer.shape[-1]
        ready = (end - self.kernel) // self.stride + 1 - self.emitted  # windows inside the buffer
        if ready <= 0:
            return None
        first = self.emitted * self.stride - self.start
        window = self.buffer[..., first: first + (ready - 1) * self.stride + self.kernel]
        y = _conv(self.layer.conv.conv, self.weight(), window)
        self.emitted += ready
        keep_from = max(self.start, min(self.emitted * self.stride, end - self.reserve))
        self.buffer = _rest(self.buffer, keep_from - self.start)
        self.start = keep_from
        return y

    def flush(self) -> MaybeTensor:
        if self.emitted == 0:  # short stream: the offline layer on all of it, as it is
            if self.received == 0:
                return None
            x = self.raw if self.buffer is None else self.buffer[..., self.left:]
            return self.layer(x)
        right = self.layer.paddings(self.received)[1]
        padded = pad1d(self.buffer, (0, right), mode=self.layer.pad_mode)
        first = self.emitted * self.stride - self.start
        if padded.shape[-1] - first < self.kernel:
            return None
        return _conv(self.layer.conv.conv, self.weight(), padded[..., first:])


class _ConvTranspose(_Node):
    """StreamableConvTranspose1d: overlap-adds each chunk onto the previous chunk's tail.

    Input frame ``j`` writes untrimmed output samples ``[j * stride, j * stride + kernel)``, so
    once frame ``j`` is in, everything before ``(j + 1) * stride`` is final; the rest (the tail,
    ``kernel - stride`` samples, kept without bias) waits for the next frame.
    """

    def __init__(self, layer: StreamableConvTranspose1d) -> None:
        _check_no_norm(layer, layer.convtr.norm)
        self.conv = layer.convtr.convtr
        self.stride = layer.stride
        self.overlap = layer.kernel_size - layer.stride
        self.trim_left = layer.trim[0]
        self.tail: MaybeTensor = None
        self.position = 0  # untrimmed index of the next sample to emit
        self.frames = 0

    def _bias(self, y: torch.Tensor) -> torch.Tensor | float:
        bias = getattr(self.conv, "bias", None)
        return 0.0 if bias is None else bias.view(1, -1, 1).to(y.dtype)

    def _emit(self, y: torch.Tensor) -> MaybeTensor:
        skip = max(0, self.trim_left - self.position)
        self.position += y.shape[-1]
        y = y[..., skip:]
        return y if y.shape[-1] else None

    def push(self, x: torch.Tensor) -> MaybeTensor:
        self.frames += x.shape[-1]
        y = self.conv(x)
        if self.tail is not None:
            y[..., : self.overlap] += self.tail
        final = x.shape[-1] * self.stride
        self.tail = y[..., final:] - self._bias(y)
        return self._emit(y[..., :final])

    def flush(self) -> MaybeTensor:
        if self.tail is None:
            return None
        # Trimmed output ends at frames * stride + trim_left (untrimmed index).
        stop = self.frames * self.stride + self.trim_left - self.position
        tail = self.tail[..., :stop] + self._bias(self.tail)
        return self._emit(tail) if stop > 0 else None


LSTMState = Union[tuple[torch.Tensor, torch.Tensor], None]


class _LSTM(_Node):
    """StreamableLSTM, run only in calls that round as the one offline call does.

    A call from a given state over 2 or more steps reproduces the offline bits of those steps
    and of the final state; so does any call from the zero start state. A 1-step call from
    another state does not (on CPU, oneDNN's and the native kernels alike). So each push also
    re-runs the step before it, from the state before that step: the node keeps that state,
    that step's input and the state after it. A 1-frame push costs one 2-step call; a push of
    ``n > 1`` frames a second, ``n``-step call to get the state before its last step.
    """

    def __init__(self, layer: StreamableLSTM) -> None:
        self.layer = layer
        self.before_last: LSTMState = None  # before the last step (None: the start, zeros)
        self.last_input: MaybeTensor = None  # (B, C, 1) the last step's input
        self.state: LSTMState = None  # after the last step

    def push(self, x: torch.Tensor) -> MaybeTensor:
        n = x.shape[-1]
        if self.last_input is None:
            steps, start = x, None
        else:
            steps, start = torch.cat([self.last_input, x], dim=-1), self.before_last
        y, state = self.layer.step(steps, start)
        if n == 1:
            self.before_last = self.state
        else:
            self.before_last = self.layer.step(steps[..., :-1], start)[1]
        self.state = state
        self.last_input = x[..., -1:].clone()
        return y[..., -n:]


class _Residual(_Node):
    """``shortcut(x) + block(x)``; the branch that ran ahead waits for the other one."""

    def __init__(self, block: _Node, shortcut: _Node) -> None:
        self.block = block
        self.shortcut = shortcut
        self.pending_block: MaybeTensor = None
        self.pending_shortcut: MaybeTensor = None

    def lookahead(self) -> tuple[int, int]:
        return max(self.block.lookahead(), self.shortcut.lookahead())

    def _combine(self, block: MaybeTensor, shortcut: MaybeTensor) -> MaybeTensor:
        self.pending_block = _cat(self.pending_block, block)
        self.pending_shortcut = _cat(self.pending_shortcut, shortcut)
        n = min(_length(self.pending_block), _length(self.pending_shortcut))
        if n == 0:
            return None
        out = self.pending_shortcut[..., :n] + self.pending_block[..., :n]
        self.pending_block = _rest(self.pending_block, n)
        self.pending_shortcut = _rest(self.pending_shortcut, n)
        return out

    def push(self, x: torch.Tensor) -> MaybeTensor:
        return self._combine(self.block.push(x), self.shortcut.push(x))

    def flush(self) -> MaybeTensor:
        out = self._combine(self.block.flush(), self.shortcut.flush())
        if self.pending_block is not None or self.pending_shortcut is not None:
            raise RuntimeError("residual branches ended with different lengths")
        return out


class _Chain(_Node):
    def __init__(self, nodes: list[_Node]) -> None:
        self.nodes = nodes

    def push(self, x: torch.Tensor) -> MaybeTensor:
        for node in self.nodes:
            x = node.push(x)
            if x is None:
                return None
        return x

    def flush(self) -> MaybeTensor:
        out = None
        for node in self.nodes:
            head = node.push(out) if out is not None else None
            out = _cat(head, node.flush())
        return out

    def lookahead(self) -> tuple[int, int]:
        """Encoder-direction lookahead in input samples, and the total stride."""
        total, stride = 0, 1
        for node in self.nodes:
            ahead, node_stride = node.lookahead()
            total += ahead * stride
            stride *= node_stride
        return total, stride


def _build(module: nn.Module) -> _Node:
    """The streaming twin of a SEANet layer tree."""
    if isinstance(module, (SEANetEncoder, SEANetDecoder)):
        return _build(module.model)
    if isinstance(module, nn.Sequential):
        return _Chain([_build(sub) for sub in module])
    if isinstance(module, StreamableConv1d):
        return _Conv(module)
    if isinstance(module, StreamableConvTranspose1d):
        return _ConvTranspose(module)
    if isinstance(module, StreamableLSTM):
        return _LSTM(module)
    if isinstance(module, SEANetResnetBlock):
        return _Residual(_build(module.block), _build(module.shortcut))
    if isinstance(module, POINTWISE):
        return _Pointwise(module)
    raise TypeError(f"cannot stream a {type(module).__name__} layer; expected one of the SEANet "
                    "layers (StreamableConv1d, StreamableConvTranspose1d, StreamableLSTM, "
                    "SEANetResnetBlock, pointwise activations)")


def _check_layerwise(model: EncodecModel) -> None:
    if model.segment_length is not None:
        raise ValueError(f"{model.name} encodes in {model.config.segment} s segments with a "
                         "scale each; stream it with ChunkedStreamingEncoder/Decoder")


def _check_chunk(chunk: torch.Tensor, channels: int, batch: int | None) -> None:
    if not isinstance(chunk, torch.Tensor) or chunk.dim() != 3:
        found = tuple(chunk.shape) if isinstance(chunk, torch.Tensor) else type(chunk).__name__
        raise ValueError(f"audio chunks must be tensors shaped (batch, channels, samples), "
                         f"got {found}")
    if chunk.shape[1] != channels:
        raise ValueError(f"expected {channels} channel(s), got a chunk with {chunk.shape[1]}")
    if batch is not None and chunk.shape[0] != batch:
        raise ValueError(f"batch size changed within the stream: {batch} -> {chunk.shape[0]}")


class _Stream:
    """Shared bookkeeping: batch size, closed state."""

    def __init__(self, model: EncodecModel) -> None:
        self.model = model
        self.reset()

    def reset(self) -> None:
        """Forget the stream; the next push starts a new one."""
        self._batch: int | None = None
        self._closed = False
        self._warned = False
        self._reset()

    def _reset(self) -> None:
        raise NotImplementedError

    def _open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} was flushed; call reset() to start a new "
                               "stream")

    def _param(self, net: nn.Module) -> torch.Tensor:
        return next(net.parameters())

    def _check_values(self, chunk: torch.Tensor, offset: int) -> None:
        """Refuse NaN/inf (naming the sample's position in the stream); warn once per stream
        about a peak far above 1."""
        peak = audio_io.check_audio_values(chunk, self.what, offset=offset,
                                           sample_rate=self.model.sample_rate,
                                           warn=not self._warned)
        self._warned = self._warned or peak > audio_io.PEAK_WARNING

    def _book(self) -> torch.Tensor:
        return self.model.quantizer.vq.layers[0]._codebook.embed


class StreamingEncoder(_Stream):
    """Audio chunks of any length in, codes out as soon as each frame is final.

    ``push(chunk (B, C, n)) -> codes (B, K, f)`` with ``f >= 0``; ``flush() -> codes (B, K, f)``
    ends the stream: its codes are the last frames', so pass them on (``dec.flush(codes)``).
    The concatenated codes are ``model.encode(whole_stream)``'s bit for bit (in float32 on CPU
    too, but for short streams at batch 1 and the end-of-stream case in the module
    docstring's Exactness). Pushed audio must be finite (``what`` names it in the error).
    """

    def __init__(self, model: EncodecModel, *, num_codebooks: int | None = None,
                 bandwidth: float | None = None, what: str = "streamed audio") -> None:
        _check_layerwise(model)
        self.num_codebooks = model.resolve_codebooks(num_codebooks, bandwidth)
        self.what = what
        super().__init__(model)

    def _reset(self) -> None:
        self._layers = _build(self.model.encoder)
        self.samples = 0
        self.frames = 0

    @property
    def lookahead(self) -> int:
        """Samples after the end of a frame that its code waits for (0 when causal)."""
        return self._layers.lookahead()[0]

    def _codes(self, latent: MaybeTensor) -> torch.Tensor:
        book = self._book()
        if latent is None:
            return torch.empty(self._batch or 0, self.num_codebooks, 0, dtype=torch.long,
                               device=book.device)
        frames = latent.shape[-1]
        self.frames += frames
        # The distances are one matrix product over all frames offline; rows round as there
        # only in a product of at least 4 rows, so a short piece is zero-extended.
        latent = F.pad(latent, (0, max(0, MIN_COLUMNS - frames)))
        # As model.encode: the codebooks may stay float32 under a half-precision encoder.
        return self.model.quantizer.encode(latent.to(book.dtype), self.num_codebooks)[..., :frames]

    @torch.no_grad()
    def push(self, chunk: torch.Tensor) -> torch.Tensor:
        """``(B, C, n)`` audio -> ``(B, K, f)`` codes of the frames completed by this chunk."""
        self._open()
        _check_chunk(chunk, self.model.channels, self._batch)
        self._batch = chunk.shape[0]
        if chunk.shape[-1] == 0:
            return self._codes(None)
        self._check_values(chunk, self.samples)
        self.samples += chunk.shape[-1]
        param = self._param(self.model.encoder)
        return self._codes(self._layers.push(chunk.to(device=param.device, dtype=param.dtype)))

    @torch.no_grad()
    def flush(self) -> torch.Tensor:
        """End the stream: codes of the remaining frames, the last one padded as offline.

        These are audio too: hand them to the decoder, ``dec.flush(enc.flush())``."""
        self._open()
        if self.samples == 0:
            raise ValueError("the stream is empty (0 samples): nothing to encode")
        self._closed = True
        return self._codes(self._layers.flush())


class StreamingDecoder(_Stream):
    """Codes in, audio out as soon as it is final.

    ``push(codes (B, K, f)) -> audio (B, C, n)``; after the stream start each pushed frame
    yields ``hop_length`` samples (causal) or the samples its lookahead made final
    (non-causal); ``flush(last_codes)`` decodes the encoder's final codes and returns them with
    the rest. The concatenation equals ``model.decode(all_codes)`` to float rounding.
    """

    def __init__(self, model: EncodecModel) -> None:
        _check_layerwise(model)
        super().__init__(model)

    def _reset(self) -> None:
        self._layers = _build(self.model.decoder)
        self._num_codebooks: int | None = None
        self.frames = 0
        self.samples = 0

    def _audio(self, audio: MaybeTensor) -> torch.Tensor:
        if audio is None:
            param = self._param(self.model.decoder)
            audio = param.new_empty(self._batch or 0, self.model.channels, 0)
        self.samples += audio.shape[-1]
        # As model.decode: half-precision decoders give float32 audio.
        return audio.float() if audio.dtype in (torch.float16, torch.bfloat16) else audio

    @torch.no_grad()
    def push(self, codes: torch.Tensor) -> torch.Tensor:
        """``(B, K, f)`` codes -> ``(B, C, n)`` audio that no later frame can change."""
        self._open()
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3:
            raise ValueError(f"codes must be a tensor shaped (batch, codebooks, frames), got "
                             f"{getattr(codes, 'shape', type(codes).__name__)}")
        if self._batch is not None and codes.shape[0] != self._batch:
            raise ValueError(f"batch size changed within the stream: {self._batch} -> "
                             f"{codes.shape[0]}")
        if self._num_codebooks is not None and codes.shape[1] != self._num_codebooks:
            raise ValueError(f"number of codebooks changed within the stream: "
                             f"{self._num_codebooks} -> {codes.shape[1]}")
        self._batch, self._num_codebooks = codes.shape[0], codes.shape[1]
        if codes.shape[-1] == 0:
            return self._audio(None)
        self.frames += codes.shape[-1]
        latent = self.model.quantizer.decode(codes.to(self._book().device))
        return self._audio(self._layers.push(latent.to(self._param(self.model.decoder).dtype)))

    @torch.no_grad()
    def flush(self, codes: torch.Tensor | None = None) -> torch.Tensor:
        """End the stream: decode ``codes`` (the encoder's ``flush()``: the last frames), then
        return their audio with the samples still held back (a non-causal decoder's tail).

        Taking the encoder's last codes here makes ``dec.flush(enc.flush())`` the whole end of
        a round trip; ending the decoder without them would drop the stream's last frames.
        """
        self._open()
        head = None if codes is None else self.push(codes)
        if self.frames == 0:
            raise ValueError("the stream is empty (0 frames): nothing to decode")
        self._closed = True
        tail = self._audio(self._layers.flush())
        return tail if head is None else torch.cat([head, tail], dim=-1)


# -- segment-wise streaming (48 kHz) ------------------------------------------------------

def _check_segmented(model: EncodecModel) -> None:
    if model.segment_length is None:
        raise ValueError(f"{model.name} encodes whole files; stream it with "
                         "StreamingEncoder/StreamingDecoder")


class ChunkedStreamingEncoder(_Stream):
    """For segment models: one :class:`EncodedFrame` per segment as soon as it is complete.

    ``push(chunk (B, C, n)) -> list[EncodedFrame]``; ``flush()`` encodes the last, shorter
    segments exactly as ``model.encode`` does (pass them on: ``dec.flush(enc.flush())``).
    Only the unfinished segment is kept. Pushed audio must be finite.
    """

    def __init__(self, model: EncodecModel, *, num_codebooks: int | None = None,
                 bandwidth: float | None = None, what: str = "streamed audio") -> None:
        _check_segmented(model)
        self.num_codebooks = model.resolve_codebooks(num_codebooks, bandwidth)
        self.what = what
        super().__init__(model)

    def _reset(self) -> None:
        self._buffer: MaybeTensor = None
        self.samples = 0

    def _encode(self, chunk: torch.Tensor) -> EncodedFrame:
        # Hook: EncodecModel._encode_chunk is the per-segment step of model.encode.
        return self.model._encode_chunk(chunk, self.num_codebooks)

    def _drain(self, minimum: int) -> list[EncodedFrame]:
        segment, stride = self.model.segment_length, self.model.segment_stride
        frames = []
        while _length(self._buffer) >= minimum and _length(self._buffer) > 0:
            frames.append(self._encode(self._buffer[..., :segment]))
            self._buffer = _rest(self._buffer, stride)
        return frames

    @torch.no_grad()
    def push(self, chunk: torch.Tensor) -> list[EncodedFrame]:
        self._open()
        _check_chunk(chunk, self.model.channels, self._batch)
        self._batch = chunk.shape[0]
        if chunk.shape[-1] == 0:
            return []
        self._check_values(chunk, self.samples)
        self.samples += chunk.shape[-1]
        self._buffer = _cat(self._buffer, chunk)
        return self._drain(self.model.segment_length)

    @torch.no_grad()
    def flush(self) -> list[EncodedFrame]:
        self._open()
        if self.samples == 0:
            raise ValueError("the stream is empty (0 samples): nothing to encode")
        self._closed = True
        return self._drain(1)


class ChunkedStreamingDecoder(_Stream):
    """For segment models: decodes each :class:`EncodedFrame` and overlap-adds it.

    ``push(frame) -> audio (B, C, n)``: the samples before the next segment's start are final
    (they are covered by this segment and the previous one only). ``flush(last_frames)``
    decodes the encoder's final frames and returns them with the last segment's overlap. The
    concatenation equals ``model.decode(frames)`` to float rounding (bit for bit against a
    model not prepared for inference, which decodes segment by segment).
    """

    def __init__(self, model: EncodecModel) -> None:
        _check_segmented(model)
        super().__init__(model)

    def _reset(self) -> None:
        self._weight: torch.Tensor | None = None
        self._sum: MaybeTensor = None  # weighted sum of the pending samples
        self._weight_sum: MaybeTensor = None
        self.segments = 0

    def _take(self, n: int) -> torch.Tensor:
        if self._sum is None:
            return self._weight.new_zeros(self._batch, self.model.channels, 0)
        out = self._sum[..., :n] / self._weight_sum[:n]
        self._sum, self._weight_sum = _rest(self._sum, n), _rest(self._weight_sum, n)
        return out

    @torch.no_grad()
    def push(self, frame: EncodedFrame) -> torch.Tensor:
        self._open()
        if not isinstance(frame, EncodedFrame):
            raise ValueError(f"expected an EncodedFrame (codes, scale), got "
                             f"{type(frame).__name__}")
        if self._batch is not None and frame.codes.shape[0] != self._batch:
            raise ValueError(f"batch size changed within the stream: {self._batch} -> "
                             f"{frame.codes.shape[0]}")
        self._batch = frame.codes.shape[0]
        # Hook: EncodecModel._decode_chunk is the per-segment step of model.decode.
        audio = self.model._decode_chunk(frame)
        if self._weight is None:  # offline, every segment uses the first one's weights
            self._weight = overlap_add_weights(audio.shape[-1], audio)
        n = audio.shape[-1]
        if n > self._weight.shape[-1]:
            raise ValueError(f"segment {self.segments} decodes to {n} samples, longer than the "
                             f"first one ({self._weight.shape[-1]})")
        grow = n - _length(self._sum)
        if grow > 0:
            self._sum = _cat(self._sum, audio.new_zeros(*audio.shape[:-1], grow))
            self._weight_sum = _cat(self._weight_sum, audio.new_zeros(grow))
        self._sum[..., :n] += self._weight[:n] * audio
        self._weight_sum[:n] += self._weight[:n]
        self.segments += 1
        return self._take(min(self.model.segment_stride, n))

    @torch.no_grad()
    def flush(self, frames: EncodedFrame | Iterable[EncodedFrame] | None = None) -> torch.Tensor:
        """End the stream: decode ``frames`` (the encoder's ``flush()``), then return their
        audio with the last segment's overlap."""
        self._open()
        if isinstance(frames, EncodedFrame):
            frames = [frames]
        heads = [self.push(frame) for frame in frames or ()]
        if self.segments == 0:
            raise ValueError("the stream is empty (no segments): nothing to decode")
        self._closed = True
        return torch.cat([*heads, self._take(_length(self._sum))], dim=-1)


# -- long files in bounded memory ---------------------------------------------------------

AudioBlock = Union[torch.Tensor, np.ndarray]


def _as_batch(block: AudioBlock) -> torch.Tensor:
    """``(C, n)`` or ``(B, C, n)`` tensor/array -> ``(B, C, n)`` float tensor."""
    if isinstance(block, np.ndarray):
        block = torch.from_numpy(np.ascontiguousarray(block))
    if not isinstance(block, torch.Tensor) or block.dim() not in (2, 3):
        found = tuple(block.shape) if isinstance(block, torch.Tensor) else type(block).__name__
        raise ValueError(f"audio blocks must be (channels, samples) or (batch, channels, "
                         f"samples), got {found}")
    return block.unsqueeze(0) if block.dim() == 2 else block


def encode_blocks(blocks: Iterable[AudioBlock], model: EncodecModel, *,
                  num_codebooks: int | None = None, bandwidth: float | None = None,
                  what: str = "streamed audio") -> Iterator[EncodedFrame]:
    """Audio blocks ``(C, n)`` or ``(B, C, n)`` at the model's rate -> encoded frames.

    Whole-file models yield consecutive pieces of the one chunk's codes (``scale`` None;
    concatenated along time they are ``model.encode(all)[0].codes``); segment models yield
    one frame per segment, as ``model.encode`` returns them. Blocks may have any length.
    ``what`` names the input in errors (a NaN sample) and warnings (a peak far above 1).
    """
    if model.segment_length is None:
        encoder = StreamingEncoder(model, num_codebooks=num_codebooks, bandwidth=bandwidth,
                                   what=what)
        for block in blocks:
            codes = encoder.push(_as_batch(block))
            if codes.shape[-1]:
                yield EncodedFrame(codes, None)
        yield EncodedFrame(encoder.flush(), None)
    else:
        chunked = ChunkedStreamingEncoder(model, num_codebooks=num_codebooks, bandwidth=bandwidth,
                                          what=what)
        for block in blocks:
            yield from chunked.push(_as_batch(block))
        yield from chunked.flush()


def decode_blocks(frames: Iterable[EncodedFrame | torch.Tensor], model: EncodecModel, *,
                  length: int | None = None) -> Iterator[torch.Tensor]:
    """Encoded frames (as :func:`encode_blocks` yields them) -> audio blocks ``(B, C, n)``.

    ``length`` (samples) cuts the padding of the last frame off, as the offline caller does.
    """
    if model.segment_length is None:
        decoder: StreamingDecoder | ChunkedStreamingDecoder = StreamingDecoder(model)
    else:
        decoder = ChunkedStreamingDecoder(model)
    remaining = math.inf if length is None else length

    def cut(audio: torch.Tensor) -> torch.Tensor:
        nonlocal remaining
        audio = audio[..., : int(min(remaining, audio.shape[-1]))]
        remaining -= audio.shape[-1]
        return audio

    for frame in frames:
        if isinstance(decoder, StreamingDecoder) and isinstance(frame, EncodedFrame):
            if frame.scale is not None:
                raise ValueError(f"{model.name} does not use scales, got a frame with one")
            frame = frame.codes
        block = cut(decoder.push(frame))
        if block.shape[-1]:
            yield block
    block = cut(decoder.flush())
    if block.shape[-1]:
        yield block


def encode_file(source: str | os.PathLike | Iterable[AudioBlock], model: EncodecModel, *,
                num_codebooks: int | None = None, bandwidth: float | None = None,
                block_seconds: float = 5.0) -> Iterator[EncodedFrame]:
    """Encode a file (path) or an iterator of converted audio blocks in bounded memory.

    A path is read ``block_seconds`` at a time and converted to the model's rate and channels
    on the way (:func:`codec.audio.iter_audio_blocks`). Yields what :func:`encode_blocks`
    yields; the codes are those of a whole-file ``model.encode`` of the converted audio. Peak
    memory depends on ``block_seconds``, not on the file length.
    """
    what = "streamed audio"
    if isinstance(source, (str, os.PathLike)):
        what = str(source)
        block_size = max(1, round(block_seconds * model.sample_rate))
        source = audio_io.iter_audio_blocks(source, block_size, sample_rate=model.sample_rate,
                                            channels=model.channels)
    return encode_blocks(source, model, num_codebooks=num_codebooks, bandwidth=bandwidth,
                         what=what)


def decode_to_file(frames: Iterable[EncodedFrame | torch.Tensor], path_out: str | os.PathLike,
                   model: EncodecModel, *, length: int | None = None,
                   subtype: str = "PCM_16") -> int:
    """Decode frames into a .wav/.flac file written block by block; returns samples written.

    The file appears under its name only once complete (:class:`codec.audio.AudioFileWriter`;
    integer subtypes clip to [-1, 1] with a warning). ``length`` cuts the last frame's padding.
    """
    with audio_io.AudioFileWriter(path_out, model.sample_rate, model.channels,
                                  subtype=subtype) as out:
        for block in decode_blocks(frames, model, length=length):
            if block.shape[0] != 1:
                raise ValueError(f"a file holds one stream, got a batch of {block.shape[0]}")
            out.write(block[0])
        return out.frames
