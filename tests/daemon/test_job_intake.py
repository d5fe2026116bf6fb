"""From a drop to a queued job, crash recovery, and the job store's queries."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from scandrop.daemon.drops import Drop, scan_inbox
from scandrop.daemon.events import Event, EventBus
from scandrop.daemon.job_book import JobBook
from scandrop.daemon.job_intake import JobIntake, new_job_id
from scandrop.daemon.job_status import STATUS_FILE, InputInfo, JobState, JobStatus, now
from scandrop.daemon.job_store import JobStore
from scandrop.daemon.settings import DEFAULT_IGNORE
from scandrop.daemon.spool import Spool
from scandrop.pipeline.core.errors import ErrorCode


@dataclass
class Daemon:
    inbox: Path
    outbox: Path
    store: JobStore
    bus: EventBus
    spool: Spool
    intake: JobIntake


def _make(tmp_path: Path, inbox: Path) -> Daemon:
    outbox = tmp_path / "outbox"
    outbox.mkdir(exist_ok=True)
    store = JobStore(tmp_path / "state" / "jobs.sqlite3")
    bus = EventBus()
    spool = Spool(inbox / ".scandrop")
    return Daemon(inbox, outbox, store, bus, spool, JobIntake(JobBook(store, bus, spool), spool, outbox))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    (tmp_path / "inbox").mkdir()
    made = _make(tmp_path, tmp_path / "inbox")
    yield made
    made.store.close()


def _photos(inbox: Path, name: str = "shoot", n: int = 3) -> Path:
    folder = inbox / name
    folder.mkdir()
    for i in range(n):
        (folder / f"img_{i}.jpg").write_bytes(b"\xff\xd8" + bytes([i]) * 100)
    return folder


def _drop(inbox: Path, name: str) -> Drop:
    return {d.name: d for d in scan_inbox(inbox, DEFAULT_IGNORE, "READY", "FORCE")}[name]


def _status(d: Daemon, job_id: str, name: str, **changes: object) -> JobStatus:
    stamp = now()
    status = JobStatus(
        job_id=job_id,
        kind="multi_view",
        input=InputInfo(
            name=name,
            format="photos",
            original=str(d.inbox / name),
            location=str(d.spool.work_path(job_id, name)),
            files=3,
            bytes=306,
        ),
        outbox=str(d.outbox / job_id),
        message="queued",
        created_at=stamp,
        updated_at=stamp,
    )
    return status.model_copy(update=changes)


def _status_file(d: Daemon, job_id: str) -> dict:
    return json.loads((d.outbox / job_id / STATUS_FILE).read_text())


def test_new_job_id_is_sortable_and_readable() -> None:
    job_id = new_job_id("Küche Scan #1.zip")
    date, time_, *rest = job_id.split("-")
    assert len(date) == 8 and date.isdigit() and len(time_) == 6 and time_.isdigit()
    assert "-".join(rest[:-1]) == "K_che_Scan_1"
    assert len(rest[-1]) == 4
    assert new_job_id("...").split("-")[2] == "drop"
    assert new_job_id("a") != new_job_id("a")


def test_take_claims_the_drop(daemon: Daemon) -> None:
    d = daemon

    async def body() -> tuple[JobStatus | None, list[Event]]:
        queue = d.bus.subscribe()
        status = d.intake.take(_drop(d.inbox, "shoot"))
        events = []
        while not queue.empty():
            events.append(queue.get_nowait())
        return status, events

    _photos(d.inbox)
    status, events = asyncio.run(body())
    assert status is not None
    job_id = status.job_id
    claimed = d.inbox / ".scandrop" / "work" / job_id / "shoot"
    assert not (d.inbox / "shoot").exists()
    assert sorted(p.name for p in claimed.iterdir()) == ["img_0.jpg", "img_1.jpg", "img_2.jpg"]

    assert status.state == JobState.queued
    assert status.kind == "multi_view"
    assert status.input.location == str(claimed)
    assert status.input.original == str(d.inbox / "shoot")
    assert (status.input.files, status.input.bytes) == (3, 306)

    written = _status_file(d, job_id)
    assert written["state"] == "queued"
    assert written["job_id"] == job_id
    assert written["input"]["location"] == str(claimed)
    assert written["schema_version"] == 1

    stored = d.store.get(job_id)
    assert stored is not None and stored.state == JobState.queued
    assert stored.input.location == str(claimed)

    assert [(e.type, e.job.job_id if e.job else None) for e in events] == [("created", job_id)]


def test_take_single_file_kinds(daemon: Daemon) -> None:
    d = daemon
    (d.inbox / "clip.mp4").write_bytes(b"v" * 7)
    (d.inbox / "one.png").write_bytes(b"p" * 5)
    video = d.intake.take(_drop(d.inbox, "clip.mp4"))
    photo = d.intake.take(_drop(d.inbox, "one.png"))
    assert video is not None and photo is not None
    assert (video.kind, video.input.format, video.input.bytes) == ("video", "video", 7)
    assert (photo.kind, photo.input.format, photo.input.files) == ("single_photo", "photo", 1)
    assert (d.spool.work_path(video.job_id, "clip.mp4")).read_bytes() == b"v" * 7


def test_take_a_drop_that_vanished_leaves_no_job(daemon: Daemon) -> None:
    d = daemon
    drop = _drop(d.inbox, _photos(d.inbox).name)
    for f in (d.inbox / "shoot").iterdir():
        f.unlink()
    (d.inbox / "shoot").rmdir()  # the person took it back between the scan and the claim
    assert d.intake.take(drop) is None
    assert d.store.recent() == []


def test_recover_finishes_a_claim_the_crash_interrupted(daemon: Daemon) -> None:
    d = daemon
    _photos(d.inbox)
    d.store.save(_status(d, "job-a", "shoot"))  # the row was committed, the rename never happened
    d.intake.recover()
    work = d.spool.work_path("job-a", "shoot")
    assert work.is_dir() and not (d.inbox / "shoot").exists()
    assert len(list(work.iterdir())) == 3
    stored = d.store.get("job-a")
    assert stored is not None and stored.state == JobState.queued
    assert _status_file(d, "job-a")["state"] == "queued"


def test_recover_requeues_an_interrupted_running_job(daemon: Daemon) -> None:
    d = daemon
    _photos(d.inbox)
    d.spool.move(d.inbox / "shoot", d.spool.work_path("job-b", "shoot"))
    d.store.save(_status(d, "job-b", "shoot", state=JobState.running, stage="fuse_depth", attempts=1))
    d.intake.recover()
    stored = d.store.get("job-b")
    assert stored is not None
    assert stored.state == JobState.queued
    assert "interrupted" in stored.message
    assert stored.attempts == 1
    assert d.spool.work_path("job-b", "shoot").is_dir()
    assert _status_file(d, "job-b")["state"] == "queued"


def test_recover_gives_up_on_a_job_running_at_every_daemon_death(daemon: Daemon) -> None:
    d = daemon
    _photos(d.inbox)
    d.spool.move(d.inbox / "shoot", d.spool.work_path("job-k", "shoot"))
    d.store.save(_status(d, "job-k", "shoot", state=JobState.running, stage="depth", attempts=3))
    d.intake.recover()
    stored = d.store.get("job-k")
    assert stored is not None and stored.state == JobState.failed
    assert stored.error is not None and stored.error.code == ErrorCode.worker_crashed
    assert "3 times" in stored.error.message
    kept = d.spool.final_path("job-k", "shoot", ok=False)
    assert stored.input.location == str(kept) and len(list(kept.iterdir())) == 3


def test_recover_fails_a_job_whose_input_is_gone(daemon: Daemon) -> None:
    d = daemon
    d.store.save(_status(d, "job-c", "shoot"))  # neither in the inbox nor in the working area
    d.intake.recover()
    stored = d.store.get("job-c")
    assert stored is not None
    assert stored.state == JobState.failed
    assert stored.error is not None and stored.error.code == ErrorCode.input_missing
    assert stored.finished_at is not None
    written = _status_file(d, "job-c")
    assert written["state"] == "failed"
    assert written["error"]["code"] == "input_missing"


def test_recover_leaves_a_claimed_queued_job_alone(daemon: Daemon) -> None:
    d = daemon
    _photos(d.inbox)
    d.spool.move(d.inbox / "shoot", d.spool.work_path("job-q", "shoot"))
    d.store.save(_status(d, "job-q", "shoot"))
    d.intake.recover()
    stored = d.store.get("job-q")
    assert stored is not None and stored.state == JobState.queued and stored.message == "queued"


def test_settle_claimed_moves_a_finished_input_to_done(daemon: Daemon) -> None:
    d = daemon
    _photos(d.inbox)
    work = d.spool.work_path("job-d", "shoot")
    d.spool.move(d.inbox / "shoot", work)
    done = d.spool.final_path("job-d", "shoot", ok=True)
    assert done == d.inbox / ".scandrop" / "done" / "job-d" / "shoot"
    # the job finished and said so, but the move of its input was interrupted
    d.store.save(_status(d, "job-d", "shoot", state=JobState.succeeded, input=_input_at(d, done)))
    d.intake.settle_claimed()
    assert done.is_dir() and len(list(done.iterdir())) == 3
    assert not work.exists()
    assert not (d.inbox / ".scandrop" / "work" / "job-d").exists()  # the empty per-job folder too
    assert d.spool.claimed() == []
    stored = d.store.get("job-d")
    assert stored is not None and stored.state == JobState.succeeded


def test_settle_claimed_moves_a_failed_input_to_failed(daemon: Daemon) -> None:
    d = daemon
    _photos(d.inbox)
    d.spool.move(d.inbox / "shoot", d.spool.work_path("job-f", "shoot"))
    failed = d.spool.final_path("job-f", "shoot", ok=False)
    d.store.save(_status(d, "job-f", "shoot", state=JobState.cancelled, input=_input_at(d, failed)))
    d.intake.recover()  # recover ends with settle_claimed
    assert failed.is_dir()
    assert d.spool.claimed() == []


def test_settle_claimed_keeps_unfinished_and_unknown_jobs(daemon: Daemon) -> None:
    d = daemon
    _photos(d.inbox, "a")
    _photos(d.inbox, "b")
    d.spool.move(d.inbox / "a", d.spool.work_path("job-running", "a"))
    d.spool.move(d.inbox / "b", d.spool.work_path("job-unknown", "b"))
    d.store.save(_status(d, "job-running", "a", state=JobState.running))
    d.intake.settle_claimed()
    assert d.spool.claimed() == ["job-running", "job-unknown"]


def _input_at(d: Daemon, location: Path) -> InputInfo:
    return InputInfo(
        name=location.name,
        format="photos",
        original=str(d.inbox / location.name),
        location=str(location),
        files=3,
        bytes=306,
    )


def test_succeeded_with_ignores_failed_jobs_and_duplicates(daemon: Daemon) -> None:
    d = daemon
    d.store.save(_status(d, "1-failed", "s", state=JobState.failed, content_hash="h"))
    d.store.save(_status(d, "2-dup", "s", state=JobState.succeeded, content_hash="h", duplicate_of="0-old"))
    assert d.store.succeeded_with("h") is None
    d.store.save(_status(d, "3-ok", "s", state=JobState.succeeded, content_hash="h"))
    d.store.save(_status(d, "4-ok-later", "s", state=JobState.succeeded, content_hash="h"))
    d.store.save(_status(d, "5-other", "s", state=JobState.succeeded, content_hash="other"))
    found = d.store.succeeded_with("h")
    assert found is not None and found.job_id == "3-ok"  # the earliest
    assert d.store.succeeded_with("nothing") is None


def test_counts_has_every_state(daemon: Daemon) -> None:
    d = daemon
    assert d.store.counts() == {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
    d.store.save(_status(d, "a", "s"))
    d.store.save(_status(d, "b", "s"))
    d.store.save(_status(d, "c", "s", state=JobState.failed))
    d.store.save(_status(d, "b", "s", state=JobState.running))  # an update, not a new job
    assert d.store.counts() == {"queued": 1, "running": 1, "succeeded": 0, "failed": 1, "cancelled": 0}


def test_recent_is_newest_first(daemon: Daemon) -> None:
    d = daemon
    for i, state in enumerate([JobState.succeeded, JobState.failed, JobState.succeeded, JobState.queued]):
        d.store.save(_status(d, f"job-{i}", "s", state=state))
    d.store.save(_status(d, "job-0", "s", state=JobState.succeeded, message="updated"))  # keeps its place
    assert [s.job_id for s in d.store.recent()] == ["job-3", "job-2", "job-1", "job-0"]
    assert [s.job_id for s in d.store.recent(limit=2)] == ["job-3", "job-2"]
    assert [s.job_id for s in d.store.recent(10, JobState.succeeded)] == ["job-2", "job-0"]
    assert [s.job_id for s in d.store.recent(1, JobState.succeeded)] == ["job-2"]
    assert d.store.recent(10, JobState.cancelled) == []
    assert [s.job_id for s in d.store.in_states(JobState.succeeded, JobState.queued)] == [
        "job-0",
        "job-2",
        "job-3",
    ]


def test_store_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state" / "jobs.sqlite3"
    store = JobStore(path)
    stamp = now() - timedelta(minutes=1)
    status = JobStatus(
        job_id="j",
        kind="video",
        input=InputInfo(
            name="c.mp4", format="video", original="/i/c.mp4", location="/w/c.mp4", files=1, bytes=9
        ),
        outbox="/o/j",
        created_at=stamp,
        updated_at=stamp,
    )
    store.save(status)
    store.set_process("j", 4242, 123.5)
    store.close()
    again = JobStore(path)
    try:
        assert again.get("j") == status
        assert again.process("j") == (4242, 123.5)
        again.set_process("j", None, None)
        assert again.process("j") is None
        again.delete("j")
        assert again.get("j") is None
    finally:
        again.close()


def test_recover_waits_for_an_unmounted_inbox(tmp_path: Path) -> None:
    """The inbox (a share) is not there at start-up: nothing is failed, decided when it is back."""
    d = _make(tmp_path, tmp_path / "not-mounted")
    try:
        d.store.save(_status(d, "job-u", "shoot", state=JobState.running))
        d.intake.recover()
        stored = d.store.get("job-u")
        assert stored is not None
        assert stored.state == JobState.queued and stored.error is None
        assert "interrupted" in stored.message
    finally:
        d.store.close()
