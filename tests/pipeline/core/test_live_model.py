"""The live model snapshot: bounded, exact where it is not subsampled, stable as the model grows."""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from scandrop.pipeline.core.live_model import MAX_CAMERAS, MAX_POINTS, build, subsample


def test_a_snapshot_keeps_cameras_and_points_exactly_and_caps_them() -> None:
    rng = np.random.default_rng(0)
    rotations = Rotation.random(7, random_state=1).as_matrix()
    centres, fov = rng.normal(size=(7, 3)), rng.uniform(0.3, 0.8, size=(7, 2))
    xyz, rgb = rng.normal(size=(300, 3)), rng.integers(0, 256, size=(300, 3))
    cams, points, colours = build("sparse", centres, rotations, fov, xyz, rgb).arrays()
    np.testing.assert_allclose(cams[:, :3], centres, atol=1e-6)
    np.testing.assert_allclose(Rotation.from_quat(cams[:, 3:7]).as_matrix(), rotations, atol=1e-6)
    np.testing.assert_allclose(cams[:, 7:], fov, atol=1e-6)
    np.testing.assert_allclose(points, xyz, atol=1e-6)
    assert (colours == rgb).all()

    many = rng.normal(size=(4 * MAX_POINTS, 3))
    big = build(
        "dense", np.zeros((900, 3)), np.tile(np.eye(3), (900, 1, 1)), np.ones((900, 2)), many, many * 0
    )
    cams, points, _ = big.arrays()
    assert (big.cameras, big.points_total) == (900, 4 * MAX_POINTS)
    assert len(cams) == MAX_CAMERAS and len(points) == MAX_POINTS
    # A subsample of the real points, not new ones; about 20 bytes a point on the wire.
    assert np.isin(points.view("V12"), many.astype("<f4").view("V12")).all()
    assert len(big.model_dump_json()) < 20.5 * MAX_POINTS + 48 * MAX_CAMERAS + 200


def test_the_subsample_of_a_growing_model_keeps_its_points() -> None:
    ids = np.random.default_rng(2).permutation(100_000)[:20_000]
    before = set(ids[subsample(ids, 1000)])
    grown = np.concatenate([ids, np.arange(100_000, 120_000)])
    after = set(grown[subsample(grown, 1000)])
    assert len(before) == len(after) == 1000
    assert len(before & after) > 0.4 * 1000  # half the model is new: about half the points stay
    assert after <= before | set(range(100_000, 120_000))  # none comes back that had left
