"""render_preview: a software render that shows the object, centred and upright."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pycolmap
import pytest
import trimesh
from PIL import Image

from scandrop.pipeline.core import plyio
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.pointcloud import PointCloud, load_points, save_points
from scandrop.pipeline.core.stage import never_stop, no_progress
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.export import render_preview

BACKGROUND = np.array([236, 236, 236])


def write_front_cameras(sparse_dir: Path) -> None:
    """Three cameras in front of the object (+z side), looking towards -z with image up = +y."""
    rec = pycolmap.Reconstruction()
    rec.add_camera_with_trivial_rig(
        pycolmap.Camera(model="SIMPLE_RADIAL", width=640, height=480, params=[500, 320, 240, 0], camera_id=1)
    )
    rot = np.diag([1.0, -1.0, -1.0])  # camera x = world x, y = -world y, z (forward) = -world z
    for i, x in enumerate((-0.5, 0.0, 0.5)):
        centre = np.array([x, 0.0, 5.0])
        pose = pycolmap.Rigid3d(pycolmap.Rotation3d(rot), -rot @ centre)
        rec.add_image_with_trivial_frame(pycolmap.Image(name=f"{i}.jpg", camera_id=1, image_id=i + 1), pose)
    sparse_dir.mkdir(parents=True)
    rec.write_binary(str(sparse_dir))


def snowman(ws: Workspace) -> None:
    """A tall object: red lower sphere at y=0, green upper sphere at y=1.5 (so 'up' is testable)."""
    low = trimesh.creation.icosphere(subdivisions=6, radius=1.0)
    high = trimesh.creation.icosphere(subdivisions=5, radius=0.6)
    high.apply_translation([0.0, 1.5, 0.0])
    v = np.concatenate([low.vertices, high.vertices]).astype(np.float32)
    f = np.concatenate([low.faces, high.faces + len(low.vertices)])
    rgb = np.zeros((len(v), 3), np.uint8)
    rgb[: len(low.vertices)] = [220, 40, 40]
    rgb[len(low.vertices) :] = [40, 200, 40]
    cols = {"x": v[:, 0], "y": v[:, 1], "z": v[:, 2], "red": rgb[:, 0], "green": rgb[:, 1], "blue": rgb[:, 2]}
    plyio.write_ply(ws.mesh, plyio.vertex_array(cols), f)
    save_points(ws.fused, PointCloud(v, v / np.linalg.norm(v, axis=1, keepdims=True), rgb))


def _object_mask(image: np.ndarray) -> np.ndarray:
    return np.abs(image.astype(int) - BACKGROUND).sum(axis=2) > 30


def _snowman_pixels(ws: Workspace, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """Render the preview; rows and columns of its red or green (snowman) pixels."""
    render_preview.run(render_preview.PreviewConfig(), ws, out, no_progress, never_stop)
    image = cv2.cvtColor(cv2.imread(str(out / "preview.png")), cv2.COLOR_BGR2RGB)
    red_or_green = ((image[..., 0] > 2 * image[..., 1]) | (image[..., 1] > 2 * image[..., 0])) & _object_mask(
        image
    )
    return np.nonzero(red_or_green)


@pytest.mark.parametrize("source", ["mesh", "points"])
def test_preview_shows_the_object_centred_and_upright(tmp_path: Path, source: str) -> None:
    ws = Workspace(tmp_path / "job").create()
    snowman(ws)
    write_front_cameras(ws.sparse_dir)
    if source == "points":
        ws.mesh.unlink()
    start = time.perf_counter()
    result = render_preview.run(render_preview.PreviewConfig(), ws, tmp_path, no_progress, never_stop)
    assert result.rendered == source
    if source == "mesh":
        assert result.primitives == 20 * 4**6 + 20 * 4**5
        assert time.perf_counter() - start < 5.0  # < 2 s on an idle core; shared CI cores are noisy
    np.testing.assert_allclose(result.view_direction, [0, 0, -1], atol=1e-6)
    assert result.view_source.startswith("mean of 3")

    image = cv2.cvtColor(cv2.imread(str(tmp_path / "preview.png")), cv2.COLOR_BGR2RGB)
    assert image.shape == (720, 960, 3)
    mask = _object_mask(image)
    assert 0.1 < mask.mean() < 0.6
    ys, xs = np.nonzero(mask)
    assert abs(xs.mean() - 480) < 25 and abs((ys.min() + ys.max()) / 2 - 360) < 25
    red = (image[..., 0] > 2 * image[..., 1]) & mask
    green = (image[..., 1] > 2 * image[..., 0]) & mask
    assert red.sum() > 1000 and green.sum() > 500
    # +y is up on screen: the green (upper) sphere is above the red one.
    assert np.nonzero(green)[0].mean() < np.nonzero(red)[0].mean() - 100
    if source == "mesh":
        # Shaded, not flat: the lit sphere shows a range of reds, and no holes inside its outline.
        assert np.ptp(image[red, 0]) > 60
        cy, cx = int(np.nonzero(red)[0].mean()), int(np.nonzero(red)[1].mean())
        assert mask[cy - 50 : cy + 50, cx - 50 : cx + 50].all()


def test_preview_draws_the_texture_of_model_glb(tmp_path: Path) -> None:
    """What the user gets: a textured model.glb is drawn with its atlas, not with the mesh's
    vertex colours (here one grey), so the photos' detail shows in the preview."""
    ws = Workspace(tmp_path / "job").create()
    snowman(ws)
    write_front_cameras(ws.sparse_dir)
    sphere = trimesh.creation.uv_sphere(radius=1.0, count=[64, 64])
    uv = sphere.vertices[:, :2] * 0.5 + 0.5  # the front of the sphere seen flat: its x, y
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::8] = stripes[:, 1::8] = stripes[:, 2::8] = stripes[:, 3::8] = 255  # 8 white stripes
    sphere.visual = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(stripes))
    sphere.export(tmp_path / "model.glb")

    result = render_preview.run(render_preview.PreviewConfig(), ws, tmp_path, no_progress, never_stop)
    assert result.rendered == "textured mesh" and result.primitives == len(sphere.faces)
    image = cv2.cvtColor(cv2.imread(str(tmp_path / "preview.png")), cv2.COLOR_BGR2RGB)
    mask = _object_mask(image)
    row = int(np.nonzero(mask)[0].mean())
    bright = image[row, mask[row], 0] > 128
    assert 14 <= np.count_nonzero(np.diff(bright.astype(int))) <= 17  # 8 white stripes on black


def test_nothing_to_render_is_an_error(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "job").create()
    with pytest.raises(ScandropError) as err:
        render_preview.run(render_preview.PreviewConfig(), ws, tmp_path, no_progress, never_stop)
    assert err.value.code is ErrorCode.export_failed


def test_preview_frames_the_subject_not_its_stray_points(tmp_path: Path) -> None:
    """Far-off points (0.5% of the cloud) and a stray Poisson blob must not shrink the subject
    into a corner: its 1-99% box fills the frame, centred."""
    ws = Workspace(tmp_path / "job").create()
    snowman(ws)
    write_front_cameras(ws.sparse_dir)
    ply = plyio.read_ply(ws.mesh)
    blob = trimesh.creation.icosphere(subdivisions=1, radius=0.3)
    blob.apply_translation([9.0, 4.0, 0.0])
    v = np.concatenate([plyio.xyz_of(ply.vertex), blob.vertices]).astype(np.float32)
    f = np.concatenate([ply.faces, blob.faces + len(ply.vertex)])
    rgb = np.concatenate([plyio.rgb_of(ply.vertex), np.full((len(blob.vertices), 3), 30, np.uint8)])
    cols = {"x": v[:, 0], "y": v[:, 1], "z": v[:, 2], "red": rgb[:, 0], "green": rgb[:, 1], "blue": rgb[:, 2]}
    plyio.write_ply(ws.mesh, plyio.vertex_array(cols), f)
    cloud_v = np.concatenate([v, np.random.default_rng(0).uniform(-12, 12, (len(v) // 200, 3))]).astype(
        np.float32
    )
    normals = np.tile(np.float32([0, 0, 1]), (len(cloud_v), 1))
    save_points(ws.fused, PointCloud(cloud_v, normals, np.full((len(cloud_v), 3), 128, np.uint8)))

    ys, xs = _snowman_pixels(ws, tmp_path)
    # The snowman spans y -1..2.1 and x -1..1: tall, so its height should fill most of the frame.
    assert (ys.max() - ys.min()) > 0.75 * 720
    assert abs((xs.min() + xs.max()) / 2 - 480) < 25 and abs((ys.min() + ys.max()) / 2 - 360) < 40


def _orbit_cameras(sparse_dir: Path, n: int = 8, radius: float = 5.0) -> None:
    """n cameras on a circle around the origin, each looking at it (an object on a turntable)."""
    rec = pycolmap.Reconstruction()
    rec.add_camera_with_trivial_rig(
        pycolmap.Camera(model="SIMPLE_RADIAL", width=640, height=480, params=[500, 320, 240, 0], camera_id=1)
    )
    for i in range(n):
        a = 2 * np.pi * i / n
        centre = np.array([radius * np.sin(a), 0.5, radius * np.cos(a)])
        forward = -centre / np.linalg.norm(centre)
        right = np.cross(forward, [0.0, 1.0, 0.0])
        right /= np.linalg.norm(right)
        rot = np.stack([right, np.cross(forward, right), forward])
        pose = pycolmap.Rigid3d(pycolmap.Rotation3d(rot), -rot @ centre)
        rec.add_image_with_trivial_frame(pycolmap.Image(name=f"{i}.jpg", camera_id=1, image_id=i + 1), pose)
    sparse_dir.mkdir(parents=True)
    rec.write_binary(str(sparse_dir))


def test_preview_frames_what_the_cameras_circle_not_the_room_around_it(tmp_path: Path) -> None:
    """An object photographed from all around, inside a room whose walls hold half of the dense
    points: the walls are in the cloud's percentile box, but the preview frames the object."""
    ws = Workspace(tmp_path / "job").create()
    snowman(ws)
    _orbit_cameras(ws.sparse_dir)
    assert render_preview.subject_region(render_preview.load_cameras(ws.sparse_dir)) is not None
    object_cloud = load_points(ws.fused)
    rng = np.random.default_rng(1)
    walls = rng.uniform(-10, 10, (len(object_cloud.xyz), 3))
    side = rng.integers(0, 4, len(walls))
    walls[:, 0] = np.where(side == 0, 10.0, np.where(side == 1, -10.0, walls[:, 0]))
    walls[:, 2] = np.where(side == 2, 10.0, np.where(side == 3, -10.0, walls[:, 2]))
    xyz = np.concatenate([object_cloud.xyz, walls]).astype(np.float32)
    rgb = np.concatenate([object_cloud.rgb, np.full((len(walls), 3), 128, np.uint8)])
    save_points(ws.fused, PointCloud(xyz, np.tile(np.float32([0, 0, 1]), (len(xyz), 1)), rgb))

    ys, xs = _snowman_pixels(ws, tmp_path)
    # The snowman spans y -1..2.1 (3.1 units); with the room's 20 units framed it would be ~100 px tall.
    assert (ys.max() - ys.min()) > 0.6 * 720
    assert abs((xs.min() + xs.max()) / 2 - 480) < 60


def test_parallel_cameras_have_no_subject_region(tmp_path: Path) -> None:
    """A facade or a forward-facing sweep: the axes never meet, so the whole cloud is the subject."""
    write_front_cameras(tmp_path / "sparse")
    assert render_preview.subject_region(render_preview.load_cameras(tmp_path / "sparse")) is None
