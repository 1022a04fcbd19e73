"""Hostile input against a live daemon: fuzzed frames and messages, corrupt cache
files, and requests at the edges of the model.

* Fuzz (hypothesis, >= 10,000 cases in all): random frame lists, wrong protocol
  frames, truncated valid messages, and every client message type with random
  field values (state-changing operations only ever name models that do not
  exist), sent on a raw DEALER whose replies are drained as they come. Then:
  no daemon process died (the same pids), the daemon still answers correctly
  (the same greedy reply as before the fuzz), the router's bad-request counter
  moved. Oversized messages (past ``MAXMSGSIZE``) only cost the sender its
  connection.
* Corrupt KVC files (bit flips, truncations, swapped headers) in every tier
  directory of a live daemon (ram, ram_file, disk): never served (the replies
  stay right), counted (``corrupt_files`` / ``stale_rows_dropped``), removed.
* Prompts at and past the context, empty prompts, invalid token ids, huge
  ``response_tokens``: clear error codes (or a clean, bounded answer).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erllama.cache.kvc import read_metadata
from erllama.protocol.codec import MAX_BODY_BYTES, PROTOCOL_ID
from erllama.protocol.messages import (
    ClientRequest,
    Complete,
    ErrorReply,
    ListModels,
    Reply,
    RequestOptions,
)
from erllama.protocol.tokens import pack_tokens
from tests.faults.helpers import (
    POLICY,
    check_rows,
    complete,
    counters,
    fast_supervisor,
    model,
    wait_claims_released,
    wait_saves,
)
from tests.support.daemon import Daemon, DaemonFactory, RawClient

N_CTX = 256
REQUEST_TYPES: list[type[Any]] = list(ClientRequest.__args__)
STATEFUL = {
    "unload",
    "shutdown",
    "load_model",
    "evict",
    "load_adapter",
    "unload_adapter",
    "sleep_model",
}
PROBE = "the probe prompt"


# ================================================================ fuzz strategies
def tag_of(cls: type[Any]) -> str:
    return str(cls.__struct_config__.tag)


def field_names(cls: type[Any]) -> list[str]:
    return [f.name for f in msgspec.structs.fields(cls) if f.name != "request_id"]


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=64),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
bogus_models = st.text(min_size=1, max_size=12).filter(lambda s: s not in ("m1", "m2"))


@st.composite
def client_messages(draw: st.DrawFn) -> dict[str, Any]:
    cls = draw(st.sampled_from(REQUEST_TYPES))
    tag = tag_of(cls)
    msg: dict[str, Any] = {"t": tag, "request_id": draw(st.text(max_size=20))}
    for name in field_names(cls):
        if draw(st.booleans()):
            continue  # leave it out (a missing required field, or its default)
        if name == "model":
            pool = bogus_models if tag in STATEFUL else st.sampled_from(["m1", "m2", "zz"])
            msg[name] = draw(st.one_of(pool, values))
        elif name == "config":  # LoadModel: never a loadable config (that would load a GGUF)
            msg[name] = draw(
                st.dictionaries(st.sampled_from(["zz", "bogus", "x"]), values, min_size=1)
            )
        elif name == "options":
            msg[name] = draw(
                st.one_of(
                    values,
                    st.fixed_dictionaries(
                        {},
                        optional={
                            "response_tokens": st.integers(-5, 2**40),
                            "temperature": st.floats(allow_nan=True),
                            "top_k": st.integers(-(2**40), 2**40),
                            "seed": st.integers(-(2**63), 2**63),
                            "stop_sequences": st.lists(st.text(max_size=5), max_size=3),
                            "grammar": st.text(max_size=10),
                        },
                    ),
                )
            )
        elif name == "tokens":
            msg[name] = draw(st.one_of(values, st.binary(max_size=64)))
        else:
            msg[name] = draw(values)
    return msg


frames_strategy = st.one_of(
    st.lists(st.binary(max_size=64), max_size=5),  # random frames
    st.tuples(st.binary(min_size=4, max_size=4), st.binary(max_size=64)).map(list),
    st.tuples(  # wrong protocol versions around a valid body
        st.sampled_from([b"ERL0", b"ERL2", b"ERL9", b"erl1", b"", b"ERL1x"]),
        st.just(msgspec.msgpack.encode({"t": "list_models", "request_id": "v"})),
    ).map(list),
    client_messages().map(lambda m: [PROTOCOL_ID, msgspec.msgpack.encode(m)]),
    st.tuples(client_messages(), st.integers(0, 200)).map(  # truncated valid-ish bodies
        lambda mt: [PROTOCOL_ID, msgspec.msgpack.encode(mt[0])[: mt[1]]]
    ),
    client_messages().map(  # extra blob frames after the body
        lambda m: [PROTOCOL_ID, msgspec.msgpack.encode(m), b"blob", b""]
    ),
)


def drain(sock: zmq.Socket[bytes]) -> int:
    n = 0
    while True:
        try:
            sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return n
        n += 1


def quiet(sock: zmq.Socket[bytes], idle_ms: int = 300, limit_s: float = 30.0) -> None:
    """Drain until nothing has come for ``idle_ms`` (bounded by ``limit_s``)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and sock.poll(idle_ms):
        drain(sock)


def pids(d: Daemon) -> set[int]:
    return {p.pid for p in d.children()}


@pytest.fixture
def fuzz_daemon(daemon_factory: DaemonFactory) -> Daemon:
    stub = {"n_ctx": N_CTX}
    return daemon_factory(
        [model("m1", tier="ram", **stub), model("m2", tier="ram", **stub)],
        supervisor=fast_supervisor(stall_timeout_s=30.0),
    )


@pytest.mark.timeout(420)
def test_fuzzed_frames_and_messages_never_kill_anything(fuzz_daemon: Daemon) -> None:
    d = fuzz_daemon
    c = d.client()
    expected = complete(c, "m1", PROBE, 8).reply
    before_pids = pids(d)
    bad_before = counters(c)["router_bad_requests"]
    sock = d.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(d.endpoint)
    sent = [0]

    @settings(
        max_examples=10_000,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(frames_strategy)
    def fuzz(frames: list[bytes]) -> None:
        if not frames:
            frames = [b""]
        sock.send_multipart(frames)
        sent[0] += 1
        if sent[0] % 64 == 0:
            drain(sock)
            sock.poll(5)  # let the router keep up (bounded)

    try:
        fuzz()
        quiet(sock)
    finally:
        sock.close(linger=0)
    assert sent[0] >= 10_000
    assert pids(d) == before_pids, "a daemon process died or was replaced"
    listed = c.call(ListModels())
    assert isinstance(listed, Reply), listed
    assert complete(c, "m1", PROBE, 8).reply == expected
    assert counters(c)["router_bad_requests"] - bad_before > 1000


@pytest.mark.timeout(60)
def test_oversized_and_huge_messages_cost_only_the_sender(fuzz_daemon: Daemon) -> None:
    d = fuzz_daemon
    before = pids(d)
    big = d.client()
    big.send_raw([PROTOCOL_ID, b"\x00" * (MAX_BODY_BYTES + 8192)])  # over MAXMSGSIZE
    many = d.client()
    many.send_raw([PROTOCOL_ID, b"x"] + [b"y" * 1024] * 512)  # many frames, under the limit
    r = many.recv(10)
    assert isinstance(r, ErrorReply) and r.code == "malformed", r
    c = d.client()
    assert isinstance(c.call(ListModels()), Reply)
    assert pids(d) == before


# ================================================================ corrupt KVC files
def corrupt(path: Path, how: str, other: Path | None, rnd: random.Random) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        i = rnd.randrange(len(data))
        data[i] ^= 1 << rnd.randrange(8)
    elif how == "truncate":
        data = data[: rnd.randrange(1, len(data))]
    else:  # a header taken from another row
        assert other is not None
        head = other.read_bytes()[:48]
        data[:48] = head
    path.write_bytes(bytes(data))


@pytest.mark.timeout(120)
def test_corrupt_rows_in_every_tier_are_never_served(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    cache = {
        "tiers": [
            {"name": "ram"},
            {"name": "ram_file", "path": str(tmp_path / "ram_file")},
            {"name": "disk", "path": str(tmp_path / "disk")},
        ],
        "policy": POLICY,
    }
    d = daemon_factory(
        [model("mr", tier="ram"), model("mf", tier="ram_file"), model("md", tier="disk")],
        supervisor=fast_supervisor(),
        cache=cache,
    )
    c = d.client()
    dirs = {"mr": d.ram_dir, "mf": tmp_path / "ram_file", "md": tmp_path / "disk"}
    prompts = {m: [f"{m} corrupt {i}: " + "c" * (40 + 9 * i) for i in range(3)] for m in dirs}
    answers = {(m, p): complete(c, m, p, 6).reply for m in dirs for p in prompts[m]}
    wait_saves(c, 2 * len(answers))
    wait_claims_released(c)
    rnd = random.Random(5)
    corrupted: list[tuple[Path, bytes]] = []
    for m, tier_dir in dirs.items():
        wanted = {pack_tokens([1, *(b + 3 for b in p.encode())]) for p in prompts[m]}
        files = sorted(tier_dir.glob("*.kvc"))
        prompt_rows = [f for f in files if read_metadata(f).meta.tokens in wanted]
        assert len(prompt_rows) == 3, (m, [f.name for f in files])
        for f, how in zip(prompt_rows, ("flip", "truncate", "swap"), strict=True):
            other = next(x for x in files if x != f)
            corrupt(f, how, other, rnd)
            corrupted.append((f, f.read_bytes()))
    before = counters(c)
    for (m, p), text in answers.items():
        r = complete(c, m, p, 6)
        assert r.reply == text, (m, p, r.cache_hit_kind)
    wait_saves(c, 2 * len(answers))
    wait_claims_released(c)
    after = counters(c)
    dropped = (after["corrupt_files"] - before["corrupt_files"]) + (
        after["stale_rows_dropped"] - before["stale_rows_dropped"]
    )
    assert dropped >= len(corrupted), (before, after)
    for f, bad in corrupted:  # removed (a fresh, valid save may have the same name)
        assert not f.exists() or f.read_bytes() != bad, f
    assert check_rows([tmp_path / "ram_file", tmp_path / "disk", d.ram_dir]) >= len(answers)


# ================================================================ the model's edges
def call(c: RawClient, **kw: Any) -> Any:
    return c.call(Complete(model="m1", **kw), 20)


@pytest.mark.timeout(90)
def test_edge_requests_get_clear_codes(fuzz_daemon: Daemon) -> None:
    d = fuzz_daemon
    c = d.client()
    before = pids(d)
    at_ctx = "a" * (N_CTX - 1)  # BOS + N_CTX - 1 bytes = the whole context
    r = call(c, prompt=at_ctx, options=RequestOptions(response_tokens=4))
    assert isinstance(r, ErrorReply) and r.code == "context_overflow", r
    r = call(c, prompt="a" * (N_CTX * 4), options=RequestOptions(response_tokens=4))
    assert isinstance(r, ErrorReply) and r.code == "context_overflow", r
    r = call(c, prompt="", options=RequestOptions(response_tokens=2))
    assert isinstance(r, Reply), r  # an empty text is BOS alone: a valid one-token context
    r = call(c, mode="infer", tokens=b"")
    assert isinstance(r, ErrorReply) and r.code == "empty_prefix", r
    r = call(c, mode="infer", tokens=pack_tokens([1, 40, 10**6]))
    assert isinstance(r, ErrorReply) and r.code == "invalid_token", r
    r = call(c, mode="infer", tokens=b"\x01\x00\x00")  # not a multiple of 4 bytes
    assert isinstance(r, ErrorReply), r
    # huge response_tokens: bounded by the context, never a hang
    r = call(c, prompt="huge", options=RequestOptions(response_tokens=2**40))
    assert isinstance(r, Reply | ErrorReply), r
    if isinstance(r, ErrorReply):
        assert r.code in ("badarg", "bad_request", "context_overflow", "malformed"), r
    r = call(c, prompt="neg", options=RequestOptions(response_tokens=-1))
    assert isinstance(r, ErrorReply) and r.code in ("badarg", "bad_request", "malformed"), r
    # the daemon is unharmed
    assert complete(c, "m1", PROBE, 4).reply
    assert pids(d) == before
