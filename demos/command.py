"""``tokenwave demo``: serve the Gradio app (:mod:`demos.app`) on localhost.

    tokenwave demo [--model PATH_OR_NAME] [--host 127.0.0.1] [--port 7860] [--share] [--concurrency 2]
    python -m demos.command [the same options]

``--model`` is the default model in the app's list (a generator folder or a name in
``$TOKENWAVE_MODELS``); without it the registry's default model, else the first generator found,
else an untrained random stand-in (labelled so) is selected. ``--host 0.0.0.0`` serves other
machines too; ``--share`` asks gradio for a public link (needs internet).

The command reaches ``tokenwave`` through the entry point group ``tokenwave.commands``
(pyproject.toml: ``demo = "demos.command:register"``), so the CLI never imports the demo.
"""
from __future__ import annotations

import argparse
import sys

from inference.cli.common import CliError

from .app import launch
from .models import DemoError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options, for ``tokenwave demo`` and ``python -m demos.command``."""
    parser.add_argument("--model", metavar="PATH_OR_NAME",
                        help="default model: a generator folder, a name in $TOKENWAVE_MODELS, or "
                             "'random' (the untrained stand-in)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true",
                        help="also open a public gradio.live link (needs internet)")
    parser.add_argument("--concurrency", type=int, default=2, metavar="N",
                        help="requests processed at once; more wait in the queue (default 2)")


def cmd_demo(args) -> int:
    """Serve the app until interrupted; a missing gradio or a bad option is a :class:`CliError`."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CliError("the demo needs gradio: pip install 'tokenwave[demo]' (or pip install "
                       "gradio)") from None
    if args.concurrency < 1:
        raise CliError(f"--concurrency must be at least 1, got {args.concurrency}")
    try:
        launch(args.model, host=args.host, port=args.port, share=args.share, concurrency=args.concurrency)
    except DemoError as error:
        raise CliError(str(error)) from None
    return 0


def register(commands) -> None:
    """Add ``demo`` to the ``tokenwave`` sub-commands (the ``tokenwave.commands`` entry point)."""
    sub = commands.add_parser("demo", help="start the Gradio demo (text to music, codec round trip)",
                              description=__doc__.split("\n\n")[0])
    add_arguments(sub)
    sub.set_defaults(func=cmd_demo)


def main(argv: list[str] | None = None) -> int:
    """``python -m demos.command``: the demo without the rest of ``tokenwave``; errors are one
    ``demo:`` line, exit status 1."""
    parser = argparse.ArgumentParser(prog="python -m demos.command",
                                     description="the tokenwave Gradio demo")
    add_arguments(parser)
    try:
        return cmd_demo(parser.parse_args(argv))
    except CliError as error:
        parser.exit(1, f"demo: {error}\n")


__all__ = ["add_arguments", "cmd_demo", "main", "register"]


if __name__ == "__main__":
    sys.exit(main())
