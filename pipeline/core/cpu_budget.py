"""How many CPUs a job may use: its affinity mask, capped by its cgroup's CPU quota.

`os.cpu_count()` counts the host's cores. Under systemd's `CPUQuota=`, a container's `--cpus` or a
Kubernetes CPU limit the kernel lets the job run only `quota / period` CPUs' worth of time, so a
worker per host core (the depth stage, the matching processes, Poisson, numba's threads) means more
processes, more memory and threads throttled in turn. Every stage sizes its parallelism from
`usable_cpus()` instead. An executor that reserved a share of a machine for the job (a Ray task's
CPUs) says so in `JOB_CPUS_ENV`, which caps it too: Ray schedules as many jobs on a node as their
reservations allow, and each one sizing itself to the whole node would run them all on every core.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_MOUNT = Path("/sys/fs/cgroup")
# Worker processes of a stage (depth maps, matching): each holds its own photos and libraries (a
# matching process peaked at 231 MB on the kitchen), and a NAS box must not run out of memory.
MAX_WORKER_PROCESSES = 8
# CPUs reserved for this job by its executor (or set by hand in the daemon's environment).
JOB_CPUS_ENV = "SCANDROP_JOB_CPUS"


def _v2_quota(folder: Path) -> float | None:
    """cpu.max holds "max 100000" (no quota) or "<quota> <period>" in microseconds."""
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(folder: Path) -> float | None:
    """cpu.cfs_quota_us is -1 when the group has no quota."""
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _ancestors(root: Path, path: str) -> list[Path]:
    """The process's group and every group above it, up to the mount's root (the effective quota is
    the smallest). Inside a container the mount's root may be the container's own group while
    /proc/self/cgroup still names the host's path: then only the root is read."""
    folder = root / path.lstrip("/")
    if not folder.is_dir():
        return [root]
    found = [folder]
    while folder != root and root in folder.parents:
        folder = folder.parent
        found.append(folder)
    return found


def cgroup_cpu_limit(proc_cgroup: Path = PROC_CGROUP, mount: Path = CGROUP_MOUNT) -> float | None:
    """The CPU quota of this process's cgroup (v2 or v1), in CPUs; None when there is none."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float | None] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            quotas += [_v2_quota(folder) for folder in _ancestors(mount, path)]
        elif "cpu" in controllers.split(","):
            root = mount / controllers if (mount / controllers).is_dir() else mount / "cpu"
            quotas += [_v1_quota(folder) for folder in _ancestors(root, path)]
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def reserved_cpus() -> float | None:
    """The job's reservation from `JOB_CPUS_ENV`, when it holds a positive number."""
    try:
        value = float(os.environ.get(JOB_CPUS_ENV, ""))
    except ValueError:
        return None
    return value if value > 0 else None


def usable_cpus() -> int:
    """CPUs this process may run on, at least 1: its affinity mask, capped by its cgroup's quota and
    by the job's reservation. A fractional limit rounds up (1.5 CPUs: 2 workers that the kernel
    slows to 75% each use all of it; one would leave a third unused)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for limit in (cgroup_cpu_limit(), reserved_cpus()):
        if limit is not None:
            cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def worker_processes() -> int:
    """How many worker processes a stage starts by default: one per usable CPU, at most 8."""
    return min(usable_cpus(), MAX_WORKER_PROCESSES)


def limit_threads(cpus: float) -> None:
    """Hold this process's numba and OpenCV thread pools to `cpus` (numba's defaults to every core
    of the host)."""
    import cv2
    import numba

    n = max(1, int(cpus))
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    cv2.setNumThreads(n)
