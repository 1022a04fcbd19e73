"""The routing chooser (erllama/client/routing.py): no processes, no sockets."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given
from hypothesis import strategies as st

from erllama.client.routing import (
    BUSY_S,
    DOWN_S,
    PREFIX_STEP,
    Chooser,
    Route,
    boundaries,
    fails_over,
    route_of,
)
from erllama.protocol.errors import (
    ConflictError,
    DaemonUnavailableError,
    ErrorCode,
    InvalidRequestError,
    RequestTimeoutError,
)

EPS = ["ipc:///a", "ipc:///b", "ipc:///c"]
SYSTEM = "You are a terse assistant who answers in one line. " * 4


def chat(session: int, turns: int) -> str:
    text = SYSTEM
    for t in range(turns):
        text += f"\nuser: question {t} of conversation {session}\nassistant: answer {t}"
    return text


def test_boundaries_fine_then_coarse() -> None:
    assert boundaries(0) == []
    assert boundaries(5) == [5]
    assert boundaries(PREFIX_STEP) == [64]
    assert boundaries(200) == [64, 128, 192]
    b = boundaries(10_000)
    assert b[63] == 4096 and b[64:] == [5120, 6144, 7168, 8192, 9216]
    assert len(boundaries(10**7)) == 128


def test_a_longer_prompt_shares_the_keys_of_its_prefix() -> None:
    first = route_of("m", prompt=chat(1, 1))
    later = route_of("m", prompt=chat(1, 3))
    assert later.prefixes[: len(first.prefixes)] == first.prefixes
    other = route_of("other", prompt=chat(1, 1))
    assert set(other.prefixes).isdisjoint(first.prefixes)  # the model is in the key


def test_token_and_session_routes() -> None:
    r = route_of("m", tokens=list(range(100)))
    assert len(r.prefixes) == len(boundaries(100))
    assert route_of("m", tokens=list(range(70))).prefixes[:2] == r.prefixes[:2]
    s = route_of("m", prompt="x", session_id="abc")
    assert s.prefixes == () and s.key == route_of("m", session_id="abc").key
    assert route_of("m").key is None


def test_a_session_always_goes_to_its_hrw_winner() -> None:
    c = Chooser(EPS)
    route = route_of("m", session_id="s1")
    first = c.order(route, 0.0)
    assert sorted(first) == sorted(EPS)
    for _ in range(5):
        assert c.order(route, 0.0) == first
    # removing another endpoint leaves the winner in place (rendezvous property)
    others = [ep for ep in EPS if ep != first[-1]]
    assert Chooser(others).order(route, 0.0)[0] == first[0]


def test_sessions_spread_over_endpoints() -> None:
    c = Chooser(EPS)
    winners = collections.Counter(
        c.order(route_of("m", session_id=f"s{i}"), 0.0)[0] for i in range(300)
    )
    assert set(winners) == set(EPS)
    assert min(winners.values()) > 50


def test_a_later_turn_goes_where_the_conversation_was_served() -> None:
    c = Chooser(EPS)
    for session in range(12):
        r1 = route_of("m", prompt=chat(session, 1))
        ep = c.order(r1, 0.0)[-1]  # serve it somewhere that is not the HRW choice
        c.served(ep, r1)
        assert c.order(route_of("m", prompt=chat(session, 3)), 0.0)[0] == ep


def test_new_conversations_spread_even_with_a_shared_system_prompt() -> None:
    c = Chooser(EPS)
    first: collections.Counter[str] = collections.Counter()
    for session in range(60):
        own = f"conversation {session}: " + "tell me about the harbour " * 10
        r = route_of("m", prompt=SYSTEM + own)  # the shared part is under half the prompt
        ep = c.order(r, 0.0)[0]
        c.served(ep, r)
        first[ep] += 1
    assert len(first) == len(EPS)


def test_a_mostly_shared_prompt_stays_warm_until_load_spreads_it() -> None:
    c = Chooser(EPS[:2], load_slack=1)
    r0 = route_of("m", prompt=chat(0, 1))
    home = c.order(r0, 0.0)[0]
    c.served(home, r0)
    seen = set()
    for session in range(1, 6):
        r = route_of("m", prompt=chat(session, 1))  # mostly the shared system prompt
        ep = c.order(r, 0.0)[0]
        c.sent(ep)
        seen.add(ep)
    assert seen == set(EPS[:2])
    assert c.inflight(home) >= c.inflight(next(e for e in EPS[:2] if e != home))


def test_load_breaks_warmth_past_the_slack() -> None:
    c = Chooser(EPS[:2], load_slack=2)
    r = route_of("m", prompt=chat(0, 2))
    warm = c.order(r, 0.0)[0]
    c.served(warm, r)
    other = next(ep for ep in EPS[:2] if ep != warm)
    for _ in range(2):
        c.sent(warm)
    assert c.order(r, 0.0)[0] == warm  # 2 above the other: within the slack
    c.sent(warm)
    assert c.order(r, 0.0)[0] == other
    c.finished(warm)
    assert c.order(r, 0.0)[0] == warm


def test_down_endpoints_go_last_until_their_retry() -> None:
    c = Chooser(EPS)
    r = route_of("m", session_id="s")
    best = c.order(r, 0.0)[0]
    c.failed(best, 10.0, DaemonUnavailableError("gone"))
    assert c.order(r, 10.0)[-1] == best
    assert c.is_down(best, 10.0 + DOWN_S - 0.1)
    assert c.order(r, 10.0 + DOWN_S)[0] == best
    c.failed(best, 20.0, ConflictError("full", code=ErrorCode.BUSY))
    assert c.order(r, 20.0 + BUSY_S / 2)[-1] == best
    assert c.order(r, 20.0 + BUSY_S)[0] == best


def test_round_robin_rotates_over_live_endpoints() -> None:
    c = Chooser(EPS, policy="round_robin")
    r = route_of("m", session_id="s")
    firsts = [c.order(r, 0.0)[0] for _ in range(6)]
    assert collections.Counter(firsts) == dict.fromkeys(EPS, 2)
    c.failed(EPS[0], 0.0, DaemonUnavailableError("gone"))
    assert all(c.order(r, 1.0)[-1] == EPS[0] for _ in range(4))


def test_what_fails_over() -> None:
    assert fails_over(ConflictError("queue full", code=ErrorCode.BUSY))
    assert fails_over(ConflictError("x", code=ErrorCode.SEQ_CAPACITY))
    assert fails_over(ConflictError("x", code=ErrorCode.SHUTTING_DOWN))
    assert fails_over(DaemonUnavailableError("gone"))
    assert not fails_over(RequestTimeoutError("slow"))
    assert not fails_over(InvalidRequestError("bad"))


def test_bad_tables_are_refused() -> None:
    with pytest.raises(ValueError):
        Chooser([])
    with pytest.raises(ValueError):
        Chooser(["a", "a"])
    with pytest.raises(ValueError):
        Chooser(["a"], policy="random")  # type: ignore[arg-type]


def test_memory_is_bounded() -> None:
    c = Chooser(EPS, memory_entries=10)
    for i in range(50):
        c.served(EPS[0], Route(prefixes=(bytes([i]) * 16,)))
    assert len(c._memory) == 10


@given(
    st.lists(st.sampled_from(["sent", "finished", "down"]), max_size=30),
    st.integers(0, 1000),
)
def test_order_is_always_a_permutation(ops: list[str], seed: int) -> None:
    c = Chooser(EPS)
    for i, op in enumerate(ops):
        ep = EPS[(seed + i) % len(EPS)]
        if op == "sent":
            c.sent(ep)
        elif op == "finished":
            c.finished(ep)
        else:
            c.failed(ep, float(i), DaemonUnavailableError("x"))
        assert c.inflight(ep) >= 0
    out = c.order(route_of("m", prompt=f"p{seed}" * 40), 3.0)
    assert sorted(out) == sorted(EPS)
