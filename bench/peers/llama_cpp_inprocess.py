"""llama-cpp-python in this process: ``llama_cpp.Llama``, plain or with ``LlamaRAMCache``.

Requests go through ``Llama.create_completion(prompt=tokens, stream=True,
temperature=0)``, the library's own streaming path (prefix reuse of the live
KV inside ``Llama.generate``; with a cache, ``LlamaRAMCache`` lookup before
and ``save_state()`` after each completion). The stream is always read to
its end, so the cache save after the last token is part of every request.

The generated token ids are recorded by wrapping the instance's ``sample``
method (the streamed chunks carry text only).
"""

from __future__ import annotations

from typing import Any

from . import Gen, Peer, model_path, now


class LlamaCppInProcess(Peer):
    def __init__(
        self,
        *,
        ram_cache: bool = False,
        n_ctx: int = 8192,
        n_threads: int = 2,
        cache_bytes: int = 2 << 30,
    ) -> None:
        self.ram_cache = ram_cache
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.cache_bytes = cache_bytes
        self.name = "llama-cpp-python + LlamaRAMCache" if ram_cache else "llama-cpp-python"
        self.llm: Any = None
        self._sampled: list[int] = []

    def start(self) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path(),
            n_ctx=self.n_ctx,
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads,
            verbose=False,
        )
        if self.ram_cache:
            self.llm.set_cache(llama_cpp.LlamaRAMCache(capacity_bytes=self.cache_bytes))
        orig = self.llm.sample

        def sample(*args: Any, **kwargs: Any) -> int:
            token = int(orig(*args, **kwargs))
            self._sampled.append(token)
            return token

        self.llm.sample = sample

    def stop(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    def gen(self, tokens: list[int], n_tokens: int = 1) -> Gen:
        self._sampled = []
        t0 = now()
        first = None
        for _chunk in self.llm.create_completion(
            prompt=list(tokens), max_tokens=n_tokens, temperature=0.0, stream=True
        ):
            if first is None:
                first = now() - t0
        total = now() - t0
        if first is None:  # nothing streamed (an immediate end of generation)
            first = total
        return Gen(first, total, list(self._sampled[:n_tokens]), "")

    def clobber(self, tokens: list[int]) -> None:
        """Overwrite the live KV with an unrelated prompt (cache saves included)."""
        self.gen(tokens, 1)

    def swa_full(self) -> bool:
        return bool(self.llm.context_params.swa_full)
