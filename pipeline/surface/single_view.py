"""Stage: one photo -> a relief of its visible surface, from a learned monocular depth model.

A single photo has no multi-view geometry, so the only honest source of depth is a model trained
for it (never brightness or shading rules). Such models predict inverse depth up to an unknown
scale and shift: the relief is therefore placed at an assumed depth range (`depth_ratio`, the far
surface this many times as distant as the near one), and the report says so. The photo's
foreground (alpha channel or mask) bounds the surface; depth jumps cut it instead of stretching
skin across them. Outputs are the same workspace files the multi-view stages write (fused points,
mesh, a one-camera sparse model), so splats, export and preview run unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from scandrop.models.registry import DEPTH_MODEL
from scandrop.pipeline.core import plyio
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.pointcloud import PointCloud, save_points, vertex_normals
from scandrop.pipeline.core.stage import Progress, StopCheck, atomic_dir, check_stop
from scandrop.pipeline.core.workspace import Workspace


class SingleViewConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(DEPTH_MODEL, description="Registry name of the monocular depth model.")
    models_dir: str | None = Field(
        None, description="Where models are installed (default: SCANDROP_MODELS_DIR or the settings default)."
    )
    grid_size: int = Field(512, ge=64, le=2048, description="Long side of the relief's vertex grid.")
    depth_ratio: float = Field(
        1.5, gt=1.0, le=10.0, description="Assumed far/near depth of the visible surface (scale is unknown)."
    )
    max_jump: float = Field(
        0.04, gt=0, description="Relative depth step between neighbours above which the surface is cut."
    )
    fov_deg: float = Field(55.0, gt=10, lt=150, description="Horizontal field of view when EXIF has none.")


class SingleViewResult(BaseModel):
    image: str
    model: str
    backend: str
    vertices: int
    triangles: int
    masked: bool
    focal_px: float
    focal_source: str
    depth_ratio: float
    note: str


def load_model(config: SingleViewConfig, device: str) -> Any:
    """The verified depth network, opened for inference; model_missing names the pull command."""
    from scandrop.models.mono_depth import open_depth_model

    return open_depth_model(config.model, config.models_dir, device)


def focal_from_exif(path: Path, width: int, fov_deg: float) -> tuple[float, str]:
    """Focal length in pixels from the 35 mm-equivalent EXIF focal length, else the assumed FOV."""
    with Image.open(path) as img:
        f35 = img.getexif().get_ifd(0x8769).get(0xA405)
    if f35:
        return float(f35) / 36.0 * width, f"EXIF 35 mm-equivalent focal length {f35} mm"
    return width / (2 * math.tan(math.radians(fov_deg) / 2)), f"assumed {fov_deg:.0f} degree field of view"


def relief_depth(inverse: np.ndarray, valid: np.ndarray, depth_ratio: float) -> np.ndarray:
    """Depth from relative inverse depth: the 2nd..98th percentile of the foreground span 1..ratio."""
    lo, hi = np.percentile(inverse[valid], [2, 98])
    if not hi > lo:
        raise ScandropError(
            ErrorCode.dense_failed,
            "The depth model sees no depth variation in this photo.",
            "Photograph the object so that it is not a flat, frontal surface, or drop several photos.",
        )
    t = np.clip((inverse - lo) / (hi - lo), -0.25, 1.25)  # 0 = far, 1 = near
    inv_z = 1.0 / depth_ratio + (1.0 - 1.0 / depth_ratio) * t
    return (1.0 / np.maximum(inv_z, 1e-3)).astype(np.float32)


def grid_mesh(depth: np.ndarray, valid: np.ndarray, max_jump: float) -> np.ndarray:
    """Two triangles per grid cell whose four corners are valid and without a depth jump."""
    h, w = depth.shape
    idx = np.arange(h * w).reshape(h, w)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    corners = np.stack([depth[:-1, :-1], depth[:-1, 1:], depth[1:, :-1], depth[1:, 1:]])
    ok = valid[:-1, :-1] & valid[:-1, 1:] & valid[1:, :-1] & valid[1:, 1:]
    ok &= corners.max(axis=0) / np.maximum(corners.min(axis=0), 1e-6) - 1.0 <= max_jump
    faces = np.concatenate([np.stack([a[ok], c[ok], b[ok]], 1), np.stack([b[ok], c[ok], d[ok]], 1)])
    return faces.astype(np.int64)


def run(
    config: SingleViewConfig,
    ws: Workspace,
    device: str,
    progress: Progress,
    should_stop: StopCheck,
) -> SingleViewResult:
    """Write ws.fused, ws.mesh and a one-camera ws.sparse_dir from the single ingested photo."""
    names = sorted(p.name for p in ws.images_dir.iterdir())
    if len(names) != 1:
        raise ScandropError(ErrorCode.internal_error, f"Single-view needs one photo, found {len(names)}.")
    name = names[0]
    model = load_model(config, device)
    check_stop(should_stop)
    progress(0.1, f"estimating depth with {config.model}")
    rgb_full = np.asarray(Image.open(ws.images_dir / name).convert("RGB"))
    inverse_full = model.predict(rgb_full)
    check_stop(should_stop)

    h_full, w_full = rgb_full.shape[:2]
    scale = min(1.0, config.grid_size / max(h_full, w_full))
    w, h = max(2, round(w_full * scale)), max(2, round(h_full * scale))
    rgb = np.asarray(Image.fromarray(rgb_full).resize((w, h), Image.Resampling.BILINEAR))
    inverse = np.asarray(
        Image.fromarray(inverse_full.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR)
    )
    mask_path = ws.mask_for(name)
    masked = mask_path.exists()
    if masked:
        valid = np.asarray(Image.open(mask_path).convert("L").resize((w, h), Image.Resampling.NEAREST)) > 127
    else:
        valid = np.ones((h, w), bool)
    valid &= np.isfinite(inverse)
    if valid.sum() < 100:
        raise ScandropError(
            ErrorCode.no_input,
            "The photo's foreground is too small to build a surface.",
            "Use a larger photo.",
        )
    progress(0.5, "building the relief")
    depth = relief_depth(inverse, valid, config.depth_ratio)
    focal_full, focal_source = focal_from_exif(ws.images_dir / name, w_full, config.fov_deg)
    focal = focal_full * scale
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    cam = np.stack([(u - w / 2) / focal * depth, (v - h / 2) / focal * depth, depth], axis=-1).reshape(-1, 3)
    faces = grid_mesh(depth, valid, config.max_jump)
    if len(faces) == 0:
        raise ScandropError(
            ErrorCode.mesh_failed, "No surface could be built from the depth.", "Use another photo."
        )
    used = np.unique(faces)
    remap = np.full(len(cam), -1, np.int64)
    remap[used] = np.arange(len(used))
    # World frame as for multi-view jobs: +y up, the camera looking along -z, centred, radius ~1.
    world = cam[used] * np.array([1.0, -1.0, -1.0])
    centre = world.mean(axis=0)
    radius = float(np.percentile(np.linalg.norm(world - centre, axis=1), 90)) or 1.0
    xyz = ((world - centre) / radius).astype(np.float32)
    faces = remap[faces]
    colours = rgb.reshape(-1, 3)[used]
    normals = vertex_normals(xyz, faces).astype(np.float32)
    check_stop(should_stop)

    save_points(ws.fused, PointCloud(xyz=xyz, normals=normals, rgb=colours))
    vertex = plyio.vertex_array(
        {
            "x": xyz[:, 0],
            "y": xyz[:, 1],
            "z": xyz[:, 2],
            "red": colours[:, 0],
            "green": colours[:, 1],
            "blue": colours[:, 2],
        }
    )
    plyio.write_ply(ws.mesh, vertex, faces)
    _write_camera(ws.sparse_dir, name, w_full, h_full, focal_full, centre, radius)
    progress(1.0, f"relief of {len(faces)} triangles")
    return SingleViewResult(
        image=name,
        model=config.model,
        backend=model.backend,
        vertices=len(xyz),
        triangles=len(faces),
        masked=masked,
        focal_px=round(focal_full, 2),
        focal_source=focal_source,
        depth_ratio=config.depth_ratio,
        note=(
            "single-view reconstruction: the visible surface only, from a learned monocular depth model; "
            f"depth scale and shift are unknown, the relief assumes the far surface {config.depth_ratio}x "
            "as distant as the near one"
        ),
    )


def _write_camera(
    sparse_dir: Path, name: str, width: int, height: int, focal: float, centre: np.ndarray, radius: float
) -> None:
    """The photo's camera in the output frame: world = (x, -y, -z) of the camera, centred, scaled."""
    rec = pycolmap.Reconstruction()
    camera = pycolmap.Camera(
        model="PINHOLE", width=width, height=height, params=[focal, focal, width / 2, height / 2], camera_id=1
    )
    rec.add_camera_with_trivial_rig(camera)
    # x_cam = R (x_world * radius + centre) with R = diag(1, -1, -1): cam_from_world = (R, R centre) / radius
    flip = np.diag([1.0, -1.0, -1.0])
    rotation = pycolmap.Rotation3d(flip)
    translation = flip @ centre / radius
    pose = pycolmap.Rigid3d(rotation, translation)
    image = pycolmap.Image(name=name, camera_id=1, image_id=1)
    rec.add_image_with_trivial_frame(image, pose)
    with atomic_dir(sparse_dir) as tmp:
        rec.write_binary(str(tmp))
