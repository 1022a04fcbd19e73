"""The remote tier's IO: the redis client (the only module that imports ``redis``) and its threads.

Owned by the meta process (``remote_meta``). Two threads, each with its own
connection, so an upload never delays a lookup a worker waits on:

* **fetcher**: runs ``LookupJob``s: one pipelined ``GET`` of the candidate manifests
  and prefix pointers (``remote.lookup_plan``, best first), then, for the first one
  present, the pointed row's manifest (a pointer: one more round trip) and its chunks; checks them
  (``remote.verify_chunks``), writes them as the row file into the promotion tier's
  directory (``demote.place_row``: temp file, KVC full validation with the key asked
  for, link to the key's final name) and reports ``LookupDone``. A row that fails verification
  is deleted from the store, reported, and the next candidate is tried.
* **uploader**: drains the write-behind ``remote.UploadQueue``: reads a published
  file, skips it when the store has the row already (``EXISTS`` on the manifest),
  else writes its chunks, then its manifest, then its prefix pointers
  (``remote.pointer_lengths``, keys from the row's own tokens) in one pipeline, each
  with the TTL.
  A store that does not answer puts the row back at the head and waits out a
  back-off (``remote.Breaker``); the queue's bounds drop the oldest rows meanwhile.
  When idle it reads ``INFO memory`` for ``status``.

Results go back to meta's loop as ``LookupDone`` / ``UploadDone`` in a deque plus a
byte on a pipe (``fd``), as ``demote.Demoter`` does; the loop owns every counter and
the index. Every redis error (refused, reset, timeout, protocol) becomes
``RemoteUnavailable`` at one boundary (``Store._call``); the connection is dropped
and made again by the next call.

Deadlines: ``timeout_ms`` is both the connect and the socket timeout of every call,
so a store that is down or stalls costs at most that per call; the loop answers a
parked lookup by its own deadline whatever the fetcher is doing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from erllama.cache.demote import place_row
from erllama.cache.handoff import Handoff
from erllama.cache.keys import PrefixHasher, make_key_packed
from erllama.cache.kvc import KvcError, KvcMeta, parse_metadata, read_metadata
from erllama.cache.remote import (
    Breaker,
    Done,
    LookupDone,
    LookupJob,
    Manifest,
    Probe,
    RemoteRowError,
    Upload,
    UploadDone,
    UploadQueue,
    chunk_key,
    decode_manifest,
    decode_pointer,
    encode_manifest,
    encode_pointer,
    manifest_key,
    pointer_key,
    pointer_lengths,
    split_row,
    verify_chunks,
)
from erllama.cache.tiers import TierLayout
from erllama.config import TierConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
JOIN_TIMEOUT_S = 5.0
STATS_INTERVAL_S = 10.0
MAX_UPLOAD_ATTEMPTS = 3
SOCKET_READ_BYTES = 1 << 20  # 38 MB rows: ~1.3x faster than redis-py's 64 KiB reads


class RemoteUnavailable(Exception):  # noqa: N818 - mirrors cache.client.MetaUnavailable
    """The store did not answer (down, refused, slow past ``timeout_ms``, or an error)."""


def redact(url: str) -> str:
    """The URL without its password (for logs and ``status``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class Store:
    """One connection to the store and the row operations on it (one thread uses it)."""

    def __init__(self, cfg: TierConfig) -> None:
        assert cfg.url is not None
        timeout = cfg.timeout_ms / 1000
        kwargs: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),  # the breaker paces reconnects, not the client
            "health_check_interval": 0,
            # a pool, not single_connection_client: that connects in the constructor, and a
            # store down when meta starts must be a miss, not a dead thread
            "max_connections": 1,
            "client_name": "erllama",
            "socket_read_size": SOCKET_READ_BYTES,
        }
        if cfg.password:
            kwargs["password"] = cfg.password
        self._r: redis.Redis = redis.Redis.from_url(cfg.url, **kwargs)
        self.prefix = cfg.key_prefix
        self.ttl_s = cfg.ttl_s
        self.chunk_bytes = cfg.chunk_bytes

    def _call(self, op: Callable[[], T]) -> T:
        try:
            return op()
        except redis.RedisError as exc:
            self._drop()  # a half-read reply must never meet the next request
            raise RemoteUnavailable(f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:
            self._drop()
            raise RemoteUnavailable(f"{type(exc).__name__}: {exc}") from None

    def _drop(self) -> None:
        """Close the connection; the next call makes a new one."""
        with contextlib.suppress(Exception):
            self._r.connection_pool.disconnect()

    def probe(self, probes: Sequence[Probe]) -> list[bytes | None]:
        """The manifests and pointers asked for (None where absent), in one round trip."""

        def op() -> list[bytes | None]:
            pipe = self._r.pipeline(transaction=False)
            for p in probes:
                pipe.get((pointer_key if p.pointer else manifest_key)(self.prefix, p.key))
            return list(pipe.execute())

        return self._call(op)

    def manifest(self, key: bytes) -> bytes | None:
        raw = self._call(lambda: self._r.get(manifest_key(self.prefix, key)))
        return raw if isinstance(raw, bytes) else None

    def delete_pointer(self, prefix_key: bytes) -> None:
        self._call(lambda: self._r.delete(pointer_key(self.prefix, prefix_key)))

    def chunks(self, key: bytes, m: Manifest) -> list[bytes | None]:
        def op() -> list[bytes | None]:
            pipe = self._r.pipeline(transaction=False)
            for i in range(m.n_chunks):
                pipe.get(chunk_key(self.prefix, key, m.gen, i))
            return list(pipe.execute())

        return self._call(op)

    def exists(self, key: bytes) -> bool:
        return bool(self._call(lambda: self._r.exists(manifest_key(self.prefix, key))))

    def put(
        self, key: bytes, blob: bytes | memoryview, pointers: Sequence[tuple[bytes, bytes]] = ()
    ) -> int:
        """Chunks first, then the manifest, then the ``(prefix key, pointer)``s, one
        pipeline; the bytes sent."""
        manifest, parts = split_row(blob, self.chunk_bytes, secrets.token_bytes(8))
        ex = self.ttl_s or None

        def op() -> None:
            pipe = self._r.pipeline(transaction=False)
            for i, part in enumerate(parts):
                pipe.set(chunk_key(self.prefix, key, manifest.gen, i), part, ex=ex)
            pipe.set(manifest_key(self.prefix, key), encode_manifest(manifest), ex=ex)
            for prefix_key, value in pointers:
                pipe.set(pointer_key(self.prefix, prefix_key), value, ex=ex)
            pipe.execute()

        self._call(op)
        return manifest.size

    def delete(self, key: bytes, m: Manifest | None) -> None:
        names = [manifest_key(self.prefix, key)]
        if m is not None:
            names += [chunk_key(self.prefix, key, m.gen, i) for i in range(m.n_chunks)]
        self._call(lambda: self._r.delete(*names))

    def memory(self) -> tuple[int, int]:
        """``(used_memory, maxmemory)`` from ``INFO memory``."""
        info = self._call(lambda: self._r.info("memory"))
        return int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._r.close()


class RemoteIO:
    """The two threads and their hand-off to meta's loop (see the module docstring)."""

    def __init__(self, cfg: TierConfig, layout: TierLayout, promote_tier: str) -> None:
        self.cfg = cfg
        self.layout = layout
        self.promote_tier = promote_tier
        self.url = redact(cfg.url or "")
        self.used_bytes = 0
        self.max_bytes = 0
        self._lookups: queue.SimpleQueue[LookupJob | None] = queue.SimpleQueue()
        self._uploads = UploadQueue(cfg.upload_queue_rows, cfg.upload_queue_bytes)
        self._cv = threading.Condition()
        self._stopping = False
        self._done: Handoff[Done] = Handoff()
        self._threads = [
            threading.Thread(target=self._fetcher, name="remote-fetch", daemon=True),
            threading.Thread(target=self._uploader, name="remote-upload", daemon=True),
        ]
        for t in self._threads:
            t.start()

    @property
    def fd(self) -> int:
        return self._done.fd

    # ------------------------------------------------------------ loop side
    def lookup(self, job: LookupJob) -> None:
        self._lookups.put(job)

    def upload(self, job: Upload) -> int:
        """Queue a published row (never blocks); returns the rows the bounds dropped."""
        with self._cv:
            dropped = self._uploads.push(job)
            self._cv.notify()
        return dropped

    def take_done(self) -> list[Done]:
        return self._done.take()

    def close(self) -> None:
        """Stop both threads (a transfer in flight ends within ``timeout_ms``)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._lookups.put(None)
        for t in self._threads:
            t.join(JOIN_TIMEOUT_S)
        self._done.close()

    def _report(self, item: Done) -> None:
        self._done.put(item)

    # ------------------------------------------------------------ fetcher
    def _fetcher(self) -> None:
        store = Store(self.cfg)
        try:
            while (job := self._lookups.get()) is not None:
                t0 = time.perf_counter_ns()
                try:
                    done = self._lookup(store, job)
                except RemoteUnavailable as exc:
                    done = LookupDone(job.waiter, error=str(exc))
                except Exception as exc:  # a bug: the lookup is a miss, the thread lives
                    log.exception("event=remote_lookup_failed")
                    done = LookupDone(job.waiter, error=repr(exc))
                done.fetch_ns = time.perf_counter_ns() - t0
                self._report(done)
        finally:
            store.close()

    def _lookup(self, store: Store, job: LookupJob) -> LookupDone:
        done = LookupDone(job.waiter)
        raws = store.probe(job.probes)
        tried: set[bytes] = set()
        for probe, raw in zip(job.probes, raws, strict=True):
            if raw is None:
                continue
            if time.monotonic() >= job.deadline:
                break
            key = probe.key
            if probe.pointer:
                followed = self._follow(store, probe, raw, tried, done)
                if followed is None:
                    continue
                key, raw = followed
            tried.add(key)
            manifest: Manifest | None = None
            try:
                manifest = decode_manifest(raw)
                chunks = store.chunks(key, manifest)
                done.bytes_down += sum(len(c) for c in chunks if c is not None)
                parts = verify_chunks(manifest, chunks)
                path = place_row(self.layout, self.promote_tier, key, parts)
                meta = read_metadata(path).meta
            except (RemoteRowError, KvcError) as exc:
                log.warning("event=remote_row_dropped key=%s reason=%s", key.hex()[:16], exc)
                done.dropped.append((key, exc.code))
                with contextlib.suppress(RemoteUnavailable):
                    store.delete(key, manifest)
                continue
            except OSError as exc:
                log.warning("event=remote_place_failed key=%s reason=%s", key.hex()[:16], exc)
                return done
            if probe.pointer and not _starts_with(meta, probe):
                log.warning("event=remote_pointer_stale key=%s (not a prefix)", key.hex()[:16])
                done.stale_pointers += 1
                with contextlib.suppress(OSError):
                    os.unlink(path)
                with contextlib.suppress(RemoteUnavailable):
                    store.delete_pointer(probe.key)
                continue
            done.key, done.path, done.size, done.meta = key, path, manifest.size, meta
            done.pointer = probe.pointer
            return done
        return done

    @staticmethod
    def _follow(
        store: Store, probe: Probe, raw: bytes, tried: set[bytes], done: LookupDone
    ) -> tuple[bytes, bytes] | None:
        """A pointer's row key and manifest; None when there is nothing to fetch
        (a row tried already, or a stale pointer: deleted and counted)."""
        try:
            key, n_tokens = decode_pointer(raw)
        except RemoteRowError:
            key, n_tokens = b"", 0
        if key in tried:
            return None
        manifest = store.manifest(key) if n_tokens >= probe.length else None
        if manifest is None:
            done.stale_pointers += 1
            with contextlib.suppress(RemoteUnavailable):
                store.delete_pointer(probe.key)
            return None
        return key, manifest

    # ------------------------------------------------------------ uploader
    def _next_upload(self, timeout: float) -> Upload | None:
        with self._cv:
            if not self._stopping and not len(self._uploads):
                self._cv.wait(timeout)
            return None if self._stopping else self._uploads.pop()

    def _uploader(self) -> None:
        store = Store(self.cfg)
        breaker = Breaker()
        attempts: dict[bytes, int] = {}
        next_stats = 0.0
        try:
            while True:
                now = time.monotonic()
                if breaker.down and now < breaker.retry_at:
                    with self._cv:
                        if not self._stopping:
                            self._cv.wait(breaker.retry_at - now)
                        if self._stopping:
                            return
                    continue
                job = self._next_upload(max(0.0, next_stats - now))  # 0: stats are due
                with self._cv:
                    if self._stopping:
                        return
                if job is None:
                    if time.monotonic() >= next_stats:
                        next_stats = time.monotonic() + STATS_INTERVAL_S
                        with contextlib.suppress(RemoteUnavailable):
                            self.used_bytes, self.max_bytes = store.memory()
                    continue
                try:
                    done = self._upload(store, job)
                except RemoteUnavailable as exc:
                    n = attempts.get(job.key, 0) + 1
                    status: Literal["failed", "dropped"] = "failed"
                    if n < MAX_UPLOAD_ATTEMPTS:
                        attempts[job.key] = n
                        with self._cv:
                            self._uploads.push_front(job)
                    else:
                        attempts.pop(job.key, None)
                        status = "dropped"
                    changed = breaker.failed(time.monotonic())
                    self._report(
                        UploadDone(job.key, status, error=str(exc), state="down" if changed else "")
                    )
                    continue
                attempts.pop(job.key, None)
                if breaker.ok():
                    done.state = "up"
                    attempts.clear()  # keys the queue bounds dropped meanwhile
                self._report(done)
                next_stats = 0.0 if done.status == "uploaded" else next_stats
        finally:
            store.close()

    def _upload(self, store: Store, job: Upload) -> UploadDone:
        if store.exists(job.key):
            return UploadDone(job.key, "present")
        try:
            with open(job.path, "rb") as f:
                blob = f.read()
        except OSError:  # evicted before its turn: nothing to copy
            return UploadDone(job.key, "gone")
        bytes_up = store.put(job.key, blob, _pointers(job.key, blob))
        return UploadDone(job.key, "uploaded", bytes_up=bytes_up)


def _pointers(key: bytes, blob: bytes) -> list[tuple[bytes, bytes]]:
    """The prefix pointers of a row file (none when its metadata does not parse)."""
    try:
        meta = parse_metadata(blob, len(blob)).meta
        lengths = pointer_lengths(meta.n_tokens)
        hasher = PrefixHasher(meta.fingerprint, meta.quant, meta.ctx_hash)
        keys = hasher.keys_at_packed(meta.tokens, lengths)
    except KvcError:
        return []
    value = encode_pointer(key, meta.n_tokens)
    return [(keys[n], value) for n in lengths]


def _starts_with(meta: KvcMeta, probe: Probe) -> bool:
    """Whether the row holds the prefix whose pointer led to it."""
    head = meta.tokens[: 4 * probe.length]
    return make_key_packed(meta.fingerprint, meta.quant, meta.ctx_hash, head) == probe.key
