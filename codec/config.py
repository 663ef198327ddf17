"""EnCodec configurations: :class:`EncodecConfig`, the four public :data:`PRESETS`, and the
quantities derived from a config (hop, frame rate, segment length and stride, bits and kbps per
codebook). Configs are frozen data; a checkpoint carries one (``to_dict``/``from_dict``)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .seanet import SEANetConfig


@dataclass(frozen=True)
class EncodecConfig:
    """Everything needed to build an EnCodec model; a checkpoint carries one."""

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

    def __post_init__(self) -> None:
        for name in ("ratios", "target_bandwidths"):  # JSON gives lists
            object.__setattr__(self, name, tuple(getattr(self, name)))

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
        names = {f.name for f in fields(SEANetConfig)}
        return SEANetConfig(**{k: v for k, v in asdict(self).items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EncodecConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown EncodecConfig fields {sorted(unknown)}; "
                             f"expected a subset of {sorted(known)}")
        return cls(**data)


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
