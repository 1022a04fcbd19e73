"""Tier layout, loading, the startup scan and stage cleanup (files only, no meta process)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from erllama.cache.kvc import KvcError
from erllama.cache.tiers import TierLayout, load_row, resolve_final, scan_tier
from erllama.config import TierConfig
from tests.support.cache import kvc_meta, payload_for, write_kvc


def layout_for(tmp_path: Path) -> TierLayout:
    return TierLayout(
        [
            TierConfig(name="ram", path=str(tmp_path / "ram")),
            TierConfig(name="disk", path=str(tmp_path / "disk")),
        ],
        "abc123",
    )


def test_layout_paths_and_durability(tmp_path: Path) -> None:
    default = TierLayout([TierConfig(name="ram")], "0123abcd")
    assert default.path("ram") == Path("/dev/shm/erllama-0123abcd")
    layout = layout_for(tmp_path)
    assert layout.tiers == ["ram", "disk"]
    assert layout.durable("disk") and not layout.durable("ram")
    key = bytes(range(32))
    assert layout.final_path("disk", key) == tmp_path / "disk" / f"{key.hex()}.kvc"
    with pytest.raises(ValueError):
        TierLayout([TierConfig(name="disk")], "abc")
    with pytest.raises(ValueError):
        TierLayout([TierConfig(name="ram")], "../etc")
    with pytest.raises(KeyError):
        layout.path("ram_file")
    layout.ensure()
    assert (tmp_path / "ram").is_dir() and (tmp_path / "disk").is_dir()


def test_load_row_maps_a_writable_view_without_copying(tmp_path: Path) -> None:
    meta = kvc_meta(range(10))
    payload = payload_for(meta.key(), 100_000)
    path = tmp_path / "row.kvc"
    write_kvc(path, meta, payload)
    row = load_row(path, meta.key())
    assert row.meta.tokens == meta.tokens and row.size == path.stat().st_size
    # what llama_state_seq_set_data needs: a ctypes array over the mapped payload
    arr = (ctypes.c_uint8 * len(row.payload)).from_buffer(row.payload)
    assert bytes(arr[:32]) == payload[:32]
    arr[0] ^= 0xFF  # private mapping: writes never reach the file
    del arr
    row.close()
    assert path.read_bytes().endswith(payload)
    with pytest.raises(KvcError) as wrong:
        load_row(path, kvc_meta(range(11)).key())
    assert wrong.value.code == "key_mismatch"
    (tmp_path / "empty.kvc").write_bytes(b"")
    with pytest.raises(KvcError):
        load_row(tmp_path / "empty.kvc", meta.key())
    with pytest.raises(FileNotFoundError):
        load_row(tmp_path / "missing.kvc", meta.key())


def test_scan_renames_deletes_and_reports(tmp_path: Path) -> None:
    layout = layout_for(tmp_path)
    layout.ensure()
    d = layout.path("disk")
    good, misnamed, dup = kvc_meta(range(1, 5)), kvc_meta(range(2, 9)), kvc_meta(range(3, 4))
    write_kvc(layout.final_path("disk", good.key()), good, b"g" * 100)
    write_kvc(d / f"{'cd' * 32}.kvc", misnamed, b"m" * 100)
    write_kvc(layout.final_path("disk", dup.key()), dup, b"d" * 100)
    write_kvc(d / f"{'ef' * 32}.kvc", dup, b"d" * 100)  # the same key under a second name
    (d / f"{'01' * 32}.kvc").write_bytes(b"KVC\x02" + bytes(100))  # unsupported version
    (d / "x.kvc.w.1.tmp").write_bytes(b"partial")
    (d / "notes.txt").write_text("kept")
    report = scan_tier(layout, "disk")
    assert {r.key for r in report.rows} == {good.key(), misnamed.key(), dup.key()}
    assert report.temps_deleted == 1 and report.renamed == 1 and report.duplicates_deleted == 1
    assert [code for _, code in report.invalid_deleted] == ["unsupported_version"]
    assert sorted(p.name for p in d.iterdir()) == sorted(
        ["notes.txt"] + [f"{m.key().hex()}.kvc" for m in (good, misnamed, dup)]
    )
    for row in report.rows:
        assert row.path == str(layout.final_path("disk", row.key))


def test_resolve_final_adopts_valid_and_deletes_invalid(tmp_path: Path) -> None:
    layout = layout_for(tmp_path)
    layout.ensure()
    meta = kvc_meta(range(40))
    final = layout.final_path("ram", meta.key())
    (final.parent / f"{final.name}.w.abc.tmp").write_bytes(b"half")
    assert resolve_final(layout, "ram", meta.key()).meta is None  # nothing linked
    assert list(final.parent.iterdir()) == []
    size = write_kvc(final, meta, b"v" * 500)
    res = resolve_final(layout, "ram", meta.key())
    assert res.meta is not None and res.size == size and res.path == str(final)
    data = bytearray(final.read_bytes())
    data[-1] ^= 1
    final.write_bytes(bytes(data))
    res = resolve_final(layout, "ram", meta.key())
    assert res.meta is None and res.invalid == "crc_mismatch" and not final.exists()
