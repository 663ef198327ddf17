"""``python -m inference``: the tokenwave command line."""
import sys

from .cli.main import main

sys.exit(main())
