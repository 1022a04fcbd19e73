"""The in-process floor: what no daemon can beat.

Built on the worker's own ``erllama.workers.llama.LlamaBackend`` (the same
low-level calls, the same context parameters as a worker: one sequence,
``swa_full``, whole-cache snapshots on Gemma 3):

* ``prepare(tokens)``: a cold prefill (timed: the in-process cold floor),
  then ``llama_state_seq_get_data`` into a private buffer (timed);
* ``exact()``: ``llama_state_seq_set_data`` of that buffer, drop the
  last cell, decode the last prompt token again, sample greedily: the time
  to first token of an exact hit with zero transport, zero lookup, zero I/O;
* ``exact_logits()``: the same restore, then sample from the logits kept
  with the snapshot (no decode at all): the floor of a cache that stores
  the last logits with each row, as erllama does;
* ``prefix(extension)``: the same restore, then prefill only the
  extension and sample: the floor of a longest-prefix hit.

Each timing is the median of ``repeats`` in-process repetitions.
"""

from __future__ import annotations

import statistics
from typing import Any

from . import Gen, Peer, model_path, now


class Floor(Peer):
    name = "floor"

    def __init__(self, *, n_ctx: int = 8192, n_threads: int = 2) -> None:
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.be: Any = None
        self._snap: Any = None
        self._snap_tokens: list[int] = []
        self.snapshot_s = 0.0
        self.snapshot_bytes = 0

    def start(self) -> None:
        from erllama.config import ContextOpts, ModelSpec
        from erllama.workers.llama import LlamaBackend

        spec = ModelSpec(
            id="floor",
            context_opts=ContextOpts(
                n_ctx=self.n_ctx, n_threads=self.n_threads, n_threads_batch=self.n_threads
            ),
        )
        self.be = LlamaBackend(
            spec, model_path(), fingerprint=b"\0" * 32, ctx_params_hash=b"\0" * 32
        )
        from erllama.workers.backend import SamplerOptions

        self._opts = SamplerOptions(temperature=0.0)

    def stop(self) -> None:
        if self.be is not None:
            self.be.close()
            self.be = None

    def _sample(self) -> int:
        s = self.be.new_sampler(0, self._opts)
        try:
            return int(s.sample())
        finally:
            s.close()

    def gen(self, tokens: list[int], n_tokens: int = 1) -> Gen:
        """A cold in-process prefill + greedy sampling (no transport at all)."""
        be = self.be
        be.seq_clear(0)
        t0 = now()
        be.prefill(0, tokens, 0)
        s = be.new_sampler(0, self._opts)
        out = [int(s.sample())]
        first = now() - t0
        pos = len(tokens)
        while len(out) < n_tokens and not be.is_eog(out[-1]):
            be.decode_one(0, out[-1], pos)
            pos += 1
            out.append(int(s.sample()))
        s.close()
        return Gen(first, now() - t0, out, "cold")

    def prepare(self, tokens: list[int]) -> float:
        """Cold prefill of ``tokens`` and a snapshot of the state; returns the prefill time."""
        be = self.be
        be.seq_clear(0)
        t0 = now()
        be.prefill(0, tokens, 0)
        cold = now() - t0
        t0 = now()
        self._snap = be.state_snapshot(0)
        self.snapshot_s = now() - t0
        self._logits = be.logits_snapshot()  # the prompt end's logits, stored with the state
        self.snapshot_bytes = len(self._snap)
        self._snap_tokens = list(tokens)
        return cold

    def exact(self, repeats: int = 5) -> float:
        """Median seconds of restore + replay of the last token + greedy sample."""
        be = self.be
        toks = self._snap_tokens
        n = len(toks)
        times = []
        for _ in range(repeats):
            be.seq_clear(0)
            t0 = now()
            be.state_restore(0, self._snap)
            be.seq_truncate(0, n - 1)
            be.decode_one(0, toks[-1], n - 1)
            self._sample()
            times.append(now() - t0)
        return statistics.median(times)

    def exact_logits(self, repeats: int = 5) -> float:
        """Median seconds of restore + greedy sample from logits stored with the state.

        What a cache that keeps the last logits with each row (erllama does) needs at least:
        no decode at all.
        """
        be = self.be
        times = []
        for _ in range(repeats):
            be.seq_clear(0)
            t0 = now()
            be.state_restore(0, self._snap)
            s = be.new_sampler(0, self._opts)
            be.sample_from_logits(s, self._logits)
            s.close()
            times.append(now() - t0)
        return statistics.median(times)

    def prefix(self, extension: list[int], repeats: int = 5) -> float:
        """Median seconds of restore + prefill of ``extension`` + greedy sample."""
        be = self.be
        n = len(self._snap_tokens)
        times = []
        for _ in range(repeats):
            be.seq_clear(0)
            t0 = now()
            be.state_restore(0, self._snap)
            be.prefill(0, extension, n)
            self._sample()
            times.append(now() - t0)
        return statistics.median(times)

    def restore_only(self, repeats: int = 5) -> float:
        """Median seconds of ``llama_state_seq_set_data`` alone."""
        be = self.be
        times = []
        for _ in range(repeats):
            be.seq_clear(0)
            t0 = now()
            be.state_restore(0, self._snap)
            times.append(now() - t0)
        return statistics.median(times)
