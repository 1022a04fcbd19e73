"""A minimal child for ``lifecycle.run`` tests: its Init says what its start and loop do.

Spawn target: ``probe_child(run_dir, child_id)`` (``FakeRoot.spawn``), exit status =
``lifecycle.run``'s return value.
"""

from __future__ import annotations

import os
import signal
import sys

import zmq

from erllama import lifecycle
from erllama.inits import ChildInit
from erllama.protocol.errors import ErllamaError

SIGNALLED_STATUS = 3  # the loop's status after SIGTERM/SIGINT (Stop: 0)


class ProbeInit(ChildInit, frozen=True):
    start: str = "ok"  # ok | refuse | crash | signal_early
    loop: str = "serve"  # serve | raise


def _start(child: lifecycle.Child, init: ProbeInit) -> lifecycle.Started:
    if init.start == "refuse":
        raise ErllamaError("no thanks", code="eaddrinuse")
    if init.start == "crash":
        raise RuntimeError("boom")
    heard: list[int] = []
    if init.start == "signal_early":  # a signal before the listener: replayed to it
        os.kill(os.getpid(), signal.SIGTERM)
    child.on_signal(heard.append)

    def loop() -> int:
        if init.loop == "raise":
            raise ValueError("loop bug")
        poller = zmq.Poller()
        child.watch(poller)
        while not child.should_stop(dict(poller.poll())):
            pass
        return SIGNALLED_STATUS if heard else 0  # a signal reached the listener, or Stop

    return lifecycle.Started(loop, {"pid": os.getpid(), "heard": len(heard)})


def probe_child(run_dir: str, child_id: str) -> None:
    sys.exit(lifecycle.run("meta", run_dir, child_id, ProbeInit, _start))


def probe_child_failing_1(run_dir: str, child_id: str) -> None:
    """The same, exiting 1 after StartFailed (as the gateway does)."""
    sys.exit(lifecycle.run("meta", run_dir, child_id, ProbeInit, _start, failed_status=1))
