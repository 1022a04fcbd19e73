"""The shared remote tier's decisions and its row codec (pure: no sockets, no redis, no clock).

The remote tier keeps copies of published rows in a Redis-protocol store (Valkey or
Redis) that several daemons share. Meta owns it; ``remote_io`` does the network and
file work on two threads and hands results back to meta's loop. Everything that is a
decision lives here, so it is unit-testable without a server:

* **Store layout.** A row is its KVC file, byte for byte, cut into chunks of
  ``chunk_bytes``. ``<prefix>m:<hex key>`` holds the manifest (magic, version,
  file size, chunk size, a random generation and the CRC32C of every chunk); the
  chunks are ``<prefix>c:<hex key>:<generation>:<i>``. An upload writes the chunks
  first and the manifest last in one pipeline, so a half-written row has no manifest
  and is a miss; the generation keeps two uploads of one key (two daemons, different
  header bytes) from mixing chunks. The store's own eviction (maxmemory policy, the
  TTL every key gets) bounds it: a manifest whose chunk was evicted is a miss, and the
  fetcher deletes it.
* **Verification on fetch** (``verify_chunks``): every chunk present, of the
  manifest's size, with its CRC32C; the chunks are then written out as the row file
  and that file gets the KVC full validation (payload CRC and key replay from the
  row's metadata) with the key asked for, before it is linked into the tier. Rows are
  content-addressed by the cache key (fingerprint || quant || ctx hash || tokens), so
  a row of another model, quantisation or context never matches: its metadata does
  not re-derive the key.
* **Probe plan** (``probe_plan``): after the local tiers miss, the prompt's own length
  and its prefixes at the save alignments (the checkpoint ladder, continued saves),
  longer than what the local index already offers, longest first, capped.
* **Prefix pointers** (``pointer_lengths``, ``lookup_plan``): rows of any length (a
  finish row: prompt + reply) are found by a longer prompt through small pointer keys.
  An upload also writes ``<prefix>p:<hex key of T[:b]>`` -> (row key, row length) for
  the row's prefixes ``b`` at multiples of ``POINTER_ALIGN`` (its longest
  ``MAX_ROW_POINTERS``; last writer wins, same TTL). A lookup asks for the pointers of
  the prompt's aligned prefixes in the same round trip as the exact keys
  (``MAX_PROBE_POINTERS`` at most), longest first; a pointer at ``b`` guarantees a
  common prefix of ``b`` and sorts before an exact row of length ``b``. A pointer to a
  row that is gone, or to a row that does not start with ``T[:b]``, is a miss and is
  deleted.
* **Write-behind queue** (``UploadQueue``): published rows wait here for the upload
  thread; bounded in rows and bytes, the oldest goes first on overflow (a row waiting
  that long is the least likely to be asked for).
* **Breaker** (``Breaker``): after a failed call the store is ``down``; lookups skip
  it (a miss at once) until the back-off passes, then one lookup tries it again.
* **Hand-off values** (``LookupJob``, ``LookupDone``, ``UploadDone``) between meta's
  loop and ``remote_io``'s threads, here so that meta needs the redis client only
  when a remote tier is configured.

Alternatives turned down: one key per row (a 40 MB value blocks a single-threaded
store for its transfer, and ``proto-max-bulk-len`` caps it), a Redis hash per row
(chunks of one hash cannot be evicted apart, but neither can they be given a TTL or
fetched without copying the whole hash) and an index of rows in the store (a second
source of truth that eviction does not keep in sync).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from erllama.cache.kvc import KvcMeta, crc32c

MANIFEST_MAGIC = b"ERLR"
MANIFEST_VERSION = 1
GEN_BYTES = 8
_HEAD = struct.Struct("<4sBxxxQII8s")  # magic, version, file size, chunk bytes, chunks, gen
MAX_CHUNKS = 1 << 16

BREAKER_MIN_S = 0.5
BREAKER_MAX_S = 30.0


class RemoteRowError(ValueError):
    """A remote row failed verification; ``code`` is a stable snake_case string:
    ``bad_manifest``, ``missing_chunk``, ``truncated``, ``crc_mismatch``."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code


# ================================================================ store keys
def manifest_key(prefix: str, key: bytes) -> str:
    return f"{prefix}m:{key.hex()}"


def chunk_key(prefix: str, key: bytes, gen: bytes, i: int) -> str:
    return f"{prefix}c:{key.hex()}:{gen.hex()}:{i}"


# ================================================================ manifest
@dataclass(frozen=True, slots=True)
class Manifest:
    size: int
    chunk_bytes: int
    gen: bytes
    crcs: tuple[int, ...]

    @property
    def n_chunks(self) -> int:
        return len(self.crcs)

    def chunk_len(self, i: int) -> int:
        """The length chunk ``i`` must have."""
        if i < self.n_chunks - 1:
            return self.chunk_bytes
        return self.size - self.chunk_bytes * (self.n_chunks - 1)


def n_chunks_for(size: int, chunk_bytes: int) -> int:
    return max(1, -(-size // chunk_bytes))


def encode_manifest(m: Manifest) -> bytes:
    head = _HEAD.pack(MANIFEST_MAGIC, MANIFEST_VERSION, m.size, m.chunk_bytes, m.n_chunks, m.gen)
    return head + struct.pack(f"<{m.n_chunks}I", *m.crcs)


def decode_manifest(raw: bytes) -> Manifest:
    """Parse and check a manifest (its shape only; the chunks by ``verify_chunks``).

    Raises:
        RemoteRowError: ``bad_manifest``.
    """
    if len(raw) < _HEAD.size:
        raise RemoteRowError("bad_manifest", f"{len(raw)} bytes")
    magic, version, size, chunk_bytes, n, gen = _HEAD.unpack_from(raw)
    if magic != MANIFEST_MAGIC or version != MANIFEST_VERSION:
        raise RemoteRowError("bad_manifest", f"magic {magic!r} version {version}")
    if size <= 0 or chunk_bytes <= 0 or not 0 < n <= MAX_CHUNKS:
        raise RemoteRowError("bad_manifest", f"size {size} chunk {chunk_bytes} chunks {n}")
    if n != n_chunks_for(size, chunk_bytes) or len(raw) != _HEAD.size + 4 * n:
        raise RemoteRowError("bad_manifest", "chunk count does not match the size")
    crcs = struct.unpack_from(f"<{n}I", raw, _HEAD.size)
    return Manifest(size=size, chunk_bytes=chunk_bytes, gen=gen, crcs=crcs)


def split_row(
    blob: bytes | memoryview, chunk_bytes: int, gen: bytes
) -> tuple[Manifest, list[memoryview]]:
    """Cut a row file into chunks (views, no copy) and build its manifest."""
    if chunk_bytes <= 0 or len(gen) != GEN_BYTES:
        raise ValueError("chunk_bytes must be > 0 and gen 8 bytes")
    view = memoryview(blob).cast("B")
    n = n_chunks_for(view.nbytes, chunk_bytes)
    if view.nbytes == 0 or n > MAX_CHUNKS:
        raise ValueError(f"cannot chunk {view.nbytes} bytes in {chunk_bytes}-byte chunks")
    chunks = [view[i * chunk_bytes : (i + 1) * chunk_bytes] for i in range(n)]
    crcs = tuple(crc32c(c) for c in chunks)
    return Manifest(size=view.nbytes, chunk_bytes=chunk_bytes, gen=gen, crcs=crcs), chunks


def verify_chunks(m: Manifest, chunks: Sequence[bytes | None]) -> list[bytes]:
    """Check every fetched chunk against the manifest; the chunks, in order, to write out.

    Raises:
        RemoteRowError: ``missing_chunk`` (evicted or never written), ``truncated`` (a
            chunk of the wrong length), ``crc_mismatch``.
    """
    if len(chunks) != m.n_chunks:
        raise RemoteRowError("missing_chunk", f"{len(chunks)} of {m.n_chunks} chunks")
    out: list[bytes] = []
    for i, chunk in enumerate(chunks):
        if chunk is None:
            raise RemoteRowError("missing_chunk", f"chunk {i} of {m.n_chunks}")
        if len(chunk) != m.chunk_len(i):
            raise RemoteRowError("truncated", f"chunk {i}: {len(chunk)} != {m.chunk_len(i)}")
        if crc32c(chunk) != m.crcs[i]:
            raise RemoteRowError("crc_mismatch", f"chunk {i}")
        out.append(chunk)
    return out


# ================================================================ probe plan
def probe_plan(
    n_tokens: int,
    local_common: int,
    min_len: int,
    aligns: Iterable[int],
    max_keys: int,
) -> list[int]:
    """The prefix lengths whose keys a remote lookup asks for, longest first.

    Args:
        n_tokens: the prompt's length (its own row is the first candidate).
        local_common: what the local index already shares with the prompt; a remote
            row must be longer to be worth a fetch.
        min_len: the caller's floor (``longest_prefix_checkout``'s ``min_len``).
        aligns: the lengths saves land on multiples of (``boundary_align_tokens``,
            ``continued_interval``); non-positive values are ignored.
        max_keys: the cap on keys in the probe (one round trip either way).

    Returns:
        An empty list when no remote row could beat the local one.
    """
    floor = max(local_common + 1, min_len, 1)
    if n_tokens < floor or max_keys <= 0:
        return []
    lengths = {n_tokens}
    for a in set(aligns):
        if a <= 0:
            continue
        top = n_tokens - n_tokens % a
        lengths.update(range(top, floor - 1, -a))
    return sorted((x for x in lengths if x >= floor), reverse=True)[:max_keys]


# ================================================================ prefix pointers
POINTER_ALIGN = 256
MAX_ROW_POINTERS = 32  # per uploaded row: its longest aligned prefixes (8192 tokens of reach)
MAX_PROBE_POINTERS = 16  # per lookup, on top of the exact keys (max_probe_keys)
_POINTER = struct.Struct("<32sI")  # the row's key, its length in tokens


def pointer_key(prefix: str, key: bytes) -> str:
    """The pointer filed under the key of a prefix ``T[:b]``."""
    return f"{prefix}p:{key.hex()}"


def encode_pointer(row_key: bytes, n_tokens: int) -> bytes:
    return _POINTER.pack(row_key, n_tokens)


def decode_pointer(raw: bytes) -> tuple[bytes, int]:
    """``(row key, row length)``.

    Raises:
        RemoteRowError: ``bad_pointer``.
    """
    if len(raw) != _POINTER.size:
        raise RemoteRowError("bad_pointer", f"{len(raw)} bytes")
    key, n = _POINTER.unpack(raw)
    if n <= 0:
        raise RemoteRowError("bad_pointer", f"length {n}")
    return key, n


def pointer_lengths(
    n_tokens: int, floor: int = 1, align: int = POINTER_ALIGN, max_keys: int = MAX_ROW_POINTERS
) -> list[int]:
    """The multiples of ``align`` in ``floor..n_tokens``, longest first, at most ``max_keys``.

    For an upload: the prefixes of a row of ``n_tokens`` that get a pointer to it. For
    a lookup: the prefixes of the prompt whose pointers are asked for.
    """
    if align <= 0 or max_keys <= 0:
        return []
    top = n_tokens - n_tokens % align
    bottom = max(floor, align)
    return list(range(top, bottom - 1, -align))[:max_keys]


def lookup_plan(
    n_tokens: int,
    local_common: int,
    min_len: int,
    aligns: Iterable[int],
    max_keys: int,
    max_pointers: int = MAX_PROBE_POINTERS,
) -> list[tuple[int, bool]]:
    """A lookup's probes as ``(prefix length, is a pointer)``, best first.

    The exact keys of ``probe_plan`` and the pointers of the prompt's
    ``POINTER_ALIGN``-aligned prefixes past the same floor, by the common prefix each
    guarantees (its length), a pointer first on a tie (its row is at least as long).
    Empty when ``probe_plan`` is (no remote row could beat the local index).
    """
    exact = probe_plan(n_tokens, local_common, min_len, aligns, max_keys)
    if not exact:
        return []
    floor = max(local_common + 1, min_len, 1)
    ptrs = pointer_lengths(n_tokens, floor, POINTER_ALIGN, max_pointers)
    probes = [(n, False) for n in exact] + [(n, True) for n in ptrs]
    return sorted(probes, key=lambda p: (p[0], p[1]), reverse=True)


# ================================================================ write-behind queue
@dataclass(frozen=True, slots=True)
class Upload:
    """A published local row to copy to the store."""

    key: bytes
    path: str
    size: int


class UploadQueue:
    """Rows waiting for the upload thread, bounded by ``max_rows`` and ``max_bytes``.

    ``push`` never refuses: it drops the oldest queued rows until the new one fits
    (a row bigger than ``max_bytes`` on its own is dropped instead), and returns how
    many it dropped. A key already queued is not queued twice.
    """

    def __init__(self, max_rows: int, max_bytes: int) -> None:
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._q: deque[Upload] = deque()
        self._keys: set[bytes] = set()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._q)

    def push(self, job: Upload) -> int:
        if job.key in self._keys:
            return 0
        if job.size > self.max_bytes or self.max_rows <= 0:
            return 1
        dropped = 0
        while self._q and (len(self._q) >= self.max_rows or self.bytes + job.size > self.max_bytes):
            self._take()
            dropped += 1
        self._q.append(job)
        self._keys.add(job.key)
        self.bytes += job.size
        return dropped

    def push_front(self, job: Upload) -> None:
        """Put a job that could not be sent back at the head (a retry), if it still fits."""
        if job.key in self._keys or len(self._q) >= self.max_rows:
            return
        if self.bytes + job.size > self.max_bytes:
            return
        self._q.appendleft(job)
        self._keys.add(job.key)
        self.bytes += job.size

    def pop(self) -> Upload | None:
        return self._take() if self._q else None

    def _take(self) -> Upload:
        job = self._q.popleft()
        self._keys.discard(job.key)
        self.bytes -= job.size
        return job


# ================================================================ breaker
class Breaker:
    """Whether to talk to the store now: ``up``, or ``down`` until ``retry_at``.

    Times are monotonic seconds given by the caller. Each failure while down doubles
    the back-off from ``BREAKER_MIN_S`` to ``BREAKER_MAX_S``; a success resets it.
    ``failed`` and ``ok`` return True when the state changed (to log and count it).
    """

    def __init__(self, min_s: float = BREAKER_MIN_S, max_s: float = BREAKER_MAX_S) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self.down = False
        self.retry_at = 0.0
        self._backoff = 0.0

    def allow(self, now: float) -> bool:
        return not self.down or now >= self.retry_at

    def failed(self, now: float) -> bool:
        changed = not self.down
        self._backoff = self.min_s if changed else min(self.max_s, self._backoff * 2)
        self.down = True
        self.retry_at = now + self._backoff
        return changed

    def ok(self) -> bool:
        changed = self.down
        self.down = False
        self._backoff = 0.0
        return changed


# ================================================================ hand-off (remote_io -> meta)
@dataclass(frozen=True, slots=True)
class Probe:
    """One key a lookup asks for: a row's manifest, or (``pointer``) a prefix's pointer."""

    key: bytes  # the key of the prompt's first ``length`` tokens
    length: int
    pointer: bool = False


@dataclass(slots=True)
class LookupJob:
    waiter: int
    probes: list[Probe]  # best first (``lookup_plan``)
    deadline: float  # monotonic seconds: try no further candidate after it


@dataclass(slots=True)
class LookupDone:
    """``key`` set: the row was fetched, verified and placed at ``path`` (a hit)."""

    waiter: int
    key: bytes | None = None
    path: str = ""
    size: int = 0
    meta: KvcMeta | None = None
    bytes_down: int = 0
    fetch_ns: int = 0
    error: str = ""  # the store did not answer
    dropped: list[tuple[bytes, str]] = field(default_factory=list)  # (key, code) bad rows
    pointer: bool = False  # the row was found through a prefix pointer
    stale_pointers: int = 0  # pointers to a row gone or not ours (deleted)


@dataclass(slots=True)
class UploadDone:
    key: bytes
    status: Literal["uploaded", "present", "gone", "failed", "dropped"]
    bytes_up: int = 0
    error: str = ""
    state: Literal["", "down", "up"] = ""  # the uploader's view of the store changed


Done = LookupDone | UploadDone
