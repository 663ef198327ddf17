"""EnCodec configurations: :class:`EncodecConfig`, the four public :data:`PRESETS`, and the
quantities derived from a config (hop, frame rate, segment length and stride, bits and kbps per
codebook). Configs are frozen data; a checkpoint carries one (``to_dict``/``from_dict``).

:class:`DictConfig` is the one ``to_dict``/``from_dict`` every config dataclass of the package
uses (codec, LM, quantization, fine-tuning, generator, caption metadata); it lives here, in the
lowest layer, so every layer above can use it."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar, TypeVar

from .seanet import SEANetConfig

C = TypeVar("C", bound="DictConfig")


class DictConfig:
    """``to_dict`` / ``from_dict`` for a frozen config dataclass, written once.

    ``to_dict`` is JSON-ready: top-level tuples become lists. ``from_dict`` is strict: an unknown
    field raises a ValueError naming the known ones; missing fields take their defaults. Hooks
    for the classes whose stored form differs (each keeps existing files byte-identical):

    - ``_tuples_as_lists = False``: keep tuples (a dict that is pickled and compared, not JSON).
    - ``_omit_empty = True``: leave out fields that are None or ``()``.
    - ``_from_dict_fix(data)``: rewrite the stored dict before the strict check (e.g. normalize
      values, drop fields old files carry).
    """

    _tuples_as_lists: ClassVar[bool] = True
    _omit_empty: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        items = asdict(self).items()
        if self._omit_empty:
            items = [(k, v) for k, v in items if v is not None and v != ()]
        if not self._tuples_as_lists:
            return dict(items)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in items}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        data = cls._from_dict_fix(data)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; expected a subset of "
                             f"{sorted(known)}")
        return cls(**data)

    @classmethod
    def _from_dict_fix(cls, data: dict[str, Any]) -> dict[str, Any]:
        """The stored dict as the constructor takes it (the default: unchanged)."""
        return data


@dataclass(frozen=True)
class EncodecConfig(DictConfig):
    """Everything needed to build an EnCodec model; a checkpoint carries one."""

    # Codec training checkpoints pickle ``to_dict()`` and compare it on resume: keep its tuples.
    _tuples_as_lists = False

    name: str = "encodec_24khz"
    sample_rate: int = 24_000
    channels: int = 1
    causal: bool = True
    norm: str = "weight_norm"
    pad_mode: str = "reflect"
    ratios: tuple[int, ...] = (8, 5, 4, 2)
    n_filters: int = 32
    dimension: int = 128
    num_codebooks: int = 32
    codebook_size: int = 1024
    true_skip: bool = False
    n_residual_layers: int = 1
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2
    lstm: int = 2
    trim_right_ratio: float = 1.0
    normalize: bool = False  # per-chunk RMS scaling (48 kHz)
    segment: float | None = None  # chunk duration in seconds; None = whole file at once
    overlap: float = 0.01
    target_bandwidths: tuple[float, ...] = (1.5, 3.0, 6.0, 12.0, 24.0)
    # The decoder's base width when it is not the encoder's (None: n_filters): a decoder widened to
    # render more detail from the same codes (codec.training.widen), which only tokenwave's own
    # format stores. Left out of to_dict when None, so every other config is stored as before.
    decoder_filters: int | None = None
    # LSTM layers in the decoder when not the encoder's (None: ``lstm``): a decoder given seconds of
    # context over the same codes (codec.training.widen.add_decoder_lstm); tokenwave's format only.
    decoder_lstm: int | None = None

    def __post_init__(self) -> None:
        for name in ("ratios", "target_bandwidths"):  # JSON gives lists
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.decoder_filters is not None and (self.decoder_filters < self.compress
                                                 or self.decoder_filters % self.compress):
            raise ValueError(f"decoder_filters must be a positive multiple of compress ({self.compress}), "
                             f"got {self.decoder_filters}")
        if self.decoder_lstm is not None and (isinstance(self.decoder_lstm, bool) or not isinstance(
                self.decoder_lstm, int) or self.decoder_lstm < 0):
            raise ValueError(f"decoder_lstm must be a number of LSTM layers (0 or more), got {self.decoder_lstm!r}")

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for name in ("decoder_filters", "decoder_lstm"):
            if data[name] is None:
                del data[name]
        return data

    @property
    def decoder_width(self) -> int:
        """The decoder's base width (``n_filters`` unless ``decoder_filters`` widens it)."""
        return self.n_filters if self.decoder_filters is None else self.decoder_filters

    @property
    def hop_length(self) -> int:
        """Samples per code frame: the product of the strides."""
        return math.prod(self.ratios)

    @property
    def frame_rate(self) -> int:
        """Code frames per second (rounded up, as the references count them)."""
        return math.ceil(self.sample_rate / self.hop_length)

    @property
    def segment_length(self) -> int | None:
        """Samples per encoded chunk; None when the whole file is one chunk."""
        return None if self.segment is None else int(self.segment * self.sample_rate)

    @property
    def segment_stride(self) -> int | None:
        """Samples between chunk starts (chunks overlap by ``overlap``); None without chunks."""
        length = self.segment_length
        return None if length is None else max(1, int((1 - self.overlap) * length))

    @property
    def bits_per_codebook(self) -> int:
        return int(math.log2(self.codebook_size))

    @property
    def bandwidth_per_codebook(self) -> float:
        """kbps one codebook costs: log2(bins) * frame_rate / 1000."""
        return self.bits_per_codebook * self.frame_rate / 1000

    def seanet(self) -> SEANetConfig:
        """The encoder's SEANet config (the decoder's: :meth:`decoder_seanet`)."""
        names = {f.name for f in fields(SEANetConfig)}
        return SEANetConfig(**{k: v for k, v in asdict(self).items() if k in names})

    def decoder_seanet(self) -> SEANetConfig:
        return replace(self.seanet(), n_filters=self.decoder_width, lstm=self.decoder_lstm_layers)

    @property
    def decoder_lstm_layers(self) -> int:
        """The decoder's LSTM layers (``lstm`` unless ``decoder_lstm`` says otherwise)."""
        return self.lstm if self.decoder_lstm is None else self.decoder_lstm

    @property
    def decoder_differs(self) -> bool:
        """Whether the decoder is not the encoder's mirror (wider, or its own LSTM), which only
        tokenwave's format stores."""
        return self.decoder_filters is not None or self.decoder_lstm is not None



PRESETS: dict[str, EncodecConfig] = {
    "encodec_24khz": EncodecConfig(),
    "encodec_48khz": EncodecConfig(
        name="encodec_48khz", sample_rate=48_000, channels=2, causal=False,
        norm="time_group_norm", num_codebooks=16, normalize=True, segment=1.0,
        target_bandwidths=(3.0, 6.0, 12.0, 24.0)),
    # MusicGen's tokenizer. The released weights are only published as the transformers
    # folder facebook/encodec_32khz (audiocraft's export is a pointer to it), whose config
    # pads by reflection; audiocraft trained it with constant padding. A checkpoint's own
    # config always wins; this preset follows the released model.
    "encodec_32khz": EncodecConfig(
        name="encodec_32khz", sample_rate=32_000, causal=False, ratios=(8, 5, 4, 4),
        n_filters=64, num_codebooks=4, codebook_size=2048, true_skip=True,
        pad_mode="reflect", target_bandwidths=(2.2,)),
    # AudioGen's tokenizer.
    "encodec_16khz": EncodecConfig(
        name="encodec_16khz", sample_rate=16_000, causal=False, ratios=(8, 5, 4, 2),
        n_filters=64, num_codebooks=4, codebook_size=2048, true_skip=True,
        pad_mode="constant", target_bandwidths=(2.2,)),
}
