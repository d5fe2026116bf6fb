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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import structlog

from scandrop.daemon.drops import content_hash, content_patterns
from scandrop.daemon.events import ModelEvent
from scandrop.daemon.job_book import JobBook
from scandrop.daemon.job_execution import ExecutionInfo, Executor, JobHooks, JobRequest, LocalExecutor
from scandrop.daemon.job_settings import DROP_SETTINGS_FILE, JobSettings, effective, read_drop_options
from scandrop.daemon.job_status import JobState, JobStatus, list_outputs, missing_input, now, quality_summary
from scandrop.daemon.settings import ExecutorKind, Settings
from scandrop.daemon.spool import Spool
from scandrop.daemon.worker import GRACE_SECONDS, kill_group
from scandrop.models.device import DeviceRequest, resolve_device_in_child
from scandrop.pipeline.core.errors import ErrorCode, ErrorInfo, ScandropError
from scandrop.pipeline.core.stage import ProgressEvent
from scandrop.pipeline.core.workspace import clean_work_dir
from scandrop.pipeline.job_spec import JobSpec, merge_overrides, triangle_cap
from scandrop.pipeline.report import Report

log = structlog.get_logger("scandrop.runner")

CANCELLED_BEFORE_START = ErrorInfo(
    code=ErrorCode.cancelled,
    message="Cancelled before it started.",
    hint="The input is kept in failed/; move it back into the inbox to run it.",
)
PROGRESS_EVENT_SECONDS = 0.25  # WebSocket progress events per job at most this often
STATUS_WRITE_SECONDS = 2.0  # status.json rewritten at least this often while a job runs
WAITING_FOR_SPACE = "waiting for disk space (below min_free_space_mb)"
ETA_MIN_SECONDS = 5.0  # a remaining-time estimate only after this long running ...
ETA_MIN_PROGRESS = 0.03  # ... and this much progress made in this run


def estimate_remaining(elapsed: float, progress_at_start: float, progress: float) -> float | None:
    """Seconds left at the pace of this run so far (the stage weights approximate each stage's
    share of the time, so the pace carries over), or None while there is too little to go on."""
    gained = progress - progress_at_start
    if elapsed < ETA_MIN_SECONDS or gained < ETA_MIN_PROGRESS:
        return None
    return round(elapsed * (1.0 - progress) / gained, 1)


@dataclass
class Running:
    status: JobStatus
    stop: threading.Event = field(default_factory=threading.Event)
    shutdown: bool = False
    last_event: float = 0.0
    last_write: float = field(default_factory=time.monotonic)
    run_started: float | None = None  # first progress event of this run, and the progress then
    progress_at_start: float = 0.0


def make_executor(settings: Settings) -> Executor:
    if settings.executor == ExecutorKind.ray:
        from scandrop.daemon.ray_executor import RayExecutor  # Ray loads only for this executor

        return RayExecutor(settings)
    return LocalExecutor(warm=settings.warm_up)


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        book: JobBook,
        spool: Spool,
        device: dict[str, Any],
        inbox_ok: Callable[[JobStatus], bool],
        space_ok: Callable[[], bool] = lambda: True,
    ) -> None:
        self.settings = settings
        self.book = book
        self.spool = spool
        self.device = device
        self.inbox_ok = inbox_ok  # the job's input lives on its inbox's filesystem
        self.space_ok = space_ok  # below min_free_space_mb new jobs wait
        self._devices: dict[DeviceRequest, dict[str, Any]] = {settings.device: device}
        self.executor = make_executor(settings)
        # Each running job holds a thread for its whole life: its own pool, so that many jobs (a
        # cluster's worth) never starve asyncio's default pool, which the scanner needs.
        self._job_threads = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="job")
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
            space = self.space_ok()  # below min_free_space_mb new jobs wait
            if space and self.executor.problem() is None:  # a Ray cluster may be unreachable a while
                free = self.settings.concurrency - len(self.running)
                waiting = [
                    s
                    for s in self.book.store.in_states(JobState.queued)
                    if s.job_id not in self.running and self.inbox_ok(s)
                ]
                for status in waiting[: max(0, free)]:  # a started job stays queued while it is hashed
                    self._start(status)
            elif not space:  # say why on each queued job, once
                for status in self.book.store.in_states(JobState.queued):
                    if status.job_id not in self.running and status.message != WAITING_FOR_SPACE:
                        status.message = WAITING_FOR_SPACE
                        self.book.commit(status, "state")
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
        self._job_threads.shutdown(wait=False)
        await asyncio.to_thread(self.executor.close)

    async def _execute(self, entry: Running) -> None:
        status = entry.status
        bound = log.bind(job_id=status.job_id)
        try:
            input_path = Path(status.input.location)
            if not input_path.exists() and not input_path.is_symlink():
                self._finish(status, missing_input(status))
                return
            if status.settings is None:  # once: a resumed job keeps what it started with
                status.settings = self.job_settings(status, input_path)
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
            same = earlier is not None and (
                earlier.settings is None or earlier.settings.same_work(status.settings)
            )
            if earlier is not None and earlier.job_id != status.job_id and same:
                self._finish_duplicate(status, earlier)
                return
            status.state = JobState.running
            status.attempts += 1
            status.started_at = status.started_at or now()
            if self.settings.executor == ExecutorKind.ray:  # the node that runs it resolves the request
                status.device = self.device
            else:
                status.device = await self._device(status.settings.device)
            status.message = "starting"
            self.book.commit(status, "state")
            bound.info(
                "job_started",
                input=status.input.name,
                attempt=status.attempts,
                device=status.device.get("name"),
                preset=status.settings.preset.value,
                settings=status.settings.sources,
            )
            report = await self._loop.run_in_executor(self._job_threads, self._run_process, entry)
            self.book.store.set_process(status.job_id, None, None)
            self._conclude(entry, report)
        except ScandropError as exc:  # the job's own settings (its drop file, its device): its failure
            self._finish(status, exc.info())
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
            self.book.bus.forget_model(status.job_id)
            self._wake.set()

    def _run_process(self, entry: Running) -> Report:
        """In a worker thread: the job process lives exactly as long as this call."""
        status = entry.status
        loop = self._loop
        spec = self.job_spec(status)

        def started(pid: int) -> None:
            with contextlib.suppress(psutil.Error):
                created = psutil.Process(pid).create_time()
                loop.call_soon_threadsafe(self.book.store.set_process, status.job_id, pid, created)

        def attempt(number: int, where: ExecutionInfo, device: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(self._attempt, entry, number, where, device)

        request = JobRequest(
            job_id=status.job_id,
            input_path=Path(status.input.location),
            out_dir=Path(status.outbox),
            work_dir=self.work_dir(status.job_id),
            spec=spec,
            device=status.device,
            timeout=self.settings.job_timeout,
            input_bytes=status.input.bytes,
            device_request=status.settings.device.value if status.settings else self.settings.device.value,
        )
        hooks = JobHooks(
            on_event=lambda e: loop.call_soon_threadsafe(self._progress, entry, e),
            should_stop=entry.stop.is_set,
            on_start=started,
            on_attempt=attempt,
        )
        return self.executor.run(request, hooks)  # the one dispatch point: local process or Ray task

    def job_settings(self, status: JobStatus, input_path: Path) -> JobSettings:
        """Global settings < the job's hot folder < the drop's scandrop.toml (invalid_settings if bad)."""
        s = self.settings
        base = JobSettings(
            preset=s.preset, device=s.device, max_triangles=s.max_triangles, sources=["settings"]
        )
        folder = next((h for h in s.hot_folders if h.name == status.hot_folder), None)
        return effective(
            base,
            (f"hot folder {status.hot_folder}", folder),
            (DROP_SETTINGS_FILE, read_drop_options(input_path)),
        )

    def job_spec(self, status: JobStatus) -> JobSpec:
        job = status.settings or self.job_settings(status, Path(status.input.location))
        overrides = merge_overrides(triangle_cap(job.max_triangles), job.stages)
        for stage in ("single_view", "fill", "sparse"):  # the daemon's models, whatever a drop says
            overrides.setdefault(stage, {})["models_dir"] = str(self.settings.models_dir)
        return JobSpec(preset=job.preset, overrides=overrides)

    async def _device(self, request: DeviceRequest) -> dict[str, Any]:
        """Each device a job asks for is resolved once (in a child: CUDA never loads here)."""
        if request not in self._devices:
            info = await asyncio.to_thread(resolve_device_in_child, request)
            self._devices[request] = info.model_dump()
        return self._devices[request]

    def work_dir(self, job_id: str) -> Path:
        return self.settings.state_dir / "work" / job_id

    def _attempt(self, entry: Running, number: int, where: ExecutionInfo, device: dict[str, Any]) -> None:
        """Where an attempt runs; a second one (its node died, Ray re-ran it) counts in attempts."""
        status = entry.status
        if number > 1:
            status.attempts += 1
            status.stage, status.stage_progress, status.progress = None, 0.0, 0.0
            status.message = f"retried on another node (attempt {number})"
            log.warning("job_retried_elsewhere", job_id=status.job_id, attempt=number, node=where.node)
        status.execution, status.device = where, device
        self.book.commit(status, "state")

    def _progress(self, entry: Running, event: ProgressEvent) -> None:
        status = entry.status
        if event.model is not None:  # the live view: to the pages that opened the job, never stored
            self.book.bus.publish_model(
                ModelEvent(job_id=status.job_id, stage=event.stage, model=event.model)
            )
            event = event.model_copy(update={"model": None})
        new_stage = event.stage != status.stage
        status.stage, status.stage_progress = event.stage, round(event.stage_progress, 4)
        status.progress, status.message = round(event.progress, 4), event.message
        t = time.monotonic()
        if entry.run_started is None:
            entry.run_started, entry.progress_at_start = t, event.progress
        status.eta_seconds = estimate_remaining(
            t - entry.run_started, entry.progress_at_start, event.progress
        )
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
        if code == ErrorCode.worker_crashed and (problem := self.executor.problem()) is not None:
            status.attempts -= 1  # the cluster went away, not the job's fault: it waits for it
            self._requeue(status, problem)
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
        status.eta_seconds = None
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
