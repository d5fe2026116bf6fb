"""Source views for PatchMatch: moderate angles first; a view far from every other still gets some."""

from __future__ import annotations

import numpy as np

from scandrop.pipeline.dense.dense_views import DenseView
from scandrop.pipeline.dense.view_selection import mvs_sources


def _ring_view(name: str, azimuth_deg: float, points: np.ndarray) -> DenseView:
    """A camera 4 units from the origin at this azimuth, looking at it, seeing every point."""
    a = np.radians(azimuth_deg)
    centre = 4.0 * np.array([np.sin(a), 0.0, np.cos(a)])
    z = -centre / np.linalg.norm(centre)
    x = np.cross([0.0, 1.0, 0.0], z)
    x /= np.linalg.norm(x)
    R = np.stack([x, np.cross(z, x), z])
    K = np.array([[500.0, 0, 320], [0, 500.0, 240], [0, 0, 1]])
    return DenseView(
        name=name,
        camera_model="PINHOLE",
        camera_params=(500.0, 500.0, 320.0, 240.0),
        image_size=(640, 480),
        R=R,
        t=-R @ centre,
        K=K,
        grid_size=(640, 480),
        scale=1.0,
        point_ids=np.arange(len(points)),
        points=points,
    )


def test_a_view_far_from_all_others_takes_wide_baseline_sources() -> None:
    points = np.random.default_rng(0).uniform(-0.5, 0.5, (200, 3))
    # Three views 20 degrees apart, and one 55 degrees from the nearest of them.
    views = [_ring_view(n, a, points) for n, a in [("a", 0), ("b", 20), ("c", 40), ("far", 95)]]

    sources, wide = mvs_sources(views, 5, 3.0, 40.0, lone_max_angle_deg=60.0)

    assert sources[:3] == [[1, 2], [0, 2], [1, 0]]  # within 40 degrees; "far" is no source of theirs
    assert sources[3] == [2] and wide == {3}  # only "c" lies within 60 degrees of "far"

    without, none_wide = mvs_sources(views, 5, 3.0, 40.0)
    assert without[:3] == sources[:3] and without[3] == [] and none_wide == set()
