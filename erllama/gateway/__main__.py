"""``python -m erllama.gateway RUN_DIR CHILD_ID``: run the gateway (normally the root does)."""

from __future__ import annotations

import sys

from erllama.gateway.process import main
from erllama.lifecycle import run_module

if __name__ == "__main__":
    sys.exit(run_module("erllama.gateway", main, sys.argv[1:]))
