"""``python -m erllama.router RUN_DIR [CHILD_ID]``: run a router by hand (debugging).

The router expects a root on ``<RUN_DIR>/control.sock`` to send its ``Init``;
normally the supervisor starts it.
"""

from __future__ import annotations

import sys

from erllama.router.router import main as router_main


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        sys.stderr.write("usage: python -m erllama.router RUN_DIR [CHILD_ID]\n")
        return 2
    return router_main(args[0], args[1] if len(args) > 1 else "router")


if __name__ == "__main__":
    sys.exit(main())
