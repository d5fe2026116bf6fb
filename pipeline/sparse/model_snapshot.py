"""A bounded snapshot of the sparse model as COLMAP's mapper grows it (for the live 3D view).

The partial model is in COLMAP's arbitrary frame; the snapshot is turned into the scandrop world
frame estimated the same way as the finished model's (world_frame), from what is placed so far,
so the view opens upright and centred and the final model replaces it in about the same place.
Only the chosen points are read out of the model (MAX_POINTS, by a hash of their ids), so a
snapshot costs a few milliseconds however large the model grows.
"""

from __future__ import annotations

import numpy as np
import pycolmap

from scandrop.pipeline.core.live_model import MAX_POINTS, LiveModel, build, subsample
from scandrop.pipeline.sparse import world_frame


def snapshot(rec: pycolmap.Reconstruction, in_world_frame: bool = False) -> LiveModel | None:
    """The placed cameras and up to MAX_POINTS points of `rec`, in the world frame so far (or as
    they are, when `rec` is already in the world frame: the finished model)."""
    images = [rec.images[i] for i in rec.reg_image_ids()]
    if not images:
        return None
    cam_from_world = np.stack([im.cam_from_world().rotation.matrix() for im in images])
    centres = np.stack([im.projection_center() for im in images])
    half_fov = np.array(
        [
            (cam.width / (2 * cam.focal_length_x), cam.height / (2 * cam.focal_length_y))
            for cam in (rec.cameras[im.camera_id] for im in images)
        ]
    ).reshape(-1, 2)
    ids = np.fromiter(rec.point3D_ids(), dtype=np.int64)
    points = [rec.points3D[int(i)] for i in ids[subsample(ids, MAX_POINTS)]]
    xyz = np.array([p.xyz for p in points], dtype=np.float64).reshape(-1, 3)
    rgb = np.array([p.color for p in points], dtype=np.uint8).reshape(-1, 3)
    if in_world_frame:
        scale, rotation, translation = 1.0, np.eye(3), np.zeros(3)
    else:
        frame = world_frame.estimate_from(cam_from_world, centres, xyz if len(xyz) else centres)
        scale, rotation, translation = frame.scale, frame.rotation, frame.translation
    return build(
        "sparse",
        scale * np.einsum("ij,nj->ni", rotation, centres) + translation,
        np.einsum("ij,nkj->nik", rotation, cam_from_world),  # world_from_cam = R_frame @ R^T
        half_fov,
        scale * np.einsum("ij,nj->ni", rotation, xyz) + translation,
        rgb,
        points_total=len(ids),
    )
