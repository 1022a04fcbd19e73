"""``ClusterClient`` / ``AsyncClusterClient`` over two real daemons (stub models).

* A multi-turn conversation (the whole conversation resent each turn) stays on one
  daemon and its later turns are warm there; round robin alternates daemons.
* Kill daemon A (SIGKILL of its root: every child follows): the client fails over to B,
  and the conversation's next turn (previous prompt + its reply + new text) is warm on B:
  both daemons have a ``remote`` cache tier on one real redis-server (the
  ``redis_server`` fixture), and B finds A's finish row of the previous turn (a row of
  any length) through its prefix pointers. B's output equals a cold run on a fresh daemon.
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
from tests.support.redis_server import RedisServer, redis_server

pytestmark = pytest.mark.timeout(120)
__all__ = ["redis_server"]

SCRIPT = "The harbour is calm today and every berth is full of ships from the north."
POLICY = {"min_tokens": 16, "cold_min_tokens": 16, "boundary_align_tokens": 16}
SYSTEM = "system: you are the harbour master; answer briefly and precisely.\n" * 3
QUICK = erllama.Timeout(request=30, connect=1)
WARM = ("exact", "partial", "sticky")
MODELS = [{**stub_model("m", script=SCRIPT), "policy": POLICY}]


def cache_section(url: str | None) -> dict[str, Any]:
    """The daemons' [cache]: the default tiers, plus a shared remote tier on ``url``."""
    if url is None:
        return {}
    prefix = f"erllama-test:{uuid.uuid4().hex[:8]}:"  # a fresh namespace in the store
    tiers = [
        {"name": t.name, "path": t.path, "budget_bytes": t.budget_bytes}
        for t in CacheConfig().tiers
    ]
    tiers = [{k: v for k, v in t.items() if v is not None} for t in tiers]
    remote = {"name": "remote", "url": url, "key_prefix": prefix, "timeout_ms": 200}
    return {"tiers": [*tiers, remote]}


def two(daemon_factory: DaemonFactory, url: str | None = None) -> tuple[Daemon, Daemon]:
    cache = cache_section(url)
    extra = {"cache": cache} if cache else {}
    return daemon_factory(MODELS, **extra), daemon_factory(MODELS, **extra)


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


def test_kill_a_fails_over_to_b(daemon_factory: DaemonFactory, redis_server: RedisServer) -> None:
    a, b = two(daemon_factory, redis_server.url)
    fresh = daemon_factory(MODELS)  # no remote tier: the cold reference
    daemons = by_endpoint(a, b)
    with erllama.ClusterClient([a.endpoint, b.endpoint], timeout=QUICK) as c:
        history = SYSTEM + "conversation k\n"
        for i in range(2):
            prompt = turn(history, i)
            done = c.complete("m", prompt, response_tokens=6)
            history = prompt + done.reply + "\n"
        home = c.route("m", prompt=turn(history, 2))[0]
        other = next(ep for ep in daemons if ep != home)
        with erllama.Client(home) as direct:  # write-behind: let every saved row land

            def all_uploaded() -> bool:
                got = direct.counters()
                saves = sum(got[k] for k in ("saves_cold", "saves_continued", "saves_finish"))
                return saves >= 2 and got["remote_uploads"] >= saves

            wait_until(all_uploaded, 20, what="A's rows uploaded")
        kill(daemons[home])
        # the next turn: the previous prompt + its reply + new text, on B now
        nxt_prompt = turn(history, 2)
        done = c.complete("m", nxt_prompt, response_tokens=6)
        assert c.route("m", prompt=nxt_prompt)[0] == other  # A is down: B first now
        assert done.cache_hit_kind in ("exact", "partial"), done
        with erllama.Client(other) as on_b:
            previous = len(on_b.tokenize("m", prompt))
            got = on_b.counters()
        assert done.cache_delta.read >= previous, (done.cache_delta, previous)
        assert got["remote_hits"] >= 1 and got["remote_pointer_hits"] >= 1, got
        with erllama.Client(fresh.endpoint) as cold:
            reference = cold.complete("m", nxt_prompt, response_tokens=6)
        assert reference.cache_hit_kind == "cold"
        assert done.reply == reference.reply and done.generated == reference.generated
        # the conversation goes on on B, warm there (its own finish save)
        history = nxt_prompt + done.reply + "\n"
        nxt = c.complete("m", turn(history, 3), response_tokens=6)
        assert nxt.cache_hit_kind in WARM
        s = c.stream("m", turn(history, 4), response_tokens=3)
        assert s.endpoint == other
        assert [e.kind for e in s][-1] == "done"
