"""What is in the inbox: drops, their kind, their listing, and whether they are complete.

A drop is one top-level entry of the inbox (a folder, a zip, a video, a photo). Junk that scanners,
desktops and sync tools leave behind is ignored by name at every level. A drop is complete when it
holds the ready marker, or when its listing (relative path, size, mtime) has stopped changing for
the stability window. An empty folder is never complete: people create it before they copy.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from scandrop.pipeline.core.stage import sha256_file
from scandrop.pipeline.ingest.input_kind import InputKind, Listing, input_kind, is_ignored, listing


@dataclass(frozen=True)
class Drop:
    path: Path
    kind: InputKind | None
    listing: Listing
    ready: bool
    forced: bool

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def size(self) -> int:
        return sum(size for _, size, _ in self.listing)


def ready_markers(marker: str) -> set[str]:
    """READY or .ready (for a configured READY); either one inside a folder drop marks it complete."""
    return {marker, "." + marker.lower()}


def content_patterns(patterns: list[str], ready_marker: str, force_marker: str) -> list[str]:
    """Names that are not content: junk and scandrop's own marker files."""
    return [*patterns, *sorted(ready_markers(ready_marker)), force_marker]


def scan_inbox(inbox: Path, patterns: list[str], ready_marker: str, force_marker: str) -> list[Drop]:
    """Every drop in the inbox now. Raises OSError when the inbox itself cannot be read."""
    drops = []
    markers = ready_markers(ready_marker)
    inner = content_patterns(patterns, ready_marker, force_marker)
    with os.scandir(inbox) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if is_ignored(entry.name, patterns) or entry.name in markers:
            continue
        path = Path(entry.path)
        try:
            kind = input_kind(path)
            is_folder = entry.is_dir(follow_symlinks=False)
            entries = listing(path, inner if is_folder else [])
            ready = is_folder and any((path / m).exists() for m in markers)
            forced = is_folder and (path / force_marker).exists()
        except OSError:
            continue  # vanished or unreadable for a moment: the next scan decides
        drops.append(Drop(path=path, kind=kind, listing=entries, ready=ready, forced=forced))
    return drops


class Settling:
    """Remembers since when each drop's listing has been unchanged."""

    def __init__(self) -> None:
        self._since: dict[str, tuple[Listing, float]] = {}

    def complete(self, drop: Drop, window: float, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if not drop.listing:
            self._since.pop(drop.name, None)
            return False
        previous = self._since.get(drop.name)
        if previous is None or previous[0] != drop.listing:
            self._since[drop.name] = (drop.listing, now)
            return drop.ready
        return drop.ready or now - previous[1] >= window

    def waited(self, name: str, now: float | None = None) -> float:
        previous = self._since.get(name)
        return 0.0 if previous is None else (time.monotonic() if now is None else now) - previous[1]

    def forget_missing(self, names: set[str]) -> None:
        for name in list(self._since):
            if name not in names:
                del self._since[name]

    def forget(self, name: str) -> None:
        self._since.pop(name, None)


def content_hash(root: Path, patterns: list[str]) -> str:
    """What the drop contains, independent of its name and timestamps: a re-drop hashes the same."""
    digest = hashlib.sha256()
    folder = root.is_dir() and not root.is_symlink()
    for rel, size, _ in listing(root, patterns):
        path = root / rel if folder else root
        digest.update(rel.encode() if folder else b"")
        digest.update(b"\0")
        if os.path.islink(path):
            digest.update(b"link:" + os.readlink(path).encode())
            continue
        digest.update(f"{size}:".encode() + bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()
