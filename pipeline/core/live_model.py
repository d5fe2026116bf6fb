"""A bounded snapshot of a model while a job builds it, for a person watching the job (never an output).

The sparse stage sends one each time photos are placed (at most every `SNAPSHOT_SECONDS`), the
fusion stage one as its dense points grow: the cameras placed so far and at most `MAX_POINTS`
points, in the scandrop world frame as far as it is known (while photos are still being placed, the
frame is estimated from the partial model the way the finished model's is). Arrays travel as base64
of little-endian float32 / uint8: about 20 bytes a point and 48 a camera on the wire, so a full
snapshot is at most about 124 KB.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from scandrop.pipeline.core.rotations import rotation_to_quat_wxyz

MAX_POINTS = 5000  # points in one snapshot: enough to see the shape, ~100 KB on the wire
MAX_CAMERAS = 500  # cameras in one snapshot (evenly chosen beyond that); `cameras` counts them all
SNAPSHOT_SECONDS = 1.5  # a stage sends at most one snapshot this often (and always its last one)
CAMERA_FLOATS = 9  # centre xyz, camera-to-world quaternion xyzw, tan of the half field of view x, y


class LiveModel(BaseModel):
    """The model so far: cameras and a subsample of the points, in the job's world frame."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["sparse", "dense"]
    cameras: int = Field(description="Photos placed so far (camera_data holds at most MAX_CAMERAS).")
    points_total: int = Field(description="Points in the model so far (points holds at most MAX_POINTS).")
    camera_data: str = Field(
        description="base64 float32 LE, 9 per camera: centre xyz, camera-to-world rotation as a quaternion "
        "x, y, z, w (COLMAP camera axes: x right, y down, z forward), tan of half the field of view in x, y."
    )
    points: str = Field(description="base64 float32 LE, xyz per point.")
    colors: str = Field(description="base64 uint8, rgb per point.")

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cameras (N, 9), points (M, 3), colours (M, 3)) as numpy arrays."""
        cams = np.frombuffer(base64.b64decode(self.camera_data), dtype="<f4").reshape(-1, CAMERA_FLOATS)
        xyz = np.frombuffer(base64.b64decode(self.points), dtype="<f4").reshape(-1, 3)
        rgb = np.frombuffer(base64.b64decode(self.colors), dtype=np.uint8).reshape(-1, 3)
        return cams, xyz, rgb


LiveSink = Callable[[float, str, LiveModel], None]
"""A stage's progress (fraction, message) together with a snapshot of its model."""


def subsample(ids: np.ndarray, cap: int) -> np.ndarray:
    """Indices of at most `cap` of the items, chosen by a hash of their stable ids.

    As a model grows, a point once chosen stays chosen until `cap` points hash lower: successive
    snapshots show mostly the same points (no flicker), and the choice is spread over the model.
    """
    if len(ids) <= cap:
        return np.arange(len(ids))
    hashed = (ids.astype(np.uint64) * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)
    return np.sort(np.argpartition(hashed, cap)[:cap])


def build(
    kind: Literal["sparse", "dense"],
    centres: np.ndarray,
    world_from_cam: np.ndarray,
    half_fov_tan: np.ndarray,
    xyz: np.ndarray,
    rgb: np.ndarray,
    points_total: int | None = None,
) -> LiveModel:
    """A snapshot of `centres` (N, 3), rotations (N, 3, 3), tan half fields of view (N, 2) and
    points (M, 3) with colours (M, 3); points beyond MAX_POINTS are subsampled here."""
    n = len(centres)
    keep_cams = np.unique(np.linspace(0, n - 1, MAX_CAMERAS).round().astype(int)) if n > MAX_CAMERAS else None
    if keep_cams is not None:
        centres, world_from_cam, half_fov_tan = (
            centres[keep_cams],
            world_from_cam[keep_cams],
            half_fov_tan[keep_cams],
        )
    xyzw = [1, 2, 3, 0]
    quats = rotation_to_quat_wxyz(world_from_cam)[:, xyzw] if len(centres) else np.zeros((0, 4))
    cams = np.concatenate([centres, quats, half_fov_tan], axis=1) if len(centres) else np.zeros((0, 9))
    total = len(xyz) if points_total is None else points_total
    if len(xyz) > MAX_POINTS:
        chosen = subsample(np.arange(len(xyz)), MAX_POINTS)
        xyz, rgb = xyz[chosen], rgb[chosen]
    return LiveModel(
        kind=kind,
        cameras=n,
        points_total=total,
        camera_data=_b64(cams.astype("<f4")),
        points=_b64(np.asarray(xyz, dtype="<f4")),
        colors=_b64(np.asarray(rgb, dtype=np.uint8)),
    )


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


class Throttle:
    """At most one snapshot every `seconds`: `due()` says whether to make one now."""

    def __init__(self, seconds: float = SNAPSHOT_SECONDS) -> None:
        self.seconds = seconds
        self.last = -float("inf")

    def due(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self.last >= self.seconds:
            self.last = now
            return True
        return False
