"""Samplers: system memory, NVML through a fake pynvml module, the file sampler."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from erllama.scheduler import sampler as sm
from erllama.scheduler.sampler import FileSampler, NvmlSampler, Sample, SystemSampler

GIB = 1 << 30


class FakeNvml:
    """A stand-in for the pynvml module: ``gpus`` = [(used, total), ...]."""

    def __init__(self, gpus: list[tuple[int, int]], *, init_error: Exception | None = None):
        self.gpus = gpus
        self.init_error = init_error
        self.read_error: Exception | None = None
        self.block: threading.Event | None = None
        self.shutdowns = 0

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:  # noqa: N802
        return i

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:  # noqa: N802
        if self.block is not None:
            self.block.wait(5)
        if self.read_error is not None:
            raise self.read_error
        used, total = self.gpus[h]
        return SimpleNamespace(used=used, total=total, free=total - used)


def test_system_sampler_uses_available() -> None:
    got = SystemSampler().sample()
    assert got is not None and got.total > 0 and 0 <= got.used <= got.total
    assert got.resource == "ram"


def test_nvml_two_gpus_are_summed() -> None:
    nv = NvmlSampler(FakeNvml([(1 * GIB, 8 * GIB), (3 * GIB, 16 * GIB)]))
    assert nv.available and nv.device_count == 2
    assert nv.sample() == Sample(4 * GIB, 24 * GIB, "vram")
    nv.close()


def test_nvml_absent_disables_with_one_log_line(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sm, "_load_pynvml", lambda: None)
    with caplog.at_level(logging.INFO, logger="erllama.scheduler.sampler"):
        nv = NvmlSampler()
        assert nv.sample() is None and nv.sample() is None
    assert not nv.available
    assert [r.getMessage() for r in caplog.records] == [
        "event=sampler_disabled name=nvml reason=pynvml is not installed"
    ]


def test_nvml_init_raising_disables(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="erllama.scheduler.sampler"):
        nv = NvmlSampler(FakeNvml([], init_error=RuntimeError("Driver Not Loaded")))
    assert not nv.available and "Driver Not Loaded" in nv.reason
    assert nv.sample() is None
    assert len(caplog.records) == 1


def test_nvml_no_gpu_disables() -> None:
    fake = FakeNvml([])
    nv = NvmlSampler(fake)
    assert not nv.available and nv.reason == "NVML sees no GPU" and fake.shutdowns == 1


def test_nvml_read_raising_returns_none() -> None:
    fake = FakeNvml([(1, 2)])
    nv = NvmlSampler(fake)
    fake.read_error = RuntimeError("GPU is lost")
    assert nv.sample() is None
    fake.read_error = None
    assert nv.sample() == Sample(1, 2, "vram")


def test_nvml_hung_driver_times_out() -> None:
    fake = FakeNvml([(1, 2)])
    nv = NvmlSampler(fake, timeout_s=0.05)
    fake.block = threading.Event()
    assert nv.sample() is None  # the loop is not held
    assert nv.sample() is None  # still stuck: no second thread piles up
    fake.block.set()
    fake.block = None
    nv._busy.join(2)  # type: ignore[union-attr]
    assert nv.sample() == Sample(1, 2, "vram")


def test_real_pynvml_on_this_machine_never_crashes() -> None:
    nv = NvmlSampler()
    assert nv.available or nv.sample() is None
    nv.close()


def test_file_sampler(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    fs = FileSampler(f)
    assert fs.sample() is None
    f.write_text("not json")
    assert fs.sample() is None
    d = tmp_path / "rows"
    d.mkdir()
    (d / "a").write_bytes(b"x" * 100)
    f.write_text(json.dumps({"used": 10, "total": 1000, "add_dir": str(d)}))
    assert fs.sample() == Sample(110, 1000, "ram")
    f.write_text(json.dumps({"used": 10, "total": 20, "resource": "vram"}))
    assert fs.sample() == Sample(10, 20, "vram")


def test_make_sampler(tmp_path: Path) -> None:
    s, _ = sm.make_sampler("custom", str(tmp_path), "erllama.scheduler.sampler:file_sampler")
    assert isinstance(s, FileSampler) and s.path == tmp_path / sm.PRESSURE_FILE
    assert isinstance(sm.make_sampler("system", str(tmp_path))[0], SystemSampler)
    assert sm.make_sampler("noop", str(tmp_path))[0].sample() == Sample(0, 1)  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        sm.make_sampler("custom", str(tmp_path), "nope")
    with pytest.raises(ValueError):
        sm.make_sampler("custom", str(tmp_path), "erllama.scheduler.sampler:missing")
