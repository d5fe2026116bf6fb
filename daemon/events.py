"""Status flows back as events: every job change is published here and fanned out to listeners.

Listeners (WebSocket clients) each get a bounded queue; a listener too slow to keep up loses its
oldest events, never blocks the daemon. Each event carries the job's whole status, so losing an
intermediate progress event loses nothing a client needs.

A running job's model so far (the live 3D view, up to ~124 KB each) goes only to the listeners that
watch that job. The bus keeps the latest one per running job, so a page that opens the job late
gets it at once; it is dropped when the job ends and is never written anywhere.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from pydantic import BaseModel

from scandrop.daemon.job_status import JobStatus
from scandrop.pipeline.core.live_model import LiveModel

QUEUE_SIZE = 256

# "service": the daemon's own health or its waiting drops changed (status holds /api/status).
EventType = Literal["snapshot", "created", "state", "stage", "progress", "service"]


class Event(BaseModel):
    type: EventType
    job: JobStatus | None = None
    jobs: list[JobStatus] | None = None
    status: dict[str, Any] | None = None


class ModelEvent(BaseModel):
    """A running job's model so far, for the listeners that watch the job."""

    type: Literal["model"] = "model"
    job_id: str
    stage: str
    model: LiveModel


class SocketError(BaseModel):
    """What a WebSocket client asked could not be done (a bad message, an unknown job)."""

    type: Literal["error"] = "error"
    error: dict[str, str]


Message = Event | ModelEvent | SocketError


class EventBus:
    def __init__(self) -> None:
        self._listeners: dict[asyncio.Queue[Message], set[str]] = {}  # queue -> the jobs it watches
        self._models: dict[str, ModelEvent] = {}  # the latest model of each running job

    @staticmethod
    def send(queue: asyncio.Queue[Message], message: Message) -> None:
        """To one listener; its oldest message goes when it is full."""
        if queue.full():
            queue.get_nowait()
        queue.put_nowait(message)

    def publish(self, event: Event) -> None:
        for queue in self._listeners:
            self.send(queue, event)

    def publish_model(self, event: ModelEvent) -> None:
        self._models[event.job_id] = event
        for queue, watched in self._listeners.items():
            if event.job_id in watched:
                self.send(queue, event)

    def forget_model(self, job_id: str) -> None:
        """The job has ended: its final model is in its outputs."""
        self._models.pop(job_id, None)

    def watch(self, queue: asyncio.Queue[Message], job_id: str) -> None:
        """Send `queue` the job's models from now on, starting with its latest one."""
        self._listeners[queue].add(job_id)
        if (latest := self._models.get(job_id)) is not None:
            self.send(queue, latest)

    def unwatch(self, queue: asyncio.Queue[Message], job_id: str) -> None:
        self._listeners[queue].discard(job_id)

    def watching(self, queue: asyncio.Queue[Message]) -> set[str]:
        return set(self._listeners.get(queue, ()))

    def subscribe(self) -> asyncio.Queue[Message]:
        queue: asyncio.Queue[Message] = asyncio.Queue(QUEUE_SIZE)
        self._listeners[queue] = set()
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Message]) -> None:
        self._listeners.pop(queue, None)

    @property
    def listeners(self) -> int:
        return len(self._listeners)
