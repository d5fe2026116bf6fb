"""The world frame puts the scene upright whatever frame SfM happened to pick."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from scandrop.pipeline.sparse.world_frame import up_from_cameras


def _orbit(n: int, up: np.ndarray, elevation_deg: float, tilt_noise_deg: float, seed: int = 0):
    """World-to-camera rotations and centres of cameras circling the origin around `up`."""
    rng = np.random.default_rng(seed)
    basis = Rotation.align_vectors([up], [[0.0, 0.0, 1.0]])[0]  # maps z-up -> `up`
    rotations, centres = [], []
    for i in range(n):
        az = 2 * np.pi * i / n
        el = np.radians(elevation_deg)
        c = 3.0 * np.array([np.cos(az) * np.cos(el), np.sin(az) * np.cos(el), np.sin(el)])
        forward = -c / np.linalg.norm(c)
        right = np.cross(forward, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)
        r_wc = np.stack([right, down, forward])  # rows: camera axes in world (z-up world)
        jitter = Rotation.from_rotvec(np.radians(tilt_noise_deg) * rng.normal(size=3)).as_matrix()
        rotations.append(jitter @ r_wc @ basis.as_matrix().T)
        centres.append(basis.apply(c))
    return np.stack(rotations), np.stack(centres)


@pytest.mark.parametrize("up", [[0, 0, 1], [0, -1, 0], [0.3, 0.5, -0.8]])
def test_orbit_up_is_the_circle_normal(up: list[float]) -> None:
    true_up = np.asarray(up, float) / np.linalg.norm(up)
    rotations, centres = _orbit(24, true_up, elevation_deg=25, tilt_noise_deg=8)
    est, method = up_from_cameras(rotations, centres)
    assert method == "plane of camera centres"
    assert np.degrees(np.arccos(np.clip(est @ true_up, -1, 1))) < 1.0


def test_few_cameras_fall_back_to_camera_up() -> None:
    true_up = np.array([0.0, 0.0, 1.0])
    rotations, centres = _orbit(24, true_up, elevation_deg=20, tilt_noise_deg=3)
    est, method = up_from_cameras(rotations[:3], centres[:3])
    assert method == "mean camera up vector"
    assert np.degrees(np.arccos(np.clip(est @ true_up, -1, 1))) < 25.0  # orbit cameras look down
