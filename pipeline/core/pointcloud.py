"""The dense point cloud as stages exchange it: positions, unit normals, 8-bit colours."""

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
