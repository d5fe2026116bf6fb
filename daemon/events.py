"""Status flows back as events: every job change is published here and fanned out to listeners.

Listeners (WebSocket clients) each get a bounded queue; a listener too slow to keep up loses its
oldest events, never blocks the daemon. Each event carries the job's whole status, so losing an
intermediate progress event loses nothing a client needs.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from pydantic import BaseModel

from scandrop.daemon.job_status import JobStatus

QUEUE_SIZE = 256

# "service": the daemon's own health or its waiting drops changed (status holds /api/status).
EventType = Literal["snapshot", "created", "state", "stage", "progress", "service"]


class Event(BaseModel):
    type: EventType
    job: JobStatus | None = None
    jobs: list[JobStatus] | None = None
    status: dict[str, Any] | None = None


class EventBus:
    def __init__(self) -> None:
        self._listeners: set[asyncio.Queue[Event]] = set()

    def publish(self, event: Event) -> None:
        for queue in self._listeners:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)

    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(QUEUE_SIZE)
        self._listeners.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._listeners.discard(queue)

    @property
    def listeners(self) -> int:
        return len(self._listeners)
