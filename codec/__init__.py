"""EnCodec neural audio codec: models, checkpoint formats, .ecdc files, streaming."""
from .model import PRESETS, EncodecConfig, EncodecModel, EncodedFrame, InterleavedStereo

__all__ = ["PRESETS", "EncodecConfig", "EncodecModel", "EncodedFrame", "InterleavedStereo"]
