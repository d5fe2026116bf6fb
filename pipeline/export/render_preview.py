"""Stage: a preview.png of the result, rendered in software (no GL on a headless CPU box).

The mesh is drawn orthographically from the direction the photographer mostly looked, with +y
up, framed to fit; each face gets its vertex colour times simple two-sided directional shading
and a vectorised z-buffer resolves visibility (every face's bounding-box pixels are tested at
once with edge functions, grouped by box size). Without a mesh the fused points are drawn.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pycolmap
from pydantic import BaseModel, ConfigDict, Field

from scandrop.pipeline.core import plyio
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.pointcloud import load_points
from scandrop.pipeline.core.stage import Progress, StopCheck, atomic_path, check_stop
from scandrop.pipeline.core.workspace import Workspace

_BACKGROUND = (236, 236, 236)  # RGB
_MAX_CANDIDATES = 4_000_000  # pixel tests per batch: bounds memory


class PreviewConfig(BaseModel):
    """How the preview is drawn."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: int = Field(960, ge=64, le=4096, description="Image width in pixels.")
    height: int = Field(720, ge=64, le=4096, description="Image height in pixels.")
    margin: float = Field(0.06, ge=0.0, lt=0.4, description="Empty border around the object, share of size.")
    point_size: int = Field(2, ge=1, le=8, description="Pixel size of points when no mesh exists.")


class PreviewResult(BaseModel):
    rendered: str  # "mesh" or "points"
    file: str
    view_direction: list[float]  # world direction the virtual camera looks along
    up: list[float]
    centre: list[float]
    view_source: str  # how the direction was chosen
    primitives: int
    seconds: float


def view_direction(sparse_dir: Path) -> tuple[np.ndarray, str]:
    """The direction to look along: the mean registered viewing direction when cameras agree
    (a facade, a scene), else the camera nearest that mean (an orbit, whose mean cancels out)."""
    default = np.array([-0.5, -0.35, -1.0])
    if not (sparse_dir / "images.bin").exists():
        return default / np.linalg.norm(default), "default (no cameras)"
    rec = pycolmap.Reconstruction(str(sparse_dir))
    dirs = np.array([rec.image(i).cam_from_world().rotation.matrix()[2] for i in rec.reg_image_ids()])
    if len(dirs) == 0:
        return default / np.linalg.norm(default), "default (no registered cameras)"
    mean = dirs.mean(axis=0)
    if np.linalg.norm(mean) > 0.5:
        return mean / np.linalg.norm(mean), f"mean of {len(dirs)} camera directions"
    nearest = dirs[np.argmax(dirs @ mean)]
    return nearest / np.linalg.norm(nearest), f"camera nearest the mean of {len(dirs)} directions"


def _camera_axes(forward: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Right and up image axes for a view along `forward`, keeping world +y up on screen."""
    world_up = np.array([0.0, 1.0, 0.0])
    if abs(forward @ world_up) > 0.98:  # looking straight down or up: -z becomes screen up
        world_up = np.array([0.0, 0.0, -1.0]) * np.sign(-forward[1])
    right = np.cross(forward, world_up)
    right /= np.linalg.norm(right)
    return right, np.cross(right, forward)


def _zbuffer(pix: np.ndarray, depth: np.ndarray, colour: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Write the nearest colour per pixel index into image (H*W, 3); returns the covered mask."""
    order = np.lexsort((depth, pix))
    first = np.ones(len(order), dtype=bool)
    first[1:] = pix[order][1:] != pix[order][:-1]
    winners = order[first]
    image[pix[winners]] = colour[winners]
    covered = np.zeros(len(image), dtype=bool)
    covered[pix[winners]] = True
    return covered


def rasterise(
    px: np.ndarray,
    depth: np.ndarray,
    faces: np.ndarray,
    face_rgb: np.ndarray,
    size: tuple[int, int],
    should_stop: StopCheck,
) -> tuple[np.ndarray, np.ndarray]:
    """Fill triangles (pixel coords px, camera depth) with flat colours; nearest wins.

    Returns candidate (pixel index, depth, colour) arrays, for one z-buffer pass.
    """
    width, height = size
    tri = px[faces]  # (F, 3, 2)
    lo = np.floor(tri.min(axis=1)).astype(np.int64)
    hi = np.ceil(tri.max(axis=1)).astype(np.int64)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, [width, height])
    extent = (hi - lo).max(axis=1)
    keep = extent > 0
    side = 1 << np.ceil(np.log2(np.maximum(extent, 1))).astype(np.int64)
    pix_parts, depth_parts, colour_parts = [], [], []
    for s in np.unique(side[keep]):
        ids = np.flatnonzero(keep & (side == s))
        grid = np.stack(np.meshgrid(np.arange(s), np.arange(s), indexing="xy"), axis=-1).reshape(-1, 2)
        batch = max(1, _MAX_CANDIDATES // (s * s))
        for start in range(0, len(ids), batch):
            check_stop(should_stop)
            f = ids[start : start + batch]
            p = lo[f][:, None, :] + grid[None]  # (n, s*s, 2) pixel coords
            centre = p + 0.5
            a, b, c = tri[f, 0][:, None], tri[f, 1][:, None], tri[f, 2][:, None]

            def edge(u: np.ndarray, v: np.ndarray, q: np.ndarray) -> np.ndarray:
                return (v[..., 0] - u[..., 0]) * (q[..., 1] - u[..., 1]) - (v[..., 1] - u[..., 1]) * (
                    q[..., 0] - u[..., 0]
                )

            area = edge(a, b, c)  # (n, 1)
            w0, w1, w2 = edge(b, c, centre), edge(c, a, centre), edge(a, b, centre)
            sign = np.where(area >= 0, 1.0, -1.0)
            inside = (w0 * sign >= 0) & (w1 * sign >= 0) & (w2 * sign >= 0) & (np.abs(area) > 1e-12)
            inside &= (p[..., 0] < hi[f][:, None, 0]) & (p[..., 1] < hi[f][:, None, 1])
            n_idx, k_idx = np.nonzero(inside)
            if len(n_idx) == 0:
                continue
            inv = 1.0 / area[n_idx, 0]
            z = depth[faces[f[n_idx]]]
            zi = (w0[n_idx, k_idx] * z[:, 0] + w1[n_idx, k_idx] * z[:, 1] + w2[n_idx, k_idx] * z[:, 2]) * inv
            q = p[n_idx, k_idx]
            pix_parts.append(q[:, 1] * width + q[:, 0])
            depth_parts.append(zi)
            colour_parts.append(face_rgb[f[n_idx]])
    if not pix_parts:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 3), np.uint8)
    return np.concatenate(pix_parts), np.concatenate(depth_parts), np.concatenate(colour_parts)


def run(
    config: PreviewConfig, ws: Workspace, out_dir: Path, progress: Progress, should_stop: StopCheck
) -> PreviewResult:
    """Render out_dir/preview.png from ws.mesh, or from ws.fused when there is no mesh."""
    t0 = time.perf_counter()
    if ws.mesh.exists():
        ply = plyio.read_ply(ws.mesh)
        vertices, faces = plyio.xyz_of(ply.vertex).astype(np.float64), ply.faces
        rgb = plyio.rgb_of(ply.vertex)
        rgb = np.full((len(vertices), 3), 180, np.uint8) if rgb is None else rgb
        rendered = "mesh"
    elif ws.fused.exists():
        cloud = load_points(ws.fused)
        vertices, faces, rgb = cloud.xyz.astype(np.float64), None, cloud.rgb
        rendered = "points"
    else:
        raise ScandropError(
            ErrorCode.export_failed,
            "There is neither a mesh nor points to preview.",
            "Run the dense and mesh stages first.",
        )
    if len(vertices) == 0:
        raise ScandropError(ErrorCode.export_failed, f"The {rendered} to preview are empty.", "")
    progress(0.1, f"Rendering the {rendered}")

    forward, source = view_direction(ws.sparse_dir)
    right, up = _camera_axes(forward)
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    centre = (lo + hi) / 2
    rel = vertices - centre
    sx, sy, depth = rel @ right, rel @ up, rel @ forward
    sx -= (sx.min() + sx.max()) / 2  # centre the silhouette, not the 3-D box
    sy -= (sy.min() + sy.max()) / 2
    width, height = config.width, config.height
    half = max(np.abs(sx).max() / width, np.abs(sy).max() / height, 1e-12)
    scale = (1 - 2 * config.margin) / (2 * half)  # pixels per world unit
    px = np.stack([width / 2 + sx * scale, height / 2 - sy * scale], axis=1)
    check_stop(should_stop)

    if faces is not None:
        tri = vertices[faces]
        normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-20)
        light = -forward + 0.6 * up + 0.3 * right
        light /= np.linalg.norm(light)
        shade = 0.35 + 0.65 * np.abs(normal @ light)
        face_rgb = np.clip(rgb[faces].mean(axis=1) * shade[:, None], 0, 255).astype(np.uint8)
        pix, zs, colour = rasterise(px, depth, faces, face_rgb, (width, height), should_stop)
        primitives = len(faces)
    else:
        base = np.floor(px).astype(np.int64)
        offsets = np.stack(np.meshgrid(np.arange(config.point_size), np.arange(config.point_size)), -1)
        p = (base[:, None, :] + offsets.reshape(-1, 2)[None]).reshape(-1, 2)
        zs = np.repeat(depth, config.point_size**2)
        colour = np.repeat(rgb, config.point_size**2, axis=0)
        ok = (p[:, 0] >= 0) & (p[:, 0] < width) & (p[:, 1] >= 0) & (p[:, 1] < height)
        pix, zs, colour = p[ok, 1] * width + p[ok, 0], zs[ok], colour[ok]
        primitives = len(vertices)
    progress(0.8, "Compositing")
    image = np.empty((height * width, 3), np.uint8)
    image[:] = _BACKGROUND
    if len(pix):
        _zbuffer(pix, zs, colour, image)
    out = out_dir / "preview.png"
    with atomic_path(out) as tmp:
        ok = cv2.imwrite(str(tmp), cv2.cvtColor(image.reshape(height, width, 3), cv2.COLOR_RGB2BGR))
        if not ok:
            raise ScandropError(ErrorCode.export_failed, "Could not write preview.png.", "Check disk space.")
    progress(1.0, "Preview written")
    return PreviewResult(
        rendered=rendered,
        file=out.name,
        view_direction=[round(float(v), 4) for v in forward],
        up=[round(float(v), 4) for v in up],
        centre=[round(float(v), 4) for v in centre],
        view_source=source,
        primitives=primitives,
        seconds=round(time.perf_counter() - t0, 3),
    )
