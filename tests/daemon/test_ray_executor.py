"""Integration: the real daemon with executor=ray against a real 3-node Ray cluster on this machine.

One cluster for the module (a head without CPUs, two worker nodes with one CPU each). The first
test starts it while a daemon is waiting for it; the node-death test runs last: it leaves one node.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[test]' (or '.[ray]')")

from daemon_process import Daemon, EventListener, wait_for
from ray_cluster import LocalRayCluster
from test_daemon_process import OUTPUTS, PIPELINE_STAGES, _digests

pytestmark = pytest.mark.timeout(900)  # a loaded machine: jobs take minutes, not seconds

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


def test_jobs_wait_for_an_unreachable_cluster_then_run_on_it(
    tmp_path: Path, unstarted_cluster: LocalRayCluster, daemons: list[Daemon], photos: Path
) -> None:
    daemon = _daemon(tmp_path, unstarted_cluster)
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
    """The job's pipeline process and its workers on the cluster's nodes (spawned children; not the
    resource tracker, which belongs to the Ray worker and lives as long as it)."""
    return [p for p in cluster.processes() if "spawn_main" in " ".join(p.cmdline())]
