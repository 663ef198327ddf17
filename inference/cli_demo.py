"""``tokenwave demo``: serve the Gradio app (:mod:`demos.app`) on localhost.

    tokenwave demo [--model PATH_OR_NAME] [--host 127.0.0.1] [--port 7860] [--share] [--concurrency 2]

``--model`` is the default model in the app's list (a generator folder or a name in
``$TOKENWAVE_MODELS``); without it the registry's default model, else the first generator found,
else an untrained random stand-in (labelled so) is selected. ``--host 0.0.0.0`` serves other
machines too; ``--share`` asks gradio for a public link (needs internet).
"""
from __future__ import annotations

import argparse

from inference.cli import CliError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options, shared by ``tokenwave demo`` and ``python -m demos.app``."""
    parser.add_argument("--model", metavar="PATH_OR_NAME",
                        help="default model: a generator folder, a name in $TOKENWAVE_MODELS, or 'random' "
                             "(the untrained stand-in)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    parser.add_argument("--concurrency", type=int, default=2, metavar="N",
                        help="requests processed at once; more wait in the queue (default 2)")


def cmd_demo(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CliError("the demo needs gradio: pip install 'tokenwave[demo]' (or pip install gradio)") from None
    if args.concurrency < 1:
        raise CliError(f"--concurrency must be at least 1, got {args.concurrency}")
    from demos.app import DemoError, launch

    try:
        launch(args.model, host=args.host, port=args.port, share=args.share, concurrency=args.concurrency)
    except DemoError as error:
        raise CliError(str(error)) from None
    return 0


def register(commands) -> None:
    """Add ``demo`` to the ``tokenwave`` sub-commands."""
    sub = commands.add_parser("demo", help="start the Gradio demo (text to music, codec round trip)",
                              description=__doc__.split("\n\n")[0])
    add_arguments(sub)
    sub.set_defaults(func=cmd_demo)


__all__ = ["add_arguments", "cmd_demo", "register"]
