"""The router's model table, without sockets."""

from __future__ import annotations

import msgspec
import pytest

from erllama.protocol.messages import CacheHit, ModelInfo, ModelStateChanged, WorkerStatus
from erllama.router.table import Admit, ModelTable, Pending

pytestmark = pytest.mark.timeout(10)

A, B = b"\x00client-a", b"\x00client-b"


def info(model: str, state: str = "ready") -> ModelInfo:
    return ModelInfo(
        id=model,
        model_id=model,
        pid=123,
        status="idle" if state == "ready" else state,
        phase="idle",
        pending_len=0,
        last_cache_hit=None,
        backend="stub",
        context_size=4096,
        quant_type="f16",
        quant_bits=16,
        quant_tag="f16",
        tier="ram",
        fingerprint=b"\x01" * 32,
        loaded_at_monotonic=1,
        vram_estimate_b=0,
        state=state,
    )


def changed(model: str, state: str, **kw: object) -> ModelStateChanged:
    return ModelStateChanged(model=model, state=state, info=info(model, state), **kw)  # type: ignore[arg-type]


def table_with(*models: str, state: str = "ready") -> ModelTable:
    t = ModelTable(queue_limit=3)
    t.load([info(m, state) for m in models])
    return t


def test_ready_model_forwards_and_tracks_in_flight() -> None:
    t = table_with("m")
    assert t.admit("m", A, "r1", b"body").action is Admit.FORWARD
    assert t.model_of(A, "r1") == "m"
    assert t.models["m"].forwarded == {(A, "r1")}
    t.finished(A, "r1")
    assert t.model_of(A, "r1") is None
    assert not t.models["m"].forwarded


def test_unknown_model_is_model_not_loaded() -> None:
    t = table_with("m")
    d = t.admit("nope", A, "r1", b"")
    assert d.action is Admit.REJECT and d.code == "model_not_loaded"


def test_loading_model_holds_requests_then_flushes_in_order() -> None:
    t = table_with("m", state="loading")
    assert t.admit("m", A, "r1", b"1").action is Admit.HOLD
    assert t.admit("m", B, "r2", b"2").action is Admit.HOLD
    flush, fails = t.on_state(changed("m", "ready"))
    assert [p.body for p in flush] == [b"1", b"2"] and not fails
    assert t.models["m"].forwarded == {(A, "r1"), (B, "r2")}
    # later requests go straight through
    assert t.admit("m", A, "r3", b"3").action is Admit.FORWARD


def test_hold_queue_is_bounded() -> None:
    t = table_with("m", state="restarting")
    for i in range(3):
        assert t.admit("m", A, f"r{i}", b"").action is Admit.HOLD
    d = t.admit("m", A, "r9", b"")
    assert d.action is Admit.REJECT and d.code == "busy" and d.retryable


def test_worker_exited_fails_forwarded_but_keeps_held() -> None:
    t = table_with("m")
    t.admit("m", A, "r1", b"")
    t.admit("m", B, "r2", b"")
    fails = t.on_worker_exited("m", "killed by SIGKILL")
    assert {(f.client_id, f.request_id) for f in fails} == {(A, "r1"), (B, "r2")}
    assert all(f.code == "worker_crashed" and f.retryable for f in fails)
    assert t.model_of(A, "r1") is None
    # restarting: new requests are held, and flushed at ready
    t.on_state(changed("m", "restarting", restarts=1))
    assert t.admit("m", A, "r3", b"3").action is Admit.HOLD
    flush, _ = t.on_state(changed("m", "ready", restarts=1))
    assert [p.request_id for p in flush] == ["r3"]


def test_failed_model_fails_held_and_rejects_new() -> None:
    t = table_with("m", state="restarting")
    t.admit("m", A, "r1", b"")
    flush, fails = t.on_state(changed("m", "failed", last_exit="exit code 1"))
    assert not flush
    assert [(f.request_id, f.code) for f in fails] == [("r1", "failed")]
    d = t.admit("m", A, "r2", b"")
    assert d.action is Admit.REJECT and d.code == "failed"
    assert t.model_info("m").state == "failed"  # type: ignore[union-attr]


def test_unloaded_model_leaves_the_table() -> None:
    t = table_with("m", state="loading")
    t.admit("m", A, "r1", b"")
    _, fails = t.on_state(ModelStateChanged(model="m", state="unloaded"))
    assert [(f.request_id, f.code) for f in fails] == [("r1", "model_not_loaded")]
    assert t.model_info("m") is None
    assert t.admit("m", A, "r2", b"").code == "model_not_loaded"


def test_unroutable_requeues_in_front_until_status_push() -> None:
    t = table_with("m")
    t.admit("m", A, "r1", b"1")
    t.unroutable("m", [Pending(A, "r1", b"1")])
    assert t.admit("m", A, "r2", b"2").action is Admit.HOLD  # order kept
    flush = t.on_status(WorkerStatus(model="m"), "m")
    assert [p.request_id for p in flush] == ["r1", "r2"]


def test_status_push_merges_into_model_info_and_rows() -> None:
    t = table_with("m", "n")
    hit = CacheHit(kind="partial", prefix_len=100)
    t.on_status(
        WorkerStatus(
            model="m", phase="generating", pending_len=2, queue_depth=1, last_cache_hit=hit
        ),
        "m",
    )
    mi = t.model_info("m")
    assert mi is not None
    assert (mi.phase, mi.status, mi.pending_len, mi.last_cache_hit) == (
        "generating",
        "generating",
        2,
        hit,
    )
    row = t.status_row("m")
    assert (row.phase, row.pending_len, row.queue_depth, row.last_cache_hit) == (
        "generating",
        2,
        1,
        hit,
    )
    assert t.queue_depth("m") == 1 and t.queue_depth(None) == 1
    assert [m.id for m in t.list_models()] == ["m", "n"]
    # unknown model: idle / 0 / None, as upstream's lock-free reads
    unknown = t.status_row("zzz")
    assert (unknown.phase, unknown.pending_len, unknown.last_cache_hit) == ("idle", 0, None)
    assert t.queue_depth("zzz") == 0


def test_restart_forgets_the_old_status_row() -> None:
    t = table_with("m")
    t.on_status(WorkerStatus(model="m", phase="generating"), "m")
    t.on_state(changed("m", "restarting"))
    mi = t.model_info("m")
    assert mi is not None and mi.status == "restarting" and mi.phase == "idle"


def test_drain_all_answers_everything() -> None:
    t = table_with("m", "n", state="loading")
    t.admit("m", A, "r1", b"")
    t.on_state(changed("n", "ready"))
    t.admit("n", B, "r2", b"")
    fails = t.drain_all("shutting_down", "bye")
    assert {f.request_id for f in fails} == {"r1", "r2"}
    assert not t.index


def test_new_model_from_state_change() -> None:
    t = ModelTable()
    t.on_state(changed("x", "loading"))
    assert t.admit("x", A, "r", b"").action is Admit.HOLD
    assert msgspec.structs.asdict(t.status_row("x"))["state"] == "loading"
