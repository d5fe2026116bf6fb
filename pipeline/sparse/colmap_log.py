"""COLMAP's own log lines, heard while one of its calls runs: its matcher's only progress report.

glog writes from C++ straight to file descriptor 2. While `heard` is active, descriptor 2 is a pipe:
a thread hands each INFO line of COLMAP to `on_line` and passes every other line on to the real
stderr, so warnings and errors still reach the job's log. Reading the log is the only safe way in:
counting the pairs in COLMAP's database while it writes crashed its writer once (SIGBUS in
WriteMatches, a 50-photo job), as a second connection to a WAL database can.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable, Iterator

import pycolmap

_INFO = re.compile(r"^I\d{8} ")


@contextlib.contextmanager
def heard(on_line: Callable[[str], None]) -> Iterator[None]:
    """COLMAP's INFO lines go to `on_line` (from a reader thread) while the block runs."""
    read_end, write_end = os.pipe()
    saved = os.dup(2)
    level = pycolmap.logging.minloglevel

    def pump() -> None:
        with os.fdopen(read_end, "r", errors="replace") as lines:
            for line in lines:
                if _INFO.match(line):
                    with contextlib.suppress(Exception):  # a listener's bug must not stall the pipe
                        on_line(line)
                else:
                    os.write(saved, line.encode(errors="replace"))

    reader = threading.Thread(target=pump, name="colmap-log", daemon=True)
    reader.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    pycolmap.logging.minloglevel = 0
    try:
        yield
    finally:
        pycolmap.logging.minloglevel = level
        os.dup2(saved, 2)  # closes the pipe's last write end: the reader sees its end
        reader.join(timeout=5)
        os.close(saved)
