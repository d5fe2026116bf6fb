"""The status server: REST for jobs and health, a WebSocket for live events, outputs for download.

Every error is JSON with a real HTTP status. When a token is configured (it must be when the
server binds beyond loopback) every route but /healthz and the status page's own files needs
`Authorization: Bearer <token>`. Only the WebSocket route also takes `?token=` (a browser cannot set
headers on a WebSocket); elsewhere a token in the URL is refused, since URLs end up in proxy and
access logs. Files are served only from the job's own folder in the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, Protocol

from aiohttp import WSMsgType, web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scandrop.daemon import status_page
from scandrop.daemon.events import Event, EventBus, Message, SocketError
from scandrop.daemon.job_status import JobState, JobStatus
from scandrop.daemon.metrics import CONTENT_TYPE, Metrics
from scandrop.daemon.settings import Settings


class Service(Protocol):
    """What the API needs of the daemon; service.Service provides it (and imports this module, not the
    other way round)."""

    settings: Settings
    bus: EventBus
    metrics: Metrics

    def health(self) -> dict[str, Any]: ...
    def status(self) -> dict[str, Any]: ...
    def job(self, job_id: str) -> JobStatus | None: ...
    def recent_jobs(self, limit: int, state: JobState | None = None) -> list[JobStatus]: ...
    def cancel(self, job_id: str) -> JobStatus | None: ...
    def lifecycle(self, app: web.Application) -> AsyncIterator[None]: ...


SERVICE: web.AppKey[Service] = web.AppKey("service")
SOCKETS: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("sockets")
OPEN_ROUTES = {"/healthz"}
WEBSOCKET_ROUTE = "/api/ws"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _json(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(text=model.model_dump_json(), status=status, content_type="application/json")


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)


@web.middleware
async def bearer_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[SERVICE].settings.token
    if token is None or request.path in OPEN_ROUTES or status_page.is_open(request.path):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    given = header[7:] if header.startswith("Bearer ") else ""
    if not given and request.path == WEBSOCKET_ROUTE:
        given = request.query.get("token", "")
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        return _error(401, "unauthorized", "A valid bearer token is required (Authorization: Bearer ...).")
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    health = request.app[SERVICE].health()
    return web.json_response(health, status=200 if health["ok"] else 503)


async def api_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE].status())


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; behind the token like the API (scrapers send a bearer token)."""
    body = request.app[SERVICE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def list_jobs(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", "100"))
        state = JobState(request.query["state"]) if "state" in request.query else None
    except ValueError:
        return _error(400, "bad_request", "limit must be a number; state one of " + ", ".join(JobState))
    if not 1 <= limit <= 1000:
        return _error(400, "bad_request", "limit must be between 1 and 1000")
    jobs = request.app[SERVICE].recent_jobs(limit, state)
    return web.json_response({"jobs": [j.model_dump(mode="json") for j in jobs]})


def _job(request: web.Request) -> JobStatus:
    job = request.app[SERVICE].job(request.match_info["job_id"])
    if job is None:
        raise web.HTTPNotFound(text=f"There is no job {request.match_info['job_id']}.")
    return job


async def get_job(request: web.Request) -> web.Response:
    return _json(_job(request))


async def cancel_job(request: web.Request) -> web.Response:
    job = _job(request)
    cancelled = request.app[SERVICE].cancel(job.job_id)
    if cancelled is None:
        return _error(409, "conflict", f"Job {job.job_id} has already {job.state.value}; nothing to cancel.")
    return _json(cancelled, status=202)


async def get_file(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    job = _job(request)
    if job.duplicate_of:  # its outputs are the earlier job's
        job = service.job(job.duplicate_of) or job
    folder = Path(job.outbox).resolve()
    name = request.match_info["name"]
    path = (folder / name).resolve()
    inside = path.is_relative_to(folder) and folder.is_relative_to(service.settings.outbox.resolve())
    hidden = any(part.startswith(".") for part in Path(name).parts)
    if not inside or hidden or not path.is_file():
        raise web.HTTPNotFound(text=f"Job {job.job_id} has no file {name}.")
    return web.FileResponse(path)


class SocketRequest(BaseModel):
    """What a client may send: open a job's live model (`subscribe`), or stop (`unsubscribe`)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["subscribe", "unsubscribe"]
    job_id: str = Field(min_length=1, max_length=200)


MAX_WATCHED_JOBS = 16  # per socket: a page opens one job at a time


def _socket_request(service: Service, queue: asyncio.Queue[Message], text: str) -> SocketError | None:
    """Apply one client message; what went wrong, if anything, for the client."""
    try:
        request = SocketRequest.model_validate_json(text)
    except ValidationError as exc:
        problem = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'message'}: {e['msg']}" for e in exc.errors())
        return SocketError(error={"code": "bad_request", "message": problem})
    bus = service.bus
    if request.type == "unsubscribe":
        bus.unwatch(queue, request.job_id)
    elif service.job(request.job_id) is None:
        return SocketError(error={"code": "not_found", "message": f"There is no job {request.job_id}."})
    elif len(bus.watching(queue) - {request.job_id}) >= MAX_WATCHED_JOBS:
        message = f"At most {MAX_WATCHED_JOBS} jobs at a time; unsubscribe from one first."
        return SocketError(error={"code": "conflict", "message": message})
    else:
        bus.watch(queue, request.job_id)
    return None


async def websocket(request: web.Request) -> web.WebSocketResponse:
    service = request.app[SERVICE]
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    queue = service.bus.subscribe()

    async def send_events() -> None:
        while True:
            event = await queue.get()
            await ws.send_str(event.model_dump_json())

    snapshot = Event(type="snapshot", status=service.status(), jobs=service.recent_jobs(100))
    await ws.send_str(snapshot.model_dump_json())
    sender = asyncio.create_task(send_events())
    try:
        async for msg in ws:  # subscriptions to a job's live model; reading also notices a client leave
            if msg.type == WSMsgType.TEXT:
                if (problem := _socket_request(service, queue, msg.data)) is not None:
                    service.bus.send(queue, problem)  # the sender writes it, in order with the events
            elif msg.type == WSMsgType.ERROR:
                break
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sender
        service.bus.unsubscribe(queue)
    return ws


async def _close_sockets(app: web.Application) -> None:
    for ws in list(app[SOCKETS]):
        await ws.close(code=1001, message=b"scandrop is shutting down")


def build_app(service: Service) -> web.Application:
    app = web.Application(middlewares=[json_errors, bearer_token])
    app[SERVICE] = service
    app[SOCKETS] = weakref.WeakSet()
    app.cleanup_ctx.append(service.lifecycle)
    app.on_shutdown.append(_close_sockets)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/status", api_status)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/jobs", list_jobs)
    app.router.add_get("/api/jobs/{job_id}", get_job)
    app.router.add_post("/api/jobs/{job_id}/cancel", cancel_job)
    app.router.add_get("/api/jobs/{job_id}/files/{name:.+}", get_file)
    app.router.add_get(WEBSOCKET_ROUTE, websocket)
    status_page.add_routes(app)
    return app
