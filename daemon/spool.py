"""The working area: claimed drops live under <inbox>/.scandrop/{work,done,failed}/<job-id>/<name>.

It sits on the inbox's own filesystem, so claiming a drop is one atomic rename: a drop is either
still in the inbox or wholly claimed, never half. Inputs are never deleted: after the job they move
to done/ (succeeded) or failed/ (failed or cancelled), where status.json says they are.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from scandrop.pipeline.core.stage import fsync_dir


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root

    def work_path(self, job_id: str, name: str) -> Path:
        return self.root / "work" / job_id / name

    def final_path(self, job_id: str, name: str, ok: bool) -> Path:
        return self.root / ("done" if ok else "failed") / job_id / name

    def is_claimed(self, path: Path) -> bool:
        """Whether `path` is a drop in the working area (work/<job id>/<name>)."""
        return path.parent.parent == self.root / "work"

    def claimed(self) -> list[str]:
        """Job ids with an input still in the working area."""
        work = self.root / "work"
        return sorted(p.name for p in work.iterdir()) if work.is_dir() else []

    def move(self, source: Path, target: Path) -> None:
        """Atomic rename (same filesystem), made durable; the target's folder is created first."""
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(source, target)
        fsync_dir(target.parent)
        fsync_dir(source.parent)
        if self.is_claimed(source):
            with contextlib.suppress(OSError):
                source.parent.rmdir()  # the per-job folder, now empty
