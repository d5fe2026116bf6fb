"""`--set STAGE.FIELD=VALUE`: the command line's stage settings, for one job and for the benchmark."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from scandrop.daemon.cli import main, stage_overrides
from scandrop.pipeline.bench import run as bench_run
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.job_spec import JobSpec, Preset, merge_overrides


@pytest.fixture(autouse=True)
def keep_logging() -> Iterator[None]:
    config = structlog.get_config()
    yield
    structlog.configure(**config)  # cli.main configures logging onto the captured stderr


def test_values_read_as_toml_and_bare_words_as_strings() -> None:
    items = [
        "depth.max_image_size=800",
        "depth.agree_rel = 0.02",
        "mesh.refine=false",
        "depth.method=sgbm",
        'export.texture="vertex"',
        "depth.max_image_size=640",  # the last one wins
    ]
    assert stage_overrides(items) == {
        "depth": {"max_image_size": 640, "agree_rel": 0.02, "method": "sgbm"},
        "mesh": {"refine": False},
        "export": {"texture": "vertex"},
    }


@pytest.mark.parametrize("item", ["depth", "depth=800", ".max_image_size=800", "depth.=1", "depth.max 800"])
def test_an_item_that_is_not_stage_field_value_is_refused(item: str) -> None:
    with pytest.raises(ScandropError) as info:
        stage_overrides([item])
    assert info.value.code is ErrorCode.invalid_settings
    assert "STAGE.FIELD=VALUE" in info.value.message


def test_layers_merge_field_by_field_the_later_winning() -> None:
    base = {"mesh": {"max_triangles": 300_000, "depth": 9}}
    top = {"mesh": {"depth": 8}, "depth": {"pm_sources": 3}}
    assert merge_overrides(base, top) == {
        "mesh": {"max_triangles": 300_000, "depth": 8},
        "depth": {"pm_sources": 3},
    }
    assert base == {"mesh": {"max_triangles": 300_000, "depth": 9}}  # the layers are not changed


@pytest.mark.parametrize("command", ["reconstruct", "bench"])
def test_a_bad_setting_stops_the_command_before_any_work(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = {
        "reconstruct": ["reconstruct", str(tmp_path / "photos"), str(tmp_path / "out"), "--device", "cpu"],
        "bench": ["bench", "synthetic", "--out", str(tmp_path / "out")],
    }[command]
    assert main([*args, "--set", "depth.pm_sources=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error [invalid_settings]: Invalid job setting depth.pm_sources")
    assert main([*args, "--set", "depth.no_such_field=1"]) == 2
    assert "depth.no_such_field" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_benchmark_runs_every_row_with_the_settings_and_a_row_s_own_on_top(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ran: list[JobSpec] = []

    class Stop(Exception):
        pass

    def run_job(images: Path, out: Path, spec: JobSpec, work: Path, device: dict[str, Any]) -> None:
        ran.append(spec)
        raise Stop

    monkeypatch.setattr(bench_run, "run_job", run_job)
    spec = JobSpec(preset=Preset.quality, overrides={"depth": {"max_image_size": 800}})
    (tmp_path / "data" / bench_run.SHARED_NAMES["room"] / "images").mkdir(parents=True)
    with pytest.raises(Stop):
        bench_run.main(["room"], tmp_path / "out", spec, tmp_path / "data")
    with pytest.raises(Stop):
        bench_run._run_ours(
            tmp_path, tmp_path / "row", spec, {"frames": {"max_frames": 50}, "depth": {"workers": 1}}
        )
    assert [s.preset for s in ran] == [Preset.quality, Preset.quality]
    assert ran[0].overrides == {"depth": {"max_image_size": 800}}
    assert ran[1].overrides == {"depth": {"max_image_size": 800, "workers": 1}, "frames": {"max_frames": 50}}


def test_without_a_triangle_cap_each_preset_keeps_its_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Quality's cap is 1 000 000; the command line's and the daemon's settings used to put 300 000
    over it whether asked to or not."""
    from scandrop.daemon import worker
    from scandrop.daemon.job_runner import JobRunner
    from scandrop.daemon.job_settings import JobSettings
    from scandrop.daemon.settings import Settings
    from scandrop.models.device import DeviceRequest
    from scandrop.pipeline.presets import resolve

    ran: list[JobSpec] = []

    class Stop(Exception):
        pass

    def run_job(images: Path, out: Path, spec: JobSpec, *args: Any, **kwargs: Any) -> None:
        ran.append(spec)
        raise Stop

    monkeypatch.setattr(worker, "run_job", run_job)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # the command's Ctrl-C handling, not pytest's
    args = ["reconstruct", str(tmp_path / "photos"), str(tmp_path / "out"), "--device", "cpu"]
    for more in (["--preset", "quality"], ["--preset", "quality", "--max-triangles", "50000"], []):
        with pytest.raises(Stop):
            main([*args, *more])
    assert [resolve(spec).mesh.max_triangles for spec in ran] == [1_000_000, 50_000, 300_000]

    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.max_triangles is None
    runner = JobRunner(settings, None, None, {}, lambda status: True)  # type: ignore[arg-type]
    for cap, wanted in ((None, 1_000_000), (40_000, 40_000)):
        job = JobSettings(preset=Preset.quality, device=DeviceRequest.cpu, max_triangles=cap)
        status = type("Status", (), {"settings": job})()
        assert resolve(runner.job_spec(status)).mesh.max_triangles == wanted
