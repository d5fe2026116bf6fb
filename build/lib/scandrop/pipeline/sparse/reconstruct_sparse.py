"""Sparse reconstruction: SIFT features, matching chosen by input, incremental mapping (COLMAP).

Ends by turning the model into the scandrop world frame (+y up, centred, unit-ish scale), so that
every later stage and every output share one frame and viewers show the object upright.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Literal

import numpy as np
import pycolmap
from pydantic import BaseModel, ConfigDict, Field

from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.stage import Progress, StopCheck, atomic_dir, check_stop, write_json_atomic
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.sparse import world_frame


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
        12, ge=0, description="Sets this small match few pairs: they get small_set_features instead."
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


def features_per_image(config: SparseConfig, num_images: int) -> int:
    """More features where there are few pairs to match: accuracy for small sets, speed for larger."""
    if num_images <= config.small_set_max_images:
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


def _build_visual_index(ws: Workspace, path: Path, num_images: int) -> Path:
    """Build a small vocabulary tree from this scene's own descriptors (no download, works offline)."""
    per_image = max(50, min(1000, VOCAB_TRAIN_DESCRIPTORS // max(1, num_images)))
    db = pycolmap.Database.open(str(ws.database))
    try:
        rng = np.random.default_rng(0)
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
    index.build(options, pycolmap.FeatureDescriptorsFloat(pycolmap.FeatureExtractorType.SIFT, stack))
    index.write(str(path))
    return path


def _match(
    config: SparseConfig,
    strategy: Matching,
    ws: Workspace,
    num_images: int,
    token: pycolmap.CancellationToken,
) -> None:
    matching = pycolmap.FeatureMatchingOptions()
    if strategy == Matching.exhaustive:
        pycolmap.match_exhaustive(
            ws.database,
            matching_options=matching,
            device=pycolmap.Device(config.device),
            cancellation_token=token,
        )
    elif strategy == Matching.sequential:
        pairing = pycolmap.SequentialPairingOptions()
        pairing.overlap = config.sequential_overlap
        if num_images > 3 * config.sequential_overlap:
            pairing.loop_detection = True
            pairing.loop_detection_period = max(1, config.sequential_overlap // 2)
            pairing.vocab_tree_path = str(_build_visual_index(ws, ws.root / "vocab_tree.bin", num_images))
        pycolmap.match_sequential(
            ws.database,
            matching_options=matching,
            pairing_options=pairing,
            device=pycolmap.Device(config.device),
            cancellation_token=token,
        )
    else:
        pairing = pycolmap.VocabTreePairingOptions()
        pairing.num_images = config.retrieval_neighbors
        pairing.vocab_tree_path = str(_build_visual_index(ws, ws.root / "vocab_tree.bin", num_images))
        pycolmap.match_vocabtree(
            ws.database,
            matching_options=matching,
            pairing_options=pairing,
            device=pycolmap.Device(config.device),
            cancellation_token=token,
        )


def run(
    config: SparseConfig,
    ws: Workspace,
    camera_groups: list[list[str]],
    progress: Progress,
    should_stop: StopCheck,
) -> SparseResult:
    """Register the workspace images and write the aligned model to `ws.sparse_dir`.

    `camera_groups` lists images that share intrinsics (same size, body and focal length): each
    group gets one COLMAP camera, which constrains self-calibration far better than one camera
    per photo, while mixed cameras still get their own.
    """
    image_names = [name for group in camera_groups for name in group]
    if ws.sparse_json.exists() and ws.sparse_dir.exists():
        return SparseResult.model_validate_json(ws.sparse_json.read_text())
    seconds: dict[str, float] = {}
    ws.database.unlink(missing_ok=True)
    check_stop(should_stop)

    t0 = time.perf_counter()
    progress(0.0, f"extracting features from {len(image_names)} photos")
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.sift.max_num_features = features_per_image(config, len(image_names))
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = config.camera_model
    if ws.masks_dir.exists():
        reader.mask_path = str(ws.masks_dir)
    for group in camera_groups:
        with _cancellation(should_stop) as token:
            pycolmap.extract_features(
                ws.database,
                ws.images_dir,
                image_names=group,
                camera_mode=pycolmap.CameraMode.SINGLE,
                reader_options=reader,
                extraction_options=extraction,
                device=pycolmap.Device(config.device),
                cancellation_token=token,
            )
        check_stop(should_stop)
    seconds["extract"] = time.perf_counter() - t0
    check_stop(should_stop)

    strategy = choose_matching(config, len(image_names))
    progress(0.35, f"matching features ({strategy.value})")
    t0 = time.perf_counter()
    with _cancellation(should_stop) as token:
        _match(config, strategy, ws, len(image_names), token)
    seconds["match"] = time.perf_counter() - t0
    check_stop(should_stop)

    progress(0.7, "incremental mapping")
    t0 = time.perf_counter()
    raw_dir = ws.root / "sparse.raw"
    shutil.rmtree(raw_dir, ignore_errors=True)
    raw_dir.mkdir()
    mapping = pycolmap.IncrementalPipelineOptions()
    with _cancellation(should_stop) as token:
        models = pycolmap.incremental_mapping(
            ws.database, ws.images_dir, raw_dir, options=mapping, cancellation_token=token
        )
    seconds["map"] = time.perf_counter() - t0
    check_stop(should_stop)
    if not models:
        raise ScandropError(
            ErrorCode.no_overlap,
            f"None of the {len(image_names)} photos could be connected: they do not overlap enough.",
            "Take photos with about 60-80% overlap between neighbours, moving around the object.",
        )
    best = max(models.values(), key=lambda rec: rec.num_reg_images())
    registered = sorted(best.images[i].name for i in best.reg_image_ids())
    if len(registered) < config.min_registered:
        raise ScandropError(
            ErrorCode.too_few_registered,
            f"Only {len(registered)} of {len(image_names)} photos could be placed in 3D.",
            "Take more photos with more overlap, avoid plain surfaces, reflections and motion blur.",
        )

    progress(0.95, "turning the model upright")
    frame = world_frame.estimate(best)
    best.transform(frame.sim3d())
    with atomic_dir(ws.sparse_dir) as tmp_dir:
        best.write_binary(str(tmp_dir))
    shutil.rmtree(raw_dir, ignore_errors=True)

    result = SparseResult(
        matching=strategy,
        images=len(image_names),
        registered=len(registered),
        registered_names=registered,
        unregistered=sorted(set(image_names) - set(registered)),
        models_found=len(models),
        points3D=best.num_points3D(),
        mean_reprojection_error_px=float(best.compute_mean_reprojection_error()),
        mean_track_length=float(best.compute_mean_track_length()),
        up_method=frame.method,
        seconds={k: round(v, 3) for k, v in seconds.items()},
    )
    write_json_atomic(ws.sparse_json, result.model_dump(mode="json"))
    progress(1.0, f"{len(registered)} of {len(image_names)} photos registered")
    return result
