"""Synthetic scenes: deterministic renders whose cameras and surface are exactly right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scandrop.pipeline.bench.synthetic import cast_rays, load_gt_cameras, render_scene, write_scene

SPHERE_TOP = np.array([-0.38, 0.8, 0.12])  # top of the sphere (centre (-0.38, 0.4, 0.12), r 0.4)


@pytest.fixture(scope="module")
def scene():
    return render_scene(n_views=6, width=160, height=120, seed=1)


def test_render_is_deterministic_and_seed_changes_texture(scene) -> None:
    again = render_scene(n_views=6, width=160, height=120, seed=1)
    other = render_scene(n_views=6, width=160, height=120, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(scene.images, again.images, strict=True))
    assert not np.array_equal(scene.images[0], other.images[0])
    assert scene.images[0].shape == (120, 160, 3) and scene.images[0].dtype == np.uint8


def test_known_point_projects_where_expected(scene) -> None:
    k_inv = np.linalg.inv(scene.K)
    for r, t, c, image in zip(scene.R, scene.t, scene.centres(), scene.images, strict=True):
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
        uvw = scene.K @ (r @ SPHERE_TOP + t)
        uv = uvw[:2] / uvw[2]
        # The ray through that pixel position hits exactly the sphere's top.
        d = r.T @ (k_inv @ np.array([uv[0], uv[1], 1.0]))
        d /= np.linalg.norm(d)
        dist, which = cast_rays(scene.primitives, c, d[None])
        assert which[0] == 1
        np.testing.assert_allclose(c + dist[0] * d, SPHERE_TOP, atol=1e-9)
        assert not np.all(image[int(uv[1]), int(uv[0])] == 128)  # object there, not background
        # Cameras look at the scene centre: it projects to the image centre (COLMAP convention).
        target = scene.K @ (r @ np.array([0.0, 0.35, 0.0]) + t)
        np.testing.assert_allclose(target[:2] / target[2], [80.0, 60.0], atol=1e-9)


def test_surface_samples_lie_on_the_surface_and_are_seen(scene) -> None:
    points = scene.surface_samples(20000, min_views=2)
    assert len(points) > 5000
    sdf = np.stack([p.sdf(points) for p in scene.primitives], axis=1)
    assert np.abs(sdf).min(axis=1).max() < 1e-9
    assert (sdf > -1e-9).all()  # never inside a solid
    seen = sum(scene.visible_in(points, i).astype(int) for i in range(len(scene.R)))
    assert seen.min() >= 2
    assert points[:, 1].min() > -0.1 + 1e-6  # the plate's bottom is never seen
    assert len(scene.surface_samples(20000, min_views=1)) > len(points) > len(scene.surface_samples(20000, 3))
    assert 2.5 < scene.size < 3.5


def test_alpha_matches_object_coverage(scene, tmp_path: Path) -> None:
    rgba = render_scene(n_views=6, width=160, height=120, seed=1, alpha=True)
    points = scene.surface_samples(5000, min_views=1)
    for view, (plain, image) in enumerate(zip(scene.images, rgba.images, strict=True)):
        assert image.shape == (120, 160, 4)
        assert np.array_equal(image[..., :3], plain)
        alpha = image[..., 3]
        assert (image[alpha == 0][:, :3] == 128).all()
        assert 0.3 < (alpha > 0).mean() < 0.9  # the object fills a good part of the frame
        seen = points[scene.visible_in(points, view)]
        uvw = (scene.K @ (scene.R[view] @ seen.T + scene.t[view][:, None])).T
        uv = (uvw[:, :2] / uvw[:, 2:]).astype(int)
        # Every seen surface point lands on covered pixels; silhouette points whose pixel no
        # sub-sample hit (grazing angles) are covered one pixel over.
        covered = alpha[uv[:, 1], uv[:, 0]] > 0
        assert covered.mean() > 0.98
        grown = np.pad(alpha > 0, 1)
        grown = np.max(
            [grown[1 + dy : 121 + dy, 1 + dx : 161 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], 0
        )
        assert grown[uv[:, 1], uv[:, 0]].all()
    write_scene(rgba, tmp_path)
    assert Image.open(tmp_path / "view_000.png").mode == "RGBA"
    cams = load_gt_cameras(tmp_path / "gt_cameras.json")
    assert list(cams) == rgba.names
    np.testing.assert_allclose(cams["view_003.png"][0], rgba.R[3])
    np.testing.assert_allclose(cams["view_003.png"][1], rgba.t[3])


def test_weak_texture_leaves_the_sphere_nearly_uniform() -> None:
    rich = render_scene(n_views=2, width=160, height=120, texture="rich")
    weak = render_scene(n_views=2, width=160, height=120, texture="weak")
    # A patch inside the sphere's silhouette in view 0.
    scene = rich
    uvw = scene.K @ (scene.R[0] @ np.array([-0.38, 0.4, 0.52]) + scene.t[0])
    u, v = (uvw[:2] / uvw[2]).astype(int)
    patch = np.s_[v - 4 : v + 4, u - 4 : u + 4]

    def detail(image: np.ndarray) -> float:  # mean neighbour difference of grey: texture, not shading
        grey = image[patch].astype(float).mean(axis=2)
        return float(np.abs(np.diff(grey, axis=1)).mean())

    assert detail(weak.images[0]) < 0.25 * detail(rich.images[0])


@pytest.mark.slow
def test_load_strecha_cameras() -> None:
    path = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "strecha_herz_jesus_p8"
    if not path.exists():
        pytest.skip(f"dataset not found at {path}")
    cams = load_gt_cameras(path / "gt_cameras.json")
    assert len(cams) == 8
    r, t = cams["0000.jpg"]
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-4)
    assert t.shape == (3,)
