"""Telling other systems that a job finished: an `on_finish` command and a signed webhook.

The command runs once per finished job, without a shell (its string is split like a shell would),
with the job in its environment and a time limit; whatever it does, it is logged and never fatal.
Webhook deliveries are rows in the job database before anything is sent, so a receiver that is down,
or a daemon restart, only delays them: each is retried with back-off (and at once after a restart)
until it is accepted (2xx) or WEBHOOK_MAX_ATTEMPTS have failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import shlex
import sqlite3
import time
from pathlib import Path

import aiohttp
import structlog

from scandrop.daemon.job_status import JobStatus

log = structlog.get_logger("scandrop.notify")

SIGNATURE_HEADER = "X-Scandrop-Signature"
WEBHOOK_TIMEOUT_SECONDS = 10.0
WEBHOOK_FIRST_RETRY_SECONDS = 1.0
WEBHOOK_MAX_RETRY_SECONDS = 600.0
WEBHOOK_MAX_ATTEMPTS = 30  # with back-off doubling to 10 min: about 4 hours of trying

_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL
);
"""


def signature(secret: str, body: bytes) -> str:
    """The value of X-Scandrop-Signature: HMAC-SHA256 of the exact body bytes, hex."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def job_environment(status: JobStatus) -> dict[str, str]:
    env = {
        "SCANDROP_JOB_ID": status.job_id,
        "SCANDROP_JOB_STATE": status.state.value,
        "SCANDROP_JOB_DIR": status.outbox,
        "SCANDROP_JOB_INPUT": status.input.location,
    }
    if status.error is not None:
        env["SCANDROP_JOB_ERROR"] = status.error.code.value
    return env


async def run_on_finish(command: str, status: JobStatus, timeout: float) -> int | None:
    """Run the command for one finished job; its exit code, or None if it could not run or timed out."""
    bound = log.bind(job_id=status.job_id, command=command)
    try:
        argv = shlex.split(command)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env={**os.environ, **job_environment(status)},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except (OSError, ValueError) as exc:
        bound.error("on_finish_failed", error=str(exc))
        return None
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError) as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        await proc.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        bound.error("on_finish_timed_out", seconds=timeout)
        return None
    tail = output.decode(errors="replace")[-500:].strip()
    if proc.returncode == 0:
        bound.info("on_finish_done", output=tail)
    else:
        bound.error("on_finish_failed", exit_code=proc.returncode, output=tail)
    return proc.returncode


class WebhookOutbox:
    """Durable webhook deliveries (a table beside the jobs) and the loop that sends them."""

    def __init__(self, db_path: Path, url: str, secret: str | None) -> None:
        self.url = url
        self.secret = secret
        self._db = sqlite3.connect(db_path, isolation_level=None)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        # A (re)start is a good moment to try again: whatever was down may be back.
        self._db.execute("UPDATE webhook_outbox SET next_at = MIN(next_at, ?)", (time.time(),))
        self._wake = asyncio.Event()

    def close(self) -> None:
        self._db.close()

    def enqueue(self, status: JobStatus) -> None:
        self._db.execute(
            "INSERT INTO webhook_outbox (job_id, body, next_at) VALUES (?, ?, ?)",
            (status.job_id, status.model_dump_json(), time.time()),
        )
        self._wake.set()

    def pending(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM webhook_outbox").fetchone()[0])

    async def run(self) -> None:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_SECONDS)
        ) as http:
            while True:
                self._wake.clear()
                now = time.time()
                due = self._db.execute(
                    "SELECT id, job_id, body, attempts FROM webhook_outbox WHERE next_at <= ? ORDER BY id",
                    (now,),
                ).fetchall()
                for row_id, job_id, body, attempts in due:
                    await self._deliver(http, row_id, job_id, body, attempts)
                row = self._db.execute("SELECT MIN(next_at) FROM webhook_outbox").fetchone()
                wait = 60.0 if row[0] is None else min(60.0, max(0.05, row[0] - time.time()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)

    async def _deliver(
        self, http: aiohttp.ClientSession, row_id: int, job_id: str, body: str, attempts: int
    ) -> None:
        data = body.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "scandrop",
            "X-Scandrop-Event": "job.finished",
            "X-Scandrop-Delivery": f"{job_id}/{row_id}",
        }
        if self.secret:
            headers[SIGNATURE_HEADER] = signature(self.secret, data)
        try:
            async with http.post(self.url, data=data, headers=headers) as response:
                ok, why = 200 <= response.status < 300, f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            ok, why = False, f"{type(exc).__name__}: {exc}"
        bound = log.bind(job_id=job_id, url=self.url, attempt=attempts + 1)
        if ok:
            self._db.execute("DELETE FROM webhook_outbox WHERE id = ?", (row_id,))
            bound.info("webhook_delivered")
            return
        attempts += 1
        if attempts >= WEBHOOK_MAX_ATTEMPTS:
            self._db.execute("DELETE FROM webhook_outbox WHERE id = ?", (row_id,))
            bound.error("webhook_given_up", error=why)
            return
        delay = min(WEBHOOK_FIRST_RETRY_SECONDS * 2 ** (attempts - 1), WEBHOOK_MAX_RETRY_SECONDS)
        self._db.execute(
            "UPDATE webhook_outbox SET attempts = ?, next_at = ? WHERE id = ?",
            (attempts, time.time() + delay, row_id),
        )
        bound.warning("webhook_failed", error=why, retry_in_seconds=delay)
