"""``python -m erllama``: the ``erllama`` command, through the console script's entry point.

``[project.scripts] erllama = "erllama.cli:main"``: the same function, the same
arguments, output and exit status.
"""

from __future__ import annotations

import sys

from erllama.cli import main

if __name__ == "__main__":
    sys.exit(main())
