"""bake_texture: photos of a known surface come back as a texture that reproduces held-out views.

A faceted sphere carries a colour pattern finer than its vertex spacing (what photos hold and
vertex colours cannot); it is photographed by 10 exact cameras, textured, and rendered at 3 views
the texture never saw, against the truth rendered there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import khronos_validator
import numpy as np
import pycolmap
import pytest
import scipy.sparse
import trimesh

from scandrop.pipeline.bench import appearance
from scandrop.pipeline.core import plyio, raster
from scandrop.pipeline.core.pointcloud import PointCloud, save_points
from scandrop.pipeline.core.stage import never_stop, no_progress
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.export import bake_texture, export_assets, model_glb

W, H, F = 320, 240, 300.0
K = np.array([[F, 0, W / 2], [0, F, H / 2], [0, 0, 1.0]])


def pattern(points: np.ndarray) -> np.ndarray:
    """RGB in 0..255 of a surface point: stripes ~0.12 apart (vertices are ~0.06 apart) and a tint."""
    x, y, z = points.T
    a = np.sin(52 * x + 3 * y) * np.sin(47 * z - 5 * y)
    b = np.sin(31 * y + 11 * x)
    return np.stack([150 + 80 * a, 120 + 60 * b, 110 - 50 * a * b + 40 * z], axis=1).clip(0, 255)


def look_at(centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    forward = -centre / np.linalg.norm(centre)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    rot = np.stack([right, np.cross(forward, right), forward])
    return rot, -rot @ centre


def ring(n: int, elevation: float, phase: float) -> list[tuple[np.ndarray, np.ndarray]]:
    az = 2 * np.pi * (np.arange(n) + phase) / n
    el = np.radians(elevation)
    return [look_at(3.2 * np.array([np.cos(el) * np.sin(a), np.sin(el), np.cos(el) * np.cos(a)])) for a in az]


def photograph(mesh: trimesh.Trimesh, rot: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The true image (the pattern at every pixel's surface point) and the object's mask."""
    cam = mesh.vertices @ rot.T + t
    px = (cam[:, :2] / cam[:, 2:]) * F + [W / 2, H / 2]
    zb = raster.zbuffer(px, cam[:, 2], mesh.faces, (W, H))
    hit = zb.face >= 0
    points = (zb.bary[hit][:, :, None] * mesh.vertices[mesh.faces[zb.face[hit]]]).sum(axis=1)
    image = np.full((W * H, 3), 128, np.uint8)
    image[hit] = np.rint(pattern(points))
    return image.reshape(H, W, 3), hit.reshape(H, W)


@pytest.fixture(scope="module")
def sphere_job(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Workspace, trimesh.Trimesh, Path, export_assets.ExportResult]:
    root = tmp_path_factory.mktemp("bake")
    ws = Workspace(root / "job").create()
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=1.0)
    v = np.asarray(mesh.vertices, dtype=np.float32)
    rgb = np.rint(pattern(mesh.vertices)).astype(np.uint8)  # the best vertex colours can do: exact
    cols = {"x": v[:, 0], "y": v[:, 1], "z": v[:, 2], "red": rgb[:, 0], "green": rgb[:, 1], "blue": rgb[:, 2]}
    plyio.write_ply(ws.mesh, plyio.vertex_array(cols), np.asarray(mesh.faces))
    save_points(ws.fused, PointCloud(v, v, rgb))
    rec = pycolmap.Reconstruction()
    rec.add_camera_with_trivial_rig(
        pycolmap.Camera(model="PINHOLE", width=W, height=H, params=[F, F, W / 2, H / 2], camera_id=1)
    )
    ws.images_dir.mkdir()
    for i, (rot, t) in enumerate(ring(6, 15.0, 0.0) + ring(4, -35.0, 0.5)):
        name = f"photo_{i}.png"
        rec.add_image_with_trivial_frame(
            pycolmap.Image(name=name, camera_id=1, image_id=i + 1),
            pycolmap.Rigid3d(pycolmap.Rotation3d(rot), t),
        )
        image, _ = photograph(mesh, rot, t)
        if i == 3:  # one photo exposed darker: levelling must keep it from showing as a patch
            image = np.rint(image * 0.75).astype(np.uint8)
        cv2.imwrite(str(ws.images_dir / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    ws.sparse_dir.mkdir()
    rec.write_binary(str(ws.sparse_dir))
    out = root / "out"
    config = export_assets.ExportConfig(splats=False, cameras=False, points=False, texture_size=1024)
    start = time.perf_counter()
    result = export_assets.run(config, ws, out, no_progress, never_stop)
    assert result.texture is not None and result.texture["texture"] == "atlas", result.texture
    assert time.perf_counter() - start < 20  # ~3 s on an idle core
    return ws, mesh, out, result


def test_texture_reproduces_held_out_views_better_than_vertex_colours(sphere_job, tmp_path: Path) -> None:
    ws, mesh, out, _ = sphere_job
    export_assets.run(
        export_assets.ExportConfig(splats=False, cameras=False, points=False, texture="vertex"),
        ws,
        tmp_path,
        no_progress,
        never_stop,
    )
    held_out = ring(3, 35.0, 0.25)
    truth = [photograph(mesh, rot, t) for rot, t in held_out]
    cameras = [(K, rot, t) for rot, t in held_out]
    masks = [cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0 for _, m in truth]
    textured = appearance.score_views(
        model_glb.load_model(out / "model.glb"), cameras, [i for i, _ in truth], masks
    )
    vertex = appearance.score_views(
        model_glb.load_model(tmp_path / "model.glb"), cameras, [i for i, _ in truth], masks
    )
    assert model_glb.load_model(out / "model.glb").texture is not None
    print(f"held-out PSNR: texture {textured['psnr_db']} dB, vertex colours {vertex['psnr_db']} dB")
    assert textured["psnr_db"] >= 27.0, textured
    assert textured["psnr_db"] >= vertex["psnr_db"] + 6.0, (textured, vertex)


def test_every_face_is_textured_from_a_photo_with_few_seams(sphere_job) -> None:
    _, _, out, result = sphere_job
    stats = result.texture
    assert stats["faces_textured"] > 0.99 and stats["views"] == 10 and stats["views_per_face"] >= 2.5
    assert stats["seam_edges"] < 0.15  # neighbours mostly share a photo: the smoothness term works
    model = model_glb.load_model(out / "model.glb")
    assert model.texture is not None and model.texture.shape == (1024, 1024, 3)
    assert model.uv is not None and (model.uv >= 0).all() and (model.uv <= 1).all()


def test_textured_glb_is_valid_with_a_base_colour_texture(sphere_job) -> None:
    _, mesh, out, _ = sphere_job
    glb = out / "model.glb"
    raw = glb.read_bytes()
    json_len = int.from_bytes(raw[12:16], "little")
    gltf = json.loads(raw[20 : 20 + json_len])
    material = gltf["materials"][gltf["meshes"][0]["primitives"][0]["material"]]
    assert material["pbrMetallicRoughness"]["baseColorTexture"]["index"] == 0
    assert gltf["images"][0]["mimeType"] == "image/jpeg"
    assert "COLOR_0" not in gltf["meshes"][0]["primitives"][0]["attributes"]  # it would tint the texture
    assert khronos_validator.validate(glb)["info"]["totalTriangleCount"] == len(mesh.faces)


def test_many_views_are_thinned_evenly_over_the_path() -> None:
    cam = pycolmap.Camera(model="PINHOLE", width=W, height=H, params=[F, F, W / 2, H / 2])
    poses = ring(200, 20.0, 0.0)
    views = [bake_texture.View(f"{i}", Path(f"{i}.png"), None, cam, r, t) for i, (r, t) in enumerate(poses)]
    kept = bake_texture.spread_views(views, 20)
    assert len(kept) == 20 and len({v.name for v in kept}) == 20
    steps = np.diff(sorted(int(v.name) for v in kept))
    assert steps.max() <= 2 * steps.min() + 1  # evenly around the ring, not bunched
    assert bake_texture.spread_views(views[:5], 20) == views[:5]


def test_a_photo_that_sees_a_face_beside_an_occluding_edge_is_a_last_resort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wall at z = 0 with a board in front of its left half (z = 0.5). Photo A, straight in front
    and close, sees the wall just right of the board's edge largest, but 1-2 px from that edge; photo
    B, farther and to the side, sees it 18 px from the board's outline. Away from the edge, A stays
    the best photo."""
    grid = np.linspace(-1.0, 1.0, 41)
    gx, gy = np.meshgrid(grid, grid)
    wall = np.stack([gx.ravel(), gy.ravel(), np.zeros(gx.size)], axis=1)
    row, col = np.divmod(np.arange(40 * 40), 40)
    corner = row * 41 + col  # each grid cell's lower-left vertex: two triangles per cell
    quads = np.concatenate(
        [np.stack([corner, corner + 1, corner + 41], 1), np.stack([corner + 1, corner + 42, corner + 41], 1)]
    )
    board = np.array([[-1.0, -1.0, 0.5], [0.0, -1.0, 0.5], [0.0, 1.0, 0.5], [-1.0, 1.0, 0.5]])
    vertices = np.concatenate([wall, board])
    faces = np.concatenate([quads, np.array([[0, 1, 2], [0, 2, 3]]) + len(wall)])
    cv2.imwrite(str(tmp_path / "grey.png"), np.full((H, W, 3), 128, np.uint8))
    camera = pycolmap.Camera(model="PINHOLE", width=W, height=H, params=[F, F, W / 2, H / 2], camera_id=1)

    def view(name: str, centre: np.ndarray) -> bake_texture.View:
        rot, t = look_at(centre)  # looks at the origin
        return bake_texture.View(name, tmp_path / "grey.png", None, camera, rot, t)

    views = [view("A", np.array([0.0, 0.0, 3.0])), view("B", np.array([2.0, 0.0, 4.0]))]
    centroids = vertices[faces].mean(axis=1)
    beside = int(np.argmin(np.linalg.norm(centroids - [0.015, 0.0, 0.0], axis=1)))  # 1-2 px from the edge
    away = int(np.argmin(np.linalg.norm(centroids - [0.6, 0.0, 0.0], axis=1)))

    def best(face: int) -> str:
        view_index, quality, _ = bake_texture._candidates(vertices, faces, views, W, no_progress, never_stop)
        return views[view_index[face, quality[face].argmax()]].name

    assert best(beside) == "B" and best(away) == "A"
    monkeypatch.setattr(bake_texture, "_EDGE_PX", 0)  # without the margin, the largest view wins
    assert best(beside) == "A" and best(away) == "A"


def test_seam_corrections_keep_what_a_whole_seam_says_and_lose_one_vertexs_noise() -> None:
    """Two seams, each a chain of 60 corner keys of one photo: one photo is 20 grey levels darker than
    its neighbour along its whole seam, the other 10 brighter, and each key's own difference carries
    misregistered detail (standard deviation 6). Smoothing along the seam keeps each seam's level,
    loses the noise, and does not mix the two seams."""
    n = 60
    rng = np.random.default_rng(0)
    level = np.repeat([20.0, -10.0], n)
    offset = (level + rng.normal(0.0, 6.0, 2 * n))[:, None].repeat(3, axis=1)
    links = np.array([(i, i + 1) for i in range(2 * n - 1) if i != n - 1])  # no link between the seams
    links = np.concatenate([links, links[:, ::-1]])
    adjacency = scipy.sparse.csr_matrix(
        (np.ones(len(links)), (links[:, 0], links[:, 1])), shape=(2 * n, 2 * n)
    )
    smoothed = bake_texture._smooth_along_seams(offset, adjacency, 30)

    def noise(x: np.ndarray, seam: slice) -> float:
        return float(np.sqrt(((x[seam] - level[seam][:, None]) ** 2).mean()))

    for seam in (slice(0, n), slice(n, 2 * n)):
        assert abs(smoothed[seam].mean() - offset[seam].mean()) < 1.0
        assert noise(smoothed, seam) < 0.4 * noise(offset, seam), (noise(smoothed, seam), noise(offset, seam))
    assert np.array_equal(bake_texture._smooth_along_seams(offset, adjacency, 0), offset)
