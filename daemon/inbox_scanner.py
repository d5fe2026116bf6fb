"""The watch loop: rescan the inbox, hand every complete drop to the intake, report health.

Scans run at start-up, on filesystem events, every `poll_seconds` while drops are settling (or in
poll mode, or while the inbox is unreachable) and every `rescan_seconds` regardless. A scan only
reads the inbox's unclaimed entries, so it stays cheap however many jobs have run. If the inbox
disappears the daemon says so (unhealthy), keeps looking and resumes when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from datetime import datetime

import structlog
from pydantic import BaseModel

from scandrop.daemon.drops import Drop, Listing, Settling, scan_inbox
from scandrop.daemon.inbox_watch import InboxWatch, choose_mode, filesystem_type, is_network
from scandrop.daemon.job_intake import JobIntake
from scandrop.daemon.job_status import JobStatus, now
from scandrop.daemon.settings import Settings, WatchMode

log = structlog.get_logger("scandrop.scanner")

HEARTBEAT_SECONDS = 10.0  # the loop proves it is alive (systemd watchdog) at least this often


class WatchHealth(BaseModel):
    inbox: str
    filesystem: str
    mode: WatchMode
    stability_seconds: float
    healthy: bool = False
    problem: str | None = None
    last_scan_at: datetime | None = None


class WaitingDrop(BaseModel):
    name: str
    format: str
    files: int
    bytes: int
    waiting_for: str  # "files" (empty), "stability" (still changing or settling), "slot"
    unchanged_seconds: float


class InboxScanner:
    def __init__(self, settings: Settings, intake: JobIntake, on_job: Callable[[JobStatus], None]) -> None:
        self.settings = settings
        self.intake = intake
        self.on_job = on_job
        fstype = filesystem_type(settings.inbox)
        self.health = WatchHealth(
            inbox=str(settings.inbox),
            filesystem=fstype,
            mode=choose_mode(settings.watch_mode, fstype),
            stability_seconds=(
                max(settings.stability_seconds, settings.network_stability_seconds)
                if is_network(fstype)
                else settings.stability_seconds
            ),
        )
        self.waiting: list[WaitingDrop] = []
        self.beat = time.monotonic()  # last time the loop completed an iteration
        self._settling = Settling()
        self._refused: dict[str, Listing] = {}
        self._wake = asyncio.Event()

    @property
    def healthy(self) -> bool:
        return self.health.healthy

    def alive(self, within: float) -> bool:
        return time.monotonic() - self.beat < within

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        watch = InboxWatch(
            self.settings.inbox, self.health.mode, lambda: loop.call_soon_threadsafe(self._wake.set)
        )
        log.info(
            "watching", **self.health.model_dump(mode="json", exclude={"healthy", "problem", "last_scan_at"})
        )
        last_full = -float("inf")
        try:
            while True:
                woken = self._wake.is_set()
                self._wake.clear()
                busy = bool(self.waiting) or not self.healthy or self.health.mode == WatchMode.poll
                interval = self.settings.poll_seconds if busy else self.settings.rescan_seconds
                if woken or time.monotonic() - last_full >= interval:
                    last_full = time.monotonic()
                    await self._scan(watch)
                else:  # between scans only prove the inbox (and this loop) still answer
                    await self._probe()
                self.beat = time.monotonic()
                timeout = min(HEARTBEAT_SECONDS, max(0.05, interval - (time.monotonic() - last_full)))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
        finally:
            await asyncio.to_thread(watch.stop)

    async def _probe(self) -> None:
        try:
            await asyncio.to_thread(os.stat, self.settings.inbox)
        except OSError as exc:
            self._unhealthy(exc)

    async def _scan(self, watch: InboxWatch) -> None:
        s = self.settings
        try:
            await asyncio.to_thread(watch.ensure)
            drops = await asyncio.to_thread(scan_inbox, s.inbox, s.ignore, s.ready_marker, s.force_marker)
        except OSError as exc:
            self._unhealthy(exc)
            return
        if not self.healthy:
            log.info("inbox_available", inbox=str(s.inbox))
            self.intake.settle_claimed()  # moves deferred while it was gone
        self.health.healthy, self.health.problem, self.health.last_scan_at = True, None, now()
        self._settling.forget_missing({d.name for d in drops})
        waiting = []
        for drop in drops:
            if self._refused.get(drop.name) == drop.listing:
                continue  # could not be claimed (see the job's error); changes to it are a new try
            if self._settling.complete(drop, self.health.stability_seconds):
                self._take(drop)
            else:
                waiting.append(self._waiting(drop))
        self.waiting = waiting

    def _take(self, drop: Drop) -> None:
        self._settling.forget(drop.name)
        status = self.intake.take(drop)  # on the loop: the job book is not shared across threads
        if status is None:
            return
        if status.state.terminal:
            self._refused[drop.name] = drop.listing
        self.on_job(status)

    def _waiting(self, drop: Drop) -> WaitingDrop:
        return WaitingDrop(
            name=drop.name,
            format=drop.kind.value if drop.kind else "unknown",
            files=len(drop.listing),
            bytes=drop.size,
            waiting_for="files" if not drop.listing else "stability",
            unchanged_seconds=round(self._settling.waited(drop.name), 1),
        )

    def _unhealthy(self, exc: OSError) -> None:
        problem = f"the inbox {self.settings.inbox} cannot be read: {exc.strerror or exc}"
        if self.health.problem != problem:
            log.error("inbox_unavailable", inbox=str(self.settings.inbox), error=str(exc))
        self.health.healthy, self.health.problem = False, problem
        self.waiting = []
