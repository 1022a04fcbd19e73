"""A real daemon for integration tests: config, start, events, raw client, leak checks.

``daemon_factory`` (a pytest fixture) writes a TOML config with stub-backend
models, starts ``python -m erllama.supervisor --config`` in its own session
with its run directory under ``tmp_path``, subscribes to ``events.sock`` and
waits for the ``ready`` event of the root. The ``daemon`` fixture is one such
daemon with two stub models.

Teardown stops the daemon with SIGTERM and a deadline, then asserts that it
exited 0, that no process it started is left (every process carries a tag in
its environment, so orphans are found too), and that the run directory holds
no socket or pid file and the ram tier dir ``/dev/shm/erllama-<daemon_id>`` is
gone. A hang dumps the daemon's stacks (``py-spy`` is not assumed) by SIGKILL
of its process group after the deadline, and fails the test.

The lead wires these fixtures in ``tests/conftest.py`` (or a test module
imports them: ``from tests.support.daemon import daemon, daemon_factory``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
import zmq

from erllama.protocol.codec import PROTOCOL_ID, Decoder, encode
from erllama.protocol.messages import TERMINAL_REPLIES, ClientReply, Msg

REPO = Path(__file__).resolve().parents[2]
TAG_ENV = "ERLLAMA_TEST_TAG"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
ORPHAN_TIMEOUT_S = 5.0
MAX_IPC_PATH = 100  # sun_path is 108 bytes

_reply_decoder: Decoder[Any] = Decoder(ClientReply)


# ================================================================ config
def stub_model(model_id: str, **stub: Any) -> dict[str, Any]:
    """A stub-backend model section; ``stub`` sets StubOpts knobs."""
    return {"id": model_id, "backend": "stub", "stub": stub}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string (escapes included)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return (
            "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
        )
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Write ``config`` as TOML: scalars and ``models`` inline at the top, sections below."""
    top = {k: v for k, v in config.items() if not isinstance(v, dict)}
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for name, section in config.items():
        if isinstance(section, dict):
            lines.append(f"\n[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in section.items() if v is not None]
    path.write_text("\n".join(lines) + "\n")
    return path


FAKE_NVML_DIR = Path(__file__).resolve().parent / "fake_nvml"


def fake_nvml_env(gpus_file: Path, gpus: list[tuple[int, int]]) -> dict[str, str]:
    """``env`` for ``daemon_factory``: its processes import the fake ``pynvml``
    (``tests/support/fake_nvml``) that reports ``gpus`` from ``gpus_file`` (rewrite
    it with ``write_fake_gpus`` to change them)."""
    write_fake_gpus(gpus_file, gpus)
    path = os.pathsep.join(p for p in (str(FAKE_NVML_DIR), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "ERLLAMA_TEST_FAKE_NVML": str(gpus_file)}


def write_fake_gpus(gpus_file: Path, gpus: list[tuple[int, int]]) -> None:
    tmp = gpus_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"gpus": [list(g) for g in gpus]}))
    tmp.replace(gpus_file)  # never a half-written file


# ================================================================ events
def subscribe(ctx: zmq.Context[zmq.Socket[bytes]], run_dir: Path) -> zmq.Socket[bytes]:
    """A SUB on the daemon's events socket (connect works before the bind)."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RECONNECT_IVL, 10)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"ipc://{run_dir / 'events.sock'}")
    return sub


def wait_for_event(
    sub: zmq.Socket[bytes],
    name: str,
    timeout: float,
    *,
    child: str | None = None,
    seen: list[dict[str, Any]] | None = None,
    abort_on: Callable[[dict[str, Any]], bool] | None = None,
    **match: Any,
) -> dict[str, Any]:
    """Wait for the next event ``name`` (of ``child``, with fields ``match``).

    Every event received on the way is appended to ``seen``.

    Raises:
        TimeoutError: listing the events seen meanwhile (also at once when an
            event satisfies ``abort_on``: waiting longer is pointless).
    """
    deadline = time.monotonic() + timeout
    got: list[dict[str, Any]] = [] if seen is None else seen
    start = len(got)
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not sub.poll(int(left * 1000) + 1):
            brief = [(e.get("event"), e.get("child")) for e in got[start:]]
            raise TimeoutError(
                f"no {name!r} event of {child or 'any child'} in {timeout}s; saw {brief}"
            )
        ev = msgspec.msgpack.decode(sub.recv_multipart()[-1])
        got.append(ev)
        if ev.get("event") != name or (child is not None and ev.get("child") != child):
            if abort_on is not None and abort_on(ev):
                brief = [(e.get("event"), e.get("child")) for e in got[start:]]
                raise TimeoutError(f"gave up waiting for {name!r} after {ev}; saw {brief}")
            continue
        if all(ev.get(k) == v for k, v in match.items()):
            return dict(ev)


def wait_until(pred: Callable[[], bool], timeout: float, *, what: str = "condition") -> None:
    """Poll ``pred`` with a short backoff, for state that publishes no event."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not pred():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        threading.Event().wait(delay)  # no event to wait on: the lock-free status is polled
        delay = min(delay * 2, 0.1)


# ================================================================ raw client
class RawClient:
    """A DEALER speaking ``[ERL1, body]`` to the daemon (the client library may not exist)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self._n = 0

    def rid(self) -> str:
        self._n += 1
        return f"t{self._n}"

    def send(self, msg: Msg) -> str:
        if not msg.request_id:
            msg = msgspec.structs.replace(msg, request_id=self.rid())
        self.sock.send_multipart(encode(msg))
        return msg.request_id

    def recv(self, timeout: float = 10.0) -> Any:
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"no reply within {timeout}s")
        return _reply_decoder.decode(self.sock.recv_multipart())

    def call(self, msg: Msg, timeout: float = 10.0) -> Any:
        """Send and return the terminal reply for it (stream events are skipped)."""
        rid = self.send(msg)
        deadline = time.monotonic() + timeout
        while True:
            r = self.recv(max(0.001, deadline - time.monotonic()))
            if r.request_id == rid and type(r) in TERMINAL_REPLIES:
                return r

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def close(self) -> None:
        self.sock.close(linger=0)


# ================================================================ the daemon
def _short_dir(tmp_path: Path) -> tuple[Path, bool]:
    """A run dir under ``tmp_path``, or a short one in /tmp when ipc paths would be too long."""
    run_dir = tmp_path / "run"
    if len(str(run_dir / "workers.sock")) <= MAX_IPC_PATH:
        return run_dir, False
    return Path(tempfile.mkdtemp(prefix="erl-", dir="/tmp")) / "run", True


def _running(p: psutil.Process) -> bool:
    """Alive and not a zombie (``is_running`` is safe against pid reuse)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Every live process whose environment carries ``tag`` (orphans included)."""
    out = []
    me = os.getpid()
    for p in psutil.process_iter(["pid", "uids"]):
        if p.pid == me:
            continue
        try:
            if p.info["uids"] is None or p.info["uids"].real != os.getuid():
                continue
            if p.environ().get(TAG_ENV) == tag and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


class Daemon:
    """One running daemon and the handles a test needs."""

    def __init__(
        self,
        tmp_path: Path,
        config: dict[str, Any],
        *,
        ready_timeout: float,
        run_dir: Path | None = None,
        wait_ready: bool = True,
        env: dict[str, str] | None = None,
    ) -> None:
        if run_dir is None:
            self.run_dir, self._own_tmp = _short_dir(tmp_path)
        else:
            self.run_dir, self._own_tmp = run_dir, False
        self.tag = uuid.uuid4().hex
        daemon_cfg = {**config.get("daemon", {}), "run_dir": str(self.run_dir)}
        # no HTTP gateway unless the test asks for one (it would take the default port)
        http_cfg = config.get("http", {"listen": "off"})
        self.config = {**config, "daemon": daemon_cfg, "http": http_cfg}
        self.config_path = write_config(tmp_path / "erllama.toml", self.config)
        self.endpoint = f"ipc://{self.run_dir / 'client.sock'}"
        self.daemon_id = hashlib.sha256(os.path.realpath(self.run_dir).encode()).hexdigest()[:16]
        self.ram_dir = Path(f"/dev/shm/erllama-{self.daemon_id}")
        self.log_path = tmp_path / "daemon.log"
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.events = subscribe(self.ctx, self.run_dir)
        self.seen: list[dict[str, Any]] = []
        self._clients: list[RawClient] = []
        self._known: dict[int, psutil.Process] = {}
        extra_env = env or {}
        env = {k: v for k, v in os.environ.items() if not k.startswith("ERLLAMA_")}
        env.update({TAG_ENV: self.tag, "PYTHONFAULTHANDLER": "1"})
        env.update(extra_env)  # e.g. ERLLAMA_TEST_CRASH_AT: the children inherit it
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "erllama.supervisor", "--config", str(self.config_path)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self.proc.pid
        if not wait_ready:
            return
        try:
            self.wait_for_event("ready", ready_timeout, child="root")
        except TimeoutError:
            self.kill()
            raise
        self.children()  # remember the first generation for the leak check

    def __iter__(self) -> Iterator[Any]:
        """``run_dir, endpoint, events = daemon``."""
        return iter((self.run_dir, self.endpoint, self.events))

    def wait_for_event(
        self, name: str, timeout: float, *, child: str | None = None, **match: Any
    ) -> dict[str, Any]:
        def root_stopped(ev: dict[str, Any]) -> bool:
            return ev.get("event") == "stop" and ev.get("child") == "root"

        try:
            return wait_for_event(
                self.events,
                name,
                timeout,
                child=child,
                seen=self.seen,
                abort_on=root_stopped,
                **match,
            )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- daemon log tail ---\n{self.log_tail()}") from None

    def http_url(self) -> str:
        """``http://HOST:PORT`` of the gateway (from its ``ready`` event, listen included)."""
        for ev in reversed(self.seen):
            if ev.get("event") == "ready" and ev.get("child") == "gateway":
                return f"http://{ev['listen']}"
        ev = self.wait_for_event("ready", 30, child="gateway")
        return f"http://{ev['listen']}"

    def client(self) -> RawClient:
        c = RawClient(self.ctx, self.endpoint)
        self._clients.append(c)
        return c

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def children(self) -> list[psutil.Process]:
        """The root's live descendants (also remembered for the leak check)."""
        try:
            procs = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            self._known.setdefault(p.pid, p)
        return procs

    def child_pid(self, child_id: str) -> int:
        """The pid of the current incarnation of ``child_id`` (from the events)."""
        for ev in reversed(self.seen):
            if ev.get("child") == child_id and ev.get("event") == "spawn":
                return int(ev["pid"])
        raise LookupError(f"no spawn event of {child_id} seen")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM and wait for the exit (SIGKILL of the group past the deadline)."""
        if self.proc.poll() is None:
            self.children()
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGABRT)  # faulthandler dumps the root's stacks
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2)
            self.kill()
            raise AssertionError(
                f"daemon did not stop within {timeout}s\n{self.log_tail()}"
            ) from None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for p in [*tagged_processes(self.tag), *self._known.values()]:
            if _running(p):
                with contextlib.suppress(psutil.Error):
                    p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def wait_no_processes(self, timeout: float = ORPHAN_TIMEOUT_S) -> list[psutil.Process]:
        """Wait until no process of this daemon is alive; returns those left at the deadline.

        A process counts if it carries the tag, or was seen as a descendant of
        the root (a process in the middle of exiting has an empty environ, so
        the tag alone would miss it).
        """
        deadline = time.monotonic() + timeout
        while True:
            left = {p.pid: p for p in tagged_processes(self.tag)}
            left.update((p.pid, p) for p in self._known.values() if _running(p))
            if not left or time.monotonic() >= deadline:
                return list(left.values())
            psutil.wait_procs(
                list(left.values()), timeout=min(0.2, max(0.0, deadline - time.monotonic()))
            )

    def close_sockets(self) -> None:
        for c in self._clients:
            c.close()
        self.events.close(linger=0)
        self.ctx.term()

    def assert_clean(self) -> None:
        left = self.wait_no_processes()
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        assert not left, f"processes left behind: {[(p.pid, p.cmdline()[:4]) for p in left]}"
        files = sorted(p.name for p in self.run_dir.iterdir()) if self.run_dir.exists() else []
        assert not [f for f in files if f.endswith(".sock") or f.endswith(".pid")], files
        assert not self.ram_dir.exists(), f"ram tier dir {self.ram_dir} left behind"

    def teardown(self, *, expect_code: int | None = 0) -> None:
        try:
            code = self.stop()
            if expect_code is not None:
                assert code == expect_code, f"daemon exit code {code}\n{self.log_tail()}"
            self.assert_clean()
        finally:
            if self.proc.poll() is None or tagged_processes(self.tag):
                self.kill()
            self.close_sockets()
            if self._own_tmp:
                import shutil

                shutil.rmtree(self.run_dir.parent, ignore_errors=True)


DaemonFactory = Callable[..., Daemon]


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[DaemonFactory]:
    """``daemon_factory(models=[...], supervisor={...}, run_dir=None)`` -> a running Daemon.

    ``run_dir`` reuses the run directory of an earlier (dead) daemon;
    ``wait_ready=False`` returns at once (for daemons expected not to start);
    ``env`` adds variables to the daemon's environment (its children inherit them).

    Teardown stops every daemon started (unless the test already did and
    called ``teardown`` itself) and checks that nothing is left.
    """
    started: list[Daemon] = []

    def start(
        models: list[dict[str, Any]] | None = None,
        *,
        ready_timeout: float = START_TIMEOUT_S,
        run_dir: Path | None = None,
        wait_ready: bool = True,
        env: dict[str, str] | None = None,
        **sections: dict[str, Any],
    ) -> Daemon:
        config: dict[str, Any] = {
            "models": models if models is not None else [],
            "supervisor": {"heartbeat_interval_s": 1.0, "drain_timeout_s": 5.0,
                           "term_timeout_s": 3.0, **sections.pop("supervisor", {})},
            **sections,
        }  # fmt: skip
        sub = tmp_path / f"d{len(started)}"
        sub.mkdir()
        d = Daemon(
            sub,
            config,
            ready_timeout=ready_timeout,
            run_dir=run_dir,
            wait_ready=wait_ready,
            env=env,
        )
        started.append(d)
        return d

    yield start
    errors = []
    for d in started:
        if d.proc.returncode is not None and d.events.closed:
            continue  # the test tore it down itself
        try:
            d.teardown()
        except AssertionError as exc:
            errors.append(str(exc))
    if errors:
        pytest.fail("\n\n".join(errors))


@pytest.fixture
def daemon(daemon_factory: DaemonFactory) -> Daemon:
    """A daemon with two stub models, ``m1`` and ``m2``, both ready."""
    return daemon_factory([stub_model("m1"), stub_model("m2")])


__all__ = [
    "PROTOCOL_ID",
    "Daemon",
    "RawClient",
    "daemon",
    "daemon_factory",
    "fake_nvml_env",
    "stub_model",
    "subscribe",
    "tagged_processes",
    "wait_for_event",
    "wait_until",
    "write_config",
    "write_fake_gpus",
]
