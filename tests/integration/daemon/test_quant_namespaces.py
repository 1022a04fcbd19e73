"""Quants outside the §3.2 table in a real daemon: their rows are saved and hit, and never
serve a model of another quant (REFERENCE §11 D20; cache/keys.py ``quant_namespace``).

Three stub models share one fingerprint and one context shape and differ only by quant type.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

from erllama.cache.client import MetaClient
from erllama.protocol.codec import decode_result
from erllama.protocol.messages import Complete, CompletionResult, Reply
from tests.support.daemon import DaemonFactory, RawClient, stub_model, wait_until

pytestmark = pytest.mark.timeout(120)

PROMPT = "a prompt long enough to be saved: " + "lorem ipsum dolor sit amet " * 4


def complete(c: RawClient, model: str) -> CompletionResult:
    r = c.call(Complete(model=model, prompt=PROMPT, options={"response_tokens": 8}), timeout=20)  # type: ignore[arg-type]
    assert isinstance(r, Reply), r
    return decode_result(r.result, CompletionResult)


def test_rows_of_unknown_quants_land_hit_and_stay_apart(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    models = [
        {**stub_model("tq1_a"), "quant_type": "tq1_0"},
        {**stub_model("tq1_b"), "quant_type": "tq1_0"},
        {**stub_model("tq2"), "quant_type": "tq2_0"},
    ]
    d = daemon_factory(
        models,
        cache={
            "tiers": [{"name": "ram", "budget_bytes": 1 << 30}],
            "policy": {"min_tokens": 8, "cold_min_tokens": 8},
        },
    )
    c = d.client()
    first = complete(c, "tq1_a")
    assert first.cache_hit_kind == "cold" and first.finish_key is not None
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    meta = MetaClient(ctx, f"ipc://{d.run_dir / 'meta.sock'}", "test:1")
    try:
        key = first.finish_key
        wait_until(lambda: meta.lookup_exact(key) is not None, 10, what="the tq1_0 row saved")
    finally:
        meta.close()
        ctx.term()
    other = complete(c, "tq2")  # same fingerprint, same tokens, another quant: no hit
    assert other.cache_hit_kind == "cold"
    same = complete(c, "tq1_b")  # another worker of the same quant: the saved row
    assert same.cache_hit_kind == "exact"
    assert same.reply == first.reply
