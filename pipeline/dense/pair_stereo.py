"""Depth of a reference view from one partner view: rectify, semi-global matching, back to depth.

Both photos are resampled (undistortion folded in) onto a common rectified frame whose x axis is
the baseline, so epipolar lines are image rows and OpenCV's StereoSGBM applies whatever the
direction of the baseline. The partner's principal point is shifted by the smallest expected
disparity, so the searched range covers only the depths the sparse points allow, and both
images are padded on the left so that SGBM's invalid left band falls outside the photo.
Disparities are sampled back on the reference's undistorted depth grid and turned into camera z.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from scandrop.pipeline.dense.dense_views import NO_PIXEL, DenseView

_MODES = {
    "sgbm": cv2.StereoSGBM_MODE_SGBM,
    "3way": cv2.StereoSGBM_MODE_SGBM_3WAY,
    "hh": cv2.StereoSGBM_MODE_HH,
}


@dataclass(frozen=True)
class SgbmParams:
    block_size: int
    uniqueness: int
    max_disparities: int
    mode: str  # 'sgbm' (5 directions), '3way' (faster), 'hh' (8 directions, slower)
    scale: float = 1.0  # rectified focal length as a share of the depth grid's


@dataclass(frozen=True)
class Rectification:
    R: np.ndarray  # world-to-rectified rotation shared by both views
    K_ref: np.ndarray
    K_src: np.ndarray
    size: tuple[int, int]  # (width, height)
    baseline: float
    d0: float  # disparity offset folded into K_src
    num_disparities: int


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def depth_range(view: DenseView, points: np.ndarray) -> tuple[float, float] | None:
    """Near/far camera z of the sparse points a view sees (robust percentiles, with margin)."""
    if len(points) < 5:
        return None
    z = (points @ view.R.T + view.t)[:, 2]
    z = z[z > 0]
    if len(z) < 5:
        return None
    near, far = np.percentile(z, [2.0, 98.0])
    return float(near) * 0.8, float(far) * 1.25


def rectify(ref: DenseView, src: DenseView, points: np.ndarray, params: SgbmParams) -> Rectification | None:
    """A rectified frame for the pair, or None when the pair cannot be rectified usefully."""
    base = src.center - ref.center
    baseline = float(np.linalg.norm(base))
    if baseline < 1e-9:
        return None
    x = base / baseline
    y = _unit(np.cross(_unit(ref.axis + src.axis), x))
    R = np.stack([x, y, np.cross(x, y)])
    f = params.scale * 0.5 * (ref.K[0, 0] + ref.K[1, 1])
    width, height = ref.grid_size
    # Outline of the reference grid in the rectified frame decides the rectified image extent.
    us = np.linspace(0, width - 1, 32)
    vs = np.linspace(0, height - 1, 32)
    border = np.concatenate(
        [
            np.stack([us, np.zeros_like(us)], 1),
            np.stack([us, np.full_like(us, height - 1)], 1),
            np.stack([np.zeros_like(vs), vs], 1),
            np.stack([np.full_like(vs, width - 1), vs], 1),
        ]
    )
    rays = np.linalg.solve(ref.K, np.c_[border, np.ones(len(border))].T).T
    rect = rays @ (R @ ref.R.T).T
    if np.any(rect[:, 2] < 0.2 * np.linalg.norm(rect, axis=1)):
        return None
    u = f * rect[:, 0] / rect[:, 2]
    v = f * rect[:, 1] / rect[:, 2]
    # Disparity range from the sparse points' depths in the rectified frame.
    z = (points - ref.center) @ R.T
    z = z[:, 2][z[:, 2] > 0]
    if len(z) < 5:
        return None
    near, far = np.percentile(z, [2.0, 98.0])
    d_lo = f * baseline / (far * 1.25)
    d_hi = f * baseline / (near * 0.8)
    d0 = float(np.floor(d_lo)) - 4.0
    num = int(np.ceil((d_hi - d0 + 4.0) / 16.0) * 16)
    num = max(16, min(num, params.max_disparities))
    pad = num + params.block_size
    rect_w = int(np.ceil(u.max() - u.min())) + 1
    rect_h = int(np.ceil(v.max() - v.min())) + 1
    if rect_w > 3 * width or rect_h > 3 * height:
        return None
    cx = -float(u.min()) + pad
    cy = -float(v.min())
    K_ref = np.array([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]])
    K_src = K_ref.copy()
    K_src[0, 2] = cx + d0
    return Rectification(R, K_ref, K_src, (rect_w + pad, rect_h), baseline, d0, num)


def _lerp_matrix(n: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Knot positions every `step` px covering [0, n - 1] and the (n, knots) linear interpolation matrix."""
    knots = np.arange(0, n - 1 + step, step, dtype=np.float64)
    x = np.arange(n, dtype=np.float64)
    k = np.minimum((x // step).astype(np.int64), len(knots) - 2) if len(knots) > 1 else np.zeros(n, np.int64)
    frac = (x - knots[k]) / step
    m = np.zeros((n, len(knots)))
    m[np.arange(n), k] = 1.0 - frac
    if len(knots) > 1:
        m[np.arange(n), k + 1] = frac
    return knots, m


def _rect_maps(view: DenseView, R: np.ndarray, K: np.ndarray, size: tuple[int, int], step: int = 8) -> tuple:
    """Remap tables from the rectified frame into the photo, computed on a coarse lattice and
    interpolated (the mapping is smooth; this keeps COLMAP's projection off every pixel)."""
    width, height = size
    ku, mu = _lerp_matrix(width, step)
    kv, mv = _lerp_matrix(height, step)
    u, v = np.meshgrid(ku, kv)
    rays = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], axis=-1)
    cam = rays @ (view.R @ R.T).T
    mx, my = view.photo_map(cam)
    far = (mx < -1e3) | (my < -1e3)
    mx = (mv @ np.where(far, NO_PIXEL, mx) @ mu.T).astype(np.float32)
    my = (mv @ np.where(far, NO_PIXEL, my) @ mu.T).astype(np.float32)
    return mx, my


def _prepare(photo: np.ndarray, view: DenseView, scale: float) -> np.ndarray:
    """Anti-alias a photo that is resampled smaller (depth grid and rectification scales)."""
    total = view.scale * scale
    if total < 0.75:
        return cv2.GaussianBlur(photo, (0, 0), 0.4 / total)
    return photo


def _bilinear_valid(disp: np.ndarray, u: np.ndarray, v: np.ndarray, max_step: float) -> np.ndarray:
    """Bilinear disparity at (u, v) where all four neighbours are valid and alike, else NaN."""
    h, w = disp.shape
    u0 = np.floor(u).astype(np.int64)
    v0 = np.floor(v).astype(np.int64)
    inside = (u0 >= 0) & (v0 >= 0) & (u0 < w - 1) & (v0 < h - 1)
    u0 = np.where(inside, u0, 0)
    v0 = np.where(inside, v0, 0)
    a = disp[v0, u0]
    b = disp[v0, u0 + 1]
    c = disp[v0 + 1, u0]
    d = disp[v0 + 1, u0 + 1]
    fu = u - u0
    fv = v - v0
    out = (a * (1 - fu) + b * fu) * (1 - fv) + (c * (1 - fu) + d * fu) * fv
    stack = np.stack([a, b, c, d])
    ok = inside & np.all(stack >= 0, axis=0) & (stack.max(axis=0) - stack.min(axis=0) <= max_step)
    return np.where(ok, out, np.nan)


def pair_depth(
    ref: DenseView,
    src: DenseView,
    ref_photo: np.ndarray,
    src_photo: np.ndarray,
    points: np.ndarray,
    params: SgbmParams,
) -> np.ndarray | None:
    """Camera-z depth of `ref` on its depth grid from stereo with `src` (NaN where unknown)."""
    rect = rectify(ref, src, points, params)
    if rect is None:
        return None
    ref_mx, ref_my = _rect_maps(ref, rect.R, rect.K_ref, rect.size)
    src_mx, src_my = _rect_maps(src, rect.R, rect.K_src, rect.size)
    left = cv2.remap(_prepare(ref_photo, ref, params.scale), ref_mx, ref_my, cv2.INTER_LINEAR)
    right = cv2.remap(_prepare(src_photo, src, params.scale), src_mx, src_my, cv2.INTER_LINEAR)
    right_ok = cv2.remap(
        np.ones(src_photo.shape[:2], np.uint8), src_mx, src_my, cv2.INTER_NEAREST, borderValue=0
    )
    channels = 1 if left.ndim == 2 else left.shape[2]
    bs = params.block_size
    sgbm = cv2.StereoSGBM.create(
        minDisparity=0,
        numDisparities=rect.num_disparities,
        blockSize=bs,
        P1=8 * channels * bs * bs,
        P2=32 * channels * bs * bs,
        disp12MaxDiff=1,
        preFilterCap=63,
        uniquenessRatio=params.uniqueness,
        speckleWindowSize=100,
        speckleRange=2,
        mode=_MODES[params.mode],
    )
    disp = sgbm.compute(left, right).astype(np.float32) / 16.0
    disp[disp <= 0] = -1.0
    # Reject matches that landed outside the partner photo.
    w = disp.shape[1]
    rows, cols = np.nonzero(disp > 0)
    target = np.round(cols - disp[rows, cols]).astype(np.int64)
    bad = (target < 0) | (target >= w)
    bad[~bad] = right_ok[rows[~bad], target[~bad]] == 0
    disp[rows[bad], cols[bad]] = -1.0
    # Back onto the reference depth grid.
    # einsum, not `@`: OpenBLAS threads spinning on shared cores made the matmul 10x slower here.
    r = np.einsum("hwj,ij->hwi", ref.grid_rays(), rect.R @ ref.R.T)
    zr = r[..., 2]
    u = rect.K_ref[0, 0] * r[..., 0] / zr + rect.K_ref[0, 2]
    v = rect.K_ref[1, 1] * r[..., 1] / zr + rect.K_ref[1, 2]
    d = _bilinear_valid(disp, u, v, max_step=1.0) + rect.d0
    with np.errstate(invalid="ignore", divide="ignore"):
        z_rect = rect.K_ref[0, 0] * rect.baseline / d
        depth = z_rect / zr
    depth[~(d > 0)] = np.nan
    return depth.astype(np.float32)
