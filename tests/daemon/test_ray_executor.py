"""Integration: the real daemon with executor=ray against a real 3-node Ray cluster on this machine.

One cluster for the module (a head without CPUs, two worker nodes with one CPU each). The first
test starts it while a daemon is waiting for it, and its job fans its depth maps out over both
nodes; the node-death test runs last: it leaves one node.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[test]' (or '.[ray]')")

import numpy as np
from daemon_process import Daemon, EventListener, wait_for
from ray_cluster import LocalRayCluster
from test_daemon_process import OUTPUTS, PIPELINE_STAGES, _digests

from scandrop.daemon import ray_fanout
from scandrop.pipeline.bench import synthetic
from scandrop.pipeline.bench.known_poses import workspace_from_scene
from scandrop.pipeline.bench.run import estimated_cameras, score_geometry, score_poses
from scandrop.pipeline.core.stage import never_stop
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.dense import estimate_depth
from scandrop.pipeline.presets import preset_config

# A loaded machine: jobs take minutes, not seconds.
pytestmark = [pytest.mark.timeout(900), pytest.mark.long(4)]

TASK = "ray::scandrop-job-"  # the job task's name in its Ray worker's process title


@pytest.fixture(scope="module")
def unstarted_cluster() -> Iterator[LocalRayCluster]:
    c = LocalRayCluster(workers=2, cpus_per_worker=1)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def cluster(unstarted_cluster: LocalRayCluster) -> LocalRayCluster:
    return unstarted_cluster.start()


def _daemon(root: Path, cluster: LocalRayCluster, **settings: Any) -> Daemon:
    d = Daemon(root, executor="ray", ray_address=cluster.address, **settings)
    d.env.update({k: cluster.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_USAGE_STATS_ENABLED")})
    return d


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


def _check_outputs(job: dict[str, Any]) -> None:
    """The same outputs as a local job, whole, each listed with its real checksum."""
    out = Path(job["outbox"])
    listed = {o["name"]: o["sha256"] for o in job["outputs"]}
    assert {*OUTPUTS, "report.json"} <= set(listed)
    for name, sha in listed.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == sha
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left"


def _drop(daemon: Daemon, photos: Path, name: str) -> Path:
    staging = daemon.root / name
    shutil.copytree(photos, staging)
    daemon.inbox.mkdir(parents=True, exist_ok=True)
    return staging.rename(daemon.inbox / name)


def test_jobs_wait_for_an_unreachable_cluster_then_run_on_it_fanning_out_their_depth_maps(
    tmp_path: Path, unstarted_cluster: LocalRayCluster, daemons: list[Daemon], photos: Path
) -> None:
    daemon = _daemon(tmp_path, unstarted_cluster, ray_fanout_min_views=8)  # the drop has 24 views
    daemons.append(daemon)  # stopped by the fixture even when start() fails
    daemon.start(healthy=False)  # /healthz answers 503 while the cluster is unreachable
    assert daemon.get("/api/status")["settings"]["executor"] == "ray"
    with EventListener(daemon) as listener:
        _drop(daemon, photos, "robot")
        queued = daemon.wait_job(lambda j: j["state"] == "queued", 60, "the job to be queued")
        status, health = daemon.request("GET", "/healthz")
        assert status == 503 and any("Ray cluster" in p and "not ready" in p for p in health["problems"])
        assert daemon.job(queued["job_id"])["state"] == "queued"  # waits; nothing queued fails
        unstarted_cluster.start()
        job = daemon.wait_job(lambda j: j["state"] in ("succeeded", "failed"), 600, "the job to finish")
        wait_for(
            lambda: any(e["type"] == "state" and e["job"]["state"] == "succeeded" for e in listener.events),
            10,
            "the succeeded event",
        )
    assert daemon.request("GET", "/healthz")[0] == 200
    assert job["state"] == "succeeded", job["error"]
    assert job["attempts"] == 1
    assert job["execution"]["executor"] == "ray" and job["execution"]["data"] == "shared"  # probed
    _check_outputs(job)
    assert _digests(Path(job["input"]["location"])) == _digests(photos)  # input kept, in done/
    # Live progress as with a local job: every stage streamed its events over the WebSocket.
    stages = {e["job"]["stage"] for e in listener.events if e["type"] == "stage"}
    assert set(PIPELINE_STAGES) <= stages
    # One big job across machines: its views' depth maps were computed on both nodes.
    out = Path(job["outbox"])
    report = json.loads((out / "report.json").read_text())
    # The job sized its pools to the one CPU it reserved on its node, not to the machine's cores.
    assert report["cpus"] == 1
    (depth,) = [s for s in report["stages"] if s["name"] == "depth"]
    nodes = depth["result"]["nodes"]
    assert len(nodes) == depth["result"]["views"] == 24
    assert job["execution"]["node_id"] in set(nodes.values())  # the job's own node took views,
    assert len(set(nodes.values())) == 2  # and so did the other one
    # Each node compiled the pipeline's kernels once when it joined, at the lowest priority (only
    # idle CPU: the job and its depth tasks can end first on a loaded machine).
    ended = ("kernels_ready", "kernels_warm_up_failed")
    wait_for(lambda: len(daemon.logged(*ended)) >= 2, 300, "the warm-up on both nodes")
    warmed = daemon.logged(*ended)
    expected = sorted(("kernels_ready", node) for node in set(nodes.values()))
    assert sorted((e["event"], e["node"]) for e in warmed) == expected, warmed
    # The geometry is that of a job on one node: cameras and surface against the rendered truth.
    scene = synthetic.render_scene(n_views=24, width=320, height=240, seed=0)  # = the `photos`
    poses = score_poses(estimated_cameras(out), scene.cameras())
    assert poses["rot_err_median_deg"] < 0.1 and poses["centre_err_median_rel"] < 0.01, poses
    scores = score_geometry(out, poses["sim3"], scene.surface_samples(100_000), 0.01 * scene.size)
    assert scores["points_f"] >= 0.9 and scores["mesh_f"] >= 0.85, scores


def test_cancel_stops_the_remote_work(
    tmp_path: Path, cluster: LocalRayCluster, daemons: list[Daemon], photos: Path
) -> None:
    daemon = _daemon(tmp_path, cluster)
    daemons.append(daemon)  # stopped by the fixture even when start() fails
    daemon.start()
    _drop(daemon, photos, "robot")
    job = daemon.wait_job(lambda j: j["state"] == "running" and j["progress"] > 0, 300, "the job to run")
    work = wait_for(lambda: _pipeline_processes(cluster), 30, "the pipeline process on a node")
    status, _ = daemon.request("POST", f"/api/jobs/{job['job_id']}/cancel")
    assert status == 202
    done = daemon.wait_job(lambda j: j["state"] in ("cancelled", "failed", "succeeded"), 60, "the cancel")
    assert done["state"] == "cancelled" and done["error"]["code"] == "cancelled"
    wait_for(lambda: not any(_alive(p) for p in work), 30, "the remote pipeline to stop")
    assert _digests(Path(done["input"]["location"])) == _digests(photos)  # kept, in failed/


def test_depth_maps_fanned_out_over_the_cluster_equal_the_local_ones(
    tmp_path: Path, cluster: LocalRayCluster
) -> None:
    """The same views through Ray tasks (photos and masks shipped, depth files gathered back) and
    through the local loop: the fast preset's stereo is deterministic, so the files are bitwise equal.
    The fanned-out run is a driver process of its own, as in a job (Ray reads its token at import)."""
    scene = synthetic.render_scene(n_views=12, width=320, height=240, seed=2, alpha=True)
    config = preset_config("fast").depth
    local, fanned = Workspace(tmp_path / "local").create(), Workspace(tmp_path / "fanned").create()
    for ws in (local, fanned):
        workspace_from_scene(scene, ws, masks=True)
    here = estimate_depth.run(config, local, lambda f, m: None, never_stop)
    driver = _run_driver(FANNED_DEPTH, cluster, fanned.root)
    result, messages = json.loads(driver.stdout.strip().splitlines()[-1])
    per_view = [m for m in messages if re.match(r"depth [1-9]\d*/12: ", m)]
    assert result["views_with_depth"] == here.views_with_depth == 12 and len(per_view) == 12
    assert set(result["nodes"]) == set(scene.names)
    remote = {name: node for name, node in result["nodes"].items() if node != "here"}
    assert len(set(remote.values())) == 2, result["nodes"]  # both worker nodes computed views
    for name in scene.names:
        with np.load(local.depth_dir / f"{name}.npz") as a, np.load(fanned.depth_dir / f"{name}.npz") as b:
            assert sorted(a.files) == sorted(b.files) and "mask" in a.files
            for key in a.files:
                assert np.array_equal(a[key], b[key]), (name, key)
    assert not list(fanned.depth_dir.glob(".*")), "temporary files left"


FANNED_DEPTH = """
import json, sys
from pathlib import Path
from scandrop.daemon.ray_fanout import RayViewFanout
from scandrop.pipeline.core.stage import never_stop
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.dense import estimate_depth
from scandrop.pipeline.presets import preset_config

fanout = RayViewFanout(address=sys.argv[1], namespace="scandrop-test", min_views=1, cpus=1, job_node="here")
messages = []
ws, config = Workspace(Path(sys.argv[2])), preset_config("fast").depth
result = estimate_depth.run(config, ws, lambda f, m: messages.append(m), never_stop, fanout)
print(json.dumps([result.model_dump(), messages]))
"""


def test_a_failed_view_task_is_a_job_error_and_a_stop_cancels_the_view_tasks(
    tmp_path: Path, cluster: LocalRayCluster
) -> None:
    """A view task that raises on its node becomes the stage's dense_failed error saying why; a stop
    while view tasks run raises `cancelled` and kills them (their worker processes end)."""
    (tmp_path / "a.png").write_bytes(b"photo")
    pids = tmp_path / "pids"
    pids.mkdir()
    driver = _run_driver(FAILING_VIEWS, cluster, pids)
    outcome = json.loads(driver.stdout.strip().splitlines()[-1])
    assert outcome["failed"]["code"] == "dense_failed"
    assert "ValueError: no such lens" in outcome["failed"]["message"], outcome
    assert outcome["cancelled"]["code"] == "cancelled"
    assert len(list(pids.iterdir())) == 2  # both nodes' view tasks had started sleeping
    assert outcome["ended_after_s"] < 30, outcome  # killed while the driver lived on
    # Their scratch folders (killed, they could not remove them) were swept by the next view tasks.
    assert outcome["after"] == "done"
    assert not [
        f for p in pids.iterdir() for f in Path(tempfile.gettempdir()).glob(f"scandrop-view-{p.name}-*")
    ]


VIEW_DRIVER = """
import json, os, sys, time
from dataclasses import dataclass
from pathlib import Path
from scandrop.daemon.ray_fanout import RayViewFanout

DRIVER = os.getpid()
fanout = RayViewFanout(address=sys.argv[1], namespace="scandrop-test", min_views=1, cpus=1, job_node="here")


@dataclass(frozen=True)
class Task:
    image_dir: Path
    mask_path: Path | None
    out_path: Path
    photo_names: tuple[str, ...] = ("a.png",)
    prior_dir: Path | None = None
    prior_names: tuple[str, ...] = ()


def twelve_views(work):  # fan 12 views out; print [view, node] in the order they finished
    root = Path(sys.argv[2])
    for i in range(12):
        (root / f"{i}.png").write_bytes(b"photo")
    tasks = [Task(root, None, root / f"{i}.npz", (f"{i}.png",)) for i in range(12)]
    done = fanout.map(work, tasks, lambda f, m: None, lambda: False)
    print(json.dumps([[view.name, view.node] for view in done]))
"""

FAILING_VIEWS = (
    VIEW_DRIVER
    + """
import psutil
from scandrop.pipeline.core.errors import ScandropError

PIDS = Path(sys.argv[2])


def fails_on_a_node(task):
    if os.getpid() != DRIVER:
        raise ValueError("no such lens")
    return "a.png", 1.0


def sleeps_on_a_node(task):
    if os.getpid() != DRIVER:
        (PIDS / str(os.getpid())).touch()
        time.sleep(300)
    return "a.png", 1.0


def wait_until_the_cluster_is_free():  # a stage that ended early leaves its tasks to Ray to kill
    import ray

    ray.init(address=sys.argv[1], namespace="scandrop-test", log_to_driver=False, logging_level="WARNING")
    t0, total = time.monotonic(), ray.cluster_resources()["CPU"]
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() - t0 < 30:
        time.sleep(0.1)
    ray.shutdown()


tasks = [Task(PIDS.parent, None, PIDS.parent / f"{i}.npz") for i in range(4)]
stops = {"failed": lambda: False, "cancelled": lambda: len(list(PIDS.iterdir())) >= 2}
outcome = {}
for name, work in (("failed", fails_on_a_node), ("cancelled", sleeps_on_a_node)):
    wait_until_the_cluster_is_free()  # else the job's node could take every view itself
    try:
        fanout.map(work, tasks, lambda f, m: None, stops[name])
    except ScandropError as exc:
        outcome[name] = {"code": exc.code.value, "message": exc.message}


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


started = [int(p.name) for p in PIDS.iterdir()]
t0 = time.monotonic()  # this driver lives on: its stopped view tasks end all the same
while any(alive(p) for p in started) and time.monotonic() - t0 < 30:
    time.sleep(0.1)
outcome["ended_after_s"] = round(time.monotonic() - t0, 1)
wait_until_the_cluster_is_free()
fanout.map(lambda task: ("a.png", 1.0), tasks, lambda f, m: None, lambda: False)  # sweeps on both nodes
outcome["after"] = "done"
print(json.dumps(outcome))
"""
)


def test_cpus_freed_by_other_work_during_the_stage_get_views(
    tmp_path: Path, cluster: LocalRayCluster
) -> None:
    """Both worker nodes are busy (another driver's tasks) when the fan-out starts: the job's node
    computes views alone; when the other work ends, the fan-out sees the free CPUs and both nodes
    take views (before, the free CPUs were read once, at the start of the stage)."""
    held = tmp_path / "held"
    held.mkdir()
    blocker = subprocess.Popen(
        [sys.executable, "-c", BLOCKER, cluster.address, str(held)], env=cluster.env, stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: len(list(held.iterdir())) == 2, 120, "the other work to hold both nodes")
        driver = _run_driver(TIMED_VIEWS, cluster, tmp_path)
    finally:
        _, err = blocker.communicate(timeout=120)
    assert blocker.returncode == 0, err[-3000:]
    nodes = [node for _, node in _views(driver)]  # in the order the views finished
    assert len(nodes) == 12
    assert nodes[:2] == ["here", "here"], nodes  # nothing free at first: the job's node alone
    assert len({n for n in nodes if n != "here"}) == 2, nodes  # then both freed nodes joined in


def test_a_workers_copies_of_the_photos_are_written_once_per_job(tmp_path: Path) -> None:
    """Kept from view to view, so that the depth code's grey-photo cache (keyed by path, size and
    time) serves a worker's next views; another job gets a folder of its own."""
    first = ray_fanout._photo_copies(tmp_path / "job-a" / "images", {"a.png": b"one", "b.png": b"two"})
    stamp = (first / "a.png").stat().st_mtime_ns
    again = ray_fanout._photo_copies(tmp_path / "job-a" / "images", {"a.png": b"one", "c.png": b"three"})
    assert again == first and (first / "a.png").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in first.iterdir()) == ["a.png", "b.png", "c.png"]
    other = ray_fanout._photo_copies(tmp_path / "job-b" / "images", {"a.png": b"ONE"})
    assert other != first and (other / "a.png").read_bytes() == b"ONE"
    shutil.rmtree(first.parent)


def test_views_are_handed_out_while_the_job_node_computes_its_own(
    tmp_path: Path, cluster: LocalRayCluster
) -> None:
    """The job's own view runs in a thread: while it computes (here: until the cluster has done
    all the others), the stage goes on handing views out. Computed in the stage's thread, as
    before, it would hold back every view but the first few sent out, and give up waiting."""
    views = _views(_run_driver(LOCAL_WAITS, cluster, tmp_path))
    here = [name for name, node in views if node == "here"]
    assert here == ["11.png"], views  # the last in the queue, done after the cluster's 11
    assert sorted(name for name, _ in views) == sorted(f"{i}.png" for i in range(12))
    assert len({node for _, node in views if node != "here"}) == 2, views


def _run_driver(script: str, cluster: LocalRayCluster, folder: Path) -> subprocess.CompletedProcess[str]:
    driver = subprocess.run(
        [sys.executable, "-c", script, cluster.address, str(folder)],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert driver.returncode == 0, driver.stderr[-3000:]
    return driver


def _views(driver: subprocess.CompletedProcess[str]) -> list[tuple[str, str]]:
    """(view, node) in the order the fan-out finished them, from a driver script's last line."""
    return [tuple(v) for v in json.loads(driver.stdout.strip().splitlines()[-1])]


BLOCKER = """
import sys, time
from pathlib import Path
import ray

ray.init(address=sys.argv[1], namespace="scandrop-test", log_to_driver=False)


@ray.remote(num_cpus=1)
def hold(folder, i):
    (Path(folder) / str(i)).touch()
    time.sleep(4.0)


ray.get([hold.remote(sys.argv[2], i) for i in range(2)])
"""

TIMED_VIEWS = (
    VIEW_DRIVER
    + """
def one_second(task):
    time.sleep(1.0)
    return task.photo_names[0], 1.0


twelve_views(one_second)
"""
)

LOCAL_WAITS = (
    VIEW_DRIVER
    + """
MARKS = Path(sys.argv[2]) / "marks"
MARKS.mkdir()


def waits_for_the_cluster(task):
    name = task.photo_names[0]
    if os.getpid() != DRIVER:
        (MARKS / name).touch()
        return name, 1.0
    deadline = time.monotonic() + 60
    while len(list(MARKS.iterdir())) < 11:
        if time.monotonic() > deadline:
            raise SystemExit("the cluster got no more views while this one computed")
        time.sleep(0.05)
    return name, 1.0


twelve_views(waits_for_the_cluster)
"""
)


def test_a_node_killed_mid_job_is_retried_on_the_other_once_with_shipped_data(
    tmp_path: Path, cluster: LocalRayCluster, daemons: list[Daemon], photos: Path
) -> None:
    daemon = _daemon(tmp_path, cluster, ray_data="shipped")
    daemons.append(daemon)  # stopped by the fixture even when start() fails
    daemon.start()
    _drop(daemon, photos, "robot")
    first = daemon.wait_job(lambda j: j["state"] == "running" and j["progress"] > 0.05, 300, "the job to run")
    raylet = wait_for(lambda: cluster.raylet_running(TASK), 30, "the node running the job")
    first_work = [p for p in _pipeline_processes(cluster) if raylet in p.parents()]
    raylet.send_signal(signal.SIGKILL)  # the node dies with its raylet
    job = daemon.wait_job(lambda j: j["state"] in ("succeeded", "failed"), 600, "the job to finish")
    assert job["state"] == "succeeded", job["error"]
    assert job["attempts"] == 2 and job["execution"]["data"] == "shipped"
    assert job["execution"]["node_id"] != first["execution"]["node_id"]
    assert first_work and not any(_alive(p) for p in first_work)  # no orphan of the dead node
    _check_outputs(job)
    report = json.loads((Path(job["outbox"]) / "report.json").read_text())
    assert report["output"] == job["outbox"]  # the daemon's paths, not the node's scratch folder
    assert _digests(Path(job["input"]["location"])) == _digests(photos)
    log = daemon.log.read_text()
    assert log.count('"job_succeeded"') == 1 and log.count('"ray_attempt"') == 2


def _alive(proc: psutil.Process) -> bool:
    """Running, not a zombie (a killed job process may wait for a reaper that never comes here)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _pipeline_processes(cluster: LocalRayCluster) -> list[psutil.Process]:
    """The job's pipeline process and its workers on the cluster's nodes: spawned children, and the
    job itself, forked by the Ray worker's fork server, whose command line it shares but which leads
    its own process group (not the fork server or the resource tracker: they belong to the Ray
    worker and live as long as it)."""

    def pipeline(proc: psutil.Process) -> bool:
        cmdline = " ".join(proc.cmdline())
        forked_job = "multiprocessing.forkserver" in cmdline and os.getpgid(proc.pid) == proc.pid
        return "spawn_main" in cmdline or forked_job

    found = []
    for proc in cluster.processes():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if pipeline(proc):
                found.append(proc)
    return found
