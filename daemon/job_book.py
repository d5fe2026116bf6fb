"""Every change of a job goes through here, in one order: durable row, status.json, event.

The row comes first: after a crash the database is the truth and status.json is rewritten from it.
"""

from __future__ import annotations

import structlog

from daemon.events import Event, EventBus, EventType
from daemon.job_status import JobStatus, now, write_status
from daemon.job_store import JobStore

log = structlog.get_logger("scandrop.jobs")


class JobBook:
    def __init__(self, store: JobStore, bus: EventBus) -> None:
        self.store = store
        self.bus = bus

    def commit(self, status: JobStatus, event: EventType) -> None:
        status.updated_at = now()
        self.store.save(status)
        try:
            write_status(status)
        except OSError as exc:  # outbox unreachable for a moment: the row is safe, retried next change
            log.warning("status_write_failed", job_id=status.job_id, error=str(exc))
        self.bus.publish(Event(type=event, job=status))

    def announce(self, status: JobStatus, event: EventType) -> None:
        """A live change (progress) that need not be durable at once."""
        status.updated_at = now()
        self.bus.publish(Event(type=event, job=status))
