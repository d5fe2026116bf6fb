"""The relief benchmark object: rays land on its surface, seeds and shapes give other objects,
held-out views are other cameras than the training ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scandrop.pipeline.bench import appearance, relief, synthetic


@pytest.fixture(scope="module")
def scene() -> relief.ReliefScene:
    return relief.render_relief_scene(n_views=4, width=96, height=72, seed=0, n_held_out=2)


def test_rays_hit_the_relief_surface_exactly() -> None:
    solid = relief.relief_solid(seed=0, shape="pebble")
    rs, ts = synthetic.orbit_cameras(8)
    centre = -rs[0].T @ ts[0]
    target = np.asarray(solid.centre) + np.random.default_rng(0).normal(scale=0.2, size=(500, 3))
    dirs = target - centre
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    t = solid.intersect(centre, dirs)
    hit = np.isfinite(t)
    assert hit.mean() > 0.5
    points = centre + t[hit, None] * dirs[hit]
    assert np.abs(solid.sdf(points)).max() < 1e-6
    # The first crossing: half-way there every ray is still outside.
    assert (solid.sdf(centre + 0.5 * t[hit, None] * dirs[hit]) > 0).all()
    # The relief is real: radii vary by more than 0.2% of the scene's ~1.9 size around the base.
    samples = solid.sample(20_000, np.random.default_rng(1))
    assert np.abs(solid.sdf(samples)).max() < 1e-9
    radius = np.linalg.norm(samples - np.asarray(solid.centre), axis=1)
    base = solid.radius * (1 + ((samples - solid.centre) / radius[:, None]) ** 2 @ np.asarray(solid.stretch))
    assert np.ptp(radius - base) > 0.01


@pytest.mark.parametrize("shape", relief.SHAPES)
def test_rays_that_graze_the_surface_hit_it(shape: str) -> None:
    """A ray aimed at a surface point seen edge-on (a silhouette, a ridge's contour) reaches the
    surface by that point. Before, half of them ran out of marching steps and counted as misses,
    which drew the plate behind the object as bright lines along its contours."""
    solid = relief.relief_solid(seed=0, shape=shape)
    rs, ts = synthetic.orbit_cameras(8)
    centre = -rs[0].T @ ts[0]
    points = solid.sample(100_000, np.random.default_rng(2))
    dirs = points - centre
    dist = np.linalg.norm(dirs, axis=1)
    dirs /= dist[:, None]
    edge_on = np.abs(np.einsum("ij,ij->i", solid.normal_at(points), dirs)) < 0.01
    assert edge_on.sum() > 500
    t = solid.intersect(centre, dirs[edge_on])
    hit = np.isfinite(t)
    assert hit.mean() > 0.99  # 0.47 before
    assert (t[hit] <= dist[edge_on][hit] + 1e-4).all()
    # |sdf| times the Lipschitz bound (~3.9) is the radial gap, which bounds the distance from
    # above: under 0.2 px at 1600 px (about 0.0024 per pixel).
    assert np.abs(solid.sdf(centre + t[hit, None] * dirs[edge_on][hit])).max() < 1.2e-4


def test_seed_and_shape_give_other_objects() -> None:
    a, b = relief.relief_solid(0), relief.relief_solid(1)
    assert a.radius != b.radius and not np.array_equal(a.waves, b.waves)
    assert relief.relief_solid(0, "pebble").stretch != (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        relief.relief_solid(0, "cube")


def test_held_out_views_are_written_and_unseen(scene: relief.ReliefScene, tmp_path: Path) -> None:
    train_centres = scene.train.centres()
    for c in scene.held_out.centres():
        assert np.linalg.norm(train_centres - c, axis=1).min() > 0.2
    relief.write_held_out(scene.held_out, tmp_path)
    views = relief.load_held_out(tmp_path)
    assert [v[0] for v in views] == scene.held_out.names
    _, image, _, R, _ = views[0]
    rgba = scene.held_out.images[0]
    assert np.array_equal(image, rgba[..., :3]) and np.allclose(R, scene.held_out.R[0])
    # Alpha = coverage, so held-out PSNR is scored over the object: both object and background.
    assert rgba.shape[-1] == 4 and (rgba[..., 3] == 255).any() and (rgba[..., 3] == 0).any()
    # The object is in the middle of the held-out photo.
    assert (image[30:42, 40:56] != round(0.5 * 255)).any(axis=-1).mean() > 0.9


def test_photo_ceiling_is_exact_where_a_photo_was_taken(scene: relief.ReliefScene) -> None:
    train = scene.train
    tex, contrast = relief.hashed_texture(0), np.full(len(train.primitives), 0.22)
    # The first training camera, rendered again with coverage: its pixels' true surface points
    # project back onto that photo's pixel centres, so the lookup is the photo itself.
    same = synthetic.render_views(
        train.primitives, tex, contrast, train.R[:1], train.t[:1], train.width, train.height,
        alpha=True, supersample=1,
    )  # fmt: skip
    exact = appearance.photo_ceiling(train, same)
    assert exact["one_photo"] > 60.0  # "largest" may pick another photo there: no exact value
    # At views between the photos the texture (finer than these 96 px photos resolve) is only
    # partly recovered: a finite ceiling, far below the exact one.
    between = appearance.photo_ceiling(train, scene.held_out)
    assert all(5.0 < between[name] < 40.0 for name in ("one_photo", "largest", "blend"))
