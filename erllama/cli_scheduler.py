"""``erllama scheduler ...``: the memory-pressure scheduler at run time, from a terminal.

Verbs::

    erllama scheduler status                          one "name value" line per field
    erllama scheduler enable | disable                switch the pressure checks
    erllama scheduler check                           one pressure check now: what it did
    erllama scheduler set-thresholds --high X --low Y change the watermarks

``enable``, ``disable`` and ``set-thresholds`` print the new status. Bad watermarks
exit 1 with ``error: bad_thresholds: ...`` (the daemon checks them like the config).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import msgspec

from erllama.client import Client
from erllama.protocol.messages import SchedulerAction, SchedulerCheck, SchedulerStatus

EXIT_OK = 0

ClientFactory = Callable[[argparse.Namespace], Client]


def _action(a: SchedulerAction | None) -> str:
    if a is None:
        return "-"
    steps = ";".join(f"{s}:{n}:{b}" for s, n, b in a.steps) or "-"
    return f"reason={a.reason} target={a.target_bytes} freed={a.bytes_freed} steps={steps}"


def _value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return ",".join(str(x) for x in v) or "-"
    return str(v)


def status_lines(st: SchedulerStatus) -> str:
    out = []
    for name, v in msgspec.structs.asdict(st).items():
        if name == "last_action":
            text = _action(v)
        elif name == "vram":
            text = "-" if v is None else f"total={v.total_b} free={v.free_b} used={v.used_b}"
        else:
            text = _value(v)
        out.append(f"{name} {text}\n")
    return "".join(out)


def check_line(c: SchedulerCheck) -> str:
    ratio = "-" if c.last_ratio is None else f"{c.last_ratio:.4f}"
    tail = f" {_action(c.action)}" if c.action is not None else ""
    return f"{c.outcome} {c.reason} ratio={ratio}{tail}\n"


def _run(make_client: ClientFactory, args: argparse.Namespace) -> int:
    with make_client(args) as c:
        if args.sched_verb == "status":
            sys.stdout.write(status_lines(c.scheduler_status()))
        elif args.sched_verb == "enable":
            sys.stdout.write(status_lines(c.enable_scheduler()))
        elif args.sched_verb == "disable":
            sys.stdout.write(status_lines(c.disable_scheduler()))
        elif args.sched_verb == "check":
            sys.stdout.write(check_line(c.force_scheduler_check()))
        else:  # set-thresholds
            st = c.set_scheduler_thresholds(high=args.high, low=args.low)
            sys.stdout.write(status_lines(st))
    return EXIT_OK


def add_parser(
    sub: Any, conn: argparse.ArgumentParser, make_client: ClientFactory
) -> argparse.ArgumentParser:
    """Add ``scheduler`` and its verbs to the ``erllama`` parser's subcommands."""
    p: argparse.ArgumentParser = sub.add_parser(
        "scheduler", help="the memory-pressure scheduler: status, switch, check, watermarks"
    )
    verbs = p.add_subparsers(dest="sched_verb", metavar="VERB", required=True)
    verbs.add_parser("status", help="switch, watermarks, last sample and action", parents=[conn])
    verbs.add_parser("enable", help="start the pressure checks", parents=[conn])
    verbs.add_parser("disable", help="stop the pressure checks", parents=[conn])
    verbs.add_parser("check", help="check the pressure now and say what it did", parents=[conn])
    t = verbs.add_parser("set-thresholds", help="change the watermarks", parents=[conn])
    t.add_argument("--high", type=float, required=True, help="act at or above this fraction")
    t.add_argument("--low", type=float, required=True, help="free memory down to this fraction")
    p.set_defaults(fn=lambda args: _run(make_client, args))
    return p
