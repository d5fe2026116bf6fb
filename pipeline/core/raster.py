"""A vectorised software triangle rasteriser: the preview, the texture baker and the held-out
renderer all need triangles turned into pixels on a headless CPU box, with no GL.

Pixel convention is COLMAP's: pixel (x, y) covers [x, x+1) x [y, y+1), its centre is (x+0.5, y+0.5).
`fragments` tests every triangle's bounding-box pixels at once with edge functions, batched by box
size so that memory stays bounded; `zbuffer` does the same tests in a compiled loop. A pixel
belongs to a triangle when its centre is inside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from numba import njit

from scandrop.pipeline.core.stage import StopCheck, check_stop, never_stop

_MAX_CANDIDATES = 4_000_000  # pixel tests per batch: bounds memory


class Fragments(NamedTuple):
    """Pixels covered by triangles, one row per (triangle, pixel)."""

    face: np.ndarray  # (n,) triangle index
    x: np.ndarray  # (n,) pixel column
    y: np.ndarray  # (n,) pixel row
    bary: np.ndarray  # (n, 3) float32 screen-space barycentric weights of the pixel centre


def _edge(u: np.ndarray, v: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (v[..., 0] - u[..., 0]) * (q[..., 1] - u[..., 1]) - (v[..., 1] - u[..., 1]) * (
        q[..., 0] - u[..., 0]
    )


def fragments(
    px: np.ndarray,
    faces: np.ndarray,
    size: tuple[int, int],
    should_stop: StopCheck = never_stop,
    face_ids: np.ndarray | None = None,
) -> Iterator[Fragments]:
    """Batches of the pixels whose centres fall inside each triangle (px: (V, 2) pixel coords).

    `face_ids` restricts rasterisation to those triangles (indices into `faces`).
    """
    width, height = size
    ids_all = np.arange(len(faces)) if face_ids is None else np.asarray(face_ids, dtype=np.int64)
    tri = px[faces[ids_all]]  # (F, 3, 2)
    finite = np.isfinite(tri).all(axis=(1, 2))
    tri = np.where(finite[:, None, None], tri, 0.0)  # unprojectable triangles are skipped below
    lo = np.maximum(np.floor(np.maximum(tri.min(axis=1), -1.0) - 0.5).astype(np.int64), 0)
    hi = np.minimum(np.ceil(np.minimum(tri.max(axis=1), 2.0**40) - 0.5).astype(np.int64) + 1, [width, height])
    extent = (hi - lo).max(axis=1)
    keep = (extent > 0) & finite
    # Boxes grouped by size: exact sides for small triangles (most of a dense mesh), powers of two
    # above, so that few pixels are tested in vain and the groups stay few.
    side = np.where(extent <= 8, extent, 1 << np.ceil(np.log2(np.maximum(extent, 1))).astype(np.int64))
    for s in np.unique(side[keep]):
        ids = np.flatnonzero(keep & (side == s))
        grid = np.stack(np.meshgrid(np.arange(s), np.arange(s), indexing="xy"), axis=-1).reshape(-1, 2)
        gx, gy = grid[:, 0].astype(np.float64), grid[:, 1].astype(np.float64)
        batch = max(1, _MAX_CANDIDATES // (s * s))
        for start in range(0, len(ids), batch):
            check_stop(should_stop)
            f = ids[start : start + batch]
            centre = lo[f] + 0.5  # (n, 2) centre of each box's first pixel
            a, b, c = tri[f, 0], tri[f, 1], tri[f, 2]
            area = _edge(a, b, c)  # (n,)
            # An edge function is linear in the pixel: its value at the first pixel plus steps.
            w = [
                _edge(u, v, centre)[:, None]
                + (v[:, 0] - u[:, 0])[:, None] * gy
                - (v[:, 1] - u[:, 1])[:, None] * gx
                for u, v in ((b, c), (c, a), (a, b))
            ]
            sign = np.where(area >= 0, 1.0, -1.0)[:, None]
            inside = (
                (w[0] * sign >= 0) & (w[1] * sign >= 0) & (w[2] * sign >= 0) & (np.abs(area) > 1e-12)[:, None]
            )
            inside &= (lo[f, 0][:, None] + grid[:, 0] < hi[f, 0][:, None]) & (
                lo[f, 1][:, None] + grid[:, 1] < hi[f, 1][:, None]
            )
            n_idx, k_idx = np.nonzero(inside)
            if len(n_idx) == 0:
                continue
            inv = 1.0 / area[n_idx]
            bary = np.stack(
                [w[0][n_idx, k_idx] * inv, w[1][n_idx, k_idx] * inv, w[2][n_idx, k_idx] * inv], axis=1
            )
            q = lo[f[n_idx]] + grid[k_idx]
            yield Fragments(ids_all[f[n_idx]], q[:, 0], q[:, 1], bary.astype(np.float32))


class ZBuffer(NamedTuple):
    """The nearest triangle per pixel, flattened row-major (H * W)."""

    face: np.ndarray  # (H*W,) int64, -1 where no triangle
    bary: np.ndarray  # (H*W, 3) float32 barycentric weights (perspective-correct when depth > 0)
    depth: np.ndarray  # (H*W,) float64, inf where no triangle
    width: int
    height: int


def zbuffer(
    px: np.ndarray,
    depth: np.ndarray,
    faces: np.ndarray,
    size: tuple[int, int],
    should_stop: StopCheck = never_stop,
    perspective: bool = True,
) -> ZBuffer:
    """Nearest triangle, barycentrics and depth per pixel. `depth` is per vertex (camera z for a
    perspective camera, where barycentrics are corrected so that attributes interpolate in 3D).

    One compiled loop over the triangles (numba): the z-test is a branch per pixel, which arrays
    can only do by sorting every fragment; this is what makes texture baking affordable (a
    visibility pass per photo)."""
    width, height = size
    best = np.full(width * height, np.inf)
    face = np.full(width * height, -1, dtype=np.int64)
    bary = np.zeros((width * height, 3), dtype=np.float32)
    px = np.ascontiguousarray(px, dtype=np.float64)
    depth = np.ascontiguousarray(depth, dtype=np.float64)
    faces = np.ascontiguousarray(faces, dtype=np.int64)
    chunk = 200_000  # triangles between cancellation checks
    for start in range(0, len(faces), chunk):
        check_stop(should_stop)
        _zbuffer_faces(
            px,
            depth,
            faces,
            start,
            min(len(faces), start + chunk),
            width,
            height,
            perspective,
            best,
            face,
            bary,
        )
    return ZBuffer(face, bary, best, width, height)


@njit(cache=True, error_model="numpy")
def _zbuffer_faces(
    px: np.ndarray,
    depth: np.ndarray,
    faces: np.ndarray,
    first: int,
    stop: int,
    width: int,
    height: int,
    perspective: bool,
    best: np.ndarray,
    face: np.ndarray,
    bary: np.ndarray,
) -> None:
    """Z-test triangles first..stop-1 into the buffers; pixel centres and edge rules as `fragments`."""
    for f in range(first, stop):
        ia, ib, ic = faces[f, 0], faces[f, 1], faces[f, 2]
        ax, ay, bx, by, cx, cy = px[ia, 0], px[ia, 1], px[ib, 0], px[ib, 1], px[ic, 0], px[ic, 1]
        if not (np.isfinite(ax) and np.isfinite(ay) and np.isfinite(bx) and np.isfinite(by)):
            continue
        if not (np.isfinite(cx) and np.isfinite(cy)):
            continue
        area = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
        if abs(area) <= 1e-12:
            continue
        sign = 1.0 if area >= 0 else -1.0
        x0 = max(int(np.floor(max(min(ax, bx, cx), -1.0) - 0.5)), 0)
        y0 = max(int(np.floor(max(min(ay, by, cy), -1.0) - 0.5)), 0)
        x1 = min(int(np.ceil(min(max(ax, bx, cx), 2.0**40) - 0.5)) + 1, width)
        y1 = min(int(np.ceil(min(max(ay, by, cy), 2.0**40) - 0.5)) + 1, height)
        za, zb, zc = depth[ia], depth[ib], depth[ic]
        for y in range(y0, y1):
            qy = y + 0.5
            for x in range(x0, x1):
                qx = x + 0.5
                w0 = (cx - bx) * (qy - by) - (cy - by) * (qx - bx)
                w1 = (ax - cx) * (qy - cy) - (ay - cy) * (qx - cx)
                w2 = (bx - ax) * (qy - ay) - (by - ay) * (qx - ax)
                if w0 * sign < 0 or w1 * sign < 0 or w2 * sign < 0:
                    continue
                # float32 weights, as the fragments carry them
                l0 = np.float64(np.float32(w0 / area))
                l1 = np.float64(np.float32(w1 / area))
                l2 = np.float64(np.float32(w2 / area))
                if perspective:
                    l0, l1, l2 = l0 / za, l1 / zb, l2 / zc
                    total = l0 + l1 + l2
                    l0, l1, l2 = l0 / total, l1 / total, l2 / total
                z = l0 * za + l1 * zb + l2 * zc
                pix = y * width + x
                if z < best[pix]:
                    best[pix] = z
                    face[pix] = f
                    bary[pix, 0] = l0
                    bary[pix, 1] = l1
                    bary[pix, 2] = l2


def sample_bilinear(image: np.ndarray, px: np.ndarray) -> np.ndarray:
    """Colours (n, C) float32 at pixel coordinates px (COLMAP convention), edges clamped."""
    h, w = image.shape[:2]
    px = np.nan_to_num(px, nan=0.0)  # unprojectable points read the corner rather than crash
    x = np.clip(px[:, 0] - 0.5, 0.0, w - 1.0)
    y = np.clip(px[:, 1] - 0.5, 0.0, h - 1.0)
    x0 = np.minimum(x.astype(np.int64), w - 2) if w > 1 else np.zeros(len(x), np.int64)
    y0 = np.minimum(y.astype(np.int64), h - 2) if h > 1 else np.zeros(len(y), np.int64)
    fx = (x - x0).astype(np.float32)[:, None]
    fy = (y - y0).astype(np.float32)[:, None]
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    img = image.reshape(h, w, -1).astype(np.float32, copy=False)
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bottom * fy
