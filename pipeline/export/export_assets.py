"""Stage: workspace -> the files a person gets back, in the formats other tools read.

    model.glb                 glTF 2.0 mesh (y-up, metres): texture-mapped from the photos (a baked
                              atlas, export.texture = "atlas"), or with vertex colours ("vertex")
    points.ply                fused cloud: x y z nx ny nz red green blue
    splats.splat              antimatter15/splat web-viewer format, 32 bytes a splat
    splats.ply                3D Gaussian Splatting PLY (degree-0 colour only)
    cameras/transforms.json   nerfstudio / instant-ngp cameras (OpenGL camera axes)
    cameras/sparse/           the COLMAP binary model

Every output keeps the scandrop world frame (+y up) unchanged. Each file is written atomically.
An asset whose input an earlier stage did not produce is skipped and named in the result.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import pycolmap
import trimesh
from pydantic import BaseModel, ConfigDict, Field

from scandrop.pipeline.core import plyio
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.pointcloud import load_points
from scandrop.pipeline.core.stage import Progress, StopCheck, atomic_dir, atomic_path, check_stop
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.export import bake_texture

SH_C0 = 0.28209479177387814
# OpenCV camera axes (x right, y down, z forward) -> OpenGL (x right, y up, z back).
_CV_TO_GL = np.diag([1.0, -1.0, -1.0, 1.0])


class ExportConfig(BaseModel):
    """What to export. Defaults are the balanced preset (everything)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    glb: bool = Field(True, description="Write model.glb from the mesh.")
    points: bool = Field(True, description="Write points.ply from the fused cloud.")
    splats: bool = Field(True, description="Write splats.splat and splats.ply.")
    cameras: bool = Field(True, description="Write cameras/transforms.json and cameras/sparse/.")
    texture: Literal["atlas", "vertex"] = Field(
        "atlas",
        description="Colour of model.glb: 'atlas' bakes a texture image from the photos (falls back to "
        "vertex colours when no registered photo is there); 'vertex' keeps per-vertex colours.",
    )
    texture_size: int = Field(
        4096,
        ge=256,
        le=8192,
        description="Side of the square texture atlas, pixels (fast 2048, quality 8192).",
    )
    texture_jpeg_quality: int = Field(
        98, ge=50, le=100, description="JPEG quality of the atlas (4:4:4 colour; fast 90, quality 100)."
    )


class ExportResult(BaseModel):
    files: dict[str, int]  # relative path -> size in bytes
    points: int
    triangles: int
    splats: int
    cameras: int
    skipped: dict[str, str]  # asset -> why
    texture: dict | None = None  # the atlas's statistics (bake_texture.TextureStats), or why none
    seconds: float


def _read_mesh(mesh_ply: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertices, faces and vertex colours of the mesh stage's output."""
    ply = plyio.read_ply(mesh_ply)
    rgb = plyio.rgb_of(ply.vertex)
    if rgb is None or len(ply.faces) == 0:
        raise ScandropError(
            ErrorCode.export_failed, "The mesh has no faces or no vertex colours.", "Rerun the mesh stage."
        )
    return plyio.xyz_of(ply.vertex).astype(np.float64), ply.faces, rgb


def _write_glb(mesh_ply: Path, out: Path) -> int:
    """model.glb with POSITION, NORMAL and COLOR_0; returns the triangle count."""
    xyz, faces, rgb = _read_mesh(mesh_ply)
    rgba = np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], axis=1)
    mesh = trimesh.Trimesh(xyz, faces, vertex_colors=rgba, process=False)
    _ = mesh.vertex_normals  # computed now so the exporter writes NORMAL
    with atomic_path(out) as tmp:
        tmp.write_bytes(trimesh.exchange.gltf.export_glb(mesh, include_normals=True))
    return len(faces)


_VISIBILITY_SIZE = 1024  # long side of the z-buffers that decide which photo sees which face
_MAX_TEXTURE_VIEWS = 80  # photos considered for the texture (each costs ~1.5 CPU-s at 300k faces)


def _glb_bytes(gltf: dict, chunks: list[bytes]) -> bytes:
    """A GLB from a glTF dict and binary chunks: one buffer, one 4-byte aligned bufferView each."""
    blob = bytearray()
    views = []
    for data in chunks:
        views.append({"buffer": 0, "byteOffset": len(blob), "byteLength": len(data)})
        blob += data + b"\0" * (-len(data) % 4)
    for view, target in zip(views, gltf.pop("_targets"), strict=True):
        if target:
            view["target"] = target
    gltf["bufferViews"] = views
    gltf["buffers"] = [{"byteLength": len(blob)}]
    text = json.dumps(gltf, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)
    total = 12 + 8 + len(text) + 8 + len(blob)
    return (
        struct.pack("<4sII", b"glTF", 2, total)
        + struct.pack("<I4s", len(text), b"JSON")
        + text
        + struct.pack("<I4s", len(blob), b"BIN\0")
        + bytes(blob)
    )


def textured_glb(mesh: bake_texture.TexturedMesh, normals: np.ndarray, jpeg_quality: int) -> bytes:
    """model.glb with POSITION, NORMAL, TEXCOORD_0 and the atlas as baseColorTexture (JPEG).

    The material is unlit (KHR_materials_unlit): the photos' light is already in the texture, as in
    every photogrammetry tool's output; viewers without the extension fall back to a matte material.
    """
    # Full-resolution colour (4:4:4): the default 4:2:0 halves the chroma that the photos' colour
    # detail is made of (relief sphere: held-out PSNR 26.5 -> 27.5 dB, model.glb 12.0 -> 12.8 MB).
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
    params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    params += [cv2.IMWRITE_JPEG_OPTIMIZE, 1]  # optimal Huffman tables: the same pixels, 6-18% fewer bytes
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(mesh.atlas, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ScandropError(ErrorCode.export_failed, "Could not encode the texture atlas.", "")
    pos = np.ascontiguousarray(mesh.vertices, dtype=np.float32)
    accessors = [
        {
            "componentType": 5126,
            "count": len(pos),
            "type": "VEC3",
            "min": pos.min(axis=0).tolist(),
            "max": pos.max(axis=0).tolist(),
        },
        {"componentType": 5126, "count": len(pos), "type": "VEC3"},
        {"componentType": 5126, "count": len(pos), "type": "VEC2"},
        {"componentType": 5125, "count": mesh.faces.size, "type": "SCALAR"},
    ]
    for i, accessor in enumerate(accessors):
        accessor["bufferView"] = i
    gltf = {
        "asset": {"version": "2.0", "generator": "scandrop"},
        "extensionsUsed": ["KHR_materials_unlit"],
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": "model"}],
        "meshes": [
            {
                "primitives": [
                    {
                        "attributes": {"POSITION": 0, "NORMAL": 1, "TEXCOORD_0": 2},
                        "indices": 3,
                        "material": 0,
                        "mode": 4,
                    }
                ]
            }
        ],
        "materials": [
            {
                "name": "photo texture",
                "pbrMetallicRoughness": {
                    "baseColorTexture": {"index": 0, "texCoord": 0},
                    "metallicFactor": 0.0,
                    "roughnessFactor": 1.0,
                },
                "extensions": {"KHR_materials_unlit": {}},
            }
        ],
        "textures": [{"sampler": 0, "source": 0}],
        "samplers": [{"magFilter": 9729, "minFilter": 9987, "wrapS": 33071, "wrapT": 33071}],
        "images": [{"bufferView": 4, "mimeType": "image/jpeg"}],
        "accessors": accessors,
        "_targets": [34962, 34962, 34962, 34963, None],
    }
    chunks = [
        pos.tobytes(),
        np.ascontiguousarray(normals, dtype=np.float32).tobytes(),
        np.ascontiguousarray(mesh.uv, dtype=np.float32).tobytes(),
        np.ascontiguousarray(mesh.faces, dtype=np.uint32).tobytes(),
        jpeg.tobytes(),
    ]
    return _glb_bytes(gltf, chunks)


def registered_views(ws: Workspace) -> list[bake_texture.View]:
    """The registered photos of the workspace's model: those the atlas may be baked from."""
    if not (ws.sparse_dir / "images.bin").exists():
        return []
    return bake_texture.views_from_model(ws.sparse_dir, ws.images_dir, ws.masks_dir)


def write_textured_glb(
    config: ExportConfig,
    ws: Workspace,
    views: list[bake_texture.View],
    out: Path,
    progress: Progress,
    should_stop: StopCheck,
) -> tuple[int, dict]:
    """Bake the atlas from `views` and write model.glb; vertex colours (and why) where there are
    none. The views are a parameter so that the benchmark can leave photos out and judge the
    texture at them (bench.texture_held_out)."""
    views = bake_texture.spread_views(views, _MAX_TEXTURE_VIEWS)
    if not views:
        return _write_glb(ws.mesh, out), {
            "texture": "vertex",
            "reason": "no registered photos to texture from",
        }
    xyz, faces, rgb = _read_mesh(ws.mesh)
    textured = bake_texture.bake(
        xyz, faces, rgb, views, config.texture_size, _VISIBILITY_SIZE, progress, should_stop
    )
    normals = trimesh.Trimesh(xyz, faces, process=False).vertex_normals
    normals = np.where(np.linalg.norm(normals, axis=1, keepdims=True) > 0.5, normals, [0.0, 1.0, 0.0])
    split_normals = normals[textured.origin]
    with atomic_path(out) as tmp:
        tmp.write_bytes(textured_glb(textured, split_normals, config.texture_jpeg_quality))
    return len(faces), {"texture": "atlas", **textured.stats.model_dump()}


def splat_bytes(
    xyz: np.ndarray, scales: np.ndarray, quats: np.ndarray, rgb: np.ndarray, opacity: np.ndarray
) -> bytes:
    """The .splat layout, sorted by decreasing size x opacity as web viewers expect."""
    order = np.argsort(-(np.exp(np.log(scales.astype(np.float64)).sum(axis=1)) * opacity), kind="stable")
    rec = np.empty(
        len(xyz), dtype=[("xyz", "<f4", 3), ("scale", "<f4", 3), ("rgba", "u1", 4), ("rot", "u1", 4)]
    )
    rec["xyz"] = xyz[order]
    rec["scale"] = scales[order]
    rec["rgba"][:, :3] = rgb[order]
    rec["rgba"][:, 3] = np.clip(np.rint(opacity[order] * 255), 0, 255)
    q = quats[order] / np.linalg.norm(quats[order], axis=1, keepdims=True)
    rec["rot"] = np.clip(np.rint(q * 128 + 128), 0, 255)
    return rec.tobytes()


def splat_ply_vertex(
    xyz: np.ndarray, scales: np.ndarray, quats: np.ndarray, rgb: np.ndarray, opacity: np.ndarray
) -> np.ndarray:
    """3DGS PLY fields: positions, zero normals, f_dc, opacity logit, log scales, rot w,x,y,z."""
    f_dc = (rgb.astype(np.float32) / 255.0 - 0.5) / SH_C0
    o = np.clip(opacity.astype(np.float64), 1e-6, 1 - 1e-6)
    cols: dict[str, np.ndarray] = {name: xyz[:, i] for i, name in enumerate("xyz")}
    cols |= {name: np.zeros(len(xyz)) for name in ("nx", "ny", "nz")}
    cols |= {f"f_dc_{i}": f_dc[:, i] for i in range(3)}
    cols["opacity"] = np.log(o / (1 - o))
    cols |= {f"scale_{i}": np.log(scales[:, i]) for i in range(3)}
    cols |= {f"rot_{i}": quats[:, i] for i in range(4)}
    return plyio.vertex_array({k: np.asarray(v, dtype=np.float32) for k, v in cols.items()})


def _camera_intrinsics(camera: pycolmap.Camera) -> dict[str, float | int]:
    """OPENCV-model fields of a COLMAP camera (the models our stages produce)."""
    p = [float(v) for v in camera.params]
    model = camera.model.name
    if model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):
        fx = fy = p[0]
        cx, cy = p[1], p[2]
        k1 = p[3] if len(p) > 3 else 0.0
        k2 = p[4] if model == "RADIAL" else 0.0
        p1 = p2 = 0.0
    elif model in ("PINHOLE", "OPENCV"):
        fx, fy, cx, cy = p[:4]
        k1, k2, p1, p2 = p[4:8] if model == "OPENCV" else (0.0, 0.0, 0.0, 0.0)
    else:
        raise ScandropError(
            ErrorCode.export_failed,
            f"Camera model {model} cannot be written as OPENCV.",
            "Reconstruct with a SIMPLE_RADIAL, RADIAL, PINHOLE or OPENCV camera.",
        )
    return {
        "fl_x": fx,
        "fl_y": fy,
        "cx": cx,
        "cy": cy,
        "w": int(camera.width),
        "h": int(camera.height),
        "k1": k1,
        "k2": k2,
        "p1": p1,
        "p2": p2,
    }


def camera_to_world_gl(cam_from_world: pycolmap.Rigid3d) -> np.ndarray:
    """4x4 camera-to-world in OpenGL camera axes from COLMAP's world-to-camera (OpenCV axes)."""
    w2c = np.eye(4)
    w2c[:3, :4] = cam_from_world.matrix()
    return np.linalg.inv(w2c) @ _CV_TO_GL


def transforms_json(rec: pycolmap.Reconstruction) -> dict:
    """nerfstudio/instant-ngp transforms: shared intrinsics at the top level, or per frame."""
    intrinsics = {cid: _camera_intrinsics(cam) for cid, cam in rec.cameras.items()}
    images = sorted((rec.image(i) for i in rec.reg_image_ids()), key=lambda im: im.name)
    used = {json.dumps(intrinsics[im.camera_id], sort_keys=True) for im in images}
    shared = len(used) == 1
    frames = []
    for im in images:
        frame: dict = {"file_path": f"images/{im.name}"}
        if not shared:
            frame |= intrinsics[im.camera_id]
        frame["transform_matrix"] = camera_to_world_gl(im.cam_from_world()).tolist()
        frames.append(frame)
    data: dict = {"camera_model": "OPENCV"}
    if shared and images:
        data |= intrinsics[images[0].camera_id]
    data["frames"] = frames
    return data


def _write_images(src: Path, names: list[str], out_dir: Path) -> None:
    """The photos the cameras describe (upright, at the size the intrinsics are for), so that
    transforms.json and the COLMAP model work as they are in nerfstudio, COLMAP or a 3DGS trainer."""
    with atomic_dir(out_dir) as tmp:
        for name in names:
            try:
                os.link(src / name, tmp / name)  # same filesystem: no copy needed
            except OSError:
                shutil.copyfile(src / name, tmp / name)


def run(
    config: ExportConfig, ws: Workspace, out_dir: Path, progress: Progress, should_stop: StopCheck
) -> ExportResult:
    """Write the exports into out_dir; raises export_failed when there is no dense cloud at all."""
    t0 = time.perf_counter()
    if not ws.fused.exists():
        raise ScandropError(
            ErrorCode.export_failed, "There is no point cloud to export.", "Run the dense stages first."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, str] = {}
    written: list[Path] = []
    triangles = n_splats = n_cameras = 0

    cloud = load_points(ws.fused)
    if config.points:
        progress(0.05, "Writing points.ply")
        plyio.write_ply(
            out_dir / "points.ply",
            plyio.points_vertex(cloud.xyz, cloud.normals, cloud.rgb),
            comment="scandrop fused points, world frame +y up",
        )
        written.append(out_dir / "points.ply")
    check_stop(should_stop)

    texture: dict | None = None
    if config.glb:
        if ws.mesh.exists():
            progress(0.1, "Writing model.glb")
            if config.texture == "atlas":
                triangles, texture = write_textured_glb(
                    config,
                    ws,
                    registered_views(ws),
                    out_dir / "model.glb",
                    lambda f, m: progress(0.1 + 0.5 * f, m),
                    should_stop,
                )
            else:
                triangles = _write_glb(ws.mesh, out_dir / "model.glb")
            written.append(out_dir / "model.glb")
        else:
            skipped["model.glb"] = "no mesh was built"
    check_stop(should_stop)

    if config.splats:
        if ws.splats.exists():
            progress(0.65, "Writing splats")
            with np.load(ws.splats) as s:
                xyz, scales, quats = s["xyz"], s["scales"], s["quats"]
                rgb, opacity = s["rgb"], s["opacity"]
            n_splats = len(xyz)
            with atomic_path(out_dir / "splats.splat") as tmp:
                tmp.write_bytes(splat_bytes(xyz, scales, quats, rgb, opacity))
            plyio.write_ply(out_dir / "splats.ply", splat_ply_vertex(xyz, scales, quats, rgb, opacity))
            written += [out_dir / "splats.splat", out_dir / "splats.ply"]
        else:
            skipped["splats"] = "no splats were made"
    check_stop(should_stop)

    if config.cameras:
        if (ws.sparse_dir / "images.bin").exists():
            progress(0.85, "Writing cameras")
            rec = pycolmap.Reconstruction(str(ws.sparse_dir))
            data = transforms_json(rec)
            n_cameras = len(data["frames"])
            with atomic_path(out_dir / "cameras" / "transforms.json") as tmp:
                tmp.write_text(json.dumps(data, indent=2) + "\n")
            with atomic_dir(out_dir / "cameras" / "sparse") as tmp_sparse:
                rec.write_binary(str(tmp_sparse))
            _write_images(
                ws.images_dir,
                [f["file_path"].removeprefix("images/") for f in data["frames"]],
                out_dir / "cameras" / "images",
            )
            written.append(out_dir / "cameras" / "transforms.json")
            written += sorted((out_dir / "cameras" / "sparse").iterdir())
        else:
            skipped["cameras"] = "no sparse model"
    progress(1.0, f"Exported {len(written)} files")
    return ExportResult(
        files={p.relative_to(out_dir).as_posix(): p.stat().st_size for p in written},
        points=len(cloud),
        triangles=triangles,
        splats=n_splats,
        cameras=n_cameras,
        skipped=skipped,
        texture=texture,
        seconds=round(time.perf_counter() - t0, 3),
    )
