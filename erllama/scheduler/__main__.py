"""``python -m erllama.scheduler RUN_DIR CHILD_ID``: run the scheduler (see ``scheduler``)."""

from __future__ import annotations

import sys

from erllama.lifecycle import run_module
from erllama.scheduler.scheduler import main

if __name__ == "__main__":
    sys.exit(run_module("erllama.scheduler", main, sys.argv[1:]))
