"""Durable job state in SQLite: what survives kill -9 and power loss.

One row per job holds its whole status (the same document as status.json) plus the columns the
daemon queries by. Every change is committed with synchronous=FULL before the daemon acts on it,
so a restart sees exactly which jobs were queued, running or finished. Keep state_dir on a local
disk: SQLite's locking is not safe on network filesystems.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from scandrop.daemon.job_status import JobState, JobStatus

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    content_hash TEXT,
    pid INTEGER,
    pid_started REAL,
    status TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_hash ON jobs(content_hash);
"""


class JobStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit: each statement durable
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def save(self, status: JobStatus) -> None:
        self._db.execute(
            "INSERT INTO jobs (id, state, content_hash, status) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET state=excluded.state, content_hash=excluded.content_hash, "
            "status=excluded.status",
            (status.job_id, status.state.value, status.content_hash, status.model_dump_json()),
        )

    def delete(self, job_id: str) -> None:
        self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def get(self, job_id: str) -> JobStatus | None:
        row = self._db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobStatus.model_validate_json(row[0]) if row else None

    def recent(self, limit: int = 100, state: JobState | None = None) -> list[JobStatus]:
        """Newest first."""
        if state is None:
            rows = self._db.execute("SELECT status FROM jobs ORDER BY seq DESC LIMIT ?", (limit,))
        else:
            rows = self._db.execute(
                "SELECT status FROM jobs WHERE state = ? ORDER BY seq DESC LIMIT ?", (state.value, limit)
            )
        return [JobStatus.model_validate_json(r[0]) for r in rows]

    def in_states(self, *states: JobState) -> list[JobStatus]:
        """Oldest first: the order jobs are run in."""
        marks = ",".join("?" for _ in states)
        rows = self._db.execute(
            f"SELECT status FROM jobs WHERE state IN ({marks}) ORDER BY seq", [s.value for s in states]
        )
        return [JobStatus.model_validate_json(r[0]) for r in rows]

    def succeeded_with(self, content_hash: str) -> JobStatus | None:
        """The earliest finished job made from identical input, if any."""
        row = self._db.execute(
            "SELECT status FROM jobs WHERE content_hash = ? AND state = ? "
            "AND json_extract(status, '$.duplicate_of') IS NULL ORDER BY seq LIMIT 1",
            (content_hash, JobState.succeeded.value),
        ).fetchone()
        return JobStatus.model_validate_json(row[0]) if row else None

    def counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return {state.value: 0 for state in JobState} | {r[0]: r[1] for r in rows}

    def set_process(self, job_id: str, pid: int | None, started: float | None) -> None:
        """The job's process (group leader), so a restarted daemon can kill one orphaned by a crash."""
        self._db.execute("UPDATE jobs SET pid = ?, pid_started = ? WHERE id = ?", (pid, started, job_id))

    def process(self, job_id: str) -> tuple[int, float] | None:
        row = self._db.execute("SELECT pid, pid_started FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return (int(row[0]), float(row[1])) if row and row[0] is not None else None
