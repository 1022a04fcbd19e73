"""Where cache files live and how they get there: tier layout, publish, load, scan.

No sockets of its own: ``publish`` talks to meta through a ``MetaClient`` the
caller owns (one per thread).

* ``TierLayout``: ``ram`` = ``/dev/shm/erllama-<daemon_id>/`` unless the tier
  config names a path; ``ram_file`` and ``disk`` = their configured paths (the
  ``remote`` tier is no directory and is left out: ``cache.remote_io``).
  Only ``disk`` is durable (fdatasync of the file, fsync of the directory).
* ``publish``: the writer side of REFERENCE §5 steps 3-8: reserve -> temp file
  ``<hex>.kvc.<writer-id>.<unique>.tmp`` (``O_CREAT|O_EXCL|O_WRONLY``) written
  with one ``os.writev([prefix, payload])`` (the payload is never copied) ->
  fdatasync (disk) -> check_reservation -> ``os.link`` to ``<hex>.kvc`` (first
  content wins; EEXIST -> fully validate the existing file: valid = adopt,
  invalid = delete it and link again once) -> unlink temp -> fsync directory
  (disk) -> re-validate -> mark_published -> announce_saved.
  Test hook: ``ERLLAMA_TEST_CRASH_AT=<stage>`` (after_reserve, after_write,
  after_check, after_link, after_mark) makes the writer ``os._exit(137)`` there.
* ``load_row``: map a file privately (``ACCESS_COPY``: a writable view without
  a copy, so ``ctypes.from_buffer`` works) and validate it fully.
* ``scan_tier``: the meta's startup scan (metadata only, no payload read).
* ``resolve_final``: the meta's cleanup of an abandoned reservation.

``os.replace`` was turned down for the final step: it is last-writer-wins,
while ``os.link`` gives create-if-absent, the contract §5 relies on.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import mmap
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from erllama.cache.kvc import KvcError, KvcMeta, build_prefix, read_metadata, validate_full
from erllama.config import TierConfig
from erllama.protocol.errors import ConflictError, ErllamaError, ErrorCode, TransportError

if TYPE_CHECKING:
    from erllama.cache.client import MetaClient

log = logging.getLogger(__name__)

CRASH_ENV = "ERLLAMA_TEST_CRASH_AT"
CRASH_STAGES = ("after_reserve", "after_write", "after_check", "after_link", "after_mark")
CRASH_EXIT_CODE = 137
SHM_ROOT = Path("/dev/shm")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")


def _crash_point(stage: str) -> None:
    """Fault-test hook: die here, like a SIGKILL, when the environment asks for it."""
    if os.environ.get(CRASH_ENV) == stage:
        log.warning("event=test_crash stage=%s", stage)
        os._exit(CRASH_EXIT_CODE)


class TierLayout:
    """The directory of each configured tier and its durability."""

    def __init__(self, tiers: Sequence[TierConfig], daemon_id: str) -> None:
        if not daemon_id or _UNSAFE.search(daemon_id) or "/" in daemon_id:
            raise ValueError(f"bad daemon id {daemon_id!r}")
        self._paths: dict[str, Path] = {}
        self.budgets: dict[str, int] = {}
        for t in tiers:
            if t.name == "remote":  # not a directory: cache/remote_io.py owns it
                continue
            if t.name in self._paths:
                raise ValueError(f"tier {t.name} configured twice")
            if t.path:
                path = Path(t.path)
            elif t.name == "ram":
                path = SHM_ROOT / f"erllama-{daemon_id}"
            else:
                raise ValueError(f"tier {t.name} needs a path")
            self._paths[t.name] = path
            self.budgets[t.name] = t.budget_bytes

    @property
    def tiers(self) -> list[str]:
        return list(self._paths)

    def path(self, tier: str) -> Path:
        """The tier's directory (KeyError when the tier is not configured)."""
        return self._paths[tier]

    def durable(self, tier: str) -> bool:
        """Whether writes to the tier are synced (file and directory)."""
        return tier == "disk"

    def final_path(self, tier: str, key: bytes) -> Path:
        return self._paths[tier] / f"{key.hex()}.kvc"

    def ensure(self) -> None:
        """Create every tier directory (mode 0700)."""
        for path in self._paths.values():
            path.mkdir(mode=0o700, parents=True, exist_ok=True)


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path | str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


# ================================================================ load
class LoadedRow:
    """A fully validated file, mapped privately. ``payload`` is a view into the map.

    ``close()`` releases the views and unmaps; anything built on the payload
    (a ctypes ``from_buffer`` array) must be dropped first, or close raises BufferError.
    """

    def __init__(self, mm: mmap.mmap, meta: KvcMeta, payload: memoryview, size: int) -> None:
        self._mm = mm
        self.meta = meta
        self.payload = payload
        self.size = size

    def close(self) -> None:
        self.payload.release()
        self._mm.close()

    def __enter__(self) -> LoadedRow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _map_validated(
    path: Path | str, expected_key: bytes | None, access: int
) -> tuple[mmap.mmap, KvcMeta, memoryview, int]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise KvcError("bad_header", "empty file")
        mm = mmap.mmap(fd, size, access=access)
    finally:
        os.close(fd)
    view = memoryview(mm)
    try:
        # the payload view keeps the map exported until it is released
        parsed, payload = validate_full(view, expected_key, file_size=size)
    except BaseException:
        view.release()
        mm.close()
        raise
    view.release()
    return mm, parsed.meta, payload, size


def load_row(path: str | Path, expected_key: bytes) -> LoadedRow:
    """Map ``path`` and validate it fully (framing, CRC32C, key replay).

    Raises:
        KvcError: the file is invalid (the caller reports it: ``report_corrupt``).
        OSError: the file cannot be opened (evicted meanwhile: treat as a miss).
    """
    mm, meta, payload, size = _map_validated(path, expected_key, mmap.ACCESS_COPY)
    return LoadedRow(mm, meta, payload, size)


def validate_file(path: Path | str, expected_key: bytes | None) -> tuple[int, KvcMeta]:
    """Full validation without keeping the map: ``(size, meta)``; KvcError/OSError if bad."""
    mm, meta, payload, size = _map_validated(path, expected_key, mmap.ACCESS_READ)
    payload.release()
    mm.close()
    return size, meta


# ================================================================ publish (§5 steps 3-8)
@dataclass(frozen=True, slots=True)
class PublishOutcome:
    """``fired`` (the row is published, or was adopted), ``already_present`` (counts as
    fired for the save policy) or ``dropped`` (``reason`` says why)."""

    status: Literal["fired", "already_present", "dropped"]
    size: int = 0
    reason: str = ""


def _write_all(fd: int, bufs: list[memoryview]) -> None:
    """``os.writev`` until every byte is written (short writes are possible, copies are not)."""
    pending = [b for b in bufs if b.nbytes]
    while pending:
        n = os.writev(fd, pending)
        while n and pending:
            head = pending[0]
            if n >= head.nbytes:
                n -= head.nbytes
                pending.pop(0)
            else:
                pending[0] = head[n:]
                n = 0


def _write_temp(tmp: Path, prefix: bytes, payload: memoryview, durable: bool) -> None:
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, [memoryview(prefix), payload])
        if durable:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def _link_final(tmp: Path, final: Path, key: bytes) -> tuple[int | None, bool]:
    """Link temp -> final. Returns ``(existing size, adopted)``; size None = our file."""
    try:
        os.link(tmp, final)
        return None, False
    except FileExistsError:
        pass
    try:
        size, _ = validate_file(final, key)
        log.info("event=publish_adopt key=%s size=%d", key.hex()[:16], size)
        return size, True
    except (KvcError, OSError) as exc:
        log.warning("event=publish_replace_invalid key=%s reason=%s", key.hex()[:16], exc)
    _unlink(final)
    os.link(tmp, final)  # FileExistsError again: give up (eexist)
    return None, False


def publish(
    meta: MetaClient,
    layout: TierLayout,
    tier: str,
    kvc: KvcMeta,
    payload: bytes | bytearray | memoryview,
    *,
    writer_id: str,
    verify: bool = True,
) -> PublishOutcome:
    """Save one row through the publish protocol. Never raises for I/O or meta trouble.

    Args:
        meta: this thread's MetaClient (its holder owns the reservation).
        layout: the tier layout.
        tier: the tier to write to.
        kvc: the row's metadata (its key is ``kvc.key()``).
        payload: the state bytes; written from this buffer, never copied.
        writer_id: part of the temp file name (sanitised), for humans.
        verify: re-read and fully validate the final file after the link (§5 step 6).
    """
    try:
        key = kvc.key()
        prefix = build_prefix(kvc, payload)
    except KvcError as exc:  # a row this code cannot write is a bug: say so
        log.warning("event=save_dropped reason=%s detail=%s", exc.code, exc.message)
        return PublishOutcome("dropped", reason=exc.code)
    view = memoryview(payload).cast("B")
    size = len(prefix) + view.nbytes
    try:
        token = meta.reserve(key, tier)
    except ConflictError as exc:
        if exc.code == ErrorCode.ALREADY_PRESENT:
            return PublishOutcome("already_present", reason="already_present")
        return PublishOutcome("dropped", reason=exc.code)
    except ErllamaError as exc:
        return PublishOutcome("dropped", reason=exc.code)
    _crash_point("after_reserve")

    durable = layout.durable(tier)
    root = layout.path(tier)
    final = layout.final_path(tier, key)
    tmp = root / f"{final.name}.{_UNSAFE.sub('_', writer_id)}.{secrets.token_hex(6)}.tmp"
    stage = "write"
    try:
        _write_temp(tmp, prefix, view, durable)
        _crash_point("after_write")
        stage = "check"
        meta.check_reservation(key, token)
        _crash_point("after_check")
        stage = "link"
        existing, adopted = _link_final(tmp, final, key)
        _crash_point("after_link")
        _unlink(tmp)
        if durable:
            fsync_dir(root)
        if existing is not None:
            size = existing
        elif verify:
            stage = "verify"
            validate_file(final, key)
    except (OSError, KvcError, ErllamaError) as exc:
        reason = _reason(exc)
        log.warning("event=publish_failed key=%s stage=%s reason=%s", key.hex()[:16], stage, reason)
        _unlink(tmp)
        if stage == "verify":
            _unlink(final)
        # an expired reservation is gone already; an unreachable meta would only make the
        # cancel wait out another timeout (its sweep or restart cleans up instead)
        gone = isinstance(exc, TransportError) or (
            isinstance(exc, ErllamaError) and exc.code == ErrorCode.EXPIRED
        )
        if not gone:
            with contextlib.suppress(ErllamaError):
                meta.cancel_reservation(key, token)
        return PublishOutcome("dropped", reason=reason)
    return _announce(meta, layout, tier, key, token, kvc, str(final), size, adopted)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ErllamaError | KvcError):
        return str(exc.code)
    if isinstance(exc, FileExistsError):
        return "eexist"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"os_error_{exc.errno}"
    return type(exc).__name__


def _announce(
    meta: MetaClient,
    layout: TierLayout,
    tier: str,
    key: bytes,
    token: int,
    kvc: KvcMeta,
    path: str,
    size: int,
    adopted: bool,
) -> PublishOutcome:
    """Steps 7-8. The file is complete at ``path``; failures here are non-fatal."""
    reason = "adopted" if adopted else ""
    try:
        meta.mark_published(key, token, path)
        _crash_point("after_mark")
        meta.announce_saved(key, token, size, kvc)
    except TransportError:
        # meta is down or slow: the file stays; a restart scan or the sweep adopts it
        return PublishOutcome("dropped", size, "meta_unavailable")
    except ErllamaError as exc:
        if exc.code != ErrorCode.EXPIRED:
            return PublishOutcome("dropped", size, str(exc.code))
        # our reservation was swept; the file is whole, so install it directly
        try:
            status = meta.insert_available(key, tier, path, size, kvc)
        except ErllamaError as exc2:
            return PublishOutcome("dropped", size, f"expired:{exc2.code}")
        return PublishOutcome("fired", size, f"expired:{status}")
    return PublishOutcome("fired", size, reason)


# ================================================================ meta side: scan, resolve
@dataclass(frozen=True, slots=True)
class ScannedRow:
    key: bytes
    tier: str
    path: str
    size: int
    meta: KvcMeta


@dataclass(slots=True)
class ScanReport:
    rows: list[ScannedRow] = field(default_factory=list)
    temps_deleted: int = 0
    invalid_deleted: list[tuple[str, str]] = field(default_factory=list)  # (name, code)
    renamed: int = 0
    duplicates_deleted: int = 0


def scan_tier(layout: TierLayout, tier: str) -> ScanReport:
    """Rebuild one tier's rows from file headers (REFERENCE §5 startup, D42).

    Deletes every ``*.tmp``; parses the metadata of every ``*.kvc`` (the payload is not
    read; its CRC is checked at load); takes the key from the TLVs; renames a file whose
    name is not its key (or deletes it when the right name is taken); deletes invalid files.
    """
    root = layout.path(tier)
    report = ScanReport()
    seen: set[bytes] = set()
    with os.scandir(root) as it:
        names = sorted(e.name for e in it if e.is_file(follow_symlinks=False))
    for name in names:
        path = root / name
        if name.endswith(".tmp"):
            report.temps_deleted += _unlink(path)
            continue
        if not name.endswith(".kvc"):
            continue
        try:
            parsed = read_metadata(path)
            key = parsed.meta.key()
            size = path.stat().st_size
        except (KvcError, OSError) as exc:
            code = exc.code if isinstance(exc, KvcError) else "unreadable"
            log.warning("event=scan_invalid tier=%s file=%s reason=%s", tier, name, exc)
            _unlink(path)
            report.invalid_deleted.append((name, code))
            continue
        final = layout.final_path(tier, key)
        if key in seen:
            _unlink(path)
            report.duplicates_deleted += 1
            continue
        if path != final:
            log.warning("event=scan_misnamed tier=%s file=%s key=%s", tier, name, key.hex())
            try:
                os.link(path, final)
                report.renamed += 1
            except FileExistsError:
                report.duplicates_deleted += 1
                _unlink(path)
                continue  # the right name exists: it is (or will be) scanned on its own
            _unlink(path)
        seen.add(key)
        report.rows.append(ScannedRow(key, tier, str(final), size, parsed.meta))
    if layout.durable(tier) and (report.renamed or report.temps_deleted or report.invalid_deleted):
        fsync_dir(root)
    return report


@dataclass(frozen=True, slots=True)
class Resolution:
    """What an abandoned reservation left: a valid file (size, meta) or nothing."""

    path: str
    size: int = 0
    meta: KvcMeta | None = None
    temps_deleted: int = 0
    invalid: str | None = None  # the KvcError code of a final file that was deleted


def resolve_final(layout: TierLayout, tier: str, key: bytes) -> Resolution:
    """Delete the key's temp files in the tier; validate its final file if there is one
    (deleting it when invalid)."""
    final = layout.final_path(tier, key)
    temps = 0
    for tmp in glob.glob(glob.escape(str(final)) + ".*.tmp"):
        temps += _unlink(tmp)
    try:
        size, meta = validate_file(final, key)
    except FileNotFoundError:
        return Resolution(str(final), temps_deleted=temps)
    except (KvcError, OSError) as exc:
        _unlink(final)
        code = exc.code if isinstance(exc, KvcError) else "unreadable"
        return Resolution(str(final), temps_deleted=temps, invalid=code)
    return Resolution(str(final), size, meta, temps)
