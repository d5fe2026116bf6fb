"""Sparse reconstruction: SIFT features, matching chosen by input, incremental mapping (COLMAP).

Where SIFT cannot connect the photos (small, wide-baseline sets), learned matches (DISK + LightGlue,
the `learned` extra) are added to the same database before mapping; every random choice is seeded,
so the same photos and settings give the same model. Ends by turning the model into the scandrop
world frame (+y up, centred, unit-ish scale), so that every later stage and every output share one
frame and viewers show the object upright.
"""

from __future__ import annotations

import math
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pycolmap
import structlog
from pydantic import BaseModel, ConfigDict, Field

from scandrop.pipeline.core.cpu_budget import usable_cpus
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.live_model import LiveSink, Throttle
from scandrop.pipeline.core.stage import Progress, StopCheck, atomic_dir, check_stop, write_json_atomic
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.sparse import (
    colmap_log,
    learned_matching,
    mapping,
    model_snapshot,
    parallel_matching,
    world_frame,
)
from scandrop.pipeline.sparse.mapping import MappingAttempt


class Matching(StrEnum):
    auto = "auto"
    exhaustive = "exhaustive"
    sequential = "sequential"
    retrieval = "retrieval"


class SparseConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_num_features: int = Field(
        3072, ge=256, description="SIFT features per image; exhaustive matching cost grows with it."
    )
    small_set_max_images: int = Field(
        12,
        ge=0,
        description="Sets this small match few pairs: they get small_set_features instead, and a longer"
        " RANSAC in verification (parallel_matching.verification_options).",
    )
    small_set_features: int = Field(8192, ge=256, description="SIFT features per image for small sets.")
    matching: Matching = Field(Matching.auto, description="Pairing strategy; auto picks by input.")
    exhaustive_max_images: int = Field(
        60, ge=3, description="Above this many unordered images, auto uses retrieval instead of all pairs."
    )
    ordered: bool = Field(False, description="Images are frames of one sequence (video): match neighbours.")
    sequential_overlap: int = Field(
        10, ge=1, description="Neighbours matched on each side in sequential mode."
    )
    retrieval_neighbors: int = Field(20, ge=2, description="Images retrieved per image in retrieval mode.")
    camera_model: str = Field("SIMPLE_RADIAL", description="COLMAP camera model for unknown cameras.")
    min_registered: int = Field(3, ge=2, description="A model with fewer registered images fails the job.")
    device: Literal["cpu", "cuda"] = Field(
        "cpu", description="Where SIFT extraction and matching run (set by the device plan)."
    )
    match_workers: int = Field(
        0,
        ge=0,
        le=64,
        description="Matching processes on the CPU, each on one thread (repeatable); 0 = one per core,"
        " at most 8.",
    )
    seed: int = Field(
        0, ge=0, description="Seed of every random choice (RANSAC, mapping): same photos, same model."
    )
    learned: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Learned matching (DISK + LightGlue): auto = where SIFT leaves photos unplaced (any, in "
        "a small set), when the models are installed; on = always (missing models fail the job).",
    )
    learned_small_set: int = Field(
        12, ge=0, description="Sets this small get learned matches when SIFT leaves any photo unplaced."
    )
    learned_min_placed_fraction: float = Field(
        0.9, ge=0.0, le=1.0, description="Larger sets get learned matches when SIFT places less than this."
    )
    learned_neighbours: int = Field(
        5, ge=1, description="LightGlue pairs per photo (best partners by a cheap score)."
    )
    learned_max_pairs: int = Field(150, ge=1, description="At most this many LightGlue pairs per job.")
    learned_keypoints: int = Field(1024, ge=64, description="DISK keypoints per photo.")
    learned_max_size: int = Field(1024, ge=128, description="Longest side DISK sees, in pixels.")
    learned_device: Literal["cpu", "cuda"] = Field(
        "cpu", description="Where DISK and LightGlue run (torch; set by the device plan)."
    )
    models_dir: str | None = Field(None, description="Where models are installed (as for single view).")


class SparseResult(BaseModel):
    matching: Matching
    images: int
    registered: int
    registered_names: list[str]
    unregistered: list[str]
    models_found: int
    points3D: int
    mean_reprojection_error_px: float
    mean_track_length: float
    up_method: str
    seconds: dict[str, float]
    seed: int = 0
    mapping: list[MappingAttempt] = Field(default_factory=list, description="Mapping attempts, in order.")
    learned: dict[str, Any] = Field(
        default_factory=dict, description="Whether learned matching ran, why, and what it did."
    )
    placed_by: dict[str, str] = Field(
        default_factory=dict, description="Per placed photo: the matcher most of its tie points came from."
    )
    tie_points: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="Per placed photo: tie points from SIFT and from learned keypoints."
    )


def small_set(config: SparseConfig, num_images: int) -> bool:
    """Few pairs to match: more features and a longer verification buy accuracy cheaply."""
    return num_images <= config.small_set_max_images


def features_per_image(config: SparseConfig, num_images: int) -> int:
    """More features where there are few pairs to match: accuracy for small sets, speed for larger."""
    if small_set(config, num_images):
        return max(config.max_num_features, config.small_set_features)
    return config.max_num_features


def choose_matching(config: SparseConfig, num_images: int) -> Matching:
    """Exhaustive for small sets, sequential for ordered frames, retrieval for large sets."""
    if config.matching != Matching.auto:
        return config.matching
    if config.ordered:
        return Matching.sequential
    if num_images <= config.exhaustive_max_images:
        return Matching.exhaustive
    return Matching.retrieval


@contextmanager
def _cancellation(should_stop: StopCheck) -> Iterator[pycolmap.CancellationToken]:
    """A COLMAP cancellation token that a watcher thread trips as soon as the job is asked to stop,
    so a cancel lands within a fraction of a second even in the middle of matching or mapping."""
    token = pycolmap.CancellationToken()
    finished = threading.Event()

    def watch() -> None:
        while not finished.wait(0.2):
            if should_stop():
                token.cancel()
                return

    watcher = threading.Thread(target=watch, name="sparse-cancel", daemon=True)
    watcher.start()
    try:
        yield token
    except InterruptedError:  # what pycolmap raises once the token is cancelled
        check_stop(should_stop)
        raise
    finally:
        finished.set()
        watcher.join()


# Descriptors the vocabulary is trained on, whatever the number of images: k-means costs
# descriptors x words, so letting both grow with the images made matching 200 video frames 17x
# slower than 50 (measured); a fixed budget keeps building the tree a constant cost.
VOCAB_TRAIN_DESCRIPTORS = 60_000
VOCAB_WORDS = 2048
# k-means iterations and restarts. COLMAP's defaults (100 x 3) are made for the large generic trees
# built once offline; for this per-job tree they cost 32 s of a 47-frame video's 48 s of matching.
# 25 x 1 is faiss's own default.
VOCAB_ITERATIONS = 25
VOCAB_ROUNDS = 1


def _build_visual_index(ws: Workspace, path: Path, num_images: int, seed: int) -> Path:
    """Build a small vocabulary tree from this scene's own descriptors (no download, works offline)."""
    per_image = max(50, min(1000, VOCAB_TRAIN_DESCRIPTORS // max(1, num_images)))
    db = pycolmap.Database.open(str(ws.database))
    try:
        rng = np.random.default_rng(seed)
        descriptors = []
        for image in db.read_all_images():
            d = np.asarray(db.read_descriptors(image.image_id).to_float().data)
            keep = rng.permutation(len(d))[:per_image]
            descriptors.append(d[keep])
    finally:
        db.close()
    stack = np.ascontiguousarray(np.concatenate(descriptors), dtype=np.float32)
    index = pycolmap.VisualIndex.create(stack.shape[1], 64)
    options = pycolmap.VisualIndex.BuildOptions()
    options.num_visual_words = int(min(VOCAB_WORDS, max(256, len(stack) // 20)))
    options.num_iterations, options.num_rounds = VOCAB_ITERATIONS, VOCAB_ROUNDS
    index.build(options, pycolmap.FeatureDescriptorsFloat(pycolmap.FeatureExtractorType.SIFT, stack))
    index.write(str(path))
    return path


def _pairs(config: SparseConfig, strategy: Matching, ws: Workspace, num_images: int) -> list[tuple[str, str]]:
    """The image pairs the strategy matches, from COLMAP's own pair generators."""
    if strategy == Matching.exhaustive:
        options: Any = pycolmap.ExhaustivePairingOptions()
        make: Any = pycolmap.ExhaustivePairGenerator
    elif strategy == Matching.sequential:
        options, make = pycolmap.SequentialPairingOptions(), pycolmap.SequentialPairGenerator
        options.overlap = config.sequential_overlap
        if num_images > 3 * config.sequential_overlap:
            options.loop_detection = True
            options.loop_detection_period = max(1, config.sequential_overlap // 2)
            options.vocab_tree_path = str(
                _build_visual_index(ws, ws.root / "vocab_tree.bin", num_images, config.seed)
            )
    else:
        options, make = pycolmap.VocabTreePairingOptions(), pycolmap.VocabTreePairGenerator
        options.num_images = config.retrieval_neighbors
        options.vocab_tree_path = str(
            _build_visual_index(ws, ws.root / "vocab_tree.bin", num_images, config.seed)
        )
    db = pycolmap.Database.open(str(ws.database))
    try:
        names = {image.image_id: image.name for image in db.read_all_images()}
        pairs = make(options, db).all_pairs()
    finally:
        db.close()
    return [(names[a], names[b]) for a, b in pairs]


# pycolmap's matchers have no progress callback: one call matches all pairs, in blocks of
# MATCH_BLOCK_PAIRS, and COLMAP's log line "Processing block [i/n]" says where it is (colmap_log);
# between blocks the stage says every HEARTBEAT_SECONDS how long the block has run. Blocks of 60
# pairs cost nothing (synthetic scene, 276 pairs: 22.1 s, 21.6 s in blocks of 138 or 1225, 32.3 s in
# blocks of 20: the matcher builds a search index per photo and block); separate calls in batches of
# 6-photo blocks took 39.7 s.
MATCH_BLOCK_PAIRS = 60
HEARTBEAT_SECONDS = 2.0


def _run_watched(call: Callable[[], None], tick: Callable[[], None], every: float) -> None:
    """Run `call` in a thread while this one ticks every `every` seconds; its exception is ours."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            call()
        except BaseException as exc:  # re-raised in the calling thread below
            failure.append(exc)

    worker = threading.Thread(target=target, name="sparse-call", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(every)
        if worker.is_alive():
            tick()
    if failure:
        raise failure[0]


def matching_options(config: SparseConfig) -> pycolmap.FeatureMatchingOptions:
    """The matcher's options for the config's device (the rule: parallel_matching.matching_options)."""
    return parallel_matching.matching_options(config.device)


def _match(
    config: SparseConfig,
    strategy: Matching,
    ws: Workspace,
    num_images: int,
    progress: Progress,
    should_stop: StopCheck,
) -> None:
    pairs = _pairs(config, strategy, ws, num_images)
    pairs_file = ws.root / "match_pairs.txt"
    pairs_file.write_text("".join(f"{a} {b}\n" for a, b in pairs))
    parts = parallel_matching.processes_for(len(pairs), config.match_workers) if config.device == "cpu" else 1
    thorough = small_set(config, num_images)
    if parts > 1:
        progress(0.0, f"matching ({strategy.value}): {len(pairs)} pairs in {parts} processes")
        parallel_matching.match(
            ws.database,
            pairs,
            parts,
            config.seed,
            MATCH_BLOCK_PAIRS,
            ws.root,
            lambda done: progress(
                done / max(1, len(pairs)),
                f"matching ({strategy.value}): {done} of {len(pairs)} pairs in {parts} processes",
            ),
            should_stop,
            HEARTBEAT_SECONDS,
            thorough,
        )
        return
    blocks = max(1, math.ceil(len(pairs) / MATCH_BLOCK_PAIRS))
    block = {"index": 0, "since": time.monotonic()}  # the block COLMAP works on (0-based)

    def heard(line: str) -> None:
        if found := parallel_matching.BLOCK_LINE.search(line):
            block["index"], block["since"] = int(found.group(1)) - 1, time.monotonic()

    def tick() -> None:
        done = min(len(pairs), block["index"] * MATCH_BLOCK_PAIRS)
        progress(
            done / max(1, len(pairs)),
            f"matching ({strategy.value}): {done} of {len(pairs)} pairs, block {block['index'] + 1} of"
            f" {blocks} running for {time.monotonic() - block['since']:.0f} s",
        )

    progress(0.0, f"matching ({strategy.value}): {len(pairs)} pairs in {blocks} blocks")
    with _cancellation(should_stop) as token, colmap_log.heard(heard):
        _run_watched(
            lambda: pycolmap.match_image_pairs(
                ws.database,
                matching_options=matching_options(config),
                pairing_options=parallel_matching.pairing_options(pairs_file, MATCH_BLOCK_PAIRS),
                verification_options=parallel_matching.verification_options(config.seed, thorough),
                device=pycolmap.Device(config.device),
                cancellation_token=token,
            ),
            tick,
            HEARTBEAT_SECONDS,
        )
    check_stop(should_stop)


def _extract(
    config: SparseConfig,
    ws: Workspace,
    camera_groups: list[list[str]],
    reader: pycolmap.ImageReaderOptions,
    extraction: pycolmap.FeatureExtractionOptions,
    progress: Progress,
    should_stop: StopCheck,
) -> None:
    """SIFT in chunks of a few photos (one per core), so progress moves photo by photo; each
    camera group's later chunks reuse the camera its first chunk created."""
    n = sum(len(group) for group in camera_groups)
    chunk = max(2, extraction.num_threads)
    done = 0
    for group in camera_groups:
        reader.existing_camera_id = -1
        for start in range(0, len(group), chunk):
            progress(done / max(1, n), f"features: photo {done + 1} of {n}")
            names = group[start : start + chunk]
            with _cancellation(should_stop) as token:
                pycolmap.extract_features(
                    ws.database,
                    ws.images_dir,
                    image_names=names,
                    camera_mode=pycolmap.CameraMode.SINGLE,
                    reader_options=reader,
                    extraction_options=extraction,
                    device=pycolmap.Device(config.device),
                    cancellation_token=token,
                )
            check_stop(should_stop)
            done += len(names)
            if reader.existing_camera_id < 0 and ws.database.exists():
                db = pycolmap.Database.open(str(ws.database))
                try:
                    reader.existing_camera_id = db.read_image_with_name(names[0]).camera_id
                finally:
                    db.close()


def _renumber_images(database: Path) -> None:
    """Give images (and their one-image frames) ids in name order.

    COLMAP's extractor writes images in the order its threads finish, so the ids, and with them
    the mapper's choices, changed from run to run; in name order, the same photos give the same model.
    Runs before matching, so only these tables hold image ids yet.
    """
    con = sqlite3.connect(database)
    try:
        with con:
            rows = con.execute(
                "SELECT i.image_id, i.name, d.frame_id FROM images i "
                "JOIN frame_data d ON d.data_id = i.image_id"
            ).fetchall()
            if len({frame for _, _, frame in rows}) != len(rows):
                return  # frames with several images (rigs): keep COLMAP's ids
            shift = 1 + max(max(image, frame) for image, _, frame in rows)
            for table, column in [
                ("images", "image_id"),
                ("keypoints", "image_id"),
                ("descriptors", "image_id"),
                ("frame_data", "data_id"),
                ("frame_data", "frame_id"),
                ("frames", "frame_id"),
            ]:
                con.execute(f"UPDATE {table} SET {column} = {column} + ?", (shift,))
            for new, (image, _, frame) in enumerate(sorted(rows, key=lambda row: row[1]), start=1):
                for table, column, old in [
                    ("images", "image_id", image),
                    ("keypoints", "image_id", image),
                    ("descriptors", "image_id", image),
                    ("frame_data", "data_id", image),
                    ("frame_data", "frame_id", frame),
                    ("frames", "frame_id", frame),
                ]:
                    con.execute(f"UPDATE {table} SET {column} = ? WHERE {column} = ?", (new, old + shift))
    finally:
        con.close()


def _learned_networks(config: SparseConfig) -> tuple[Any | None, str]:
    """The DISK and LightGlue networks, or None and why not (auto mode); on: missing is an error."""
    from scandrop.models import model_store
    from scandrop.models.registry import DISK_DEPTH, LIGHTGLUE_DISK
    from scandrop.pipeline.sparse import learned_features

    if not learned_features.available():
        reason = "torch and kornia are not installed (pip install 'scandrop[learned]')"
        if config.learned == "on":
            raise ScandropError(ErrorCode.model_missing, f"Learned matching needs {reason}.", LEARNED_HINT)
        return None, reason
    models_dir = Path(config.models_dir) if config.models_dir else model_store.default_models_dir()
    try:
        disk = model_store.model_path(DISK_DEPTH, models_dir)
        glue = model_store.model_path(LIGHTGLUE_DISK, models_dir)
    except ScandropError as exc:
        if config.learned == "on" or exc.code != ErrorCode.model_missing:
            raise
        return None, f"the learned matching models are not installed ({exc.message})"
    return learned_features.load(disk, glue, config.learned_device, config.seed), "loaded"


LEARNED_HINT = (
    "For hard captures install learned matching: `pip install 'scandrop[learned]'`, or "
    "`scandrop models pull disk-depth` and `scandrop models pull lightglue-disk` "
    "(or `scandrop models import NAME FILE` on a station without hub access)."
)


def _with_learned(
    config: SparseConfig,
    ws: Workspace,
    names: list[str],
    focus: list[str],
    why: str,
    progress: Progress,
    should_stop: StopCheck,
) -> dict[str, Any]:
    """Add learned matches for `focus` (and its best partners); what was done, for report.json."""
    nets, status = _learned_networks(config)
    if nets is None:
        return {"used": False, "why": why, "skipped": status}
    candidates = learned_matching.candidate_pairs(ws.database, names, focus, 2 * config.learned_neighbours)
    # Tied by what the mapper asks to place a photo: one placed, the rest of its group follows.
    least = pycolmap.IncrementalMapperOptions().abs_pose_min_num_inliers
    groups = learned_matching.focus_groups(ws.database, focus, least)
    stats, pairs = learned_matching.add_matches(
        ws.database,
        ws.images_dir,
        candidates,
        groups,
        nets,
        max_size=config.learned_max_size,
        num_keypoints=config.learned_keypoints,
        neighbours=config.learned_neighbours,
        max_pairs=config.learned_max_pairs,
        progress=progress,
        should_stop=should_stop,
    )
    t0 = time.perf_counter()
    if pairs:
        thorough = small_set(config, len(names))
        learned_matching.verify(ws.database, pairs, ws.root / "learned_pairs.txt", config.seed, thorough)
    stats.seconds["verify"] = round(time.perf_counter() - t0, 3)
    return {"used": True, "why": why, "device": config.learned_device, **stats.model_dump()}


def run(
    config: SparseConfig,
    ws: Workspace,
    camera_groups: list[list[str]],
    progress: Progress,
    should_stop: StopCheck,
    live: LiveSink | None = None,
) -> SparseResult:
    """Register the workspace images and write the aligned model to `ws.sparse_dir`.

    `camera_groups` lists images that share intrinsics (same size, body and focal length): each
    group gets one COLMAP camera, which constrains self-calibration far better than one camera
    per photo, while mixed cameras still get their own. `live` gets snapshots of the model as
    photos are placed (at most every SNAPSHOT_SECONDS) and of the finished one.
    """
    image_names = [name for group in camera_groups for name in group]
    n = len(image_names)
    if ws.sparse_json.exists() and ws.sparse_dir.exists():
        return SparseResult.model_validate_json(ws.sparse_json.read_text())
    seconds: dict[str, float] = {}
    ws.database.unlink(missing_ok=True)
    check_stop(should_stop)
    pycolmap.set_random_seed(config.seed)

    t0 = time.perf_counter()
    progress(0.0, f"extracting features from {n} photos")
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.sift.max_num_features = features_per_image(config, n)
    extraction.num_threads = usable_cpus()  # COLMAP's -1 would start a thread per host core
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = config.camera_model
    if ws.masks_dir.exists():
        reader.mask_path = str(ws.masks_dir)
    _extract(config, ws, camera_groups, reader, extraction, _sub(progress, 0.0, 0.25), should_stop)
    if ws.database.exists():
        _renumber_images(ws.database)
    seconds["extract"] = time.perf_counter() - t0
    check_stop(should_stop)

    strategy = choose_matching(config, n)
    progress(0.25, f"matching features ({strategy.value})")
    t0 = time.perf_counter()
    _match(config, strategy, ws, n, _sub(progress, 0.25, 0.2), should_stop)
    seconds["match"] = time.perf_counter() - t0
    check_stop(should_stop)

    learned: dict[str, Any] = {"used": False}
    if config.learned == "on":
        t0 = time.perf_counter()
        learned = _with_learned(
            config, ws, image_names, image_names, "learned = on", _sub(progress, 0.45, 0.35), should_stop
        )
        seconds["learned"] = time.perf_counter() - t0

    raw_dir = ws.root / "sparse.raw"
    t0 = time.perf_counter()
    first = (0.8, 0.15) if learned["used"] else (0.45, 0.15)
    best, found, attempts = _map(
        config, ws, raw_dir, n, _sub(progress, *first), should_stop, _sub_live(live, *first)
    )
    seconds["map"] = time.perf_counter() - t0
    placed = best.num_reg_images() if best is not None else 0
    wanted = _placed_wanted(config, n)
    if config.learned == "auto" and placed < wanted:
        placed_names = {best.images[i].name for i in best.reg_image_ids()} if best is not None else set()
        focus = [name for name in image_names if name not in placed_names]
        why = f"SIFT placed {placed} of {n} photos (wanted {wanted})"
        t0 = time.perf_counter()
        learned = _with_learned(config, ws, image_names, focus, why, _sub(progress, 0.6, 0.2), should_stop)
        seconds["learned"] = time.perf_counter() - t0
        if learned["used"]:
            learned["sift_only_placed"] = placed
            t0 = time.perf_counter()
            best, found, more = _map(
                config, ws, raw_dir, n, _sub(progress, 0.8, 0.15), should_stop, _sub_live(live, 0.8, 0.15)
            )
            attempts += more
            seconds["map"] += time.perf_counter() - t0
    check_stop(should_stop)
    hint_more = "" if learned["used"] else " " + LEARNED_HINT
    tried = (
        f" Learned matching ran too ({learned['pairs_written']} of {learned['pairs']} pairs matched)."
        if learned["used"]
        else ""
    )
    if best is None:
        raise ScandropError(
            ErrorCode.no_overlap,
            f"None of the {n} photos could be connected: they do not overlap enough.{tried}",
            "Take photos with about 60-80% overlap between neighbours, moving around the object." + hint_more,
        )
    registered = sorted(best.images[i].name for i in best.reg_image_ids())
    if len(registered) < config.min_registered:
        raise ScandropError(
            ErrorCode.too_few_registered,
            f"Only {len(registered)} of {n} photos could be placed in 3D.{tried}",
            "Take more photos with more overlap, avoid plain surfaces, reflections and motion blur."
            + hint_more,
        )
    tie_points = learned_matching.tie_points_by_matcher(best, learned.get("keypoints_from", {}))
    placed_by = {name: "learned" if c["learned"] > c["sift"] else "sift" for name, c in tie_points.items()}

    progress(0.95, "turning the model upright")
    frame = world_frame.estimate(best)
    best.transform(frame.sim3d())
    if live is not None and (final := model_snapshot.snapshot(best, in_world_frame=True)) is not None:
        live(0.95, f"the model upright: {len(registered)} of {n} photos placed", final)
    with atomic_dir(ws.sparse_dir) as tmp_dir:
        best.write_binary(str(tmp_dir))
    shutil.rmtree(raw_dir, ignore_errors=True)

    result = SparseResult(
        matching=strategy,
        images=n,
        registered=len(registered),
        registered_names=registered,
        unregistered=sorted(set(image_names) - set(registered)),
        models_found=found,
        points3D=best.num_points3D(),
        mean_reprojection_error_px=float(best.compute_mean_reprojection_error()),
        mean_track_length=float(best.compute_mean_track_length()),
        up_method=frame.method,
        seconds={k: round(v, 3) for k, v in seconds.items()},
        seed=config.seed,
        mapping=attempts,
        learned=learned,
        placed_by=placed_by,
        tie_points=tie_points,
    )
    write_json_atomic(ws.sparse_json, result.model_dump(mode="json"))
    progress(1.0, f"{len(registered)} of {n} photos registered")
    return result


def _placed_wanted(config: SparseConfig, n: int) -> int:
    """Photos SIFT must place for the learned matcher to stay off: a small set all of them (each
    photo of a few matters), a larger one `learned_min_placed_fraction` (LightGlue is ~100x SIFT's
    cost per pair: a big set that SIFT handles must not pay for it)."""
    if n <= config.learned_small_set:
        return n
    return math.ceil(config.learned_min_placed_fraction * n)


def _sub(progress: Progress, start: float, span: float) -> Progress:
    """A part of this stage's progress bar: `fraction` 0..1 of it maps onto start..start+span."""
    return lambda fraction, message: progress(start + span * fraction, message)


def _sub_live(live: LiveSink | None, start: float, span: float) -> LiveSink | None:
    """`_sub` for a stage's progress with a model snapshot."""
    if live is None:
        return None
    return lambda fraction, message, model: live(start + span * fraction, message, model)


def _map(
    config: SparseConfig,
    ws: Workspace,
    raw_dir: Path,
    n: int,
    progress: Progress,
    should_stop: StopCheck,
    live: LiveSink | None,
) -> tuple[pycolmap.Reconstruction | None, int, list[MappingAttempt]]:
    said = [0.0, ""]  # the last progress: a snapshot goes out with it

    def placed(count: int, method: str) -> None:
        said[:] = [min(1.0, count / max(1, n)), f"mapping ({method}): {min(count, n)} of {n} photos placed"]
        progress(*said)

    def grown(model: pycolmap.Reconstruction) -> None:
        try:
            snap = model_snapshot.snapshot(model)
        except (
            RuntimeError,
            ValueError,
            np.linalg.LinAlgError,
        ) as exc:  # the live view only: the job goes on
            structlog.get_logger("scandrop.sparse").warning("live_model_failed", error=str(exc))
            return
        if live is not None and snap is not None:
            live(float(said[0]), str(said[1]), snap)

    throttle = Throttle()
    with _cancellation(should_stop) as token:
        return mapping.map_images(
            ws.database,
            ws.images_dir,
            raw_dir,
            n,
            config.seed,
            config.min_registered,
            token,
            placed,
            on_model=grown if live is not None else None,
            model_due=throttle.due,
        )
