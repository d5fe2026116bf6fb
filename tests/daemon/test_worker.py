"""The worker process turns every way a job can end into a report, never a traceback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from PIL import Image

from scandrop.daemon.worker import run_job, warm_up
from scandrop.pipeline.bench import synthetic
from scandrop.pipeline.core.errors import ErrorCode
from scandrop.pipeline.core.stage import ProgressEvent
from scandrop.pipeline.job_spec import JobSpec
from scandrop.pipeline.report import Report


def _noise_photos(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(folder / f"noise_{i}.png")
    return folder


def _run(tmp_path: Path, photos: Path, **kw: Any) -> Report:
    return run_job(photos, tmp_path / "out", JobSpec(preset="fast"), tmp_path / "work", {"name": "cpu"}, **kw)


def test_photos_that_do_not_overlap_fail_clearly(tmp_path: Path) -> None:
    photos = _noise_photos(tmp_path / "photos", 4)
    report = _run(tmp_path, photos)
    assert not report.ok
    assert report.error is not None and report.error.code in (
        ErrorCode.no_overlap,
        ErrorCode.too_few_registered,
    )
    assert report.error.hint
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["error"]["code"] == report.error.code.value
    assert saved["images"]["usable"] == 4


def test_cancel_stops_the_job(tmp_path: Path) -> None:
    photos = _noise_photos(tmp_path / "photos", 6)
    seen: list[ProgressEvent] = []
    report = _run(tmp_path, photos, on_event=seen.append, should_stop=lambda: len(seen) > 0)
    assert report.error is not None and report.error.code == ErrorCode.cancelled
    assert seen and seen[0].stage == "ingest"


def test_a_crashed_worker_becomes_a_report(tmp_path: Path) -> None:
    photos = _noise_photos(tmp_path / "photos", 6)

    def kill_worker(event: ProgressEvent) -> None:
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(child.pid) == child.pid:  # the job process leads its own group
                    os.kill(child.pid, signal.SIGKILL)  # as the OOM killer would

    report = _run(tmp_path, photos, on_event=kill_worker)
    assert report.error is not None and report.error.code == ErrorCode.worker_crashed
    assert "killed by signal 9" in report.error.message
    assert json.loads((tmp_path / "out" / "report.json").read_text())["error"]["code"] == "worker_crashed"


def test_cli_reports_a_clear_failure(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scandrop.daemon.cli",
            "reconstruct",
            str(tmp_path / "empty"),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "no_input" in proc.stderr and "hint:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_refuses_cuda_without_a_gpu(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scandrop.daemon.cli",
            "reconstruct",
            str(tmp_path),
            str(tmp_path / "o"),
            "--device",
            "cuda",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "device_unavailable" in proc.stderr and "Traceback" not in proc.stderr


def test_an_invalid_job_setting_is_reported_not_a_crash(tmp_path: Path) -> None:
    photos = _noise_photos(tmp_path / "photos", 3)
    spec = JobSpec(preset="fast", overrides={"frames": {"target_motion": 0.0}})
    report = run_job(photos, tmp_path / "out", spec, tmp_path / "work", {"name": "cpu"})
    assert not report.ok and report.error is not None
    assert report.error.code == ErrorCode.invalid_settings
    assert "frames.target_motion" in report.error.message
    assert json.loads((tmp_path / "out" / "report.json").read_text())["error"]["code"] == "invalid_settings"


@pytest.fixture(scope="module")
def scene_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    photos = tmp_path_factory.mktemp("scene") / "photos"
    synthetic.write_scene(synthetic.render_scene(n_views=8, width=320, height=240, seed=0), photos)
    return photos


@pytest.mark.parametrize("room", ["half_the_photos", "photos_and_300kb"])
def test_a_really_full_disk_fails_as_disk_full(tmp_path: Path, scene_photos: Path, room: str) -> None:
    """The work folder on a tmpfs that fills up: while copying the photos (Python sees ENOSPC), or
    inside COLMAP's feature database (native code aborts the job process, no errno to read)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare to mount a small tmpfs in a private mount namespace")
    size = sum(p.stat().st_size for p in scene_photos.iterdir())
    size = size // 2 if room == "half_the_photos" else size + 300_000
    mount = tmp_path / "small"
    mount.mkdir()
    job = [sys.executable, "-m", "scandrop.daemon.cli", "reconstruct", "--preset", "fast"]
    job += ["--work-dir", str(mount / "work"), str(scene_photos), str(tmp_path / "out")]
    script = f'mount -t tmpfs -o size={size} tmpfs "$1" || exit 99; shift; exec "$@"'
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", str(mount), *job],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode == 99:
        pytest.skip(f"mounting a tmpfs is not permitted here: {proc.stderr.strip()}")
    error = json.loads((tmp_path / "out" / "report.json").read_text())["error"]
    assert proc.returncode == 1 and error["code"] == "disk_full", error
    assert str(mount / "work") in error["message"] and error["hint"]
    assert "Traceback" not in proc.stderr


def _fork_server_children() -> list[psutil.Process]:
    """The processes the jobs' fork server has started (jobs, the warm-up) and that still run."""
    servers = [p for p in psutil.Process().children() if "forkserver" in " ".join(p.cmdline())]
    return [child for server in servers for child in server.children(recursive=True)]


def test_the_warm_up_runs_at_the_lowest_priority_and_is_stopped_on_request() -> None:
    niceness: list[int] = []

    def watch() -> bool:
        niceness.extend(p.nice() for p in _fork_server_children())
        return False

    seconds = warm_up(should_stop=watch)
    assert seconds is not None and seconds > 0  # compiled, or loaded from numba's cache
    assert 19 in niceness  # jobs and the daemon come first
    assert _fork_server_children() == []

    assert warm_up(should_stop=lambda: True) is None  # the daemon stopping: killed, not waited for
    assert _fork_server_children() == []
