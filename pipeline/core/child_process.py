"""Processes that must not outlive the process that started them.

A job and its dense workers are killed as one process group by the daemon; but if the daemon itself
is killed (kill -9, OOM killer) nobody is left to do that. Linux's parent-death signal closes the
gap where the starter is the parent: each child asks the kernel to SIGKILL it when its parent goes.
A job forked by multiprocessing's fork server is not the daemon's child: it holds a lifeline, a
pipe whose other end only the daemon holds, and kills its group when that pipe closes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
from multiprocessing.connection import Connection

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Call first thing in a child; `parent` is the pid that started it (checked against a race)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def die_with(lifeline: Connection, group: bool = True) -> None:
    """Call first thing in a child that leads its own process group: the group is killed as soon
    as the other end of `lifeline` closes (its holder exited or died; it never writes). With
    `group` False, only this process is (one that starts none and shares its starter's group)."""

    def watch() -> None:
        with contextlib.suppress(EOFError, OSError):
            lifeline.recv()
        if group:
            os.killpg(0, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="lifeline", daemon=True).start()
