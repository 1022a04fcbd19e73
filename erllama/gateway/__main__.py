"""``python -m erllama.gateway RUN_DIR CHILD_ID``: run the gateway (normally the root does)."""

from __future__ import annotations

import sys

from erllama.gateway.process import main


def cli(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: python -m erllama.gateway RUN_DIR CHILD_ID\n")
        return 2
    return main(argv[0], argv[1])


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
