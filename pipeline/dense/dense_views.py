"""The registered views as dense stereo needs them: poses, pinhole depth grids, sparse points seen.

Dense stages work on an undistorted pinhole grid per view (optionally downscaled). Undistortion
maps are built from COLMAP's own camera model (`Camera.img_from_cam`), so every COLMAP model
(SIMPLE_RADIAL, OPENCV, ...) is handled the same way without re-implementing its distortion.
Views are plain picklable data so that worker processes can use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pycolmap

from scandrop.pipeline.core.errors import ErrorCode, ScandropError

_MAP_LATTICE = 8  # grid pixels between the exact evaluations of DenseView.grid_map
NO_PIXEL = -1e4  # map value of rays with no photo pixel (behind the camera, or not finite)


@dataclass(frozen=True)
class DenseView:
    name: str
    camera_model: str
    camera_params: tuple[float, ...]
    image_size: tuple[int, int]  # (width, height) of the photo
    R: np.ndarray  # (3, 3) world-to-camera rotation, OpenCV axes
    t: np.ndarray  # (3,) world-to-camera translation
    K: np.ndarray  # (3, 3) pinhole intrinsics of the depth grid
    grid_size: tuple[int, int]  # (width, height) of the depth grid
    scale: float  # depth grid pixels per photo pixel
    point_ids: np.ndarray  # (M,) ids of the sparse points this view observes
    points: np.ndarray  # (M, 3) their world positions

    @property
    def center(self) -> np.ndarray:
        return -self.R.T @ self.t

    @property
    def axis(self) -> np.ndarray:
        """Optical axis (camera +z) in world coordinates."""
        return self.R[2]

    def camera(self) -> pycolmap.Camera:
        width, height = self.image_size
        cam = pycolmap.Camera.create_from_model_name(1, self.camera_model, 1.0, width, height)
        cam.params = list(self.camera_params)
        return cam

    def photo_map(self, rays_cam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Photo pixel coordinates (for cv2.remap) of camera-frame rays shaped (H, W, 3)."""
        shape = rays_cam.shape[:2]
        rays = rays_cam.reshape(-1, 3).astype(np.float64)
        front = rays[:, 2] > 1e-6
        uv = np.full((rays.shape[0], 2), NO_PIXEL, np.float64)
        if front.any():
            # COLMAP puts pixel centres at +0.5, OpenCV at integers.
            uv[front] = self.camera().img_from_cam(rays[front], check_cheirality=False) - 0.5
        uv[~np.isfinite(uv).all(axis=1)] = NO_PIXEL
        uv = uv.astype(np.float32).reshape(*shape, 2)
        return uv[..., 0].copy(), uv[..., 1].copy()

    def grid_map(self) -> tuple[np.ndarray, np.ndarray]:
        """photo_map(grid_rays()), evaluated exactly every _MAP_LATTICE pixels and interpolated
        linearly between: lens distortion is smooth, and the exact map of a 1600x1200 grid took
        0.25-0.5 s a view, for every photo in the depth stage and again in mesh refinement."""
        width, height = self.grid_size
        xs, ys = _lattice(width), _lattice(height)
        mx, my = self.photo_map(self.grid_rays(xs, ys))
        if (mx == NO_PIXEL).any() or (my == NO_PIXEL).any():  # a lens that folds inside the photo: exactly
            return self.photo_map(self.grid_rays())
        return _upsample(mx, xs, ys, width, height), _upsample(my, xs, ys, width, height)

    def grid_rays(self, xs: np.ndarray | None = None, ys: np.ndarray | None = None) -> np.ndarray:
        """Camera-frame rays (z = 1) through every depth-grid pixel centre, shaped (H, W, 3), or
        through the pixel columns `xs` and rows `ys` only."""
        width, height = self.grid_size
        u, v = np.meshgrid(
            np.arange(width, dtype=np.float64) if xs is None else xs,
            np.arange(height, dtype=np.float64) if ys is None else ys,
        )
        kinv = np.linalg.inv(self.K)
        x = kinv[0, 0] * u + kinv[0, 1] * v + kinv[0, 2]
        y = kinv[1, 1] * v + kinv[1, 2]
        return np.stack([x, y, np.ones_like(x)], axis=-1)

    def undistort(
        self,
        photo: np.ndarray,
        interpolation: int = cv2.INTER_LINEAR,
        maps: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Resample a photo (or mask) onto the undistorted depth grid; `maps` = grid_map() when
        several images of the view are resampled."""
        mx, my = maps if maps is not None else self.grid_map()
        src = photo
        if self.scale < 0.75 and interpolation != cv2.INTER_NEAREST:
            sigma = 0.4 / self.scale
            src = cv2.GaussianBlur(photo, (0, 0), sigma)
        return cv2.remap(src, mx, my, interpolation, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _lattice(n: int) -> np.ndarray:
    """Pixel positions 0, L, 2L, ... and the last one, n - 1."""
    points = np.arange(0, n, _MAP_LATTICE, dtype=np.float64)
    return points if points[-1] == n - 1 else np.append(points, n - 1.0)


def _upsample(coarse: np.ndarray, xs: np.ndarray, ys: np.ndarray, width: int, height: int) -> np.ndarray:
    """(height, width) float32 linear interpolation of values given at columns xs and rows ys."""

    def weights(positions: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        at = np.interp(np.arange(n, dtype=np.float64), positions, np.arange(len(positions), dtype=np.float64))
        first = np.minimum(at.astype(np.int64), max(len(positions) - 2, 0))
        return first, at - first

    coarse = coarse.astype(np.float64)
    if len(xs) > 1:
        i, a = weights(xs, width)
        coarse = coarse[:, i] * (1 - a) + coarse[:, i + 1] * a
    if len(ys) > 1:
        j, b = weights(ys, height)
        coarse = coarse[j] * (1 - b)[:, None] + coarse[j + 1] * b[:, None]
    return np.ascontiguousarray(coarse, dtype=np.float32)


def pinhole_grid(camera: pycolmap.Camera, max_size: int) -> tuple[np.ndarray, tuple[int, int], float]:
    """Pinhole intrinsics (OpenCV pixel centres) and size of the depth grid, scaled to max_size."""
    width, height = int(camera.width), int(camera.height)
    scale = min(1.0, max_size / max(width, height))
    grid = (max(1, round(width * scale)), max(1, round(height * scale)))
    sx, sy = grid[0] / width, grid[1] / height
    K = np.array(
        [
            [camera.focal_length_x * sx, 0.0, camera.principal_point_x * sx - 0.5],
            [0.0, camera.focal_length_y * sy, camera.principal_point_y * sy - 0.5],
            [0.0, 0.0, 1.0],
        ]
    )
    return K, grid, float(sx)


def load_views(sparse_dir: Path, max_size: int) -> list[DenseView]:
    """Read the sparse model and describe every registered view for dense stereo."""
    if not (sparse_dir / "images.bin").exists():
        raise ScandropError(
            ErrorCode.dense_failed,
            "There is no sparse model to compute depth from.",
            "Run the sparse reconstruction stage first.",
        )
    rec = pycolmap.Reconstruction(str(sparse_dir))
    views: list[DenseView] = []
    for image_id in sorted(rec.reg_image_ids()):
        image = rec.image(image_id)
        camera = rec.camera(image.camera_id)
        pose = image.cam_from_world()
        ids = np.array([p.point3D_id for p in image.points2D if p.has_point3D()], dtype=np.int64)
        ids = np.unique(ids)
        pts = (
            np.array([rec.point3D(int(i)).xyz for i in ids], dtype=np.float64).reshape(-1, 3)
            if ids.size
            else np.zeros((0, 3))
        )
        K, grid, scale = pinhole_grid(camera, max_size)
        views.append(
            DenseView(
                name=image.name,
                camera_model=camera.model.name,
                camera_params=tuple(float(p) for p in camera.params),
                image_size=(int(camera.width), int(camera.height)),
                R=np.asarray(pose.rotation.matrix(), dtype=np.float64),
                t=np.asarray(pose.translation, dtype=np.float64),
                K=K,
                grid_size=grid,
                scale=scale,
                point_ids=ids,
                points=pts,
            )
        )
    return views


def stereo_views(sparse_dir: Path, max_size: int) -> list[DenseView]:
    """The registered views, for a depth method that needs at least two of them."""
    views = load_views(sparse_dir, max_size)
    if len(views) < 2:
        raise ScandropError(
            ErrorCode.dense_failed,
            "Dense stereo needs at least two registered views.",
            "Add photos that overlap, taken from slightly different positions.",
        )
    return views
