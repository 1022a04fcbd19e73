"""The scheduler's decisions, pure: samples in, ``Plan`` or ``Skip`` out (no I/O, no clock).

Rules (REFERENCE §9 with its recommendations, D36):

* **Target.** A plan frees ``max(used - low * total, min_evict_bytes)`` bytes, so one
  pass aims at the low watermark whatever the overshoot (upstream frees a fixed band).
* **Hysteresis.** The policy is *armed* while usage is at or under ``low``. An armed
  policy fires as soon as usage reaches ``high`` and disarms. Between the watermarks
  nothing happens. A disarmed policy fires again only when usage stays at or above
  ``high`` for ``escalate_after`` consecutive samples (the last action did not help),
  never because usage crossed ``high`` again after dipping under it: pressure that
  oscillates around ``high`` costs one action, not a storm.
* **Forced checks.** ``decide(sample, force=True)`` (``force_scheduler_check()``) acts
  on any sample at or above ``high``, even a disarmed policy's (reason ``forced``):
  the caller asked for an action now, not for one more sample of the settling count.
* **Routing by resource.** RAM pressure goes through the RAM-backed cache tiers first
  (``ram``, then ``ram_file``: tmpfs pages are not "available" memory, disk rows free
  nothing), then idle workers' contexts, then idle models put to sleep early. VRAM
  pressure skips the cache rows (evicting them frees no VRAM) and starts at the workers.
* **Order within a plan.** Steps run in order until the projected usage is under
  ``low``; a step whose effect is not known in bytes (workers, unloads) ends the plan
  once it acted, and the next samples show what it freed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from erllama.scheduler.sampler import Resource, Sample

Step = Literal["ram", "ram_file", "workers", "unload"]
PlanReason = Literal["above_high", "escalate", "forced"]
ROW_STEPS: tuple[Step, ...] = ("ram", "ram_file")
BYTE_STEPS = frozenset({"ram", "ram_file"})
"""Steps whose freed bytes are known (cache rows); the others end a plan once they act."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    high: float = 0.85
    low: float = 0.75
    min_evict_bytes: int = 1 << 20
    escalate_after: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.low < self.high <= 1.0:
            raise ValueError("need 0 <= low < high <= 1")
        if self.escalate_after < 1 or self.min_evict_bytes < 0:
            raise ValueError("escalate_after >= 1 and min_evict_bytes >= 0")


@dataclass(frozen=True, slots=True)
class Plan:
    target_bytes: int
    steps: tuple[Step, ...]
    reason: PlanReason
    sample: Sample


@dataclass(frozen=True, slots=True)
class Skip:
    reason: Literal["no_sample", "below_watermark", "in_band", "settling", "busy"]


Decision = Plan | Skip


def target_bytes(sample: Sample, t: Thresholds) -> int:
    """Bytes to free to bring ``sample`` under ``low`` (at least ``min_evict_bytes``)."""
    return max(sample.used - int(t.low * sample.total), t.min_evict_bytes)


def steps_for(
    resource: Resource, evict_tiers: Sequence[str], *, workers: bool = True
) -> tuple[Step, ...]:
    """The action order for a resource (D36)."""
    out: list[Step] = []
    if resource == "ram":
        out += [s for s in ROW_STEPS if s in evict_tiers]
    if workers:
        out.append("workers")
    out.append("unload")
    return tuple(out)


@dataclass(slots=True)
class PressurePolicy:
    """Hysteresis over a stream of samples (one ``decide`` per tick)."""

    thresholds: Thresholds
    evict_tiers: tuple[str, ...] = ("ram", "ram_file")
    workers: bool = True
    armed: bool = True
    above: int = 0  # consecutive samples at/above high since the last action
    fired: int = 0

    def decide(self, sample: Sample | None, *, force: bool = False) -> Decision:
        t = self.thresholds
        if sample is None or sample.total <= 0:
            return Skip("no_sample")
        ratio = sample.ratio
        if ratio < t.high:
            self.above = 0
            if ratio <= t.low:
                self.armed = True
                return Skip("below_watermark")
            return Skip("in_band")
        if self.armed:
            return self._fire(sample, "above_high")
        if force:
            return self._fire(sample, "forced")
        self.above += 1
        if self.above >= t.escalate_after:
            return self._fire(sample, "escalate")
        return Skip("settling")

    def _fire(self, sample: Sample, reason: PlanReason) -> Plan:
        self.armed = False
        self.above = 0
        self.fired += 1
        steps = steps_for(sample.resource, self.evict_tiers, workers=self.workers)
        return Plan(target_bytes(sample, self.thresholds), steps, reason, sample)


@dataclass(slots=True)
class Progress:
    """Walks a plan's steps: what is still to free, and whether to go on."""

    plan: Plan
    remaining: int = 0
    done_steps: list[tuple[Step, int, int]] = field(default_factory=list)  # step, n, bytes
    ended: bool = False

    def __post_init__(self) -> None:
        self.remaining = self.plan.target_bytes

    def record(self, step: Step, n: int, freed: int) -> None:
        """A step ran: ``n`` things acted on, ``freed`` bytes known to be freed."""
        self.done_steps.append((step, n, freed))
        self.remaining -= freed
        if self.remaining <= 0 or (step not in BYTE_STEPS and n > 0):
            self.ended = True

    def next_steps(self) -> list[Step]:
        done = {s for s, _, _ in self.done_steps}
        return [s for s in self.plan.steps if s not in done]

    @property
    def projected_used(self) -> int:
        freed = sum(b for _, _, b in self.done_steps)
        return max(0, self.plan.sample.used - freed)
