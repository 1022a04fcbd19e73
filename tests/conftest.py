"""Suite-wide guards: every test leaves no process of its own behind.

Fixtures for daemons, fake roots and model paths live in ``tests/support/``
and the ``conftest.py`` of each area.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import psutil
import pytest

# Helper processes the multiprocessing machinery keeps for the whole session.
_SESSION_HELPERS = ("resource_tracker", "forkserver", "semaphore_tracker")


def _own_children() -> set[int]:
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        if any(h in cmd for h in _SESSION_HELPERS):
            continue
        out.add(p.pid)
    return out


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    before = _own_children()
    yield
    deadline = time.monotonic() + 5.0
    left = _own_children() - before
    while left and time.monotonic() < deadline:
        # reap exited children; a process killed by its test may take a moment to go
        psutil.wait_procs([psutil.Process(p) for p in left if psutil.pid_exists(p)], timeout=0.2)
        left = {p for p in _own_children() - before if psutil.pid_exists(p)}
    if left:
        descr = []
        for pid in left:
            try:
                descr.append(f"{pid}: {' '.join(psutil.Process(pid).cmdline())[:200]}")
            except psutil.Error:
                continue
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        if descr:
            pytest.fail("test left processes running:\n" + "\n".join(descr))
