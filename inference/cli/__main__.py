"""``python -m inference.cli``: the tokenwave command line (as ``python -m inference``)."""
import sys

from .main import main

sys.exit(main())
