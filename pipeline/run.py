"""The pipeline, composed: photos folder in, every output and report.json out.

One readable function calls the stages in order. Each stage reports its own progress; this module
maps it onto the whole job, measures time and peak memory per stage, and always writes
report.json, on failure too, with the error's code, message and hint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pycolmap
from pydantic import BaseModel

from scandrop.pipeline.core.cpu_budget import limit_threads, usable_cpus
from scandrop.pipeline.core.errors import ErrorCode, ErrorInfo, ScandropError, disk_full, disk_nearly_full
from scandrop.pipeline.core.live_model import LiveModel
from scandrop.pipeline.core.resources import Meter
from scandrop.pipeline.core.stage import (
    OnEvent,
    Progress,
    ProgressEvent,
    StopCheck,
    atomic_dir,
    check_stop,
    never_stop,
    write_json_atomic,
)
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.dense import estimate_depth, fill_depth, fuse_depth, patchmatch_cpu, patchmatch_depth
from scandrop.pipeline.dense.view_map import ViewMapper
from scandrop.pipeline.export import export_assets, render_preview
from scandrop.pipeline.ingest import drop_input, extract_frames, ingest_images
from scandrop.pipeline.ingest.input_kind import InputKind, input_kind, job_kind, listing
from scandrop.pipeline.plan import StagePlan, backend_device, build_plan, learned_device, plan_stages
from scandrop.pipeline.presets import PipelineConfig
from scandrop.pipeline.report import Report, StageReport, new_report
from scandrop.pipeline.sparse import reconstruct_sparse
from scandrop.pipeline.surface import build_mesh, make_splats, optimise_splats, single_view

# Share of the whole job each stage takes on a typical CPU run; drives the overall progress bar.
STAGE_WEIGHTS: dict[str, float] = {
    "frames": 0.05,  # video drops only
    "ingest": 0.03,
    "sparse": 0.40,
    "depth": 0.30,
    "fill": 0.03,  # monocular depth in stereo holes (when the depth model is installed)
    "fuse": 0.07,
    "mesh": 0.12,
    "splats": 0.03,
    "optimise": 0.05,  # splat training on CUDA (skipped elsewhere)
    "export": 0.03,
    "preview": 0.02,
    "single_view": 0.5,  # single-photo drops only, instead of sparse..mesh
}


def _stage_progress(stage: str, plan: list[str], on_event: OnEvent) -> Callable[[float, str], None]:
    """Map a stage's own 0..1 onto the whole job, over the stages this job runs."""
    total = sum(STAGE_WEIGHTS[s] for s in plan)
    before = sum(STAGE_WEIGHTS[s] for s in plan[: plan.index(stage)]) / total
    weight = STAGE_WEIGHTS[stage] / total

    def progress(fraction: float, message: str, model: LiveModel | None = None) -> None:
        fraction = min(1.0, max(0.0, float(fraction)))
        on_event(
            ProgressEvent(
                stage=stage,
                stage_progress=fraction,
                progress=before + weight * fraction,
                message=message,
                model=model,
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
    map_views: ViewMapper | None = None,
) -> Report:
    """Reconstruct the photos in `input_dir` into `out_dir`. Never raises for expected failures.
    `map_views` runs the CPU depth stage's per-view tasks elsewhere (e.g. on a cluster)."""
    pycolmap.logging.minloglevel = 2  # COLMAP's own INFO lines would drown the job log
    cpu0 = os.times()
    cpus = usable_cpus()
    limit_threads(cpus)
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
    report.cpus = cpus

    kind = input_kind(input_dir)
    report.kind = job_kind(kind)
    plan = plan_stages(kind)
    backends = build_plan(plan, device or {"name": "cpu"})
    report.plan = [b.model_dump() for b in backends]
    current = ["start"]

    def stage(name: str, fn: Callable[..., BaseModel], *args: Any, live: bool = False) -> Any:
        current[0] = name
        check_stop(should_stop)
        result: BaseModel | None = None
        try:
            with Meter() as meter:
                progress = _stage_progress(name, plan, events)
                # A stage that shows its model as it grows gets the same callback as `live` too.
                result = fn(*args, progress, should_stop, **({"live": progress} if live else {}))
        finally:  # a failed stage is reported too, with its time and memory up to the failure
            report.stages.append(
                StageReport(
                    name=name,
                    seconds=round(meter.seconds, 3),
                    peak_rss_mb=round(meter.peak_rss_mb, 1),
                    backend=next(b.backend for b in backends if b.stage == name),
                    result=result.model_dump(mode="json") if result is not None else {"failed": True},
                )
            )
        return result

    try:
        ws = _prepare_workspace(work_dir, input_dir, config)
        photos, sparse_config, ingest_config = input_dir, config.sparse, config.ingest
        if kind is InputKind.video:  # keyframes become the photos; their order lets SfM match neighbours
            frames = stage("frames", extract_frames.run_in_workspace, config.frames, input_dir, ws)
            report.frames = _frames_summary(frames)
            photos, sparse_config = ws.frames_dir, config.sparse.model_copy(update={"ordered": True})
        elif kind is InputKind.photo:  # ingested like a set of one: orientation, alpha, limits
            photos = _single_photo_folder(input_dir, ws)
            ingest_config = config.ingest.model_copy(update={"min_images": 1})
        ingested = stage("ingest", ingest_images.run, ingest_config, photos, ws)
        report.images.input = ingested.images_in
        report.images.usable = ingested.usable
        report.images.rejected = [r.model_dump() for r in ingested.rejected]
        if kind is InputKind.photo:
            on = backend_device(backends, "single_view")
            view = stage("single_view", single_view.run, config.single_view, ws, on)
            report.images.registered = 1
            report.single_view = view.model_dump(mode="json")
        else:
            sparse_config = sparse_config.model_copy(
                update={
                    "device": backend_device(backends, "sparse"),
                    "learned_device": learned_device(device or {"name": "cpu"}),
                }
            )
            sparse = stage(
                "sparse", reconstruct_sparse.run, sparse_config, ws, ingested.camera_groups(), live=True
            )
            report.images.registered = sparse.registered
            report.images.unregistered = sparse.unregistered
            report.mean_reprojection_error_px = sparse.mean_reprojection_error_px
            on_gpu = backend_device(backends, "depth") == "cuda"  # PatchMatch writes the same depth maps
            on_cpu = patchmatch_cpu.run if config.depth.method == "patchmatch" else estimate_depth.run
            on_cpu = partial(on_cpu, map_views=map_views)
            stage("depth", patchmatch_depth.run if on_gpu else on_cpu, config.depth, ws)
            on = backend_device(backends, "fill")
            filled = stage("fill", fill_depth.run, config.fill, ws, on)
            report.mono_depth = filled.model_dump(mode="json", exclude={"per_view"})
            stage("fuse", fuse_depth.run, config.fuse, ws, live=True)
            stage("mesh", build_mesh.run, config.mesh, ws)
        splats = stage("splats", make_splats.run, config.splats, ws)
        report.splat_method = splats.method
        if "optimise" in plan:
            planned = next(b for b in backends if b.stage == "optimise")
            trained = stage("optimise", _optimise_splats, config.optimise, ws, planned)
            if isinstance(trained, optimise_splats.OptimiseResult):
                report.splat_method = f"{splats.method}; {trained.method}"
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
        full = disk_full(exc) or disk_nearly_full(
            [work_dir, out_dir], f"the {current[0]} stage failed ({type(exc).__name__}: {exc})"
        )
        if full is None:
            traceback.print_exc()
        report.error = full or ErrorInfo(
            code=ErrorCode.internal_error,
            message=f"Unexpected failure in the {current[0]} stage ({type(exc).__name__}: {exc}).",
            hint="This is a bug in scandrop: please report it with report.json and the log.",
        )
    finally:
        report.finish()
        cpu1 = os.times()  # this process and the workers it waited for (dense, Poisson)
        spent = ("user", "system", "children_user", "children_system")
        report.cpu_seconds = round(sum(getattr(cpu1, f) - getattr(cpu0, f) for f in spent), 1)
        report.peak_rss_mb = max((s.peak_rss_mb for s in report.stages), default=0.0)
        report.outputs = sorted(
            str(rel)
            for rel in (p.relative_to(out_dir) for p in out_dir.rglob("*") if p.is_file())
            if rel.name != "report.json" and not any(part.startswith(".") for part in rel.parts)
        )
        try:
            write_json_atomic(out_dir / "report.json", report.model_dump(mode="json"))
        except OSError as exc:  # a full disk: the job fails as such, the atomic write left no half file
            full = disk_full(exc)
            if full is None:
                raise
            report.ok, report.error = False, full
    return report


def _fingerprint(input_dir: Path, config: PipelineConfig) -> str:
    """What a workspace was made from: the input listing (a folder's files, or the file) and the settings."""
    digest = hashlib.sha256(config.model_dump_json().encode())
    digest.update(json.dumps(listing(input_dir)).encode())
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


def _frames_summary(frames: extract_frames.FramesResult) -> dict[str, Any]:
    summary = frames.model_dump(mode="json", exclude={"kept"})
    summary["kept"] = len(frames.kept)
    summary["kept_times_s"] = [round(f.time_s, 3) for f in frames.kept]
    return summary


def _single_photo_folder(photo: Path, ws: Workspace) -> Path:
    """A folder holding just the dropped photo, so ingest treats it like any set."""
    drop_input.refuse_links_out(photo)
    folder = ws.root / "single"
    if not (folder / photo.name).is_file():
        with atomic_dir(folder) as tmp:
            shutil.copy2(photo, tmp / photo.name)
    return folder


class SkippedStage(BaseModel):
    skipped: bool = True
    reason: str


def _optimise_splats(
    config: optimise_splats.OptimiseConfig,
    ws: Workspace,
    planned: StagePlan,
    progress: Progress,
    should_stop: StopCheck,
) -> BaseModel:
    """Train the splats against the photos where the plan has a GPU rasteriser; else say why not."""
    if planned.backend != "gsplat-cuda":
        progress(1.0, planned.reason)
        return SkippedStage(reason=planned.reason)
    return optimise_splats.run(config, ws, "cuda", progress, should_stop)
