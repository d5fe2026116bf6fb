"""The plain pycolmap baseline: a real run on a rendered scene, scored against its true cameras."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scandrop.pipeline.bench.baseline import run_plain_pycolmap
from scandrop.pipeline.bench.metrics import relative_rotation_errors
from scandrop.pipeline.bench.synthetic import render_scene, write_scene


def test_plain_run_registers_all_views_with_accurate_rotations(tmp_path: Path) -> None:
    # 16 views: with 8 (90 degrees apart in each ring) plain pycolmap at 320x240 finds no model.
    scene = render_scene(n_views=16, width=320, height=240)
    write_scene(scene, tmp_path / "images")
    result = run_plain_pycolmap(tmp_path / "images", tmp_path / "work")
    assert result.total_images == 16
    assert result.registered == 16
    assert set(result.rotations) == set(scene.names)
    errors = relative_rotation_errors(
        result.rotation_matrices(), dict(zip(scene.names, scene.R, strict=True))
    )
    assert np.median(errors) < 0.3
    assert np.percentile(errors, 90) < 0.5
    assert 0 < result.mean_reprojection_error < 1.0
    s = result.seconds
    assert s.extract > 0 and s.match > 0 and s.map > 0
    assert abs(s.wall - (s.extract + s.match + s.map)) < 1e-6
    assert 50 < result.peak_rss_mb < 4000
