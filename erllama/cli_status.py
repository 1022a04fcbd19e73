"""``erllama status``: one daemon's models, cache tiers and cache counters, or several.

With several ``--endpoint`` it prints one section per daemon (``== ENDPOINT``); one
that does not answer prints ``unreachable: CODE: MESSAGE`` and the exit status is 1.
The cache line shows hits, misses and every ``remote_*`` counter the daemon reports
(the shared remote tier). Also the table helpers ``erllama models`` shares.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from erllama.client import Client
from erllama.protocol.errors import ErllamaError
from erllama.protocol.messages import DaemonStatus, ModelInfo

EXIT_OK = 0
EXIT_ERROR = 1
# the counters `erllama status` shows (with every remote_* one)
CACHE_COUNTERS = ("hits_exact", "hits_resume", "hits_live", "hits_longest_prefix", "misses")

ClientFactory = Callable[[argparse.Namespace], Client]


class CliError(Exception):
    """An error found by the CLI itself (printed as ``error: <code>: <message>``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO) -> None:
    cells = [[str(h) for h in headers], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - unreachable


def model_rows(models: Sequence[ModelInfo]) -> list[list[object]]:
    return [
        [
            m.id,
            m.state,
            m.phase,
            m.pending_len,
            m.backend,
            m.context_size,
            m.quant_tag or m.quant_type,
            m.tier,
            m.restarts,
            m.last_exit,
        ]
        for m in models
    ]


MODEL_HEADERS = (
    "ID",
    "STATE",
    "PHASE",
    "PENDING",
    "BACKEND",
    "CTX",
    "QUANT",
    "TIER",
    "RESTARTS",
    "LAST EXIT",
)


def status_text(st: DaemonStatus, out: TextIO) -> None:
    out.write(f"daemon pid {st.pid}, run dir {st.run_dir}\n\n")
    if st.models:
        table(MODEL_HEADERS, model_rows(st.models), out)
    else:
        out.write("no models loaded\n")
    out.write("\n")
    if st.tiers:
        rows = []
        for t in st.tiers:
            pct = f"{100.0 * t.used_bytes / t.budget_bytes:.1f}%" if t.budget_bytes else "-"
            rows.append([t.name, _bytes(t.used_bytes), _bytes(t.budget_bytes), pct, t.rows, t.path])
        table(("TIER", "USED", "BUDGET", "USE", "ROWS", "PATH"), rows, out)
    else:
        out.write("no cache tiers reported\n")
    sched = st.scheduler
    if sched is not None:  # the memory-pressure scheduler's last sample and action
        ratio = sched.get("last_ratio")
        action = sched.get("last_action") or {}
        out.write(
            f"\nscheduler: enabled={sched.get('enabled')} source={sched.get('pressure_source')} "
            f"ratio={'-' if ratio is None else f'{ratio:.3f}'} "
            f"high={sched.get('high_watermark')} low={sched.get('low_watermark')} "
            f"decision={sched.get('last_decision')} plans={sched.get('plans')} "
            f"last_freed={action.get('bytes_freed', 0)}\n"
        )


def _cache_line(counters: dict[str, int]) -> str:
    """Hits, misses and every ``remote_*`` counter (the shared remote tier), one line."""
    names = [n for n in CACHE_COUNTERS if n in counters]
    names += sorted(n for n in counters if n.startswith("remote_"))
    return "cache: " + " ".join(f"{n}={counters[n]}" for n in names) + "\n"


def _status_keys(endpoints: list[str], keys: list[str] | None) -> dict[str, str | None]:
    """Each endpoint's ``--curve-server-key``: one for all tcp:// ones, or one each in order."""
    tcp = [ep for ep in endpoints if ep.startswith("tcp://")]
    given = keys or []
    if len(given) == 1:
        given = given * len(tcp)
    if given and len(given) != len(tcp):
        raise CliError(
            "bad_request",
            f"{len(keys or [])} --curve-server-key for {len(tcp)} tcp:// endpoints: "
            "give one for all or one for each",
        )
    out: dict[str, str | None] = dict.fromkeys(endpoints)
    out.update(zip(tcp, given, strict=True))
    return out


def _daemon_status(
    args: argparse.Namespace, client: ClientFactory, endpoint: str | None, key: str | None
) -> str:
    one = argparse.Namespace(**{**vars(args), "endpoint": endpoint, "curve_server_key": key})
    if key is None:
        one.curve_secret_key = None
    with client(one) as c:
        st = c.daemon_status()
        counters = c.counters()
    buf = io.StringIO()
    status_text(st, buf)
    buf.write(_cache_line(counters))
    return buf.getvalue()


def cmd_status(args: argparse.Namespace, client: ClientFactory) -> int:
    endpoints: list[str] = args.endpoint or []
    if len(endpoints) <= 1:
        keys = args.curve_server_key or [None]
        if len(keys) > 1:
            raise CliError("bad_request", "several --curve-server-key for one endpoint")
        sys.stdout.write(_daemon_status(args, client, endpoints[0] if endpoints else None, keys[0]))
        return EXIT_OK
    failed = 0
    for i, (ep, key) in enumerate(_status_keys(endpoints, args.curve_server_key).items()):
        sys.stdout.write(("\n" if i else "") + f"== {ep}\n")
        try:
            sys.stdout.write(_daemon_status(args, client, ep, key))
        except (ErllamaError, CliError) as exc:
            failed += 1
            sys.stdout.write(f"unreachable: {exc.code}: {exc.message}\n")
    return EXIT_ERROR if failed else EXIT_OK


def add_parser(
    sub: Any,
    conn: argparse.ArgumentParser,
    client: ClientFactory,
) -> None:
    """The ``status`` verb (``conn``: the connection options, ``--endpoint`` repeatable)."""
    p = sub.add_parser("status", help="models, phases, cache tiers and budgets", parents=[conn])
    p.set_defaults(fn=lambda args: cmd_status(args, client))
