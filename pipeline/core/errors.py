"""Failures a user can act on: one enum of stable codes, one exception type.

The codes are a contract: they appear in report.json, status.json, the API and the log, and
users script against them. Add codes; never rename or reuse one.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel


class ErrorCode(StrEnum):
    no_input = "no_input"
    too_few_images = "too_few_images"
    no_overlap = "no_overlap"
    too_few_registered = "too_few_registered"
    dense_failed = "dense_failed"
    mesh_failed = "mesh_failed"
    export_failed = "export_failed"
    device_unavailable = "device_unavailable"
    model_missing = "model_missing"
    invalid_settings = "invalid_settings"
    worker_crashed = "worker_crashed"
    cancelled = "cancelled"
    timeout = "timeout"
    internal_error = "internal_error"
    unsafe_input = "unsafe_input"
    unsafe_archive = "unsafe_archive"
    bad_archive = "bad_archive"
    archive_too_large = "archive_too_large"
    unsupported_input = "unsupported_input"
    input_missing = "input_missing"
    claim_failed = "claim_failed"
    unreadable_video = "unreadable_video"
    model_corrupt = "model_corrupt"
    disk_full = "disk_full"


class ErrorInfo(BaseModel):
    """The serialisable form of a ScandropError (report.json, status.json, API)."""

    code: ErrorCode
    message: str
    hint: str = ""


class ScandropError(Exception):
    """An expected failure with a stable code, a message a person understands and a hint."""

    def __init__(self, code: ErrorCode, message: str, hint: str = "") -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.hint = hint

    def __reduce__(self) -> tuple[type[ScandropError], tuple[ErrorCode, str, str]]:
        # Worker processes send these back to the job process; keep all three fields on the way.
        return (ScandropError, (self.code, self.message, self.hint))

    def info(self) -> ErrorInfo:
        return ErrorInfo(code=self.code, message=self.message, hint=self.hint)


DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


DISK_FULL_HINT = (
    "Free space on the outbox and state_dir disks (or set retention_days and min_free_space_mb), "
    "then move the drop from failed/ back into the inbox."
)
# After a failure that carries no errno (COLMAP's C++ aborting on a failed write), a filesystem
# with less than this left is taken as the cause.
NEARLY_FULL_MB = 16.0


def disk_full(exc: BaseException) -> ErrorInfo | None:
    """The disk_full error of an exception caused by a full disk or quota (anywhere in its chain)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            target = seen.filename2 or seen.filename  # a copy's OSError names its source first
            where = f" writing {target}" if target else ""
            return ErrorInfo(
                code=ErrorCode.disk_full,
                message=f"The disk filled up{where}: {seen.strerror or seen}.",
                hint=DISK_FULL_HINT,
            )
        seen = seen.__cause__ or seen.__context__
    return None


def free_mb(path: Path) -> float | None:
    """Free megabytes for an unprivileged writer at `path` (or its nearest existing parent)."""
    for folder in (path, *path.parents):
        try:
            st = os.statvfs(folder)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize / 1e6
    return None


def disk_nearly_full(paths: Iterable[Path], what: str) -> ErrorInfo | None:
    """disk_full when a filesystem the job writes to is (almost) out of space after `what` failed.

    A probe, not a guess from the message: native code (COLMAP's database and model writers) aborts
    or raises without an errno when a write fails, and the full disk is still there to be measured.
    """
    for path in paths:
        mb = free_mb(path)
        if mb is not None and mb < NEARLY_FULL_MB:
            return ErrorInfo(
                code=ErrorCode.disk_full,
                message=f"The disk holding {path} is full ({mb:.1f} MB free) and {what}.",
                hint=DISK_FULL_HINT,
            )
    return None
