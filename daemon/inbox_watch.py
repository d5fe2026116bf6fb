"""Filesystem events as hints: inotify (watchdog) on local disks, nothing on network shares.

inotify does not see changes made by other machines on NFS/SMB, so on network and FUSE filesystems
the scanner polls instead. Either way events only wake the scanner early; its rescans are the
truth, so a missed or overflowed event only delays a job. The observer is restarted when the inbox
comes back after it disappeared (a share unmounted and mounted again is a new directory).
The watch is on the inbox's top level only: a drop that is still filling is polled anyway until it
settles, and a recursive watch would cost one inotify watch per folder of every drop.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from scandrop.daemon.settings import WatchMode

log = structlog.get_logger("scandrop.watch")

NETWORK_FILESYSTEMS = {
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "ncpfs",
    "afs",
    "9p",
    "ceph",
    "glusterfs",
    "lustre",
    "gpfs",
    "beegfs",
    "davfs",
    "sshfs",
    "virtiofs",
    "vboxsf",
    "vmhgfs",
    "drvfs",
    "fuseblk",
}


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040 ...); other bytes are raw
    UTF-8, so only the escapes are decoded (unicode_escape would turn "ü" into mojibake)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def filesystem_type(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> str:
    """The type of the filesystem `path` lives on (its nearest existing ancestor), or "unknown"."""
    target = path.resolve()
    while not target.exists() and target != target.parent:
        target = target.parent
    best, fstype = "", "unknown"
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return fstype
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount_point = _unescape(fields[4])
        inside = str(target) == mount_point or str(target).startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, fstype = mount_point, right.split()[0]
    return fstype


def is_network(fstype: str) -> bool:
    return (
        fstype in NETWORK_FILESYSTEMS
        or fstype.startswith("fuse")
        or fstype.split(".")[0] in NETWORK_FILESYSTEMS
    )


def choose_mode(setting: WatchMode, fstype: str) -> WatchMode:
    if setting != WatchMode.auto:
        return setting
    return WatchMode.poll if is_network(fstype) else WatchMode.native


class _Wake(FileSystemEventHandler):
    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if not event.is_synthetic:
            self._wake()


class InboxWatch:
    """Keeps a native observer on the inbox while it exists (native mode only)."""

    def __init__(self, inbox: Path, mode: WatchMode, wake: Callable[[], None]) -> None:
        self.inbox = inbox
        self.mode = mode
        self._wake = wake
        self._observer: BaseObserver | None = None
        self._watched: tuple[int, int] | None = None

    def ensure(self) -> None:
        """Called from each scan: (re)start the observer when the inbox is (newly) there."""
        if self.mode != WatchMode.native:
            return
        try:
            st = os.stat(self.inbox)
            identity = (st.st_dev, st.st_ino)
        except OSError:
            self.stop()
            return
        if self._watching() and identity == self._watched:
            return
        self.stop()
        observer = Observer()
        try:
            observer.schedule(_Wake(self._wake), str(self.inbox), recursive=False)
            observer.start()
        except OSError as exc:  # e.g. inotify watch limit: polling still finds every drop
            log.warning("native_watch_failed", inbox=str(self.inbox), error=str(exc))
            return
        self._observer, self._watched = observer, identity

    def _watching(self) -> bool:
        """The observer runs and its inotify watch too: watchdog ends the watch (not the observer) when
        the inbox is deleted, and a folder re-created at once often gets the same inode back."""
        observer = self._observer
        return observer is not None and observer.is_alive() and all(e.is_alive() for e in observer.emitters)

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            if self._observer.is_alive():
                self._observer.join(timeout=5)
        self._observer, self._watched = None, None
