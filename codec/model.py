"""EnCodec: SEANet encoder + residual VQ + SEANet decoder (:class:`EncodecModel`), and
:class:`InterleavedStereo`, stereo through a mono model. Both take audio ``(B, C, T)`` and give
codes ``(B, K, F)`` with ``sample_rate``, ``frame_rate``, ``num_codebooks`` and ``codebook_size``.

Configs and presets are in :mod:`codec.config` (re-exported here); checkpoint files in
:mod:`codec.formats`, which builds models from this module and, on import, hands
:class:`EncodecModel` its loader and saver (:func:`use_checkpoint_formats`), so that
``from_pretrained``/``save_pretrained`` work without this module importing the formats.
"""
from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from .audio import check_audio_values
from .config import PRESETS, EncodecConfig
from .conv import fold_weight_norm
from .quantization import ResidualVectorQuantizer
from .runners import run_channel_major, run_time_major
from .seanet import SEANetDecoder, SEANetEncoder

__all__ = ["PRESETS", "EncodecConfig", "EncodecModel", "EncodedFrame", "InterleavedStereo",
           "linear_overlap_add", "overlap_add_weights", "use_checkpoint_formats"]


_Loader = Callable[..., "EncodecModel"]
_Saver = Callable[..., Any]
_FORMATS: list[tuple[_Loader, _Saver]] = []


def use_checkpoint_formats(load: _Loader, save: _Saver) -> None:
    """Install the checkpoint loader and saver behind ``from_pretrained``/``save_pretrained``;
    :mod:`codec.formats` calls it once on import (``import codec`` imports it)."""
    _FORMATS[:] = [(load, save)]


def _checkpoint_formats(method: str) -> tuple[_Loader, _Saver]:
    if not _FORMATS:
        raise RuntimeError(f"EncodecModel.{method} needs codec.formats; import codec (or "
                           f"codec.formats) first")
    return _FORMATS[0]


class EncodedFrame(NamedTuple):
    """One chunk's codes ``(B, K, F)`` and, for normalizing models, its scale ``(B, 1)``."""

    codes: torch.Tensor
    scale: torch.Tensor | None


def overlap_add_weights(length: int, like: torch.Tensor) -> torch.Tensor:
    """Triangular weights ``(length,)`` of one chunk in :func:`linear_overlap_add`."""
    t = torch.linspace(0, 1, length + 2, device=like.device, dtype=like.dtype)[1:-1]
    return 0.5 - (t - 0.5).abs()


def linear_overlap_add(frames: list[torch.Tensor], stride: int) -> torch.Tensor:
    """Overlap-add ``(..., T_i)`` chunks placed ``stride`` apart with triangular weights.

    Each position is the weighted mean of the chunks covering it; a weight peaks mid-chunk, so
    where two chunks overlap the result cross-fades linearly between them.
    """
    if not frames:
        raise ValueError("nothing to overlap-add")
    first = frames[0]
    total = stride * (len(frames) - 1) + frames[-1].shape[-1]
    weight = overlap_add_weights(first.shape[-1], first)
    out = first.new_zeros(*first.shape[:-1], total)
    weight_sum = first.new_zeros(total)
    for i, frame in enumerate(frames):
        n = frame.shape[-1]
        out[..., i * stride: i * stride + n] += weight[:n] * frame
        weight_sum[i * stride: i * stride + n] += weight[:n]
    return out / weight_sum


BATCH_SAMPLES = 1 << 18  # samples per stacked batch (5 chunks at 48 kHz): bounds the memory


def _equal_length_groups(inputs: list[torch.Tensor]) -> list[list[int]]:
    """Indices of inputs grouped by (length, dtype, device), each group within BATCH_SAMPLES."""
    groups: dict[tuple, list[list[int]]] = {}
    for i, x in enumerate(inputs):
        key = (x.shape[1:], x.dtype, x.device)
        batches = groups.setdefault(key, [[]])
        used = sum(inputs[j].shape[0] for j in batches[-1]) * x.shape[-1]
        if batches[-1] and used + x.shape[0] * x.shape[-1] > BATCH_SAMPLES:
            batches.append([])
        batches[-1].append(i)
    return [batch for batches in groups.values() for batch in batches]


def _escape_frame(frame: EncodedFrame) -> EncodedFrame:
    """A frame computed under inference mode as ordinary tensors (usable with autograd and
    in-place edits afterwards); codes and scales are tiny, so the copies cost nothing."""
    codes, scale = frame
    return EncodedFrame(codes.clone(), None if scale is None else scale.clone())


def _describe(obj: object) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


class EncodecModel(nn.Module):
    """EnCodec neural audio codec.

    ``encode`` turns ``(B, C, T)`` audio into a list of :class:`EncodedFrame` (one per chunk;
    a single one unless the config sets ``segment``); ``decode`` inverts it. Any number of
    codebooks from 1 to ``num_codebooks`` can be chosen per call, directly or as a bandwidth.
    The codec interface it shares with :class:`InterleavedStereo`: rates, ``channels``,
    ``num_codebooks``, ``encode_to_codes``, ``decode``, ``base_model`` and ``interleaved``.
    """

    interleaved = False  # one model codes all channels (InterleavedStereo: True)

    def __init__(self, config: EncodecConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = SEANetEncoder(config.seanet())
        self.decoder = SEANetDecoder(config.decoder_seanet())
        self.quantizer = ResidualVectorQuantizer(
            dimension=config.dimension, num_codebooks=config.num_codebooks,
            codebook_size=config.codebook_size)

    @property
    def base_model(self) -> "EncodecModel":
        """The model that holds the weights (itself; InterleavedStereo: its mono model)."""
        return self

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "EncodecModel":
        if name not in PRESETS:
            raise ValueError(f"unknown EnCodec preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(replace(PRESETS[name], **overrides))

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike, **kwargs: Any) -> "EncodecModel":
        """Load any supported checkpoint format or a model name (:func:`codec.formats.load_model`)."""
        return _checkpoint_formats("from_pretrained")[0](path_or_name, **kwargs)

    def save_pretrained(self, path: str | os.PathLike, **kwargs: Any) -> None:
        """Write the tokenwave format, or ``format=`` another (:func:`codec.formats.save_model`)."""
        _checkpoint_formats("save_pretrained")[1](self, path, **kwargs)

    def prepare_for_inference(self, device: str | torch.device | None = None,
                              dtype: torch.dtype | None = None, *,
                              exact_codes: bool = True) -> "EncodecModel":
        """Fold weight norm, switch to eval and the inference runners; returns self.

        ``dtype`` applies to the encoder and decoder (float16/bfloat16 are for GPUs; on CPU
        bfloat16 runs but costs accuracy, see ``tests/test_codec_model.py``); with a half
        precision dtype the codebooks stay float32 so that distances are not rounded to it.

        On CPU the decoder then runs time-major with channels-last convolutions
        (:func:`codec.runners.run_time_major`), 1.5-2x faster than the references, audio within
        ~1e-7 relative of theirs. By default the encoder keeps the reference's kernels
        (:func:`codec.runners.run_channel_major`): codes are bitwise those the reference
        implementations give with the same threads on the same machine. ``exact_codes=False``
        runs the encoder time-major too and stacks equal-length chunks into batches, 1.3-2x
        faster; a code can then differ from the reference's where its two nearest codewords
        are within float rounding of each other (the reference itself flips such codes between
        1 and 2 threads). On GPUs both run the modules' own kernels, without autograd.
        """
        fold_weight_norm(self)
        self.eval()
        self.requires_grad_(False)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)
            if dtype in (torch.float16, torch.bfloat16):
                self.quantizer.float()
        self._runner = "exact" if exact_codes else "fast"
        return self

    @property
    def inference_runner(self) -> str | None:
        """``None`` (modules' forward), ``"exact"`` or ``"fast"``; see prepare_for_inference."""
        return self.__dict__.get("_runner")

    def train(self, mode: bool = True) -> "EncodecModel":
        """As ``nn.Module.train``; training mode also leaves the inference runners."""
        if mode:
            self.__dict__.pop("_runner", None)
        return super().train(mode)

    # -- properties ---------------------------------------------------------------------
    name = property(lambda self: self.config.name)
    sample_rate = property(lambda self: self.config.sample_rate)
    channels = property(lambda self: self.config.channels)
    normalize = property(lambda self: self.config.normalize)
    num_codebooks = property(lambda self: self.config.num_codebooks)
    codebook_size = property(lambda self: self.config.codebook_size)
    hop_length = property(lambda self: self.config.hop_length)
    frame_rate = property(lambda self: self.config.frame_rate)
    bits_per_codebook = property(lambda self: self.config.bits_per_codebook)
    bandwidth_per_codebook = property(lambda self: self.config.bandwidth_per_codebook)
    segment_length = property(lambda self: self.config.segment_length)
    segment_stride = property(lambda self: self.config.segment_stride)

    def num_codebooks_for_bandwidth(self, bandwidth: float) -> int:
        """Codebooks for a bandwidth in kbps, as the reference counts them (floor, at least 1)."""
        if not (bandwidth > 0 and math.isfinite(bandwidth)):
            raise ValueError(f"bandwidth must be a positive number of kbps, got {bandwidth}")
        ratio = bandwidth / self.bandwidth_per_codebook + 1e-9  # inf for a huge bandwidth
        if ratio >= self.num_codebooks + 1:
            top = self.num_codebooks * self.bandwidth_per_codebook
            raise ValueError(f"{self.name} supports at most {top:g} kbps ({self.num_codebooks} "
                             f"codebooks of {self.bandwidth_per_codebook:g} kbps); got {bandwidth}")
        return max(1, math.floor(ratio))

    def resolve_codebooks(self, num_codebooks: int | None = None,
                          bandwidth: float | None = None) -> int:
        """Pick the codebook count from either argument; neither means all of them."""
        if num_codebooks is not None and bandwidth is not None:
            raise ValueError("give either num_codebooks or bandwidth, not both")
        if bandwidth is not None:
            return self.num_codebooks_for_bandwidth(bandwidth)
        if num_codebooks is None:
            return self.num_codebooks
        if not 1 <= int(num_codebooks) <= self.num_codebooks:
            raise ValueError(f"num_codebooks must be between 1 and {self.num_codebooks} for "
                             f"{self.name}, got {num_codebooks}")
        return int(num_codebooks)

    # -- encode / decode ----------------------------------------------------------------
    def _check_audio(self, wav: torch.Tensor, what: str = "audio to encode") -> None:
        if not isinstance(wav, torch.Tensor):
            raise ValueError(f"audio must be a tensor shaped (batch, channels, samples), got "
                             f"{_describe(wav)}")
        if wav.dim() != 3:
            raise ValueError(f"audio must be shaped (batch, channels, samples), "
                             f"got {tuple(wav.shape)}")
        if wav.shape[1] != self.channels:
            raise ValueError(f"{self.name} expects {self.channels} channel(s), got "
                             f"{wav.shape[1]}; convert with codec.audio.convert_audio")
        if wav.shape[-1] == 0:
            raise ValueError("audio is empty (0 samples)")
        check_audio_values(wav, what)  # a NaN would otherwise become code 0 silently

    def encode(self, wav: torch.Tensor, num_codebooks: int | None = None,
               bandwidth: float | None = None) -> list[EncodedFrame]:
        """``(B, C, T)`` audio -> one :class:`EncodedFrame` per chunk, codes ``(B, K, F)``."""
        self._check_audio(wav)
        n = self.resolve_codebooks(num_codebooks, bandwidth)
        with torch.inference_mode():
            frames = self._encode_pieces(self._chunks(wav), n)
        return [_escape_frame(frame) for frame in frames]

    def encode_batch(self, wavs: list[torch.Tensor], num_codebooks: int | None = None,
                     bandwidth: float | None = None) -> list[list[EncodedFrame]]:
        """Encode items of different lengths ``(C, T_i)``; item ``i`` gets what
        ``encode(wavs[i][None])`` gives it (frames with codes ``(1, K, F_i)``).

        The chunks of all items are encoded together. With the default exact encoder each chunk
        still runs alone: batching changes oneDNN's kernels and so the last bits, and the codes
        must be the reference's. With ``prepare_for_inference(exact_codes=False)`` chunks of
        equal length (all full 1 s chunks of a 48 kHz model, equal-length files) are stacked
        into batches: same codes up to float near-ties, several times faster for many short
        items.
        """
        for i, wav in enumerate(wavs):
            if not isinstance(wav, torch.Tensor) or wav.dim() != 2:
                raise ValueError(f"encode_batch takes a list of (channels, samples) tensors; "
                                 f"item {i} is {_describe(wav)}")
            self._check_audio(wav[None], f"encode_batch item {i}")
        n = self.resolve_codebooks(num_codebooks, bandwidth)
        pieces, owners = [], []
        for i, wav in enumerate(wavs):
            chunks = self._chunks(wav[None])
            pieces += chunks
            owners += [i] * len(chunks)
        with torch.inference_mode():
            frames = self._encode_pieces(pieces, n)
        out: list[list[EncodedFrame]] = [[] for _ in wavs]
        for owner, frame in zip(owners, frames):
            out[owner].append(_escape_frame(frame))
        return out

    def _chunks(self, wav: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C, T)`` -> the chunks the model encodes: the whole file or its segments."""
        length = wav.shape[-1]
        segment = self.segment_length or length
        stride = self.segment_stride or length
        return [wav[..., offset: offset + segment] for offset in range(0, length, stride)]

    def _encode_chunk(self, wav: torch.Tensor, num_codebooks: int) -> EncodedFrame:
        """One chunk ``(B, C, L)`` -> its frame; the per-segment step of ``encode``."""
        with torch.no_grad():
            return self._encode_pieces([wav], num_codebooks)[0]

    def _encode_pieces(self, pieces: list[torch.Tensor], num_codebooks: int
                       ) -> list[EncodedFrame]:
        """Chunks ``(B_i, C, L_i)`` -> frames, each as if encoded alone (see encode_batch)."""
        param = next(self.encoder.parameters())
        scales: list[torch.Tensor | None] = []
        inputs = []
        for wav in pieces:
            wav = wav.to(param.device)
            scale = None
            if self.normalize:
                volume = wav.mean(dim=1, keepdim=True).pow(2).mean(dim=2, keepdim=True).sqrt()
                scale = 1e-8 + volume
                wav = wav / scale
                scale = scale.view(-1, 1)
            scales.append(scale)
            inputs.append(wav.to(param.dtype))
        latents = self._run_batched(self.encoder, inputs, self._encoder_runner())
        book_dtype = self.quantizer.vq.layers[0]._codebook.embed.dtype
        return [EncodedFrame(self.quantizer.encode(z.to(book_dtype), num_codebooks), scale)
                for z, scale in zip(latents, scales)]

    def decode(self, frames: list[EncodedFrame] | torch.Tensor) -> torch.Tensor:
        """Chunks (or one ``(B, K, F)`` code tensor) -> audio ``(B, C, F * hop)``.

        The output can be a few samples longer than the encoded audio: trim it to the length.
        """
        if isinstance(frames, torch.Tensor):
            frames = [EncodedFrame(frames, None)]
        if not frames:
            raise ValueError("no frames to decode")
        if self.segment_length is None and len(frames) != 1:
            raise ValueError(f"{self.name} encodes a file as one chunk, got {len(frames)}")
        if self.inference_runner is None and torch.is_grad_enabled():
            return self._join([self._decode_pieces_with_modules(frames)])[0]
        with torch.inference_mode():
            audio = self._join([self._decode_pieces(frames)])[0]
        return audio.clone(memory_format=torch.contiguous_format)

    def decode_batch(self, items: list[list[EncodedFrame] | torch.Tensor]
                     ) -> list[torch.Tensor]:
        """Decode several items, each a list of frames of batch 1 or codes ``(K, F_i)``;
        returns audio ``(C, F_i * hop)`` per item. Equal-shaped chunks of all items are decoded
        in one batch when the model is prepared for inference."""
        per_item: list[list[EncodedFrame]] = []
        for i, item in enumerate(items):
            if isinstance(item, torch.Tensor):
                if item.dim() != 2:
                    raise ValueError(f"decode_batch takes codes (K, F) or frame lists; item {i} "
                                     f"has shape {tuple(item.shape)}")
                item = [EncodedFrame(item[None], None)]
            if not item or any(frame.codes.dim() != 3 or frame.codes.shape[0] != 1
                               for frame in item):
                raise ValueError(f"decode_batch item {i}: expected frames with codes (1, K, F)")
            if self.segment_length is None and len(item) != 1:
                raise ValueError(f"{self.name} encodes a file as one chunk; item {i} has "
                                 f"{len(item)}")
            per_item.append(item)
        flat = [frame for item in per_item for frame in item]
        if not flat:
            return []
        with torch.inference_mode():
            decoded = self._decode_pieces(flat)
            sizes = [len(item) for item in per_item]
            pieces, start = [], 0
            for size in sizes:
                pieces.append(decoded[start: start + size])
                start += size
            audio = self._join(pieces)
        return [a[0].clone(memory_format=torch.contiguous_format) for a in audio]

    def _join(self, per_item: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        if self.segment_length is None:
            return [chunks[0] for chunks in per_item]
        return [linear_overlap_add(chunks, self.segment_stride) for chunks in per_item]

    def _decode_chunk(self, frame: EncodedFrame) -> torch.Tensor:
        """One frame -> audio ``(B, C, F * hop)``; the per-segment step of ``decode``."""
        if self.inference_runner is None and torch.is_grad_enabled():
            return self._decode_pieces_with_modules([frame])[0]
        return self._decode_pieces([frame])[0]

    def _decode_pieces_with_modules(self, frames: list[EncodedFrame]) -> list[torch.Tensor]:
        """Through the modules' forward, so gradients flow (training)."""
        out = []
        for codes, scale in frames:
            audio = self.decoder(self.quantizer.decode(codes).to(self._param_dtype(self.decoder)))
            out.append(audio if scale is None else audio * scale.view(-1, 1, 1))
        return out

    def _decode_pieces(self, frames: list[EncodedFrame]) -> list[torch.Tensor]:
        """Frames -> audio chunks ``(B_i, C, F_i * hop)``; call without gradients."""
        dtype = self._param_dtype(self.decoder)
        latents = [self.quantizer.decode(codes).to(dtype) for codes, _ in frames]
        runner = self._decoder_runner()
        outs = self._run_batched(self.decoder, latents, runner)
        audio = []
        for out, (_, scale) in zip(outs, frames):
            if dtype in (torch.float16, torch.bfloat16):
                out = out.float()
            audio.append(out if scale is None else out * scale.view(-1, 1, 1).to(out.dtype))
        return audio

    # -- runners ---------------------------------------------------------------------------
    @staticmethod
    def _param_dtype(module: nn.Module) -> torch.dtype:
        return next(module.parameters()).dtype

    def _encoder_runner(self) -> str:
        on_cpu = next(self.encoder.parameters()).device.type == "cpu"
        return "time_major" if self.inference_runner == "fast" and on_cpu else "channel_major"

    def _decoder_runner(self) -> str:
        on_cpu = next(self.decoder.parameters()).device.type == "cpu"
        return "time_major" if self.inference_runner is not None and on_cpu else "channel_major"

    def _run_batched(self, net: SEANetEncoder | SEANetDecoder, inputs: list[torch.Tensor],
                     runner: str) -> list[torch.Tensor]:
        """``net`` on each ``(B_i, C, T_i)`` input -> ``(B_i, C', T_i')`` (no gradients).

        Channel-major runs each input alone (bitwise the modules' result). Time-major stacks
        inputs of equal length, up to ``BATCH_SAMPLES`` samples per batch.
        """
        if runner == "channel_major":
            return [run_channel_major(net.model, x) for x in inputs]
        outputs: list[torch.Tensor | None] = [None] * len(inputs)
        for group in _equal_length_groups(inputs):
            x = inputs[group[0]] if len(group) == 1 else torch.cat([inputs[i] for i in group])
            y = run_time_major(net.model, x.transpose(1, 2)).transpose(1, 2)
            sizes = [inputs[i].shape[0] for i in group]
            for i, part in zip(group, y.split(sizes)):
                outputs[i] = part
        return outputs

    def encode_to_codes(self, wav: torch.Tensor, num_codebooks: int | None = None,
                        bandwidth: float | None = None) -> torch.Tensor:
        """Codes ``(B, K, F)`` of a model that encodes the whole file as one chunk."""
        if self.segment_length is not None:
            raise ValueError(f"{self.name} encodes in chunks with scales; use encode()")
        return self.encode(wav, num_codebooks, bandwidth)[0].codes

    def forward(self, wav: torch.Tensor, num_codebooks: int | None = None,
                bandwidth: float | None = None) -> torch.Tensor:
        """Round trip ``(B, C, T) -> (B, C, T)`` (inference; training uses codec.training)."""
        return self.decode(self.encode(wav, num_codebooks, bandwidth))[..., : wav.shape[-1]]


class InterleavedStereo(nn.Module):
    """Stereo through a mono model, as MusicGen stereo does.

    Left and right are encoded separately; codebooks are interleaved ``[L0, R0, L1, R1, ...]``
    so the codes are ``(B, 2K, F)``. It implements the codec interface :class:`EncodecModel`
    does (rates, channels, ``num_codebooks``, ``encode_to_codes``, ``decode``, ``base_model``,
    ``interleaved``), so callers never check which of the two they hold.
    """

    interleaved = True  # codebooks alternate channels: L0 R0 L1 R1 ...

    def __init__(self, mono: EncodecModel) -> None:
        super().__init__()
        if mono.channels != 1:
            raise ValueError(f"InterleavedStereo wraps a mono model, {mono.name} has "
                             f"{mono.channels} channels")
        if mono.segment_length is not None:
            raise ValueError("InterleavedStereo needs a model that encodes whole files")
        self.model = mono

    sample_rate = property(lambda self: self.model.sample_rate)
    frame_rate = property(lambda self: self.model.frame_rate)
    channels = property(lambda self: 2)
    num_codebooks = property(lambda self: 2 * self.model.num_codebooks)
    codebook_size = property(lambda self: self.model.codebook_size)
    base_model = property(lambda self: self.model)  # the mono model that holds the weights

    def encode_to_codes(self, wav: torch.Tensor, num_codebooks: int | None = None) -> torch.Tensor:
        """The codec interface's name for :meth:`encode`."""
        return self.encode(wav, num_codebooks)

    def encode(self, wav: torch.Tensor, num_codebooks: int | None = None) -> torch.Tensor:
        """``(B, 2, T) -> (B, 2K, F)``, ``num_codebooks`` per channel."""
        if wav.dim() != 3 or wav.shape[1] != 2:
            raise ValueError(f"stereo audio must be shaped (B, 2, T), got {tuple(wav.shape)}")
        batch = wav.shape[0]
        codes = self.model.encode_to_codes(wav.reshape(batch * 2, 1, -1), num_codebooks)
        k, frames = codes.shape[1:]
        # (B, 2, K, F) -> (B, K, 2, F) -> (B, 2K, F): left and right alternate per level
        return codes.view(batch, 2, k, frames).transpose(1, 2).reshape(batch, 2 * k, frames)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``(B, 2K, F) -> (B, 2, F * hop)``."""
        if codes.dim() != 3 or codes.shape[1] % 2:
            raise ValueError(f"interleaved codes must be (B, 2K, F), got {tuple(codes.shape)}")
        batch, k2, frames = codes.shape
        mono = codes.view(batch, k2 // 2, 2, frames).transpose(1, 2).reshape(batch * 2, k2 // 2,
                                                                              frames)
        wav = self.model.decode(mono)
        return wav.view(batch, 2, -1)
