"""The reference the issue compares against: a plain pycolmap sparse run with default options.

It runs in a spawned child process: pycolmap can abort the whole process (FIELD-NOTES), and the
child's peak RSS is then the baseline's own, not the caller's.
"""

from __future__ import annotations

import multiprocessing
import resource
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.stage import write_json_atomic

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
_RESULT_FILE = "baseline_result.json"


class BaselineSeconds(BaseModel):
    wall: float
    extract: float
    match: float
    map: float


class BaselineResult(BaseModel):
    registered: int  # images in the largest model
    total_images: int
    seconds: BaselineSeconds
    peak_rss_mb: float  # the child process's own peak resident memory
    rotations: dict[str, list[list[float]]]  # image name -> cam_from_world rotation (world-to-camera)
    centres: dict[str, list[float]]  # image name -> camera centre in the model's frame
    mean_reprojection_error: float  # pixels; 0 when nothing was reconstructed
    num_points3d: int

    def rotation_matrices(self) -> dict[str, np.ndarray]:
        return {name: np.asarray(r, dtype=np.float64) for name, r in self.rotations.items()}


def run_plain_pycolmap(image_dir: Path, work_dir: Path, max_image_size: int | None = None) -> BaselineResult:
    """extract_features (defaults; `max_image_size` to match our working size), match_exhaustive,
    incremental_mapping; the largest model is scored. Raises worker_crashed if pycolmap aborts."""
    work_dir.mkdir(parents=True, exist_ok=True)
    result_path = work_dir / _RESULT_FILE
    result_path.unlink(missing_ok=True)
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_child, args=(str(image_dir), str(work_dir), max_image_size), daemon=True)
    proc.start()
    proc.join()
    if proc.exitcode != 0 or not result_path.exists():
        raise ScandropError(
            ErrorCode.worker_crashed,
            f"the plain pycolmap run stopped with exit code {proc.exitcode}",
            "pycolmap aborted; its log on stderr says why",
        )
    return BaselineResult.model_validate_json(result_path.read_text())


def _child(image_dir: str, work_dir: str, max_image_size: int | None) -> None:
    import pycolmap  # in the child only: the parent never loads pycolmap for this

    pycolmap.logging.minloglevel = 2  # keep the benchmark's output to its table

    images = Path(image_dir)
    work = Path(work_dir)
    database = work / "database.db"
    database.unlink(missing_ok=True)
    sparse = work / "sparse"
    sparse.mkdir(parents=True, exist_ok=True)
    total = sum(1 for p in images.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)

    start = time.perf_counter()
    options = pycolmap.FeatureExtractionOptions()
    if max_image_size is not None:
        options.max_image_size = max_image_size
    pycolmap.extract_features(database, images, extraction_options=options)
    t_extract = time.perf_counter()
    pycolmap.match_exhaustive(database)
    t_match = time.perf_counter()
    models = pycolmap.incremental_mapping(database, images, sparse)
    t_map = time.perf_counter()

    rotations: dict[str, list[list[float]]] = {}
    centres: dict[str, list[float]] = {}
    reproj, points, registered = 0.0, 0, 0
    if models:
        rec = max(models.values(), key=lambda m: m.num_reg_images())
        registered = rec.num_reg_images()
        reproj = float(rec.compute_mean_reprojection_error())
        points = rec.num_points3D()
        for image_id in rec.reg_image_ids():
            image = rec.image(image_id)
            rotations[image.name] = image.cam_from_world().rotation.matrix().tolist()
            centres[image.name] = np.asarray(image.projection_center()).tolist()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    result = BaselineResult(
        registered=registered,
        total_images=total,
        seconds=BaselineSeconds(
            wall=t_map - start, extract=t_extract - start, match=t_match - t_extract, map=t_map - t_match
        ),
        peak_rss_mb=peak_mb,
        rotations=rotations,
        centres=centres,
        mean_reprojection_error=reproj,
        num_points3d=points,
    )
    write_json_atomic(work / _RESULT_FILE, result.model_dump(mode="json"))
