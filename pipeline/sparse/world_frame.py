"""The scandrop world frame: +y up, origin at the scene centre, scene radius about 1.

Up comes from the cameras: people hold cameras upright and orbit objects on a roughly horizontal
circle, so the normal of the plane through the camera centres (when they spread in 2D) or else the
mean of the cameras' own up vectors is the scene's up. The viewing direction of the average camera
becomes -z, so a viewer's default front view looks the way the photographer did.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pycolmap


@dataclass(frozen=True)
class WorldFrame:
    scale: float
    rotation: np.ndarray  # new_from_old rotation
    translation: np.ndarray
    method: str

    def sim3d(self) -> pycolmap.Sim3d:
        return pycolmap.Sim3d(self.scale, pycolmap.Rotation3d(self.rotation), self.translation)


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-12 else v


def up_from_cameras(rotations: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, str]:
    """Estimate the world up vector from world-to-camera rotations (N,3,3) and centres (N,3)."""
    camera_up = _unit(-rotations[:, 1, :].mean(axis=0))  # OpenCV: camera y points down
    if len(centres) >= 4:
        _, s, vt = np.linalg.svd(centres - centres.mean(axis=0))
        planar = s[1] > 0.3 * s[0] and s[2] < 0.35 * s[1]
        normal = vt[2]
        if planar and abs(float(normal @ camera_up)) > 0.5:
            return _unit(normal * np.sign(normal @ camera_up)), "plane of camera centres"
    return camera_up, "mean camera up vector"


def estimate(rec: pycolmap.Reconstruction) -> WorldFrame:
    images = [rec.images[i] for i in rec.reg_image_ids()]
    rotations = np.stack([im.cam_from_world().rotation.matrix() for im in images])
    centres = np.stack([im.projection_center() for im in images])
    points = np.array([p.xyz for p in rec.points3D.values()]) if rec.num_points3D() else centres
    return estimate_from(rotations, centres, points)


def estimate_from(rotations: np.ndarray, centres: np.ndarray, points: np.ndarray) -> WorldFrame:
    """The frame of world-to-camera rotations (N,3,3), camera centres (N,3) and points (M,3)."""
    up, method = up_from_cameras(rotations, centres)

    forward = rotations[:, 2, :].mean(axis=0)  # mean viewing direction (camera +z in world)
    forward = forward - (forward @ up) * up
    if np.linalg.norm(forward) < 1e-6:
        forward = np.cross(up, [1.0, 0.0, 0.0]) if abs(up[0]) < 0.9 else np.cross(up, [0.0, 0.0, 1.0])
    z_axis = -_unit(forward)
    x_axis = _unit(np.cross(up, z_axis))
    rotation = np.stack([x_axis, up, np.cross(x_axis, up)])

    centre = np.median(points, axis=0)
    radius = float(np.percentile(np.linalg.norm(points - centre, axis=1), 90)) if len(points) > 1 else 1.0
    scale = 1.0 / radius if radius > 1e-9 else 1.0
    translation = -scale * (rotation @ centre)
    return WorldFrame(scale=scale, rotation=rotation, translation=translation, method=method)
