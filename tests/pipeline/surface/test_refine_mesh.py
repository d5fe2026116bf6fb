"""Photometric mesh refinement against ground truth: a sphere mesh placed about a pixel off the
true, textured sphere of the photos moves onto it, and one already on it stays there."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from scandrop.pipeline.bench import synthetic
from scandrop.pipeline.bench.known_poses import workspace_from_scene
from scandrop.pipeline.core.stage import never_stop
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.surface import refine_mesh

WIDTH, HEIGHT = 320, 240
SPHERE = synthetic.Sphere(centre=(0.0, 0.4, 0.0), radius=0.4, tint=(0.7, 0.5, 0.4))


@pytest.fixture(scope="module")
def textured(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, float]:
    """The photos and exact cameras of a sphere, and the world size of one photo pixel at its front."""
    primitives = (SPHERE,)
    tex = synthetic.make_texture(primitives, seed=5, spacing=0.012)  # texels of ~1.5 px
    rs, ts = synthetic.orbit_cameras(12)
    scene = synthetic.render_views(primitives, tex, np.full(1, 0.22), rs, ts, WIDTH, HEIGHT)
    ws = Workspace(tmp_path_factory.mktemp("textured") / "ws")
    workspace_from_scene(scene, ws, points=1500)
    front = float(np.linalg.norm(scene.centres()[0] - np.asarray(SPHERE.centre))) - SPHERE.radius
    return ws, front / float(scene.K[0, 0])


def _off_sphere(pixel: float) -> tuple[np.ndarray, np.ndarray]:
    """A fine sphere mesh whose radius is wrong by up to 1.5 `pixel`s, varying smoothly over it."""
    mesh = trimesh.creation.icosphere(subdivisions=5)
    unit = np.asarray(mesh.vertices)
    error = pixel * (0.5 + 0.5 * unit[:, 0] + 0.5 * unit[:, 1] ** 2)
    return np.asarray(SPHERE.centre) + unit * (SPHERE.radius + error[:, None]), np.asarray(mesh.faces)


def _radial_error(vertices: np.ndarray) -> np.ndarray:
    return np.abs(np.linalg.norm(vertices - np.asarray(SPHERE.centre), axis=1) - SPHERE.radius)


def _refined(ws: Workspace, vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, float]:
    moved, stats = refine_mesh.refine(
        vertices, faces, ws.sparse_dir, ws.images_dir, lambda f, m: None, never_stop
    )
    return moved, stats.measured


def test_a_mesh_a_pixel_off_moves_onto_the_true_surface(textured: tuple[Workspace, float]) -> None:
    ws, pixel = textured
    vertices, faces = _off_sphere(pixel)
    moved, measured = _refined(ws, vertices, faces)
    assert measured > 0.5  # the cameras look down from 20 and 40 degrees: the underside is unseen
    # Against the true sphere, in photo pixels at the sphere's front, where every ring sees it.
    upper = vertices[:, 1] > SPHERE.centre[1]
    before, after = _radial_error(vertices[upper]) / pixel, _radial_error(moved[upper]) / pixel
    assert np.median(before) > 0.6 and np.percentile(before, 90) > 1.0
    assert np.median(after) < 0.1 and np.percentile(after, 90) < 0.25


def test_a_mesh_on_the_surface_stays_there(textured: tuple[Workspace, float]) -> None:
    ws, pixel = textured
    vertices, faces = _off_sphere(0.0)
    moved, measured = _refined(ws, vertices, faces)
    assert measured > 0.5
    upper = vertices[:, 1] > SPHERE.centre[1]
    after = _radial_error(moved[upper]) / pixel
    assert np.median(after) < 0.1 and np.percentile(after, 90) < 0.25
