"""What every stage shares: the progress callback, the stop check, and atomic file writes.

A stage is a module with one `run(config, workspace, progress, should_stop)` entry point. It
reports progress as (fraction in [0, 1], message) and calls `check_stop` between units of work
so that a cancelled job stops within seconds, not at the end of the stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.live_model import LiveModel

CANCELLED_HINT = "Run it again to redo it; the daemon reruns jobs that a shutdown stopped."

Progress = Callable[[float, str], None]
StopCheck = Callable[[], bool]


def no_progress(fraction: float, message: str) -> None:
    """A progress callback for callers that do not listen."""


def never_stop() -> bool:
    return False


def check_stop(should_stop: StopCheck) -> None:
    """Raise the `cancelled` error when the caller asked the job to stop."""
    if should_stop():
        raise ScandropError(ErrorCode.cancelled, "The job was cancelled.", CANCELLED_HINT)


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only if the block succeeds.

    Readers (the next stage, a resumed job, a user watching the outbox) never see a half file.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part" + final.suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` survive power loss (the directory entry is data too)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # some network filesystems cannot open directories; the rename still happened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; it replaces `final` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (outputs and models can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


class ProgressEvent(BaseModel):
    """One progress update of a running job; crosses the worker-process boundary."""

    stage: str
    stage_progress: float
    progress: float
    message: str
    model: LiveModel | None = None  # the model so far (live view); for watchers only, never stored


OnEvent = Callable[[ProgressEvent], None]
