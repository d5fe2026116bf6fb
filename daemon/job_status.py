"""status.json: the one document that says where a job stands, for people, scripts and the API.

Versioned: readers check `schema_version`; fields are only ever added. It is written whole (temp
file, fsync, rename) at every state and stage change and every few seconds while a stage runs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from scandrop.daemon.job_settings import JobSettings
from scandrop.daemon.settings import ExecutorKind
from scandrop.pipeline.core.errors import ErrorCode, ErrorInfo
from scandrop.pipeline.core.stage import sha256_file, write_json_atomic
from scandrop.pipeline.report import Report

STATUS_SCHEMA_VERSION = 1
STATUS_FILE = "status.json"


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


class InputInfo(BaseModel):
    name: str = Field(description="The drop's name in the inbox.")
    format: str = Field(description="photos (folder), zip, video, photo, or unknown.")
    original: str = Field(description="Where it was dropped.")
    location: str = Field(description="Where it is now: the working area, done/ or failed/.")
    files: int
    bytes: int


class OutputFile(BaseModel):
    name: str
    size: int
    sha256: str


class DataMode(StrEnum):
    """How a job's input reaches the machine that runs it, and its outputs come back."""

    local = "local"  # the daemon's own machine
    shared = "shared"  # the node mounts the inbox and outbox (checked by a probe): paths used as is
    shipped = "shipped"  # input through Ray's object store; outputs returned and written by the daemon


class ExecutionInfo(BaseModel):
    """status.json's `execution`: where the job's current attempt runs."""

    executor: ExecutorKind
    data: DataMode
    node: str | None = Field(None, description="The Ray node's address (ray executor).")
    node_id: str | None = Field(None, description="The Ray node's id (ray executor).")


class JobStatus(BaseModel):
    schema_version: int = STATUS_SCHEMA_VERSION
    job_id: str
    kind: str = Field(description="multi_view, video or single_photo.")
    state: JobState = JobState.queued
    input: InputInfo
    outbox: str = Field(description="The job's output folder.")
    content_hash: str | None = None
    duplicate_of: str | None = Field(None, description="An earlier job with identical input, reused.")
    forced: bool = False
    attempts: int = 0
    stage: str | None = None
    stage_progress: float = 0.0
    progress: float = 0.0
    message: str = ""
    device: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    started_at: datetime | None = None
    updated_at: datetime
    finished_at: datetime | None = None
    outputs: list[OutputFile] = Field(default_factory=list)
    report: dict[str, Any] | None = Field(None, description="Quality summary from report.json.")
    error: ErrorInfo | None = None
    hot_folder: str | None = Field(None, description="The hot folder it was dropped into; None: the inbox.")
    settings: JobSettings | None = Field(None, description="Preset, device and overrides it runs with.")
    eta_seconds: float | None = Field(
        None, description="Estimated seconds until the job is done, once its stage has shown enough progress."
    )
    execution: ExecutionInfo | None = Field(None, description="Where the job's current attempt runs.")


def now() -> datetime:
    return datetime.now(UTC)


def missing_input(status: JobStatus) -> ErrorInfo:
    """The error of a job whose input vanished from where status.json says it is."""
    return ErrorInfo(
        code=ErrorCode.input_missing,
        message=f"The input {status.input.name} is gone from {Path(status.input.location).parent}.",
        hint="Drop it into the inbox again.",
    )


def write_status(status: JobStatus) -> None:
    write_json_atomic(Path(status.outbox) / STATUS_FILE, status.model_dump(mode="json"))


def list_outputs(folder: Path, names: list[str]) -> list[OutputFile]:
    """Name, size and checksum of each finished output (report.json's list) that is really there."""
    found = []
    for name in [*names, "report.json"]:
        if name == STATUS_FILE:  # the pipeline lists what it found in the folder: ours, rewritten later
            continue
        path = folder / name
        if path.is_file():
            found.append(OutputFile(name=name, size=path.stat().st_size, sha256=sha256_file(path)))
    return found


def quality_summary(report: Report) -> dict[str, Any]:
    """What a person checks first: how many photos were placed, how much geometry, how long, how big."""
    return {
        "images": report.images.model_dump(mode="json"),
        "mean_reprojection_error_px": report.mean_reprojection_error_px,
        "points": report.points,
        "triangles": report.triangles,
        "splats": report.splats,
        "splat_method": report.splat_method,
        "seconds": report.seconds,
        "peak_rss_mb": report.peak_rss_mb,
        "preset": report.preset,
        "kind": report.kind,
        "frames": report.frames,
        "single_view": report.single_view,
        "mono_depth": report.mono_depth,
        "stages": [
            {"name": s.name, "backend": s.backend, "seconds": s.seconds, "peak_rss_mb": s.peak_rss_mb}
            for s in report.stages
        ],
    }
