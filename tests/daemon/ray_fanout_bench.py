"""Benchmark of one big job across machines: its depth maps fanned out over 2 Ray nodes vs one node.

    .venv/bin/python tests/daemon/ray_fanout_bench.py [--photos DIR] [--preset balanced]

A 2-node local Ray cluster (a head without CPUs, two worker nodes of 1 CPU each; numba and
OpenMP held to one thread per process, so that a node is one core) runs the same drop through the
real daemon twice: with `ray_fanout_min_views = 1` (the depth maps fan out) and with 0 (the job
stays on its node). Prints, per run, the depth stage's wall time, the pipeline's and the daemon's
job time, where the views ran, and the CPU seconds of the cluster's processes during the job.
The photos default to the kitchen (../shared/datasets/vggt_kitchen/images, 25 photos); without it,
a 24-view synthetic scene at 640x480. Numbers, not pass/fail; README "Scaling out" quotes them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from daemon_process import Daemon
from ray_cluster import LocalRayCluster

from scandrop.pipeline.bench.synthetic import render_scene, write_scene

KITCHEN = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "vggt_kitchen" / "images"
RAY_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_USAGE_STATS_ENABLED")


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _cpu_seconds(cluster: LocalRayCluster) -> float:
    """User + system seconds of the cluster's processes and of the children they reaped."""
    total = 0.0
    for proc in cluster.processes():
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def _run(cluster: LocalRayCluster, root: Path, photos: Path, preset: str, fanout: int) -> dict[str, Any]:
    daemon = Daemon(
        root, executor="ray", ray_address=cluster.address, preset=preset, ray_fanout_min_views=fanout
    )
    daemon.env.update({k: cluster.env[k] for k in RAY_ENV})
    daemon.start()
    try:
        shutil.copytree(photos, root / "drop")
        cpu0 = _cpu_seconds(cluster)
        (root / "drop").rename(daemon.inbox / "drop")
        job = daemon.wait_job(lambda j: j["state"] in ("succeeded", "failed"), 3600, "the job to finish")
        cpu = _cpu_seconds(cluster) - cpu0
    finally:
        daemon.stop()
    if job["state"] != "succeeded":
        raise SystemExit(f"the job failed: {job['error']}")
    report = json.loads((Path(job["outbox"]) / "report.json").read_text())
    (depth,) = [s for s in report["stages"] if s["name"] == "depth"]
    nodes = Counter(depth["result"].get("nodes", {}).values())
    return {
        "depth_s": depth["seconds"],
        "pipeline_s": report["seconds"],
        "daemon_s": _ts(job["finished_at"]) - _ts(job["started_at"]),
        "cpu_s": cpu,
        "views": depth["result"]["views"],
        "views_per_node": sorted(nodes.values(), reverse=True),
        "job_node": job["execution"]["node_id"],
        "on_job_node": nodes.get(job["execution"]["node_id"], 0),
        "points": report["points"],
        "triangles": report["triangles"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=KITCHEN if KITCHEN.is_dir() else None)
    parser.add_argument("--preset", default="balanced")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ray-fanout-bench-"))
    cluster = LocalRayCluster(workers=2, cpus_per_worker=1)
    cluster.env.update({"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})  # a node = one core
    try:
        photos = args.photos
        if photos is None:
            photos = root / "photos"
            write_scene(render_scene(n_views=24, width=640, height=480, seed=0), photos)
            (photos / "gt_cameras.json").unlink()
        print(f"photos: {photos} ({len(list(photos.iterdir()))} files), preset {args.preset}")
        t0 = time.monotonic()
        cluster.start()
        print(f"cluster start (head + 2 nodes x 1 CPU): {time.monotonic() - t0:.1f} s")
        for name, fanout in (("one node (ray_fanout_min_views = 0)", 0), ("fanned out over 2 nodes", 1)):
            r = _run(cluster, root / f"run-{fanout}", photos, args.preset, fanout)
            print(
                f"{name}: depth {r['depth_s']:.1f} s; job {r['pipeline_s']:.1f} s (pipeline), "
                f"{r['daemon_s']:.1f} s (daemon); cluster CPU {r['cpu_s']:.1f} s; "
                f"{r['views']} views, per node {r['views_per_node'] or 'not recorded (local loop)'}"
                f" ({r['on_job_node']} on the job's node); {r['points']} points, {r['triangles']} triangles"
            )
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
