"""EnCodec neural audio codec: models, checkpoint formats, .ecdc files, streaming."""
from . import formats  # noqa: F401  (gives EncodecModel its from_pretrained/save_pretrained)
from .config import PRESETS, EncodecConfig
from .model import EncodecModel, EncodedFrame, InterleavedStereo

__all__ = ["PRESETS", "EncodecConfig", "EncodecModel", "EncodedFrame", "InterleavedStereo"]
