"""Many clients, two models: every reply is correct and each model serves in FIFO order."""

from __future__ import annotations

import threading

import pytest

import erllama
from erllama.config import ModelSpec
from erllama.protocol.codec import decode_result
from erllama.protocol.messages import Complete, CompletionResult, Reply, RequestOptions
from erllama.protocol.tokens import unpack_tokens
from erllama.workers.backend import SamplerOptions
from erllama.workers.stub import StubBackend
from tests.support.daemon import Daemon

N_CLIENTS = 8
N_REQUESTS = 50
N_GEN = 8


def expected_tokens(prompt: str, n: int = N_GEN) -> list[int]:
    """What the stub model generates for ``prompt`` (greedy), computed in process."""
    b = StubBackend(ModelSpec(id="ref", backend="stub"))
    toks = b.tokenize(prompt)
    b.prefill(0, toks, 0)
    sampler = b.new_sampler(0, SamplerOptions())
    gen: list[int] = []
    for _ in range(n):
        t = sampler.sample()
        gen.append(t)
        if b.is_eog(t):
            break
        b.decode_one(0, t, len(toks) + len(gen) - 1)
    b.close()
    return gen


@pytest.mark.timeout(180)
def test_eight_clients_fifty_requests_two_models(daemon: Daemon) -> None:
    errors: list[str] = []
    done = [0] * N_CLIENTS

    def client(c: int) -> None:
        try:
            with erllama.Client(daemon.endpoint, timeout=60) as cl:
                for i in range(N_REQUESTS):
                    model = "m1" if (c + i) % 2 == 0 else "m2"
                    prompt = f"client {c} request {i}"
                    r = cl.complete(model, prompt, response_tokens=N_GEN)
                    if r.generated != expected_tokens(prompt):
                        errors.append(f"{model} {prompt!r}: {r.generated}")
                    done[c] += 1
        except Exception as exc:  # reported below, the thread must not die silently
            errors.append(f"client {c}: {exc!r}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(N_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert errors == []
    assert done == [N_REQUESTS] * N_CLIENTS


@pytest.mark.timeout(120)
def test_each_model_answers_in_arrival_order(daemon: Daemon) -> None:
    raw = daemon.client()
    sent: dict[str, list[str]] = {"m1": [], "m2": []}
    for i in range(30):
        model = "m1" if i % 3 else "m2"
        msg = Complete(
            request_id=f"r{i:02d}",
            model=model,
            prompt=f"queued {i}",
            options=RequestOptions(response_tokens=N_GEN),
        )
        sent[model].append(raw.send(msg))
    got: dict[str, list[str]] = {"m1": [], "m2": []}
    for _ in range(30):
        reply = raw.recv(timeout=60)
        assert isinstance(reply, Reply)
        model = next(m for m, rids in sent.items() if reply.request_id in rids)
        got[model].append(reply.request_id)
        result = decode_result(reply.result, CompletionResult)
        i = int(reply.request_id.lstrip("r"))
        assert unpack_tokens(result.generated) == expected_tokens(f"queued {i}")
    assert got == sent
