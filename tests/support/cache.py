"""Cache test helpers: a running meta behind a fake root, KVC rows, writer processes.

``meta_env(tmp_path)`` starts a real cache-meta process (spawned, handshaken) with
tier directories under ``tmp_path`` and yields a ``MetaEnv``; on exit it stops meta,
closes every client it handed out, and asserts that no socket file and no temp file
is left. The ``writer_*`` functions are spawn targets (module level, picklable).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from erllama.cache.client import MetaClient
from erllama.cache.kvc import KvcMeta, SaveReason, build_prefix
from erllama.cache.tiers import TierLayout
from erllama.config import TierConfig
from erllama.protocol.sockets import META_SOCK, ipc_endpoint

from .fake_root import FakeRoot, meta_child

FP = hashlib.sha256(b"test model").digest()
CTX = hashlib.sha256(b"test ctx").digest()
QUANT = 7  # q4_k_m
NAMESPACE = (FP, QUANT, CTX)


def packed(tokens: list[int] | range) -> bytes:
    return struct.pack(f"<{len(tokens)}I", *tokens)


def kvc_meta(tokens: list[int] | range, reason: SaveReason = SaveReason.COLD) -> KvcMeta:
    return KvcMeta(
        save_reason=reason,
        quant_bits=4,
        context_size=4096,
        fingerprint=FP,
        fingerprint_mode=0,
        quant=QUANT,
        ctx_hash=CTX,
        tokens=packed(tokens),
        creation_time=int(time.time()),
    )


def payload_for(key: bytes, size: int, salt: bytes = b"") -> bytes:
    seed = hashlib.sha256(key + salt).digest()
    return (seed * (size // 32 + 1))[:size]


def write_kvc(path: Path, meta: KvcMeta, payload: bytes) -> int:
    """Write a whole KVC file directly (no publish protocol); returns its size."""
    data = build_prefix(meta, payload) + payload
    path.write_bytes(data)
    return len(data)


def wait_until(pred: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Only where no event exists (timer-driven meta work, async control messages)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)  # the one sanctioned sleep: a bounded back-off in wait_until
        delay = min(delay * 2, 0.1)


def meta_config(
    tiers: dict[str, Path],
    budgets: dict[str, int] | None = None,
    remote: dict[str, Any] | None = None,
    **cache: Any,
) -> dict[str, Any]:
    budgets = budgets or {}
    local: list[dict[str, Any]] = [
        {"name": name, "path": str(path), "budget_bytes": budgets.get(name, 1 << 30)}
        for name, path in tiers.items()
    ]
    extra = [] if remote is None else [{"name": "remote", **remote}]
    return {"cache": {"tiers": local + extra, **cache}, "daemon_id": "test"}


@dataclass
class MetaEnv:
    root: FakeRoot
    run_dir: Path
    tiers: dict[str, Path]
    config: dict[str, Any]
    ctx: zmq.Context[zmq.Socket[bytes]]
    clients: list[MetaClient] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return ipc_endpoint(self.run_dir, META_SOCK)

    @property
    def layout(self) -> TierLayout:
        return TierLayout(
            [TierConfig(name=n, path=str(p)) for n, p in self.tiers.items()],  # type: ignore[arg-type]
            "test",
        )

    def client(self, holder: str = "test:1", timeout_s: float = 5.0) -> MetaClient:
        c = MetaClient(self.ctx, self.endpoint, holder, timeout_s=timeout_s)
        self.clients.append(c)
        return c

    def start_meta(self) -> Any:
        return self.root.spawn("meta", meta_child, self.config)

    def restart_meta(self, *, kill: bool) -> Any:
        if kill:
            self.root.kill("meta")
        else:
            assert self.root.stop("meta") == 0
        self.root.forget("meta")
        return self.start_meta()

    def files(self, tier: str) -> list[str]:
        return sorted(os.listdir(self.tiers[tier]))


@contextlib.contextmanager
def meta_env(
    tmp_path: Path,
    tiers: tuple[str, ...] = ("ram", "ram_file", "disk"),
    budgets: dict[str, int] | None = None,
    remote: dict[str, Any] | None = None,
    **cache: Any,
) -> Iterator[MetaEnv]:
    """``remote``: the remote tier's fields (``url`` ...), added after the local tiers."""
    run_dir = tmp_path / "run"
    tier_dirs = {name: tmp_path / f"tier-{name}" for name in tiers}
    for d in tier_dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    config = meta_config(tier_dirs, budgets, remote, **cache)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    root = FakeRoot(run_dir)
    env = MetaEnv(root, run_dir, tier_dirs, config, ctx)
    try:
        env.start_meta()
        yield env
        if root.children.get("meta") is not None and root.children["meta"].is_alive():
            assert root.stop("meta") == 0
    finally:
        for c in env.clients:
            c.close()
        ctx.term()
        root.close()
    assert sorted(os.listdir(run_dir)) == [], "socket files left behind"
    for d in tier_dirs.values():
        assert not [n for n in os.listdir(d) if n.endswith(".tmp")], "temp files left behind"


# ================================================================ writer processes
def writer_crash_at(
    run_dir: str, child_id: str, tiers_json: str, tier: str, stage: str, n: int
) -> None:
    """Publish token list ``range(n)`` to ``tier`` and die at ``stage`` (env hook)."""
    from erllama.cache.tiers import publish

    os.environ["ERLLAMA_TEST_CRASH_AT"] = stage
    tiers = json.loads(tiers_json)
    layout = TierLayout([TierConfig(name=k, path=v) for k, v in tiers.items()], "test")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    client = MetaClient(ctx, ipc_endpoint(run_dir, META_SOCK), f"{child_id}:{os.getpid()}")
    meta = kvc_meta(range(n))
    out = publish(client, layout, tier, meta, payload_for(meta.key(), 50_000), writer_id=child_id)
    client.close()
    ctx.term()
    raise SystemExit(0 if out.status == "fired" else 3)


# The race (tests/integration/cache/test_race.py): shared key pools. ram_file keys are
# never evicted (big budget, never named in evict_bytes), so each must be published
# exactly once across all writers; ram keys churn through a small budget and evictions.
RACE_RAM_FILE_KEYS = [list(range(10_000 + 100 * i, 10_000 + 100 * i + 8 + i)) for i in range(24)]
RACE_RAM_KEYS = [list(range(1, 1 + 4 * (i + 1))) for i in range(16)] + [
    [7, 7, *range(100 + i, 110 + i)] for i in range(14)
]


def _salted_payload(key: bytes, salt: bytes, size: int) -> bytes:
    return salt + payload_for(key, size - len(salt), salt)


def _check_payload(key: bytes, payload: memoryview) -> bool:
    salt = bytes(payload[:8])
    return bytes(payload) == _salted_payload(key, salt, len(payload))


def writer_race(
    run_dir: str, child_id: str, tiers_json: str, seconds: float, seed: int, out_path: str
) -> None:
    """Save, look up, pin, load and evict overlapping keys for ``seconds``; write a report."""
    from erllama.cache.kvc import KvcError
    from erllama.cache.tiers import load_row, publish
    from erllama.protocol.errors import ErllamaError

    r = random.Random(seed)
    tiers = json.loads(tiers_json)
    layout = TierLayout([TierConfig(name=k, path=v) for k, v in tiers.items()], "test")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    client = MetaClient(ctx, ipc_endpoint(run_dir, META_SOCK), f"{child_id}:{os.getpid()}")
    salt = child_id.encode().ljust(8, b"_")[:8]
    fired: list[str] = []
    errors: list[str] = []
    ops: dict[str, int] = {}

    def load_pinned(path: str, key: bytes, prompt: bytes | None, common: int) -> None:
        try:
            with load_row(path, key) as row:
                if not _check_payload(key, row.payload):
                    errors.append(f"payload of {key.hex()[:12]} is not one writer's whole write")
                if prompt is not None and row.meta.tokens[: common * 4] != prompt[: common * 4]:
                    errors.append("longest-prefix row does not share the common prefix")
            os.stat(path)  # still pinned: the file must still be there
        except (KvcError, OSError) as exc:
            errors.append(f"pinned row {key.hex()[:12]} failed to load: {exc!r}")

    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            op = r.choices(["save", "checkout", "prefix", "evict", "wait"], [40, 30, 15, 10, 5])[0]
            ops[op] = ops.get(op, 0) + 1
            try:
                if op == "save":
                    tier = r.choice(["ram", "ram", "ram_file"])
                    pool = RACE_RAM_FILE_KEYS if tier == "ram_file" else RACE_RAM_KEYS
                    meta = kvc_meta(r.choice(pool))
                    key = meta.key()
                    payload = _salted_payload(key, salt, r.randrange(20_000, 80_000))
                    out = publish(client, layout, tier, meta, payload, writer_id=child_id)
                    ops[f"save_{out.status}"] = ops.get(f"save_{out.status}", 0) + 1
                    if out.status == "fired" and tier == "ram_file":
                        fired.append(key.hex())
                    if out.status == "dropped" and out.reason not in ("conflict",):
                        errors.append(f"save dropped: {out.reason}")
                elif op in ("checkout", "wait"):
                    meta = kvc_meta(r.choice(RACE_RAM_KEYS + RACE_RAM_FILE_KEYS))
                    pin = client.checkout(meta.key(), wait_ms=50 if op == "wait" else 0)
                    if pin is not None:
                        ops["hits"] = ops.get("hits", 0) + 1
                        try:
                            load_pinned(pin.row.path, meta.key(), None, 0)
                        finally:
                            client.checkin(pin.pin_ref)
                elif op == "prefix":
                    prompt = packed([*r.choice(RACE_RAM_KEYS), r.randrange(5000)])
                    found = client.longest_prefix_checkout(NAMESPACE, prompt)
                    if found is not None:
                        common, pin = found
                        ops["prefix_hits"] = ops.get("prefix_hits", 0) + 1
                        try:
                            load_pinned(pin.row.path, pin.row.key, prompt, common)
                        finally:
                            client.checkin(pin.pin_ref)
                else:
                    client.evict_bytes(r.randrange(50_000, 300_000), ["ram"])
            except ErllamaError as exc:
                errors.append(f"{op}: {exc!r}")
    finally:
        client.close()
        ctx.term()
        Path(out_path).write_text(json.dumps({"fired": fired, "errors": errors, "ops": ops}))
