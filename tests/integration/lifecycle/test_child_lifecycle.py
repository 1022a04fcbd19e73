"""``lifecycle.run``: a child's start-up, refusals, signals and exit statuses, in real processes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from erllama import lifecycle
from erllama.protocol.errors import ErrorCode
from erllama.protocol.messages import Hello, Init, Ready, StartFailed
from tests.support.fake_root import ChildFailedError, FakeRoot
from tests.support.probe_child import SIGNALLED_STATUS, probe_child, probe_child_failing_1

pytestmark = pytest.mark.timeout(60)

CHILD = "probe"
WAIT_S = 30.0


@pytest.fixture
def root(tmp_path: Path) -> Iterator[FakeRoot]:
    with FakeRoot(tmp_path / "run") as r:
        yield r


def _start_failed(
    root: FakeRoot, config: dict[str, object], target: object = probe_child
) -> StartFailed:
    root.start(CHILD, target)
    root.wait_message(CHILD, Hello, WAIT_S)
    root.send(CHILD, Init(config=config))
    msg: StartFailed = root.wait_message(CHILD, StartFailed, WAIT_S)
    return msg


def test_ready_then_stop_exits_0(root: FakeRoot) -> None:
    proc = root.spawn(CHILD, probe_child, {})
    assert root.ready[CHILD].info == {"pid": proc.pid, "heard": 0}
    assert root.stop(CHILD, WAIT_S) == 0


def test_sigterm_wakes_the_loop_and_reaches_the_listeners(root: FakeRoot) -> None:
    proc = root.spawn(CHILD, probe_child, {})
    os.kill(proc.pid, signal.SIGTERM)
    assert root.wait_exit(CHILD, WAIT_S) == SIGNALLED_STATUS


def test_a_signal_before_the_listener_is_replayed_to_it(root: FakeRoot) -> None:
    root.spawn(CHILD, probe_child, {"start": "signal_early"})
    assert root.ready[CHILD].info["heard"] >= 1
    assert root.wait_exit(CHILD, WAIT_S) == SIGNALLED_STATUS  # and the loop saw it at once


def test_bad_payload_is_bad_request(root: FakeRoot) -> None:
    failed = _start_failed(root, {"start": 5})
    assert failed.code == ErrorCode.BAD_REQUEST
    assert failed.message.startswith("bad meta config: ") and "ProbeInit" in failed.message
    assert root.wait_exit(CHILD, WAIT_S) == 0


def test_a_refusal_keeps_its_code(root: FakeRoot) -> None:
    failed = _start_failed(root, {"start": "refuse"})
    assert (failed.code, failed.message) == ("eaddrinuse", "no thanks")
    assert root.wait_exit(CHILD, WAIT_S) == 0


def test_a_crash_during_start_is_internal(root: FakeRoot) -> None:
    failed = _start_failed(root, {"start": "crash"})
    assert (failed.code, failed.message) == (ErrorCode.INTERNAL, "RuntimeError: boom")
    assert root.wait_exit(CHILD, WAIT_S) == 0


def test_failed_status_is_the_exit_after_start_failed(root: FakeRoot) -> None:
    _start_failed(root, {"start": "refuse"}, probe_child_failing_1)
    assert root.wait_exit(CHILD, WAIT_S) == 1


def test_a_loop_that_raises_exits_1(root: FakeRoot) -> None:
    root.spawn(CHILD, probe_child, {"loop": "raise"})
    assert root.wait_exit(CHILD, WAIT_S) == 1


def test_anything_but_init_after_hello_exits_1(root: FakeRoot) -> None:
    root.start(CHILD, probe_child)
    root.wait_message(CHILD, Hello, WAIT_S)
    root.send(CHILD, Ready())
    assert root.wait_exit(CHILD, WAIT_S) == 1
    with pytest.raises(ChildFailedError):
        root.wait_message(CHILD, Ready, WAIT_S)


def test_run_module_usage(capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[tuple[str, str]] = []

    def main(run_dir: str, child_id: str) -> int:
        calls.append((run_dir, child_id))
        return 7

    assert lifecycle.run_module("erllama.cache", main, ["/r", "meta"]) == 7
    assert lifecycle.run_module("erllama.cache", main, ["/r"]) == 2
    assert capsys.readouterr().err == "usage: python -m erllama.cache RUN_DIR CHILD_ID\n"
    assert lifecycle.run_module("erllama.router", main, ["/r"], default_child_id="router") == 7
    assert lifecycle.run_module("erllama.router", main, [], default_child_id="router") == 2
    assert capsys.readouterr().err == "usage: python -m erllama.router RUN_DIR [CHILD_ID]\n"
    assert calls == [("/r", "meta"), ("/r", "router")]
