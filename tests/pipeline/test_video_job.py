"""A video drop end to end: keyframes, sequential SfM, every output, poses against the rendered truth."""

from __future__ import annotations

from pathlib import Path

import pytest

from scandrop.daemon.worker import run_job
from scandrop.pipeline.bench import synthetic
from scandrop.pipeline.bench.run import estimated_cameras, score_poses
from scandrop.pipeline.job_spec import JobSpec
from scandrop.pipeline.report import Report

pytestmark = pytest.mark.long(2)


@pytest.fixture(scope="module")
def video_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Report, Path, synthetic.SyntheticScene]:
    root = tmp_path_factory.mktemp("video")
    scene = synthetic.render_scene(n_views=48, width=320, height=240, seed=2, path="video")
    synthetic.write_video(scene, root / "orbit.mp4")
    out = root / "out"
    report = run_job(root / "orbit.mp4", out, JobSpec(preset="fast"), root / "work", {"name": "cpu"})
    return report, out, scene


def test_video_job_succeeds_with_every_output(
    video_job: tuple[Report, Path, synthetic.SyntheticScene],
) -> None:
    report, out, _ = video_job
    assert report.ok, report.error
    assert report.kind == "video"
    assert [s.name for s in report.stages][:3] == ["frames", "ingest", "sparse"]
    for name in ("model.glb", "points.ply", "splats.splat", "cameras/transforms.json", "preview.png"):
        assert (out / name).is_file()
    frames = report.frames or {}
    assert frames["decoded"] == 48 and 20 <= frames["kept"] <= 48
    assert report.images.input == frames["kept"]


def test_video_keyframes_register_with_accurate_poses(
    video_job: tuple[Report, Path, synthetic.SyntheticScene],
) -> None:
    report, out, scene = video_job
    kept = (report.frames or {})["kept"]
    assert report.images.registered >= 0.9 * kept
    truth = {f"frame_{i:06d}.jpg": cam for i, cam in enumerate(scene.cameras().values())}
    poses = score_poses(estimated_cameras(out), truth)
    assert poses["rot_err_median_deg"] < 0.3, poses
