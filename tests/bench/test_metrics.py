"""Metrics: each score gives the known answer on a case built with a known error."""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from scandrop.pipeline.bench.metrics import (
    centre_errors,
    explained_share,
    fscores_at,
    precision_recall_fscore,
    relative_rotation_errors,
    sample_mesh,
    transforms_cameras,
    umeyama,
)


def _cameras(n: int = 6) -> dict[str, np.ndarray]:
    rots = Rotation.random(n, random_state=1).as_matrix()
    return {f"im{i}.png": r for i, r in enumerate(rots)}


def test_relative_rotation_error_ignores_the_world_frame() -> None:
    gt = _cameras()
    g = Rotation.from_rotvec([0.3, -1.2, 2.0]).as_matrix()
    est = {n: r @ g for n, r in gt.items()}  # same cameras, rotated world
    errors = relative_rotation_errors(est, gt)
    assert errors.shape == (15,)
    assert errors.max() < 1e-9


def test_relative_rotation_error_measures_a_known_perturbation() -> None:
    gt = _cameras()
    est = dict(gt)
    est["im2.png"] = (
        Rotation.from_rotvec(np.radians(2.0) * np.array([0.6, 0.0, 0.8])).as_matrix() @ gt["im2.png"]
    )
    est["extra.png"] = np.eye(3)  # not in gt: ignored
    errors = relative_rotation_errors(est, gt)
    assert len(errors) == 15
    np.testing.assert_allclose(np.sort(errors)[-5:], 2.0, atol=1e-9)
    assert np.sort(errors)[:10].max() < 1e-9
    assert np.median(relative_rotation_errors(gt, gt)) < 1e-12


def test_umeyama_recovers_a_known_similarity() -> None:
    rng = np.random.default_rng(0)
    src = rng.normal(size=(30, 3))
    r = Rotation.from_rotvec([0.4, 0.1, -0.7]).as_matrix()
    dst = 2.5 * src @ r.T + np.array([1.0, -2.0, 0.5])
    s, r_est, t_est = umeyama(src, dst)
    assert abs(s - 2.5) < 1e-12
    np.testing.assert_allclose(r_est, r, atol=1e-12)
    np.testing.assert_allclose(t_est, [1.0, -2.0, 0.5], atol=1e-12)
    errors, sim = centre_errors(src, dst)
    assert errors.max() < 1e-12
    np.testing.assert_allclose(sim(src[:3]), dst[:3], atol=1e-12)


def test_fscore_on_shifted_copies() -> None:
    rng = np.random.default_rng(0)
    gt = np.column_stack([rng.uniform(0, 1, (200_000, 2)), np.zeros(200_000)])  # unit square, z = 0
    tau = 0.01
    points = gt[:50_000] + np.array([0.0, 0.0, 0.5 * tau])
    p, r, f = precision_recall_fscore(points, gt, tau)
    assert p == 1.0 and r > 0.999 and f > 0.999
    p, r, f = precision_recall_fscore(gt + np.array([0.0, 0.0, 2 * tau]), gt, tau)
    assert (p, r, f) == (0.0, 0.0, 0.0)
    # Half the square reconstructed: precision stays 1, recall halves.
    half = gt[gt[:, 0] < 0.5]
    p, r, f = precision_recall_fscore(half, gt, tau)
    assert p == 1.0 and abs(r - 0.5) < 0.02 and abs(f - 2 / 3) < 0.02
    assert precision_recall_fscore(np.zeros((0, 3)), gt, tau) == (0.0, 0.0, 0.0)


def test_sample_mesh_is_uniform_by_area() -> None:
    # Two triangles: one with area 0.5, one with area 1.5, both in the plane z = 1.
    v = np.array([[0, 0, 1], [1, 0, 1], [0, 1, 1], [3, 0, 1], [3, 1, 1], [6, 0, 1]], dtype=float)
    f = np.array([[0, 1, 2], [3, 5, 4]])
    pts = sample_mesh(v, f, 40_000, seed=3)
    assert pts.shape == (40_000, 3)
    np.testing.assert_allclose(pts[:, 2], 1.0, atol=1e-12)
    share_small = np.mean(pts[:, 0] <= 1.0)
    assert abs(share_small - 0.25) < 0.01
    small = pts[pts[:, 0] <= 1.0]
    assert np.all(small[:, 0] + small[:, 1] <= 1.0 + 1e-12)
    np.testing.assert_allclose(small[:, :2].mean(axis=0), [1 / 3, 1 / 3], atol=0.01)
    np.testing.assert_array_equal(sample_mesh(v, f, 100, seed=3), sample_mesh(v, f, 100, seed=3))


def _transforms(R: np.ndarray, t: np.ndarray, K: np.ndarray, w: int, h: int) -> dict:
    """A transforms.json dict as export writes it: camera-to-world in OpenGL axes."""
    w2c = np.eye(4)
    w2c[:3, :3], w2c[:3, 3] = R, t
    c2w = np.linalg.inv(w2c) @ np.diag([1.0, -1.0, -1.0, 1.0])
    frame = {"file_path": "images/a.png", "transform_matrix": c2w.tolist()}
    return {"fl_x": K[0, 0], "fl_y": K[1, 1], "cx": K[0, 2], "cy": K[1, 2], "w": w, "h": h, "frames": [frame]}


def test_explained_share_counts_the_cells_points_land_in() -> None:
    R = Rotation.from_rotvec([0.1, -0.4, 0.2]).as_matrix()
    t = np.array([0.2, -0.1, 3.0])
    K = np.array([[100.0, 0, 32.0], [0, 100.0, 24.0], [0, 0, 1]])
    cam = transforms_cameras(_transforms(R, t, K, 64, 48))[0]
    assert np.allclose(cam.R, R) and np.allclose(cam.t, t)
    # One point in the centre of each cell of the left half (columns 0-3 of 8, all 6 rows),
    # lifted to random depths along its ray; and points behind the camera or outside, which count not.
    u, v = np.meshgrid(np.arange(4) * 8 + 4.0, np.arange(6) * 8 + 4.0)
    uv1 = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], 1)
    z = np.random.default_rng(0).uniform(1.0, 5.0, u.size)
    cam_pts = (uv1 @ np.linalg.inv(K).T) * z[:, None]
    cam_pts = np.concatenate([cam_pts, cam_pts * [1, 1, -1], [[50.0, 0.0, 1.0]]])
    world = (cam_pts - t) @ R
    uv, front = cam.project(world[: u.size])
    assert front.all() and np.allclose(uv, uv1[:, :2])
    assert explained_share(world, cam) == 0.5
    assert explained_share(world[:1], cam) == 1 / 48


def test_fscores_at_each_tau() -> None:
    gt = np.random.default_rng(0).uniform(size=(2000, 3))
    est = gt + np.array([0.03, 0.0, 0.0])
    scores = fscores_at(est, gt, {"big": 0.05, "small": 0.01})
    assert scores["f@big"] == 1.0 and scores["f@small"] < 0.2
