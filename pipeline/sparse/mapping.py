"""Mapping with a fixed seed, and what to relax when COLMAP's mapper finds no initial pair.

Small baselines (a phone swept in front of a subject) keep every pair's triangulation angle under
the incremental mapper's 16 degree initialisation default: it then finds "no good initial image
pair" and returns nothing. The ladder below tries the default first (best accuracy where it works),
then a relaxed initialisation, then global SfM (GLOMAP, which needs no initial pair), then GLOMAP
after estimating focal lengths from the view graph; each attempt is recorded so report.json says what
was done. A global model is retriangulated and bundle adjusted once more before it is used
(refine_global_model), and photos that too few of its points tie to are taken out of it.
"""

from __future__ import annotations

import math
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


# Up to this many photos the global attempt keeps points seen by two photos only: by default GLOMAP
# keeps tracks of three or more, which left the 3-view barn 21 points (549 with two-view tracks).
# Not for more: on a rendered 12-view orbit two-view tracks placed 11 photos instead of 12.
TWO_VIEW_TRACKS_MAX_IMAGES = 5


def global_options(seed: int, num_images: int) -> pycolmap.GlobalPipelineOptions:
    options = pycolmap.GlobalPipelineOptions()
    options.random_seed = seed
    mapper = options.mapper
    mapper.random_seed = seed
    options.num_threads = mapper.num_threads = MAPPING_THREADS
    mapper.rotation_averaging.random_seed = seed
    mapper.global_positioning.random_seed = seed
    mapper.retriangulation.random_seed = seed
    if num_images <= TWO_VIEW_TRACKS_MAX_IMAGES:
        mapper.track_min_num_views_per_track = 2
        mapper.global_positioning.min_num_view_per_track = 2
        mapper.retriangulation.ignore_two_view_tracks = False
    return options


# Triangulate + adjust twice: the second triangulation, from the adjusted poses, keeps matches the
# first rejected (the barn: 112 -> 164 points, the worse pair's Sampson error 0.40 -> 0.19 px).
REFINE_ROUNDS = 2


def refine_global_model(
    model: pycolmap.Reconstruction,
    database: Path,
    images_dir: Path,
    out_dir: Path,
    seed: int,
    num_images: int,
) -> tuple[pycolmap.Reconstruction, str]:
    """The global model retriangulated from every verified match and bundle adjusted once more, the
    way COLMAP finishes its own models (poses, focal length, distortion, points; no robust loss).

    GLOMAP's last adjustment left the 3-view barn at 1.44 px, its relative rotations 2.6 and 4.8
    degrees off the two-view geometries its matches verified (the matches' median Sampson error
    under its poses: 2.7 and 15.7 px), and depth maps from those poses did not agree with each
    other. Refined: 0.17 px, Sampson 0.14 and 0.19 px. Kept when it places the same photos; then
    the photos that too few of its points tie to leave it (drop_unsupported_photos)."""
    options = incremental_options(seed, relaxed=False)  # its triangulator's settings, seeded, one thread
    options.triangulation.ignore_two_view_tracks = num_images > TWO_VIEW_TRACKS_MAX_IMAGES
    model.update_point_3d_errors()
    before = model.compute_mean_reprojection_error()
    scratch = out_dir / "refined"  # triangulate_points writes its model there
    scratch.mkdir(parents=True, exist_ok=True)
    adjust = pycolmap.BundleAdjustmentOptions()
    adjust.print_summary = False
    adjust.ceres.solver_options.num_threads = MAPPING_THREADS
    refined = pycolmap.Reconstruction(model)
    for _ in range(REFINE_ROUNDS):
        refined = pycolmap.triangulate_points(
            refined, database, images_dir, scratch, clear_points=True, options=options
        )
        pycolmap.bundle_adjustment(refined, adjust)
    after = refined.compute_mean_reprojection_error()
    if refined.num_reg_images() < model.num_reg_images():
        chosen, note = model, f"bundle adjusted again: placed {refined.num_reg_images()} photos, not kept; "
    else:
        chosen, note = refined, f"bundle adjusted again: {before:.2f} -> {after:.2f} px; "
    least = pycolmap.TwoViewGeometryOptions().min_num_inliers  # what verification asks of a pair
    left_out = drop_unsupported_photos(chosen, least)
    if left_out:
        note += f"left out {left_out} placed photo(s) tied to fewer than {least} points; "
    return chosen, note


def drop_unsupported_photos(model: pycolmap.Reconstruction, least: int) -> int:
    """Takes out of the model the photos that fewer than `least` of its points tie to; returns how many.

    GLOMAP places every photo of the view graph's largest connected part, also one whose matches
    ended in no point of the model: its pose is then constrained by nothing, yet the report counts it
    as placed and depth and texture use it. The room (8 barely overlapping photos) with the learned
    matcher's pairs: 8 of 8 placed, 5 of them seen by 0-2 points; a rendered 12-photo orbit at
    320x240: one photo placed 19 degrees off, seen by no point. The bar is the one geometric
    verification sets for a pair (COLMAP's `min_num_inliers`, 15), not the incremental mapper's 30
    for a new photo: a global pose also rests on its pairs' two-view geometries, and that orbit's
    well-placed photos had 27-31 points. Taking a photo out can leave a point with one photo, which
    COLMAP deletes: hence the loop."""
    dropped = 0
    while True:
        weak = [i for i in model.reg_image_ids() if model.image(i).num_points3D < least]
        if not weak:
            return dropped
        for image_id in weak:
            model.deregister_frame(model.image(image_id).frame_id)
        dropped += len(weak)


def _best(models: dict[int, pycolmap.Reconstruction]) -> pycolmap.Reconstruction | None:
    return max(models.values(), key=lambda rec: rec.num_reg_images(), default=None)


class _Counter:
    """Counts the photos COLMAP's callbacks report as placed (two at once for the initial pair), and
    hands on the model so far when `live` says one is wanted."""

    def __init__(self, method: str, report: Callable[[int, str], None], live: _Snapshots | None) -> None:
        self.method, self.report, self.placed, self.live = method, report, 0, live

    def initial_pair(self) -> None:
        self.placed = 2
        self.report(self.placed, self.method)

    def next_image(self) -> None:
        self.placed += 1
        self.report(self.placed, self.method)
        if self.live is not None:
            self.live.take()


class _Snapshots:
    """The model so far, from COLMAP's own snapshots, which the mapper writes into `folder` every
    few placed photos: its callbacks carry no model, and pycolmap's IncrementalPipeline object,
    which would give access to it, holds Python's GIL for its whole run (measured), so no progress
    event could leave the job process meanwhile. Read only when `due()`, then cleared."""

    def __init__(
        self, folder: Path, due: Callable[[], bool], on_model: Callable[[pycolmap.Reconstruction], None]
    ):
        self.folder, self.due, self.on_model = folder, due, on_model
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)

    def take(self) -> None:
        written = sorted((p for p in self.folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        if not written or not self.due():
            return
        model = pycolmap.Reconstruction(str(written[-1]))
        for path in written:
            shutil.rmtree(path, ignore_errors=True)
        self.on_model(model)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# COLMAP writes a snapshot every this many placed photos: every one in sets of up to 50 photos, so
# that a large set writes about 50 snapshots, not one per photo (each is the whole model so far).
SNAPSHOTS_PER_RUN = 50


def map_images(
    database: Path,
    images_dir: Path,
    out_dir: Path,
    num_images: int,
    seed: int,
    min_registered: int,
    token: pycolmap.CancellationToken,
    on_registered: Callable[[int, str], None],
    on_model: Callable[[pycolmap.Reconstruction], None] | None = None,
    model_due: Callable[[], bool] = lambda: True,
) -> tuple[pycolmap.Reconstruction | None, int, list[MappingAttempt]]:
    """The largest model of the first attempt that places at least `min_registered` photos.

    Returns (model or None, models found by that attempt, every attempt made). `on_registered` gets
    the count of photos placed so far and the method, for progress; `on_model` the incremental
    mapper's model so far (COLMAP's frame), as photos are placed, whenever `model_due()` says so.
    """
    attempts: list[MappingAttempt] = []
    ladder = [
        ("incremental", False),
        ("incremental-relaxed", True),
        ("global", None),
        ("global-calibrated", None),
    ]
    best: pycolmap.Reconstruction | None = None
    found = 0
    for method, relaxed in ladder:
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        pycolmap.set_random_seed(seed)
        t0 = time.perf_counter()
        on_registered(0, method)
        note = ""
        if relaxed is None:
            # GLOMAP wants good focal lengths; photos without EXIF start from a guess (1.2 x width),
            # 2x off for the 3-view barn: estimate them from the fundamental matrices first.
            # Last: it rewrites the database's cameras (on a rendered 12-view orbit plain GLOMAP
            # placed 12 photos, after calibration 11).
            calibration = pycolmap.ViewGraphCalibrationOptions()
            calibration.random_seed = seed
            if method == "global-calibrated" and pycolmap.calibrate_view_graph(database, calibration):
                note = "focal lengths calibrated from the view graph; "
            models = pycolmap.global_mapping(
                database, images_dir, out_dir, options=global_options(seed, num_images)
            )
            solved = _best(models)
            if solved is not None:  # global mapping places every photo at once, at its end
                largest = next(k for k, rec in models.items() if rec is solved)
                solved, said = refine_global_model(solved, database, images_dir, out_dir, seed, num_images)
                models[largest] = solved
                note += said
                on_registered(solved.num_reg_images(), method)
                if on_model is not None:
                    on_model(solved)
        else:
            options = incremental_options(seed, relaxed)
            live = None
            if on_model is not None:
                live = _Snapshots(out_dir.parent / f"{out_dir.name}.snapshots", model_due, on_model)
                options.snapshot_path = str(live.folder)
                options.snapshot_frames_freq = max(1, math.ceil(num_images / SNAPSHOTS_PER_RUN))
            counter = _Counter(method, on_registered, live)
            try:
                models = pycolmap.incremental_mapping(
                    database,
                    images_dir,
                    out_dir,
                    options=options,
                    initial_image_pair_callback=counter.initial_pair,
                    next_image_callback=counter.next_image,
                    cancellation_token=token,
                )
            finally:
                if live is not None:
                    live.close()
        model = _best(models)
        registered = model.num_reg_images() if model is not None else 0
        if model is None:
            note += "no initial image pair found" if relaxed is not None else "no model"
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
