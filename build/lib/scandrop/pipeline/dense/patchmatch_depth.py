"""Dense depth on the GPU: COLMAP's PatchMatch stereo (pycolmap-cuda), as the workspace's depth maps.

The device plan picks this backend when a CUDA build of pycolmap is installed and the job runs on
CUDA; it replaces the CPU pair stereo of estimate_depth and writes the same per-view npz files, so
fill and fuse run unchanged. NOT RUN on the build machines (no GPU there, and the PyPI wheel of
pycolmap raises "Dense stereo reconstruction requires CUDA"): the conversion of COLMAP's depth and
normal maps into our files is tested on the CPU with maps the tests write in COLMAP's format.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pycolmap

from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.stage import Progress, StopCheck, atomic_path, check_stop
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.dense.estimate_depth import DepthConfig, DepthResult


def read_colmap_array(path: Path) -> np.ndarray:
    """A COLMAP dense array file: text header "width&height&channels&", then float32 values with
    the column index fastest, then rows, then channels. Returns (H, W) or (H, W, C)."""
    raw = path.read_bytes()
    fields = raw.split(b"&", 3)
    if len(fields) != 4:
        raise ValueError(f"{path.name} is not a COLMAP array file")
    width, height, channels = (int(f) for f in fields[:3])
    data = np.frombuffer(fields[3], dtype=np.float32)
    if data.size != width * height * channels:
        raise ValueError(f"{path.name}: {data.size} values for {width}x{height}x{channels}")
    array = data.reshape(channels, height, width).transpose(1, 2, 0)
    return array[..., 0] if channels == 1 else array


def run(config: DepthConfig, ws: Workspace, progress: Progress, should_stop: StopCheck) -> DepthResult:
    """Undistort, run PatchMatch with geometric consistency, convert its maps into ws.depth_dir."""
    start = time.monotonic()
    mvs = ws.mvs_dir
    options = pycolmap.UndistortCameraOptions()
    options.max_image_size = config.max_image_size
    progress(0.0, "undistorting photos for PatchMatch")
    pycolmap.undistort_images(str(mvs), str(ws.sparse_dir), str(ws.images_dir), undistort_options=options)
    check_stop(should_stop)
    patch_match = pycolmap.PatchMatchOptions()
    patch_match.max_image_size = config.max_image_size
    patch_match.geom_consistency = True
    progress(0.1, "PatchMatch stereo on the GPU")
    try:
        pycolmap.patch_match_stereo(str(mvs), options=patch_match)
    except RuntimeError as exc:  # e.g. no CUDA device after all, or out of GPU memory
        raise ScandropError(
            ErrorCode.dense_failed,
            f"PatchMatch stereo failed on the GPU: {exc}.",
            "Run with --device cpu to use the CPU dense method.",
        ) from exc
    check_stop(should_stop)
    progress(0.9, "converting depth maps")
    return convert_workspace(mvs, ws, start)


def convert_workspace(mvs: Path, ws: Workspace, start: float) -> DepthResult:
    """COLMAP's geometric depth/normal maps -> ws.depth_dir/<image>.npz in estimate_depth's layout."""
    rec = pycolmap.Reconstruction(str(mvs / "sparse"))
    originals = pycolmap.Reconstruction(str(ws.sparse_dir))
    original_width = {img.name: originals.cameras[img.camera_id].width for img in originals.images.values()}
    ws.fresh_depth_dir()
    fractions = []
    for image in rec.images.values():
        name = image.name
        maps = mvs / "stereo"
        depth_file = maps / "depth_maps" / f"{name}.geometric.bin"
        if not depth_file.exists():
            continue
        depth = read_colmap_array(depth_file).astype(np.float32)
        normals = read_colmap_array(maps / "normal_maps" / f"{name}.geometric.bin").astype(np.float32)
        depth[~np.isfinite(depth) | (depth < 0)] = 0.0
        normals[depth <= 0] = 0.0
        camera = rec.cameras[image.camera_id]
        k = camera.calibration_matrix().copy()
        k[0, 2] -= 0.5  # COLMAP puts pixel centres at +0.5, our depth grids at integers
        k[1, 2] -= 0.5
        bgr = cv2.imread(str(mvs / "images" / name), cv2.IMREAD_COLOR)
        if bgr is None or bgr.shape[:2] != depth.shape:
            raise ScandropError(
                ErrorCode.dense_failed, f"PatchMatch output for {name} is incomplete.", "Rerun."
            )
        pose = image.cam_from_world()
        with atomic_path(ws.depth_dir / f"{name}.npz") as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                depth=depth,
                normals=normals,
                confidence=(depth > 0).astype(np.float32),
                rgb=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB),
                K=k,
                R=pose.rotation.matrix(),
                t=np.asarray(pose.translation),
                scale=np.float64(camera.width / original_width.get(name, camera.width)),
                name=np.str_(name),
            )
        fractions.append(float(np.mean(depth > 0)))
    if not fractions or float(np.mean(fractions)) < 1e-3:
        raise ScandropError(
            ErrorCode.dense_failed,
            "PatchMatch stereo found no reliable depth in the photos.",
            "Photograph a textured object in good light; plain, shiny or see-through surfaces cannot match.",
        )
    return DepthResult(
        views=len(rec.images),
        views_with_depth=sum(f > 0 for f in fractions),
        mean_valid_fraction=round(float(np.mean(fractions)), 4),
        seconds=round(time.monotonic() - start, 2),
    )
