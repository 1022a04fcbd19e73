"""The save policy: when a cold, continued, finish or ladder save fires (REFERENCE §7.2).

Pure functions over ``PolicyConfig``. Differences from upstream, each a REFERENCE
recommendation:

* ``saves_enabled=False`` turns every gated save off (D22), and ``validate_policy`` runs the
  upstream validation (§7.3) so a bad policy is refused at load instead of crashing later.
* Cold saves clamp long prompts instead of skipping them (D17): a prompt longer than
  ``cold_max_tokens`` saves ``trim_count(cold_max_tokens)``.
* The checkpoint ladder (D16): ``ladder_lengths`` gives several aligned cold rungs, and
  ``continued_frontier`` places continued saves at absolute multiples of
  ``continued_interval`` so that they land on lengths a later prompt can share.

Evict and shutdown saves are not gated (any non-empty context) and have no function here.
"""

from __future__ import annotations

from erllama.config import PolicyConfig


class PolicyError(ValueError):
    """A policy fails validation; ``code`` is ``invalid`` or ``ordering`` (REFERENCE §7.3)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def validate_policy(p: PolicyConfig) -> None:
    """Upstream's policy validation, first failure wins (REFERENCE §7.3).

    Raises:
        PolicyError: ``invalid`` (a negative or zero gate) or ``ordering`` (the cold band
            is inconsistent with ``min_tokens``).
    """
    if p.min_tokens < 0:
        raise PolicyError("invalid", f"min_tokens={p.min_tokens} < 0")
    if p.cold_min_tokens < p.min_tokens:
        raise PolicyError("ordering", "cold_min_tokens < min_tokens")
    if p.cold_max_tokens < p.cold_min_tokens:
        raise PolicyError("ordering", "cold_max_tokens < cold_min_tokens")
    if p.continued_interval <= 0:
        raise PolicyError("invalid", f"continued_interval={p.continued_interval} <= 0")
    if p.boundary_trim_tokens < 0:
        raise PolicyError("invalid", f"boundary_trim_tokens={p.boundary_trim_tokens} < 0")
    if p.boundary_align_tokens <= 0:
        raise PolicyError("invalid", f"boundary_align_tokens={p.boundary_align_tokens} <= 0")


def trim_count(length: int, trim: int, align: int) -> int | None:
    """``length - trim`` rounded down to a multiple of ``align``; None below one ``align``."""
    if align <= 0:
        raise PolicyError("invalid", f"align={align} <= 0")
    a = length - trim
    if a < align:
        return None
    return (a // align) * align


def cold_save_split(n_prompt: int, p: PolicyConfig) -> int | None:
    """The length of the cold-save prefix of an ``n_prompt``-token prompt, or None.

    None when saves are disabled, the prompt is shorter than ``cold_min_tokens``, the
    trimmed length is below one alignment, or the prefix would be shorter than
    ``min_tokens`` (so a non-None result is always a save that fires). Prompts longer than
    ``cold_max_tokens`` are clamped to it (D17).
    """
    if not p.saves_enabled or n_prompt < p.cold_min_tokens:
        return None
    n = trim_count(
        min(n_prompt, p.cold_max_tokens), p.boundary_trim_tokens, p.boundary_align_tokens
    )
    if n is None or n < p.min_tokens or n <= 0:
        return None
    return n


def ladder_lengths(n_prompt: int, p: PolicyConfig, max_rungs: int = 4) -> list[int]:
    """The checkpoint ladder of a prompt (D16): the cold split and the rungs below it.

    Every rung is a multiple of ``boundary_align_tokens``, at least ``min_tokens`` and at
    most the cold split; the largest ``max_rungs`` of them, ascending. The last rung is
    ``cold_save_split(n_prompt, p)``; the list is empty when that is None.
    """
    top = cold_save_split(n_prompt, p)
    if top is None or max_rungs <= 0:
        return []
    align = p.boundary_align_tokens
    low = max(align, -(-p.min_tokens // align) * align)  # smallest aligned length >= min_tokens
    low = max(low, top - (max_rungs - 1) * align)
    return list(range(low, top + 1, align))


def continued_fires(live: int, last_save_at: int, p: PolicyConfig) -> bool:
    """Upstream's continued gate: ``continued_interval`` tokens since the last save."""
    return (
        p.saves_enabled
        and live > 0
        and live - last_save_at >= p.continued_interval
        and live >= p.min_tokens
    )


def continued_frontier(live: int, last_save_at: int, p: PolicyConfig) -> int | None:
    """The absolute continued-save frontier ``live`` has reached, or None (D16).

    Continued saves land only on multiples of ``continued_interval``. Returns the largest
    multiple ``f <= live`` when ``f > last_save_at`` and ``f >= min_tokens``. After one
    decoded token ``f == live``; after a prefill chunk that crossed a multiple ``f`` may be
    below ``live``, and a caller that can only save its live state either splits its chunks
    at the frontier or skips that save.
    """
    if not p.saves_enabled or p.continued_interval <= 0:
        return None
    f = (live // p.continued_interval) * p.continued_interval
    if f <= 0 or f <= last_save_at or f < p.min_tokens:
        return None
    return f


def finish_fires(live: int, p: PolicyConfig) -> bool:
    """The finish gate: a non-empty context of at least ``min_tokens``."""
    return p.saves_enabled and live > 0 and live >= p.min_tokens
