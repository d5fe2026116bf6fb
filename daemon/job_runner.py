"""Runs queued jobs, at most `concurrency` at a time, each in its own process (daemon/worker.py).

A job's life: queued -> running -> succeeded | failed | cancelled. Identical input that already
succeeded is not run again (content hash) unless the drop was forced. A crashed job process is a
transient fault and is retried up to `max_retries`; every other failure is final. On shutdown the
runner stops taking jobs, stops the running ones cleanly and leaves them queued: the next start
resumes them from their workspace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import structlog

from scandrop.daemon.drops import content_hash, content_patterns
from scandrop.daemon.job_book import JobBook
from scandrop.daemon.job_status import JobState, JobStatus, list_outputs, missing_input, now, quality_summary
from scandrop.daemon.settings import Settings
from scandrop.daemon.spool import Spool
from scandrop.daemon.worker import GRACE_SECONDS, kill_group, run_job
from scandrop.pipeline.core.errors import ErrorCode, ErrorInfo
from scandrop.pipeline.core.stage import ProgressEvent
from scandrop.pipeline.core.workspace import clean_work_dir
from scandrop.pipeline.job_spec import JobSpec
from scandrop.pipeline.report import Report

log = structlog.get_logger("scandrop.runner")

CANCELLED_BEFORE_START = ErrorInfo(
    code=ErrorCode.cancelled,
    message="Cancelled before it started.",
    hint="The input is kept in failed/; move it back into the inbox to run it.",
)
PROGRESS_EVENT_SECONDS = 0.25  # WebSocket progress events per job at most this often
STATUS_WRITE_SECONDS = 2.0  # status.json rewritten at least this often while a job runs


@dataclass
class Running:
    status: JobStatus
    stop: threading.Event = field(default_factory=threading.Event)
    shutdown: bool = False
    last_event: float = 0.0
    last_write: float = field(default_factory=time.monotonic)


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        book: JobBook,
        spool: Spool,
        device: dict[str, Any],
        inbox_ok: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.book = book
        self.spool = spool
        self.device = device
        self.inbox_ok = inbox_ok
        self.running: dict[str, Running] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._accepting = True

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Start queued jobs whenever a slot is free; refresh status.json of running ones."""
        self._loop = asyncio.get_running_loop()
        while self._accepting:
            self._wake.clear()
            if self.inbox_ok():  # inputs live on the inbox's filesystem
                free = self.settings.concurrency - len(self.running)
                waiting = [
                    s for s in self.book.store.in_states(JobState.queued) if s.job_id not in self.running
                ]
                for status in waiting[: max(0, free)]:  # a started job stays queued while it is hashed
                    self._start(status)
            self._refresh_running()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), STATUS_WRITE_SECONDS)

    def _start(self, status: JobStatus) -> None:
        entry = Running(status=status)
        self.running[status.job_id] = entry
        task = asyncio.create_task(self._execute(entry), name=f"job-{status.job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self, job_id: str) -> JobStatus | None:
        """Cancel a queued or running job; None if there is no such job or it has finished."""
        entry = self.running.get(job_id)
        if entry is not None:
            entry.stop.set()
            return entry.status
        status = self.book.store.get(job_id)
        if status is None or status.state != JobState.queued:
            return None
        self._finish(status, CANCELLED_BEFORE_START)
        return status

    async def shutdown(self) -> None:
        """Stop taking jobs; stop running ones cleanly; they stay queued for the next start."""
        self._accepting = False
        self._wake.set()
        for entry in self.running.values():
            entry.shutdown = True
            entry.stop.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=GRACE_SECONDS + 20)

    async def _execute(self, entry: Running) -> None:
        status = entry.status
        bound = log.bind(job_id=status.job_id)
        try:
            input_path = Path(status.input.location)
            if not input_path.exists() and not input_path.is_symlink():
                self._finish(status, missing_input(status))
                return
            if status.content_hash is None:  # what the scanner compares: junk and markers left out
                s = self.settings
                patterns = content_patterns(s.ignore, s.ready_marker, s.force_marker)
                status.content_hash = await asyncio.to_thread(content_hash, input_path, patterns)
            if entry.shutdown:
                return  # stopping while it was hashed: it is still queued
            if entry.stop.is_set():
                self._finish(status, CANCELLED_BEFORE_START)
                return
            earlier = None if status.forced else self.book.store.succeeded_with(status.content_hash)
            if earlier is not None and earlier.job_id != status.job_id:
                self._finish_duplicate(status, earlier)
                return
            status.state = JobState.running
            status.attempts += 1
            status.started_at = status.started_at or now()
            status.device = self.device
            status.message = "starting"
            self.book.commit(status, "state")
            bound.info(
                "job_started",
                input=status.input.name,
                attempt=status.attempts,
                device=self.device.get("name"),
            )
            report = await asyncio.to_thread(self._run_process, entry)
            self.book.store.set_process(status.job_id, None, None)
            self._conclude(entry, report)
        except Exception:  # a bug in the daemon's own bookkeeping must not leave the job "running"
            bound.exception("job_bookkeeping_failed")
            self._finish(
                status,
                ErrorInfo(
                    code=ErrorCode.internal_error,
                    message="scandrop could not finish the bookkeeping of this job.",
                    hint="This is a bug in scandrop: please report it with the log.",
                ),
            )
        finally:
            self.running.pop(status.job_id, None)
            self._wake.set()

    def _run_process(self, entry: Running) -> Report:
        """In a worker thread: the job process lives exactly as long as this call."""
        status = entry.status
        loop = self._loop
        spec = JobSpec(
            preset=self.settings.preset,
            overrides={
                "mesh": {"max_triangles": self.settings.max_triangles},
                "single_view": {"models_dir": str(self.settings.models_dir)},
                "fill": {"models_dir": str(self.settings.models_dir)},
                "sparse": {"models_dir": str(self.settings.models_dir)},
            },
        )

        def started(pid: int) -> None:
            with contextlib.suppress(psutil.Error):
                created = psutil.Process(pid).create_time()
                loop.call_soon_threadsafe(self.book.store.set_process, status.job_id, pid, created)

        return run_job(
            Path(status.input.location),
            Path(status.outbox),
            spec,
            self.work_dir(status.job_id),
            self.device,
            on_event=lambda e: loop.call_soon_threadsafe(self._progress, entry, e),
            should_stop=entry.stop.is_set,
            timeout=self.settings.job_timeout,
            on_start=started,
        )

    def work_dir(self, job_id: str) -> Path:
        return self.settings.state_dir / "work" / job_id

    def _progress(self, entry: Running, event: ProgressEvent) -> None:
        status = entry.status
        new_stage = event.stage != status.stage
        status.stage, status.stage_progress = event.stage, round(event.stage_progress, 4)
        status.progress, status.message = round(event.progress, 4), event.message
        t = time.monotonic()
        if new_stage or t - entry.last_write >= STATUS_WRITE_SECONDS:
            entry.last_write = entry.last_event = t
            self.book.commit(status, "stage" if new_stage else "progress")
            if new_stage:
                log.info("stage", job_id=status.job_id, stage=event.stage)
        elif t - entry.last_event >= PROGRESS_EVENT_SECONDS:
            entry.last_event = t
            self.book.announce(status, "progress")

    def _refresh_running(self) -> None:
        """status.json says a job is alive at least every few seconds, even in a silent stage."""
        t = time.monotonic()
        for entry in self.running.values():
            if entry.status.state == JobState.running and t - entry.last_write >= STATUS_WRITE_SECONDS:
                entry.last_write = t
                self.book.commit(entry.status, "progress")

    def _conclude(self, entry: Running, report: Report) -> None:
        status = entry.status
        code = report.error.code if report.error else None
        if entry.shutdown and code in (ErrorCode.cancelled, ErrorCode.worker_crashed):
            status.attempts -= 1  # not the job's fault
            self._requeue(status, "interrupted by shutdown; resumes at the next start")
            return
        if code == ErrorCode.worker_crashed and status.attempts <= self.settings.max_retries:
            self._requeue(
                status, f"the job process crashed; retry {status.attempts} of {self.settings.max_retries}"
            )
            return
        status.report = quality_summary(report)
        if report.ok:
            status.outputs = list_outputs(Path(status.outbox), report.outputs)
        self._finish(status, report.error)

    def _requeue(self, status: JobStatus, why: str) -> None:
        status.state = JobState.queued
        status.stage, status.stage_progress, status.progress = None, 0.0, 0.0
        status.message = why
        self.book.commit(status, "state")
        log.warning("job_requeued", job_id=status.job_id, reason=why)

    def _finish_duplicate(self, status: JobStatus, earlier: JobStatus) -> None:
        status.duplicate_of = earlier.job_id
        status.outputs, status.report = earlier.outputs, earlier.report
        status.message = (
            f"identical to {earlier.job_id}, already reconstructed: its outputs are in {earlier.outbox} "
            f"(add a {self.settings.force_marker} file to the drop to run it again)"
        )
        self._finish(status, None)

    def _finish(self, status: JobStatus, error: ErrorInfo | None) -> None:
        self.book.finish(status, error)
        clean_work_dir(self.work_dir(status.job_id))

    def kill_orphans(self) -> None:
        """Job processes left by a daemon that died (kill -9): kill them before their job re-runs."""
        for status in self.book.store.in_states(JobState.running):
            proc = self.book.store.process(status.job_id)
            if proc is None:
                continue
            pgid, created = proc
            left = []
            for p in psutil.process_iter(["create_time"]):
                with contextlib.suppress(psutil.Error, OSError):
                    if os.getpgid(p.pid) == pgid and p.info["create_time"] >= created - 1:
                        left.append(p.pid)
            if left:  # the job's group (leader and its workers) outlived the daemon
                log.warning("killing_orphaned_job_processes", job_id=status.job_id, pids=left)
                kill_group(pgid)
            self.book.store.set_process(status.job_id, None, None)
