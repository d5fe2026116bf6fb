"""Per-view depth maps: accuracy against ground truth, cancellation, and refusal on blank input."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scandrop.pipeline.bench.known_poses import workspace_from_scene
from scandrop.pipeline.bench.synthetic import SyntheticScene, cast_rays, render_scene
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.stage import never_stop, no_progress
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.dense import estimate_depth


@pytest.fixture(scope="module")
def small_scene() -> SyntheticScene:
    return render_scene(n_views=24, width=320, height=240)


def test_depth_maps_match_ground_truth(tmp_path: Path, small_scene: SyntheticScene) -> None:
    ws = Workspace(tmp_path).create()
    workspace_from_scene(small_scene, ws)
    messages: list[str] = []
    result = estimate_depth.run(estimate_depth.DepthConfig(), ws, lambda f, m: messages.append(m), never_stop)
    assert result.views == result.views_with_depth == 24
    # One message per view, after two before the first view (the cameras read, the views planned).
    assert messages[:2] == ["reading the cameras", "depth 0/24: views and their sources chosen"]
    assert len([m for m in messages if re.match(r"depth [1-9]\d*/24: ", m)]) == 24
    name, R, t = small_scene.names[0], small_scene.R[0], small_scene.t[0]
    with np.load(ws.depth_dir / f"{name}.npz") as data:
        depth, normals, K = data["depth"], data["normals"], data["K"]
        assert depth.dtype == np.float32 and depth.shape == (240, 320)
        assert float(data["scale"]) == 1.0
        assert data["rgb"].shape == (240, 320, 3)
    valid = depth > 0
    assert valid.mean() > 0.2
    assert np.allclose(np.linalg.norm(normals[valid], axis=1), 1.0, atol=1e-3)
    # True camera z along each valid pixel's ray (OpenCV pixel centres in the stored K).
    v, u = np.nonzero(valid)
    rays = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones(len(u))], axis=1)
    dirs = rays @ R
    norms = np.linalg.norm(dirs, axis=1)
    hit, _ = cast_rays(small_scene.primitives, -R.T @ t, dirs / norms[:, None])
    true_z = np.where(np.isfinite(hit), hit / norms, 1e9)  # a miss counts as a gross error
    rel = np.abs(depth[v, u] - true_z) / true_z
    assert np.median(rel) < 0.003
    assert np.mean(rel < 0.01) > 0.95


def test_cancel_stops_between_views(tmp_path: Path, small_scene: SyntheticScene) -> None:
    ws = Workspace(tmp_path).create()
    workspace_from_scene(small_scene, ws)
    done: list[float] = []
    with pytest.raises(ScandropError) as err:
        estimate_depth.run(
            estimate_depth.DepthConfig(), ws, lambda f, m: done.append(f), lambda: len(done) >= 1
        )
    assert err.value.code == ErrorCode.cancelled
    assert len(list(ws.depth_dir.glob("*.npz"))) < 24


def test_blank_photos_fail_with_dense_failed(tmp_path: Path, small_scene: SyntheticScene) -> None:
    """Correct cameras but featureless grey photos: no depth may be invented."""
    ws = Workspace(tmp_path).create()
    workspace_from_scene(small_scene, ws)
    for name in small_scene.names:
        Image.fromarray(np.full((240, 320, 3), 128, np.uint8)).save(ws.images_dir / name)
    with pytest.raises(ScandropError) as err:
        estimate_depth.run(estimate_depth.DepthConfig(), ws, no_progress, never_stop)
    assert err.value.code == ErrorCode.dense_failed


def test_needs_a_sparse_model(tmp_path: Path) -> None:
    with pytest.raises(ScandropError) as err:
        estimate_depth.run(estimate_depth.DepthConfig(), Workspace(tmp_path), no_progress, never_stop)
    assert err.value.code == ErrorCode.dense_failed


def test_merge_keeps_agreeing_partners_only() -> None:
    nan = np.nan
    depths = [
        np.array([[1.0, 1.0, 1.0, nan]], np.float32),
        np.array([[1.002, 2.0, nan, nan]], np.float32),
        np.array([[1.004, 3.0, nan, nan]], np.float32),
    ]
    depth, conf = estimate_depth._merge(depths, agree_rel=0.01)
    np.testing.assert_allclose(depth[0], [1.002, 0.0, 1.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(conf[0], [1.0, 0.0, 1 / 3, 0.0], rtol=1e-6)
