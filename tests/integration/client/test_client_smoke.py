"""End-to-end smoke test of the client library and the CLI against a real daemon (stub models)."""

from __future__ import annotations

import asyncio

import pytest

from erllama import AsyncClient, Client, UnknownModelError
from erllama.cli import main
from tests.support.daemon import DaemonFactory, daemon_factory, stub_model  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def test_sync_async_and_cli_against_a_real_daemon(
    daemon_factory: DaemonFactory,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    # m2 streams slowly: a stream left early is cancelled long before it could end
    daemon = daemon_factory([stub_model("m1"), stub_model("m2", token_delay_ms=5)])
    with Client(daemon.endpoint, timeout=30) as c:
        tokens = c.tokenize("m1", "hello world")
        assert tokens and all(isinstance(t, int) for t in tokens)
        assert isinstance(c.detokenize("m1", tokens), str)
        done = c.complete("m1", "hello", response_tokens=4)
        assert len(done.generated) == 4 and done.committed_tokens == len(done.context_tokens)
        assert done.stats.completion_tokens == 4

        events = list(c.infer("m1", tokens, response_tokens=3))
        assert events[-1].kind == "done" and events[-1].stats is not None
        assert {e.request_id for e in events} == {events[0].request_id}

        # leaving a long stream early cancels it on the worker
        with c.stream("m2", "go", response_tokens=100_000) as stream:
            assert next(stream).kind in ("token", "thinking_delta")
        assert c.status("m2") in ("idle", "prefilling", "generating")
        again = c.complete("m2", "after the cancel", response_tokens=2)
        assert again.finish_reason == "length"
        assert c.status("m2") == "idle"
        with pytest.raises(UnknownModelError):
            c.model_info("nope")

    async def concurrently() -> list[int]:
        async with AsyncClient(daemon.endpoint, timeout=30) as ac:
            results = await asyncio.gather(
                *(
                    ac.complete(m, f"p{i}", response_tokens=2)
                    for i, m in enumerate(["m1", "m2"] * 4)
                )
            )
            return [len(r.generated) for r in results]

    assert asyncio.run(concurrently()) == [2] * 8

    assert main(["models", "--endpoint", daemon.endpoint]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("ID") and "m1" in out and "m2" in out
    assert main(["complete", "m1", "hi", "--max-tokens", "3", "--endpoint", daemon.endpoint]) == 0
    captured = capsys.readouterr()
    assert captured.out and "completion 3 tok" in captured.err
    assert main(["counters", "--endpoint", daemon.endpoint]) == 0
    assert "router_requests" in capsys.readouterr().out
    assert main(["status", "--endpoint", daemon.endpoint]) == 0
    assert "TIER" in capsys.readouterr().out
