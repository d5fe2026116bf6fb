"""A job's settings: drop file > hot folder > global settings, stage overrides merged field by field;
a bad drop file is invalid_settings naming the key; the remaining-time estimate."""

from __future__ import annotations

from pathlib import Path

import pytest

from scandrop.daemon.job_runner import estimate_remaining
from scandrop.daemon.job_settings import HotFolder, JobOptions, JobSettings, effective, read_drop_options
from scandrop.models.device import DeviceRequest
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.job_spec import Preset

BASE = JobSettings(
    preset=Preset.balanced, device=DeviceRequest.auto, max_triangles=300_000, sources=["settings"]
)


def test_precedence_drop_over_hot_folder_over_global() -> None:
    folder = HotFolder(
        name="quality",
        inbox=Path("/x"),
        preset=Preset.quality,
        device=DeviceRequest.cpu,
        stages={"mesh": {"depth": 9, "max_triangles": 5000}},
    )
    drop = JobOptions(preset=Preset.fast, stages={"mesh": {"depth": 7}, "fuse": {"neighbours": 4}})
    job = effective(BASE, ("hot folder quality", folder), ("scandrop.toml", drop))
    assert job.preset == Preset.fast and job.device == DeviceRequest.cpu and job.max_triangles == 300_000
    assert job.stages == {"mesh": {"depth": 7, "max_triangles": 5000}, "fuse": {"neighbours": 4}}
    assert job.sources == ["settings", "hot folder quality", "scandrop.toml"]
    assert effective(BASE, ("hot folder x", None), ("scandrop.toml", None)) == BASE


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('presett = "fast"', "presett"),
        ('preset = "fastest"', "preset"),
        ("max_triangles = 10", "max_triangles"),
        ("preset = fast", "cannot be read"),
    ],
)
def test_a_bad_drop_file_is_invalid_settings_naming_the_key(tmp_path: Path, text: str, named: str) -> None:
    (tmp_path / "scandrop.toml").write_text(text)
    with pytest.raises(ScandropError) as caught:
        read_drop_options(tmp_path)
    assert caught.value.code == ErrorCode.invalid_settings
    assert named in caught.value.message and "scandrop.toml" in caught.value.message and caught.value.hint


def test_drop_file_read_and_absent(tmp_path: Path) -> None:
    assert read_drop_options(tmp_path) is None
    (tmp_path / "scandrop.toml").write_text('preset = "fast"\n[stages.mesh]\ndepth = 6\n')
    assert read_drop_options(tmp_path) == JobOptions(preset=Preset.fast, stages={"mesh": {"depth": 6}})


def test_remaining_time_follows_the_pace_once_there_is_enough_to_go_on() -> None:
    assert estimate_remaining(2.0, 0.0, 0.5) is None  # too early
    assert estimate_remaining(60.0, 0.0, 0.01) is None  # too little progress
    assert estimate_remaining(30.0, 0.0, 0.25) == 90.0
    assert estimate_remaining(30.0, 0.5, 0.75) == 30.0  # a resumed job: only this run's pace counts
