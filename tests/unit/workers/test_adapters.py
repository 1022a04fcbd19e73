"""LoRA adapters (workers/adapters.py) through the engine, on a stub whose output depends on
the applied adapter set: handles, scales, the effective fingerprint of every key, the live KV,
errors, and the rule that a running request keeps its weights."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from erllama.cache.keys import Namespace, effective_fingerprint, make_key
from erllama.protocol.codec import decode_result
from erllama.protocol.errors import ErllamaError, ErrorCode, ModelLoadError
from erllama.protocol.messages import (
    AdapterInfo,
    AdapterRecord,
    DoneEvent,
    ErrorReply,
    ListAdapters,
    ListCachedPrefixes,
    LoadAdapter,
    Msg,
    Reply,
    SetAdapterScale,
    TokenEvent,
    UnloadAdapter,
)
from erllama.protocol.tokens import pack_tokens, unpack_tokens
from erllama.workers.adapters import AdapterSet
from erllama.workers.cachelink import Candidate
from erllama.workers.saver import SaveJob, SubmitResult
from erllama.workers.stub import StubBackend

from . import fakes
from .fakes import FakeCache, Harness

pytestmark = pytest.mark.timeout(30)

P48 = "Q" * 47  # 48 tokens with BOS: saved under SMALL_POLICY
LORA_MAGIC = b"LORA"


class Native:
    def __init__(self, data: bytes) -> None:
        self.data = data


class LoraStub(StubBackend):
    """The stub with LoRA: the applied ``(file bytes, scale)`` pairs salt every prediction."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.applied: list[tuple[bytes, float]] = []
        self.freed: list[Native] = []
        self.fail_apply = False

    def lora_load(self, path: str) -> Native:
        data = Path(path).read_bytes()
        if not data.startswith(LORA_MAGIC):
            raise ModelLoadError(f"{path} is not a LoRA", code=ErrorCode.LOAD_FAILED)
        return Native(data)

    def lora_apply(self, adapters: Sequence[tuple[Any, float]]) -> None:
        if self.fail_apply:
            raise ModelLoadError("refused", code=ErrorCode.LOAD_FAILED)
        self.applied = [(n.data, s) for n, s in adapters]

    def lora_free(self, adapter: Any) -> None:
        self.freed.append(adapter)

    def predict(self, toks: Sequence[int], salt: bytes = b"") -> int:
        extra = b"".join(d + struct.pack("<d", s) for d, s in self.applied)
        return super().predict(toks, salt + extra)


class NsCache(FakeCache):
    """``FakeCache`` whose longest-prefix lookups stay in the namespace, as meta's do."""

    def __init__(self) -> None:
        super().__init__()
        self.ns_of: dict[bytes, Namespace] = {}

    def submit_save(self, job: SaveJob) -> SubmitResult:
        m = job.meta
        self.ns_of.setdefault(job.key, (m.fingerprint, m.quant, m.ctx_hash))
        return super().submit_save(job)

    def checkout_longest(
        self, ns: Namespace, tokens: Sequence[int], *, min_len: int
    ) -> Candidate | None:
        visible = {k: v for k, v in self.rows.items() if self.ns_of.get(k) == tuple(ns)}
        hidden, self.rows = self.rows, visible
        try:
            return super().checkout_longest(ns, tokens, min_len=min_len)
        finally:
            self.rows = hidden


@pytest.fixture
def lora_harness(monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    monkeypatch.setattr(fakes, "StubBackend", LoraStub)
    yield Harness(NsCache())


@pytest.fixture
def adapter_file(tmp_path: Path) -> Path:
    p = tmp_path / "a.gguf"
    p.write_bytes(LORA_MAGIC + b"adapter-one")
    return p


def call(h: Harness, msg: Msg) -> Any:
    h.send(msg)
    h.run()
    (out,) = h.for_request(msg.request_id)
    if isinstance(out, ErrorReply):
        raise ErllamaError(out.message, code=out.code, detail=out.detail)
    assert isinstance(out, Reply)
    return decode_result(out.result, Any)


def complete(h: Harness, rid: str, prompt: str) -> tuple[list[int], str]:
    h.complete(rid, prompt)
    h.run()
    r = h.result(rid)
    return unpack_tokens(r.generated), r.cache_hit_kind


def code(h: Harness, msg: Msg) -> tuple[str, Any]:
    with pytest.raises(ErllamaError) as ei:
        call(h, msg)
    return ei.value.code, ei.value.detail


# ================================================================ handles and fingerprint
def test_load_list_scale_unload_and_fingerprint(lora_harness: Harness, tmp_path: Path) -> None:
    h = lora_harness
    base = h.backend.info.fingerprint
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(LORA_MAGIC + b"A")
    b.write_bytes(LORA_MAGIC + b"B")
    sha_a, sha_b = (hashlib.sha256(p.read_bytes()).digest() for p in (a, b))

    ha = call(h, LoadAdapter(request_id="l1", model="m", path=str(a)))
    assert isinstance(ha, str) and ha
    assert h.engine.saves.ns[0] == effective_fingerprint(base, [(sha_a, 1.0)]) != base
    hb = call(h, LoadAdapter(request_id="l2", model="m", path=str(b)))
    assert hb != ha
    assert call(h, ListAdapters(request_id="ls", model="m")) == [
        {"handle": ha, "scale": 1.0},
        {"handle": hb, "scale": 1.0},
    ]
    call(h, SetAdapterScale(request_id="s1", model="m", handle=ha, scale=0.5))
    # the changed adapter moves to the end of the list
    assert call(h, ListAdapters(request_id="ls2", model="m")) == [
        {"handle": hb, "scale": 1.0},
        {"handle": ha, "scale": 0.5},
    ]
    assert h.engine.saves.ns[0] == effective_fingerprint(base, [(sha_a, 0.5), (sha_b, 1.0)])
    assert h.backend.applied == [(b.read_bytes(), 1.0), (a.read_bytes(), 0.5)]  # type: ignore[attr-defined]
    assert call(h, UnloadAdapter(request_id="u1", model="m", handle=ha)) is None
    assert call(h, UnloadAdapter(request_id="u2", model="m", handle=ha)) is None  # idempotent
    assert call(h, UnloadAdapter(request_id="u3", model="m", handle=hb)) is None
    assert h.engine.saves.ns[0] == base
    assert len(h.backend.freed) == 2  # type: ignore[attr-defined]
    assert call(h, ListAdapters(request_id="ls3", model="m")) == []


def test_output_and_cache_rows_follow_the_adapter_set(
    lora_harness: Harness, adapter_file: Path
) -> None:
    h = lora_harness
    gen0, kind = complete(h, "r0", P48)
    assert kind == "cold"
    handle = call(h, LoadAdapter(request_id="l1", model="m", path=str(adapter_file)))
    assert h.engine.kv.tokens == [] and h.backend.seq_tokens(0) == []  # the live KV is stale
    gen1, kind = complete(h, "r1", P48)
    assert kind == "cold" and gen1 != gen0  # the base rows never serve the adapter
    q = "W" * 47
    q_tokens = h.backend.tokenize(q)
    gen_q, _ = complete(h, "rq", q)
    with_it = call(h, ListCachedPrefixes(request_id="lc1", model="m", tokens=pack_tokens(q_tokens)))
    assert with_it >= 8

    call(h, UnloadAdapter(request_id="u1", model="m", handle=handle))
    lc2 = ListCachedPrefixes(request_id="lc2", model="m", tokens=pack_tokens(q_tokens))
    assert call(h, lc2) == 0  # q was cached only under the adapter
    gen2, kind = complete(h, "r2", P48)
    assert kind == "exact" and gen2 == gen0  # the base row, the base output
    _, kind = complete(h, "r3", q)
    assert kind == "cold"

    call(h, LoadAdapter(request_id="l2", model="m", path=str(adapter_file)))  # same bytes
    gen3, kind = complete(h, "r4", q)
    assert kind == "exact" and gen3 == gen_q
    # every row carries the fingerprint it was computed under
    fp_a = h.engine.saves.ns[0]
    assert make_key(fp_a, h.engine.saves.ns[1], h.engine.saves.ns[2], q_tokens) in h.cache.rows
    saved_fps = {j.meta.fingerprint for j in h.cache.saves}
    assert saved_fps == {h.backend.info.fingerprint, fp_a}


def test_adapter_op_waits_for_the_running_request(
    monkeypatch: pytest.MonkeyPatch, adapter_file: Path
) -> None:
    monkeypatch.setattr(fakes, "StubBackend", LoraStub)
    ref = Harness()
    ref.complete("s1", P48, mode="stream", response_tokens=12)
    ref.run()
    ref_tokens = [t.token_id for t in ref.stream("s1")[0]]

    def on_emit(h: Harness, cid: bytes, msg: Msg) -> None:
        if isinstance(msg, TokenEvent) and msg.request_id == "s1" and msg.seq == 0:
            h.send(LoadAdapter(request_id="l1", model="m", path=str(adapter_file)))
            h.send(ListAdapters(request_id="ls", model="m"))

    h = Harness(NsCache(), on_emit=on_emit)
    h.complete("s1", P48, mode="stream", response_tokens=12)
    h.run()
    tokens, _ = h.stream("s1")
    assert [t.token_id for t in tokens] == ref_tokens  # the running request kept its weights
    order = [m.request_id for _, m in h.out if isinstance(m, Reply | DoneEvent)]
    assert order == ["s1", "l1", "ls"]
    (listed,) = h.for_request("ls")
    assert isinstance(listed, Reply)
    assert len(decode_result(listed.result, list[AdapterInfo])) == 1
    plain, _ = complete(ref, "plain", P48)
    gen, kind = complete(h, "r2", P48)  # admitted after the load: runs with the adapter
    assert kind == "cold" and gen != plain


# ================================================================ errors
def test_file_and_load_errors(lora_harness: Harness, tmp_path: Path) -> None:
    h = lora_harness
    missing = str(tmp_path / "nope.gguf")
    assert code(h, LoadAdapter(request_id="e1", model="m", path=missing)) == (
        ErrorCode.ENOENT,
        {"path": missing},
    )
    assert code(h, LoadAdapter(request_id="e2", model="m", path=str(tmp_path)))[0] == "eisdir"
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF not an adapter")
    assert code(h, LoadAdapter(request_id="e3", model="m", path=str(bad)))[0] == "load_failed"
    unknown = SetAdapterScale(request_id="e4", model="m", handle="lora-9", scale=2.0)
    assert code(h, unknown)[0] == ErrorCode.NOT_FOUND
    assert call(h, UnloadAdapter(request_id="e5", model="m", handle="lora-9")) is None
    assert h.engine.saves.ns[0] == h.backend.info.fingerprint
    # and the model still serves
    assert complete(h, "r", "hello")[1] == "cold"


def test_bad_scale_is_badarg(lora_harness: Harness, adapter_file: Path) -> None:
    changes: list[bytes] = []
    aset = AdapterSet(lora_harness.backend, bytes(32), changes.append)
    handle = aset.load(str(adapter_file))
    for bad in (float("nan"), float("inf"), 1e7, True, "1"):
        with pytest.raises(ErllamaError) as ei:
            aset.set_scale(handle, bad)  # type: ignore[arg-type]
        assert ei.value.code == ErrorCode.BADARG
    assert aset.entries() == [AdapterInfo(handle=handle, scale=1.0)]
    assert len(changes) == 1


def test_a_refused_apply_keeps_the_previous_set(
    lora_harness: Harness, adapter_file: Path, tmp_path: Path
) -> None:
    h = lora_harness
    first = call(h, LoadAdapter(request_id="l1", model="m", path=str(adapter_file)))
    fp = h.engine.saves.ns[0]
    other = tmp_path / "b.gguf"
    other.write_bytes(LORA_MAGIC + b"B")
    backend: LoraStub = h.backend  # type: ignore[assignment]
    backend.fail_apply = True
    assert code(h, LoadAdapter(request_id="l2", model="m", path=str(other)))[0] == "load_failed"
    backend.fail_apply = False
    assert call(h, ListAdapters(request_id="ls", model="m")) == [{"handle": first, "scale": 1.0}]
    assert h.engine.saves.ns[0] == fp
    assert len(backend.freed) == 1  # the refused adapter was freed


def test_stub_has_no_adapters(adapter_file: Path) -> None:
    h = Harness()  # the plain stub
    path = str(adapter_file)
    assert code(h, LoadAdapter(request_id="a", model="m", path=path))[0] == "not_supported"
    assert code(h, UnloadAdapter(request_id="b", model="m", handle="x"))[0] == "not_supported"
    scale = SetAdapterScale(request_id="c", model="m", handle="x", scale=1.0)
    assert code(h, scale)[0] == "not_supported"
    assert call(h, ListAdapters(request_id="d", model="m")) == []


# ================================================================ restarts (the root's record)
def test_every_change_is_reported_and_restore_rebuilds_the_set(tmp_path: Path) -> None:
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(LORA_MAGIC + b"A")
    b.write_bytes(LORA_MAGIC + b"B")
    reports: list[tuple[list[AdapterRecord], int]] = []
    backend = LoraStub(fakes.stub_spec())
    base = backend.info.fingerprint
    old = AdapterSet(backend, base, lambda fp: None, on_persist=lambda r, n: reports.append((r, n)))
    ha, hb = old.load(str(a)), old.load(str(b))
    old.set_scale(ha, 0.25)
    old.unload(hb)
    assert len(reports) == 4
    records, next_handle = reports[-1]
    assert records == [
        AdapterRecord(handle=ha, path=str(a), sha256=hashlib.sha256(a.read_bytes()).digest(),
                      scale=0.25)
    ]  # fmt: skip
    assert next_handle == 3

    # a restarted worker: a new backend, the record from the init payload
    fresh = LoraStub(fakes.stub_spec())
    fps: list[bytes] = []
    new = AdapterSet(fresh, base, fps.append)
    new.restore(records, next_handle)
    assert new.entries() == old.entries() == [AdapterInfo(handle=ha, scale=0.25)]
    assert new.fingerprint == old.fingerprint == fps[-1] != base
    assert fresh.applied == [(a.read_bytes(), 0.25)]
    new.set_scale(ha, 1.0)  # the old handle works
    assert new.load(str(b)) == "lora-3"  # new handles never reuse an old one


@pytest.mark.parametrize("change", ["modified", "removed", "refused"])
def test_restore_of_a_lost_adapter_is_adapter_lost(tmp_path: Path, change: str) -> None:
    a = tmp_path / "a.gguf"
    a.write_bytes(LORA_MAGIC + b"A")
    rec = AdapterRecord(
        handle="lora-1", path=str(a), sha256=hashlib.sha256(a.read_bytes()).digest(), scale=1.0
    )
    if change == "modified":
        a.write_bytes(LORA_MAGIC + b"changed")
    elif change == "removed":
        a.unlink()
    backend = LoraStub(fakes.stub_spec())
    backend.fail_apply = change == "refused"
    fps: list[bytes] = []
    aset = AdapterSet(backend, backend.info.fingerprint, fps.append)
    with pytest.raises(ModelLoadError) as ei:
        aset.restore([rec], 2)
    assert ei.value.code == ErrorCode.ADAPTER_LOST
    assert "lora-1" in ei.value.message
    assert aset.entries() == [] and fps[-1:] in ([], [backend.info.fingerprint])
    assert len(backend.freed) == (1 if change == "refused" else 0)
