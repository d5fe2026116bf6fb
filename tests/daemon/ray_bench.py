"""Benchmark of the ray executor: a 2-node local Ray cluster (1 CPU each) vs the local executor.

    .venv/bin/python tests/daemon/ray_bench.py [--drops 10] [--views 24]

Runs the same synthetic drops through the real daemon twice (local executor with concurrency 2;
ray executor on a head without CPUs and two one-CPU worker nodes) and prints the total time and,
per job, the overhead around the pipeline: daemon wall time minus the pipeline's own seconds
(report.json), and for Ray the time from submit to the task's start on its node. Then one more
drop whose node is killed (kill -9 of its raylet) mid-job: attempts, and the time it took.
Numbers, not pass/fail (the tests assert behaviour); the README's "Scaling out" quotes them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon_process import Daemon, wait_for
from ray_cluster import LocalRayCluster

from scandrop.pipeline.bench.synthetic import render_scene, write_scene


def _photos(folder: Path, views: int) -> Path:
    write_scene(render_scene(n_views=views, width=320, height=240, seed=0), folder)
    (folder / "gt_cameras.json").unlink()
    return folder


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _log_events(daemon: Daemon, event: str) -> dict[str, float]:
    """job id -> the first time of `event` in the daemon's JSON log."""
    found: dict[str, float] = {}
    for line in daemon.log.read_text(errors="replace").splitlines():
        if line.startswith("{") and (row := json.loads(line)).get("event") == event:
            found.setdefault(row["job_id"], _ts(row["timestamp"]))
    return found


def _run_drops(daemon: Daemon, photos: Path, drops: int) -> tuple[float, list[dict[str, Any]]]:
    for i in range(drops):
        staging = daemon.root / f"drop-{i:02d}"
        shutil.copytree(photos, staging)
        (staging / "FORCE").touch()  # identical photos: run each, do not reuse the first's outputs
    t0 = time.monotonic()
    for i in range(drops):
        (daemon.root / f"drop-{i:02d}").rename(daemon.inbox / f"drop-{i:02d}")
    wait_for(
        lambda: len([j for j in daemon.jobs() if j["state"] in ("succeeded", "failed")]) == drops,
        3600,
        "every drop to finish",
        every=1.0,
    )
    return time.monotonic() - t0, daemon.jobs()


def _summary(name: str, total: float, jobs: list[dict[str, Any]], daemon: Daemon) -> None:
    ok = [j for j in jobs if j["state"] == "succeeded"]
    overhead = [
        _ts(j["finished_at"]) - _ts(j["started_at"]) - j["report"]["seconds"] for j in ok if j["report"]
    ]
    pipeline = [j["report"]["seconds"] for j in ok if j["report"]]
    print(f"{name}: {len(ok)}/{len(jobs)} succeeded in {total:.1f} s")
    print(f"  pipeline per job: median {statistics.median(pipeline):.1f} s")
    print(
        f"  overhead per job (daemon wall - pipeline): median {statistics.median(overhead):.2f} s, "
        f"max {max(overhead):.2f} s"
    )
    started, attempts = _log_events(daemon, "job_started"), _log_events(daemon, "ray_attempt")
    submit = [attempts[j] - started[j] for j in started if j in attempts]
    if submit:
        print(
            f"  submit -> task started on a node: median {statistics.median(submit):.2f} s, "
            f"max {max(submit):.2f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drops", type=int, default=10)
    parser.add_argument("--views", type=int, default=24)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    cluster = LocalRayCluster(workers=2, cpus_per_worker=1)
    daemons: list[Daemon] = []
    try:
        photos = _photos(root / "photos", args.views)
        local = Daemon(root / "local", concurrency=2)
        daemons.append(local.start())
        total, jobs = _run_drops(local, photos, args.drops)
        local.stop()
        _summary("local executor, concurrency 2", total, jobs, local)

        t0 = time.monotonic()
        cluster.start()
        print(f"cluster start (head + 2 nodes): {time.monotonic() - t0:.1f} s")
        ray = Daemon(root / "ray", executor="ray", ray_address=cluster.address, concurrency=2)
        ray.env.update(
            {k: cluster.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_USAGE_STATS_ENABLED")}
        )
        daemons.append(ray.start())
        total, jobs = _run_drops(ray, photos, args.drops)
        _summary("ray executor, 2 nodes x 1 CPU", total, jobs, ray)
        modes = sorted({j["execution"]["data"] for j in jobs if j.get("execution")})
        print(f"  data mode: {', '.join(modes)}")

        shutil.copytree(photos, root / "victim")
        (root / "victim" / "FORCE").touch()
        t0 = time.monotonic()
        (root / "victim").rename(ray.inbox / "victim")
        first = ray.wait_job(
            lambda j: j["input"]["name"] == "victim" and j["state"] == "running" and j["progress"] > 0.05,
            1200,
            "the victim job to run",
        )
        raylet = wait_for(lambda: cluster.raylet_running("ray::scandrop-job-"), 60, "its node")
        raylet.send_signal(signal.SIGKILL)
        killed = time.monotonic() - t0
        job = ray.wait_job(
            lambda j: j["input"]["name"] == "victim" and j["state"] in ("succeeded", "failed"),
            1800,
            "the end",
        )
        print(
            f"kill -9 of the raylet running a job ({killed:.1f} s in): {job['state']}, attempts "
            f"{job['attempts']}, node {first['execution']['node']} -> {job['execution']['node']}, "
            f"{time.monotonic() - t0:.1f} s from drop to outcome"
        )
    finally:
        for d in daemons:
            d.stop()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
