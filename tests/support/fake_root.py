"""A tiny fake root supervisor for tests: control.sock, spawn, handshake, Stop, kill.

It binds the ROUTER on ``<run_dir>/control.sock``, spawns children with the
``multiprocess`` spawn context (target: a module-level function taking
``(run_dir, child_id)``), answers ``Hello`` with ``Init(config)``, and waits for
``Ready`` with a deadline while watching the child's sentinel, so a child that
dies during start fails the wait at once. It can send ``Stop`` and
``HoldersDied``; ``close()`` kills and reaps whatever is still running. No
heartbeats, no restarts: the real supervisor does those.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import multiprocess
import zmq

from erllama.protocol.codec import Decoder, encode
from erllama.protocol.messages import (
    ControlMessage,
    Hello,
    HoldersDied,
    Init,
    Msg,
    Ready,
    StartFailed,
    Stop,
)
from erllama.protocol.sockets import CONTROL_SOCK, ensure_private_dir, ipc_endpoint, make_socket

SPAWN = multiprocess.get_context("spawn")

# A spawned child gets the parent's sys.path; under ``pytest`` (importlib mode) the
# repository root is not on it, so children could not import ``tests.support``.
REPO_ROOT = str(Path(__file__).resolve().parents[2])
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)


class ChildFailedError(RuntimeError):
    """The child exited or answered StartFailed before it was ready."""


def meta_child(run_dir: str, child_id: str) -> None:
    """Spawn target: the cache-meta process, its return value as the exit code."""
    from erllama.cache.meta import main

    sys.exit(main(run_dir, child_id))


class FakeRoot:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = ensure_private_dir(Path(run_dir))
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock = make_socket(self.ctx, zmq.ROUTER, bind=ipc_endpoint(self.run_dir, CONTROL_SOCK))
        self.children: dict[str, Any] = {}
        self.ready: dict[str, Ready] = {}
        self._decoder: Decoder[Any] = Decoder(ControlMessage)

    # ------------------------------------------------------------ spawning
    def start(self, child_id: str, target: Callable[..., Any], *args: Any) -> Any:
        """Spawn ``target(run_dir, child_id, *args)`` without a handshake."""
        proc = SPAWN.Process(
            target=target, args=(str(self.run_dir), child_id, *args), name=child_id
        )
        proc.start()
        self.children[child_id] = proc
        return proc

    def spawn(
        self,
        child_id: str,
        target: Callable[[str, str], Any],
        config: dict[str, Any],
        *,
        timeout_s: float = 30.0,
    ) -> Any:
        """Spawn a supervised child and complete its handshake (Hello -> Init -> Ready)."""
        proc = self.start(child_id, target)
        self.wait_message(child_id, Hello, timeout_s)
        self.send(child_id, Init(config=config))
        msg = self.wait_message(child_id, (Ready, StartFailed), timeout_s)
        if isinstance(msg, StartFailed):
            raise ChildFailedError(f"{child_id} failed to start: {msg.code}: {msg.message}")
        self.ready[child_id] = msg
        return proc

    def wait_message(
        self, child_id: str, types: type[Msg] | tuple[type[Msg], ...], timeout_s: float
    ) -> Any:
        """The next control message of ``types`` from ``child_id`` (others are dropped)."""
        proc = self.children[child_id]
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(proc.sentinel, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {types} from {child_id} within {timeout_s}s")
            events = dict(poller.poll(max(1, int(remaining * 1000))))
            if events.get(self.sock):
                frames = self.sock.recv_multipart()
                msg = self._decoder.decode(frames[1:])
                if frames[0] == child_id.encode() and isinstance(msg, types):
                    return msg
                continue
            if events.get(proc.sentinel):
                proc.join()
                raise ChildFailedError(f"{child_id} exited with {proc.exitcode} while starting")

    # ------------------------------------------------------------ control
    def send(self, child_id: str, msg: Msg) -> None:
        self.sock.send_multipart([child_id.encode(), *encode(msg)])

    def holders_died(self, child_id: str, holders: list[str]) -> None:
        self.send(child_id, HoldersDied(holders=holders))

    def wait_exit(self, child_id: str, timeout_s: float = 10.0) -> int | None:
        proc = self.children[child_id]
        proc.join(timeout_s)
        return None if proc.is_alive() else int(proc.exitcode)

    def stop(self, child_id: str, timeout_s: float = 10.0) -> int | None:
        """Send Stop and wait for the exit; the exit code, or None if still running."""
        self.send(child_id, Stop())
        return self.wait_exit(child_id, timeout_s)

    def kill(self, child_id: str, timeout_s: float = 10.0) -> int | None:
        """SIGKILL and reap."""
        proc = self.children[child_id]
        if proc.is_alive():
            proc.kill()
        return self.wait_exit(child_id, timeout_s)

    def forget(self, child_id: str) -> None:
        """Drop a reaped child (so the same id can be spawned again)."""
        proc = self.children.pop(child_id)
        assert not proc.is_alive()
        proc.close()
        self.ready.pop(child_id, None)

    # ------------------------------------------------------------ teardown
    def close(self) -> None:
        for child_id, proc in list(self.children.items()):
            if proc.is_alive():
                proc.kill()
            proc.join(10)
            if not proc.is_alive():
                proc.close()
            del self.children[child_id]
        self.sock.close(linger=0)
        self.ctx.term()
        # libzmq 4.3.5 does not remove a bound ipc file on close
        (self.run_dir / CONTROL_SOCK).unlink(missing_ok=True)

    def __enter__(self) -> FakeRoot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
