"""The first code a spawned child runs: detach, arm the parent-death signal, import, run.

``run_child`` is the ``multiprocess`` target of every child. The root never
imports model, cache or router code: it names the child's module, and the
module is imported here, in the child's fresh interpreter.

Order matters:

1. ``os.setsid()``: the child leads its own process group, so the root can
   signal the child and every process it started with one ``killpg``. Doing
   it here (an exec'd interpreter, no threads yet) avoids ``preexec_fn``.
2. ``PR_SET_PDEATHSIG(SIGTERM)``, then a ``getppid()`` check: the child
   dies with the root, even when the root was SIGKILLed.
3. Import the module and call ``main(run_dir, child_id)``; its return value
   is the exit code.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

from erllama.lifecycle import exit_if_orphaned, set_parent_death_signal


def run_child(module: str, run_dir: str, child_id: str, parent_pid: int | None = None) -> None:
    """Run ``module.main(run_dir, child_id)`` in this (spawned) process and exit with its code."""
    with contextlib.suppress(OSError):  # already a group leader (cannot happen after spawn)
        os.setsid()
    set_parent_death_signal()
    exit_if_orphaned(parent_pid)
    mod = importlib.import_module(module)
    code = mod.main(run_dir, child_id)
    sys.exit(int(code or 0))
