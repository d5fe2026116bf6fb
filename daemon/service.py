"""The daemon, assembled: watcher -> intake -> job queue -> runner -> outbox, and the status server.

aiohttp owns the lifecycle: the scanner and the runner start and stop as one cleanup context of
the app. SIGTERM (systemd stop) or Ctrl-C: stop taking jobs, stop the running ones cleanly and
leave them queued, close WebSockets, exit. systemd hears READY, STATUS and watchdog pings.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from scandrop.daemon.events import Event, EventBus
from scandrop.daemon.http_api import build_app
from scandrop.daemon.inbox_scanner import HEARTBEAT_SECONDS, InboxScanner
from scandrop.daemon.job_book import JobBook
from scandrop.daemon.job_intake import JobIntake
from scandrop.daemon.job_runner import JobRunner
from scandrop.daemon.job_status import JobState, JobStatus, now
from scandrop.daemon.job_store import JobStore
from scandrop.daemon.settings import ExecutorKind, Settings
from scandrop.daemon.spool import Spool
from scandrop.daemon.status_page import BUILD_COMMAND, viewer_versions
from scandrop.daemon.systemd_notify import notify, watchdog_interval
from scandrop.models.device import DeviceRequest, resolve_device_in_child
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.plan import kinds_plan
from scandrop.pipeline.report import scandrop_version

log = structlog.get_logger("scandrop.daemon")

STATUS_SECONDS = 2.0  # systemd STATUS= line refresh


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Once, in a child: an impossible request stops start-up; CUDA libraries never load here.
        # With Ray, each job's node resolves the request itself (a GPU daemon box is not needed).
        ray = settings.executor == ExecutorKind.ray
        self.device = resolve_device_in_child(DeviceRequest.auto if ray else settings.device)
        self.started_at = now()
        self.store = JobStore(settings.state_dir / "jobs.sqlite3")
        self.bus = EventBus()
        self.spool = Spool(settings.spool)
        self.book = JobBook(self.store, self.bus, self.spool)
        self.intake = JobIntake(self.book, self.spool, settings.outbox)
        self.runner = JobRunner(
            settings, self.book, self.spool, self.device.model_dump(), inbox_ok=lambda: self.scanner.healthy
        )
        self.scanner = InboxScanner(settings, self.intake, on_job=lambda _: self.runner.wake())

    def job(self, job_id: str) -> JobStatus | None:
        live = self.runner.running.get(job_id)
        return live.status if live is not None else self.store.get(job_id)

    def recent_jobs(self, limit: int, state: JobState | None = None) -> list[JobStatus]:
        """Newest first."""
        return self.store.recent(limit, state)

    def cancel(self, job_id: str) -> JobStatus | None:
        """Cancel a queued or running job; None if there is no such job or it has finished."""
        return self.runner.cancel(job_id)

    def health(self) -> dict[str, Any]:
        problems = []
        if not self.scanner.healthy:
            problems.append(self.scanner.health.problem or "the inbox has not been scanned yet")
        if not self.scanner.alive(3 * HEARTBEAT_SECONDS):
            problems.append("the watch loop has not run for over 30 s (a hung mount?)")
        if (executor_problem := self.runner.executor.problem()) is not None:
            problems.append(executor_problem)
        return {"ok": not problems, "problems": problems}

    def status(self) -> dict[str, Any]:
        return {
            "version": scandrop_version(),
            "started_at": self.started_at.isoformat(),
            "device": self.device.model_dump(mode="json"),
            "plan": {
                kind: [p.model_dump() for p in plan]
                for kind, plan in kinds_plan(self.device.model_dump()).items()
            },
            "health": self.health(),
            "watcher": self.scanner.health.model_dump(mode="json"),
            "queue": {
                "counts": self.store.counts(),
                "running": [
                    {"job_id": r.status.job_id, "stage": r.status.stage, "progress": r.status.progress}
                    for r in self.runner.running.values()
                ],
                "waiting": [w.model_dump(mode="json") for w in self.scanner.waiting],
            },
            "page": {"viewer": viewer_versions()},
            "settings": {
                "concurrency": self.settings.concurrency,
                "preset": self.settings.preset.value,
                "job_timeout": self.settings.job_timeout,
                "executor": self.settings.executor.value,
            },
        }

    def status_line(self) -> str:
        """One line for `systemctl status`."""
        if not self.scanner.healthy:
            return self.scanner.health.problem or "starting"
        parts = [
            f"{r.status.job_id}: {r.status.stage or 'starting'} {r.status.progress * 100:.0f}%"
            for r in self.runner.running.values()
        ]
        queued = self.store.counts().get("queued", 0) - len(parts)
        return "; ".join(parts or ["idle"]) + (f"; {queued} queued" if queued > 0 else "")

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        for folder in (self.settings.inbox, self.settings.outbox):
            if not folder.exists() and folder.parent.exists():  # first run; never create mount points
                folder.mkdir()
        self.runner.kill_orphans()
        self.intake.recover()
        tasks = [
            asyncio.create_task(self.scanner.run(), name="scanner"),
            asyncio.create_task(self.runner.run(), name="runner"),
            asyncio.create_task(self._tell_systemd(), name="systemd"),
            asyncio.create_task(self._publish_service_changes(), name="service-events"),
        ]
        yield
        await self.runner.shutdown()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.store.close()

    async def _tell_systemd(self) -> None:
        """STATUS= every few seconds; WATCHDOG=1 only while the watch loop is alive."""
        ping = watchdog_interval()
        last = ""
        while True:
            line = self.status_line()
            if line != last:
                notify(STATUS=line)
                last = line
            if ping is not None and self.scanner.alive(3 * HEARTBEAT_SECONDS):
                notify(WATCHDOG=1)
            await asyncio.sleep(min(ping or STATUS_SECONDS, STATUS_SECONDS))

    async def _publish_service_changes(self) -> None:
        """A "service" event when health or the waiting drops change, so the page needs no polling."""
        last: Any = None
        while True:
            seen = (self.health(), [(w.name, w.waiting_for, w.files) for w in self.scanner.waiting])
            if last is not None and seen != last:
                self.bus.publish(Event(type="service", status=self.status()))
            last = seen
            await asyncio.sleep(STATUS_SECONDS)


async def serve(settings: Settings) -> None:
    # Absolute paths in status.json and the API, whatever the working directory was.
    settings = settings.model_copy(
        update={name: getattr(settings, name).absolute() for name in ("inbox", "outbox", "state_dir")}
    )
    service = Service(settings)
    runner = web.AppRunner(build_app(service), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.http_host, settings.http_port)
        try:
            await site.start()
        except OSError as exc:
            raise ScandropError(
                ErrorCode.invalid_settings,
                f"Cannot listen on {settings.http_host}:{settings.http_port}: {exc.strerror or exc}.",
                "Choose another http_port (SCANDROP_HTTP_PORT) or stop what is using it.",
            ) from exc
        host, port = runner.addresses[0][:2]
        log.info("listening", url=f"http://{host}:{port}/", inbox=str(Path(settings.inbox).resolve()))
        if viewer_versions() is None:
            log.warning("status_page_without_viewer", hint=f"run `{BUILD_COMMAND}` in scandrop's folder")
        notify(READY=1, STATUS=f"listening on {host}:{port}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping", running=len(service.runner.running))
        notify(STOPPING=1, STATUS="stopping: re-queueing running jobs")
    finally:
        await runner.cleanup()
    log.info("stopped")
