"""Photometric refinement of the mesh against the photos at their full resolution.

Poisson meshes fused depth points, and both smooth: on the relief benchmark the balanced mesh sits a
median 0.38 photo pixels from the true surface, and a held-out view then reads each photo a fraction
of a pixel off. OpenMVS refines its mesh against the photos for the same reason (RefineMesh); this
is a light CPU form of it:
1. each vertex takes the photo that sees it largest (visible in a z-buffer of the mesh, facing the
   camera, foreshortening and distance counted) as its reference, and that photo's multi-view
   stereo sources in which the vertex is visible as its sources;
2. the vertex's tangent plane (its normal) is slid along the normal, each position scored by the
   PatchMatch cost (1 - NCC of plane-warped 5x5 windows, the mean of the best 2 sources;
   `patchmatch_kernel`) at the photos' full resolution; a parabola through the best position and
   its neighbours places the minimum between them;
3. the shifts, weighted by how well the best position matched (0 where it was flat, at the end of
   the range or over the cost bar), are smoothed over the mesh (a screened Laplacian solve), so a
   vertex with no clear answer follows its neighbours and none jumps alone.
Three rounds, +-4, +-2 and +-1 pixels of disparity in steps of 1, 1/2 and 1/4 pixel, each with the
normals of the mesh the round before left (a first range of +-2 pixels left the vertices that were
farther off where they were). Which photos see a vertex is decided once, by z-buffers of the input.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from numba import njit, prange
from pydantic import BaseModel
from scipy import sparse
from scipy.sparse.linalg import cg

from scandrop.pipeline.core import raster
from scandrop.pipeline.core.pointcloud import farthest_points, vertex_normals
from scandrop.pipeline.core.stage import Progress, StopCheck, check_stop
from scandrop.pipeline.dense import patchmatch_kernel as kernel
from scandrop.pipeline.dense.dense_views import DenseView, load_views
from scandrop.pipeline.dense.patchmatch_cpu import (
    NO_GEOMETRY,
    grey_on_grid,
    plane_warps,
    relative_pose,
    source_stack,
)
from scandrop.pipeline.dense.view_selection import mvs_sources

_SOURCES = 5  # multi-view stereo sources of each reference photo (balanced's pm_sources)
_BEST_K = 2  # a position's cost is the mean of its best 2 sources, as in PatchMatch
_HALF, _STEP = 2, 1  # 5x5 windows of the full-resolution photo
_MIN_TEXTURE = 1.5  # grey-level std below which a window says nothing (PatchMatch's min_texture)
_MAX_COST = 0.5  # PatchMatch's cost bar: a worse best position is no measurement
_MIN_COS = 0.3  # a photo sees a vertex at most ~72 degrees off its normal
_ROUNDS_PX = (4.0, 2.0, 1.0)  # half-range of each round, in pixels of disparity
_STEPS = 4  # positions tried on each side: steps of 1, 1/2, then 1/4 of a pixel
_ANGLES_DEG = (3.0, 40.0, 60.0)  # a source's triangulation angle: least, most, most for a lone view
_MAX_VIEWS = 80  # photos used, spread over the camera positions (a video's keyframes are many)
_SMOOTH = 0.3  # Laplacian weight against a fully trusted measurement


class RefineStats(BaseModel):
    vertices: int
    measured: float  # share of vertices with a measurement in the last round
    median_shift_px: float  # median |shift| of the measured vertices in the last round, in pixels
    seconds: float


def _visible_vertices(
    vertices: np.ndarray, normals: np.ndarray, faces: np.ndarray, view: DenseView, should_stop: StopCheck
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mask, camera z, cosine between normal and direction to the camera) of the vertices: the
    mask holds those this view sees in front, facing it, with a whole window inside the photo."""
    cam = vertices @ view.R.T + view.t
    z = cam[:, 2]
    safe = np.where(z > 1e-9, z, 1.0)
    px = (cam[:, :2] / safe[:, None]) * np.diag(view.K)[:2] + view.K[:2, 2]
    width, height = view.grid_size
    margin = _HALF * _STEP + 2
    ok = (z > 1e-9) & (px[:, 0] >= margin) & (px[:, 1] >= margin)
    ok &= (px[:, 0] < width - 1 - margin) & (px[:, 1] < height - 1 - margin)
    to_cam = view.center - vertices
    cos = np.einsum("ij,ij->i", normals, to_cam) / np.linalg.norm(to_cam, axis=1)
    ok &= cos > _MIN_COS
    # The z-buffer uses COLMAP's pixel convention (centres at +0.5); K has OpenCV's.
    zb = raster.zbuffer(np.where(z[:, None] > 1e-9, px + 0.5, np.nan), z, faces, (width, height), should_stop)
    ix = np.clip(np.rint(px[:, 0]).astype(np.int64), 0, width - 1)
    iy = np.clip(np.rint(px[:, 1]).astype(np.int64), 0, height - 1)
    front = zb.depth[iy * width + ix]
    ok &= z <= front * 1.002 + 1e-9
    return ok, z, cos


@njit(cache=True, fastmath=True, parallel=True, nogil=True)
def _best_shifts(
    pixels: np.ndarray,
    depth: np.ndarray,
    normal: np.ndarray,
    masks: np.ndarray,
    step_z: np.ndarray,
    steps: int,
    ref: np.ndarray,
    warp: tuple,
    best_k: int,
    min_texture: float,
    shift: np.ndarray,
    cost: np.ndarray,
) -> None:
    """Per vertex: the depth change at its reference pixel (along the plane's normal) whose plane
    matches the sources best, within +-steps * step_z, and that position's cost (INVALID_COST: none).
    `warp` is (source stack, source (h, w), A, b, NO_GEOMETRY's four, Kinv) as
    patchmatch_kernel.source_costs takes them: the photometric cost alone."""
    srcs, src_hw, A, b, geo, geo_P, geo_weight, geo_max, kinv = warp
    for i in prange(pixels.shape[0]):
        u, v = pixels[i, 0], pixels[i, 1]
        mean, std = kernel.window_stats(ref, u, v, _HALF, _STEP)
        shift[i] = 0.0
        cost[i] = kernel.INVALID_COST
        if std < min_texture:
            continue
        costs = np.empty(srcs.shape[0])
        curve = np.empty(2 * steps + 1)
        best = 0
        for k in range(2 * steps + 1):
            z = depth[i] + (k - steps) * step_z[i]
            curve[k] = kernel.INVALID_COST
            if z > 0.0:
                kernel.source_costs(
                    u, v, z, normal[i, 0], normal[i, 1], normal[i, 2], ref, mean, std, srcs, src_hw, A, b,
                    geo, geo_P, geo_weight, geo_max, kinv, _HALF, _STEP, masks[i], costs,
                )  # fmt: skip
                curve[k] = kernel.mean_of_best(costs, best_k)
            if curve[k] < curve[best]:
                best = k
        if best == 0 or best == 2 * steps or curve[best] >= kernel.INVALID_COST:
            continue  # the minimum is at the end of the range: the surface lies beyond it
        lo, mid, hi = curve[best - 1], curve[best], curve[best + 1]
        bend = lo - 2.0 * mid + hi
        offset = 0.5 * (lo - hi) / bend if bend > 1e-9 else 0.0
        shift[i] = (best - steps + offset) * step_z[i]
        cost[i] = mid


def _visibility(
    vertices: np.ndarray, faces: np.ndarray, views: list[DenseView], tick: Progress, should_stop: StopCheck
) -> tuple[np.ndarray, np.ndarray]:
    """(views, V) which photos see each vertex, and (V,) its reference photo (-1: none): the one
    that sees it largest (foreshortening and distance)."""
    normals = vertex_normals(vertices, faces)
    seen = np.zeros((len(views), len(vertices)), dtype=bool)
    best = np.zeros(len(vertices))
    reference = np.full(len(vertices), -1, dtype=np.int64)
    for i, view in enumerate(views):
        check_stop(should_stop)
        ok, z, cos = _visible_vertices(vertices, normals, faces, view, should_stop)
        seen[i] = ok
        score = np.where(ok, cos * view.K[0, 0] / np.maximum(z, 1e-12), 0.0)
        better = score > best
        best[better], reference[better] = score[better], i
        tick(i + 1, f"which photos see the mesh: {i + 1} of {len(views)}")
    return seen, reference


def _measure(
    vertices: np.ndarray,
    normals: np.ndarray,
    seen: np.ndarray,
    reference: np.ndarray,
    views: list[DenseView],
    sources: list[list[int]],
    image_dir: Path,
    half_range_px: float,
    tick: Progress,
    should_stop: StopCheck,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per vertex: its shift along its normal (world units), the weight of that measurement, and
    its shift in pixels of disparity."""
    n = len(vertices)
    tau = np.zeros(n)
    weight = np.zeros(n)
    shift_px = np.zeros(n)
    for r, view in enumerate(views):
        tick(r + 1, f"photo {r + 1} of {len(views)}")
        if not sources[r]:
            continue
        idx = np.flatnonzero(reference == r)
        srcs_of = sources[r]
        masks = np.zeros(len(idx), dtype=np.uint16)
        for s, j in enumerate(srcs_of):
            masks |= seen[j, idx].astype(np.uint16) << s
        idx, masks = idx[masks > 0], masks[masks > 0]
        if len(idx) == 0:
            continue
        check_stop(should_stop)
        ref = np.array(grey_on_grid(view, image_dir))  # writable: one array type for numba
        stack, src_hw = source_stack([grey_on_grid(views[j], image_dir) for j in srcs_of])
        kinv = np.linalg.inv(view.K)
        rel = [relative_pose(view, views[j]) for j in srcs_of]
        A, b = plane_warps(kinv, [views[j].K for j in srcs_of], rel)
        n_cam = normals[idx] @ view.R.T
        x_cam = vertices[idx] @ view.R.T + view.t
        uv = np.rint(x_cam[:, :2] / x_cam[:, 2:] * np.diag(view.K)[:2] + view.K[:2, 2]).astype(np.int64)
        rays = np.column_stack([uv, np.ones(len(uv))]) @ kinv.T  # z = 1 rays of those pixels
        facing = np.einsum("ij,ij->i", n_cam, rays)
        front = facing < -1e-9  # the normal faces the camera at that pixel: the plane has a depth
        idx, masks, uv, n_cam, x_cam, facing = (a[front] for a in (idx, masks, uv, n_cam, x_cam, facing))
        plane_depth = np.einsum("ij,ij->i", n_cam, x_cam) / facing
        # One pixel of disparity against the median source: dz = z^2 / (f B).
        baseline = float(np.median([np.linalg.norm(t) for _, t in rel]))
        px_depth = plane_depth**2 / (view.K[0, 0] * baseline)
        shift = np.empty(len(idx))
        cost = np.empty(len(idx))
        step_z = px_depth * half_range_px / _STEPS
        _best_shifts(
            uv, plane_depth, n_cam, masks, step_z, _STEPS, ref, (stack, src_hw, A, b, *NO_GEOMETRY, kinv),
            min(_BEST_K, len(srcs_of)), _MIN_TEXTURE, shift, cost,
        )  # fmt: skip
        good = cost < _MAX_COST
        # Moving the plane by dz at the pixel moves it by dz * (n . ray) along its normal.
        tau[idx] = np.where(good, shift * facing, 0.0)
        weight[idx] = np.where(good, 1.0 - cost / _MAX_COST, 0.0)
        shift_px[idx] = np.where(good, shift / px_depth, 0.0)
    return tau, weight, shift_px


def _laplacian(faces: np.ndarray, n: int) -> sparse.csr_matrix:
    """The mesh's graph Laplacian (degree minus adjacency), once per mesh: its topology is fixed."""
    rows = faces[:, [0, 1, 2, 1, 2, 0]].ravel().astype(np.int32)
    cols = faces[:, [1, 2, 0, 0, 1, 2]].ravel().astype(np.int32)
    adjacency = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, n))
    adjacency.data[:] = 1.0  # an edge of two faces was summed twice
    return (sparse.diags(np.asarray(adjacency.sum(axis=1)).ravel()) - adjacency).tocsr()


def _smooth(tau: np.ndarray, weight: np.ndarray, laplacian: sparse.csr_matrix) -> np.ndarray:
    """Shifts that agree with the weighted measurements and vary smoothly over the mesh:
    (W + s L + eps I) x = W tau."""
    system = sparse.diags(weight + 1e-3) + _SMOOTH * laplacian
    solution, _ = cg(system, weight * tau, x0=tau, rtol=1e-6, maxiter=300)
    return solution


def refine(
    vertices: np.ndarray,
    faces: np.ndarray,
    sparse_dir: Path,
    image_dir: Path,
    progress: Progress,
    should_stop: StopCheck,
) -> tuple[np.ndarray, RefineStats]:
    """The mesh's vertices moved along their normals to where the photos agree best."""
    start = time.perf_counter()
    views = load_views(sparse_dir, 1 << 30)  # the photos' full resolution
    views = [views[i] for i in farthest_points(np.array([v.center for v in views]), _MAX_VIEWS)]
    sources, _ = mvs_sources(views, _SOURCES, *_ANGLES_DEG)
    moved = np.asarray(vertices, dtype=np.float64).copy()
    steps = len(views) * (1 + len(_ROUNDS_PX))  # progress: a photo's z-buffer, then its rounds
    # Which photos see a vertex does not change with sub-pixel moves: one z-buffer per photo.
    seen, reference = _visibility(moved, faces, views, lambda i, m: progress(i / steps, m), should_stop)
    laplacian = _laplacian(faces, len(moved))
    weight = shift_px = np.zeros(0)
    for k, half_range in enumerate(_ROUNDS_PX):
        normals = vertex_normals(moved, faces)
        said = f"refining the mesh against the photos, round {k + 1} of {len(_ROUNDS_PX)}"
        done = len(views) * (k + 1)
        tau, weight, shift_px = _measure(
            moved, normals, seen, reference, views, sources, image_dir, half_range,
            lambda i, m, done=done, said=said: progress((done + i) / steps, f"{said}: {m}"), should_stop,
        )  # fmt: skip
        moved += _smooth(tau, weight, laplacian)[:, None] * normals
    measured = weight > 0
    return moved, RefineStats(
        vertices=len(moved),
        measured=round(float(measured.mean()), 4) if len(moved) else 0.0,
        median_shift_px=round(float(np.median(np.abs(shift_px[measured]))), 4) if measured.any() else 0.0,
        seconds=round(time.perf_counter() - start, 2),
    )


def warm_kernels() -> None:
    """Compile (or load from numba's cache) this module's kernel on a tiny textured plane, with the
    array types `refine` uses (pipeline/warm_kernels.py)."""
    h, w = 16, 16
    ref = np.random.default_rng(0).uniform(0.0, 255.0, (h, w)).astype(np.float32)
    stack = np.zeros((1, h + 1, w + 1), np.float32)
    stack[0, :h, :w] = np.roll(ref, -1, axis=1)
    K = np.array([[16.0, 0.0, 7.5], [0.0, 16.0, 7.5], [0.0, 0.0, 1.0]])
    kinv = np.linalg.inv(K)
    A = (K @ kinv)[None]
    b = (K @ np.array([-0.125, 0.0, 0.0]))[None]
    one = np.ones(1)
    _best_shifts(
        np.array([[8, 8]], np.int64), 2.0 * one, np.array([[0.0, 0.0, -1.0]]), np.ones(1, np.uint16),
        0.1 * one, _STEPS, ref, (stack, np.array([[h, w]], np.int64), A, b, *NO_GEOMETRY, kinv), 1,
        _MIN_TEXTURE, np.empty(1), np.empty(1),
    )  # fmt: skip
