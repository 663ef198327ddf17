"""Import the reference implementations used as oracles in tests and benchmarks.

The PyPI ``encodec`` package imports ``torchaudio`` at module level, but only uses it for
audio I/O and resampling, which the oracle tests never call. torchaudio has no working CPU
build here, so a minimal stand-in module is registered before importing ``encodec``.
"""
from __future__ import annotations

import sys
import types


def _install_torchaudio_stand_in() -> None:
    if "torchaudio" in sys.modules:
        return
    try:  # a real, working torchaudio wins
        import torchaudio  # noqa: F401
        return
    except Exception:
        sys.modules.pop("torchaudio", None)
    stand_in = types.ModuleType("torchaudio")

    def _unavailable(*args, **kwargs):
        raise RuntimeError("torchaudio stand-in: audio I/O is not available in oracle tests")

    stand_in.load = _unavailable
    stand_in.save = _unavailable
    stand_in.transforms = types.SimpleNamespace(Resample=_unavailable)
    sys.modules["torchaudio"] = stand_in


def import_encodec():
    """Return the reference ``encodec`` package, or raise ImportError if not installed."""
    try:  # transformers checks for torchaudio when first imported: let it see the real state
        import transformers  # noqa: F401, PLC0415
    except ImportError:
        pass
    _install_torchaudio_stand_in()
    import encodec  # noqa: PLC0415

    return encodec
