"""The stateful twins of the SEANet layers, and the bookkeeping every stream shares.

A node takes ``(B, C, n)`` pieces of its layer's input in order and returns the pieces of its
output that no later input can change (None when there are none yet); ``flush()`` ends the
stream and returns the rest, exactly as the layer computes it on the whole input. Each output
sums the same products as offline, through the kernels of :mod:`codec.kernels`.

Stream start: offline, every convolution pads its input on the left (reflect mirrors samples
``1..left``; constant pads zeros), so a node holds its first outputs back until ``left + 1``
input samples are in (reflect), then adds no delay of its own. A non-causal convolution is a
causal one that waits for ``padding_total // 2`` samples of lookahead.

Stream end: offline, a strided convolution pads the right end so that its last window is full
and a transposed convolution trims its output; ``flush()`` knows the total length and does the
same. Streams too short to have emitted anything run each layer offline at ``flush()``.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

from . import audio as audio_io
from .conv import StreamableConv1d, StreamableConvTranspose1d, pad1d
from .kernels import CurrentWeight, exact_conv, exact_pointwise
from .lstm import StreamableLSTM
from .model import EncodecModel
from .seanet import SEANetDecoder, SEANetEncoder, SEANetResnetBlock

# Layers that act on each time step alone, so streaming them needs no state.
POINTWISE = (nn.ELU, nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Identity)

MaybeTensor = Union[torch.Tensor, None]


def cat_time(a: MaybeTensor, b: MaybeTensor) -> MaybeTensor:
    if a is None:
        return b
    if b is None:
        return a
    return torch.cat([a, b], dim=-1)


def length_of(x: MaybeTensor) -> int:
    return 0 if x is None else x.shape[-1]


def rest_of(x: torch.Tensor, start: int) -> MaybeTensor:
    """A compact copy of ``x[..., start:]`` (None if empty).

    A slice would keep the whole block it was cut from alive until the next push.
    """
    return x[..., start:].clone() if start < x.shape[-1] else None


def _check_no_norm(layer: nn.Module, norm: nn.Module) -> None:
    if not isinstance(norm, nn.Identity):
        raise ValueError(f"{type(layer).__name__} has a {type(norm).__name__} normalization over "
                         "the whole time axis, which cannot be streamed layer by layer; models "
                         "that encode in segments stream with ChunkedStreamingEncoder/Decoder")


# -- per-layer streaming nodes ------------------------------------------------------------
class Node:
    def push(self, x: torch.Tensor) -> MaybeTensor:
        raise NotImplementedError

    def flush(self) -> MaybeTensor:
        """The outputs held back for the end of the stream (none for most layers)."""
        return None

    def lookahead(self) -> tuple[int, int]:
        """``(samples, stride)``: input samples beyond an output's own block it waits for."""
        return 0, 1


class PointwiseNode(Node):
    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def push(self, x: torch.Tensor) -> MaybeTensor:
        return exact_pointwise(self.module, x)


class ConvNode(Node):
    """StreamableConv1d: keeps the padded input from the next output's window onwards.

    Coordinates are those of the offline padded input: ``left`` padding samples, then the
    input. Output ``i`` reads padded samples ``[i * stride, i * stride + kernel)``.
    """

    def __init__(self, layer: StreamableConv1d) -> None:
        _check_no_norm(layer, layer.conv.norm)
        if layer.pad_mode == "circular":
            raise ValueError("circular padding needs the end of the stream at its start")
        self.layer = layer
        self.weight = CurrentWeight(layer.conv.conv)
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
            self.raw = cat_time(self.raw, x)
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
        y = exact_conv(self.layer.conv.conv, self.weight(), window)
        self.emitted += ready
        keep_from = max(self.start, min(self.emitted * self.stride, end - self.reserve))
        self.buffer = rest_of(self.buffer, keep_from - self.start)
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
        return exact_conv(self.layer.conv.conv, self.weight(), padded[..., first:])


class ConvTransposeNode(Node):
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


class LSTMNode(Node):
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


class ResidualNode(Node):
    """``shortcut(x) + block(x)``; the branch that ran ahead waits for the other one."""

    def __init__(self, block: Node, shortcut: Node) -> None:
        self.block = block
        self.shortcut = shortcut
        self.pending_block: MaybeTensor = None
        self.pending_shortcut: MaybeTensor = None

    def lookahead(self) -> tuple[int, int]:
        return max(self.block.lookahead(), self.shortcut.lookahead())

    def _combine(self, block: MaybeTensor, shortcut: MaybeTensor) -> MaybeTensor:
        self.pending_block = cat_time(self.pending_block, block)
        self.pending_shortcut = cat_time(self.pending_shortcut, shortcut)
        n = min(length_of(self.pending_block), length_of(self.pending_shortcut))
        if n == 0:
            return None
        out = self.pending_shortcut[..., :n] + self.pending_block[..., :n]
        self.pending_block = rest_of(self.pending_block, n)
        self.pending_shortcut = rest_of(self.pending_shortcut, n)
        return out

    def push(self, x: torch.Tensor) -> MaybeTensor:
        return self._combine(self.block.push(x), self.shortcut.push(x))

    def flush(self) -> MaybeTensor:
        out = self._combine(self.block.flush(), self.shortcut.flush())
        if self.pending_block is not None or self.pending_shortcut is not None:
            raise RuntimeError("residual branches ended with different lengths")
        return out


class ChainNode(Node):
    def __init__(self, nodes: list[Node]) -> None:
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
            out = cat_time(head, node.flush())
        return out

    def lookahead(self) -> tuple[int, int]:
        """Encoder-direction lookahead in input samples, and the total stride."""
        total, stride = 0, 1
        for node in self.nodes:
            ahead, node_stride = node.lookahead()
            total += ahead * stride
            stride *= node_stride
        return total, stride


def build_nodes(module: nn.Module) -> Node:
    """The streaming twin of a SEANet layer tree."""
    if isinstance(module, (SEANetEncoder, SEANetDecoder)):
        return build_nodes(module.model)
    if isinstance(module, nn.Sequential):
        return ChainNode([build_nodes(sub) for sub in module])
    if isinstance(module, StreamableConv1d):
        return ConvNode(module)
    if isinstance(module, StreamableConvTranspose1d):
        return ConvTransposeNode(module)
    if isinstance(module, StreamableLSTM):
        return LSTMNode(module)
    if isinstance(module, SEANetResnetBlock):
        return ResidualNode(build_nodes(module.block), build_nodes(module.shortcut))
    if isinstance(module, POINTWISE):
        return PointwiseNode(module)
    raise TypeError(f"cannot stream a {type(module).__name__} layer; expected one of the SEANet "
                    "layers (StreamableConv1d, StreamableConvTranspose1d, StreamableLSTM, "
                    "SEANetResnetBlock, pointwise activations)")


def check_layerwise(model: EncodecModel) -> None:
    if model.segment_length is not None:
        raise ValueError(f"{model.name} encodes in {model.config.segment} s segments with a "
                         "scale each; stream it with ChunkedStreamingEncoder/Decoder")


def check_segmented(model: EncodecModel) -> None:
    if model.segment_length is None:
        raise ValueError(f"{model.name} encodes whole files; stream it with "
                         "StreamingEncoder/StreamingDecoder")


def check_chunk(chunk: torch.Tensor, channels: int, batch: int | None) -> None:
    if not isinstance(chunk, torch.Tensor) or chunk.dim() != 3:
        found = tuple(chunk.shape) if isinstance(chunk, torch.Tensor) else type(chunk).__name__
        raise ValueError(f"audio chunks must be tensors shaped (batch, channels, samples), "
                         f"got {found}")
    if chunk.shape[1] != channels:
        raise ValueError(f"expected {channels} channel(s), got a chunk with {chunk.shape[1]}")
    if batch is not None and chunk.shape[0] != batch:
        raise ValueError(f"batch size changed within the stream: {batch} -> {chunk.shape[0]}")


class Stream:
    """What every stream keeps: the model, batch size, closed state, one peak warning."""

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
