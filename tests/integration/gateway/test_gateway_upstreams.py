"""The gateway with ``[http] upstreams``: chats routed over its own daemon and another one.

Daemon A runs the gateway with B's client endpoint as its upstream; the two stub models
"say" different scripts, so a reply tells which daemon answered. Each conversation
stays on one daemon (its later turns are cached there), conversations spread over both,
and when B is killed every request is answered by A.
"""

from __future__ import annotations

import os
import shutil
import signal
from typing import Any

import httpx
import pytest

from tests.support.daemon import Daemon, DaemonFactory, daemon_factory, stub_model

__all__ = ["daemon_factory"]

pytestmark = pytest.mark.timeout(120)
POLICY = {"min_tokens": 16, "cold_min_tokens": 16, "boundary_align_tokens": 16}
SCRIPTS = {"a": "Alpha berth is open for the morning tide. " * 3, "b": "Bravo quay waits. " * 6}
SYSTEM = "You are the harbour master; answer briefly."  # shorter than each conversation


def model(script: str) -> dict[str, Any]:
    return {**stub_model("m", script=script), "policy": POLICY}


def who(reply: str) -> str:
    hits = [k for k, s in SCRIPTS.items() if reply and s.startswith(reply.strip()[:12])]
    assert len(hits) == 1, reply
    return hits[0]


def chat(url: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "m", "messages": messages, "max_tokens": 8},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_gateway_routes_over_upstreams_and_fails_over(daemon_factory: DaemonFactory) -> None:
    b = daemon_factory([model(SCRIPTS["b"])])
    http = {"listen": "127.0.0.1:0", "upstreams": [b.endpoint], "upstream_connect_timeout_s": 1.0}
    a = daemon_factory([model(SCRIPTS["a"])], http=http)
    url = a.http_url()
    served: dict[int, str] = {}
    for conv in range(10):
        history = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Conversation {conv}: which berth is free? " * 4},
        ]
        answers = []
        for t in range(3):
            body = chat(url, history)
            reply = body["choices"][0]["message"]["content"]
            answers.append(who(reply))
            if t > 0:  # the later turns are cached where the conversation lives
                assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, body
            history += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": f"And berth {t}?"},
            ]
        assert len(set(answers)) == 1, (conv, answers)
        served[conv] = answers[0]
    assert set(served.values()) == {"a", "b"}, served
    kill(b)
    for conv in range(4):
        history = [{"role": "user", "content": f"After the storm {conv}: " * 8}]
        assert who(chat(url, history)["choices"][0]["message"]["content"]) == "a"
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def kill(d: Daemon) -> None:
    os.kill(d.pid, signal.SIGKILL)
    d.proc.wait(5)
    left = d.wait_no_processes(timeout=5.0)
    assert not left, [(p.pid, p.cmdline()[:3]) for p in left]
    d.close_sockets()
    shutil.rmtree(d.ram_dir, ignore_errors=True)
