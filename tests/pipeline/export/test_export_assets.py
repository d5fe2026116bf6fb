"""export_assets on a synthetic workspace: exact formats, cameras that invert back, a valid GLB."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import khronos_validator
import numpy as np
import pycolmap
import pytest
import trimesh
from PIL import Image

from scandrop.pipeline.core import plyio
from scandrop.pipeline.core.pointcloud import PointCloud, save_points
from scandrop.pipeline.core.stage import never_stop, no_progress
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.export import export_assets
from scandrop.pipeline.surface import make_splats

GS_FIELDS = [
    "x",
    "y",
    "z",
    "nx",
    "ny",
    "nz",
    "f_dc_0",
    "f_dc_1",
    "f_dc_2",
    "opacity",
    "scale_0",
    "scale_1",
    "scale_2",
    "rot_0",
    "rot_1",
    "rot_2",
    "rot_3",
]


def look_at(centre: np.ndarray, target: np.ndarray) -> pycolmap.Rigid3d:
    """COLMAP cam_from_world for a camera at `centre` looking at `target`, image up = world +y."""
    forward = (target - centre) / np.linalg.norm(target - centre)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    rot = np.stack([right, down, forward])
    return pycolmap.Rigid3d(pycolmap.Rotation3d(rot), -rot @ centre)


def write_cameras(sparse_dir: Path, per_camera: bool) -> dict[str, np.ndarray]:
    """Four cameras on a ring looking at the origin; returns name -> 3x4 cam_from_world."""
    rec = pycolmap.Reconstruction()
    models = [("SIMPLE_RADIAL", [500.0, 320.0, 240.0, 0.01]), ("PINHOLE", [510.0, 505.0, 321.0, 239.0])]
    poses = {}
    for i in range(4):
        cam_id = 1 + (i % 2 if per_camera else 0)
        if not rec.exists_camera(cam_id):
            model, params = models[cam_id - 1]
            cam = pycolmap.Camera(model=model, width=640, height=480, params=params, camera_id=cam_id)
            rec.add_camera_with_trivial_rig(cam)
        angle = i * np.pi / 2 + 0.3
        pose = look_at(np.array([4 * np.sin(angle), 1.5, 4 * np.cos(angle)]), np.zeros(3))
        name = f"img_{i}.jpg"
        rec.add_image_with_trivial_frame(pycolmap.Image(name=name, camera_id=cam_id, image_id=i + 1), pose)
        poses[name] = pose.matrix()
    sparse_dir.mkdir(parents=True, exist_ok=True)
    rec.write_binary(str(sparse_dir))
    return poses


def build_workspace(root: Path, per_camera: bool = False) -> tuple[Workspace, dict[str, np.ndarray]]:
    ws = Workspace(root).create()
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=1.0)
    v = np.asarray(sphere.vertices, dtype=np.float32)
    rgb = np.clip((v + 1) * 127.5, 0, 255).astype(np.uint8)
    cols = {"x": v[:, 0], "y": v[:, 1], "z": v[:, 2], "red": rgb[:, 0], "green": rgb[:, 1], "blue": rgb[:, 2]}
    plyio.write_ply(ws.mesh, plyio.vertex_array(cols), np.asarray(sphere.faces))
    rng = np.random.default_rng(0)
    p = rng.normal(size=(5000, 3))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    save_points(
        ws.fused,
        PointCloud(
            p.astype(np.float32), p.astype(np.float32), np.clip((p + 1) * 127.5, 0, 255).astype(np.uint8)
        ),
    )
    make_splats.run(make_splats.SplatConfig(), ws, no_progress, never_stop)
    poses = write_cameras(ws.sparse_dir, per_camera)
    ws.images_dir.mkdir()
    for name in poses:
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(ws.images_dir / name)
    return ws, poses


def test_exports_have_exact_formats(tmp_path: Path) -> None:
    ws, _ = build_workspace(tmp_path / "job")
    out = tmp_path / "out"
    result = export_assets.run(export_assets.ExportConfig(), ws, out, no_progress, never_stop)
    assert not result.skipped
    assert {
        "model.glb",
        "points.ply",
        "splats.splat",
        "splats.ply",
        "cameras/transforms.json",
        "cameras/sparse/images.bin",
    } <= set(result.files)
    # The photos the cameras describe travel with them, byte for byte.
    for name in ("img_0.jpg", "img_3.jpg"):
        assert (out / "cameras" / "images" / name).read_bytes() == (ws.images_dir / name).read_bytes()
    for name, size in result.files.items():
        assert (out / name).stat().st_size == size > 0
    assert result.points == 5000 and result.triangles == 20 * 4**4 and result.cameras == 4

    # points.ply round-trips with the PLY field layout.
    pts = plyio.read_ply(out / "points.ply").vertex
    assert pts.dtype.names == ("x", "y", "z", "nx", "ny", "nz", "red", "green", "blue")
    assert len(pts) == 5000

    # .splat: 32 bytes a splat, decoding back to the splat parameters, sorted by size*opacity.
    with np.load(ws.splats) as s:
        xyz, scales, quats, rgb, opacity = (s[k] for k in ("xyz", "scales", "quats", "rgb", "opacity"))
    raw = (out / "splats.splat").read_bytes()
    assert len(raw) == 32 * len(xyz) == 32 * result.splats
    rec = np.frombuffer(
        raw, dtype=[("xyz", "<f4", 3), ("scale", "<f4", 3), ("rgba", "u1", 4), ("rot", "u1", 4)]
    )
    key = np.prod(rec["scale"].astype(np.float64), axis=1) * rec["rgba"][:, 3]
    assert np.all(np.diff(key) <= 1e-6 * key[1:])
    order = np.lexsort(xyz.T)
    got = np.lexsort(rec["xyz"].T)
    np.testing.assert_array_equal(rec["xyz"][got], xyz[order])
    np.testing.assert_allclose(rec["scale"][got], scales[order])
    np.testing.assert_array_equal(rec["rgba"][got, :3], rgb[order])
    np.testing.assert_allclose(rec["rgba"][:, 3], float(opacity[0]) * 255, atol=0.51)
    np.testing.assert_allclose((rec["rot"][got].astype(float) - 128) / 128, quats[order], atol=1 / 128)
    assert struct.unpack("<3f", raw[:12]) == tuple(rec["xyz"][0])

    # splats.ply: exactly the 3DGS fields, with logit opacity, log scales and SH DC colour.
    header = (out / "splats.ply").read_bytes().split(b"end_header")[0].decode()
    props = [line.split()[2] for line in header.splitlines() if line.startswith("property")]
    assert props == GS_FIELDS
    assert all(line.split()[1] == "float" for line in header.splitlines() if line.startswith("property"))
    gs = plyio.read_ply(out / "splats.ply").vertex
    np.testing.assert_allclose(1 / (1 + np.exp(-gs["opacity"])), opacity, atol=1e-5)
    np.testing.assert_allclose(np.exp(gs["scale_0"]), scales[:, 0], rtol=1e-5)
    colour = 0.5 + export_assets.SH_C0 * np.stack([gs["f_dc_0"], gs["f_dc_1"], gs["f_dc_2"]], 1)
    np.testing.assert_allclose(colour * 255, rgb, atol=1e-3)

    # The COLMAP model copy loads back.
    assert pycolmap.Reconstruction(str(out / "cameras" / "sparse")).num_reg_images() == 4


@pytest.mark.parametrize("per_camera", [False, True])
def test_transforms_invert_to_colmap_poses(tmp_path: Path, per_camera: bool) -> None:
    ws, poses = build_workspace(tmp_path / "job", per_camera)
    export_assets.run(
        export_assets.ExportConfig(glb=False, splats=False, points=False),
        ws,
        tmp_path / "out",
        no_progress,
        never_stop,
    )
    data = json.loads((tmp_path / "out" / "cameras" / "transforms.json").read_text())
    assert data["camera_model"] == "OPENCV"
    assert [f["file_path"] for f in data["frames"]] == [f"images/img_{i}.jpg" for i in range(4)]
    for frame in data["frames"]:
        c2w_gl = np.array(frame["transform_matrix"])
        c2w_cv = c2w_gl @ np.diag([1.0, -1.0, -1.0, 1.0])
        w2c = np.linalg.inv(c2w_cv)
        np.testing.assert_allclose(w2c[:3], poses[frame["file_path"].split("/")[1]], atol=1e-9)
        np.testing.assert_allclose(w2c[3], [0, 0, 0, 1], atol=1e-12)
        # OpenGL camera looks along -z: towards the origin.
        look = -c2w_gl[:3, 2]
        np.testing.assert_allclose(look, -c2w_gl[:3, 3] / np.linalg.norm(c2w_gl[:3, 3]), atol=1e-9)
    if per_camera:
        assert "fl_x" not in data
        first, second = data["frames"][0], data["frames"][1]
        assert (first["fl_x"], first["fl_y"], first["k1"]) == (500.0, 500.0, 0.01)
        assert (second["fl_x"], second["fl_y"], second["cx"], second["k1"]) == (510.0, 505.0, 321.0, 0.0)
    else:
        assert (data["fl_x"], data["cx"], data["cy"], data["w"], data["h"], data["k1"]) == (
            500.0,
            320.0,
            240.0,
            640,
            480,
            0.01,
        )


def test_glb_is_valid_and_loads_back(tmp_path: Path) -> None:
    ws, _ = build_workspace(tmp_path / "job")
    out = tmp_path / "out"
    export_assets.run(
        export_assets.ExportConfig(splats=False, cameras=False, texture="vertex"),
        ws,
        out,
        no_progress,
        never_stop,
    )
    glb = out / "model.glb"

    scene = trimesh.load(glb, force="scene")
    (mesh,) = scene.geometry.values()
    ply = plyio.read_ply(ws.mesh)
    assert len(mesh.vertices) == len(ply.vertex)
    np.testing.assert_allclose(mesh.vertices, plyio.xyz_of(ply.vertex), atol=1e-6)
    np.testing.assert_array_equal(mesh.visual.vertex_colors[:, :3], plyio.rgb_of(ply.vertex))

    assert khronos_validator.validate(glb)["info"]["totalTriangleCount"] == 20 * 4**4


def test_glb_has_normals_and_vertex_colours(tmp_path: Path) -> None:
    ws, _ = build_workspace(tmp_path / "job")
    export_assets.run(
        export_assets.ExportConfig(splats=False, cameras=False, texture="vertex"),
        ws,
        tmp_path,
        no_progress,
        never_stop,
    )
    raw = (tmp_path / "model.glb").read_bytes()
    magic, version, _ = struct.unpack("<4sII", raw[:12])
    (json_len,) = struct.unpack("<I", raw[12:16])
    gltf = json.loads(raw[20 : 20 + json_len])
    assert (magic, version) == (b"glTF", 2)
    (primitive,) = gltf["meshes"][0]["primitives"]
    assert {"POSITION", "NORMAL", "COLOR_0"} <= set(primitive["attributes"])
