"""Wall time and peak memory of a stage, counting the worker processes it starts.

Peak RSS is sampled (self + all descendants, summed) every 50 ms and combined with the kernel's
own high-water mark of this process, which is reset per stage where Linux allows it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from types import TracebackType

import psutil

_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_hwm() -> None:
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")  # resets VmHWM (Linux >= 4.0)


def _self_hwm_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree_rss_bytes(proc: psutil.Process) -> int:
    total = 0
    try:
        total += proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                continue
    except psutil.Error:
        pass
    return total


class Meter:
    """Context manager: `with Meter() as m: ...; m.seconds, m.peak_rss_mb`."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.seconds = 0.0
        self.peak_rss_mb = 0.0
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._t0 = 0.0

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self._peak = max(self._peak, _tree_rss_bytes(proc))
            self._stop.wait(self.interval)

    def __enter__(self) -> Meter:
        _reset_hwm()
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self._t0
        self.peak_rss_mb = max(self._peak, _self_hwm_bytes()) / 2**20
