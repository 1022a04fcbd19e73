"""``ClusterClient`` / ``AsyncClusterClient`` over two real daemons (stub models).

* A multi-turn conversation (the whole conversation resent each turn) stays on one
  daemon and its later turns are warm there; round robin alternates daemons.
* Kill daemon A (SIGKILL of its root: every child follows): the client fails over to B
  with the same output. Warm on B after the failover needs the shared remote tier
  (branch ``remote-tier``): with ``ERLLAMA_TEST_REMOTE_URL`` set (a Redis-protocol store,
  ``redis://127.0.0.1:6379/0``), both daemons get a ``remote`` cache tier on it and the
  test also asserts that B's first answer of the conversation is warm.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import uuid
from typing import Any

import pytest

import erllama
from erllama.config import CacheConfig
from tests.support.daemon import Daemon, DaemonFactory, stub_model, wait_until

pytestmark = pytest.mark.timeout(120)

SCRIPT = "The harbour is calm today and every berth is full of ships from the north."
POLICY = {"min_tokens": 16, "cold_min_tokens": 16, "boundary_align_tokens": 16}
SYSTEM = "system: you are the harbour master; answer briefly and precisely.\n" * 3
QUICK = erllama.Timeout(request=30, connect=1)
REMOTE_URL = os.environ.get("ERLLAMA_TEST_REMOTE_URL")
WARM = ("exact", "partial", "sticky")


def cache_section(prefix: str) -> dict[str, Any]:
    """The daemons' [cache]: the default tiers, plus the shared remote tier when configured."""
    if REMOTE_URL is None:
        return {}
    tiers = [
        {"name": t.name, "path": t.path, "budget_bytes": t.budget_bytes}
        for t in CacheConfig().tiers
    ]
    tiers = [{k: v for k, v in t.items() if v is not None} for t in tiers]
    remote = {"name": "remote", "url": REMOTE_URL, "key_prefix": prefix, "timeout_ms": 200}
    return {"tiers": [*tiers, remote]}


def two(daemon_factory: DaemonFactory) -> tuple[Daemon, Daemon]:
    prefix = f"erllama-test:{uuid.uuid4().hex[:8]}:"  # a fresh namespace in a shared store
    cache = cache_section(prefix)
    models = [{**stub_model("m", script=SCRIPT), "policy": POLICY}]
    extra = {"cache": cache} if cache else {}
    return daemon_factory(models, **extra), daemon_factory(models, **extra)


def turn(history: str, i: int) -> str:
    return f"{history}user: question {i}: which berth is free for the ship number {i}?\nassistant:"


def by_endpoint(a: Daemon, b: Daemon) -> dict[str, Daemon]:
    return {a.endpoint: a, b.endpoint: b}


def test_a_conversation_stays_warm_on_one_daemon(daemon_factory: DaemonFactory) -> None:
    a, b = two(daemon_factory)
    with erllama.ClusterClient([a.endpoint, b.endpoint], timeout=QUICK) as c:
        for session in range(4):
            history, homes, kinds = SYSTEM + f"conversation {session}\n", set(), []
            for i in range(3):
                prompt = turn(history, i)
                order = c.route("m", prompt=prompt)
                done = c.complete("m", prompt, response_tokens=6)
                homes.add(order[0])
                kinds.append(done.cache_hit_kind)
                history = prompt + done.reply + "\n"
            assert len(homes) == 1, homes
            assert all(k in WARM for k in kinds[1:]), kinds
        # streams and token prompts go the same way
        events = list(c.stream("m", turn(SYSTEM, 9), response_tokens=4))
        assert events[-1].kind == "done"
        tokens = c.clients[a.endpoint].tokenize("m", SYSTEM)
        assert [e.kind for e in c.infer("m", tokens, response_tokens=3)][-1] == "done"


def test_round_robin_alternates(daemon_factory: DaemonFactory) -> None:
    a, b = two(daemon_factory)
    with erllama.ClusterClient([a.endpoint, b.endpoint], policy="round_robin") as c:
        history = SYSTEM + "conversation rr\n"
        for i in range(4):
            prompt = turn(history, i)
            done = c.complete("m", prompt, response_tokens=6)
            history = prompt + done.reply + "\n"
    for d in (a, b):
        with erllama.Client(d.endpoint) as one:
            assert one.counters()["router_requests"] >= 2


def test_async_cluster_client(daemon_factory: DaemonFactory) -> None:
    a, b = two(daemon_factory)

    async def main() -> None:
        async with erllama.AsyncClusterClient([a.endpoint, b.endpoint], timeout=QUICK) as c:

            async def conversation(session: int) -> list[str]:
                history, kinds = SYSTEM + f"async conversation {session}\n", []
                for i in range(3):
                    prompt = turn(history, i)
                    text = ""
                    async with await c.stream("m", prompt, response_tokens=6) as s:
                        async for ev in s:
                            text += ev.text or ""
                            if ev.kind == "done":
                                assert ev.stats is not None
                                kinds.append(ev.stats.cache_hit_kind)
                    history = prompt + text + "\n"
                return kinds

            results = await asyncio.gather(*(conversation(s) for s in range(4)))
            for kinds in results:
                assert all(k in WARM for k in kinds[1:]), kinds
            done = await c.complete("m", turn(SYSTEM, 1), response_tokens=4)
            assert done.reply

    asyncio.run(main())


def kill(d: Daemon) -> None:
    """SIGKILL the root: every child follows (parent-death signal); clean what it left."""
    os.kill(d.pid, signal.SIGKILL)
    d.proc.wait(5)
    left = d.wait_no_processes(timeout=5.0)
    assert not left, [(p.pid, p.cmdline()[:3]) for p in left]
    d.close_sockets()
    shutil.rmtree(d.ram_dir, ignore_errors=True)


def test_kill_a_fails_over_to_b(daemon_factory: DaemonFactory) -> None:
    a, b = two(daemon_factory)
    daemons = by_endpoint(a, b)
    with erllama.ClusterClient([a.endpoint, b.endpoint], timeout=QUICK) as c:
        history = SYSTEM + "conversation k\n"
        for i in range(2):
            prompt = turn(history, i)
            done = c.complete("m", prompt, response_tokens=6)
            history = prompt + done.reply + "\n"
        home = c.route("m", prompt=turn(history, 2))[0]
        other = next(ep for ep in daemons if ep != home)
        # what the home daemon would answer next (the stub is deterministic)
        with erllama.Client(home) as direct:
            expected = direct.complete("m", turn(history, 2), response_tokens=6).reply
            if REMOTE_URL is not None:  # the remote tier is write-behind: let A's rows land
                wait_until(
                    lambda: direct.counters().get("remote_uploads", 0) >= 3, 20, what="uploads"
                )
        kill(daemons[home])
        done = c.complete("m", turn(history, 2), response_tokens=6)
        assert done.reply == expected
        if REMOTE_URL is not None:  # the shared remote tier: B restores A's rows
            assert done.cache_hit_kind in WARM, done
        assert c.route("m", prompt=turn(history, 2))[0] == other  # A is down: B first now
        # the conversation goes on on B, warm there (its own finish save)
        history = turn(history, 2) + done.reply + "\n"
        nxt = c.complete("m", turn(history, 3), response_tokens=6)
        assert nxt.cache_hit_kind in WARM
        s = c.stream("m", turn(history, 4), response_tokens=3)
        assert s.endpoint == other
        assert [e.kind for e in s][-1] == "done"
