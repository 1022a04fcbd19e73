"""``python -m erllama.workers RUN_DIR CHILD_ID``: run one worker process (see ``worker``)."""

from __future__ import annotations

import sys

from erllama.lifecycle import run_module
from erllama.workers.worker import main

if __name__ == "__main__":
    sys.exit(run_module("erllama.workers", main, sys.argv[1:]))
