"""Mapping with a fixed seed, and what to relax when COLMAP's mapper finds no initial pair.

Small baselines (a phone swept in front of a subject) keep every pair's triangulation angle under
the incremental mapper's 16 degree initialisation default: it then finds "no good initial image
pair" and returns nothing. The ladder below tries the default first (best accuracy where it works),
then a relaxed initialisation, then global SfM (GLOMAP, which needs no initial pair); each attempt
is recorded so report.json says what was done.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pycolmap
from pydantic import BaseModel

# One thread for mapping: with more, Ceres sums in a varying order and the last bits of one bundle
# adjustment grow through the next ones (poses of two runs differed by 5e-4). Mapping is a small
# part of the stage (kitchen: 2 of 28 s), extraction and matching keep every core.
MAPPING_THREADS = 1
# What the second attempt relaxes: a pair is accepted with a smaller angle and fewer inliers.
RELAXED_INIT_MIN_TRI_ANGLE = 4.0
RELAXED_INIT_MIN_NUM_INLIERS = 50


class MappingAttempt(BaseModel):
    method: str  # "incremental", "incremental-relaxed" or "global"
    registered: int
    seconds: float
    note: str = ""


def incremental_options(seed: int, relaxed: bool) -> pycolmap.IncrementalPipelineOptions:
    options = pycolmap.IncrementalPipelineOptions()
    options.random_seed = seed
    options.mapper.random_seed = seed
    options.num_threads = options.mapper.num_threads = MAPPING_THREADS
    if relaxed:
        options.mapper.init_min_tri_angle = RELAXED_INIT_MIN_TRI_ANGLE
        options.mapper.init_min_num_inliers = RELAXED_INIT_MIN_NUM_INLIERS
    return options


def global_options(seed: int) -> pycolmap.GlobalPipelineOptions:
    options = pycolmap.GlobalPipelineOptions()
    options.random_seed = seed
    mapper = options.mapper
    mapper.random_seed = seed
    options.num_threads = mapper.num_threads = MAPPING_THREADS
    mapper.rotation_averaging.random_seed = seed
    mapper.global_positioning.random_seed = seed
    mapper.retriangulation.random_seed = seed
    return options


def _best(models: dict[int, pycolmap.Reconstruction]) -> pycolmap.Reconstruction | None:
    return max(models.values(), key=lambda rec: rec.num_reg_images(), default=None)


class _Counter:
    """Counts the photos COLMAP's callbacks report as placed (two at once for the initial pair)."""

    def __init__(self, method: str, report: Callable[[int, str], None]) -> None:
        self.method, self.report, self.placed = method, report, 0

    def initial_pair(self) -> None:
        self.placed = 2
        self.report(self.placed, self.method)

    def next_image(self) -> None:
        self.placed += 1
        self.report(self.placed, self.method)


def map_images(
    database: Path,
    images_dir: Path,
    out_dir: Path,
    seed: int,
    min_registered: int,
    token: pycolmap.CancellationToken,
    on_registered: Callable[[int, str], None],
) -> tuple[pycolmap.Reconstruction | None, int, list[MappingAttempt]]:
    """The largest model of the first attempt that places at least `min_registered` photos.

    Returns (model or None, models found by that attempt, every attempt made). `on_registered` gets
    the count of photos placed so far and the method, for progress.
    """
    attempts: list[MappingAttempt] = []
    ladder = [("incremental", False), ("incremental-relaxed", True), ("global", None)]
    best: pycolmap.Reconstruction | None = None
    found = 0
    for method, relaxed in ladder:
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        pycolmap.set_random_seed(seed)
        t0 = time.perf_counter()
        on_registered(0, method)
        if relaxed is None:
            models = pycolmap.global_mapping(database, images_dir, out_dir, options=global_options(seed))
        else:
            counter = _Counter(method, on_registered)
            models = pycolmap.incremental_mapping(
                database,
                images_dir,
                out_dir,
                options=incremental_options(seed, relaxed),
                initial_image_pair_callback=counter.initial_pair,
                next_image_callback=counter.next_image,
                cancellation_token=token,
            )
        model = _best(models)
        registered = model.num_reg_images() if model is not None else 0
        note = (
            "" if model is not None else "no initial image pair found" if relaxed is not None else "no model"
        )
        attempts.append(
            MappingAttempt(
                method=method, registered=registered, seconds=round(time.perf_counter() - t0, 3), note=note
            )
        )
        if model is not None and registered >= min_registered:
            return model, len(models), attempts
        if model is not None and (best is None or registered > best.num_reg_images()):
            best, found = model, len(models)
    return best, found, attempts
