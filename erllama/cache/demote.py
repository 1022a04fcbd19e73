"""Demotion: copy cache rows into a lower tier off the meta loop, then re-point them.

The scheduler asks meta to ``demote`` bytes out of the RAM-backed tiers. The ledger
picks the victims (LRU, unpinned; ``Ledger.demote_pick``), this module's thread copies
each file into the target tier under the publish protocol (``O_EXCL`` temp, fdatasync
on a durable tier, full validation of the copy, link to the key's final name, unlink
the temp, fsync the directory), and hands the outcome back to the loop through a
wakeup pipe. The loop then re-points the row (``Ledger.demote_done``: the row keeps
its key, hits and LRU stamp; only its tier and path change) and deletes the old file.

A copy that fails (disk full, I/O error) falls back to evicting the row: freeing
the RAM is what was asked for. A row that was pinned, evicted or replaced while its
copy was being made is left where it is and the copy is deleted.

Alternatives turned down: copying on the loop (a 40 MB row on a slow disk would
stall every lookup for its duration), and letting the scheduler copy files (meta is
the only writer of the index and the owner of tier files it deletes).
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from erllama.cache.handoff import Handoff
from erllama.cache.kvc import set_hit_count
from erllama.cache.tiers import TierLayout, fsync_dir, validate_file

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Victim:
    key: bytes
    path: str
    size: int
    tier: str


@dataclass(slots=True)
class DemoteJob:
    ident: bytes
    request_id: str
    to_tier: str
    victims: list[Victim]
    # filled by the thread: key -> new path (None: the copy failed)
    copied: dict[bytes, str | None] = field(default_factory=dict)


def _link_validated(tmp: Path, final: Path, key: bytes) -> None:
    """Validate ``tmp`` fully and link it to ``final`` (a valid file there already wins)."""
    validate_file(tmp, key)  # token-exact: the copy must be the row, CRC included
    try:
        os.link(tmp, final)
    except FileExistsError:
        try:
            validate_file(final, key)  # a valid file of the key is there already: adopt
        except Exception:
            Path(final).unlink(missing_ok=True)
            os.link(tmp, final)


def copy_to_tier(layout: TierLayout, tier: str, key: bytes, src: str) -> str:
    """Copy the row file ``src`` to ``key``'s final name in ``tier``; returns that path.

    Raises:
        OSError, KvcError: the copy failed or does not validate (nothing is left behind).
    """
    root = layout.path(tier)
    final = layout.final_path(tier, key)
    tmp = root / f"{final.name}.demote.{secrets.token_hex(6)}.tmp"
    durable = layout.durable(tier)
    try:
        with open(src, "rb") as fin:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
                fout.flush()
                if durable:
                    os.fdatasync(fout.fileno())
        _link_validated(tmp, final, key)
    finally:
        Path(tmp).unlink(missing_ok=True)
    if durable:
        fsync_dir(root)
    return str(final)


def place_row(layout: TierLayout, tier: str, key: bytes, parts: Sequence[bytes]) -> str:
    """Write a row fetched in ``parts`` (the remote tier) to ``key``'s final name in
    ``tier`` the same way: ``O_EXCL`` temp, hit count zeroed (hits are per daemon),
    fdatasync on a durable tier, full validation (CRC32C, key replay), link.

    Raises:
        OSError: the write failed; KvcError: the row does not validate (nothing is left
            behind either way).
    """
    root = layout.path(tier)
    final = layout.final_path(tier, key)
    tmp = root / f"{final.name}.remote.{secrets.token_hex(6)}.tmp"
    durable = layout.durable(tier)
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as fout:
            for part in parts:
                fout.write(part)
            fout.flush()
            set_hit_count(fout.fileno(), 0)
            if durable:
                os.fdatasync(fout.fileno())
        _link_validated(tmp, final, key)
    finally:
        Path(tmp).unlink(missing_ok=True)
    if durable:
        fsync_dir(root)
    return str(final)


class Demoter:
    """One copying thread; completed jobs wait in ``done`` and a byte on ``fd`` says so."""

    def __init__(self, layout: TierLayout) -> None:
        self.layout = layout
        self._jobs: queue.SimpleQueue[DemoteJob | None] = queue.SimpleQueue()
        self._done: Handoff[DemoteJob] = Handoff()
        self._thread = threading.Thread(target=self._run, name="demoter", daemon=True)
        self._thread.start()

    @property
    def fd(self) -> int:
        return self._done.fd

    def submit(self, job: DemoteJob) -> None:
        self._jobs.put(job)

    def take_done(self) -> list[DemoteJob]:
        return self._done.take()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            for v in job.victims:
                try:
                    job.copied[v.key] = copy_to_tier(self.layout, job.to_tier, v.key, v.path)
                except Exception as exc:
                    log.warning(
                        "event=demote_copy_failed key=%s from=%s to=%s reason=%s",
                        v.key.hex()[:16], v.tier, job.to_tier, exc,
                    )  # fmt: skip
                    job.copied[v.key] = None
            self._done.put(job)

    def stop(self) -> None:
        """Let queued jobs finish (bounded), then end the thread."""
        self._jobs.put(None)
        self._thread.join(JOIN_TIMEOUT_S)

    def close(self) -> None:
        self.stop()
        self._done.close()
