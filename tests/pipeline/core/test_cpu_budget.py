"""The CPU budget reads the cgroup quota the way the kernel applies it (fake cgroup trees)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scandrop.pipeline.core import cpu_budget
from scandrop.pipeline.dense import estimate_depth
from scandrop.pipeline.sparse import parallel_matching


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_the_smallest_on_the_way_up(tmp_path: Path) -> None:
    proc, mount = tmp_path / "cgroup", tmp_path / "fs"
    _write(proc, "0::/system.slice/scandrop.service\n")
    _write(mount / "system.slice/scandrop.service/cpu.max", "150000 100000\n")  # CPUQuota=150%
    _write(mount / "system.slice/cpu.max", "max 100000\n")
    assert cpu_budget.cgroup_cpu_limit(proc, mount) == pytest.approx(1.5)
    _write(mount / "system.slice/cpu.max", "100000 100000\n")  # the slice allows one CPU only
    assert cpu_budget.cgroup_cpu_limit(proc, mount) == pytest.approx(1.0)
    _write(mount / "system.slice/scandrop.service/cpu.max", "max 100000\n")
    _write(mount / "system.slice/cpu.max", "max 100000\n")
    assert cpu_budget.cgroup_cpu_limit(proc, mount) is None


def test_cgroup_v1_quota_inside_a_container(tmp_path: Path) -> None:
    """Docker without a cgroup namespace: /proc names the host's path, the mount is the container's
    own group, so its root holds the quota (`--cpus 2.5`)."""
    proc, mount = tmp_path / "cgroup", tmp_path / "fs"
    _write(proc, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n")
    _write(mount / "cpu,cpuacct/cpu.cfs_quota_us", "250000\n")
    _write(mount / "cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert cpu_budget.cgroup_cpu_limit(proc, mount) == pytest.approx(2.5)
    _write(mount / "cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
    assert cpu_budget.cgroup_cpu_limit(proc, mount) is None


def test_no_cgroup_information_means_no_quota(tmp_path: Path) -> None:
    assert cpu_budget.cgroup_cpu_limit(tmp_path / "missing", tmp_path) is None
    _write(tmp_path / "cgroup", "0::/\n")  # cgroup v2 root: no cpu.max there
    assert cpu_budget.cgroup_cpu_limit(tmp_path / "cgroup", tmp_path / "fs") is None


@pytest.mark.parametrize(
    ("quota", "reserved", "expected"),
    [
        (None, None, 4),
        (1.5, None, 2),
        (0.2, None, 1),
        (16.0, None, 4),
        (None, "1", 1),  # a Ray task that reserved one CPU of the node
        (None, "2.5", 3),
        (1.5, "3", 2),  # the stricter of quota and reservation
        (None, "0", 4),  # not a reservation
        (None, "many", 4),
    ],
)
def test_usable_cpus_is_affinity_capped_by_the_quota_and_the_reservation(
    monkeypatch: pytest.MonkeyPatch, quota: float | None, reserved: str | None, expected: int
) -> None:
    monkeypatch.setattr(cpu_budget.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cpu_budget, "cgroup_cpu_limit", lambda: quota)
    if reserved is None:
        monkeypatch.delenv(cpu_budget.JOB_CPUS_ENV, raising=False)
    else:
        monkeypatch.setenv(cpu_budget.JOB_CPUS_ENV, reserved)
    assert cpu_budget.usable_cpus() == expected


def test_workers_follow_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host with 64 cores and a quota of 3 CPUs gets 3 depth workers and 3 matching processes."""
    monkeypatch.setattr(cpu_budget, "usable_cpus", lambda: 3)
    assert estimate_depth._worker_count(estimate_depth.DepthConfig()) == 3
    assert estimate_depth._worker_count(estimate_depth.DepthConfig(workers=5)) == 5  # a setting wins
    assert parallel_matching.processes_for(10_000, 0) == 3
    monkeypatch.setattr(cpu_budget, "usable_cpus", lambda: 64)
    assert estimate_depth._worker_count(estimate_depth.DepthConfig()) == 8  # memory: 8 at most
    assert parallel_matching.processes_for(10_000, 0) == cpu_budget.MAX_WORKER_PROCESSES
