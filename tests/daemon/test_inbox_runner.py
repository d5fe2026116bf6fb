"""The polling daemon runs each complete drop once and leaves the input alone."""

from __future__ import annotations

import json
from pathlib import Path

from daemon.inbox_runner import InboxRunner
from daemon.settings import Settings


def _settings(tmp_path: Path, stability_seconds: float = 0.2) -> Settings:
    return Settings(
        inbox=tmp_path / "inbox",
        outbox=tmp_path / "outbox",
        state_dir=tmp_path / "state",
        stability_seconds=stability_seconds,
        poll_seconds=0.1,
    )


def test_drop_runs_once_and_input_is_kept(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    drop = settings.inbox / "my scan"
    drop.mkdir(parents=True)
    (drop / "notes.txt").write_text("no photos here")
    (settings.inbox / "still empty").mkdir()

    InboxRunner(settings).run(once=True)

    report = json.loads((settings.outbox / "my_scan" / "report.json").read_text())
    assert report["error"]["code"] == "no_input"
    assert (drop / "notes.txt").read_text() == "no photos here"
    assert not (settings.outbox / "still_empty").exists()  # an empty folder waits, it does not fail

    mtime = (settings.outbox / "my_scan" / "report.json").stat().st_mtime_ns
    InboxRunner(settings).run(once=True)
    assert (settings.outbox / "my_scan" / "report.json").stat().st_mtime_ns == mtime


def test_ready_marker_skips_the_stability_wait(tmp_path: Path) -> None:
    settings = _settings(tmp_path, stability_seconds=3600)
    drop = settings.inbox / "marked"
    drop.mkdir(parents=True)
    (drop / "a.txt").write_text("x")
    (drop / "READY").write_text("")
    runner = InboxRunner(settings)
    assert runner.complete_drops() == [drop]
    unmarked = settings.inbox / "unmarked"
    unmarked.mkdir()
    (unmarked / "b.txt").write_text("y")
    assert unmarked not in runner.complete_drops()
