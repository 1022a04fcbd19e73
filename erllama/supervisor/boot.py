"""The root's start order: meta, router, scheduler, gateway, the configured workers; up.

Each core child counts as started at its ``Ready``; the next one is spawned then.
The scheduler is started whenever it is installed (a disabled scheduler idles and
can be enabled at run time; it also answers ``vram_info``); the gateway unless
``[http] listen = "off"``. The daemon is up (event ``ready`` of ``child="root"``)
once every configured worker is ready or failed.

Pure: ``BootOrder`` is told which children are ready and says which stage to enter;
``daemon.Root`` spawns. No sockets, no processes.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Collection
from typing import Literal

log = logging.getLogger(__name__)

Stage = Literal["meta", "router", "scheduler", "gateway", "workers", "up"]


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (a warning when it cannot: it is skipped)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        log.warning("scheduler %s is not installed: skipped", module)
    return found


class BootOrder:
    """Args:
    scheduler: asked once, when the router is ready: start the scheduler?
    gateway: start the HTTP gateway.
    """

    def __init__(self, *, scheduler: Callable[[], bool], gateway: bool) -> None:
        self.stage: Stage = "meta"
        self.workers: list[str] = []  # child ids of the configured workers (the root fills it)
        self._scheduler = scheduler
        self._gateway = gateway

    def advance(self, ready: Collection[str]) -> Stage | None:
        """The stage entered now that ``ready`` children are ready; None: no change.

        A core role means: spawn that child; ``workers``: start the configured models.
        """
        if self.stage == "meta" and "meta" in ready:
            self.stage = "router"
        elif self.stage == "router" and "router" in ready:
            self.stage = "scheduler" if self._scheduler() else self._after_scheduler()
        elif self.stage == "scheduler" and "scheduler" in ready:
            self.stage = self._after_scheduler()
        elif self.stage == "gateway" and "gateway" in ready:
            self.stage = "workers"
        else:
            return None
        return self.stage

    def _after_scheduler(self) -> Stage:
        return "gateway" if self._gateway else "workers"

    def up(self, starting: Callable[[str], bool]) -> bool:
        """True once (then the daemon is up): no configured worker is still ``starting``."""
        if self.stage == "workers" and not any(starting(cid) for cid in self.workers):
            self.stage = "up"
            return True
        return False
