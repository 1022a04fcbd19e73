"""Memory samplers behind one ``Sampler`` protocol: system RAM, NVIDIA VRAM, a file, noop.

Every sampler returns a ``Sample(used, total, resource)`` or ``None`` when it cannot
measure (the scheduler then skips the tick). ``resource`` routes the pressure
(REFERENCE §9 R, D36): ``ram`` pressure is relieved by evicting RAM-backed cache rows,
``vram`` pressure only by freeing llama contexts and unloading models.

This is the only module that imports NVML bindings (``pynvml``, from nvidia-ml-py),
and it imports them lazily: no NVML library, no driver or no GPU disables the
sampler with one log line, never a crash. NVML calls can block for seconds on a
wedged driver, so ``NvmlSampler`` runs them on a daemon thread of its own and
waits at most ``timeout_s``; the scheduler's loop never waits on the driver
(upstream shells out to nvidia-smi synchronously, D36).

Alternatives turned down: ``nvidia-smi`` in a subprocess (a fork per sample, CSV
parsing, MiB rounding), and sampling NVML on the loop thread (a hung driver would
stop the heartbeats, and the root would kill the scheduler).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Protocol

import psutil  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

Resource = Literal["ram", "vram"]
NVML_TIMEOUT_S = 2.0
PRESSURE_FILE = "pressure.json"


@dataclass(frozen=True, slots=True)
class Sample:
    used: int
    total: int
    resource: Resource = "ram"

    @property
    def ratio(self) -> float:
        return self.used / self.total if self.total > 0 else 0.0

    @property
    def free(self) -> int:
        return max(0, self.total - self.used)


class Sampler(Protocol):
    """What the scheduler samples; ``name`` appears in its status and log lines."""

    name: str
    resource: Resource

    def sample(self) -> Sample | None: ...

    def close(self) -> None: ...


class NoopSampler:
    """Always ``(0, 1)``: the scheduler never acts (upstream's ``noop`` source)."""

    name = "noop"
    resource: Resource = "ram"

    def sample(self) -> Sample | None:
        return Sample(0, 1, "ram")

    def close(self) -> None:
        pass


class SystemSampler:
    """System memory: ``used = total - available`` (psutil)."""

    name = "system"
    resource: Resource = "ram"

    def sample(self) -> Sample | None:
        vm = psutil.virtual_memory()
        if vm.total <= 0:
            return Sample(0, 1, "ram")
        return Sample(int(vm.total - vm.available), int(vm.total), "ram")

    def close(self) -> None:
        pass


def _load_pynvml() -> ModuleType | None:
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return None


class NvmlSampler:
    """NVIDIA GPU memory summed over every GPU (NVML ``nvmlDeviceGetMemoryInfo``).

    Args:
        nvml: the ``pynvml`` module (tests inject a fake); None: import it.
        timeout_s: the longest a ``sample()`` waits for the NVML thread.

    ``available`` is False (and ``sample()`` returns None) when NVML cannot be
    initialised or sees no GPU; the reason is logged once.
    """

    name = "nvml"
    resource: Resource = "vram"

    def __init__(self, nvml: ModuleType | Any | None = None, *, timeout_s: float = NVML_TIMEOUT_S):
        self._nvml = nvml if nvml is not None else _load_pynvml()
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._busy: threading.Thread | None = None
        self.available = False
        self.reason = ""
        self.device_count = 0
        if self._nvml is None:
            self._disable("pynvml is not installed")
            return
        try:
            self._nvml.nvmlInit()
            self.device_count = int(self._nvml.nvmlDeviceGetCount())
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self._disable(f"NVML init failed: {exc}")
            return
        if self.device_count <= 0:
            self._disable("NVML sees no GPU")
            self._shutdown_quietly()
            return
        self.available = True
        log.info("event=sampler name=nvml gpus=%d", self.device_count)

    def _disable(self, reason: str) -> None:
        self.available = False
        self.reason = reason
        log.warning("event=sampler_disabled name=nvml reason=%s", reason)

    def _read(self) -> Sample:
        used = total = 0
        nvml = self._nvml
        assert nvml is not None
        for i in range(self.device_count):
            info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(i))
            used += int(info.used)
            total += int(info.total)
        return Sample(used, total, "vram") if total > 0 else Sample(0, 1, "vram")

    def sample(self) -> Sample | None:
        """Sum over the GPUs, read on a helper thread; None if NVML fails or is too slow."""
        if not self.available:
            return None
        with self._lock:
            if self._busy is not None and self._busy.is_alive():
                return None  # the previous read is still stuck in the driver
            box: list[Sample | BaseException] = []

            def read() -> None:
                try:
                    box.append(self._read())
                except Exception as exc:
                    box.append(exc)

            t = threading.Thread(target=read, name="nvml-sample", daemon=True)
            self._busy = t
            t.start()
        t.join(self._timeout_s)
        if not box:
            log.warning("event=sample_timeout name=nvml timeout_s=%g", self._timeout_s)
            return None
        got = box[0]
        if isinstance(got, BaseException):
            log.warning("event=sample_failed name=nvml reason=%s", got)
            return None
        return got

    def _shutdown_quietly(self) -> None:
        try:
            if self._nvml is not None:
                self._nvml.nvmlShutdown()
        except Exception:
            pass

    def close(self) -> None:
        if self.available:
            self.available = False
            self._shutdown_quietly()


class FileSampler:
    """Reads the pressure from a JSON file that a test or bench writes (works across
    processes: the scheduler is a spawned child).

    The file holds ``{"used": int, "total": int, "resource": "ram"|"vram",
    "add_dir": str}`` (the last two optional): ``add_dir`` adds the sizes of the
    files in that directory to ``used``, so evicting cache rows there shows up in
    the next sample (the bench points it at the ram tier). A missing or bad file
    samples as None (the tick is skipped).
    """

    name = "file"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.resource: Resource = "ram"

    def sample(self) -> Sample | None:
        try:
            raw = json.loads(self.path.read_text())
            used, total = int(raw["used"]), int(raw["total"])
            resource: Resource = "vram" if raw.get("resource") == "vram" else "ram"
            if add_dir := raw.get("add_dir"):
                used += _dir_bytes(Path(add_dir))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        self.resource = resource
        return Sample(used, total, resource) if total > 0 else Sample(0, 1, resource)

    def close(self) -> None:
        pass


def _dir_bytes(path: Path) -> int:
    total = 0
    try:
        with os.scandir(path) as it:
            for entry in it:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
    except OSError:
        return 0
    return total


def file_sampler(run_dir: str) -> FileSampler:
    """The ``custom_sampler`` factory for tests: ``<run_dir>/pressure.json``."""
    return FileSampler(Path(run_dir) / PRESSURE_FILE)


def load_factory(spec: str) -> Callable[[str], Sampler]:
    """``module:attr`` -> the factory it names.

    Raises:
        ValueError: not ``module:attr``, or the module or attribute does not exist.
    """
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"custom_sampler must be 'module:attr', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"custom_sampler {spec!r}: {exc}") from None
    if not callable(factory):
        raise ValueError(f"custom_sampler {spec!r} is not callable")
    return factory  # type: ignore[no-any-return]


def make_sampler(
    source: str, run_dir: str, custom: str | None = None
) -> tuple[Sampler | None, str]:
    """The sampler for ``pressure_source``; ``(None, reason)`` when it is unavailable.

    Raises:
        ValueError: a bad ``custom_sampler``.
    """
    if source == "noop":
        return NoopSampler(), ""
    if source == "system":
        return SystemSampler(), ""
    if source == "nvml":
        nv = NvmlSampler()
        return (nv, "") if nv.available else (None, nv.reason)
    if source == "custom" and custom:
        return load_factory(custom)(run_dir), ""
    raise ValueError(f"unknown pressure_source {source!r}")
