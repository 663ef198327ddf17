"""Streaming EnCodec: encode and decode chunk by chunk, and long files in bounded memory.

Layer-wise streams (:class:`StreamingEncoder`, :class:`StreamingDecoder`) are for models that
encode a file as one chunk: the causal 24 kHz model and the non-causal 32/16 kHz ones. Every
layer keeps its own state (:mod:`codec.stream_layers`) and emits an output as soon as no
later input can change it. After the stream start a code waits for
``StreamingEncoder.lookahead`` samples beyond its frame: 0 at 24 kHz (a code comes out when
the last of its 320 samples is in), 2386 at 32 kHz, 1195 at 16 kHz; the decoder holds back the
last 2402 (32 kHz) or 1203 (16 kHz) samples of what the pushed frames span and turns each frame
into its 320 samples at once at 24 kHz. At the start, the causal 24 kHz model's first 7 codes
(and the decoder's first 7 frames of audio) come out together, once the first convolution's
reflect padding is available. ``flush()`` ends a stream with the offline right padding and
returns what was held back: ``dec.flush(enc.flush())`` ends a round trip.

Exactness: in float32 on CPU on one intra-op thread, the concatenated streamed codes are
``model.encode``'s of the whole signal bit for bit for every chunking, 1-sample chunks
included (:mod:`codec.kernels`), except where the offline pass itself rounds by the total
length, which a stream cannot know before its end:

* short streams at batch 1: torch runs a convolution over at most 20480 input elements at
  batch 1 on its native kernel; the stream assumes the long case, bitwise from 10881 samples
  at 24 kHz, 8961 at 32 kHz and 4481 at 16 kHz (full-size models);
* the stream end: an elementwise kernel computes the last ``numel % 32`` elements of a float32
  tensor in a scalar loop that rounds differently; in the 24 kHz encoder this can flip a
  near-tie code of the last one or two frames when batch x length is odd.

In float64 the codes are bitwise for every chunking and length. The decoder's audio equals
``model.decode``'s to float rounding.

Segment-wise streams (:class:`ChunkedStreamingEncoder`, :class:`ChunkedStreamingDecoder`) are
for models that encode in segments (48 kHz: 1 s windows 0.99 s apart, each scaled by its RMS):
a segment is encoded as soon as its last sample is in, through the model's own per-segment
step, so codes and scales are the offline ones whatever the chunking; the decoder overlap-adds
each segment onto the previous one's tail with offline's triangular weights. Latency: one
segment.

Long files: :func:`encode_blocks` / :func:`decode_blocks` turn iterators of audio blocks into
iterators of :class:`~codec.model.EncodedFrame` and back; :func:`encode_file` /
:func:`decode_to_file` read (converting rate and channels) and write files block by block
through :mod:`codec.audio`. Peak memory is set by the block size, not the file length, and the
codes are those of a whole-file ``model.encode`` (with the exceptions above).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from typing import Union

import numpy as np
import torch
from torch.nn import functional as F

from . import audio as audio_io
from .kernels import MIN_COLUMNS
from .model import EncodecModel, EncodedFrame, overlap_add_weights
from .stream_layers import (MaybeTensor, Stream, build_nodes, cat_time, check_chunk,
                            check_layerwise, check_segmented, length_of, rest_of)

__all__ = ["ChunkedStreamingDecoder", "ChunkedStreamingEncoder", "StreamingDecoder",
           "StreamingEncoder", "decode_blocks", "decode_to_file", "encode_blocks", "encode_file"]


class StreamingEncoder(Stream):
    """Audio chunks of any length in, codes out as soon as each frame is final.

    ``push(chunk (B, C, n)) -> codes (B, K, f)`` with ``f >= 0``; ``flush() -> codes (B, K, f)``
    ends the stream: its codes are the last frames', so pass them on (``dec.flush(codes)``).
    The concatenated codes are ``model.encode(whole_stream)``'s bit for bit (in float32 on CPU
    too, but for short streams at batch 1 and the end-of-stream case in the module
    docstring's Exactness). Pushed audio must be finite (``what`` names it in the error).
    """

    def __init__(self, model: EncodecModel, *, num_codebooks: int | None = None,
                 bandwidth: float | None = None, what: str = "streamed audio") -> None:
        check_layerwise(model)
        self.num_codebooks = model.resolve_codebooks(num_codebooks, bandwidth)
        self.what = what
        super().__init__(model)

    def _reset(self) -> None:
        self._layers = build_nodes(self.model.encoder)
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
        check_chunk(chunk, self.model.channels, self._batch)
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


class StreamingDecoder(Stream):
    """Codes in, audio out as soon as it is final.

    ``push(codes (B, K, f)) -> audio (B, C, n)``; after the stream start each pushed frame
    yields ``hop_length`` samples (causal) or the samples its lookahead made final
    (non-causal); ``flush(last_codes)`` decodes the encoder's final codes and returns them with
    the rest. The concatenation equals ``model.decode(all_codes)`` to float rounding.
    """

    def __init__(self, model: EncodecModel) -> None:
        check_layerwise(model)
        super().__init__(model)

    def _reset(self) -> None:
        self._layers = build_nodes(self.model.decoder)
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
class ChunkedStreamingEncoder(Stream):
    """For segment models: one :class:`EncodedFrame` per segment as soon as it is complete.

    ``push(chunk (B, C, n)) -> list[EncodedFrame]``; ``flush()`` encodes the last, shorter
    segments exactly as ``model.encode`` does (pass them on: ``dec.flush(enc.flush())``).
    Only the unfinished segment is kept. Pushed audio must be finite.
    """

    def __init__(self, model: EncodecModel, *, num_codebooks: int | None = None,
                 bandwidth: float | None = None, what: str = "streamed audio") -> None:
        check_segmented(model)
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
        while length_of(self._buffer) >= minimum and length_of(self._buffer) > 0:
            frames.append(self._encode(self._buffer[..., :segment]))
            self._buffer = rest_of(self._buffer, stride)
        return frames

    @torch.no_grad()
    def push(self, chunk: torch.Tensor) -> list[EncodedFrame]:
        self._open()
        check_chunk(chunk, self.model.channels, self._batch)
        self._batch = chunk.shape[0]
        if chunk.shape[-1] == 0:
            return []
        self._check_values(chunk, self.samples)
        self.samples += chunk.shape[-1]
        self._buffer = cat_time(self._buffer, chunk)
        return self._drain(self.model.segment_length)

    @torch.no_grad()
    def flush(self) -> list[EncodedFrame]:
        self._open()
        if self.samples == 0:
            raise ValueError("the stream is empty (0 samples): nothing to encode")
        self._closed = True
        return self._drain(1)


class ChunkedStreamingDecoder(Stream):
    """For segment models: decodes each :class:`EncodedFrame` and overlap-adds it.

    ``push(frame) -> audio (B, C, n)``: the samples before the next segment's start are final
    (they are covered by this segment and the previous one only). ``flush(last_frames)``
    decodes the encoder's final frames and returns them with the last segment's overlap. The
    concatenation equals ``model.decode(frames)`` to float rounding (bit for bit against a
    model not prepared for inference, which decodes segment by segment).
    """

    def __init__(self, model: EncodecModel) -> None:
        check_segmented(model)
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
        self._sum, self._weight_sum = rest_of(self._sum, n), rest_of(self._weight_sum, n)
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
        grow = n - length_of(self._sum)
        if grow > 0:
            self._sum = cat_time(self._sum, audio.new_zeros(*audio.shape[:-1], grow))
            self._weight_sum = cat_time(self._weight_sum, audio.new_zeros(grow))
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
        return torch.cat([*heads, self._take(length_of(self._sum))], dim=-1)


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
