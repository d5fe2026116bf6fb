"""Integration: the real daemon process, real folders, real HTTP and WebSocket on loopback."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pycolmap
import pytest
from daemon_process import Daemon, EventListener, wait_for
from PIL import Image

from scandrop.models.device import resolve_device
from scandrop.pipeline.core.live_model import MAX_POINTS, LiveModel
from scandrop.pipeline.core.plyio import read_ply, xyz_of
from scandrop.pipeline.ingest.input_kind import InputKind
from scandrop.pipeline.plan import plan_stages

pytestmark = pytest.mark.long(6)

OUTPUTS = ["model.glb", "points.ply", "splats.splat", "splats.ply", "cameras/transforms.json", "preview.png"]
PIPELINE_STAGES = plan_stages(InputKind.photos)  # every stage must stream its events


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    yield d
    d.stop()


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class FakeSystemd:
    """A notify socket read as systemd reads it: at once, in the background."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.lines += self._sock.recv(4096).decode().splitlines()
            except TimeoutError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


@pytest.fixture
def patient_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon with the default 5 s stability window of local disks."""
    d = Daemon(tmp_path, stability_seconds=5)
    yield d
    d.stop()


def test_slow_copy_waits_then_succeeds_with_live_events(patient_daemon: Daemon, photos: Path) -> None:
    daemon = patient_daemon
    systemd = FakeSystemd(daemon.root / "notify.sock")
    try:
        daemon.start({"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "1000000"})
        with EventListener(daemon) as listener, EventListener(daemon, watch="new") as watcher:
            drop = daemon.inbox / "Scan of the tin robot"
            drop.mkdir()
            files = sorted(photos.iterdir())
            for f in files[:18]:
                shutil.copy2(f, drop / f.name)
            for f in files[18:]:  # a slow copy: a file every 2.5 s, the drop never still for 5 s
                time.sleep(1.25)
                assert daemon.jobs() == [], "a job started before the drop was complete"
                waiting = daemon.get("/api/status")["queue"]["waiting"]
                assert [w["name"] for w in waiting] == [drop.name]
                time.sleep(1.25)
                shutil.copy2(f, drop / f.name)
            copied_at = time.time()
            first = wait_for(
                lambda: next((e for e in watcher.events if e["type"] == "model"), None), 120, "a live model"
            )
            # A page that opens the job late gets the latest model at once; an unknown job is refused.
            opens = [
                {"type": "subscribe", "job_id": "no-such-job"},
                {"type": "subscribe", "job_id": first["job_id"]},
            ]
            with EventListener(daemon, watch=opens) as late:
                wait_for(lambda: any(e["type"] == "model" for e in late.events), 5, "the latest model")
            job = daemon.wait_job(lambda j: j["state"] == "succeeded", 180, "the job to succeed")
            wait_for(
                lambda: any(
                    e["type"] == "state" and e["job"]["state"] == "succeeded" for e in listener.events
                ),
                10,
                "the succeeded event",
            )
    finally:
        systemd.close()
    lines = systemd.lines

    # Started only once complete, from all 24 photos.
    created = np.datetime64(job["created_at"].rstrip("Z")).astype("datetime64[ms]").astype(float) / 1000
    assert created >= copied_at - 0.5
    assert job["input"]["files"] == 24 and job["error"] is None and job["attempts"] == 1
    # All outputs whole, listed with the right checksums, served by the API.
    out = Path(job["outbox"])
    listed = {o["name"]: o for o in job["outputs"]}
    for name in [*OUTPUTS, "report.json"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0
        assert listed[name]["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "no partial files left behind"
    assert job["report"]["images"]["registered"] >= 22
    status, body = daemon.request("GET", f"/api/jobs/{job['job_id']}/files/model.glb")
    assert status == 200 and body == (out / "model.glb").read_bytes()
    for escape in ["../../state/jobs.sqlite3", "%2e%2e/%2e%2e/state/jobs.sqlite3", "status.json/../../x"]:
        status, body = daemon.request("GET", f"/api/jobs/{job['job_id']}/files/{escape}")
        assert status == 404 and body["error"]["code"] == "not_found", escape
    on_disk = (out / "status.json").read_text()
    assert '"state": "succeeded"' in on_disk
    # The input is kept, byte for byte, where status.json says.
    kept = Path(job["input"]["location"])
    assert kept.parent.parent.name == "done" and _digests(kept) == _digests(photos)
    assert not drop.exists()
    # The WebSocket saw a snapshot, the job's creation, every stage and progress in between.
    kinds = [e["type"] for e in listener.events]
    assert kinds[0] == "snapshot" and "created" in kinds and "progress" in kinds
    stages = [e["job"]["stage"] for e in listener.events if e["type"] == "stage"]
    assert stages == PIPELINE_STAGES
    # At start the daemon compiled the pipeline's kernels at the lowest priority, beside the job
    # (on a loaded machine the job can end first: the warm-up only gets idle CPU).
    warmed = wait_for(lambda: daemon.logged("kernels_ready", "kernels_warm_up_failed"), 300, "the warm-up")
    assert [e["event"] for e in warmed] == ["kernels_ready"], warmed
    progress = [e["job"]["progress"] for e in listener.events if e["type"] in ("stage", "progress")]
    assert progress == sorted(progress) and progress[-1] > 0.9
    _assert_live_models(job, watcher, listener)
    assert [e["error"]["code"] for e in late.events if e["type"] == "error"] == ["not_found"]
    assert {e["job_id"] for e in late.events if e["type"] == "model"} == {job["job_id"]}
    # systemd heard READY, a STATUS naming the job, and watchdog pings.
    assert "READY=1" in lines and "WATCHDOG=1" in lines
    assert any(line.startswith("STATUS=") and job["job_id"] in line for line in lines)

    # The same photos dropped again are recognised and point to the first result.
    shutil.copytree(photos, daemon.inbox / "again")
    again = daemon.wait_job(lambda j: j["input"]["name"] == "again" and j["state"] == "succeeded", 30, "dup")
    assert again["duplicate_of"] == job["job_id"] and again["content_hash"] == job["content_hash"]
    status, body = daemon.request("GET", f"/api/jobs/{again['job_id']}/files/model.glb")
    assert status == 200 and body == (out / "model.glb").read_bytes()


def _assert_live_models(job: dict, watcher: EventListener, listener: EventListener) -> None:
    """The page that opened the job saw its sparse model grow, then its dense points; others nothing."""
    assert not [e for e in listener.events if e["type"] == "model"], "a page that did not open the job got it"
    sent = [
        (e, at) for e, at in zip(watcher.events, watcher.received_at, strict=True) if e["type"] == "model"
    ]
    assert {e["job_id"] for e, _ in sent} == {job["job_id"]}
    kinds = [e["model"]["kind"] for e, _ in sent]
    assert kinds == ["sparse"] * kinds.count("sparse") + ["dense"] * kinds.count("dense"), kinds
    sparse = [LiveModel.model_validate(e["model"]) for e, _ in sent if e["model"]["kind"] == "sparse"]
    dense = [LiveModel.model_validate(e["model"]) for e, _ in sent if e["model"]["kind"] == "dense"]
    counts = [m.cameras for m in sparse]
    registered = job["report"]["images"]["registered"]
    assert counts == sorted(counts) and counts[0] < counts[-1] == registered, counts
    assert dense and all(m.cameras == registered for m in dense)
    out = Path(job["outbox"])
    final = pycolmap.Reconstruction(out / "cameras" / "sparse")
    final_xyz = np.array([p.xyz for p in final.points3D.values()])
    # The last sparse snapshot is the finished model (world frame): its cameras are the outputs' cameras
    # and its points a subsample of the model's, within its bounds.
    cams, xyz, rgb = sparse[-1].arrays()
    assert sparse[-1].points_total == final.num_points3D() and len(xyz) == min(MAX_POINTS, len(final_xyz))
    assert (xyz >= final_xyz.min(axis=0) - 1e-4).all() and (xyz <= final_xyz.max(axis=0) + 1e-4).all()
    frames = json.loads((out / "cameras" / "transforms.json").read_text())["frames"]
    centres = np.array([np.array(f["transform_matrix"])[:3, 3] for f in frames])
    nearest = np.linalg.norm(cams[:, None, :3] - centres[None], axis=-1).min(axis=1)
    assert len(cams) == registered and nearest.max() < 1e-3
    # The dense points: a subsample within the fused cloud's bounds, growing as views are fused.
    dense_xyz = xyz_of(read_ply(out / "points.ply").vertex)
    _, xyz, rgb = dense[-1].arrays()
    assert len(xyz) == min(MAX_POINTS, dense[-1].points_total) and len(rgb) == len(xyz)
    assert (xyz >= dense_xyz.min(axis=0) - 1e-3).all() and (xyz <= dense_xyz.max(axis=0) + 1e-3).all()
    assert [m.points_total for m in dense] == sorted(m.points_total for m in dense)
    # Bounded: at most ~124 KB a message; never in status.json.
    sizes = [size for _, (_, size) in sent]
    assert max(sizes) < 130_000, sizes
    assert "camera_data" not in (out / "status.json").read_text()
    times = [t for _, (t, _) in sent]
    print(
        f"live models: {len(sent)} ({kinds.count('sparse')} sparse, {kinds.count('dense')} dense), "
        f"bytes {sizes}, seconds apart {[round(b - a, 2) for a, b in itertools.pairwise(times)]}"
    )


def _job_processes(daemon: Daemon) -> list[psutil.Process]:
    """The daemon's descendants in a job's process group (not multiprocessing's resource tracker)."""
    assert daemon.proc is not None
    found = []
    for proc in psutil.Process(daemon.proc.pid).children(recursive=True):
        try:
            if os.getpgid(proc.pid) != os.getpgid(daemon.proc.pid):
                found.append(proc)
        except ProcessLookupError:
            continue
    return found


def test_kill_9_and_sigterm_mid_job_then_it_completes_once(daemon: Daemon, photos: Path) -> None:
    daemon.start()
    shutil.copytree(photos, daemon.inbox / "robot")
    (daemon.inbox / "robot" / "READY").touch()
    daemon.wait_job(lambda j: j["stage"] in ("depth", "fuse"), 120, "the job to reach dense depth")
    orphans = _job_processes(daemon)
    assert orphans
    daemon.signal(signal.SIGKILL)
    daemon.wait_exit(10)
    _, alive = psutil.wait_procs(orphans, timeout=15)
    assert not alive, f"job processes outlived the killed daemon: {[p.cmdline()[-3:] for p in alive]}"

    daemon.start()  # re-queues the interrupted job and resumes it
    job = daemon.wait_job(lambda j: j["state"] == "running" and j["attempts"] == 2, 60, "the job to resume")
    daemon.wait_job(lambda j: j["stage"] in ("depth", "fuse", "mesh"), 120, "the resumed job to run")
    t0 = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(40) == 0
    stop_seconds = time.monotonic() - t0
    assert stop_seconds < 20, f"SIGTERM took {stop_seconds:.1f} s"
    status = (Path(job["outbox"]) / "status.json").read_text()
    assert '"state": "queued"' in status and "interrupted by shutdown" in status

    daemon.start()
    done = daemon.wait_job(lambda j: j["state"] == "succeeded", 180, "the job to finish")
    jobs = daemon.jobs()
    assert len(jobs) == 1 and done["job_id"] == job["job_id"] and done["attempts"] == 2
    assert all((Path(done["outbox"]) / name).is_file() for name in OUTPUTS)
    empty = hashlib.sha256(b"").hexdigest()
    assert _digests(Path(done["input"]["location"])) == _digests(photos) | {"READY": empty}
    assert not any((daemon.inbox / ".scandrop" / "work").iterdir())
    assert not (daemon.state / "work" / done["job_id"]).exists()


def _bad_drops(inbox: Path, outside: Path) -> dict[str, str]:
    """Drops that must each fail with their own code; names with spaces and non-ASCII on purpose."""
    outside.mkdir()
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(outside / "secret.png")
    (inbox / "nur Notizen – ü").mkdir()
    (inbox / "nur Notizen – ü" / "notes.txt").write_text("no photos here")
    (inbox / "nur Notizen – ü" / "scan settings.csv").write_text("a,b\n")
    broken = inbox / "kaputt ë"
    broken.mkdir()
    for i in range(3):
        (broken / f"empty {i}.jpg").write_bytes(b"")
        (broken / f"corrupt {i}.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(2000))
    with zipfile.ZipFile(inbox / "escape attempt.zip", "w") as zf:
        zf.writestr("photos/a.jpg", b"x")
        zf.writestr("../../outside.jpg", b"x")
    (inbox / "not really.zip").write_bytes(os.urandom(3000))
    linked = inbox / "linked – out"
    linked.mkdir()
    (linked / "photo.png").symlink_to(outside / "secret.png")
    (inbox / "a link to elsewhere").symlink_to(outside, target_is_directory=True)
    (inbox / "readme.txt").write_text("what is this?")
    (inbox / "broken clip.mp4").write_bytes(os.urandom(5000))
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(inbox / "lonely photo.jpg")
    return {
        "nur Notizen – ü": "no_input",
        "kaputt ë": "too_few_images",
        "escape attempt.zip": "unsafe_archive",
        "not really.zip": "bad_archive",
        "linked – out": "unsafe_input",
        "a link to elsewhere": "unsafe_input",
        "readme.txt": "unsupported_input",
        "broken clip.mp4": "unreadable_video",
        "lonely photo.jpg": "model_missing",  # single-photo relief needs the depth model, not installed here
    }


def test_bad_drops_fail_each_with_its_own_code(daemon: Daemon) -> None:
    daemon.start()
    (daemon.inbox / "empty scan").mkdir()  # created before the photos are copied: must wait
    expected = _bad_drops(daemon.inbox, daemon.root / "outside")
    before = {
        name: _digests(daemon.inbox / name)
        if (daemon.inbox / name).is_dir()
        else (daemon.inbox / name).read_bytes()
        for name in expected
        if not (daemon.inbox / name).is_symlink()
    }
    wait_for(
        lambda: len([j for j in daemon.jobs() if j["state"] == "failed"]) == len(expected),
        120,
        "every bad drop to fail",
    )
    jobs = {j["input"]["name"]: j for j in daemon.jobs()}
    assert set(jobs) == set(expected)
    for name, code in expected.items():
        job = jobs[name]
        assert job["error"]["code"] == code, (name, job["error"])
        assert job["error"]["message"] and job["error"]["hint"]
        kept = Path(job["input"]["location"])
        assert kept.parent.parent.name == "failed"
        if name in before:
            assert (_digests(kept) if kept.is_dir() else kept.read_bytes()) == before[name]
        else:
            assert kept.is_symlink()
    assert (daemon.root / "outside" / "secret.png").is_file()
    assert not (daemon.root / "outside.jpg").exists() and not (daemon.root / "inbox" / "outside.jpg").exists()
    status = daemon.get("/api/status")
    assert status["health"]["ok"]
    assert [(w["name"], w["waiting_for"]) for w in status["queue"]["waiting"]] == [("empty scan", "files")]
    assert daemon.request("GET", "/healthz")[0] == 200


def test_inbox_removed_and_recreated_recovers_and_token_guards_the_api(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, token="s3cret")
    try:
        daemon.start()
        assert daemon.request("GET", "/api/status", token="")[0] == 401
        assert daemon.request("GET", "/api/status", token="wrong")[0] == 401
        # A token in the URL is taken only by the WebSocket route (URLs end up in proxy logs).
        assert daemon.request("GET", "/api/status?token=s3cret", token="")[0] == 401
        assert daemon.request("GET", "/api/ws?token=s3cret", token="")[0] != 401
        assert daemon.request("GET", "/metrics", token="")[0] == 401
        assert daemon.request("GET", "/metrics")[1].startswith(b"# HELP ")
        assert daemon.request("GET", "/healthz", token="")[0] == 200
        shutil.rmtree(daemon.inbox)
        wait_for(lambda: daemon.request("GET", "/healthz")[0] == 503, 20, "the daemon to report unhealthy")
        status = daemon.get("/api/status")
        assert not status["watcher"]["healthy"] and "inbox" in status["watcher"]["problem"]
        daemon.inbox.mkdir()
        wait_for(lambda: daemon.request("GET", "/healthz")[0] == 200, 20, "the daemon to recover")
        (daemon.inbox / "stray.txt").write_text("x")
        job = daemon.wait_job(lambda j: j["state"] == "failed", 30, "a drop after recovery to be handled")
        assert job["error"]["code"] == "unsupported_input"
        assert daemon.proc is not None and daemon.proc.poll() is None
    finally:
        daemon.stop()


def _memory_kb(daemon: Daemon, field: str) -> int:
    assert daemon.proc is not None
    lines = Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines()
    return int(next(line.split()[1] for line in lines if line.startswith(field + ":")))


def test_hundred_small_drops_are_all_processed_with_bounded_memory(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, concurrency=2).start()
    try:
        idle_kb = _memory_kb(daemon, "VmRSS")
        rng = np.random.default_rng(0)
        for i in range(100):
            drop = daemon.inbox / f"drop {i:03d}"
            drop.mkdir()
            Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(drop / "only.png")
            (drop / "READY").touch()
        t0 = time.monotonic()
        wait_for(
            lambda: len([j for j in daemon.jobs() if j["state"] == "failed"]) == 100,
            600,
            "100 drops to be processed",
            every=1.0,
        )
        seconds = time.monotonic() - t0
        peak_kb = _memory_kb(daemon, "VmHWM")
        jobs = daemon.jobs()
        assert {j["error"]["code"] for j in jobs} == {"too_few_images"}
        assert len({j["job_id"] for j in jobs}) == 100
        idle, peak = idle_kb // 1024, peak_kb // 1024
        print(f"\n100 drops in {seconds:.1f} s; daemon RSS idle {idle} MB, peak {peak} MB")
        assert peak_kb - idle_kb < 64 * 1024, f"daemon grew from {idle} to {peak} MB"
    finally:
        daemon.stop()


def test_crashed_job_is_retried_and_a_cancelled_one_keeps_its_input(daemon: Daemon, photos: Path) -> None:
    daemon.start()
    shutil.copytree(photos, daemon.inbox / "robot")
    (daemon.inbox / "robot" / "READY").touch()
    job = daemon.wait_job(lambda j: j["stage"] == "sparse", 60, "the job to start")
    leader = next(p for p in _job_processes(daemon) if os.getpgid(p.pid) == p.pid)
    leader.kill()  # the job process dies as if the OOM killer took it
    retried = daemon.wait_job(lambda j: j["attempts"] == 2 and j["state"] == "running", 60, "a retry")
    assert retried["job_id"] == job["job_id"]

    status, body = daemon.request("POST", f"/api/jobs/{job['job_id']}/cancel")
    assert status == 202 and body["job_id"] == job["job_id"]
    done = daemon.wait_job(lambda j: j["state"] == "cancelled", 30, "the job to be cancelled")
    assert done["error"]["code"] == "cancelled"
    kept = Path(done["input"]["location"])
    assert kept.parent.parent.name == "failed" and len(list(kept.glob("*.png"))) == 24
    assert wait_for(lambda: not _job_processes(daemon), 15, "the job's processes to end")
    status, body = daemon.request("POST", f"/api/jobs/{job['job_id']}/cancel")
    assert status == 409 and body["error"]["code"] == "conflict"
    status, body = daemon.request("GET", "/api/jobs/no-such-job")
    assert status == 404 and body["error"]["code"] == "not_found"
    assert daemon.request("GET", "/api/jobs?limit=0")[0] == 400


def test_an_impossible_device_request_stops_start_up_with_one_line(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, device="cuda")
    if resolve_device("auto").name == "cuda":
        pytest.skip("this machine has CUDA: the request can be met")
    done = subprocess.run(
        [sys.executable, "-m", "scandrop.daemon.cli", "daemon"],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error [device_unavailable]: ") and "hint: " in done.stderr
