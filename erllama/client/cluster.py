"""``ClusterClient``: generation routed over several daemons (its twin: ``cluster_aio``).

A cluster client holds one ``Client`` (or ``AsyncClient``) per daemon endpoint and
the ``routing.Chooser`` that orders them for each request: the daemon most likely
to hold the request's prefix in its KV cache first, load as the tie-breaker, down
daemons last. ``complete``, ``stream`` and ``infer`` are routed; everything else is
asked of one daemon through ``clients[endpoint]`` (a model's management, the
tokenizer, counters: those are per daemon).

Failover: a request that fails before any output with a ``FAILOVER_CODES`` error
(the daemon is unreachable or went away, the model's queue is full: ``busy``,
``seq_capacity``, ``shutting_down``) moves to the next endpoint, and the failed
one goes to the back of the order for a while (``routing.DOWN_S`` / ``BUSY_S``). A
stream that has yielded an event is never retried: the error is raised, as from a
plain ``Stream``. A timeout is not failed over either (the request may be running).

The twins' common half is here too (``_ClusterBase``, ``_StreamState``); the async
twin ``AsyncClusterClient`` is in ``cluster_aio``.

Sockets: those of the per-endpoint clients (each a DEALER and its monitor PAIR),
opened on first use.

Turned down: ``Client(endpoints=[...])``. One DEALER connected to several
endpoints would round-robin by itself (ZeroMQ's choice, not ours), and a client
per endpoint inside ``SyncIO`` would give every management call (``load_model``,
``counters``) a "which daemon" question; a wrapper keeps ``Client`` one daemon.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from erllama.client.aio import AsyncClient
from erllama.client.models import Completion, Event, Timeout
from erllama.client.routing import Chooser, Policy, Route, fails_over, route_of
from erllama.client.sync import Client
from erllama.client.sync_io import Stream
from erllama.protocol.errors import DaemonUnavailableError, ErllamaError, ErrorCode

__all__ = ["ClusterClient", "ClusterStream"]

log = logging.getLogger(__name__)

C = TypeVar("C", Client, AsyncClient)
T = TypeVar("T")
Key = str | bytes | os.PathLike[str]


class _ClusterBase(Generic[C]):
    """What the twins share: the per-endpoint clients, the chooser, the bookkeeping."""

    def __init__(
        self,
        make: type[C],
        endpoints: Sequence[str],
        timeout: float | Timeout | None,
        curve_server_keys: Mapping[str, Key] | None,
        curve_secret_key: Key | None,
        curve_public_key: str | bytes | None,
        policy: Policy,
        load_slack: int | None,
    ) -> None:
        if isinstance(endpoints, str):
            raise TypeError("endpoints must be a sequence of endpoint strings, not one string")
        slack = {} if load_slack is None else {"load_slack": load_slack}
        self._chooser = Chooser(list(endpoints), policy=policy, **slack)
        keys = dict(curve_server_keys or {})
        if unknown := set(keys) - set(endpoints):
            raise ValueError(f"curve_server_keys for unknown endpoints: {sorted(unknown)}")
        self._clients: dict[str, C] = {}
        for ep in self._chooser.endpoints:
            server = keys.get(ep)
            self._clients[ep] = make(
                ep,
                timeout=timeout,
                curve_server_key=server,
                curve_secret_key=curve_secret_key if server is not None else None,
                curve_public_key=curve_public_key if server is not None else None,
            )

    @property
    def endpoints(self) -> list[str]:
        """The endpoints, in the order given."""
        return list(self._chooser.endpoints)

    @property
    def clients(self) -> Mapping[str, C]:
        """The client of each endpoint (for what is asked of one daemon)."""
        return self._clients

    @property
    def chooser(self) -> Chooser:
        """The routing table (its ``order`` says where a request would go)."""
        return self._chooser

    def route(
        self,
        model: str,
        *,
        prompt: str | None = None,
        tokens: Sequence[int] | None = None,
        session_id: str | None = None,
    ) -> list[str]:
        """The endpoints a request would try now, best first (no request is sent)."""
        r = route_of(model, prompt=prompt, tokens=tokens, session_id=session_id)
        return self._chooser.order(r, time.monotonic())

    def _plan(self, route: Route) -> list[str]:
        return self._chooser.order(route, time.monotonic())

    def _refused(self, endpoint: str, exc: ErllamaError) -> bool:
        """An attempt at ``endpoint`` failed with ``exc``: True to try the next one."""
        self._chooser.finished(endpoint)
        if not fails_over(exc):
            return False
        self._chooser.failed(endpoint, time.monotonic(), exc)
        log.info("event=failover endpoint=%s code=%s", endpoint, exc.code)
        return True

    def _served(self, endpoint: str, routes: Sequence[Route]) -> None:
        self._chooser.finished(endpoint)
        for r in routes or [Route()]:  # Route(): up again, nothing to remember (a session)
            self._chooser.served(endpoint, r)

    @staticmethod
    def _no_endpoint(last: ErllamaError | None) -> ErllamaError:
        return last or DaemonUnavailableError("no endpoint left", code=ErrorCode.DAEMON_UNAVAILABLE)


def _routes_of(
    model: str,
    route: Route,
    *,
    prompt: str | None,
    tokens: Sequence[int] | None,
    text: str,
    generated: Sequence[int],
) -> list[Route]:
    """What a served request left warm: its prompt, and its prompt with the output."""
    if route.session is not None:
        return []
    if tokens is not None:
        return [route, route_of(model, tokens=[*tokens, *generated])]
    return [route, route_of(model, prompt=(prompt or "") + text)]


class _StreamState:
    """A routed stream's bookkeeping: where it is, what it said (for ``served``)."""

    def __init__(
        self,
        cluster: _ClusterBase[Any],
        model: str,
        prompt: str | None,
        tokens: Sequence[int] | None,
        opts: dict[str, Any],
    ) -> None:
        self._cluster, self.model = cluster, model
        self.prompt, self.tokens, self.opts = prompt, tokens, opts
        self.route = route_of(
            model, prompt=prompt, tokens=tokens, session_id=opts.get("session_id")
        )
        self.plan = cluster._plan(self.route)
        self.endpoint: str | None = None
        self.started = False  # an event was yielded: no failover any more
        self._text: list[str] = []
        self._generated: list[int] = []

    def next_endpoint(self, last: ErllamaError | None) -> str:
        if not self.plan:
            raise self._cluster._no_endpoint(last)
        self.endpoint = self.plan.pop(0)
        self._cluster._chooser.sent(self.endpoint)
        return self.endpoint

    def refused(self, exc: ErllamaError) -> bool:
        """The current attempt failed: True to try the next endpoint (none yielded yet)."""
        ep, self.endpoint = self.endpoint, None
        assert ep is not None
        if self.started:
            self._cluster._chooser.finished(ep)
            return False
        return self._cluster._refused(ep, exc) and bool(self.plan)

    def saw(self, ev: Event) -> None:
        self.started = True
        if ev.kind == "token":
            self._text.append(ev.text or "")
            if ev.token_id is not None:
                self._generated.append(ev.token_id)
        if ev.kind == "done":
            self.ended(served=True)

    def ended(self, *, served: bool) -> None:
        ep, self.endpoint = self.endpoint, None
        if ep is None:
            return
        if not served:
            self._cluster._chooser.finished(ep)
            return
        text = "".join(self._text)
        self._cluster._served(
            ep,
            _routes_of(
                self.model,
                self.route,
                prompt=self.prompt,
                tokens=self.tokens,
                text=text,
                generated=self._generated,
            ),
        )


# ================================================================ blocking
class ClusterStream:
    """A ``Stream`` routed over a cluster (the same iteration, ``close`` and ``with``).

    Attributes:
        endpoint: the endpoint the stream runs on (None once it ended).
    """

    def __init__(self, state: _StreamState, start: Callable[[Client], Stream]) -> None:
        self._st, self._start = state, start
        self._inner: Stream | None = None
        self._open(None)

    def _open(self, last: ErllamaError | None) -> None:
        while True:
            ep = self._st.next_endpoint(last)
            try:
                self._inner = self._start(self._st._cluster.clients[ep])
                return
            except ErllamaError as exc:
                if not self._st.refused(exc):
                    raise
                last = exc

    @property
    def endpoint(self) -> str | None:
        return self._st.endpoint

    @property
    def request_id(self) -> str:
        """The request id of the current attempt."""
        assert self._inner is not None
        return self._inner.request_id

    def __iter__(self) -> ClusterStream:
        return self

    def __next__(self) -> Event:
        while True:
            if self._inner is None:
                raise StopIteration
            try:
                ev = next(self._inner)
            except StopIteration:
                self._inner = None
                raise
            except ErllamaError as exc:
                self._inner = None
                if not self._st.refused(exc):
                    raise
                self._open(exc)
                continue
            self._st.saw(ev)
            return ev

    def close(self) -> None:
        """Stop the stream (cancelled on its daemon if unfinished)."""
        if self._inner is not None:
            self._inner.close()
            self._inner = None
        self._st.ended(served=False)

    def __enter__(self) -> ClusterStream:
        return self

    def __del__(self) -> None:  # dropped unfinished: the inner Stream cancels itself
        with contextlib.suppress(Exception):
            self._st.ended(served=False)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ClusterClient(_ClusterBase[Client]):
    """A blocking client that routes generation over several daemons.

    Args:
        endpoints: the daemons' client endpoints (``ipc://`` or ``tcp://``).
        timeout: as for ``Client`` (every endpoint's client gets it); a short
            ``Timeout.connect`` makes a dead daemon fail over sooner.
        curve_server_keys: endpoint -> the server's public key (z85 or ``.key`` file),
            for each ``tcp://`` endpoint with CURVE.
        curve_secret_key: this client's ``.key_secret`` file (or z85 secret key with
            ``curve_public_key``), used for every endpoint in ``curve_server_keys``.
        curve_public_key: this client's z85 public key (with a z85 secret key).
        policy: ``prefix`` (the default: prefix-warm daemon first) or ``round_robin``.
        load_slack: in-flight requests above the least-loaded daemon before a warm
            daemon gives way (``routing.LOAD_SLACK`` if None).

    For one thread, as ``Client``. Example::

        with erllama.ClusterClient(["ipc:///run/a/client.sock", "tcp://b:7000"],
                                   curve_server_keys={"tcp://b:7000": "b.key"},
                                   curve_secret_key="me.key_secret") as c:
            print(c.complete("default", "Hello").reply)
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float | Timeout | None = None,
        curve_server_keys: Mapping[str, Key] | None = None,
        curve_secret_key: Key | None = None,
        curve_public_key: str | bytes | None = None,
        policy: Policy = "prefix",
        load_slack: int | None = None,
    ) -> None:
        super().__init__(
            Client,
            endpoints,
            timeout,
            curve_server_keys,
            curve_secret_key,
            curve_public_key,
            policy,
            load_slack,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every endpoint's client."""
        for c in self._clients.values():
            c.close()

    def complete(self, model: str, prompt: str, **opts: Any) -> Completion:
        """``Client.complete`` on the best endpoint, failing over (see the module docstring)."""
        route = route_of(model, prompt=prompt, session_id=opts.get("session_id"))
        last: ErllamaError | None = None
        for ep in self._plan(route):
            self._chooser.sent(ep)
            try:
                done = self._clients[ep].complete(model, prompt, **opts)
            except ErllamaError as exc:
                if not self._refused(ep, exc):
                    raise
                last = exc
                continue
            self._served(
                ep,
                _routes_of(model, route, prompt=prompt, tokens=None, text=done.reply, generated=()),
            )
            return done
        raise self._no_endpoint(last)

    def stream(self, model: str, prompt: str, **opts: Any) -> ClusterStream:
        """``Client.stream`` on the best endpoint; fails over until the first event."""
        state = _StreamState(self, model, prompt, None, opts)
        return ClusterStream(state, lambda c: c.stream(model, prompt, **opts))

    def infer(self, model: str, tokens: Sequence[int], **params: Any) -> ClusterStream:
        """``Client.infer`` on the best endpoint; fails over until the first event."""
        state = _StreamState(self, model, None, tokens, params)
        return ClusterStream(state, lambda c: c.infer(model, tokens, **params))
