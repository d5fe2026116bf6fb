"""Every change of a job goes through here, in one order: durable row, status.json, event.

The row comes first: after a crash the database is the truth and status.json is rewritten from it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import structlog

from scandrop.daemon.events import Event, EventBus, EventType
from scandrop.daemon.job_status import JobState, JobStatus, now, write_status
from scandrop.daemon.job_store import JobStore
from scandrop.daemon.spool import Spool
from scandrop.pipeline.core.errors import ErrorCode, ErrorInfo

log = structlog.get_logger("scandrop.jobs")


class JobBook:
    def __init__(self, store: JobStore, bus: EventBus, spool: Spool) -> None:
        self.store = store
        self.bus = bus
        self.spool = spool
        self.spools = [spool]  # one per inbox (hot folders add theirs)
        self.finished: list[Callable[[JobStatus], None]] = []  # notifications, metrics

    def commit(self, status: JobStatus, event: EventType) -> None:
        status.updated_at = now()
        self.store.save(status)
        try:
            write_status(status)
        except OSError as exc:  # outbox unreachable for a moment: the row is safe, retried next change
            log.warning("status_write_failed", job_id=status.job_id, error=str(exc))
        # A snapshot: listeners serialise the event later, when the job may be a stage further on.
        self.bus.publish(Event(type=event, job=status.model_copy(deep=True)))

    def announce(self, status: JobStatus, event: EventType) -> None:
        """A live change (progress) that need not be durable at once."""
        status.updated_at = now()
        self.bus.publish(Event(type=event, job=status.model_copy(deep=True)))

    def finish(self, status: JobStatus, error: ErrorInfo | None) -> None:
        """Record a job's outcome (durable first), then move its input to done/ or failed/."""
        ok = error is None
        if error is None:
            status.state = JobState.succeeded
            status.progress, status.stage_progress = 1.0, 1.0
            status.message = status.message if status.duplicate_of else "done"
        else:
            status.state = JobState.cancelled if error.code == ErrorCode.cancelled else JobState.failed
            status.message = error.message
        status.error = error
        status.eta_seconds = None
        status.finished_at = now()
        source = Path(status.input.location)
        spool = next((s for s in self.spools if s.is_claimed(source)), self.spool)
        claimed = spool.is_claimed(source)
        target = spool.final_path(status.job_id, status.input.name, ok)
        if claimed:
            status.input.location = str(target)
        self.commit(status, "state")
        bound = log.bind(job_id=status.job_id)
        if error is None:
            bound.info("job_succeeded", duplicate_of=status.duplicate_of, outputs=len(status.outputs))
        else:
            bound.error(
                "job_" + status.state.value, code=error.code.value, message=error.message, hint=error.hint
            )
        try:
            if claimed:
                spool.move(source, target)
        except OSError as exc:  # inbox unreachable: settled when it is back (JobIntake.settle_claimed)
            bound.warning("input_move_deferred", error=str(exc))
        for listener in self.finished:
            try:
                listener(status)
            except Exception:  # a notification must never break the job's bookkeeping
                bound.exception("finish_listener_failed")
