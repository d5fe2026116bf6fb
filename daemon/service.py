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

from scandrop.daemon import retention
from scandrop.daemon.disk_space import CHECK_SECONDS, DiskSpace
from scandrop.daemon.events import Event, EventBus
from scandrop.daemon.http_api import build_app
from scandrop.daemon.inbox_scanner import HEARTBEAT_SECONDS, InboxScanner
from scandrop.daemon.job_book import JobBook
from scandrop.daemon.job_intake import JobIntake
from scandrop.daemon.job_runner import JobRunner
from scandrop.daemon.job_status import JobState, JobStatus, now
from scandrop.daemon.job_store import JobStore
from scandrop.daemon.metrics import Metrics
from scandrop.daemon.notifications import WebhookOutbox, run_on_finish
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
            settings,
            self.book,
            self.spool,
            self.device.model_dump(),
            inbox_ok=lambda job: self.scanners.get(job.hot_folder, self.scanner).healthy,
            space_ok=lambda: self.disk.ok,
        )
        self.scanner = InboxScanner(settings, self.intake, on_job=lambda _: self.runner.wake())
        self._hooks: set[asyncio.Task[int | None]] = set()
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
        self.webhooks = (
            WebhookOutbox(settings.state_dir / "jobs.sqlite3", settings.webhook_url, secret)
            if settings.webhook_url
            else None
        )
        self.metrics = Metrics(self)
        self.book.finished.append(self._job_finished)
        # Each hot folder: its own inbox, spool and outbox, the same job book and runner.
        self.intakes: dict[str | None, JobIntake] = {None: self.intake}
        self.scanners: dict[str | None, InboxScanner] = {None: self.scanner}
        for folder in settings.hot_folders:
            local = settings.model_copy(
                update={
                    "inbox": folder.inbox.absolute(),
                    "outbox": (folder.outbox or settings.outbox).absolute(),
                }
            )
            spool = Spool(local.spool)
            self.book.spools.append(spool)
            self.intakes[folder.name] = JobIntake(self.book, spool, local.outbox, hot_folder=folder.name)
            self.scanners[folder.name] = InboxScanner(
                local, self.intakes[folder.name], on_job=lambda _: self.runner.wake()
            )
        self.intake.siblings = {folder.name for folder in settings.hot_folders}
        watched = {"state_dir": settings.state_dir} | {f"outbox {p}": p for p in self.outboxes()}
        self.disk = DiskSpace(watched, settings.min_free_space_mb)
        self.disk.check()

    def job(self, job_id: str) -> JobStatus | None:
        live = self.runner.running.get(job_id)
        return live.status if live is not None else self.store.get(job_id)

    def recent_jobs(self, limit: int, state: JobState | None = None) -> list[JobStatus]:
        """Newest first."""
        return self.store.recent(limit, state)

    def cancel(self, job_id: str) -> JobStatus | None:
        """Cancel a queued or running job; None if there is no such job or it has finished."""
        return self.runner.cancel(job_id)

    def outboxes(self) -> list[Path]:
        return sorted({Path(intake.outbox) for intake in self.intakes.values()})

    def health(self) -> dict[str, Any]:
        problems = self.disk.problems()
        for scanner in self.scanners.values():
            if not scanner.healthy:
                problems.append(
                    scanner.health.problem or f"{scanner.settings.inbox} has not been scanned yet"
                )
            if not scanner.alive(3 * HEARTBEAT_SECONDS):
                problems.append(
                    f"the watch loop of {scanner.settings.inbox} has not run for over 30 s (a hung mount?)"
                )
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
                    {
                        "job_id": r.status.job_id,
                        "stage": r.status.stage,
                        "progress": r.status.progress,
                        "eta_seconds": r.status.eta_seconds,
                    }
                    for r in self.runner.running.values()
                ],
                "waiting": [
                    w.model_dump(mode="json") | ({"hot_folder": name} if name else {})
                    for name, scanner in self.scanners.items()
                    for w in scanner.waiting
                ],
            },
            "hot_folders": [
                {
                    **folder.model_dump(mode="json", exclude_none=True),
                    "watcher": self.scanners[folder.name].health.model_dump(mode="json"),
                }
                for folder in self.settings.hot_folders
            ],
            "page": {"viewer": viewer_versions()},
            "disk": {
                "min_free_space_mb": self.settings.min_free_space_mb,
                "ok": self.disk.ok,
                "paths": [f.model_dump() for f in self.disk.last],
            },
            "settings": {
                "concurrency": self.settings.concurrency,
                "preset": self.settings.preset.value,
                "job_timeout": self.settings.job_timeout,
                "executor": self.settings.executor.value,
            },
        }

    def metric_values(self) -> dict[str, Any]:
        counts = self.store.counts()
        return {
            "counts": counts,
            "queued": counts.get("queued", 0),
            "running": len(self.runner.running),
            "inboxes": [(str(s.settings.inbox), s.healthy, len(s.waiting)) for s in self.scanners.values()],
            "disk": self.disk.last,
            "disk_ok": 1.0 if self.disk.ok else 0.0,
            "healthy": 1.0 if self.health()["ok"] else 0.0,
            "webhooks_pending": self.webhooks.pending() if self.webhooks is not None else None,
        }

    def _job_finished(self, status: JobStatus) -> None:
        self.metrics.job_finished(status)
        if self.webhooks is not None:
            self.webhooks.enqueue(status)
        if self.settings.on_finish:
            hook = run_on_finish(self.settings.on_finish, status, self.settings.on_finish_timeout)
            task = asyncio.get_running_loop().create_task(hook, name=f"on-finish-{status.job_id}")
            self._hooks.add(task)
            task.add_done_callback(self._hooks.discard)

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
        folders = [self.settings.inbox, self.settings.outbox]
        folders += [s.settings.inbox for s in self.scanners.values()]
        folders += [Path(i.outbox) for i in self.intakes.values()]
        for folder in folders:
            if not folder.exists() and folder.parent.exists():  # first run; never create mount points
                folder.mkdir()
        self.runner.kill_orphans()
        for intake in self.intakes.values():
            intake.recover()
        tasks = [
            *(
                asyncio.create_task(scanner.run(), name=f"scanner-{name or 'inbox'}")
                for name, scanner in self.scanners.items()
            ),
            asyncio.create_task(self.runner.run(), name="runner"),
            asyncio.create_task(self._tell_systemd(), name="systemd"),
            asyncio.create_task(self._publish_service_changes(), name="service-events"),
        ]
        tasks.append(asyncio.create_task(self._watch_disk(), name="disk"))
        if self.settings.retention_days is not None:
            tasks.append(asyncio.create_task(self._retention(self.settings.retention_days), name="retention"))
        if self.webhooks is not None:
            tasks.append(asyncio.create_task(self.webhooks.run(), name="webhooks"))
        yield
        await self.runner.shutdown()
        if self._hooks:  # on_finish commands still running: a moment to end, then killed
            await asyncio.wait(self._hooks, timeout=5)
        tasks += self._hooks
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.store.close()
        if self.webhooks is not None:
            self.webhooks.close()

    async def _watch_disk(self) -> None:
        while True:
            was = self.disk.ok
            await asyncio.to_thread(self.disk.check)
            if was != self.disk.ok:
                log.warning("disk_space", ok=self.disk.ok, problems=self.disk.problems())
                self.runner.wake()
            await asyncio.sleep(CHECK_SECONDS)

    async def sweep_once(self, days: float) -> list[Path]:
        """Remove finished jobs' folders older than `days` (see retention); never a running job's."""
        found = retention.candidates(
            self.store, self.book.spools, self.outboxes(), self.settings.state_dir / "work", days
        )
        return await asyncio.to_thread(retention.remove_old, found, days, set(self.runner.running))

    async def _retention(self, days: float) -> None:
        while True:
            await self.sweep_once(days)
            await asyncio.sleep(retention.SWEEP_SECONDS)

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
            seen = (
                self.health(),
                [(w.name, w.waiting_for, w.files) for s in self.scanners.values() for w in s.waiting],
            )
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
