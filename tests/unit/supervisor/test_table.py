"""The root's slot table: load / unload decisions, model ids, and who is answered when."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from erllama.config import CacheConfig, ModelSpec
from erllama.protocol.errors import ErrorCode
from erllama.protocol.messages import LoadModel, Unload
from erllama.supervisor.child import ChildProcess
from erllama.supervisor.effects import Answer, BeginStop, Effect, Publish, Spawn, Tell
from erllama.supervisor.slot import Slot
from erllama.supervisor.table import MAX_MODEL_ID_LEN, SlotTable
from erllama.supervisor.tree import ChildState, ExitDecision

pytestmark = pytest.mark.timeout(10)

MODULES = {"meta": "m.meta", "router": "m.router", "worker": "m.worker"}
W: tuple[bytes, bytes, str] = (b"router", b"client", "r1")


def resolved(spec: ModelSpec) -> ModelSpec:
    return msgspec.structs.replace(spec, model_path=f"/models/{spec.id}")


def table() -> SlotTable:
    return SlotTable(MODULES, CacheConfig(), resolve=resolved)


def load(
    t: SlotTable, model_id: str | None = None, *, stopping: bool = False, **config: Any
) -> list[Effect]:
    msg = LoadModel(request_id=W[2], config={"backend": "stub", **config}, model_id=model_id)
    return t.tree_op(W, msg, stopping=stopping)


def unload(t: SlotTable, model: str) -> list[Effect]:
    return t.tree_op(W, Unload(request_id=W[2], model=model), stopping=False)


def live(slot: Slot) -> Slot:
    """Give ``slot`` a (never started) process handle, as a spawned worker has."""
    slot.proc = ChildProcess(slot.spec, "/run")
    slot.tracker.on_spawn(0.0)
    return slot


def test_load_adds_a_worker_slot_and_spawns_it() -> None:
    t = table()
    effects = load(t)
    slot = t.slots["worker.erllama_model_1"]
    assert effects == [Spawn(slot)]
    assert slot.model_id == "erllama_model_1" and slot.from_load and slot.is_worker
    assert slot.spec.module == "m.worker" and slot.load_waiters == [W]
    assert slot.model is not None and slot.model.model_path == "/models/erllama_model_1"
    load(t)
    assert "worker.erllama_model_2" in t.slots


def test_new_model_ids_skip_ids_in_use() -> None:
    t = table()
    load(t, "erllama_model_1")
    load(t)
    assert sorted(t.slots) == ["worker.erllama_model_1", "worker.erllama_model_2"]
    assert t.new_model_id() == "erllama_model_3"


@pytest.mark.parametrize(
    ("model_id", "config", "words"),
    [
        (None, {"backend": "nope"}, "backend"),
        ("two words", {}, "printable"),
        ("x" * (MAX_MODEL_ID_LEN + 1), {}, f"1..{MAX_MODEL_ID_LEN}"),
        (None, {"id": ""}, "1.."),
    ],
)
def test_load_of_a_bad_spec_is_a_bad_request(
    model_id: str | None, config: dict[str, Any], words: str
) -> None:
    t = table()
    [answer] = load(t, model_id, **config)
    assert isinstance(answer, Answer) and answer.code == ErrorCode.BAD_REQUEST
    assert words in answer.message and not t.slots


def test_load_of_a_loaded_model_is_refused_and_a_failed_one_replaced() -> None:
    t = table()
    load(t, "m")
    old = live(t.slots["worker.m"])
    assert load(t, "m") == [Answer(W, ErrorCode.ALREADY_LOADED, "model 'm' is loaded")]
    old.tracker.on_stop_requested()
    assert old.tracker.state is ChildState.STOPPING
    assert load(t, "m") == [Answer(W, ErrorCode.BUSY, "model 'm' is being unloaded")]
    old.tracker.state = ChildState.FAILED
    [spawn] = load(t, "m")
    assert isinstance(spawn, Spawn) and spawn.slot is not old and t.slots["worker.m"] is spawn.slot


def test_load_whose_model_path_cannot_be_resolved_fails() -> None:
    def missing(spec: ModelSpec) -> ModelSpec:
        raise OSError("no bundled model")

    t = SlotTable(MODULES, CacheConfig(), resolve=missing)
    assert load(t, "m") == [Answer(W, ErrorCode.LOAD_FAILED, "no bundled model")]
    assert not t.slots


def test_tree_ops_are_refused_while_the_daemon_stops() -> None:
    t = table()
    assert load(t, stopping=True) == [Answer(W, ErrorCode.SHUTTING_DOWN, "the daemon is stopping")]
    assert not t.slots


def test_unload() -> None:
    t = table()
    assert unload(t, "m") == [Answer(W, ErrorCode.NOT_FOUND, "model 'm' is not loaded")]
    load(t, "m")
    slot = live(t.slots["worker.m"])
    slot.load_waiters.clear()
    assert unload(t, "m") == [BeginStop(slot)]  # the root stops it; answered at its exit
    assert slot.unload_waiters == [W] and "worker.m" in t.slots


def test_unload_of_a_model_with_no_process_is_done_at_once() -> None:
    t = table()
    load(t, "m")
    slot = t.slots["worker.m"]
    slot.load_waiters = [(b"router", b"other", "r0")]  # a load still waiting is refused
    assert unload(t, "m") == [
        Publish("stop", "worker.m", None, {"reason": "unloaded"}),
        Tell(slot, "unloaded"),
        Answer((b"router", b"other", "r0"), ErrorCode.LOAD_FAILED, "unloaded"),
        Answer(W),
    ]
    assert not t.slots and slot.tracker.stop_requested
    assert not slot.load_waiters and not slot.unload_waiters


def test_worker_ready_tells_the_router_then_answers_the_loads() -> None:
    t = table()
    load(t, "m")
    slot = t.slots["worker.m"]
    assert t.worker_ready(slot) == [Tell(slot, "ready"), Answer(W, result="m")]
    assert not slot.load_waiters


def exit_of(t: SlotTable, slot: Slot, decision: ExitDecision, **kw: Any) -> list[Effect]:
    return t.worker_exit(
        slot, 42, decision, reason="exit code 3", fail_code="load_failed", stopping=False, **kw
    )


def test_worker_exit_restart_failed_and_stopped() -> None:
    t = table()
    load(t, "m")
    slot = t.slots["worker.m"]
    assert exit_of(t, slot, ExitDecision("restart", delay_s=1.5)) == [
        Tell(slot, "restarting"),
        Publish("backoff", "worker.m", None, {"delay_s": 1.5, "reason": "exit code 3"}),
    ]
    # a first load that never became ready: the waiting load fails, the model goes
    failed = ExitDecision("failed", reason="failed first start")
    assert exit_of(t, slot, failed) == [
        Answer(W, "load_failed", "exit code 3"),
        Tell(slot, "unloaded"),
        Publish(
            "failed", "worker.m", 42, {"reason": "exit code 3", "detail": "failed first start"}
        ),
    ]
    assert not t.slots
    # a configured model stays listed as failed
    cfg_slot = t.add_worker(ModelSpec(id="c", backend="stub"), from_load=False)
    assert exit_of(t, cfg_slot, failed)[0] == Tell(cfg_slot, "failed")
    assert t.slots == {"worker.c": cfg_slot}
    # stopped by an unload
    cfg_slot.unload_waiters.append(W)
    stopped = ExitDecision("stopped", reason="stopped by request")
    assert exit_of(t, cfg_slot, stopped) == [
        Tell(cfg_slot, "unloaded"),
        Answer(W),
        Publish("stop", "worker.c", 42, {"reason": "stopped by request"}),
    ]
    assert not t.slots


def test_worker_stopped_to_sleep_keeps_its_slot() -> None:
    t = table()
    slot = t.add_worker(ModelSpec(id="s", backend="stub"), from_load=False)
    slot.sleep_reason = "keep_alive"
    assert exit_of(t, slot, ExitDecision("stopped", reason="stopped by request")) == [
        Publish("sleep", "worker.s", 42, {"reason": "keep_alive"}),
        Tell(slot, "sleeping"),
    ]
    assert t.slots == {"worker.s": slot}


def test_stop_all_refuses_waiting_loads_and_stops_every_tracker() -> None:
    t = table()
    core = t.add_core("meta")
    load(t, "m")
    slot = t.slots["worker.m"]
    assert core.spec.module == "m.meta" and core.spec.restart == "permanent"
    assert t.stop_all() == [Answer(W, ErrorCode.SHUTTING_DOWN, "the daemon is stopping")]
    assert not slot.load_waiters
    assert core.tracker.stop_requested and slot.tracker.stop_requested
