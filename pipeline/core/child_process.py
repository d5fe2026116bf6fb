"""Processes that must not outlive the process that started them.

A job and its dense workers are killed as one process group by the daemon; but if the daemon itself
is killed (kill -9, OOM killer) nobody is left to do that. Linux's parent-death signal closes the
gap: each child asks the kernel to SIGKILL it when its parent goes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Call first thing in a child; `parent` is the pid that started it (checked against a race)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
