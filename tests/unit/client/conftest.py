"""Fixtures of the client tests: a fake router on an ipc endpoint, and leak checks."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from .fake_router import FakeRouter, short_dir


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Every test closes its sockets, contexts and threads (fds and threads are compared)."""
    threads = set(threading.enumerate())
    fds = _fds()
    yield
    gc.collect()
    extra_threads = [t for t in threading.enumerate() if t not in threads]
    assert not extra_threads, f"threads left running: {extra_threads}"
    extra_fds = _fds() - fds
    assert not extra_fds, f"file descriptors left open: {extra_fds}"


@pytest.fixture
def sock_dir(tmp_path: Path) -> Iterator[Path]:
    with short_dir(tmp_path) as d:
        yield d


@pytest.fixture
def endpoint(sock_dir: Path) -> str:
    return f"ipc://{sock_dir / 'client.sock'}"


@pytest.fixture
def router(endpoint: str) -> Iterator[FakeRouter]:
    with FakeRouter(endpoint) as r:
        yield r
