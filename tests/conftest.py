import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

# Tests never download and never read the user's Hugging Face cache: names resolve only in
# folders the tests build (tests/test_hub.py sets up its own local hub and cache per test).
import tempfile  # noqa: E402

os.environ.setdefault("TOKENWAVE_OFFLINE", "1")
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="tokenwave-hf-")
