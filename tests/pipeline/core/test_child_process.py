"""A job forked by the fork server is not the daemon's child: its lifeline takes its group down."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from multiprocessing.connection import Connection

import psutil

from scandrop.pipeline.core.child_process import die_with


def _job(lifeline: Connection, pids: mp.Queue) -> None:
    os.setpgid(0, 0)
    die_with(lifeline)
    worker = mp.get_context("spawn").Process(target=time.sleep, args=(60,))
    worker.start()  # in the job's group, as the dense workers are
    pids.put((os.getpid(), worker.pid))
    time.sleep(60)


def test_the_group_dies_when_the_lifeline_closes_and_not_before() -> None:
    ctx = mp.get_context("forkserver")
    lifeline, held = ctx.Pipe(duplex=False)
    pids: mp.Queue = ctx.Queue()
    job = ctx.Process(target=_job, args=(lifeline, pids))
    job.start()
    lifeline.close()
    procs = [psutil.Process(pid) for pid in pids.get(timeout=30)]
    time.sleep(0.5)
    assert all(p.is_running() for p in procs)  # the daemon holds its end: the job lives
    held.close()  # as when the daemon dies
    _, alive = psutil.wait_procs(procs, timeout=10)
    assert not alive
    job.join(5)
    assert job.exitcode == -9
