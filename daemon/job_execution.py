"""Where a job's pipeline runs: the one dispatch point between the runner and an executor.

`local` (the default) runs each job in a child process of the daemon (daemon/worker.py); `ray`
runs it as a task on a Ray cluster (daemon/ray_executor.py, Ray imported only then). Both take the
same request and hooks and return the job's Report, so the runner, status.json and the WebSocket
cannot tell them apart, except by the `execution` field that says where the job ran.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from scandrop.daemon.job_status import DataMode, ExecutionInfo
from scandrop.daemon.settings import ExecutorKind
from scandrop.daemon.worker import run_job, warm_up
from scandrop.pipeline.core.stage import OnEvent, StopCheck, never_stop
from scandrop.pipeline.job_spec import JobSpec
from scandrop.pipeline.report import Report


@dataclass(frozen=True)
class JobRequest:
    job_id: str
    input_path: Path
    out_dir: Path
    work_dir: Path
    spec: JobSpec
    device: dict[str, Any]
    timeout: float | None
    input_bytes: int = 0
    device_request: str = "auto"  # what the job asked for; a Ray node resolves it itself


@dataclass
class JobHooks:
    """Callbacks from the executor's thread; they must be thread-safe."""

    on_event: OnEvent | None = None
    should_stop: StopCheck = never_stop
    on_start: Callable[[int], None] | None = None  # local: the job's pid (its process group)
    on_attempt: Callable[[int, ExecutionInfo, dict[str, Any]], None] | None = field(default=None)
    """(attempt number from 1, where it runs, the device it resolved there)."""


class Executor(Protocol):
    kind: ExecutorKind

    def problem(self) -> str | None:
        """Why no job can start now (e.g. the cluster is unreachable); None when ready."""
        ...

    def run(self, request: JobRequest, hooks: JobHooks) -> Report:
        """Blocking, in a worker thread: the job's Report, whatever happened to it."""
        ...

    def close(self) -> None: ...


log = structlog.get_logger("scandrop.daemon")


def log_warm_up(seconds: float | None, **where: Any) -> None:
    """The log line of a finished kernel warm-up (worker.warm_up), here or on a Ray node."""
    if seconds is None:
        log.warning("kernels_warm_up_failed", hint="its first job compiles them instead", **where)
    else:
        log.info("kernels_ready", seconds=round(seconds, 1), **where)


class LocalExecutor:
    """Jobs in child processes here. With `warm`, the pipeline's kernels are compiled at start in a
    low-priority child (worker.warm_up) while the daemon already takes jobs."""

    kind = ExecutorKind.local

    def __init__(self, warm: bool = False) -> None:
        self._closing = threading.Event()
        self._warming: threading.Thread | None = None
        if warm:
            self._warming = threading.Thread(target=self._warm_up, name="warm-up", daemon=True)
            self._warming.start()

    def _warm_up(self) -> None:
        seconds = warm_up(should_stop=self._closing.is_set)
        if seconds is not None or not self._closing.is_set():  # stopped on purpose: nothing to say
            log_warm_up(seconds)

    def problem(self) -> str | None:
        return None

    def run(self, request: JobRequest, hooks: JobHooks) -> Report:
        if hooks.on_attempt is not None:
            hooks.on_attempt(1, ExecutionInfo(executor=self.kind, data=DataMode.local), request.device)
        return run_job(
            request.input_path,
            request.out_dir,
            request.spec,
            request.work_dir,
            request.device,
            on_event=hooks.on_event,
            should_stop=hooks.should_stop,
            timeout=request.timeout,
            on_start=hooks.on_start,
        )

    def close(self) -> None:
        self._closing.set()
        if self._warming is not None:
            self._warming.join()
