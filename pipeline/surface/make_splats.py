"""Stage: fused points -> Gaussian splats (ws.splats), initialised from the dense geometry.

Training splats against the photos needs a GPU rasteriser (gsplat has no CPU backend), so on a
CPU this stage does what 3DGS does before optimisation, but from the dense points instead of
the sparse ones: one splat per (voxel-downsampled) point, shaped by its neighbourhood. The
covariance of the k nearest neighbours gives the two tangent directions and spreads; the
normal direction is kept thin, so splats lie flat on the surface. The result says plainly
that nothing was optimised.
"""

from __future__ import annotations

import time

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.spatial import cKDTree

from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.pointcloud import PointCloud, load_points
from scandrop.pipeline.core.rotations import rotation_to_quat_wxyz
from scandrop.pipeline.core.stage import Progress, StopCheck, atomic_path, check_stop
from scandrop.pipeline.core.workspace import Workspace

METHOD = "initialised from dense points (kNN covariance); not optimised against photos"
_CHUNK = 100_000


class SplatConfig(BaseModel):
    """How splats are initialised. Defaults are the balanced preset."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_splats: int = Field(300_000, ge=1, description="Voxel-downsample the points to at most this many.")
    neighbours: int = Field(16, ge=4, le=64, description="k nearest neighbours that shape each splat.")
    thickness: float = Field(
        0.15, gt=0.0, le=1.0, description="Normal-axis scale as a share of tangent scale."
    )
    opacity: float = Field(0.9, gt=0.0, lt=1.0, description="Opacity of every splat (not optimised).")
    max_scale_factor: float = Field(
        4.0, gt=0.0, description="Clamp tangent scales to this x the median neighbour spacing."
    )


class SplatResult(BaseModel):
    splats: int
    input_points: int
    voxel_size: float
    opacity: float
    median_scale: float
    method: str = METHOD
    seconds: float


def voxel_downsample(cloud: PointCloud, max_points: int) -> tuple[PointCloud, float]:
    """Average points per voxel, growing the voxel until at most `max_points` remain (0: no change)."""
    n = len(cloud)
    if n <= max_points:
        return cloud, 0.0
    lo, hi = cloud.xyz.min(axis=0), cloud.xyz.max(axis=0)
    extent = float((hi - lo).max())
    # Start from the voxel that would hold the points on a surface: area ~ extent^2.
    voxel = max(extent / np.sqrt(max_points), extent / 2**20)
    for _ in range(30):
        cells = np.floor((cloud.xyz - lo) / voxel).astype(np.int64)
        keys = (cells[:, 0] << 42) | (cells[:, 1] << 21) | cells[:, 2]  # < 2^21 cells per axis
        _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        if len(counts) <= max_points:
            break
        voxel *= 1.15
    inverse = inverse.ravel()
    m = len(counts)

    def mean(values: np.ndarray) -> np.ndarray:
        out = np.zeros((m, values.shape[1]), dtype=np.float64)
        np.add.at(out, inverse, values)
        return out / counts[:, None]

    normals = mean(cloud.normals.astype(np.float64))
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    rgb = np.clip(np.rint(mean(cloud.rgb.astype(np.float64))), 0, 255).astype(np.uint8)
    return PointCloud(
        xyz=mean(cloud.xyz.astype(np.float64)).astype(np.float32), normals=normals.astype(np.float32), rgb=rgb
    ), voxel


def splat_shapes(
    cloud: PointCloud, config: SplatConfig, should_stop: StopCheck
) -> tuple[np.ndarray, np.ndarray]:
    """Linear scales (N, 3) and rotations wxyz (N, 4) from each point's k-neighbour covariance.

    Local axes are the covariance eigenvectors, largest spread first; the third (normal) axis is
    made thin. The rotation's columns are those axes, so scale i applies along column i.
    """
    xyz = cloud.xyz.astype(np.float64)
    k = min(config.neighbours, len(xyz))
    tree = cKDTree(xyz)
    scales = np.empty((len(xyz), 3))
    quats = np.empty((len(xyz), 4))
    nn_dist = np.empty(len(xyz))
    for start in range(0, len(xyz), _CHUNK):
        check_stop(should_stop)
        sl = slice(start, start + _CHUNK)
        dist, idx = tree.query(xyz[sl], k=k, workers=-1)
        nbrs = xyz[idx.reshape(-1, k)]
        centred = nbrs - nbrs.mean(axis=1, keepdims=True)
        cov = np.einsum("nki,nkj->nij", centred, centred) / k
        evals, evecs = np.linalg.eigh(cov)  # ascending
        evals, evecs = evals[:, ::-1], evecs[:, :, ::-1]
        # Right-handed frame: third axis = first x second.
        evecs[:, :, 2] = np.cross(evecs[:, :, 0], evecs[:, :, 1])
        quats[sl] = rotation_to_quat_wxyz(evecs)
        scales[sl] = np.sqrt(np.maximum(evals, 0.0))
        nn_dist[sl] = dist.reshape(-1, k)[:, min(1, k - 1)]
    spacing = float(np.median(nn_dist)) if len(nn_dist) else 0.0
    floor = max(spacing * 0.5, 1e-9)
    tangent = np.clip(scales[:, :2], floor, max(config.max_scale_factor * spacing, floor))
    scales[:, :2] = tangent
    scales[:, 2] = config.thickness * tangent[:, 1]
    return scales, quats


def run(config: SplatConfig, ws: Workspace, progress: Progress, should_stop: StopCheck) -> SplatResult:
    """Write ws.splats (npz: xyz, scales linear, quats wxyz, rgb uint8, opacity) from ws.fused."""
    t0 = time.perf_counter()
    if not ws.fused.exists():
        raise ScandropError(
            ErrorCode.dense_failed, "The dense point cloud is missing.", "Run the dense stages first."
        )
    cloud = load_points(ws.fused)
    finite = np.isfinite(cloud.xyz).all(axis=1)
    cloud = PointCloud(xyz=cloud.xyz[finite], normals=cloud.normals[finite], rgb=cloud.rgb[finite])
    if len(cloud) < 4:
        raise ScandropError(
            ErrorCode.dense_failed,
            f"Only {len(cloud)} dense points: too few for splats.",
            "Take more photos with more overlap.",
        )
    progress(0.05, f"Downsampling {len(cloud)} points to at most {config.max_splats} splats")
    small, voxel = voxel_downsample(cloud, config.max_splats)
    check_stop(should_stop)
    progress(0.3, f"Shaping {len(small)} splats from their neighbours")
    scales, quats = splat_shapes(small, config, should_stop)
    opacity = np.full(len(small), config.opacity, dtype=np.float32)
    with atomic_path(ws.splats) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            xyz=small.xyz.astype(np.float32),
            scales=scales.astype(np.float32),
            quats=quats.astype(np.float32),
            rgb=small.rgb.astype(np.uint8),
            opacity=opacity,
        )
    progress(1.0, f"{len(small)} splats initialised")
    return SplatResult(
        splats=len(small),
        input_points=len(cloud),
        voxel_size=voxel,
        opacity=config.opacity,
        median_scale=float(np.median(scales[:, 0])),
        seconds=round(time.perf_counter() - t0, 3),
    )
