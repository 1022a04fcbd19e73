"""``python -m erllama.workers RUN_DIR CHILD_ID``: run one worker process (see ``worker``)."""

from __future__ import annotations

import sys

from erllama.workers.worker import main

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.stderr.write("usage: python -m erllama.workers RUN_DIR CHILD_ID\n")
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
