"""Tree operations through the router and the root: load, unload, errors."""

from __future__ import annotations

import pytest

from erllama.protocol.codec import MAX_BODY_BYTES, PROTOCOL_ID, decode_result
from erllama.protocol.messages import (
    TERMINAL_REPLIES,
    Cancel,
    Complete,
    CompletionResult,
    DoneEvent,
    ErrorReply,
    GetModelInfo,
    GetStatusRow,
    ListModels,
    LoadModel,
    ModelInfo,
    Reply,
    RequestOptions,
    StatusRow,
    TokenEvent,
    Unload,
)
from tests.support.daemon import Daemon, DaemonFactory, RawClient, stub_model

pytestmark = pytest.mark.timeout(90)


def complete(c: RawClient, model: str, prompt: str = "hello", n: int = 4) -> CompletionResult:
    r = c.call(Complete(model=model, prompt=prompt, options=RequestOptions(response_tokens=n)))
    assert isinstance(r, Reply), r
    return decode_result(r.result, CompletionResult)


def model_ids(c: RawClient) -> list[str]:
    r = c.call(ListModels())
    assert isinstance(r, Reply), r
    return [m.id for m in decode_result(r.result, list[ModelInfo])]


def test_load_unload_load_again(daemon: Daemon) -> None:
    c = daemon.client()
    r = c.call(LoadModel(config=stub_model("m3"), model_id=None), timeout=30)
    assert isinstance(r, Reply), r
    assert decode_result(r.result, str) == "m3"
    assert model_ids(c) == ["m1", "m2", "m3"]
    assert complete(c, "m3").reply
    daemon.wait_for_event("ready", 10, child="worker.m3")

    r = c.call(Unload(model="m3"), timeout=30)
    assert isinstance(r, Reply), r
    daemon.wait_for_event("stop", 10, child="worker.m3")
    assert model_ids(c) == ["m1", "m2"]
    err = c.call(Complete(model="m3", prompt="x"))
    assert isinstance(err, ErrorReply) and err.code == "model_not_loaded"
    row = c.call(GetStatusRow(model="m3"))
    assert isinstance(row, Reply) and decode_result(row.result, StatusRow).phase == "idle"

    r = c.call(LoadModel(config={"backend": "stub"}, model_id="m3"), timeout=30)
    assert isinstance(r, Reply), r
    assert complete(c, "m3").reply
    # the other models kept serving throughout
    assert complete(c, "m1").reply


def test_load_without_id_gets_a_generated_one(daemon: Daemon) -> None:
    c = daemon.client()
    r = c.call(LoadModel(config={"backend": "stub"}), timeout=30)
    assert isinstance(r, Reply), r
    new_id = decode_result(r.result, str)
    assert new_id.startswith("erllama_model_")
    assert new_id in model_ids(c)


def test_already_loaded_and_not_found(daemon: Daemon) -> None:
    c = daemon.client()
    r = c.call(LoadModel(config={"backend": "stub"}, model_id="m1"))
    assert isinstance(r, ErrorReply) and r.code == "already_loaded", r
    r = c.call(Unload(model="nope"))
    assert isinstance(r, ErrorReply) and r.code == "not_found", r
    r = c.call(GetModelInfo(model="nope"))
    assert isinstance(r, ErrorReply) and r.code in ("noproc", "model_not_loaded"), r


def test_bad_load_config_is_bad_request_naming_the_field(daemon: Daemon) -> None:
    c = daemon.client()
    r = c.call(LoadModel(config={"backend": "stub", "context_opts": {"n_ctx": "big"}}))
    assert isinstance(r, ErrorReply) and r.code == "bad_request", r
    assert "n_ctx" in r.message
    r = c.call(LoadModel(config={"backend": "stub", "no_such_option": 1}))
    assert isinstance(r, ErrorReply) and r.code == "bad_request", r
    assert "no_such_option" in r.message
    r = c.call(LoadModel(config={"backend": "stub", "context_opts": {"n_ctx": 4}}))
    assert isinstance(r, ErrorReply) and r.code == "bad_request" and "n_ctx" in r.message, r


def test_load_of_a_missing_gguf_fails_and_the_daemon_keeps_serving(daemon: Daemon) -> None:
    c = daemon.client()
    missing = str(daemon.run_dir.parent / "no-such-model.gguf")
    r = c.call(LoadModel(config={"backend": "llama", "model_path": missing}, model_id="x"), 60)
    assert isinstance(r, ErrorReply) and r.code == "load_failed", r
    daemon.wait_for_event("failed", 10, child="worker.x")
    assert "x" not in model_ids(c)  # a failed first load leaves no model behind
    assert not any(
        e["event"] in ("restart", "backoff") and e["child"] == "worker.x" for e in daemon.seen
    )
    assert complete(c, "m1").reply
    # and the id can be loaded again once the config is fixed
    r = c.call(LoadModel(config={"backend": "stub"}, model_id="x"), 30)
    assert isinstance(r, Reply), r


def test_stub_load_failure_code_passes_through(daemon: Daemon) -> None:
    c = daemon.client()
    cfg = stub_model("bad", fail_load="malformed_gguf")
    r = c.call(LoadModel(config=cfg), 30)
    assert isinstance(r, ErrorReply) and r.code == "malformed_gguf", r


def test_bad_frames_get_error_replies_and_the_router_survives(daemon: Daemon) -> None:
    c = daemon.client()
    c.send_raw([PROTOCOL_ID, b"\xc1garbage"])
    assert c.recv().code == "malformed"
    c.send_raw([b"ERL9", b"\x80"])
    assert c.recv().code == "unsupported_version"
    c.send_raw([PROTOCOL_ID, b"\x00" * (MAX_BODY_BYTES + 10)])
    assert c.recv().code == "too_large"
    # over the socket's frame limit: libzmq drops the connection, the router lives on
    c.send_raw([PROTOCOL_ID, b"\x00" * (MAX_BODY_BYTES + 64 * 1024)])
    assert model_ids(c) == ["m1", "m2"]
    assert model_ids(daemon.client()) == ["m1", "m2"]


def test_cancel_is_routed_to_the_model_of_its_target(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory([stub_model("m1", token_delay_ms=10)])
    c = d.client()
    r = c.call(Cancel(target="nothing-in-flight"))
    assert isinstance(r, Reply), r  # cancel is always ok
    rid = c.send(
        Complete(
            model="m1", mode="stream", prompt="c", options=RequestOptions(response_tokens=2000)
        )
    )
    assert isinstance(c.recv(10), TokenEvent)
    cancel_rid = c.send(Cancel(target=rid))
    terminal: dict[str, object] = {}
    while len(terminal) < 2:
        msg = c.recv(10)
        if type(msg) in TERMINAL_REPLIES:
            terminal[msg.request_id] = msg
    assert isinstance(terminal[cancel_rid], Reply)
    done = terminal[rid]
    assert isinstance(done, DoneEvent) and done.stats.cancelled, done
