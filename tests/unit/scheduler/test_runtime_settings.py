"""Run-time settings of the scheduler, no processes: watermark checks, forced decisions,
the state file a restarted scheduler reads, the client's request building."""

from __future__ import annotations

import math
from pathlib import Path

import msgspec
import pytest

from erllama.client._core import ClientCore
from erllama.config import ConfigError, SchedulerConfig, validate_watermarks
from erllama.protocol.errors import ErrorCode, InvalidRequestError, error_for
from erllama.protocol.messages import SetSchedulerThresholds
from erllama.protocol.sockets import SCHEDULER_STATE
from erllama.scheduler import overrides
from erllama.scheduler.policy import Plan, PressurePolicy, Skip, Thresholds
from erllama.scheduler.sampler import Sample

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(("high", "low"), [(0.85, 0.75), (1.0, 0.0), (0.5, 0.49)])
def test_good_watermarks_pass(high: float, low: float) -> None:
    validate_watermarks(high, low)


@pytest.mark.parametrize(
    ("high", "low"),
    [(0.5, 0.6), (0.7, 0.7), (1.01, 0.5), (0.8, -0.01), (math.nan, 0.1), (0.9, math.nan),
     (math.inf, 0.1)],
)  # fmt: skip
def test_bad_watermarks_fail_with_both_values(high: float, low: float) -> None:
    with pytest.raises(ConfigError) as exc:
        validate_watermarks(high, low)
    assert "0 <= low_watermark < high_watermark <= 1" in str(exc.value)
    assert f"high={high!r}" in str(exc.value)


def test_bad_thresholds_is_an_invalid_request() -> None:
    exc = error_for("bad_thresholds", "no")
    assert isinstance(exc, InvalidRequestError) and exc.code == ErrorCode.BAD_THRESHOLDS


def s(ratio: float) -> Sample:
    return Sample(int(ratio * 1000), 1000, "ram")


def test_forced_decision_acts_on_a_disarmed_policy() -> None:
    p = PressurePolicy(Thresholds(high=0.85, low=0.75, min_evict_bytes=1, escalate_after=5))
    first = p.decide(s(0.9), force=True)
    assert isinstance(first, Plan) and first.reason == "above_high", "armed: the usual reason"
    assert p.decide(s(0.9)) == Skip("settling")
    forced = p.decide(s(0.9), force=True)
    assert isinstance(forced, Plan) and forced.reason == "forced" and forced.target_bytes == 150
    # forcing never invents pressure
    assert p.decide(s(0.8), force=True) == Skip("in_band")
    assert p.decide(s(0.5), force=True) == Skip("below_watermark")
    assert p.decide(None, force=True) == Skip("no_sample")


def test_overrides_round_trip(tmp_path: Path) -> None:
    cfg = SchedulerConfig(interval_s=2.0)
    assert overrides.load(tmp_path, cfg) is cfg, "no file: the config as it is"
    changed = msgspec.structs.replace(cfg, enabled=True, high_watermark=0.6, low_watermark=0.2)
    overrides.save(tmp_path, changed)
    assert not list(tmp_path.glob("*.tmp"))
    got = overrides.load(tmp_path, cfg)
    assert (got.enabled, got.high_watermark, got.low_watermark, got.interval_s) == (
        True, 0.6, 0.2, 2.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '{"enabled": true}',
        '{"enabled": true, "high_watermark": 0.2, "low_watermark": 0.5}',
    ],
)
def test_bad_overrides_are_ignored(tmp_path: Path, text: str) -> None:
    (tmp_path / SCHEDULER_STATE).write_text(text)
    cfg = SchedulerConfig()
    assert overrides.load(tmp_path, cfg) is cfg


def test_client_builds_thresholds_as_floats() -> None:
    call = ClientCore("ipc:///nonexistent", None).set_scheduler_thresholds(1, 0.25)
    assert isinstance(call.msg, SetSchedulerThresholds)
    assert (call.msg.high, call.msg.low) == (1.0, 0.25) and isinstance(call.msg.high, float)


@pytest.mark.parametrize(("high", "low"), [("0.9", 0.1), (0.9, None), (True, 0.1)])
def test_client_refuses_non_numbers(high: object, low: object) -> None:
    with pytest.raises(InvalidRequestError) as exc:
        ClientCore("ipc:///nonexistent", None).set_scheduler_thresholds(high, low)
    assert exc.value.code == "bad_thresholds"
