"""Appearance at held-out views: render model.glb where true photos exist, score PSNR over the object.

Geometry scores (F-score) say nothing about colour; a texture is judged the way novel-view
synthesis is: render the model from cameras the reconstruction never saw and compare with the
true images there, over the object's mask. The renderer is core.raster's z-buffer with
perspective-correct barycentrics; a textured GLB is sampled bilinearly from its baseColorTexture
at the interpolated TEXCOORD_0, a vertex-coloured one interpolates COLOR_0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from scandrop.pipeline.bench import synthetic
from scandrop.pipeline.core import raster
from scandrop.pipeline.export.model_glb import ColouredModel


def _pixels(k: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """Pinhole pixel coordinates of camera-frame points (points behind the camera: anywhere)."""
    z = np.where(cam[:, 2] > 1e-6, cam[:, 2], 1.0)
    return np.stack([k[0, 0] * cam[:, 0] / z + k[0, 2], k[1, 1] * cam[:, 1] / z + k[1, 2]], axis=1)


def render(
    model: ColouredModel,
    k: np.ndarray,
    r: np.ndarray,
    t: np.ndarray,
    size: tuple[int, int],
    background: float = 128.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) float RGB in 0..255 and the covered mask, seen by a pinhole camera (K, R, t:
    world to camera, OpenCV axes, COLMAP pixel convention)."""
    width, height = size
    cam = np.einsum("ij,kj->ki", r, model.vertices) + t
    z = cam[:, 2]
    front = (z[model.faces] > 1e-6).all(axis=1)
    faces = model.faces[front]
    px = _pixels(k, cam)
    zb = raster.zbuffer(px, z, faces, size)
    hit = np.flatnonzero(zb.face >= 0)
    corners = faces[zb.face[hit]]
    w = zb.bary[hit][:, :, None].astype(np.float64)
    image = np.full((width * height, 3), background, dtype=np.float64)
    if model.texture is not None and model.uv is not None:
        uv = (w * model.uv[corners]).sum(axis=1)
        th, tw = model.texture.shape[:2]
        image[hit] = raster.sample_bilinear(model.texture, uv * [tw, th])
    elif model.vertex_rgb is not None:
        image[hit] = (w * model.vertex_rgb[corners].astype(np.float64)).sum(axis=1)
    covered = np.zeros(width * height, dtype=bool)
    covered[hit] = True
    return image.reshape(height, width, 3), covered.reshape(height, width)


def mse(rendered: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Mean squared error over the mask's pixels and channels (inf where the mask is empty)."""
    diff = rendered[mask].astype(np.float64) - truth[mask].astype(np.float64)
    return float(np.mean(diff**2)) if diff.size else math.inf


def db(mean_squared: float) -> float:
    """PSNR in dB of a mean squared error (8-bit peak)."""
    return math.inf if mean_squared == 0 else 10.0 * math.log10(255.0**2 / mean_squared)


def psnr(rendered: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over the mask's pixels (8-bit peak)."""
    return db(mse(rendered, truth, mask))


def score_views(
    model: ColouredModel,
    cameras: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
) -> dict[str, float | list[float]]:
    """PSNR of `model` at each held-out camera (K, R, t) against its true image over its mask
    (pixels of the object; where the model leaves a hole the background colour is scored)."""
    per_view = []
    for (k, r, t), image, mask in zip(cameras, images, masks, strict=True):
        h, w = image.shape[:2]
        rendered, _ = render(model, k, r, t, (w, h))
        per_view.append(psnr(rendered, image[..., :3], mask))
    mse = [255.0**2 / 10 ** (p / 10) for p in per_view]
    return {
        "psnr_db": round(10.0 * math.log10(255.0**2 / float(np.mean(mse))), 3) if mse else math.nan,
        "psnr_per_view_db": [round(p, 3) for p in per_view],
    }


def photo_ceiling(
    train: synthetic.SyntheticScene, held_out: synthetic.SyntheticScene, nearest: int = 4
) -> dict[str, float]:
    """PSNR that a perfect model would reach at the held-out views when its colours come from the
    training photos: each held-out pixel's TRUE surface point (true geometry, true cameras) is
    looked up bilinearly in one of the visible photos among the `nearest` cameras: the one seen
    from the closest direction ("one_photo"), the one that sees the point largest (projected area,
    the texture atlas's own choice: "largest"), or all of them averaged ("blend").

    A texture cannot beat this by reprojection alone: what it misses is detail the photos do not
    resolve (a texture near their Nyquist limit, sampled at other phases) and the view's own
    quantisation. A model's PSNR below it is what geometry, poses and the atlas lose."""
    k = held_out.K
    centres = train.centres()
    sq = {"one_photo": 0.0, "largest": 0.0, "blend": 0.0}
    count = 0
    for image, r, t in zip(held_out.images, held_out.R, held_out.t, strict=True):
        vv, uu = np.nonzero(image[..., 3] == 255)
        rays = np.stack([(uu + 0.5 - k[0, 2]) / k[0, 0], (vv + 0.5 - k[1, 2]) / k[1, 1], np.ones(len(uu))], 1)
        rays = np.einsum("ji,kj->ki", r, rays)  # camera to world: R^T d
        rays /= np.linalg.norm(rays, axis=1, keepdims=True)
        origin = -r.T @ t
        dist, _ = synthetic.cast_rays(train.primitives, origin, rays)
        hit = np.isfinite(dist)
        points, rays, truth = origin + dist[hit, None] * rays[hit], rays[hit], image[vv[hit], uu[hit], :3]
        normals = train.normals(points)
        closest = np.full(len(points), -np.inf)
        largest = np.zeros(len(points))
        one = np.zeros((len(points), 3))
        big = np.zeros((len(points), 3))
        total = np.zeros((len(points), 3))
        seen = np.zeros(len(points))
        for j in np.argsort(np.linalg.norm(centres - origin, axis=1))[:nearest]:
            idx = np.flatnonzero(train.visible_in(points, int(j), normals))
            cam = np.einsum("ij,kj->ki", train.R[j], points[idx]) + train.t[j]
            colour = raster.sample_bilinear(train.images[j][..., :3], _pixels(train.K, cam))
            view_dir = points[idx] - centres[j]
            length = np.linalg.norm(view_dir, axis=1)
            cos = np.einsum("ij,ij->i", view_dir, rays[idx]) / length
            closer = cos > closest[idx]
            closest[idx[closer]], one[idx[closer]] = cos[closer], colour[closer]
            area = -np.einsum("ij,ij->i", normals[idx], view_dir) / length / cam[:, 2] ** 2
            larger = area > largest[idx]
            largest[idx[larger]], big[idx[larger]] = area[larger], colour[larger]
            total[idx] += colour
            seen[idx] += 1
        ok = seen > 0
        sq["one_photo"] += float(((one[ok] - truth[ok]) ** 2).sum())
        sq["largest"] += float(((big[ok] - truth[ok]) ** 2).sum())
        sq["blend"] += float(((total[ok] / seen[ok, None] - truth[ok]) ** 2).sum())
        count += int(ok.sum()) * 3
    scale = 255.0**2 * count
    return {name: round(10.0 * math.log10(scale / e), 3) if e else math.inf for name, e in sq.items()}
