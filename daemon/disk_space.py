"""Free space where the daemon writes (state_dir and every outbox), and whether new jobs may start.

Below `min_free_space_mb` new jobs wait (they stay queued, /healthz says why) instead of failing
half-way; a job that fills the disk anyway fails as `disk_full`. Checked in a worker thread every
few seconds, so a hung network outbox never blocks the event loop; readers use the last answer.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from scandrop.pipeline.core.errors import free_mb

CHECK_SECONDS = 5.0


class FreeSpace(BaseModel):
    role: str  # "state_dir", "outbox", "outbox <hot folder>"
    path: str
    free_mb: float | None  # None: could not be read (the path is not there)
    ok: bool


class DiskSpace:
    def __init__(self, paths: dict[str, Path], min_free_mb: int) -> None:
        self.paths = paths
        self.min_free_mb = min_free_mb
        self.last: list[FreeSpace] = []

    def check(self) -> list[FreeSpace]:
        """Blocking (statvfs): call from a thread."""
        found = []
        for role, path in self.paths.items():
            mb = free_mb(path)
            found.append(
                FreeSpace(role=role, path=str(path), free_mb=mb, ok=mb is None or mb >= self.min_free_mb)
            )
        self.last = found
        return found

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.last)

    def problems(self) -> list[str]:
        return [
            f"low disk space: {f.free_mb:.0f} MB free for the {f.role} {f.path}, below min_free_space_mb "
            f"{self.min_free_mb}; new jobs wait"
            for f in self.last
            if not f.ok and f.free_mb is not None
        ]
