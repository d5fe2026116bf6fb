"""The pipeline, composed: photos folder in, every output and report.json out.

One readable function calls the stages in order. Each stage reports its own progress; this module
maps it onto the whole job, measures time and peak memory per stage, and always writes
report.json, on failure too, with the error's code, message and hint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pycolmap
from pydantic import BaseModel

from pipeline import (
    build_mesh,
    estimate_depth,
    export_assets,
    fuse_depth,
    ingest_images,
    make_splats,
    reconstruct_sparse,
    render_preview,
)
from pipeline.errors import ErrorCode, ErrorInfo, ScandropError
from pipeline.presets import PipelineConfig
from pipeline.report import Report, StageReport, new_report
from pipeline.resources import Meter
from pipeline.stage import OnEvent, ProgressEvent, StopCheck, check_stop, never_stop, write_json_atomic
from pipeline.workspace import Workspace

# Share of the whole job each stage takes on a typical CPU run; drives the overall progress bar.
STAGE_WEIGHTS: dict[str, float] = {
    "ingest": 0.03,
    "sparse": 0.40,
    "depth": 0.30,
    "fuse": 0.07,
    "mesh": 0.12,
    "splats": 0.03,
    "export": 0.03,
    "preview": 0.02,
}
STAGES = list(STAGE_WEIGHTS)


def _stage_progress(stage: str, on_event: OnEvent) -> Callable[[float, str], None]:
    before = sum(STAGE_WEIGHTS[s] for s in STAGES[: STAGES.index(stage)])

    def progress(fraction: float, message: str) -> None:
        fraction = min(1.0, max(0.0, float(fraction)))
        on_event(
            ProgressEvent(
                stage=stage,
                stage_progress=fraction,
                progress=before + STAGE_WEIGHTS[stage] * fraction,
                message=message,
            )
        )

    return progress


def run_pipeline(
    input_dir: Path,
    out_dir: Path,
    config: PipelineConfig,
    work_dir: Path,
    device: dict[str, Any] | None = None,
    on_event: OnEvent | None = None,
    should_stop: StopCheck = never_stop,
) -> Report:
    """Reconstruct the photos in `input_dir` into `out_dir`. Never raises for expected failures."""
    pycolmap.logging.minloglevel = 2  # COLMAP's own INFO lines would drown the job log
    events: OnEvent = on_event or (lambda event: None)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = new_report(
        input_dir,
        out_dir,
        config.preset.value,
        config.model_dump(mode="json"),
        device or {"name": "cpu"},
        datetime.now(UTC),
    )

    current = ["start"]

    def stage(name: str, fn: Callable[..., BaseModel], *args: Any) -> Any:
        current[0] = name
        check_stop(should_stop)
        result: BaseModel | None = None
        try:
            with Meter() as meter:
                result = fn(*args, _stage_progress(name, events), should_stop)
        finally:  # a failed stage is reported too, with its time and memory up to the failure
            report.stages.append(
                StageReport(
                    name=name,
                    seconds=round(meter.seconds, 3),
                    peak_rss_mb=round(meter.peak_rss_mb, 1),
                    result=result.model_dump(mode="json") if result is not None else {"failed": True},
                )
            )
        return result

    try:
        ws = _prepare_workspace(work_dir, input_dir, config)
        ingested = stage("ingest", ingest_images.run, config.ingest, input_dir, ws)
        report.images.input = ingested.images_in
        report.images.usable = ingested.usable
        report.images.rejected = [r.model_dump() for r in ingested.rejected]
        sparse = stage("sparse", reconstruct_sparse.run, config.sparse, ws, ingested.camera_groups())
        report.images.registered = sparse.registered
        report.images.unregistered = sparse.unregistered
        report.mean_reprojection_error_px = sparse.mean_reprojection_error_px
        stage("depth", estimate_depth.run, config.depth, ws)
        stage("fuse", fuse_depth.run, config.fuse, ws)
        stage("mesh", build_mesh.run, config.mesh, ws)
        splats = stage("splats", make_splats.run, config.splats, ws)
        report.splat_method = splats.method
        exported = stage("export", export_assets.run, config.export, ws, out_dir)
        report.points, report.triangles, report.splats = exported.points, exported.triangles, exported.splats
        stage("preview", render_preview.run, config.preview, ws, out_dir)
        report.ok = True
    except ScandropError as exc:
        report.error = exc.info()
        if report.images.unregistered:
            left_out = ", ".join(report.images.unregistered[:20])
            more = len(report.images.unregistered) - 20
            report.error.message += (
                f" Only {report.images.registered} of {report.images.usable} photos could be placed in 3D;"
                f" left out: {left_out}{f' and {more} more' if more > 0 else ''}."
            )
    except MemoryError:
        report.error = ErrorInfo(
            code=ErrorCode.internal_error,
            message="The job ran out of memory.",
            hint="Use --preset fast or fewer/smaller photos.",
        )
    except Exception as exc:  # a bug, not a user problem: say where, keep the traceback in the log
        traceback.print_exc()
        report.error = ErrorInfo(
            code=ErrorCode.internal_error,
            message=f"Unexpected failure in the {current[0]} stage ({type(exc).__name__}: {exc}).",
            hint="This is a bug in scandrop: please report it with report.json and the log.",
        )
    finally:
        report.finish()
        report.peak_rss_mb = max((s.peak_rss_mb for s in report.stages), default=0.0)
        report.outputs = sorted(
            str(rel)
            for rel in (p.relative_to(out_dir) for p in out_dir.rglob("*") if p.is_file())
            if rel.name != "report.json" and not any(part.startswith(".") for part in rel.parts)
        )
        write_json_atomic(out_dir / "report.json", report.model_dump(mode="json"))
    return report


def _fingerprint(input_dir: Path, config: PipelineConfig) -> str:
    """What a workspace was made from: the input listing (or the file, for a zip) and the settings."""
    digest = hashlib.sha256(config.model_dump_json().encode())
    if input_dir.is_dir():
        entries = ingest_images.listing(input_dir)
    else:
        st = input_dir.stat()
        entries = ((input_dir.name, st.st_size, st.st_mtime_ns),)
    digest.update(json.dumps(entries).encode())
    return digest.hexdigest()


def _prepare_workspace(work_dir: Path, input_dir: Path, config: PipelineConfig) -> Workspace:
    """Reuse a workspace only for the same input and settings (a resumed job); else start clean."""
    marker = work_dir / "job.json"
    fingerprint = _fingerprint(input_dir, config) if input_dir.exists() else ""
    try:
        same = json.loads(marker.read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        same = False
    if not same and marker.exists():
        shutil.rmtree(work_dir, ignore_errors=True)
    elif not same and work_dir.exists() and any(work_dir.iterdir()):
        raise ScandropError(
            ErrorCode.invalid_settings,
            f"The work folder {work_dir} is not empty and is not a scandrop workspace.",
            "Give an empty or new folder as the work folder; scandrop deletes its work folders.",
        )
    ws = Workspace(work_dir).create()
    write_json_atomic(marker, {"fingerprint": fingerprint, "config": config.model_dump(mode="json")})
    return ws
