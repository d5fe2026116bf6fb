"""From a complete drop to a queued job, and back to a consistent state after any crash.

Order matters for kill -9 at any moment: the job's row is committed before the drop is renamed
into the working area, so a restart always finds either the drop still in the inbox (and claims it
again) or the claimed input (and runs it). `recover` settles whatever a crash left half done.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import structlog

from scandrop.daemon.drops import Drop
from scandrop.daemon.job_book import JobBook
from scandrop.daemon.job_status import InputInfo, JobState, JobStatus, missing_input, now
from scandrop.daemon.spool import Spool
from scandrop.pipeline.core.errors import ErrorCode, ErrorInfo
from scandrop.pipeline.ingest.input_kind import job_kind

log = structlog.get_logger("scandrop.intake")

# A job that was running every time the daemon died (it may be what kills it, e.g. the OOM killer
# taking the whole service) is failed after this many starts instead of looping forever.
# `attempts` also counts crash retries (max_retries), so with max_retries >= 3 a retried job can hit
# this on the next restart; one counter for both is a known simplification.
MAX_INTERRUPTED_STARTS = 3


def new_job_id(name: str) -> str:
    """Sortable, readable and unique: 20261126-081500-<drop name>-<4 hex>."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("._-")[:40] or "drop"
    return f"{now():%Y%m%d-%H%M%S}-{slug}-{secrets.token_hex(2)}"


class JobIntake:
    def __init__(self, book: JobBook, spool: Spool, outbox: Path, hot_folder: str | None = None) -> None:
        self.book = book
        self.spool = spool
        self.outbox = outbox
        self.hot_folder = hot_folder  # None: the main inbox
        self.siblings: set[str] = set()  # the other inboxes' hot folder names (set by the service)

    def take(self, drop: Drop) -> JobStatus | None:
        """Claim a complete drop as a new queued job; None if the drop vanished meanwhile."""
        job_id = new_job_id(drop.name)
        stamp = now()
        status = JobStatus(
            job_id=job_id,
            kind=job_kind(drop.kind),
            input=InputInfo(
                name=drop.name,
                format=drop.kind.value if drop.kind else "unknown",
                original=str(drop.path),
                location=str(self.spool.work_path(job_id, drop.name)),
                files=len(drop.listing),
                bytes=drop.size,
            ),
            outbox=str(self.outbox / job_id),
            forced=drop.forced,
            hot_folder=self.hot_folder,
            message="queued",
            created_at=stamp,
            updated_at=stamp,
        )
        self.book.store.save(status)  # durable before the rename (see module docstring)
        try:
            self.spool.move(drop.path, Path(status.input.location))
        except FileNotFoundError:
            self.book.store.delete(job_id)  # the person took the drop back: nothing happened
            return None
        except OSError as exc:
            status.input.location = str(drop.path)
            self._fail(
                status,
                ErrorInfo(
                    code=ErrorCode.claim_failed,
                    message=f"Could not move {drop.name} into {self.spool.root}: {exc.strerror or exc}.",
                    hint="Give the scandrop user write access to the inbox.",
                ),
            )
            return status
        self.book.commit(status, "created")
        log.info("job_created", job_id=job_id, input=drop.name, kind=status.kind, files=status.input.files)
        return status

    def recover(self) -> None:
        """After a crash: re-queue interrupted jobs, claim half-claimed drops, settle finished ones."""
        store = self.book.store
        inbox_there = self.spool.root.parent.is_dir()  # an unmounted share: decide when it is back
        for status in store.in_states(JobState.queued, JobState.running):
            if not self._settles(status):
                continue  # another inbox's intake settles it
            location, original = Path(status.input.location), Path(status.input.original)
            if not inbox_there or location.exists() or location.is_symlink():
                pass
            elif original.exists() or original.is_symlink():
                self.spool.move(original, location)  # crashed between the row and the rename
            else:
                self._fail(status, missing_input(status))
                continue
            if status.state == JobState.running and status.attempts >= MAX_INTERRUPTED_STARTS:
                self._fail(
                    status,
                    ErrorInfo(
                        code=ErrorCode.worker_crashed,
                        message=f"The daemon stopped {status.attempts} times while running this job.",
                        hint="It may exhaust the machine's memory: try preset fast or fewer/smaller photos.",
                    ),
                )
                continue
            if status.state == JobState.running:
                status.state = JobState.queued
                status.message = "interrupted by a restart; resumes"
                log.warning("job_requeued", job_id=status.job_id, stage=status.stage)
            self.book.commit(status, "state")
        self.settle_claimed()

    def _settles(self, status: JobStatus) -> bool:
        """Its own jobs; the main inbox also those of a hot folder no longer configured."""
        if status.hot_folder == self.hot_folder:
            return True
        return self.hot_folder is None and status.hot_folder not in self.siblings

    def settle_claimed(self) -> None:
        """Finished jobs whose input is still in the working area (the move was interrupted or the
        inbox was unreachable): move it to done/ or failed/ now."""
        for job_id in self.spool.claimed():
            status = self.book.store.get(job_id)
            if status is None or not status.state.terminal:
                continue
            source = self.spool.work_path(job_id, status.input.name)
            target = Path(status.input.location)
            if source.exists() and source != target:
                self.spool.move(source, target)
                self.book.commit(status, "state")

    def _fail(self, status: JobStatus, error: ErrorInfo) -> None:
        self.book.finish(status, error)
