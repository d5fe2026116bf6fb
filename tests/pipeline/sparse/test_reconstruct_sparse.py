"""Sparse reconstruction: the pairing strategy fits the input, and every strategy gets the poses right."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pycolmap
import pytest

from scandrop.pipeline.bench import metrics, synthetic
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.stage import never_stop, no_progress
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.ingest import ingest_images
from scandrop.pipeline.sparse import reconstruct_sparse
from scandrop.pipeline.sparse.reconstruct_sparse import (
    Matching,
    SparseConfig,
    _run_watched,
    choose_matching,
    features_per_image,
)


def test_strategy_follows_the_input() -> None:
    config = SparseConfig()
    assert choose_matching(config, 25) == Matching.exhaustive
    assert choose_matching(config, 500) == Matching.retrieval
    assert choose_matching(SparseConfig(ordered=True), 500) == Matching.sequential
    assert choose_matching(SparseConfig(matching=Matching.exhaustive), 500) == Matching.exhaustive
    assert features_per_image(config, 8) > features_per_image(config, 100)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[synthetic.SyntheticScene, Path]:
    scene = synthetic.render_scene(n_views=24, width=480, height=360, seed=1)
    folder = tmp_path_factory.mktemp("photos")
    synthetic.write_scene(scene, folder)
    return scene, folder


@pytest.mark.parametrize(
    "config",
    [
        # One matching process: its progress is COLMAP's block lines (parallel_matching's own
        # progress is tested with it).
        SparseConfig(ordered=True, sequential_overlap=4, match_workers=1),
        SparseConfig(matching=Matching.retrieval, retrieval_neighbors=8, match_workers=1),
    ],
    ids=["sequential-with-loop-closure", "retrieval"],
)
def test_sparser_pairings_still_register_every_view(
    photos: tuple[synthetic.SyntheticScene, Path],
    tmp_path: Path,
    config: SparseConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reconstruct_sparse, "HEARTBEAT_SECONDS", 0.05)  # a tick inside every block
    scene, folder = photos
    ws = Workspace(tmp_path / "ws").create()
    ingested = ingest_images.run(ingest_images.IngestConfig(), folder, ws, no_progress, never_stop)
    said: list[tuple[float, str]] = []
    result = reconstruct_sparse.run(
        config, ws, ingested.camera_groups(), lambda f, m, *_: said.append((f, m)), never_stop
    )
    assert result.matching == choose_matching(config, len(scene.names))
    assert result.registered == len(scene.names), result.unregistered
    # Matching is one COLMAP call in blocks: its log says which block runs, a tick reports it.
    blocks = int(next(b[1] for _, m in said if (b := re.search(r"pairs in (\d+) blocks", m))))
    matched = [f for f, m in said if m.startswith("matching") and " block " in m]
    # Block after block, in order (a block of pairs matched before, or a short last one, can end
    # between two ticks).
    assert blocks >= 3 and len(set(matched)) >= 3 and matched == sorted(matched), (blocks, matched)

    rec = pycolmap.Reconstruction(str(ws.sparse_dir))
    est = {rec.images[i].name: rec.images[i].cam_from_world().rotation.matrix() for i in rec.reg_image_ids()}
    errors = metrics.relative_rotation_errors(est, dict(zip(scene.names, scene.R, strict=True)))
    assert np.median(errors) < 0.1


def test_a_watched_call_ticks_while_it_runs_and_raises_in_the_caller() -> None:
    ticks: list[float] = []
    _run_watched(lambda: time.sleep(0.35), lambda: ticks.append(time.monotonic()), 0.1)
    assert 2 <= len(ticks) <= 4

    def fail() -> None:
        raise InterruptedError("cancelled")

    with pytest.raises(InterruptedError):
        _run_watched(fail, lambda: None, 0.1)


def test_cancel_lands_inside_colmap_calls(
    photos: tuple[synthetic.SyntheticScene, Path], tmp_path: Path
) -> None:
    _, folder = photos
    ws = Workspace(tmp_path / "ws").create()
    ingested = ingest_images.run(ingest_images.IngestConfig(), folder, ws, no_progress, never_stop)
    t0 = time.monotonic()
    with pytest.raises(ScandropError) as info:
        reconstruct_sparse.run(
            SparseConfig(), ws, ingested.camera_groups(), no_progress, lambda: time.monotonic() - t0 > 1.0
        )
    assert info.value.code == ErrorCode.cancelled
    assert time.monotonic() - t0 < 6.0  # a full run of this stage takes well over 10 s here
