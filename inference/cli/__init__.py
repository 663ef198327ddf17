"""The ``tokenwave`` command line, one module per command group.

:mod:`.main` builds the parser and runs a command; :mod:`.common` holds what the commands share
(:class:`CliError`, file/folder jobs, early checks); :mod:`.codec` compress, decompress, tokens,
roundtrip; :mod:`.generate`; :mod:`.train` prepare, make-text-encoder, finetune;
:mod:`.train_codec`; :mod:`.hub` download, models. ``tokenwave demo`` is :mod:`demos.command`,
found through the ``tokenwave.commands`` entry point group.

The codec helpers re-exported here live in :mod:`codec.pretrained`; they are importable from
``inference.cli`` because scripts and tests have always found them here.
"""
from codec.pretrained import is_random, load_codec, model_label, random_entropy_lm, random_model

from .common import CliError
from .main import build_parser, main

__all__ = ["CliError", "build_parser", "is_random", "load_codec", "main", "model_label",
           "random_entropy_lm", "random_model"]
