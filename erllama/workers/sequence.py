"""Sequence 0 and the cache: what the KV holds, how it is filled from the cache, how it is saved.

``KvState`` mirrors the backend's sequence 0 exactly (D27): every token the
engine prefills or decodes is appended, every truncation and restore is
applied, so ``tokens`` is always the key material of the live state.
``cached_upto`` is the longest prefix of ``tokens`` known to be in the cache
(a restored row, a save that landed); the trie matches any prefix of a row,
so a save shorter than that adds nothing.

``SeqCache.resolve`` (REFERENCE §8.3 with D7, D41 and the live KV):

1. live: the common prefix of the prompt with ``KvState.tokens``; when it
   covers all but at most one prompt token no lookup is made at all (this is
   what makes repeated turns cheap);
2. exact key of the full prompt; 3. ``parent_key`` (checkout waiting up to
   ``session_resume_wait_ms``, the row's tokens must be a prefix of the
   prompt); 4. the longest prefix from meta's trie (any length; a match shorter
   than ``max(32, row/4)`` is skipped, as llama.cpp does, since restoring a big
   state for a tiny gain loses). Each step must beat the live prefix; a failed
   step falls through to the next (D41 R), the last to cold.

A restore replaces the KV (``state_restore`` from the mapped payload, the pin
released in a ``finally``); then the sequence is truncated to the common
length and the last reused token is decoded again (the primer) so the logits
are fresh: ``common == len(prompt)`` -> keep ``N-1`` and prefill ``[last]``.

Saves: ``save_gated`` (cold rungs, continued frontiers: the caller applied
the policy), ``save_finish`` (gated by ``finish_fires``, key over exactly the
KV tokens), ``save_live`` (evict / shutdown, unconditional). A key already
known to exist is not snapshotted again (it still counts as landed). Nothing
is saved under an all-zero identity (D6).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence

from erllama.cache.keys import (
    FINGERPRINT_MODES,
    OTHER_QUANT_BYTE,
    PrefixHasher,
    make_key,
    quant_namespace,
)
from erllama.cache.kvc import KvcMeta, SaveReason
from erllama.cache.policy import continued_frontier, finish_fires, ladder_lengths
from erllama.config import ModelSpec, PolicyConfig
from erllama.protocol.tokens import pack_tokens
from erllama.workers.backend import ModelBackend
from erllama.workers.cachelink import Candidate, WorkerCache
from erllama.workers.request import Request
from erllama.workers.saver import SaveJob
from erllama.workers.slots import common_prefix

log = logging.getLogger(__name__)

MIN_PARTIAL_TOKENS = 32  # skip a longest-prefix match shorter than this ...
MIN_PARTIAL_RATIO = 4  # ... or than 1/4 of the row (llama.cpp's host cache rule)
LADDER_MAX_RUNGS = 4
WINDOW_ROW_PROBES = 6  # aligned prefix rows tried by key when rows hold only the window
KNOWN_KEYS_MAX = 4096
_ZERO32 = bytes(32)


class KvState:
    """What sequence 0 holds (see the module docstring).

    ``logits_at[n]`` keeps the logits after ``tokens[:n]`` (taken when a prompt
    finished prefilling, or restored with a row): a later request whose prompt is
    exactly ``tokens[:n]`` samples from them instead of re-decoding its last token.
    ``fresh`` says the backend's current logits belong to the end of ``tokens``.
    ``floor``: the sequence may not be truncated below this (the length of a restored
    row that holds only the sliding window's cells, ``BackendInfo.partial_restore_exact``).
    """

    MAX_LOGITS = 4

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.cached_upto = 0
        self.session: str | None = None
        self.logits_at: dict[int, bytes] = {}
        self.fresh = False
        self.floor = 0

    def extend(self, tokens: Sequence[int]) -> None:
        self.tokens.extend(tokens)
        self.fresh = True

    def append(self, token: int) -> None:
        self.tokens.append(token)
        self.fresh = True

    def truncate(self, n: int) -> None:
        if n < len(self.tokens):
            self.fresh = False
        del self.tokens[n:]
        self.cached_upto = min(self.cached_upto, n)
        for k in [k for k in self.logits_at if k > n]:
            del self.logits_at[k]

    def clear(self) -> None:
        self.tokens = []
        self.cached_upto = 0
        self.session = None
        self.logits_at = {}
        self.fresh = False
        self.floor = 0

    def restored(
        self, tokens: Sequence[int], logits: bytes | None = None, *, floor: int = 0
    ) -> None:
        self.floor = floor
        self.tokens = list(tokens)
        self.cached_upto = len(self.tokens)
        self.session = None
        self.logits_at = {len(self.tokens): logits} if logits else {}
        self.fresh = False

    def remember_logits(self, n: int, logits: bytes) -> None:
        self.logits_at[n] = logits
        while len(self.logits_at) > self.MAX_LOGITS:
            del self.logits_at[min(self.logits_at)]

    def saved(self, n: int) -> None:
        self.cached_upto = max(self.cached_upto, n)


class KnownKeys:
    """Keys known to be in the cache (restored from, or saved by us): a bounded LRU."""

    def __init__(self, maxlen: int = KNOWN_KEYS_MAX) -> None:
        self._lock = threading.Lock()
        self._keys: OrderedDict[bytes, None] = OrderedDict()
        self._max = maxlen

    def add(self, key: bytes) -> None:
        with self._lock:
            self._keys[key] = None
            self._keys.move_to_end(key)
            while len(self._keys) > self._max:
                self._keys.popitem(last=False)

    def discard(self, key: bytes) -> None:
        with self._lock:
            self._keys.pop(key, None)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._keys


class SeqCache:
    """Cache resolution and saves of sequence 0 (see the module docstring)."""

    def __init__(
        self,
        backend: ModelBackend,
        cache: WorkerCache,
        spec: ModelSpec,
        policy: PolicyConfig,
        kv: KvState,
        *,
        hostname: bytes = b"",
        version: bytes = b"",
    ) -> None:
        info = backend.info
        self.backend = backend
        self.cache = cache
        self.policy = policy
        self.kv = kv
        self._quant_type = info.quant_type
        self.ns = (*quant_namespace(info.fingerprint, info.quant_type), bytes(info.ctx_params_hash))
        if self.ns[1] == OTHER_QUANT_BYTE:
            log.info(
                "event=quant_outside_table quant=%s: keyed under byte %d with the name in the "
                "fingerprint",
                info.quant_type,
                OTHER_QUANT_BYTE,
            )
        self._hasher = PrefixHasher(*self.ns)
        self._fp_mode = FINGERPRINT_MODES.get(spec.fingerprint_mode, 0)
        self._quant_bits = info.quant_bits
        self._context_size = spec.context_size or info.n_ctx
        self._state_format = backend.state_format
        self._hostname = hostname or socket.gethostname().encode()
        self._version = version
        self.identity_ok = bytes(info.fingerprint) != _ZERO32 and self.ns[2] != _ZERO32
        self.known = KnownKeys()
        self._counters: Counter[str] = Counter()

    # ================================================================ resolution
    def resolve(self, req: Request) -> int:
        """Fill sequence 0 for ``req.prompt`` as cheaply as possible; the prefill start."""
        prompt = req.prompt
        n = len(prompt)
        live = common_prefix(self.kv.tokens, prompt)
        if live < min(n, MIN_PARTIAL_TOKENS):
            # a few shared tokens (a BOS) are not worth keeping: their KV came from another
            # prompt's batch, and a cold run must not depend on what ran before it
            live = 0
        elif self._start(live, n, n in self.kv.logits_at) < self.kv.floor:
            live = 0  # it would truncate a window-only restored row
        found: tuple[int, str] | None = None
        if live < n - 1:
            t0 = time.perf_counter_ns()
            found = self._lookup(req, live)
            req.counters["load_total_ns"] += time.perf_counter_ns() - t0
        sticky = False
        if found is not None:
            common, counter = found
            req.counters[counter] += 1
        elif live > 0:
            common = live
            req.counters["hits_live"] += 1
            sticky = req.session_id is not None and req.session_id == self.kv.session
        else:
            common = 0
            req.counters["misses"] += 1
        align = self.backend.info.reuse_align
        if 0 < common < n and common % align:
            # keep only whole blocks (BackendInfo.reuse_align): the rows at the end of a
            # ragged batch took the kernel's remainder path; re-prefill them with the rest
            common -= common % align
        req.read = common
        if sticky:
            req.kind = "sticky"
        else:
            req.kind = "exact" if common == n else "partial" if common else "cold"
        logits = self.kv.logits_at.get(n) if common == n else None
        start = self._start(common, n, logits is not None)
        if start == n:
            # stored logits of the prompt's end: sample from them, no primer decode
            # (bit-exact with the cold run, and ~20 ms faster on the real model)
            req.first_logits = logits
        cached = min(self.kv.cached_upto, common)
        if start == 0:
            self.backend.seq_clear(0)
            self.kv.clear()
        elif len(self.kv.tokens) > start:
            self.backend.seq_truncate(0, start)
            self.kv.truncate(start)
            # the primer decodes the very token it dropped: what was cached stays cached
            self.kv.cached_upto = cached
        req.last_save_at = cached
        log.debug(
            "event=resolve request=%s kind=%s common=%d live=%d prompt=%d",
            req.request_id,
            req.kind,
            common,
            live,
            n,
        )
        return start

    def _start(self, common: int, n: int, have_logits: bool) -> int:
        """Where the prefill starts when ``common`` of ``n`` prompt tokens are reused.

        Stored logits of the whole prompt: ``n``. Else at least ``prefill_tail_min``
        tokens are prefilled again (1 on a one-sequence context: the primer).
        """
        if common >= n and have_logits:
            return n
        return max(0, min(common, n - self.backend.info.prefill_tail_min))

    def _lookup(self, req: Request, live: int) -> tuple[int, str] | None:
        """Steps 2-4; ``live`` is the floor a row must beat (in prefill start terms)."""
        prompt = req.prompt
        n = len(prompt)
        cand = self.cache.checkout(make_key(*self.ns, prompt))
        if cand is not None and self._restore(cand, prompt, live, need_prefix=True) == n:
            return n, "hits_exact"
        if req.parent_key is not None:
            cand = self.cache.checkout(req.parent_key, wait_ms=self.policy.session_resume_wait_ms)
            if cand is not None:
                common = self._restore(cand, prompt, live, need_prefix=True)
                if common:
                    return common, "hits_resume"
        min_len = max(live + 1, MIN_PARTIAL_TOKENS)
        if not self.backend.info.partial_restore_exact:
            return self._lookup_window_rows(prompt, live, min_len)
        cand = self.cache.checkout_longest(self.ns, prompt, min_len=min_len)
        if cand is not None:
            if cand.match_len * MIN_PARTIAL_RATIO < cand.n_tokens or cand.match_len < min_len:
                self.cache.checkin(cand)
                return None
            common = self._restore(cand, prompt, live, need_prefix=False)
            if common:
                return common, "hits_longest_prefix"
        return None

    def _lookup_window_rows(
        self, prompt: list[int], live: int, min_len: int
    ) -> tuple[int, str] | None:
        """Step 4 when rows hold only the sliding window (``partial_restore_exact`` off).

        Such a row cannot be truncated, so only a row that is a prefix of the prompt and
        ends at least ``prefill_tail_min`` tokens before it serves. The trie gives the
        longest match; the rows at the aligned lengths below it (the checkpoint ladder's
        and continued saves' lengths) are tried by key, longest first, a few at most.
        """
        n = len(prompt)
        match = self.cache.longest_prefix_len(self.ns, prompt, min_len=min_len)
        align = max(1, self.policy.boundary_align_tokens)
        length = min(match, n - self.backend.info.prefill_tail_min)
        length -= length % align
        for _ in range(WINDOW_ROW_PROBES):
            if length < min_len:
                return None
            cand = self.cache.checkout(make_key(*self.ns, prompt[:length]))
            if cand is not None and self._restore(cand, prompt, live, need_prefix=True):
                return length, "hits_longest_prefix"
            length -= align
        return None

    def _restore(self, cand: Candidate, prompt: list[int], live: int, *, need_prefix: bool) -> int:
        """Load and restore a pinned row if it beats ``live``; the common length or 0."""
        n = len(prompt)
        try:
            if cand.n_tokens <= live or (need_prefix and cand.n_tokens > n):
                return 0
            loaded = self.cache.load(cand)
            if loaded is None:
                return 0
            try:
                row = loaded.tokens
                common = common_prefix(row, prompt)
                if need_prefix and common != len(row):
                    return 0
                if min(common, n - 1) <= live:  # no better than the live KV after the primer
                    return 0
                window_only = not self.backend.info.partial_restore_exact
                if window_only and self._start(common, n, loaded.logits is not None) != len(row):
                    return 0  # a window-only row serves only what continues it, unshortened
                self.backend.seq_clear(0)
                self.kv.clear()
                try:
                    self.backend.state_restore(0, loaded.payload)
                except ValueError as exc:
                    log.warning("event=restore_rejected key=%s: %s", cand.key.hex()[:16], exc)
                    self.backend.seq_clear(0)
                    self.cache.report_corrupt(cand.key, "restore_rejected")
                    return 0
                self.kv.restored(row, loaded.logits, floor=len(row) if window_only else 0)
                self.known.add(cand.key)
                return common
            finally:
                loaded.close()
        finally:
            self.cache.checkin(cand)

    def ladder(self, req: Request, start: int) -> list[int]:
        """The cold-save rungs this prefill crosses that are not cached yet."""
        floor = max(start, req.last_save_at)
        return [
            r for r in ladder_lengths(len(req.prompt), self.policy, LADDER_MAX_RUNGS) if r > floor
        ]

    def cached_prefix_len(self, tokens: Sequence[int]) -> int:
        """``list_cached_prefixes`` with the model's own policy minimum (D24 R)."""
        if not tokens:
            return 0
        return self.cache.longest_prefix_len(
            self.ns, tokens, min_len=max(1, self.policy.min_tokens)
        )

    def clear_kv(self) -> None:
        self.backend.seq_clear(0)
        self.kv.clear()

    def set_fingerprint(self, fingerprint: bytes) -> None:
        """Key every later lookup and save under ``fingerprint``: the effective one when LoRA
        adapters are attached (REFERENCE §3.3), so their rows never serve another set.

        ``identity_ok`` stays that of the base identity (an all-zero base is never saved).
        A quant outside the §3.2 table is folded into it as at start (``quant_namespace``).
        """
        self.ns = (*quant_namespace(fingerprint, self._quant_type), self.ns[2])
        self._hasher = PrefixHasher(*self.ns)

    # ================================================================ saves
    def prompt_end_due(self, req: Request, start: int) -> bool:
        """Save the row of exactly the prompt when it cost a real prefill (>= min_tokens)."""
        p = self.policy
        n = len(req.prompt)
        return p.saves_enabled and n - start >= p.min_tokens and req.last_save_at < n

    def continued_due(self, req: Request) -> bool:
        live = len(self.kv.tokens)
        return continued_frontier(live, req.last_save_at, self.policy) == live

    def save_gated(self, req: Request, reason: SaveReason) -> None:
        """A cold rung or a continued frontier: save the live state as it is now."""
        n = len(self.kv.tokens)
        if self._save(make_key(*self.ns, self.kv.tokens), reason, req.counters)[0]:
            req.created = max(req.created, n - req.read)
            req.last_save_at = n
            self.kv.saved(n)

    def save_finish(self, req: Request) -> bytes | None:
        """The finish save; its key when it landed or was queued, else None."""
        n = len(self.kv.tokens)
        if not finish_fires(n, self.policy):
            return None
        key = make_key(*self.ns, self.kv.tokens)
        if req.kind != "cold" and key not in self.known and self.cache.contains(key):
            # a warm request may well end where an earlier one did: skip the snapshot
            self.known.add(key)
        if not self._save(key, SaveReason.FINISH, req.counters)[0]:
            return None
        req.created = max(req.created, n - req.read)
        self.kv.saved(n)
        return key

    def save_live(self, reason: SaveReason, *, unconditional: bool) -> SaveJob | None:
        """Evict / shutdown save of the whole live sequence; the job to wait on, if queued."""
        if not self.kv.tokens:
            return None
        key = make_key(*self.ns, self.kv.tokens)
        landed, job = self._save(key, reason, self._counters, unconditional=unconditional)
        if landed:
            self.kv.saved(len(self.kv.tokens))
        return job

    def _save(
        self,
        key: bytes,
        reason: SaveReason,
        counters: Counter[str],
        *,
        unconditional: bool = False,
    ) -> tuple[bool, SaveJob | None]:
        """Snapshot and queue. ``(landed_or_queued, job)``."""
        if not self.identity_ok:
            return False, None
        if not unconditional and key in self.known:
            return True, None
        t0 = time.perf_counter_ns()
        payload = self.backend.state_snapshot(0)
        logits_tail = 0
        if self.kv.fresh:
            # the logits after the last token travel with the state (TLV 0x81)
            logits = self.backend.logits_snapshot()
            logits_tail = len(logits)
            if isinstance(payload, bytearray):
                payload.extend(logits)  # realloc in place (mremap), not a copy of the state
            else:
                payload = bytes(payload) + logits
        counters["pack_total_ns"] += time.perf_counter_ns() - t0
        now = int(time.time())
        meta = KvcMeta(
            save_reason=reason,
            quant_bits=self._quant_bits,
            context_size=self._context_size,
            fingerprint=self.ns[0],
            fingerprint_mode=self._fp_mode,
            quant=self.ns[1],
            ctx_hash=self.ns[2],
            tokens=pack_tokens(self.kv.tokens),
            hostname=self._hostname,
            version=self._version,
            creation_time=now,
            last_used_time=now,
            state_format=self._state_format,
            logits_tail=logits_tail,
        )
        job = SaveJob(key=key, meta=meta, payload=payload)
        res = self.cache.submit_save(job)
        if res.dropped:
            counters["saves_dropped"] += res.dropped
        if not res.accepted:
            return False, None
        counters["saves_queued"] += 1
        self.known.add(key)
        return True, job

    def on_save_done(self, job: SaveJob) -> None:
        """Saver thread: a job that did not land is not known after all."""
        if not job.landed:
            self.known.discard(job.key)

    def count(self, name: str, n: int = 1) -> None:
        """Add to a counter (sent with the next ``send_counters``)."""
        self._counters[name] += n

    def send_counters(self, extra: Mapping[str, int] | None = None) -> None:
        deltas = Counter(self._counters)
        if extra:
            deltas.update(extra)
        self._counters.clear()
        out = {k: v for k, v in deltas.items() if v}
        if out:
            self.cache.add_counters(out)
