"""The first daemon: poll the inbox, run each complete photo-folder drop once, write to the outbox.

A drop is complete when it holds the ready marker or its listing (path, size, mtime) has not
changed for `stability_seconds`. A drop is done when `<outbox>/<drop>/report.json` exists (and does
not say cancelled: a job stopped by a shutdown runs again), so a
restart never runs a finished drop twice. The input is never modified or deleted.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path

import structlog

from daemon.settings import Settings
from daemon.worker import run_job
from models.device import resolve_device
from pipeline.errors import ErrorCode
from pipeline.ingest_images import Listing, listing
from pipeline.presets import preset_config
from pipeline.run import clean_work_dir

log = structlog.get_logger("scandrop.inbox")


def job_id_for(drop: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", drop.name).strip("._") or "drop"


def is_done(report_path: Path) -> bool:
    """A drop is done once it has a report, unless that report says it was cancelled (e.g. shutdown)."""
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return False
    return (report.get("error") or {}).get("code") != ErrorCode.cancelled.value


class InboxRunner:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop = threading.Event()
        self._seen: dict[Path, tuple[Listing, float]] = {}
        self.device = resolve_device(settings.device)  # once: an impossible request stops start-up

    def complete_drops(self) -> list[Path]:
        """Folders in the inbox that are complete and not yet processed."""
        ready = []
        now = time.monotonic()
        for drop in sorted(self.settings.inbox.iterdir()):
            if drop.name.startswith(".") or not drop.is_dir():
                continue
            if is_done(self.settings.outbox / job_id_for(drop) / "report.json"):
                continue
            current = listing(drop)
            if not current:
                continue  # people create the folder before they copy into it
            if (drop / self.settings.ready_marker).exists():
                ready.append(drop)
                continue
            previous = self._seen.get(drop)
            if previous is None or previous[0] != current:
                self._seen[drop] = (current, now)
            elif now - previous[1] >= self.settings.stability_seconds:
                ready.append(drop)
        return ready

    def process(self, drop: Path) -> None:
        job_id = job_id_for(drop)
        bound = log.bind(job_id=job_id)
        device = self.device
        config = preset_config(self.settings.preset, {"mesh": {"max_triangles": self.settings.max_triangles}})
        work = self.settings.state_dir / "work" / job_id
        bound.info("job_started", input=str(drop), device=device.name)
        report = run_job(
            drop,
            self.settings.outbox / job_id,
            config,
            work,
            device.model_dump(),
            on_event=lambda e: bound.debug(
                "progress", stage=e.stage, progress=round(e.progress, 3), message=e.message
            ),
            should_stop=self.stop.is_set,
            timeout=self.settings.job_timeout,
        )
        if report.ok:
            clean_work_dir(work)
            bound.info("job_succeeded", seconds=report.seconds, registered=report.images.registered)
        elif report.error is not None:
            bound.error(
                "job_failed",
                code=report.error.code.value,
                message=report.error.message,
                hint=report.error.hint,
            )

    def run(self, once: bool = False) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        self.settings.inbox.mkdir(parents=True, exist_ok=True)
        self.settings.outbox.mkdir(parents=True, exist_ok=True)
        log.info("watching", inbox=str(self.settings.inbox), outbox=str(self.settings.outbox))
        while not self.stop.is_set():
            for drop in self.complete_drops():
                if self.stop.is_set():
                    break
                try:
                    self.process(drop)
                except Exception:  # one bad drop must not stop the daemon; the next scan goes on
                    log.exception("job_crashed", job_id=job_id_for(drop))
            if once and not self._pending():
                break
            self.stop.wait(self.settings.poll_seconds)

    def _pending(self) -> bool:
        return any(
            d.is_dir()
            and not d.name.startswith(".")
            and listing(d)
            and not is_done(self.settings.outbox / job_id_for(d) / "report.json")
            for d in self.settings.inbox.iterdir()
        )
