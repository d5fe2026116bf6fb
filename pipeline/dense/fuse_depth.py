"""Fuse per-view depth maps into one point cloud, keeping only geometry several views agree on.

Every depth pixel is projected into the depth maps of its most covisible views. A view agrees
when its depth at that spot matches the projected depth within a relative tolerance and its
normal faces the same way. A pixel becomes a point only if at least `min_consistent` other
views agree (single-view errors rarely repeat in other views, so precision stays high). The
point is the mean of the agreeing estimates along the reference ray; the pixels that agreed are
marked used so the same surface is not emitted again by each view that sees it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.live_model import LiveModel, LiveSink, Throttle, build
from scandrop.pipeline.core.pointcloud import PointCloud, save_points
from scandrop.pipeline.core.stage import Progress, StopCheck, check_stop
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.dense.dense_views import DenseView, load_views
from scandrop.pipeline.dense.view_selection import fusion_neighbours


class FuseConfig(BaseModel):
    """Fusion settings; the defaults are the `balanced` preset."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_consistent: int = Field(2, ge=1, le=10, description="Other views that must agree with a pixel.")
    depth_tolerance: float = Field(0.02, gt=0, lt=0.2, description="Relative depth difference that agrees.")
    max_normal_angle_deg: float = Field(90.0, gt=0, le=180, description="Normals further apart disagree.")
    neighbours: int = Field(8, ge=1, le=32, description="Most-overlapping views to check each view with.")
    min_points: int = Field(1000, ge=1, description="Fewer fused points than this fails the stage.")


class FuseResult(BaseModel):
    points: int
    views: int
    agreeing_views: int = Field(description="Other views that had to agree with each point.")
    seconds: float


@dataclass
class _DepthView:
    name: str
    depth: np.ndarray
    normals: np.ndarray  # camera frame
    rgb: np.ndarray
    K: np.ndarray
    R: np.ndarray
    t: np.ndarray
    used: np.ndarray

    @property
    def center(self) -> np.ndarray:
        return -self.R.T @ self.t


def _load(path) -> _DepthView:
    with np.load(path) as data:
        depth = data["depth"].astype(np.float32)
        return _DepthView(
            name=str(data["name"]),
            depth=depth,
            normals=data["normals"].astype(np.float32),
            rgb=data["rgb"],
            K=data["K"].astype(np.float64),
            R=data["R"].astype(np.float64),
            t=data["t"].astype(np.float64),
            used=np.zeros(depth.shape, bool),
        )


def _fuse_view(
    ref: _DepthView, others: list[_DepthView], config: FuseConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fused points, normals and colours contributed by one reference view."""
    vs, us = np.nonzero((ref.depth > 0) & ~ref.used)
    if len(us) == 0:
        return np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3))
    d = ref.depth[vs, us].astype(np.float64)
    rays = np.stack([(us - ref.K[0, 2]) / ref.K[0, 0], (vs - ref.K[1, 2]) / ref.K[1, 1], np.ones(len(us))], 1)
    world = (rays * d[:, None] - ref.t) @ ref.R  # R^T (x - t)
    n_ref = ref.normals[vs, us].astype(np.float64) @ ref.R  # camera -> world
    depth_sum = d.copy()
    normal_sum = n_ref.copy()
    rgb_sum = ref.rgb[vs, us].astype(np.float64)
    agree = np.zeros(len(us), np.int32)
    cos_max = np.cos(np.radians(config.max_normal_angle_deg))
    hits: list[tuple[_DepthView, np.ndarray, np.ndarray, np.ndarray]] = []
    for other in others:
        cam = world @ other.R.T + other.t
        z = cam[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.rint(other.K[0, 0] * cam[:, 0] / z + other.K[0, 2])
            v = np.rint(other.K[1, 1] * cam[:, 1] / z + other.K[1, 2])
        h, w = other.depth.shape
        ok = (z > 0) & (u >= 0) & (v >= 0) & (u < w) & (v < h)
        idx = np.nonzero(ok)[0]
        ui = u[idx].astype(np.int64)
        vi = v[idx].astype(np.int64)
        dj = other.depth[vi, ui]
        good = (dj > 0) & (np.abs(dj - z[idx]) <= config.depth_tolerance * z[idx])
        idx, ui, vi, dj = idx[good], ui[good], vi[good], dj[good]
        n_other = other.normals[vi, ui].astype(np.float64) @ other.R
        good = np.sum(n_other * n_ref[idx], axis=1) >= cos_max
        idx, ui, vi, dj, n_other = idx[good], ui[good], vi[good], dj[good], n_other[good]
        if len(idx) == 0:
            continue
        # The other view's estimate: slide the point along that view's ray to its measured depth.
        center = other.center
        moved = center + (world[idx] - center) * (dj / z[idx])[:, None]
        depth_sum[idx] += (moved @ ref.R[2]) + ref.t[2]
        normal_sum[idx] += n_other
        rgb_sum[idx] += other.rgb[vi, ui]
        agree[idx] += 1
        hits.append((other, idx, vi, ui))
    keep = agree >= config.min_consistent
    for other, idx, vi, ui in hits:
        sel = keep[idx]
        other.used[vi[sel], ui[sel]] = True
    count = (agree[keep] + 1).astype(np.float64)[:, None]
    depth = depth_sum[keep] / count[:, 0]
    points = (rays[keep] * depth[:, None] - ref.t) @ ref.R
    normals = normal_sum[keep]
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    colours = rgb_sum[keep] / count
    return points, normals, colours


def _snapshot(views: list[DenseView], chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> LiveModel:
    """The cameras and the points fused so far, for the live view."""
    xyz = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros((0, 3))
    rgb = np.clip(np.rint(np.concatenate([c[2] for c in chunks])), 0, 255) if chunks else np.zeros((0, 3))
    return build(
        "dense",
        np.stack([-v.R.T @ v.t for v in views]),
        np.stack([v.R.T for v in views]),
        np.array([(v.grid_size[0] / (2 * v.K[0, 0]), v.grid_size[1] / (2 * v.K[1, 1])) for v in views]),
        xyz,
        rgb,
    )


def run(
    config: FuseConfig,
    ws: Workspace,
    progress: Progress,
    should_stop: StopCheck,
    live: LiveSink | None = None,
) -> FuseResult:
    """Fuse ws.depth_dir/*.npz into ws.fused (world frame, outward normals, colours).

    `live` gets the dense points fused so far with the cameras, at most every SNAPSHOT_SECONDS, and
    all of them (subsampled to MAX_POINTS) at the end."""
    start = time.monotonic()
    views = load_views(ws.sparse_dir, 64)
    neighbours = fusion_neighbours(views, config.neighbours)
    depth_views: dict[str, _DepthView] = {}
    for view in views:
        path = ws.depth_dir / f"{view.name}.npz"
        if path.exists():
            depth_views[view.name] = _load(path)
    if len(depth_views) < 2:
        raise ScandropError(
            ErrorCode.dense_failed,
            f"Depth could be measured in only {len(depth_views)} photo(s); at least 2 are needed to"
            " cross-check it.",
            "Take more photos that overlap, each a small step (about 10 degrees) around the object.",
        )
    # A set of 2-3 photos cannot give min_consistent other views: it cross-checks with what it has
    # (the 3-view barn had depth in 2 views and failed here with no model at all).
    config = config.model_copy(update={"min_consistent": min(config.min_consistent, len(depth_views) - 1)})
    chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    throttle = Throttle()
    order = [i for i, v in enumerate(views) if v.name in depth_views]
    for k, i in enumerate(order):
        check_stop(should_stop)
        ref = depth_views[views[i].name]
        others = [depth_views[views[j].name] for j in neighbours[i] if views[j].name in depth_views]
        chunks.append(_fuse_view(ref, others, config))
        said = (k + 1) / len(order), f"fusing {k + 1}/{len(order)}: {ref.name}"
        if live is not None and throttle.due(force=k + 1 == len(order)):
            live(*said, _snapshot(views, chunks))
        else:
            progress(*said)
    xyz = np.concatenate([c[0] for c in chunks]).astype(np.float32)
    if len(xyz) < config.min_points:
        raise ScandropError(
            ErrorCode.dense_failed,
            f"Only {len(xyz)} dense points agree across views; at least {config.min_points} are needed.",
            "Photograph a textured object from more positions; plain or shiny surfaces cannot be matched.",
        )
    normals = np.concatenate([c[1] for c in chunks]).astype(np.float32)
    rgb = np.clip(np.rint(np.concatenate([c[2] for c in chunks])), 0, 255).astype(np.uint8)
    save_points(ws.fused, PointCloud(xyz=xyz, normals=normals, rgb=rgb))
    return FuseResult(
        points=len(xyz),
        views=len(order),
        agreeing_views=config.min_consistent,
        seconds=round(time.monotonic() - start, 2),
    )
