"""report.json: what a job did, stage by stage, in a schema the daemon and the benchmark read."""

from __future__ import annotations

from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from scandrop.pipeline.core.errors import ErrorInfo

REPORT_SCHEMA_VERSION = 1


class StageReport(BaseModel):
    name: str
    seconds: float
    peak_rss_mb: float
    backend: str = "cpu"
    result: dict[str, Any] = Field(default_factory=dict)


class ImagesReport(BaseModel):
    input: int = 0
    usable: int = 0
    registered: int = 0
    rejected: list[dict[str, str]] = Field(
        default_factory=list, description="Skipped at ingest: file, reason."
    )
    unregistered: list[str] = Field(default_factory=list, description="Usable but not placed in 3D.")


class Report(BaseModel):
    schema_version: int = REPORT_SCHEMA_VERSION
    scandrop_version: str
    input: str
    output: str
    kind: str = "multi_view"
    ok: bool = False
    error: ErrorInfo | None = None
    device: dict[str, Any] = Field(default_factory=dict)
    preset: str
    config: dict[str, Any]
    started_at: datetime
    finished_at: datetime | None = None
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    cpu_seconds: float | None = Field(
        None, description="CPU time of the job's process and the workers it started (user + system)."
    )
    cpus: int | None = Field(
        None, description="CPUs the job sized its workers and threads to (affinity and cgroup quota)."
    )
    images: ImagesReport = Field(default_factory=ImagesReport)
    plan: list[dict[str, str]] = Field(
        default_factory=list, description="The device plan: each stage's backend and why (pipeline/plan.py)."
    )
    mono_depth: dict[str, Any] | None = Field(
        None, description="Multi-view jobs: whether monocular depth filled stereo holes, and how much."
    )
    single_view: dict[str, Any] | None = Field(
        None, description="Single-photo drops: the depth model used and the relief's assumptions."
    )
    frames: dict[str, Any] | None = Field(
        None, description="Video drops: frames decoded, kept (and when), rejected as blurred or redundant."
    )
    mean_reprojection_error_px: float | None = None
    points: int | None = None
    triangles: int | None = None
    splats: int | None = None
    splat_method: str | None = None
    outputs: list[str] = Field(default_factory=list)
    stages: list[StageReport] = Field(default_factory=list)

    def finish(self) -> None:
        self.finished_at = datetime.now(UTC)
        self.seconds = round((self.finished_at - self.started_at).total_seconds(), 3)


def scandrop_version() -> str:
    try:
        return version("scandrop")
    except PackageNotFoundError:
        return "0+unknown"


def new_report(
    input_dir: Path,
    out_dir: Path,
    preset: str,
    config: dict[str, Any],
    device: dict[str, Any],
    started_at: datetime,
) -> Report:
    """The report of one job, before any stage has run (the worker fills it in when a job dies)."""
    return Report(
        scandrop_version=scandrop_version(),
        input=str(input_dir),
        output=str(out_dir),
        device=device,
        preset=preset,
        config=config,
        started_at=started_at,
    )
