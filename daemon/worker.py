"""Run one job's pipeline in a child process, so a crash in native code cannot take the caller down.

The child streams ProgressEvents back over a queue. Cancellation and the per-job timeout are
enforced from the parent: first a polite stop flag, then SIGKILL for the child and everything it
started. Whatever happens, the caller gets a Report, and report.json in the output folder says it.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import psutil

from scandrop.pipeline.core.child_process import die_with
from scandrop.pipeline.core.cpu_budget import JOB_CPUS_ENV
from scandrop.pipeline.core.errors import ErrorCode, ErrorInfo, ScandropError, disk_full, disk_nearly_full
from scandrop.pipeline.core.stage import (
    CANCELLED_HINT,
    OnEvent,
    ProgressEvent,
    StopCheck,
    never_stop,
    write_json_atomic,
)
from scandrop.pipeline.dense.view_map import ViewMapper
from scandrop.pipeline.job_spec import JobSpec
from scandrop.pipeline.report import Report, new_report

GRACE_SECONDS = 10.0
# Job processes fork from multiprocessing's fork server, a fresh interpreter that has imported the
# pipeline once: each job started in a new interpreter paid 2.6 s of imports (trimesh, scipy, numba,
# pycolmap), a drop that fails at once included; forked, it starts in about 0.1 s. The server never
# runs a job itself and has no threads, so no lock or thread of the daemon is copied into a job.
JOB_MODULES = ["scandrop.daemon.worker", "scandrop.pipeline.presets", "scandrop.pipeline.run"]


def _job_context() -> mp.context.BaseContext:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(JOB_MODULES)
    return ctx


def _child(
    input_dir: str,
    out_dir: str,
    spec_json: str,
    work_dir: str,
    device: dict[str, Any],
    events: mp.Queue,
    stop: Event,
    lifeline: Connection,
    map_views: ViewMapper | None = None,
    cpus: float | None = None,
) -> None:
    os.setpgid(0, 0)  # the job and every process it starts form one group, killed as one
    die_with(lifeline)  # a killed daemon takes its job with it
    if cpus is not None:  # the stages size their pools to it (cpu_budget); the job's processes inherit it
        os.environ[JOB_CPUS_ENV] = str(cpus)
    from scandrop.pipeline.presets import resolve  # only job processes load the stages
    from scandrop.pipeline.run import run_pipeline

    spec = JobSpec.model_validate_json(spec_json)
    try:
        config = resolve(spec)
    except ScandropError as exc:  # a bad override: the job's fault, said as such, not a crash
        report = _failed_report(Path(input_dir), Path(out_dir), spec, device, datetime.now(UTC), exc.info())
        events.put(("report", report.model_dump_json()))
        return
    started = datetime.now(UTC)
    try:
        report = run_pipeline(
            Path(input_dir),
            Path(out_dir),
            config,
            Path(work_dir),
            device=device,
            on_event=lambda e: events.put(("event", e.model_dump_json())),
            should_stop=stop.is_set,
            map_views=map_views,
        )
    except OSError as exc:  # the disk filled up outside a stage (the workspace, report.json)
        full = disk_full(exc)
        if full is None:
            raise
        report = _failed_report(Path(input_dir), Path(out_dir), spec, device, started, full)
    events.put(("report", report.model_dump_json()))


def _warm_child(lifeline: Connection) -> None:
    # Not a process group of its own (that is what marks a job's processes); it starts none.
    die_with(lifeline, group=False)
    os.nice(19)  # only what jobs and the daemon leave idle
    from scandrop.pipeline import warm_kernels

    warm_kernels.warm()


def warm_up(should_stop: StopCheck = never_stop, timeout: float = 900.0) -> float | None:
    """Compile the pipeline's numba kernels (or load them from numba's cache) in a child of the
    jobs' fork server at the lowest CPU priority, so the first job after an install does not pay for
    it (pipeline/warm_kernels.py); this also starts the fork server before the first job. Returns
    the seconds it took, or None when it failed, was stopped or ran past `timeout`."""
    ctx = _job_context()
    lifeline, held = ctx.Pipe(duplex=False)  # as a job's: it dies with this process
    proc = ctx.Process(target=_warm_child, name="scandrop-warm-up", daemon=False, args=(lifeline,))
    t0 = time.monotonic()
    proc.start()
    lifeline.close()
    try:
        while proc.exitcode is None and not should_stop() and time.monotonic() - t0 < timeout:
            proc.join(0.2)
    finally:
        if proc.exitcode is None:
            _kill_tree(proc.pid)  # type: ignore[arg-type]
        proc.join()
        held.close()
    return time.monotonic() - t0 if proc.exitcode == 0 else None


def _drain(events: mp.Queue, on_event: OnEvent | None, wait: float) -> Report | None:
    """Pass on every queued progress event; return the report if the child sent it."""
    while True:
        try:
            kind, payload = events.get(timeout=wait)
        except queue.Empty:
            return None
        wait = 0.0
        if kind == "report":
            return Report.model_validate_json(payload)
        if on_event is not None:
            on_event(ProgressEvent.model_validate_json(payload))


def kill_group(pgid: int) -> None:
    """Kill what is left of a job's process group (e.g. workers orphaned by a crashed job process)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _kill_tree(pid: int) -> None:
    try:
        proc = psutil.Process(pid)
        procs = [*proc.children(recursive=True), proc]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(procs, timeout=5)


def _failed_report(
    input_dir: Path,
    out_dir: Path,
    spec: JobSpec,
    device: dict[str, Any],
    started: datetime,
    error: ErrorInfo,
) -> Report:
    report = new_report(input_dir, out_dir, spec.preset.value, spec.model_dump(mode="json"), device, started)
    report.error = error
    report.finish()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for partial in out_dir.rglob(".*.part*"):  # half-written outputs of a killed job
            partial.unlink(missing_ok=True)
        write_json_atomic(out_dir / "report.json", report.model_dump(mode="json"))
    except OSError as exc:  # a full disk: the Report still says what happened (status.json, API)
        if disk_full(exc) is None:
            raise
    return report


def run_job(
    input_dir: Path,
    out_dir: Path,
    spec: JobSpec,
    work_dir: Path,
    device: dict[str, Any],
    on_event: OnEvent | None = None,
    should_stop: StopCheck = never_stop,
    timeout: float | None = None,
    on_start: Callable[[int], None] | None = None,
    map_views: ViewMapper | None = None,
    cpus: float | None = None,
) -> Report:
    """Run the pipeline in its own process; returns its Report even when the process dies.

    The process dies with this one (its lifeline closes), and a thread that leaves early kills it on
    its way out. `on_start` receives the job's pid (= its process group id).
    `map_views` (picklable: it crosses into the job process) runs the depth stage's views elsewhere.
    `cpus`: what the executor reserved for the job (a Ray task's CPUs); None: the machine's budget.
    """
    ctx = _job_context()
    lifeline, held = ctx.Pipe(duplex=False)  # the job holds one end, only this process the other
    events: mp.Queue = ctx.Queue()
    stop = ctx.Event()
    started = datetime.now(UTC)
    proc = ctx.Process(
        target=_child,
        name="scandrop-job",
        daemon=False,
        args=(
            str(input_dir),
            str(out_dir),
            spec.model_dump_json(),
            str(work_dir),
            device,
            events,
            stop,
            lifeline,
            map_views,
            cpus,
        ),
    )
    proc.start()
    lifeline.close()
    if on_start is not None:
        on_start(proc.pid)  # type: ignore[arg-type]
    t0 = time.monotonic()
    report: Report | None = None
    stopping_since: float | None = None
    reason: ErrorInfo | None = None
    try:
        while report is None:
            report = _drain(events, on_event, wait=0.2)
            if report is not None:
                break
            if not proc.is_alive():
                report = _drain(events, on_event, wait=1.0)  # whatever it sent just before exiting
                break
            timed_out = timeout is not None and time.monotonic() - t0 > timeout
            if stopping_since is None and (should_stop() or timed_out):
                stop.set()
                stopping_since = time.monotonic()
                if timed_out:
                    reason = ErrorInfo(
                        code=ErrorCode.timeout,
                        message=f"The job ran past its time limit of {timeout:.0f} s.",
                        hint="Raise job_timeout, use --preset fast, or drop fewer/smaller photos.",
                    )
            if stopping_since is not None and time.monotonic() - stopping_since > GRACE_SECONDS:
                kill_group(proc.pid)  # type: ignore[arg-type]  # the job and everything it started
        proc.join(timeout=GRACE_SECONDS)
    finally:
        # Whatever happened here (an exception in a callback, Ctrl-C), the job must not outlive us;
        # the tree walk also covers the moment before the child has made its own process group.
        if proc.is_alive():
            stop.set()
            _kill_tree(proc.pid)  # type: ignore[arg-type]
            proc.join()
        kill_group(proc.pid)  # type: ignore[arg-type]
        held.close()
    if reason is not None and (report is None or not report.ok):
        return _failed_report(input_dir, out_dir, spec, device, started, reason)
    if report is not None:
        return report
    if stopping_since is not None:
        reason = ErrorInfo(code=ErrorCode.cancelled, message="The job was cancelled.", hint=CANCELLED_HINT)
    else:
        how = f" (killed by signal {-proc.exitcode})" if (proc.exitcode or 0) < 0 else ""
        reason = disk_nearly_full(
            [work_dir, out_dir], f"the reconstruction process stopped{how}"
        ) or ErrorInfo(
            code=ErrorCode.worker_crashed,
            message=f"The reconstruction process stopped unexpectedly{how}.",
            hint="Out of memory or a bug: try --preset fast; report it with the log if it persists.",
        )
    return _failed_report(input_dir, out_dir, spec, device, started, reason)
