"""Retention removes a finished job's folders only when both the job and every file in them are older
than the limit, and never anything of a queued or running job, nor what scandrop did not make."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

from scandrop.daemon.job_status import InputInfo, JobState, JobStatus, now
from scandrop.daemon.job_store import JobStore
from scandrop.daemon.retention import candidates, remove_old
from scandrop.daemon.spool import Spool

DAY = 86400.0


def _job(job_id: str, state: JobState, finished_days_ago: float | None) -> JobStatus:
    stamp = now()
    return JobStatus(
        job_id=job_id,
        kind="multi_view",
        state=state,
        input=InputInfo(name="drop", format="photos", original="x", location="x", files=1, bytes=1),
        outbox="x",
        created_at=stamp,
        updated_at=stamp,
        finished_at=None if finished_days_ago is None else stamp - timedelta(days=finished_days_ago),
    )


def _folder(path: Path, age_days: float) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "sub" / "photo.jpg").write_bytes(b"x")
    old = time.time() - age_days * DAY
    for p in (path / "sub" / "photo.jpg", path / "sub", path):
        os.utime(p, (old, old))
    return path


def test_retention_removes_only_what_is_older_than_the_limit(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "state" / "jobs.sqlite3")
    spool, outbox, work = (
        Spool(tmp_path / "inbox" / ".scandrop"),
        tmp_path / "outbox",
        tmp_path / "state" / "work",
    )
    jobs = {
        "old-done": (JobState.succeeded, 40),
        "old-failed": (JobState.failed, 40),
        "young-done": (JobState.succeeded, 2),
        "old-but-touched": (JobState.succeeded, 40),
        "old-queued": (JobState.queued, None),
        "old-running-again": (JobState.failed, 40),  # finished, but running now (re-queued and taken)
    }
    for job_id, (state, days) in jobs.items():
        store.save(_job(job_id, state, days))
    made: dict[str, list[Path]] = {}
    for job_id, (state, days) in jobs.items():
        kept = spool.root / ("failed" if state == JobState.failed else "done") / job_id
        made[job_id] = [_folder(p, days or 40) for p in (kept, outbox / job_id, work / job_id)]
    (made["old-but-touched"][1] / "sub" / "photo.jpg").touch()  # someone opened and saved it today
    strangers = [_folder(outbox / "not-a-job", 400), _folder(spool.root / "done" / "unknown-id", 400)]

    found = candidates(store, [spool], [outbox], work, days=30)
    removed = remove_old(found, days=30, keep={"old-running-again"})

    touched_input, touched_outbox, touched_work = made["old-but-touched"]
    gone = {*made["old-done"], *made["old-failed"], touched_input, touched_work}
    assert set(removed) == gone
    assert not any(p.exists() for p in gone)
    assert touched_outbox.exists()  # the one folder with a file modified today stays
    for job_id in ("young-done", "old-queued", "old-running-again"):
        assert all(p.exists() for p in made[job_id]), job_id
    assert all(p.exists() for p in strangers)
    store.close()
