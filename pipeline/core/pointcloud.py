"""The dense point cloud as stages exchange it (positions, unit normals, 8-bit colours), and the
small geometry helpers several stages share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scandrop.pipeline.core.stage import atomic_path


@dataclass(frozen=True)
class PointCloud:
    xyz: np.ndarray  # (N, 3) float32, scandrop world frame
    normals: np.ndarray  # (N, 3) float32, unit length, pointing out of the surface
    rgb: np.ndarray  # (N, 3) uint8

    def __len__(self) -> int:
        return int(self.xyz.shape[0])


def save_points(path: Path, cloud: PointCloud) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            xyz=cloud.xyz.astype(np.float32),
            normals=cloud.normals.astype(np.float32),
            rgb=cloud.rgb.astype(np.uint8),
        )


def load_points(path: Path) -> PointCloud:
    with np.load(path) as data:
        return PointCloud(xyz=data["xyz"], normals=data["normals"], rgb=data["rgb"])


def farthest_points(points: np.ndarray, most: int) -> list[int]:
    """Indices (ascending) of at most `most` of the points, spread over them by farthest-point
    sampling: camera centres of a video's many neighbouring keyframes, thinned to a few that still
    surround the subject."""
    if len(points) <= most:
        return list(range(len(points)))
    chosen = [0]
    dist = np.linalg.norm(points - points[0], axis=1)
    for _ in range(most - 1):
        chosen.append(int(dist.argmax()))
        dist = np.minimum(dist, np.linalg.norm(points - points[chosen[-1]], axis=1))
    return sorted(chosen)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit normals of a triangle mesh's vertices (zero where a vertex has no area)."""
    tri = vertices[faces]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    corners = faces.ravel()
    summed = np.stack(
        [np.bincount(corners, np.repeat(cross[:, k], 3), minlength=len(vertices)) for k in range(3)], axis=1
    )
    length = np.linalg.norm(summed, axis=1, keepdims=True)
    return summed / np.where(length > 0, length, 1.0)
