"""A real multi-node Ray cluster on this machine: a head without CPUs and worker nodes with one each.

Each node is a `ray start` in a session of its own, so it is stopped by killing exactly its
processes (never `ray stop`, which stops every Ray of the machine). Token authentication is on,
as Ray 2.60 needs for nodes to join; the token is ours, in the environment, never ~/.ray.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from daemon_process import free_port, wait_for

RAY = str(Path(sys.executable).with_name("ray"))


class LocalRayCluster:
    def __init__(self, workers: int = 2, cpus_per_worker: int = 1) -> None:
        # Short: Ray's Unix sockets live under the temp dir (107-byte path limit).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="sdray-", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.sessions: list[int] = []  # one session id (= the `ray start` pid) per node
        self.workers, self.cpus_per_worker = workers, cpus_per_worker

    def start(self) -> LocalRayCluster:
        if self.sessions:
            return self  # started already
        head = [
            f"--port={self.port}",
            "--num-cpus=0",
            f"--temp-dir={self.temp_dir}",
            "--include-dashboard=false",
        ]
        self._ray_start("--head", *head)
        for _ in range(self.workers):  # one at a time: Ray gives a starting node 30 s to register
            self._ray_start(f"--address={self.address}", f"--num-cpus={self.cpus_per_worker}")
        wait_for(lambda: len(self.raylets()) == self.workers + 1, 60, "every raylet to run")
        return self

    def _ray_start(self, *args: str) -> None:
        """`ray start`, tried twice: on a loaded machine a node can miss Ray's registration window."""
        for attempt in range(2):
            log_path = self.temp_dir / f"start-{len(self.sessions)}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [RAY, "start", "--node-ip-address=127.0.0.1", *args],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.sessions.append(proc.pid)
            if proc.wait(timeout=180) == 0:
                return
            _kill([p for p in self.processes() if os.getsid(p.pid) == proc.pid])
            if attempt == 1:
                raise AssertionError(
                    f"a Ray node did not start:\n{log_path.read_text(errors='replace')[-3000:]}"
                )

    def _logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in self.temp_dir.glob("start-*.log"))

    def processes(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) in self.sessions and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (psutil.Error, OSError):
                continue
        return found

    def raylets(self) -> list[psutil.Process]:
        return [p for p in self.processes() if _name(p) == "raylet"]

    def raylet_running(self, task_name: str) -> psutil.Process | None:
        """The raylet of the node whose worker runs `task_name` (a raylet is its workers' ancestor)."""
        for proc in self.processes():
            if task_name in " ".join(_cmdline(proc)):
                for parent in proc.parents():
                    if _name(parent) == "raylet":
                        return parent
        return None

    def stop(self) -> None:
        for _ in range(3):  # workers a dying raylet leaves behind are found on the next pass
            procs = self.processes()
            if not procs:
                break
            _kill(procs)
            time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _kill(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            continue
    psutil.wait_procs(procs, timeout=10)


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []
