"""``python -m erllama.router RUN_DIR [CHILD_ID]``: run a router by hand (debugging).

The router expects a root on ``<RUN_DIR>/control.sock`` to send its ``Init``;
normally the supervisor starts it.
"""

from __future__ import annotations

import sys

from erllama.lifecycle import run_module
from erllama.router.router import main

if __name__ == "__main__":
    sys.exit(run_module("erllama.router", main, sys.argv[1:], default_child_id="router"))
