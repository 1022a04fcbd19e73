"""``python -m erllama.cache RUN_DIR CHILD_ID``: run the cache-meta process (see ``meta``)."""

from __future__ import annotations

import sys

from erllama.cache.meta import main
from erllama.lifecycle import run_module

if __name__ == "__main__":
    sys.exit(run_module("erllama.cache", main, sys.argv[1:]))
