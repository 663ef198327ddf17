"""Compile-on-first-use C kernels, shared by :mod:`codec.cpu_kernels` and :mod:`lm.cpu_kernels`.

A :class:`NativeKernels` names one C source next to its Python module. The first call that
needs it compiles it with ``$CC`` (else ``cc``) and ``-fopenmp`` (the OpenMP runtime torch has
already loaded, so both share one thread pool), into ``$TOKENWAVE_KERNEL_CACHE`` (default
``~/.cache/tokenwave-kernels``) under a hash of the source, compiler and flags, through a
temporary file and a rename (processes may race). Where the CPU, the compiler or the platform
cannot run it, :meth:`NativeKernels.library` is None with one RuntimeWarning saying why, and
callers run torch's kernels. ``TOKENWAVE_CPU_KERNELS=0`` (or :func:`set_enabled` /
:func:`using`) turns every such library off.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

_enabled = os.environ.get("TOKENWAVE_CPU_KERNELS", "1") != "0"


def set_enabled(enabled: bool) -> None:
    """Use tokenwave's kernels where available (True, the default) or always torch's (False)."""
    global _enabled
    _enabled = bool(enabled)


@contextlib.contextmanager
def using(enabled: bool):
    """Within the block, use tokenwave's kernels (True) or torch's (False); for comparisons."""
    global _enabled
    before, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = before


def cache_dir() -> Path:
    configured = os.environ.get("TOKENWAVE_KERNEL_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokenwave-kernels"


def compiler() -> str:
    return os.environ.get("CC") or "cc"


class NativeKernels:
    """One C source compiled on first use.

    ``supported`` names an ``int f(void)`` in the library that says whether this CPU has the
    instructions the source was compiled for (``requirement`` says which, for the warning);
    ``declare(library)`` sets the ctypes signatures.
    """

    def __init__(self, source: Path, flags: tuple[str, ...], *, supported: str, requirement: str,
                 declare: Callable[[ctypes.CDLL], None]) -> None:
        self.source, self.flags = Path(source), tuple(flags)
        self.supported, self.requirement, self.declare = supported, requirement, declare
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget the loaded library or failure (tests: load again under another setting)."""
        self._library: ctypes.CDLL | None = None
        self._failure: str | None = None

    @property
    def name(self) -> str:
        return f"{self.source.parent.name}_{self.source.stem}"

    def _build(self, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            command = [compiler(), *self.flags, str(self.source), "-o", temporary]
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if result.returncode:
                raise OSError(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")
            os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)

    def _load(self) -> ctypes.CDLL:
        if platform.machine().lower() not in ("x86_64", "amd64"):
            raise OSError(f"needs an x86-64 CPU (this is {platform.machine()})")
        key = self.source.read_bytes() + " ".join((compiler(), *self.flags)).encode()
        target = cache_dir() / f"{self.name}-{hashlib.sha256(key).hexdigest()[:16]}.so"
        if not target.exists():
            self._build(target)
        library = ctypes.CDLL(str(target))
        if not getattr(library, self.supported)():
            raise OSError(f"this CPU lacks {self.requirement}")
        self.declare(library)
        return library

    def library(self) -> ctypes.CDLL | None:
        """The compiled library, or None (and a one-time warning saying why)."""
        if self._library is not None or self._failure is not None:
            return self._library
        with self._lock:
            if self._library is None and self._failure is None:
                try:
                    self._library = self._load()
                except (OSError, subprocess.SubprocessError) as error:
                    self._failure = str(error)
                    warnings.warn(f"tokenwave's CPU kernels are unavailable ({self.name}: {self._failure});"
                                  " using torch's (slower)", RuntimeWarning, stacklevel=3)
        return self._library

    def available(self) -> bool:
        """Enabled, compiled and supported by this CPU."""
        return _enabled and self.library() is not None

    def unavailable_reason(self) -> str | None:
        self.library()
        return None if self._library is not None else self._failure
