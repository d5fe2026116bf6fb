"""Real photo sets from ../shared/datasets (beside the project): the issue's real-data targets.

Marked slow; CI runs them. They skip with a reason where the shared data is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pycolmap
import pytest
from PIL import Image

from scandrop.daemon.worker import run_job
from scandrop.pipeline.bench import baseline, metrics, synthetic
from scandrop.pipeline.bench.run import default_datasets_dir
from scandrop.pipeline.core.errors import ErrorCode
from scandrop.pipeline.core.stage import never_stop, no_progress
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.ingest import ingest_images
from scandrop.pipeline.job_spec import JobSpec
from scandrop.pipeline.presets import preset_config
from scandrop.pipeline.sparse import reconstruct_sparse

DATASETS = default_datasets_dir()
pytestmark = [pytest.mark.slow, pytest.mark.long(7)]


def _dataset(name: str) -> Path:
    root = DATASETS / name
    if not (root / "images").is_dir():
        pytest.skip(f"{root} not found: the shared datasets live in ../shared/datasets beside the project")
    return root


def _least_tie_points(out: Path) -> int:
    """The fewest points of the delivered model that any placed photo sees."""
    rec = pycolmap.Reconstruction(str(out / "cameras" / "sparse"))
    return min(rec.image(i).num_points3D for i in rec.reg_image_ids())


def test_herz_jesu_registers_all_and_matches_surveyed_rotations(tmp_path: Path) -> None:
    """The balanced preset's ingest and sparse stages, as a job runs them: the claim is the poses.
    (The kitchen below runs a whole balanced job on real photos; so does `scandrop bench herzjesu`.)"""
    root = _dataset("strecha_herz_jesus_p8")
    config = preset_config("balanced")
    ws = Workspace(tmp_path / "w").create()
    ingested = ingest_images.run(config.ingest, root / "images", ws, no_progress, never_stop)
    result = reconstruct_sparse.run(config.sparse, ws, ingested.camera_groups(), no_progress, never_stop)
    assert result.registered == 8, result.unregistered
    gt = synthetic.load_gt_cameras(root / "gt_cameras.json")
    rec = pycolmap.Reconstruction(str(ws.sparse_dir))
    est = {rec.images[i].name: rec.images[i].cam_from_world().rotation.matrix() for i in rec.reg_image_ids()}
    ours = np.median(metrics.relative_rotation_errors(est, {n: r for n, (r, _) in gt.items()}))
    plain = baseline.run_plain_pycolmap(
        root / "images", tmp_path / "plain", max_image_size=config.ingest.max_image_size
    )
    plain_rot = plain.rotation_matrices()
    theirs = np.median(metrics.relative_rotation_errors(plain_rot, {n: gt[n][0] for n in plain_rot}))
    # "No worse than a plain pycolmap run at the same image size", with 10% + 0.005 deg for run-to-run noise.
    assert ours <= theirs * 1.1 + 0.005, (ours, theirs)


def test_kitchen_registers_at_least_24_of_25(tmp_path: Path) -> None:
    root = _dataset("vggt_kitchen")
    report = run_job(
        root / "images", tmp_path / "out", JobSpec(preset="balanced"), tmp_path / "w", {"name": "cpu"}
    )
    assert report.ok, report.error
    assert report.images.registered >= 24
    assert _least_tie_points(tmp_path / "out") >= 15
    assert report.peak_rss_mb < 2048
    for name in (
        "model.glb",
        "points.ply",
        "splats.splat",
        "splats.ply",
        "preview.png",
        "cameras/transforms.json",
    ):
        assert (tmp_path / "out" / name).is_file()


def test_three_view_barn_becomes_a_model_of_the_barn(tmp_path: Path) -> None:
    """Three wide-baseline photos (a barn from three sides), SIFT alone: global mapping, adjusted
    again over two-view tracks; depth where one of two sources sees a pixel; points that one other
    photo confirms. Measured 2026-12-03: 0.17 px, 190 451 fused points, the barn textured in
    preview.png; before these three changes 1.44 px, 2 498 points and a preview of fragments."""
    root = _dataset("instantsplat_tnt_barn_3view")
    spec = JobSpec(preset="balanced", overrides={"sparse": {"learned": "off"}})
    report = run_job(root / "images", tmp_path / "out", spec, tmp_path / "w", {"name": "cpu"})
    assert report.ok, report.error
    assert report.images.registered == 3
    assert _least_tie_points(tmp_path / "out") >= 15
    sparse = next(stage.result for stage in report.stages if stage.name == "sparse")
    assert sparse["mapping"][-1]["note"].startswith("bundle adjusted again"), sparse["mapping"]
    assert sparse["mean_reprojection_error_px"] < 0.5
    assert (report.points or 0) > 50_000
    preview = next(stage.result for stage in report.stages if stage.name == "preview")
    assert preview["rendered"] == "textured mesh"


def test_room_with_barely_overlapping_photos_fails_clearly_or_names_what_it_left_out(tmp_path: Path) -> None:
    """The fast preset: the claim is the sparse outcome. With its features, the learned matcher's
    pairs once let global mapping place all 8 photos, 5 of them seen by 0-2 points of the model (a
    pose that nothing constrains, counted as placed): every photo the job keeps must be tied to the
    model by at least as many points as geometric verification asks of a pair (15)."""
    root = _dataset("vggt_room")
    spec = JobSpec(preset="fast")
    report = run_job(root / "images", tmp_path / "out", spec, tmp_path / "w", {"name": "cpu"})
    if report.ok:
        assert report.images.registered + len(report.images.unregistered) == report.images.usable
        assert _least_tie_points(tmp_path / "out") >= 15
    else:
        assert report.error is not None
        assert report.error.code in (
            ErrorCode.no_overlap,
            ErrorCode.too_few_registered,
            ErrorCode.dense_failed,
        )
        assert report.error.message and report.error.hint
    assert (tmp_path / "out" / "report.json").is_file()


def test_apple_video_registers_its_keyframes_and_previews_the_apple(tmp_path: Path) -> None:
    clip = DATASETS / "video_cotracker_apple" / "apple.mp4"
    if not clip.is_file():
        pytest.skip(f"{clip} not found: the shared datasets live in ../shared/datasets beside the project")
    # The fast preset: this test is about the video path (keyframes, their registration, the
    # preview); herz-jesu and the kitchen run the balanced stereo on real photos. Balanced on the
    # 30 keyframes took 6 minutes of the suite's budget.
    report = run_job(clip, tmp_path / "out", JobSpec(preset="fast"), tmp_path / "w", {"name": "cpu"})
    assert report.ok, report.error
    assert report.kind == "video" and report.frames is not None
    kept = report.frames["kept"]
    assert report.frames["decoded"] == 50 and kept >= 15
    assert report.images.registered >= 0.9 * kept, (report.images.registered, kept)
    assert (report.triangles or 0) > 5000
    preview = np.asarray(Image.open(tmp_path / "out" / "preview.png").convert("RGB"), dtype=np.float32)
    # The apple is red: a clear cluster of red-dominant pixels must be in the rendered view.
    red = (
        (preview[..., 0] > 90)
        & (preview[..., 0] > 1.4 * preview[..., 1])
        & (preview[..., 0] > 1.4 * preview[..., 2])
    )
    assert red.mean() > 0.01, f"only {red.mean():.3%} red pixels in preview.png"
