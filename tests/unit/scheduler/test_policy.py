"""The scheduler's pure policy: target, hysteresis, routing by resource, plan progress."""

from __future__ import annotations

import pytest

from erllama.scheduler.policy import (
    Plan,
    PressurePolicy,
    Progress,
    Skip,
    Thresholds,
    steps_for,
    target_bytes,
)
from erllama.scheduler.sampler import Sample

T = Thresholds(high=0.85, low=0.75, min_evict_bytes=10, escalate_after=2)


def s(ratio: float, resource: str = "ram") -> Sample:
    return Sample(int(ratio * 1000), 1000, resource)  # type: ignore[arg-type]


def test_target_reaches_low_at_least_min() -> None:
    assert target_bytes(s(0.95), T) == 200
    assert target_bytes(Sample(751, 1000), T) == 10


def test_thresholds_validated() -> None:
    with pytest.raises(ValueError):
        Thresholds(high=0.7, low=0.8)
    with pytest.raises(ValueError):
        Thresholds(escalate_after=0)


def test_routing_by_resource() -> None:
    assert steps_for("ram", ["ram", "ram_file"]) == ("ram", "ram_file", "workers", "unload")
    assert steps_for("ram", ["ram_file"]) == ("ram_file", "workers", "unload")
    assert steps_for("vram", ["ram", "ram_file"]) == ("workers", "unload")
    assert steps_for("vram", ["ram"], workers=False) == ("unload",)


def test_no_action_in_band_or_below() -> None:
    p = PressurePolicy(T)
    assert p.decide(s(0.5)) == Skip("below_watermark")
    assert p.decide(s(0.80)) == Skip("in_band")
    assert p.decide(None) == Skip("no_sample")
    assert p.fired == 0


def test_fires_above_high_with_target_to_low() -> None:
    p = PressurePolicy(T)
    d = p.decide(s(0.90))
    assert isinstance(d, Plan)
    assert d.reason == "above_high" and d.target_bytes == 150
    assert d.steps == ("ram", "ram_file", "workers", "unload")


def test_oscillation_around_high_is_no_storm() -> None:
    p = PressurePolicy(T)
    plans = [p.decide(s(r)) for r in [0.86, 0.84, 0.86, 0.84, 0.86, 0.84, 0.87, 0.83] * 5]
    assert sum(isinstance(d, Plan) for d in plans) == 1


def test_rearms_after_going_under_low() -> None:
    p = PressurePolicy(T)
    assert isinstance(p.decide(s(0.9)), Plan)
    assert p.decide(s(0.8)) == Skip("in_band")
    assert p.decide(s(0.7)) == Skip("below_watermark")
    assert isinstance(p.decide(s(0.9)), Plan)
    assert p.fired == 2


def test_sustained_pressure_escalates_every_n_samples() -> None:
    p = PressurePolicy(T)
    out = [p.decide(s(0.9)) for _ in range(7)]
    kinds = [d.reason if isinstance(d, Plan) else "skip" for d in out]
    assert kinds == ["above_high", "skip", "escalate", "skip", "escalate", "skip", "escalate"]


def test_vram_plan_skips_rows() -> None:
    d = PressurePolicy(T).decide(s(0.9, "vram"))
    assert isinstance(d, Plan) and d.steps == ("workers", "unload")


def test_progress_stops_at_low_and_after_unknown_steps() -> None:
    plan = PressurePolicy(T).decide(s(0.95))
    assert isinstance(plan, Plan)
    pr = Progress(plan)
    pr.record("ram", 3, 120)
    assert not pr.ended and pr.remaining == 80 and pr.next_steps()[0] == "ram_file"
    pr.record("ram_file", 2, 90)
    assert pr.ended and pr.projected_used == 950 - 210
    pr2 = Progress(plan)
    pr2.record("ram", 0, 0)
    pr2.record("ram_file", 0, 0)
    pr2.record("workers", 0, 0)  # nothing to evict: go on to unload
    assert not pr2.ended
    pr2.record("unload", 1, 0)
    assert pr2.ended
