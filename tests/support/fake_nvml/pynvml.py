"""A fake ``pynvml`` for spawned daemons: put this directory first on ``PYTHONPATH``.

``scheduler/sampler.py`` imports ``pynvml`` by name, so a daemon started with
``fake_nvml_env(path)`` (tests/support/daemon.py) sees the GPUs listed in the JSON
file ``$ERLLAMA_TEST_FAKE_NVML``: ``{"gpus": [[used, total], ...]}``, read at every
call (a test rewrites it to change the numbers). An empty list is a machine whose
driver sees no GPU; a missing file fails ``nvmlInit`` like a missing driver.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any

ENV = "ERLLAMA_TEST_FAKE_NVML"


class NVMLError(Exception):
    pass


def _gpus() -> list[list[int]]:
    try:
        with open(os.environ[ENV]) as f:
            gpus: list[list[int]] = json.load(f)["gpus"]
    except (KeyError, OSError, ValueError) as exc:
        raise NVMLError(f"fake NVML: {exc}") from None
    return gpus


def nvmlInit() -> None:  # noqa: N802 - pynvml's names
    _gpus()


def nvmlShutdown() -> None:  # noqa: N802
    pass


def nvmlDeviceGetCount() -> int:  # noqa: N802
    return len(_gpus())


def nvmlDeviceGetHandleByIndex(i: int) -> int:  # noqa: N802
    return i


def nvmlDeviceGetMemoryInfo(handle: int) -> Any:  # noqa: N802
    used, total = _gpus()[handle]
    return SimpleNamespace(used=used, total=total, free=total - used)
