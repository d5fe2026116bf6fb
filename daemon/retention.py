"""Retention: after `retention_days`, a finished job's kept input, outbox folder and workspace go.

Only what scandrop made is touched: folders named by the id of a job the database knows as finished
(succeeded, failed, cancelled) before the cut-off, in the spools' done/ and failed/, the outboxes
and state_dir/work. A folder with anything modified after the cut-off stays (someone is still
using it), and so does everything of a queued or running job. Each removal is logged. Default: keep.
"""

from __future__ import annotations

import os
import shutil
import time
from datetime import datetime, timedelta
from pathlib import Path

import structlog

from scandrop.daemon.job_status import JobStatus, now
from scandrop.daemon.job_store import JobStore
from scandrop.daemon.spool import Spool

log = structlog.get_logger("scandrop.retention")

SWEEP_SECONDS = 3600.0


def candidates(
    store: JobStore, spools: list[Spool], outboxes: list[Path], work_root: Path, days: float
) -> list[tuple[str, Path]]:
    """(job id, folder) of every finished job's folder whose job finished more than `days` ago.

    Reads the database: call it on the thread that owns the store.
    """
    cutoff = now() - timedelta(days=days)
    folders = [root / kind for root in (s.root for s in spools) for kind in ("done", "failed")]
    folders += [*outboxes, work_root]
    found = []
    jobs: dict[str, JobStatus | None] = {}
    for folder in folders:
        try:
            entries = [e for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for entry in entries:
            if entry.name not in jobs:
                jobs[entry.name] = store.get(entry.name)
            job = jobs[entry.name]
            if job is not None and _finished_before(job, cutoff):
                found.append((job.job_id, Path(entry.path)))
    return found


def _finished_before(job: JobStatus, cutoff: datetime) -> bool:
    return job.state.terminal and job.finished_at is not None and job.finished_at < cutoff


def newest_mtime(path: Path) -> float:
    """The latest modification time of a folder, its subfolders and files (links not followed)."""
    newest = path.lstat().st_mtime
    for folder, dirs, files in os.walk(path, followlinks=False):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
            except OSError:
                continue
    return newest


def remove_old(found: list[tuple[str, Path]], days: float, keep: set[str]) -> list[Path]:
    """Remove each folder untouched for `days` whose job is not in `keep`; returns what went."""
    cutoff = time.time() - days * 86400
    removed = []
    for job_id, path in found:
        if job_id in keep:
            continue
        try:
            newest = newest_mtime(path)
        except OSError:
            continue
        if newest >= cutoff:
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
            log.info(
                "retention_removed",
                job_id=job_id,
                path=str(path),
                age_days=round((time.time() - newest) / 86400, 1),
            )
        else:
            log.warning("retention_remove_failed", job_id=job_id, path=str(path))
    return removed
