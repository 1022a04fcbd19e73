"""One request's generation, token by token: which sampler, what goes out, when it ends.

The engine has one generation loop (``Engine._generate``); what differs between
a model with thinking / tool-call markers and one without is a *sink* that the
loop feeds each sampled token:

* ``TextSink``: one ``token`` event per token (``TextStream``: partial UTF-8 and
  text that could start a stop string are held back, the tail goes out with the
  last token); ``generated`` gets every token;
* ``SpanSink``: the events of ``spans.SpanRun`` (thinking deltas, tool-call deltas,
  plain ``token`` events); hidden thinking tokens stay out of ``generated`` but
  go into the KV, a tool-call span outside its payload samples greedily, and a
  spent thinking budget injects the end marker's tokens (prefilled by the loop).

The loop, for both: sample (from a request's stored first logits, else the
sink's sampler), ``accept`` (events and whether the reply is done), emit the
events, decode the token (so the client sees a token one decode sooner and
every committed token is in the KV, D27), prefill what the sink injects, take a
continued save when due, poll. A step-wise object rather than a loop, so that a
loop over several sequences can drive several of them.
"""

from __future__ import annotations

from typing import Protocol

from erllama.protocol.messages import Msg, TokenEvent
from erllama.workers.backend import ModelBackend, Sampler, SamplerOptions
from erllama.workers.request import Request
from erllama.workers.spans import SpanRun, SpanSetup
from erllama.workers.textstream import TextStream


class Sink(Protocol):
    """What one request's sampled tokens turn into (see the module docstring)."""

    def sampler(self, default: Sampler) -> Sampler:
        """The sampler for the next token."""
        ...

    def accept(self, token: int, *, eog: bool, kv_len: int) -> tuple[list[Msg], bool]:
        """Take a sampled token (``kv_len``: the KV length once it is decoded);
        the events to send and whether the reply is done."""
        ...

    def inject(self) -> list[int]:
        """Tokens to prefill after the token just decoded (taken once)."""
        ...

    def close(self) -> None: ...


class TextSink:
    """Plain text: a ``token`` event per token."""

    def __init__(self, backend: ModelBackend, req: Request) -> None:
        self._backend = backend
        self._req = req
        self._text = TextStream(req.stop_sequences)
        self._n_ctx = backend.info.n_ctx

    def sampler(self, default: Sampler) -> Sampler:
        return default

    def accept(self, token: int, *, eog: bool, kv_len: int) -> tuple[list[Msg], bool]:
        req = self._req
        req.generated.append(token)
        fragment = self._text.feed(self._backend.token_to_piece(token))
        req.stop_sequence = self._text.matched
        length = len(req.generated) >= req.max_tokens or kv_len >= self._n_ctx
        done = req.stop_sequence is not None or eog or length
        if done:
            fragment += self._text.finish()
        if not req.streaming:
            return [], done
        event = TokenEvent(
            request_id=req.request_id, seq=req.next_seq(), text=fragment, token_id=token
        )
        return [event], done

    def inject(self) -> list[int]:
        return []

    def close(self) -> None:
        pass


class SpanSink:
    """A model with markers: the events of ``SpanRun`` (see the module docstring)."""

    def __init__(self, backend: ModelBackend, req: Request, setup: SpanSetup) -> None:
        self._backend = backend
        self._req = req
        self._setup = setup
        self._run = SpanRun(setup, req)
        self._greedy = backend.new_sampler(0, SamplerOptions()) if setup.tool is not None else None
        self._n_ctx = backend.info.n_ctx
        self._inject: list[int] = []

    def sampler(self, default: Sampler) -> Sampler:
        return self._greedy if self._greedy is not None and self._run.greedy else default

    def accept(self, token: int, *, eog: bool, kv_len: int) -> tuple[list[Msg], bool]:
        req, run, setup = self._req, self._run, self._setup
        run.feed(token, setup.piece(self._backend, token), eog=eog)
        full = kv_len >= self._n_ctx
        # held-back tokens are not counted: a marker's first tokens must not end the reply
        length = len(req.generated) >= req.max_tokens
        if run.matched is None and not (eog or length or full) and run.budget_exhausted:
            run.close_thinking()
            if kv_len + len(setup.think_end_tokens) < self._n_ctx:
                self._inject = list(setup.think_end_tokens)
            else:
                full = True
        done = run.matched is not None or eog or length or full
        if done:
            run.finish()
            req.stop_sequence = run.matched
            req.hit_length = run.matched is None and not eog
        events = run.take()
        return (events if req.streaming else []), done

    def inject(self) -> list[int]:
        out, self._inject = self._inject, []
        return out

    def close(self) -> None:
        if self._greedy is not None:
            self._greedy.close()


def new_sink(backend: ModelBackend, req: Request, spans: SpanSetup | None) -> Sink:
    """The sink for ``req``: spans when the model has markers, else plain text."""
    if spans is not None:
        return SpanSink(backend, req, spans)
    return TextSink(backend, req)
