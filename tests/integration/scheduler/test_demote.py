"""Meta's ``demote``: rows move from ram/ram_file into disk off the loop and stay hits."""

from __future__ import annotations

from pathlib import Path

import pytest

from erllama.cache.tiers import load_row
from tests.support.cache import kvc_meta, meta_env, payload_for, write_kvc

pytestmark = pytest.mark.timeout(60)
KB = 1024


def _insert(env, client, tier: str, n: int, size: int = 64 * KB) -> list[tuple[bytes, bytes]]:  # type: ignore[no-untyped-def]
    out = []
    for i in range(n):
        meta = kvc_meta(range(i * 100 + 1, i * 100 + 40))
        key = meta.key()
        payload = payload_for(key, size)
        path = env.layout.final_path(tier, key)
        total = write_kvc(Path(path), meta, payload)
        assert client.insert_available(key, tier, str(path), total, meta) == "inserted"
        out.append((key, payload))
    return out


def test_demote_moves_lru_rows_and_they_stay_hits(tmp_path: Path) -> None:
    with meta_env(tmp_path) as env:
        c = env.client()
        rows = _insert(env, c, "ram", 4)
        pin = c.checkout(rows[0][0])  # pinned: never moved
        assert pin is not None
        res = c.demote(3 * 64 * KB, ["ram"], "disk")
        assert res.demoted >= 2 and res.evicted == 0 and res.bytes_freed >= 2 * 64 * KB
        tiers = {t.name: t for t in c.tier_stats()}
        assert tiers["disk"].rows == res.demoted
        assert tiers["ram"].rows == 4 - res.demoted
        row0 = c.lookup_exact(rows[0][0])
        assert row0 is not None and row0.tier == "ram"
        moved = [k for k, _ in rows[1:] if (r := c.lookup_exact(k)) and r.tier == "disk"]
        assert len(moved) == res.demoted
        for key, payload in rows:
            got = c.checkout(key)
            assert got is not None
            with load_row(got.row.path, key) as loaded:  # token-exact, CRC checked
                assert bytes(loaded.payload) == payload
            c.checkin(got.pin_ref)
        c.checkin(pin.pin_ref)
        ram_files = [n for n in env.files("ram") if n.endswith(".kvc")]
        assert len(ram_files) == 4 - res.demoted
        counters = c.counters()
        assert counters["rows_demoted"] == res.demoted
        assert counters["bytes_disk"] == tiers["disk"].used_bytes


def test_demote_without_target_tier_evicts(tmp_path: Path) -> None:
    with meta_env(tmp_path, tiers=("ram", "ram_file")) as env:
        c = env.client()
        _insert(env, c, "ram_file", 3)
        res = c.demote(1, ["ram_file"], "disk")
        assert res.demoted == 0 and res.evicted == 1
        assert c.counters()["evictions"] == 1


def test_budget_enforced_at_save(tmp_path: Path) -> None:
    with meta_env(tmp_path, budgets={"ram": 200 * KB}) as env:
        c = env.client()
        _insert(env, c, "ram", 5)  # ~64 KiB each into a 200 KiB budget
        ram = {t.name: t for t in c.tier_stats()}["ram"]
        assert ram.used_bytes <= 200 * KB and ram.rows <= 3
        assert c.counters()["evictions"] >= 2
