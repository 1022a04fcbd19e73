"""Which daemon a request goes to when a client routes over several: the pure chooser.

``Chooser`` owns one table: per endpoint its requests in flight (this client's view
of its load) and, for one that failed, the time to try it again; plus a bounded
memory of which endpoint last served each prompt prefix. ``order`` answers the list
of endpoints to try for one request, best first; the cluster clients
(``cluster.py``) do the IO and report back with ``sent`` / ``finished`` /
``served`` / ``failed``. No IO, no clock of its own (``now`` is passed in), so it is
tested without processes (the ``cache/ledger.py`` habit).

A request's ``Route`` (``route_of``): its ``session_id``, else the keys of its
prompt's prefixes at fixed boundaries (``boundaries``: every 64 units up to 4096,
then every 1024; characters of a text prompt, tokens of a token prompt), shortest
first. The cluster client records the route of what a request left in the daemon's
KV (the prompt and its reply) with ``served``.

``order`` with ``policy="prefix"`` (the default):

1. the preferred endpoint: with a session, the rendezvous (HRW) winner of the
   session id; else the endpoint that served the longest of the request's prefix
   keys (a later turn of a conversation resends the earlier turns, whose prefix
   keys were recorded, so it goes back to the daemon whose KV cache holds them;
   several that served that prefix in HRW order), if that prefix is at least
   ``WARM_FRACTION`` of the prompt; else the HRW winner of the longest prefix key
   (a new conversation, which may share a system prompt with others: spread);
2. then the others in HRW order of the same key;
3. load breaks the tie between warmth and balance: an endpoint with more than
   ``load_slack`` requests in flight above the least-loaded live endpoint moves
   behind those within it (bounded-load consistent hashing);
4. endpoints marked down (``failed``) go last, soonest retry first, until their
   ``retry_at`` passes.

This is the shape of SGLang's cache-aware router (longest prefix match above a
match-rate threshold, else spread; a load-imbalance bound over both), with the
match kept in a hash table of prefix boundaries instead of a radix tree of text.
A conversation whose prompt is mostly a long shared system prompt stays with the
daemon that served that prompt until ``load_slack`` spreads it: recomputing the
long prefix elsewhere is the larger cost.

``policy="round_robin"`` rotates over the live endpoints (the benchmark's
baseline, ``bench/bench_routing.py``).

Turned down: keying a text prompt on the cache's own keys (``cache/keys.py``).
Those hash tokens under the model's fingerprint, which a client has neither
(the client imports only ``protocol``) nor can get without a tokenize round trip
per request; a prefix of characters identifies the same conversation. Keying on
only the first aligned block (one key per request) was turned down too: with a
shared system prompt every conversation has the same first block, so HRW would
put all of them on one daemon; the prefix memory keeps a conversation where it
is warm and HRW on its longest prefix spreads new ones.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from erllama.protocol.errors import ErllamaError, ErrorCode, TransportError

__all__ = [
    "DOWN_S",
    "FAILOVER_CODES",
    "LOAD_SLACK",
    "Chooser",
    "Policy",
    "Route",
    "boundaries",
    "route_of",
]

Policy = Literal["prefix", "round_robin"]
PREFIX_STEP = 64  # a prefix key every this many units (characters or tokens) ...
FINE_KEYS = 64  # ... for the first this many keys (4096 units), then
COARSE_STEP = 1024  # every this many
MAX_PREFIX_KEYS = 128  # a prompt longer than this many boundaries keys only its first ones
WARM_FRACTION = 0.5  # a served prefix this much of the prompt pins it to its endpoints
LOAD_SLACK = 4  # in-flight requests above the least loaded before warmth gives way
DOWN_S = 5.0  # an unreachable endpoint is tried again after this long
BUSY_S = 0.5  # one that answered busy / seq_capacity / shutting_down: this long
MEMORY_ENTRIES = 65536  # prefix keys remembered (LRU)
KEY_BYTES = 16

# the answers after which a request moves to the next endpoint (nothing was generated)
FAILOVER_CODES = frozenset(
    {
        ErrorCode.BUSY,  # the model's queue is full (or the supervisor is busy)
        ErrorCode.SEQ_CAPACITY,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.DAEMON_UNAVAILABLE,
    }
)


def fails_over(exc: ErllamaError) -> bool:
    """Whether a request that got ``exc`` before any output may go to another endpoint.

    A timeout is not among them: the request may be running on the daemon.
    """
    return exc.code in FAILOVER_CODES


def down_for(exc: ErllamaError) -> float:
    """How long an endpoint that answered ``exc`` is kept at the back of the order."""
    return DOWN_S if isinstance(exc, TransportError) else BUSY_S


@dataclass(frozen=True, slots=True)
class Route:
    """What a request is routed on: its session, else its prompt's prefix keys."""

    session: bytes | None = None
    prefixes: tuple[bytes, ...] = ()
    lengths: tuple[int, ...] = ()  # the prefix length of each key
    size: int = 0  # the prompt's length (characters or tokens)

    @property
    def key(self) -> bytes | None:
        """The HRW key: the session, else the longest prefix key."""
        if self.session is not None:
            return self.session
        return self.prefixes[-1] if self.prefixes else None


def boundaries(n: int) -> list[int]:
    """The prefix lengths keyed for a prompt of ``n`` units (every one ``<= n``).

    Every ``PREFIX_STEP`` units up to ``FINE_KEYS`` of them, then every
    ``COARSE_STEP``, at most ``MAX_PREFIX_KEYS``; a prompt shorter than
    ``PREFIX_STEP`` is keyed whole.
    """
    if n < PREFIX_STEP:
        return [n] if n > 0 else []
    fine = list(range(PREFIX_STEP, min(n, PREFIX_STEP * FINE_KEYS) + 1, PREFIX_STEP))
    coarse_from = fine[-1] + COARSE_STEP
    coarse = range(coarse_from, n + 1, COARSE_STEP)
    return (fine + list(coarse))[:MAX_PREFIX_KEYS]


def _prefix_route(model: str, units: bytes, unit: int) -> Route:
    """One pass over ``units`` (``unit`` bytes each): the hash state copied at each boundary."""
    h = hashlib.blake2b(model.encode() + b"\0", digest_size=KEY_BYTES)
    keys: list[bytes] = []
    n = len(units) // unit
    lengths = boundaries(n)
    done = 0
    for b in lengths:
        h.update(units[done * unit : b * unit])
        done = b
        keys.append(h.copy().digest())
    return Route(prefixes=tuple(keys), lengths=tuple(lengths), size=n)


def route_of(
    model: str,
    *,
    prompt: str | None = None,
    tokens: Sequence[int] | None = None,
    session_id: str | None = None,
) -> Route:
    """The ``Route`` of a request for ``model``."""
    if session_id is not None:
        key = hashlib.blake2b(f"{model}\0session\0{session_id}".encode(), digest_size=KEY_BYTES)
        return Route(session=key.digest())
    if tokens is not None:
        packed = b"".join(int(t & 0xFFFFFFFF).to_bytes(4, "little") for t in tokens)
        return _prefix_route(model, packed, 4)
    if prompt is not None:
        # UTF-32 keeps one character per 4 bytes, so boundaries count characters
        return _prefix_route(model, prompt.encode("utf-32-le", "replace"), 4)
    return Route()


def _score(key: bytes, endpoint: str) -> bytes:
    return hashlib.blake2b(key + b"\0" + endpoint.encode(), digest_size=8).digest()


@dataclass(slots=True)
class _Endpoint:
    inflight: int = 0
    retry_at: float = 0.0  # monotonic; down until then


@dataclass
class Chooser:
    """The routing table of one cluster client (see the module docstring).

    Attributes:
        endpoints: the endpoints, in the order given.
        policy: ``prefix`` or ``round_robin``.
        load_slack: requests in flight above the least-loaded endpoint before a warm
            endpoint gives way.
    """

    endpoints: Sequence[str]
    policy: Policy = "prefix"
    load_slack: int = LOAD_SLACK
    memory_entries: int = MEMORY_ENTRIES
    _state: dict[str, _Endpoint] = field(init=False)
    _memory: collections.OrderedDict[bytes, frozenset[str]] = field(init=False)
    _turn: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("at least one endpoint is needed")
        if len(set(self.endpoints)) != len(self.endpoints):
            raise ValueError(f"duplicate endpoints in {list(self.endpoints)}")
        if self.policy not in ("prefix", "round_robin"):
            raise ValueError(f"unknown routing policy {self.policy!r}")
        self.endpoints = tuple(self.endpoints)
        self._state = {ep: _Endpoint() for ep in self.endpoints}
        self._memory = collections.OrderedDict()

    # ================================================================ queries
    def order(self, route: Route, now: float) -> list[str]:
        """The endpoints to try for a request, best first (down ones last)."""
        up = [ep for ep in self.endpoints if self._state[ep].retry_at <= now]
        down = sorted(
            (ep for ep in self.endpoints if self._state[ep].retry_at > now),
            key=lambda ep: self._state[ep].retry_at,
        )
        if self.policy == "round_robin":
            self._turn += 1
            k = self._turn % len(up) if up else 0
            return up[k:] + up[:k] + down
        key = route.key
        if key is None:
            ranked = sorted(up, key=lambda ep: self._state[ep].inflight)
        else:
            ranked = sorted(up, key=lambda ep: _score(key, ep), reverse=True)
            warm = self.warm(route, up)
            ranked.sort(key=lambda ep: ep not in warm)  # stable: HRW order within each part
        if ranked:
            least = min(self._state[ep].inflight for ep in ranked)
            limit = least + self.load_slack
            # a stable sort: within the limit the preference order holds
            ranked.sort(key=lambda ep: self._state[ep].inflight > limit)
        return ranked + down

    def warm(self, route: Route, among: Iterable[str]) -> frozenset[str]:
        """The endpoints of ``among`` that served the longest prefix of ``route`` any served.

        Empty when that prefix is under ``WARM_FRACTION`` of the prompt: a new
        conversation that shares only a system prompt is not pinned to the endpoint
        that served the first one (HRW spreads it).
        """
        if route.session is not None:
            return frozenset()
        live = frozenset(among)
        for key, length in zip(reversed(route.prefixes), reversed(route.lengths), strict=True):
            if length < WARM_FRACTION * route.size:
                break
            eps = self._memory.get(key, frozenset()) & live
            if eps:
                return eps
        return frozenset()

    def inflight(self, endpoint: str) -> int:
        return self._state[endpoint].inflight

    def is_down(self, endpoint: str, now: float) -> bool:
        return self._state[endpoint].retry_at > now

    # ================================================================ reports
    def sent(self, endpoint: str) -> None:
        """A request went to ``endpoint``."""
        self._state[endpoint].inflight += 1

    def finished(self, endpoint: str) -> None:
        """A request sent to ``endpoint`` ended (any way)."""
        st = self._state[endpoint]
        st.inflight = max(0, st.inflight - 1)

    def served(self, endpoint: str, route: Route) -> None:
        """``endpoint`` answered a request of ``route``: it is up, and warm for its prefixes."""
        self._state[endpoint].retry_at = 0.0
        self.remember(route.prefixes, endpoint)

    def remember(self, keys: Iterable[bytes], endpoint: str) -> None:
        """``endpoint`` holds the prefixes of ``keys`` (it served a request with them)."""
        for key in keys:
            self._memory[key] = self._memory.get(key, frozenset()) | {endpoint}
            self._memory.move_to_end(key)
        while len(self._memory) > self.memory_entries:
            self._memory.popitem(last=False)

    def failed(self, endpoint: str, now: float, exc: ErllamaError) -> None:
        """``endpoint`` was unreachable or refused with ``exc``: try it last for a while."""
        self._state[endpoint].retry_at = now + down_for(exc)
