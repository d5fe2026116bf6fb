"""Monocular depth in the holes stereo leaves on a weakly textured object, scored on fused points.

No network weights exist here, so the stand-in network answers each view with the true inverse
depth under an unknown scale and shift plus noise, as Depth Anything's relative depth is. The
claim tested is the stage's own logic: aligning, vouching and filling must raise the fused points'
recall on the plain sphere without lowering precision.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pycolmap
import pytest

from scandrop.pipeline.bench import metrics, synthetic
from scandrop.pipeline.core.pointcloud import load_points
from scandrop.pipeline.core.stage import never_stop, no_progress
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.dense import estimate_depth, fill_depth, fuse_depth
from scandrop.pipeline.ingest import ingest_images
from scandrop.pipeline.job_spec import JobSpec
from scandrop.pipeline.presets import resolve
from scandrop.pipeline.sparse import reconstruct_sparse


class StandInNetwork:
    """predict(view colours) -> that view's true inverse depth, distorted; keyed by the pixels."""

    backend = "stand-in"

    def __init__(self) -> None:
        self.answers: dict[str, np.ndarray] = {}

    @staticmethod
    def key(rgb: np.ndarray) -> str:
        return hashlib.sha1(np.ascontiguousarray(rgb).tobytes()).hexdigest()

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        return self.answers[self.key(rgb)]


def _true_inverse_depth(
    scene: synthetic.SyntheticScene, name: str, k: np.ndarray, shape: tuple
) -> np.ndarray:
    r, t = scene.cameras()[name]
    h, w = shape
    u, v = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    rays = np.stack([u, v, np.ones_like(u)], -1).reshape(-1, 3) @ np.linalg.inv(k).T  # z = 1
    norm = np.linalg.norm(rays, axis=1)
    dist, _ = synthetic.cast_rays(scene.primitives, -r.T @ t, (rays / norm[:, None]) @ r)
    z = (dist / norm).reshape(h, w)
    return np.where(np.isfinite(z), 1.0 / np.where(np.isfinite(z), z, 1.0), 0.0)


@pytest.fixture(scope="module")
def weak(tmp_path_factory: pytest.TempPathFactory) -> tuple[synthetic.SyntheticScene, Workspace, Path]:
    root = tmp_path_factory.mktemp("weak")
    scene = synthetic.render_scene(n_views=24, width=320, height=240, seed=0, texture="weak")
    synthetic.write_scene(scene, root / "photos")
    config = resolve(JobSpec(preset="balanced"))
    ws = Workspace(root / "ws").create()
    ingested = ingest_images.run(config.ingest, root / "photos", ws, no_progress, never_stop)
    reconstruct_sparse.run(config.sparse, ws, ingested.camera_groups(), no_progress, never_stop)
    estimate_depth.run(config.depth, ws, no_progress, never_stop)
    stereo_only = root / "stereo-depth"
    shutil.copytree(ws.depth_dir, stereo_only)
    return scene, ws, stereo_only


def _score(scene: synthetic.SyntheticScene, ws: Workspace) -> dict[str, float]:
    """Fused points against the true surface (all of it, and the plain sphere alone) at 1% size."""
    rec = pycolmap.Reconstruction(str(ws.sparse_dir))
    gt = scene.cameras()
    names = [rec.image(i).name for i in rec.reg_image_ids()]
    est_c = np.array([rec.image(i).projection_center() for i in rec.reg_image_ids()])
    gt_c = np.array([-gt[n][0].T @ gt[n][1] for n in names])
    _, to_gt = metrics.centre_errors(est_c, gt_c)
    points = to_gt(load_points(ws.fused).xyz)
    truth = scene.surface_samples(200_000)
    tau = 0.01 * scene.size
    precision, recall, _ = metrics.precision_recall_fscore(points, truth, tau)
    sphere = truth[np.abs(scene.primitives[1].sdf(truth)) < 1e-6]
    _, sphere_recall, _ = metrics.precision_recall_fscore(points, sphere, tau)
    return {"precision": precision, "recall": recall, "sphere_recall": sphere_recall}


def _fuse(ws: Workspace) -> None:
    ws.fused.unlink(missing_ok=True)
    fuse_depth.run(resolve(JobSpec(preset="balanced")).fuse, ws, no_progress, never_stop)


def test_monocular_fill_raises_recall_on_a_plain_surface_without_losing_precision(
    weak: tuple[synthetic.SyntheticScene, Workspace, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    scene, ws, stereo_only = weak
    shutil.rmtree(ws.depth_dir)
    shutil.copytree(stereo_only, ws.depth_dir)
    _fuse(ws)
    before = _score(scene, ws)

    network = StandInNetwork()
    rng = np.random.default_rng(7)
    for path in sorted(ws.depth_dir.glob("*.npz")):
        with np.load(path) as data:
            inverse = _true_inverse_depth(scene, str(data["name"]), data["K"], data["depth"].shape)
            noise = rng.normal(0.0, 0.002 * inverse[inverse > 0].std(), inverse.shape)
            network.answers[network.key(data["rgb"])] = (3.1 * inverse + 0.27 + noise).astype(np.float32)
    monkeypatch.setattr(fill_depth, "load_model", lambda config, device: network)
    config = resolve(JobSpec(preset="balanced"))
    result = fill_depth.run(config.fill, ws, "cpu", no_progress, never_stop)
    assert result.used and result.views_filled >= 12 and result.pixels_filled > 0
    _fuse(ws)
    after = _score(scene, ws)
    print(f"\nstereo only {before}\nwith monocular fill {after}")
    assert after["sphere_recall"] >= before["sphere_recall"] + 0.10
    assert after["recall"] > before["recall"]
    assert after["precision"] >= before["precision"] - 0.01


def test_without_the_model_auto_mode_says_so_and_changes_nothing(
    weak: tuple[synthetic.SyntheticScene, Workspace, Path], tmp_path: Path
) -> None:
    _, ws, _ = weak
    config = resolve(JobSpec(preset="balanced", overrides={"fill": {"models_dir": str(tmp_path)}}))
    before = {p.name: p.stat().st_mtime_ns for p in ws.depth_dir.glob("*.npz")}
    result = fill_depth.run(config.fill, ws, "cpu", no_progress, never_stop)
    assert not result.used and "scandrop models pull depth-anything-v2-small" in result.reason
    assert {p.name: p.stat().st_mtime_ns for p in ws.depth_dir.glob("*.npz")} == before
