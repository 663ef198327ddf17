"""``python -m inference``: the tokenwave command line."""
import sys

from .cli import main

sys.exit(main())
