"""The GPU dense backend's own logic, on the CPU: COLMAP's depth/normal maps -> our depth maps.

PatchMatch itself needs CUDA (not on the build machines); the tests write maps in COLMAP's array
format for three cameras facing a plane and check that the converted views fuse onto that plane.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pycolmap
import pytest
from PIL import Image

from scandrop.pipeline.core.pointcloud import load_points
from scandrop.pipeline.core.stage import never_stop, no_progress
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.dense import fuse_depth, patchmatch_depth
from scandrop.pipeline.job_spec import JobSpec
from scandrop.pipeline.presets import resolve

W, H, F, PLANE_Z = 64, 48, 50.0, 5.0


def _write_array(path: Path, array: np.ndarray) -> None:
    """COLMAP's layout: "w&h&c&" then float32, column fastest, then rows, then channels."""
    a = array if array.ndim == 3 else array[..., None]
    h, w, c = a.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        f"{w}&{h}&{c}&".encode() + np.ascontiguousarray(a.transpose(2, 0, 1), np.float32).tobytes()
    )


def _three_views(folder: Path) -> None:
    """Three cameras side by side facing the plane z = PLANE_Z, sharing 40 sparse points on it
    (fusion checks each view against the views it shares sparse points with)."""
    rec = pycolmap.Reconstruction()
    rec.add_camera_with_trivial_rig(
        pycolmap.Camera(model="PINHOLE", width=W, height=H, params=[F, F, W / 2, H / 2], camera_id=1)
    )
    rng = np.random.default_rng(1)
    points = np.column_stack([rng.uniform(0.4, 0.6, 40), rng.uniform(-0.5, 0.5, 40), np.full(40, PLANE_Z)])
    offsets = {1: 0.0, 2: 0.5, 3: 1.0}
    for image_id, x in offsets.items():
        image = pycolmap.Image(name=f"v{image_id}.png", camera_id=1, image_id=image_id)
        uv = (points[:, :2] - [x, 0.0]) / PLANE_Z * F + [W / 2, H / 2]
        image.points2D = pycolmap.Point2DList([pycolmap.Point2D(xy) for xy in uv])
        pose = pycolmap.Rigid3d(pycolmap.Rotation3d(np.eye(3)), np.array([-x, 0.0, 0.0]))
        rec.add_image_with_trivial_frame(image, pose)
    for k, xyz in enumerate(points):
        track = pycolmap.Track()
        for image_id in offsets:
            track.add_element(image_id, k)
        rec.add_point3D(xyz, track, np.array([128, 128, 128], np.uint8))
    folder.mkdir(parents=True, exist_ok=True)
    rec.write_binary(str(folder))


def test_colmap_arrays_read_back_exactly(tmp_path: Path) -> None:
    values = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # H=2, W=3, C=4
    _write_array(tmp_path / "a.bin", values)
    assert np.array_equal(patchmatch_depth.read_colmap_array(tmp_path / "a.bin"), values)
    _write_array(tmp_path / "b.bin", values[..., 0])
    assert np.array_equal(patchmatch_depth.read_colmap_array(tmp_path / "b.bin"), values[..., 0])
    (tmp_path / "c.bin").write_bytes(b"3&2&1&" + b"\0" * 8)
    with pytest.raises(ValueError):
        patchmatch_depth.read_colmap_array(tmp_path / "c.bin")


def test_converted_patchmatch_maps_fuse_onto_the_true_plane(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws").create()
    mvs = ws.root / "mvs"
    _three_views(ws.sparse_dir)
    _three_views(mvs / "sparse")
    rng = np.random.default_rng(0)
    for name in ("v1.png", "v2.png", "v3.png"):
        (mvs / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(mvs / "images" / name)
        _write_array(mvs / "stereo" / "depth_maps" / f"{name}.geometric.bin", np.full((H, W), PLANE_Z))
        normals = np.zeros((H, W, 3), np.float32)
        normals[..., 2] = -1.0  # camera frame, facing the camera
        _write_array(mvs / "stereo" / "normal_maps" / f"{name}.geometric.bin", normals)
    result = patchmatch_depth.convert_workspace(mvs, ws, time.monotonic())
    assert result.views == result.views_with_depth == 3 and result.mean_valid_fraction == 1.0
    with np.load(ws.depth_dir / "v2.png.npz") as data:
        assert data["depth"].shape == (H, W) and np.all(data["depth"] == PLANE_Z)
        assert np.allclose(data["K"], [[F, 0, W / 2 - 0.5], [0, F, H / 2 - 0.5], [0, 0, 1]])
        assert np.allclose(data["t"], [-0.5, 0, 0]) and data["rgb"].shape == (H, W, 3)
    fuse_depth.run(resolve(JobSpec(preset="fast")).fuse, ws, no_progress, never_stop)
    points = load_points(ws.fused).xyz
    assert len(points) > 500
    assert np.abs(points[:, 2] - PLANE_Z).max() < 1e-3
