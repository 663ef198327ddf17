"""The ``tokenwave`` command line: the parser, the dispatch, and how a command ends.

Each command group registers its sub-commands (:mod:`.codec`, :mod:`.generate`, :mod:`.train_codec`,
:mod:`.train`, :mod:`.hub`); packages above the CLI add theirs through the entry point group
``tokenwave.commands`` (a ``register(commands)`` callable: ``tokenwave demo`` comes from
:mod:`demos.command`), so the CLI imports nothing above it.

Errors are one line on stderr, exit status 1 (``--verbose`` adds the traceback); usage errors
one line, exit status 2; warnings one ``tokenwave: warning:`` line. Ctrl-C and SIGTERM unwind
every ``with`` block, so no partial output is left behind (exit 130, or 128 + SIGTERM).
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path

from . import codec, generate, hub, train, train_codec
from .common import one_line

COMMAND_ENTRY_POINTS = "tokenwave.commands"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: every ``with`` block unwinds as on Ctrl-C, so the
    atomic writers remove their temporary files."""


@contextlib.contextmanager
def terminate_as_interrupt():
    """Turn SIGTERM into :class:`Terminated` while the command runs (main thread only: signal
    handlers cannot be installed elsewhere); the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def one_line_warnings():
    """Warnings as ``tokenwave: warning: ...`` lines, not Python's file:line and source; each
    distinct warning once per command, even if this process showed it before (a fresh filter
    state: ``"default"`` resets the once-per-location registries). ResourceWarnings stay off, as
    Python has them by default: they report objects the garbage collector happened to meet
    during the command (an event loop a library left open), nothing the user gave."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"tokenwave: warning: {message}", file=sys.stderr if file is None else file)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.simplefilter("ignore", ResourceWarning)
        warnings.showwarning = show  # restored by catch_warnings, also under a warnings recorder
        yield


def package_version() -> str:
    """tokenwave's version: the installed package's, else the one pyproject.toml states (a
    source checkout that was never installed)."""
    from importlib import metadata

    try:
        return metadata.version("tokenwave")
    except metadata.PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line (``tokenwave generate: error: argument --seed: invalid int value:
    '1e20'; see tokenwave generate --help``), exit status 2, as argparse's own but without the
    usage block. Sub-commands' parsers are made with this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}; see {self.prog} --help\n")


def register_extra_commands(commands) -> None:
    """The sub-commands other installed packages add (entry point group ``tokenwave.commands``).

    One that cannot be loaded is left out with a one-line warning, so a broken extra never
    takes the other commands down with it."""
    from importlib.metadata import entry_points

    for point in entry_points(group=COMMAND_ENTRY_POINTS):
        try:
            point.load()(commands)
        except Exception as error:  # an extra's own failure, whatever it is
            print(f"tokenwave: warning: command {point.name!r} ({point.value}) not loaded: "
                  f"{one_line(error)}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The ``tokenwave`` parser with every sub-command (``args.func`` runs the one chosen)."""
    parser = OneLineParser(
        prog="tokenwave", description="EnCodec audio codec tools: compress to .ecdc, "
        "decompress, extract tokens, round trip. IN may be a folder (then OUT is a folder).")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (codec, generate, train_codec, train, hub):  # in the order --help lists them
        group.register(commands)
    register_extra_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``tokenwave`` with ``argv`` (default: the process's); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help or a usage error (argparse printed it)
        return int(exit_.code or 0)
    try:
        with terminate_as_interrupt(), one_line_warnings():
            return args.func(args)
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM: the with blocks cleaned up
        terminated = isinstance(interrupt, Terminated)
        print(f"tokenwave: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + signal.SIGTERM if terminated else 130
    except Exception as error:  # one line for users; the traceback on request
        if args.verbose:
            traceback.print_exc()
        print(f"tokenwave: error: {one_line(error)}", file=sys.stderr)
        return 1
