"""One log format for every process: ``logs.setup(role, child_id)``.

A ``logging.Filter`` adds role, child id and pid to every record, so the
lines of all processes interleave readably in one file or terminal.
"""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s %(erl_role)s[%(erl_child)s/%(process)d] %(name)s: %(message)s"


class _ProcessFilter(logging.Filter):
    def __init__(self, role: str, child_id: str) -> None:
        super().__init__()
        self.role = role
        self.child_id = child_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.erl_role = self.role
        record.erl_child = self.child_id
        return True


def setup(
    role: str, child_id: str = "-", *, level: str | int = "INFO", log_file: str | None = None
) -> None:
    """Configure the root logger of this process (call once, first thing in ``main``)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.addFilter(_ProcessFilter(role, child_id))
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(os.environ.get("ERLLAMA_LOG_LEVEL", level))
