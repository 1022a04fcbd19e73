"""Crashes during the publish protocol, a SIGKILLed meta, and corrupt files in tier dirs.

A writer is killed (``os._exit(137)``, as SIGKILL would) at each publish stage
through ``ERLLAMA_TEST_CRASH_AT``; after ``HoldersDied`` or the reservation sweep
the key has either no row and no file, or a whole, valid row, and no temp file
is left. A SIGKILLed meta restarts and rebuilds its index from the tier
directories. Corrupt files are never served: they are counted and removed.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from erllama.cache.client import MetaUnavailable
from erllama.cache.kvc import KvcError
from erllama.cache.tiers import CRASH_EXIT_CODE, CRASH_STAGES, load_row, publish, validate_file
from erllama.protocol.errors import ConflictError
from tests.support.cache import (
    MetaEnv,
    kvc_meta,
    meta_env,
    payload_for,
    wait_until,
    write_kvc,
    writer_crash_at,
)

# what each stage leaves for the cleanup to find, and whether a row must come out of it
EXPECT_ROW = {
    "after_reserve": False,
    "after_write": False,
    "after_check": False,
    "after_link": True,  # linked but never marked: the final file is adopted
    "after_mark": True,
}


def crash_writer(env: MetaEnv, tier: str, stage: str, n: int) -> tuple[bytes, str]:
    tiers_json = json.dumps({k: str(v) for k, v in env.tiers.items()})
    proc = env.root.start(f"w-{stage}", writer_crash_at, tiers_json, tier, stage, n)
    assert env.root.wait_exit(f"w-{stage}", 30) == CRASH_EXIT_CODE
    return kvc_meta(range(n)).key(), f"w-{stage}:{proc.pid}"


def reservation_gone(env: MetaEnv, key: bytes, tier: str) -> bool:
    probe = env.client("probe:1")
    try:
        token = probe.reserve(key, tier)
    except ConflictError as exc:
        return exc.code == "already_present"
    probe.cancel_reservation(key, token)
    return True


def assert_whole_or_nothing(env: MetaEnv, key: bytes, tier: str, expect_row: bool) -> None:
    files = env.files(tier)
    assert not [f for f in files if f.endswith(".tmp")]
    row = env.client().lookup_exact(key)
    if expect_row:
        assert row is not None and files == [f"{key.hex()}.kvc"]
        size, meta = validate_file(row.path, key)
        assert size == row.size and meta.key() == key
    else:
        assert row is None and files == []


@pytest.mark.parametrize("tier", ["disk", "ram"])
@pytest.mark.parametrize("stage", CRASH_STAGES)
def test_writer_killed_at_each_stage_then_holders_died(
    tmp_path: Path, stage: str, tier: str
) -> None:
    with meta_env(tmp_path, tiers=(tier,)) as env:
        key, holder = crash_writer(env, tier, stage, 64)
        if stage in ("after_write", "after_check", "after_link"):
            assert any(f.endswith(".tmp") for f in env.files(tier))
        env.root.holders_died("meta", [holder])
        wait_until(lambda: reservation_gone(env, key, tier), what="stage cleanup")
        assert_whole_or_nothing(env, key, tier, EXPECT_ROW[stage])
        # the key can be saved (or is already there) afterwards
        meta = kvc_meta(range(64))
        out = publish(env.client("w2:1"), env.layout, tier, meta, b"z" * 999, writer_id="w2")
        assert out.status == ("already_present" if EXPECT_ROW[stage] else "fired")


@pytest.mark.parametrize("stage", ["after_write", "after_link", "after_mark"])
def test_expired_reservations_are_swept(tmp_path: Path, stage: str) -> None:
    with meta_env(
        tmp_path, tiers=("ram_file",), reservation_ttl_s=0.3, sweep_interval_s=0.1
    ) as env:
        key, _ = crash_writer(env, "ram_file", stage, 65)
        wait_until(lambda: not any(f.endswith(".tmp") for f in env.files("ram_file")))
        wait_until(lambda: reservation_gone(env, key, "ram_file"), what="sweep")
        assert_whole_or_nothing(env, key, "ram_file", EXPECT_ROW[stage])


@pytest.mark.timeout(60)
def test_sigkilled_meta_rebuilds_its_index_from_every_tier(tmp_path: Path) -> None:
    with meta_env(tmp_path) as env:
        c = env.client()
        published: dict[bytes, int] = {}
        for i, tier in enumerate(["ram", "ram_file", "disk"] * 3):
            meta = kvc_meta(range(100 + i))
            out = publish(
                c, env.layout, tier, meta, payload_for(meta.key(), 30_000 + i), writer_id="t"
            )
            assert out.status == "fired"
            published[meta.key()] = out.size
        pin = c.checkout(next(iter(published)))
        assert pin is not None
        orphan, _ = crash_writer(env, "disk", "after_link", 300)  # linked, never marked
        pending, _ = crash_writer(env, "ram_file", "after_write", 301)  # temp only

        env.restart_meta(kill=True)
        fresh = env.client("after:1")
        for key, size in published.items():
            row = fresh.lookup_exact(key)
            assert row is not None and row.size == size
        assert fresh.lookup_exact(orphan) is not None  # a whole file is a whole row
        assert fresh.lookup_exact(pending) is None
        assert not [f for t in env.tiers for f in env.files(t) if f.endswith(".tmp")]
        stats = {t.name: t for t in fresh.tier_stats()}
        assert stats["ram"].rows == 3 and stats["ram_file"].rows == 3 and stats["disk"].rows == 4
        # the pin died with the old meta: everything is evictable again
        assert fresh.gc() == 10


def test_corrupt_files_in_tier_dirs_are_never_served(tmp_path: Path) -> None:
    with meta_env(tmp_path, tiers=("ram_file", "disk")) as env:
        d = env.tiers["disk"]
        metas = {name: kvc_meta(range(200 + i)) for i, name in enumerate(
            ["payload_flip", "header_flip", "truncated", "renamed", "good", "victim"])}  # fmt: skip
        paths = {}
        for name, meta in metas.items():
            paths[name] = d / f"{meta.key().hex()}.kvc"
            write_kvc(paths[name], meta, payload_for(meta.key(), 20_000))
        data = bytearray(paths["payload_flip"].read_bytes())
        data[-5] ^= 0x01
        paths["payload_flip"].write_bytes(bytes(data))
        data = bytearray(paths["header_flip"].read_bytes())
        data[100] ^= 0x10  # inside the TLV section: caught by the header CRC
        paths["header_flip"].write_bytes(bytes(data))
        data = paths["truncated"].read_bytes()
        paths["truncated"].write_bytes(data[: len(data) - 7])
        # "renamed": its content sits under another key's name (D42)
        stolen = kvc_meta(range(999)).key()
        os.rename(paths["renamed"], d / f"{stolen.hex()}.kvc")
        (d / f"{'ab' * 32}.kvc").write_bytes(b"not a kvc file at all")
        (d / "stray.kvc.w.1.tmp").write_bytes(b"half a write")
        (d / "README").write_text("operators may leave notes")

        env.restart_meta(kill=False)
        c = env.client()
        counters = c.counters()
        assert counters["corrupt_files"] == 3  # header flip, truncation, garbage
        keys = {name: meta.key() for name, meta in metas.items()}
        assert c.lookup_exact(keys["header_flip"]) is None
        assert c.lookup_exact(keys["truncated"]) is None
        assert c.lookup_exact(stolen) is None  # never served under the wrong key
        assert c.lookup_exact(keys["renamed"]) is not None  # renamed back to its own key
        assert sorted(env.files("disk")) == sorted(
            ["README"]
            + [f"{keys[n].hex()}.kvc" for n in ("payload_flip", "renamed", "good", "victim")]
        )

        # payload bit flip: only the CRC at load can see it
        pin = c.checkout(keys["payload_flip"])
        assert pin is not None
        with pytest.raises(KvcError) as bad:
            load_row(pin.row.path, keys["payload_flip"])
        assert bad.value.code == "crc_mismatch"
        c.report_corrupt(keys["payload_flip"], bad.value.code)
        c.checkin(pin.pin_ref)
        assert c.lookup_exact(keys["payload_flip"]) is None
        assert not paths["payload_flip"].exists()

        # a file swapped under a live row's name: the key replay refuses it
        os.replace(d / f"{keys['good'].hex()}.kvc", paths["victim"])
        pin = c.checkout(keys["victim"])
        assert pin is not None
        with pytest.raises(KvcError) as swapped:
            load_row(pin.row.path, keys["victim"])
        assert swapped.value.code == "key_mismatch"
        c.report_corrupt(keys["victim"], swapped.value.code)
        c.checkin(pin.pin_ref)
        assert c.lookup_exact(keys["victim"]) is None and not paths["victim"].exists()

        # ...which left the good row without its file: a stale row, dropped when reported
        with pytest.raises(FileNotFoundError):
            load_row(d / f"{keys['good'].hex()}.kvc", keys["good"])
        c.report_corrupt(keys["good"], "missing")
        assert c.lookup_exact(keys["good"]) is None
        counters = c.counters()
        assert counters["corrupt_files"] == 5 and counters["stale_rows_dropped"] == 3
        assert env.root.children["meta"].is_alive()


def test_clients_see_meta_unavailable_and_recover_after_a_restart(tmp_path: Path) -> None:
    with meta_env(tmp_path, tiers=("ram",)) as env:
        c = env.client("w:1", timeout_s=0.3)
        meta = kvc_meta(range(77))
        assert publish(c, env.layout, "ram", meta, b"p" * 1000, writer_id="w").status == "fired"
        env.root.kill("meta")
        with pytest.raises(MetaUnavailable):
            c.lookup_exact(meta.key())
        other = kvc_meta(range(78))
        out = publish(c, env.layout, "ram", other, b"q" * 1000, writer_id="w")
        assert (out.status, out.reason) == ("dropped", "daemon_unavailable")
        assert env.files("ram") == [f"{meta.key().hex()}.kvc"]
        env.root.forget("meta")
        env.start_meta()
        row = c.lookup_exact(meta.key())  # a fresh socket after the timeout (Lazy Pirate)
        assert row is not None


def test_sigterm_stops_meta_cleanly(tmp_path: Path) -> None:
    with meta_env(tmp_path, tiers=("ram",)) as env:
        proc = env.root.children["meta"]
        os.kill(proc.pid, signal.SIGTERM)
        assert env.root.wait_exit("meta", 10) == 0
        assert not (env.run_dir / "meta.sock").exists()
