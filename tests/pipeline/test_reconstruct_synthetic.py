"""End to end on a rendered scene with exact ground truth: the issue's synthetic targets.

The pipeline runs once (module fixture) through the same worker process the daemon uses; each
test then checks one promise against the ground truth.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trimesh

from scandrop.daemon.worker import run_job
from scandrop.pipeline.bench import metrics, synthetic, texture_held_out
from scandrop.pipeline.bench.run import estimated_cameras, score_geometry, score_held_out, score_poses
from scandrop.pipeline.core.cpu_budget import usable_cpus
from scandrop.pipeline.export.export_assets import ExportConfig
from scandrop.pipeline.job_spec import JobSpec
from scandrop.pipeline.report import Report

pytestmark = pytest.mark.long(3)

OUTPUTS = [
    "model.glb",
    "points.ply",
    "splats.splat",
    "splats.ply",
    "cameras/transforms.json",
    "cameras/sparse/cameras.bin",
    "cameras/sparse/images.bin",
    "cameras/sparse/points3D.bin",
    "cameras/images/view_000.png",
    "preview.png",
    "report.json",
]


@pytest.fixture(scope="module")
def scene() -> synthetic.SyntheticScene:
    return synthetic.render_scene(n_views=24, width=640, height=480, seed=0)


@pytest.fixture(scope="module")
def job(scene: synthetic.SyntheticScene, tmp_path_factory: pytest.TempPathFactory) -> tuple[Report, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.write_scene(scene, root / "photos")
    out = root / "out"
    report = run_job(root / "photos", out, JobSpec(preset="balanced"), root / "work", {"name": "cpu"})
    return report, out


@pytest.fixture(scope="module")
def poses(job: tuple[Report, Path], scene: synthetic.SyntheticScene) -> dict[str, Any]:
    return score_poses(estimated_cameras(job[1]), scene.cameras())


def test_job_succeeds_with_every_output(job: tuple[Report, Path]) -> None:
    report, out = job
    assert report.ok, report.error
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "report.json").read_text())
    assert saved["ok"] is True
    assert saved["cpu_seconds"] > 0  # the job process's own, its workers' included
    assert saved["cpus"] == usable_cpus()  # what its workers and threads were sized to
    assert [s["name"] for s in saved["stages"]] == [
        "ingest",
        "sparse",
        "depth",
        "fill",
        "fuse",
        "mesh",
        "splats",
        "optimise",
        "export",
        "preview",
    ]
    worked = [s for s in saved["stages"] if not s["result"].get("skipped")]  # optimise: no GPU here
    assert [s["name"] for s in saved["stages"] if s not in worked] == ["optimise"]
    assert all(s["seconds"] > 0 and s["peak_rss_mb"] > 0 for s in worked)
    assert saved["points"] > 10_000 and saved["triangles"] > 1_000 and saved["splats"] > 1_000
    assert "not optimised" in saved["splat_method"]


def test_every_view_registered_with_accurate_rotations(
    job: tuple[Report, Path], scene: synthetic.SyntheticScene, poses: dict[str, Any]
) -> None:
    report, _ = job
    assert report.images.registered == len(scene.names)
    assert poses["rot_err_median_deg"] < 0.05
    assert poses["centre_err_median_rel"] < 0.005


def test_dense_points_and_mesh_match_the_true_surface(
    job: tuple[Report, Path], scene: synthetic.SyntheticScene, poses: dict[str, Any]
) -> None:
    _, out = job
    scores = score_geometry(out, poses["sim3"], scene.surface_samples(300_000), 0.01 * scene.size)
    assert scores["points_f"] >= 0.95, scores
    assert scores["mesh_f"] >= 0.90, scores


def test_outputs_share_one_upright_frame(
    job: tuple[Report, Path], scene: synthetic.SyntheticScene, poses: dict[str, Any]
) -> None:
    _, out = job
    cams = estimated_cameras(out)
    r = poses["sim3"].R
    gt_up = np.array([0.0, 1.0, 0.0])  # the synthetic world is y-up
    est_up_in_gt = r @ np.array([0.0, 1.0, 0.0])
    assert np.degrees(np.arccos(np.clip(est_up_in_gt @ gt_up, -1, 1))) < 2.0
    # The GLB, the point cloud and the cameras agree: mesh and points overlap, cameras around them.
    mesh = trimesh.load(out / "model.glb", force="mesh")
    points = trimesh.load(out / "points.ply").vertices
    assert np.linalg.norm(mesh.bounds.mean(axis=0) - points.mean(axis=0)) < 0.2
    transforms = json.loads((out / "cameras" / "transforms.json").read_text())
    assert len(transforms["frames"]) == len(scene.names)
    for frame in transforms["frames"]:
        c2w = np.asarray(frame["transform_matrix"])
        r_est, t_est = cams[Path(frame["file_path"]).name]
        np.testing.assert_allclose(c2w[:3, 3], -r_est.T @ t_est, atol=1e-6)
    pts = metrics.sample_mesh(np.asarray(mesh.vertices), np.asarray(mesh.faces), 1000)
    assert np.isfinite(pts).all()


def test_texture_beats_vertex_colours_at_held_out_views(
    job: tuple[Report, Path], poses: dict[str, Any]
) -> None:
    """Rendered where no photo was taken, the textured model.glb is closer to the truth than the
    same mesh with vertex colours."""
    report, out = job
    texture = next(s for s in report.stages if s.name == "export").result["texture"]
    assert texture["texture"] == "atlas" and texture["faces_textured"] > 0.95, texture
    # At the photos' resolution (at half of it the two differ by 0.3 dB: the texture's detail is lost).
    held_out = synthetic.render_scene(n_views=2, width=640, height=480, seed=0, alpha=True, path="held_out")
    row = score_held_out(out, out.parent / "work", poses["sim3"], held_out)
    print(f"held-out PSNR: texture {row['psnr_db']} dB, vertex colours {row['psnr_vertex_db']} dB, {texture}")
    # Measured 25.5 against 24.4 dB: the mesh's own error (a few pixels) blurs what the texture holds.
    assert row["textured"] and row["psnr_db"] >= row["psnr_vertex_db"] + 0.5, row


def test_texture_scored_at_photos_it_was_not_baked_from(job: tuple[Report, Path]) -> None:
    """The benchmark's real-set texture check: baked without three of the photos, the model seen
    from those photos' poses matches them (the photos are exact renders here)."""
    _, out = job
    row = texture_held_out.score(out.parent / "work", ExportConfig())
    photos = row["texture_held_out_photos"]
    assert len(photos) == 3 and "view_000.png" not in photos and "view_023.png" not in photos, photos
    assert row["texture_held_out_pixels"] > 0.2 * 3 * 640 * 480, row
    # Measured 29.58 dB (28.25 / 32.73 / 29.01): above the 25.5 dB at novel views (the test above),
    # as the mesh was built with these photos.
    assert row["texture_held_out_db"] >= 27.0 and min(row["texture_held_out_per_view_db"]) >= 25.0, row
