"""Start the real daemon as a process on temporary folders and a loopback port, and talk to it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from scandrop.pipeline.bench.synthetic import render_scene, write_scene

REPO = Path(__file__).resolve().parents[2]


def write_photos(folder: Path) -> Path:
    """A rendered orbit of a textured object: 24 photos that reconstruct in ~15 s with the fast preset."""
    write_scene(render_scene(n_views=24, width=320, height=240, seed=0), folder)
    (folder / "gt_cameras.json").unlink()
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: Callable[[], Any], timeout: float, message: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s: {message}")


class Daemon:
    """One daemon process; `start()` again after a kill reuses the same folders and port."""

    def __init__(self, root: Path, **settings: Any) -> None:
        self.root = root
        self.inbox, self.outbox, self.state = root / "inbox", root / "outbox", root / "state"
        self.port = free_port()
        self.env = {
            **os.environ,
            "SCANDROP_INBOX": str(self.inbox),
            "SCANDROP_OUTBOX": str(self.outbox),
            "SCANDROP_STATE_DIR": str(self.state),
            "SCANDROP_MODELS_DIR": str(root / "models"),  # empty: no learned model is installed
            "SCANDROP_HTTP_PORT": str(self.port),
            "SCANDROP_PRESET": "fast",
            "SCANDROP_STABILITY_SECONDS": "1",
            "SCANDROP_POLL_SECONDS": "0.5",
            **{f"SCANDROP_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.env.pop("SCANDROP_CONFIG", None)
        self.token = settings.get("token")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log(self) -> Path:
        return self.root / f"daemon-{self.starts}.log"

    def logged(self, *events: str) -> list[dict[str, Any]]:
        """The JSON log lines of this start that are one of `events`."""
        records = [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]
        return [e for e in records if e["event"] in events]

    def start(self, extra_env: dict[str, str] | None = None, healthy: bool = True) -> Daemon:
        """Start and wait until it answers /healthz with 200 (or at all, when not `healthy`)."""
        self.starts += 1
        self.inbox.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scandrop.daemon.cli", "daemon"],
                cwd=REPO,
                env={**self.env, **(extra_env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(
            lambda: self._answers(healthy) or self._died(), 60, "the daemon to listen and scan the inbox"
        )
        if self.proc.poll() is not None:
            raise AssertionError(f"the daemon exited with {self.proc.returncode}:\n{self.log.read_text()}")
        return self

    def _answers(self, healthy: bool = True) -> bool:
        """Listening and healthy: /healthz answers 503 until the first inbox scan has finished."""
        try:
            return self.request("GET", "/healthz")[0] == 200 or not healthy
        except OSError:
            return False

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def request(self, method: str, path: str, token: str | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        token = token if token is not None else self.token
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                body = resp.read()
                status = resp.status
                kind = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            body, status, kind = err.read(), err.code, err.headers.get("Content-Type", "")
            err.close()
        return status, json.loads(body) if "json" in kind else body

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        if status >= 400:
            raise AssertionError(f"GET {path} -> {status}: {body}")
        return body

    def jobs(self) -> list[dict[str, Any]]:
        return self.get("/api/jobs?limit=1000")["jobs"]

    def job(self, job_id: str) -> dict[str, Any]:
        return self.get(f"/api/jobs/{job_id}")

    def wait_job(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, message: str) -> dict:
        return wait_for(lambda: next((j for j in self.jobs() if predicate(j)), None), timeout, message)

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        if self.proc is None:
            return 0
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class EventListener:
    """Collects the daemon's WebSocket events in a background thread.

    `watch` opens jobs' live models as a page does: "new" subscribes to every job it hears created,
    a list of messages is sent as they are once connected (e.g. a subscribe to a job already running).
    """

    def __init__(self, daemon: Daemon, watch: str | list[dict[str, Any]] | None = None) -> None:
        self.url = f"http://127.0.0.1:{daemon.port}/api/ws"
        self.watch = watch
        self.events: list[dict[str, Any]] = []
        self.received_at: list[tuple[float, int]] = []  # (monotonic time, bytes) of each message
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._listen()), daemon=True)

    def __enter__(self) -> EventListener:
        self._thread.start()
        if not self._connected.wait(20):
            raise AssertionError("could not connect to /api/ws")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    async def _listen(self) -> None:
        async with aiohttp.ClientSession() as session, session.ws_connect(self.url, max_msg_size=0) as ws:
            if isinstance(self.watch, list):
                for message in self.watch:
                    await ws.send_json(message)
            self._connected.set()
            while not self._stop.is_set():
                try:
                    msg = await ws.receive(timeout=0.5)
                except TimeoutError:
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                event = json.loads(msg.data)
                self.received_at.append((time.monotonic(), len(msg.data)))
                self.events.append(event)
                if self.watch == "new" and event["type"] == "created":
                    await ws.send_json({"type": "subscribe", "job_id": event["job"]["job_id"]})
