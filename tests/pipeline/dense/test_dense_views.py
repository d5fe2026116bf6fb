"""The undistortion map of a depth grid: interpolated from a lattice, it must match the exact map."""

from __future__ import annotations

import numpy as np
import pycolmap
import pytest

from scandrop.pipeline.dense.dense_views import DenseView, pinhole_grid


@pytest.mark.parametrize(
    ("model", "params", "size"),
    [
        ("SIMPLE_RADIAL", (1400.0, 800.0, 600.0, 0.08), (1600, 1200)),
        ("OPENCV", (1200.0, 1210.0, 805.0, 596.0, -0.3, 0.1, 0.001, -0.002), (1600, 1200)),
        ("OPENCV_FISHEYE", (600.0, 600.0, 640.0, 480.0, 0.05, -0.02, 0.01, 0.0), (1280, 960)),
    ],
)
@pytest.mark.parametrize("max_size", [1 << 30, 1000])
def test_grid_map_matches_the_exact_map_of_strong_lenses(
    model: str, params: tuple[float, ...], size: tuple[int, int], max_size: int
) -> None:
    camera = pycolmap.Camera.create_from_model_name(1, model, 1.0, *size)
    camera.params = list(params)
    K, grid, scale = pinhole_grid(camera, max_size)
    view = DenseView(
        name="photo.png",
        camera_model=model,
        camera_params=params,
        image_size=size,
        R=np.eye(3),
        t=np.zeros(3),
        K=K,
        grid_size=grid,
        scale=scale,
        point_ids=np.zeros(0, np.int64),
        points=np.zeros((0, 3)),
    )
    exact_x, exact_y = view.photo_map(view.grid_rays())
    fast_x, fast_y = view.grid_map()
    assert fast_x.shape == exact_x.shape == (grid[1], grid[0])
    assert fast_x.dtype == np.float32
    error = np.hypot(fast_x - exact_x, fast_y - exact_y)
    assert error.max() < 0.02, error.max()
