"""Generated codes to audio piece by piece, for streaming generation and long decodes."""
from __future__ import annotations

import torch

from codec.model import EncodecModel, InterleavedStereo
from codec.streaming import StreamingDecoder

Codec = EncodecModel | InterleavedStereo


class CodecStream:
    """Decodes generated codes piece by piece: ``push(codes (B, K, f)) -> audio (B, C, n)``.

    Whole-file codecs (24/32/16 kHz, and stereo through :class:`InterleavedStereo`) run the
    layer-wise :class:`codec.streaming.StreamingDecoder`: each push returns the samples that
    no later frame can change and ``flush()`` the held-back tail, so the pieces concatenate to
    ``codec.decode(all codes)`` up to float rounding. A codec that normalizes segments as a
    whole (48 kHz) cannot do that: its codes are kept and decoded at ``flush()``.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.stereo = codec.interleaved
        mono = codec.base_model
        self.decoder = StreamingDecoder(mono) if mono.segment_length is None else None
        self.held: list[torch.Tensor] = []

    def _device(self) -> torch.device:
        return next(self.codec.parameters()).device

    def push(self, codes: torch.Tensor) -> torch.Tensor:
        codes = codes.to(self._device())
        if self.decoder is None:
            self.held.append(codes)
            return torch.zeros(codes.shape[0], self.codec.channels, 0, device=codes.device)
        batch = codes.shape[0]
        if self.stereo:  # (B, 2K, f), codebooks L0 R0 L1 R1 ... -> (2B, K, f), as InterleavedStereo.decode
            frames = codes.shape[-1]
            codes = codes.view(batch, -1, 2, frames).transpose(1, 2).reshape(2 * batch, -1, frames)
        return self._audio(self.decoder.push(codes), batch)

    def flush(self) -> torch.Tensor:
        if self.decoder is None:
            if not self.held:
                raise ValueError("the stream is empty: nothing to decode")
            return self.codec.decode(torch.cat(self.held, dim=-1)).float()
        tail = self.decoder.flush()
        return self._audio(tail, tail.shape[0] // 2 if self.stereo else tail.shape[0])

    def _audio(self, audio: torch.Tensor, batch: int) -> torch.Tensor:
        return (audio.reshape(batch, 2, -1) if self.stereo else audio).float()


__all__ = ["Codec", "CodecStream"]
