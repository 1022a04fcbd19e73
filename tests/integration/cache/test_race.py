"""Four writer processes race through one real meta process for >= 10 s.

Each writer saves, looks up, pins, loads (full validation), longest-prefix-checks
and evicts overlapping keys. ``ram_file`` keys are never evicted, so each of them
must be published exactly once across all writers; ``ram`` keys churn through a
small budget and explicit evictions while others hold pins on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from erllama.cache.tiers import validate_file
from tests.support.cache import meta_env, writer_race

WRITERS = 4
SECONDS = 10.0


@pytest.mark.timeout(90)
def test_writers_race_on_overlapping_keys(tmp_path: Path) -> None:
    with meta_env(tmp_path, tiers=("ram", "ram_file"), budgets={"ram": 1_500_000}) as env:
        tiers_json = json.dumps({name: str(path) for name, path in env.tiers.items()})
        reports = [tmp_path / f"writer{i}.json" for i in range(WRITERS)]
        for i, report in enumerate(reports):
            env.root.start(f"writer{i}", writer_race, tiers_json, SECONDS, i, str(report))
        codes = [env.root.wait_exit(f"writer{i}", SECONDS + 40) for i in range(WRITERS)]
        assert codes == [0] * WRITERS
        results = [json.loads(r.read_text()) for r in reports]

        errors = [e for r in results for e in r["errors"]]
        assert errors == [], errors[:10]
        fired = [k for r in results for k in r["fired"]]
        assert len(fired) == len(set(fired)), "a ram_file key was published twice"
        assert fired, "no ram_file save went through"

        c = env.client()
        for hexkey in fired:
            row = c.lookup_exact(bytes.fromhex(hexkey))
            assert row is not None and row.tier == "ram_file"
            validate_file(row.path, bytes.fromhex(hexkey))
        assert env.files("ram_file") == sorted(f"{k}.kvc" for k in fired)

        ops: dict[str, int] = {}
        for r in results:
            for name, n in r["ops"].items():
                ops[name] = ops.get(name, 0) + n
        counters = c.counters()
        # the race really raced: duplicates refused, rows evicted, rows served
        assert counters["duplicate_dropped"] > 0
        assert counters["evictions"] > 0
        assert ops.get("hits", 0) > 0 and ops.get("prefix_hits", 0) > 0
        assert counters["bad_requests"] == 0 and counters["internal_errors"] == 0
        # the index and the directories agree: every file is a row, every row a file
        for usage in c.tier_stats():
            files = env.files(usage.name)
            assert usage.rows == len(files)
            assert usage.used_bytes == sum(
                (env.tiers[usage.name] / f).stat().st_size for f in files
            )
