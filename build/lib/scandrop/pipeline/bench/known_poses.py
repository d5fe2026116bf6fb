"""Write a COLMAP sparse model from known cameras and known 3D points (ground truth or external poses).

Dense stages read only a sparse model; with this a benchmark or a test can feed them exact
cameras and surface points, so dense accuracy is measured on its own, free of SfM error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pycolmap
from PIL import Image

from scandrop.pipeline.bench.synthetic import SyntheticScene
from scandrop.pipeline.core.workspace import Workspace


def write_known_model(
    folder: Path,
    names: Sequence[str],
    K: np.ndarray,
    size: tuple[int, int],
    rotations: Sequence[np.ndarray],
    translations: Sequence[np.ndarray],
    points: np.ndarray,
    visible: np.ndarray,
) -> pycolmap.Reconstruction:
    """One PINHOLE camera (K in COLMAP pixel convention, size = (width, height)), one image per
    pose (world-to-camera R, t), and `points` observed in the views where `visible[view, point]`."""
    rec = pycolmap.Reconstruction()
    width, height = size
    cam = pycolmap.Camera.create_from_model_name(1, "PINHOLE", float(K[0, 0]), width, height)
    cam.params = [float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])]
    rec.add_camera_with_trivial_rig(cam)
    observations: list[list[tuple[int, int]]] = [[] for _ in range(len(points))]
    for i, (name, R, t) in enumerate(zip(names, rotations, translations, strict=True)):
        cols = np.nonzero(visible[i])[0]
        cam_pts = points[cols] @ np.asarray(R).T + np.asarray(t)
        uv = cam_pts @ np.asarray(K).T
        uv = uv[:, :2] / uv[:, 2:3]
        image = pycolmap.Image(name=name, keypoints=uv.astype(np.float64), camera_id=1, image_id=i + 1)
        pose = pycolmap.Rigid3d(pycolmap.Rotation3d(np.asarray(R, dtype=np.float64)), np.asarray(t, float))
        rec.add_image_with_trivial_frame(image, pose)
        for k, p in enumerate(cols):
            observations[int(p)].append((i + 1, k))
    for p, obs in enumerate(observations):
        if len(obs) < 2:
            continue
        track = pycolmap.Track()
        for image_id, idx in obs:
            track.add_element(image_id, idx)
        rec.add_point3D(points[p].astype(np.float64), track)
    folder.mkdir(parents=True, exist_ok=True)
    rec.write_binary(str(folder))
    return rec


def workspace_from_scene(
    scene: SyntheticScene, ws: Workspace, masks: bool = False, points: int = 4000
) -> None:
    """Fill a workspace as ingest and sparse would from a synthetic scene with exact ground truth:
    images (and object masks from the rendered coverage), exact cameras, true surface points."""
    ws.images_dir.mkdir(parents=True, exist_ok=True)
    for name, image in zip(scene.names, scene.images, strict=True):
        Image.fromarray(np.ascontiguousarray(image[..., :3])).save(ws.images_dir / name)
        if masks and image.shape[2] == 4:
            ws.masks_dir.mkdir(parents=True, exist_ok=True)
            mask = np.where(image[..., 3] > 127, 255, 0).astype(np.uint8)
            Image.fromarray(mask).save(ws.mask_for(name))
    pts = scene.surface_samples(points, min_views=2, seed=1)
    visible = np.array([scene.visible_in(pts, i) for i in range(len(scene.names))])
    write_known_model(
        ws.sparse_dir, scene.names, scene.K, (scene.width, scene.height), scene.R, scene.t, pts, visible
    )
