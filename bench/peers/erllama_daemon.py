"""A real ``erllama serve`` (subprocess, own run dir) driven through ``erllama.Client``.

Started with ``bench/daemon_proc.running_daemon``; one model ``default``
(the bundled Gemma 3 270M Q4_K_M) with ``n_ctx = 8192``, two threads, the
ram tier, and the cold/min save gates lowered to 256 tokens so that saves
fire on every prompt size of the benchmarks. Requests go through
``Client.infer(model, tokens, response_tokens=N, temperature=0)``; TTFT is
the first ``token`` event, and the ``done`` event's ``cache_hit_kind`` is
reported as the hit.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

from . import Gen, Peer, now

BENCH = Path(__file__).resolve().parent.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

MODEL = "default"

CONFIG = """
[daemon]
log_level = "INFO"

[[cache.tiers]]
name = "ram"
budget_bytes = {budget}

[cache.policy]
min_tokens = 256
cold_min_tokens = 256

[[models]]
id = "default"
tier = "ram"
[models.context_opts]
n_ctx = {n_ctx}
n_threads = {n_threads}
n_threads_batch = {n_threads}
swa_full = true
"""


class ErllamaDaemon(Peer):
    name = "erllama"

    def __init__(
        self, *, n_ctx: int = 8192, n_threads: int = 2, ram_budget_bytes: int = 8 << 30
    ) -> None:
        self.config = CONFIG.format(n_ctx=n_ctx, n_threads=n_threads, budget=ram_budget_bytes)
        self._stack: contextlib.ExitStack | None = None
        self.client: Any = None
        self.endpoint = ""
        self.run_dir: Path | None = None
        self.details = True  # ask last_cache_hit after each request (reused prefix length)

    def start(self) -> None:
        from daemon_proc import running_daemon

        import erllama

        stack = contextlib.ExitStack()
        try:
            self.endpoint, self.run_dir = stack.enter_context(running_daemon(self.config))
            self.client = stack.enter_context(erllama.Client(self.endpoint))
        except BaseException:
            stack.close()
            raise
        self._stack = stack

    def stop(self) -> None:
        stack, self._stack = self._stack, None
        self.client = None
        if stack is not None:
            stack.close()

    def gen(self, tokens: list[int], n_tokens: int = 1) -> Gen:
        t0 = now()
        first = None
        out: list[int] = []
        kind = "?"
        info: dict[str, Any] = {}
        for ev in self.client.infer(MODEL, tokens, response_tokens=n_tokens, temperature=0.0):
            if ev.kind == "token":
                if first is None:
                    first = now() - t0
                if ev.token_id is not None:
                    out.append(int(ev.token_id))
            elif ev.kind == "done":
                kind = ev.stats.cache_hit_kind
                info = {"prefill_ms": ev.stats.prefill_ms, "prompt_tokens": ev.stats.prompt_tokens}
        total = now() - t0
        if self.details:  # one more lock-free round trip, after the timing
            hit = self.client.last_cache_hit(MODEL)
            if hit is not None:
                info["prefix_len"] = hit.prefix_len
        return Gen(first if first is not None else total, total, out, kind, info)

    def clobber(self, tokens: list[int]) -> None:
        self.gen(tokens, 1)

    def tokenize(self, text: str) -> list[int]:
        return list(self.client.tokenize(MODEL, text))

    def worker_pid(self) -> int | None:
        return self.client.model_info(MODEL).pid
