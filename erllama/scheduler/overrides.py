"""The scheduler's run-time settings, kept across its own restarts (``scheduler.json``).

``enable_scheduler`` / ``disable_scheduler`` and ``set_scheduler_thresholds`` change
the running scheduler; it writes the result to ``<run_dir>/scheduler.json`` (atomic
replace) so that a scheduler the root restarts after a crash comes back with them
instead of the config's values. The root removes the file at start and at stop
(``supervisor/rundir.py``): the settings last one daemon's life, and a new daemon
starts from its config again.

A file that cannot be read or holds bad values is ignored with one log line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgspec

from erllama.config import ConfigError, SchedulerConfig, validate_watermarks
from erllama.protocol.sockets import SCHEDULER_STATE

log = logging.getLogger(__name__)


class Overrides(msgspec.Struct, frozen=True, kw_only=True):
    enabled: bool
    high_watermark: float
    low_watermark: float


def of(cfg: SchedulerConfig) -> Overrides:
    return Overrides(
        enabled=cfg.enabled, high_watermark=cfg.high_watermark, low_watermark=cfg.low_watermark
    )


def save(run_dir: str | os.PathLike[str], cfg: SchedulerConfig) -> None:
    path = Path(run_dir) / SCHEDULER_STATE
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(msgspec.json.encode(of(cfg)))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("event=state_not_saved path=%s reason=%s", path, exc)


def load(run_dir: str | os.PathLike[str], cfg: SchedulerConfig) -> SchedulerConfig:
    """``cfg`` with the settings an earlier incarnation saved (``cfg`` itself if none)."""
    path = Path(run_dir) / SCHEDULER_STATE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return cfg
    except OSError as exc:
        log.warning("event=state_ignored path=%s reason=%s", path, exc)
        return cfg
    try:
        o = msgspec.json.decode(raw, type=Overrides)
        validate_watermarks(o.high_watermark, o.low_watermark)
    except (msgspec.DecodeError, msgspec.ValidationError, ConfigError) as exc:
        log.warning("event=state_ignored path=%s reason=%s", path, exc)
        return cfg
    log.info(
        "event=state_restored enabled=%s high=%g low=%g",
        o.enabled, o.high_watermark, o.low_watermark,
    )  # fmt: skip
    return msgspec.structs.replace(
        cfg, enabled=o.enabled, high_watermark=o.high_watermark, low_watermark=o.low_watermark
    )
