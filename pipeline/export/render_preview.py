"""Stage: a preview.png of the result, rendered in software (no GL on a headless CPU box).

The model is drawn orthographically from the direction the photographer mostly looked, with +y
up, framed on the subject: the 1-99% percentile box of the dense points (the mesh's vertices when
there are none) fills the image, centred, so that stray points and Poisson skirts around a scene
do not leave it small and off-centre. Where the cameras' optical axes meet (an object photographed
from around it), only the points within the photos' view of that meeting point count. What is
drawn is what the user gets: model.glb with its texture atlas when it has one (a little two-sided
directional shading on top, the photos' own light being in the texture), else the mesh with each
face in its vertex colour times that shading; core.raster's z-buffer resolves visibility. Without
a mesh the fused points are drawn.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pycolmap
from pydantic import BaseModel, ConfigDict, Field

from scandrop.pipeline.core import plyio, raster
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.pointcloud import load_points
from scandrop.pipeline.core.stage import Progress, StopCheck, atomic_path, check_stop
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.export.model_glb import ColouredModel, load_model

_BACKGROUND = (236, 236, 236)  # RGB
_FRAME_PERCENTILES = (1.0, 99.0)  # the subject: stray points and Poisson skirts fall outside
_FRAME_PAD = 0.05  # share of the percentile box added on each side
# Smallest eigenvalue of the summed axis projectors, per camera: below it the optical axes are
# too close to parallel (within about 13 degrees of one another) to meet at a subject.
_MIN_CONVERGENCE = 0.05
_MIN_SUBJECT_POINTS = 1000
# Share of the directional shading on textured faces: the texture already holds the photos' light;
# a little more keeps the shape readable.
_TEXTURE_SHADING = 0.25


class PreviewConfig(BaseModel):
    """How the preview is drawn."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: int = Field(960, ge=64, le=4096, description="Image width in pixels.")
    height: int = Field(720, ge=64, le=4096, description="Image height in pixels.")
    margin: float = Field(0.06, ge=0.0, lt=0.4, description="Empty border around the object, share of size.")
    point_size: int = Field(2, ge=1, le=8, description="Pixel size of points when no mesh exists.")


class PreviewResult(BaseModel):
    rendered: str  # "textured mesh", "mesh" or "points"
    file: str
    view_direction: list[float]  # world direction the virtual camera looks along
    up: list[float]
    centre: list[float]
    view_source: str  # how the direction was chosen
    primitives: int
    seconds: float


def load_cameras(sparse_dir: Path) -> pycolmap.Reconstruction | None:
    """The sparse model the preview is framed from, read once; None where there is none."""
    return pycolmap.Reconstruction(str(sparse_dir)) if (sparse_dir / "images.bin").exists() else None


def view_direction(rec: pycolmap.Reconstruction | None) -> tuple[np.ndarray, str]:
    """The direction to look along: the mean registered viewing direction when cameras agree
    (a facade, a scene), else the camera nearest that mean (an orbit, whose mean cancels out)."""
    default = np.array([-0.5, -0.35, -1.0])
    if rec is None:
        return default / np.linalg.norm(default), "default (no cameras)"
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


def subject_region(rec: pycolmap.Reconstruction | None) -> tuple[np.ndarray, float] | None:
    """Where the photographer pointed the camera, as a ball: the point nearest all the registered
    optical axes (least squares), and the half-diagonal of the photos' view at that distance
    (median over photos). None when the axes do not converge (a facade, a forward-facing sweep:
    nearly parallel axes) or the point is behind most cameras; then the whole cloud is the subject.

    Around an object on a table in a room, the dense cloud also holds the walls and the floor;
    framing their percentile box leaves the object small. The photos themselves say what the
    subject is: it is where they all look, as large as they frame it."""
    if rec is None:
        return None
    centres, axes, reach = [], [], []
    for i in rec.reg_image_ids():
        image = rec.image(i)
        pose = image.cam_from_world()
        rot = pose.rotation.matrix()
        centres.append(-rot.T @ pose.translation)
        axes.append(rot[2])
        cam = image.camera
        reach.append(0.5 * np.hypot(cam.width, cam.height) / cam.mean_focal_length())
    if len(centres) < 3:
        return None
    c, d = np.array(centres), np.array(axes)
    normal = np.eye(3)[None] - d[:, :, None] * d[:, None, :]  # projectors across each axis
    a = normal.sum(axis=0)
    if np.linalg.eigvalsh(a)[0] < _MIN_CONVERGENCE * len(c):
        return None
    point = np.linalg.solve(a, np.einsum("nij,nj->i", normal, c))
    along = np.einsum("ni,ni->n", point - c, d)
    if np.mean(along > 0) < 0.8:
        return None
    return point, float(np.median(along * np.array(reach)))


def subject_bounds(points: np.ndarray, right: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Screen-plane box (right, up) of the subject: percentiles, so that a few stray points or a
    far background wall do not shrink the subject into a corner of the preview."""
    screen = np.stack([points @ right, points @ up], axis=1)
    lo, hi = np.percentile(screen, _FRAME_PERCENTILES, axis=0)
    pad = _FRAME_PAD * (hi - lo)  # the percentiles cut into the subject's own extremities a little
    return lo - pad, np.maximum(hi + pad, lo + 1e-9)


def _textured(glb: Path) -> ColouredModel | None:
    """model.glb when it carries a texture atlas (not with `export.texture = "vertex"`)."""
    if not glb.exists():
        return None
    model = load_model(glb)
    return model if model.texture is not None and model.uv is not None else None


def _texture_colours(model: ColouredModel, face: np.ndarray, bary: np.ndarray, lit: np.ndarray) -> np.ndarray:
    """Atlas colours at pixels inside `face` (barycentrics `bary`), lightly shaded (uint8 RGB)."""
    assert model.texture is not None and model.uv is not None
    uv = (bary[:, :, None].astype(np.float64) * model.uv[model.faces[face]]).sum(axis=1)
    th, tw = model.texture.shape[:2]
    colour = raster.sample_bilinear(model.texture, uv * [tw, th])
    shade = 1.0 - _TEXTURE_SHADING + _TEXTURE_SHADING * lit[face]
    return np.clip(colour * shade[:, None], 0, 255).astype(np.uint8)


def run(
    config: PreviewConfig, ws: Workspace, out_dir: Path, progress: Progress, should_stop: StopCheck
) -> PreviewResult:
    """Render out_dir/preview.png from out_dir/model.glb when it is textured, else from ws.mesh, or
    from ws.fused when there is no mesh."""
    t0 = time.perf_counter()
    textured = _textured(out_dir / "model.glb")
    if textured is not None:
        vertices, faces, rgb = textured.vertices, textured.faces, None
        rendered = "textured mesh"
    elif ws.mesh.exists():
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

    cameras = load_cameras(ws.sparse_dir)
    forward, source = view_direction(cameras)
    right, up = _camera_axes(forward)
    subject = load_points(ws.fused).xyz.astype(np.float64) if ws.fused.exists() else vertices
    region = subject_region(cameras)
    if region is not None:
        inside = np.linalg.norm(subject - region[0], axis=1) <= region[1]
        if inside.sum() >= _MIN_SUBJECT_POINTS:
            subject = subject[inside]
    lo, hi = subject_bounds(subject, right, up)
    mid = (lo + hi) / 2
    centre = mid[0] * right + mid[1] * up + float(np.median(subject @ forward)) * forward
    rel = vertices - centre
    sx, sy, depth = rel @ right, rel @ up, rel @ forward
    width, height = config.width, config.height
    half = max((hi - lo)[0] / 2 / width, (hi - lo)[1] / 2 / height, 1e-12)
    scale = (1 - 2 * config.margin) / (2 * half)  # pixels per world unit
    px = np.stack([width / 2 + sx * scale, height / 2 - sy * scale], axis=1)
    check_stop(should_stop)

    image = np.empty((height * width, 3), np.uint8)
    image[:] = _BACKGROUND
    if faces is not None:
        tri = vertices[faces]
        normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-20)
        light = -forward + 0.6 * up + 0.3 * right
        light /= np.linalg.norm(light)
        lit = np.abs(normal @ light)
        drawn = raster.zbuffer(px, depth, faces, (width, height), should_stop, perspective=False)
        hit = drawn.face >= 0
        if textured is not None:
            image[hit] = _texture_colours(textured, drawn.face[hit], drawn.bary[hit], lit)
        else:
            shade = 0.35 + 0.65 * lit
            face_rgb = np.clip(rgb[faces].mean(axis=1) * shade[:, None], 0, 255).astype(np.uint8)
            image[hit] = face_rgb[drawn.face[hit]]
        primitives = len(faces)
    else:
        base = np.floor(px).astype(np.int64)
        offsets = np.stack(np.meshgrid(np.arange(config.point_size), np.arange(config.point_size)), -1)
        p = (base[:, None, :] + offsets.reshape(-1, 2)[None]).reshape(-1, 2)
        zs = np.repeat(depth, config.point_size**2)
        colour = np.repeat(rgb, config.point_size**2, axis=0)
        ok = (p[:, 0] >= 0) & (p[:, 0] < width) & (p[:, 1] >= 0) & (p[:, 1] < height)
        if ok.any():
            _zbuffer(p[ok, 1] * width + p[ok, 0], zs[ok], colour[ok], image)
        primitives = len(vertices)
    progress(0.8, "Compositing")
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
