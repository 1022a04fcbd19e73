"""``erllama scheduler ...``: argument parsing and the text it prints (no daemon)."""

from __future__ import annotations

import pytest

from erllama.cli import build_parser, main
from erllama.cli_scheduler import check_line, status_lines
from erllama.protocol.messages import SchedulerAction, SchedulerCheck, SchedulerStatus, VramInfo

pytestmark = pytest.mark.timeout(30)

ACTION = SchedulerAction(
    at=1.0, reason="above_high", target_bytes=45, steps=[("ram", 2, 300)], bytes_freed=300
)


def status(**kw: object) -> SchedulerStatus:
    base: dict[str, object] = dict(
        enabled=True, pressure_source="system", sampler="system", sampler_reason="",
        interval_s=5.0, high_watermark=0.85, low_watermark=0.75, min_evict_bytes=1,
        evict_tiers=["ram", "ram_file"], resource="ram", last_used=80, last_total=100,
        last_ratio=0.8, sampled_at=2.0, last_decision="in_band", last_action=None, plans=0,
        vram=None, vram_reason="NVML sees no GPU",
    )  # fmt: skip
    base.update(kw)
    return SchedulerStatus(**base)  # type: ignore[arg-type]


def test_status_is_one_line_per_field() -> None:
    st = status(last_action=ACTION, vram=VramInfo(total_b=8, free_b=6, used_b=2))
    lines = dict(line.split(" ", 1) for line in status_lines(st).splitlines())
    assert list(lines) == list(SchedulerStatus.__struct_fields__)
    assert lines["enabled"] == "true" and lines["evict_tiers"] == "ram,ram_file"
    assert lines["last_action"] == "reason=above_high target=45 freed=300 steps=ram:2:300"
    assert lines["vram"] == "total=8 free=6 used=2"
    assert dict(x.split(" ", 1) for x in status_lines(status()).splitlines())["vram"] == "-"


def test_check_line() -> None:
    assert check_line(SchedulerCheck(outcome="skipped", reason="disabled")) == (
        "skipped disabled ratio=-\n"
    )
    acted = SchedulerCheck(outcome="acted", reason="forced", last_ratio=0.95, action=ACTION)
    assert check_line(acted) == (
        "acted forced ratio=0.9500 reason=above_high target=45 freed=300 steps=ram:2:300\n"
    )


def test_parser() -> None:
    args = build_parser().parse_args(
        ["scheduler", "set-thresholds", "--high", "0.9", "--low", "0.1"]
    )
    assert (args.sched_verb, args.high, args.low) == ("set-thresholds", 0.9, 0.1)
    for verb in ("status", "enable", "disable", "check"):
        assert build_parser().parse_args(["scheduler", verb]).sched_verb == verb


@pytest.mark.parametrize(
    "argv",
    [["scheduler"], ["scheduler", "nope"], ["scheduler", "set-thresholds", "--high", "0.9"],
     ["scheduler", "set-thresholds", "--high", "x", "--low", "0.1"]],
)  # fmt: skip
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: erllama scheduler" in capsys.readouterr().err


def test_no_daemon_is_an_error(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scheduler", "status", "--endpoint", f"ipc://{tmp_path}/none.sock"]) == 1
    assert capsys.readouterr().err.startswith("error: daemon_unavailable: ")
