"""make_splats: splats lie flat on a known sphere, oriented by its true normals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.pointcloud import PointCloud, save_points
from scandrop.pipeline.core.rotations import rotation_to_quat_wxyz
from scandrop.pipeline.core.stage import never_stop, no_progress
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.surface import make_splats


def unit_sphere(n: int, seed: int = 0) -> PointCloud:
    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(n, 3))
    xyz /= np.linalg.norm(xyz, axis=1, keepdims=True)
    rgb = np.clip((xyz + 1) * 127.5, 0, 255).astype(np.uint8)
    return PointCloud(xyz.astype(np.float32), xyz.astype(np.float32), rgb)


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=1,
    )


def test_quaternions_round_trip_rotations() -> None:
    rng = np.random.default_rng(3)
    q = rng.normal(size=(500, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q[q[:, 0] < 0] *= -1
    back = rotation_to_quat_wxyz(quat_to_matrix(q))
    np.testing.assert_allclose(back, q, atol=1e-9)


def test_splats_lie_flat_on_the_surface(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "job").create()
    save_points(ws.fused, unit_sphere(40_000))
    config = make_splats.SplatConfig(max_splats=10_000, opacity=0.8)
    result = make_splats.run(config, ws, no_progress, never_stop)

    assert 0 < result.splats <= 10_000 and result.input_points == 40_000
    assert "not optimised" in result.method and result.opacity == 0.8
    with np.load(ws.splats) as s:
        xyz, scales, quats, rgb, opacity = s["xyz"], s["scales"], s["quats"], s["rgb"], s["opacity"]
    assert len(xyz) == result.splats and rgb.dtype == np.uint8
    np.testing.assert_allclose(np.linalg.norm(quats, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(opacity, 0.8)
    # Voxel means of a unit sphere stay close to it.
    assert np.abs(np.linalg.norm(xyz, axis=1) - 1).max() < 0.02
    # The thin (third) axis is the surface normal; tangent scales are about the spacing.
    normal_axis = quat_to_matrix(quats.astype(np.float64))[:, :, 2]
    cos = np.abs(np.einsum("ij,ij->i", normal_axis, xyz / np.linalg.norm(xyz, axis=1, keepdims=True)))
    assert np.median(cos) > 0.99
    assert np.all(scales[:, 2] < scales[:, 1]) and np.all(scales[:, 1] <= scales[:, 0] + 1e-9)
    spacing = np.sqrt(4 * np.pi / result.splats)
    assert 0.2 * spacing < np.median(scales[:, 0]) < 2 * spacing


def test_too_few_points_is_an_error(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "job").create()
    save_points(ws.fused, unit_sphere(3))
    with pytest.raises(ScandropError) as err:
        make_splats.run(make_splats.SplatConfig(), ws, no_progress, never_stop)
    assert err.value.code is ErrorCode.dense_failed
