"""What a drop is, from its name alone (a folder of photos, a zip, a video or one photo), and
what it holds (its listing).

The daemon sorts and watches inbox entries with this and ingest picks how to read its input. It
only classifies; whether a drop is safe to read (links out of it, hostile zips) is ingest's job.
Light on purpose: the daemon imports it.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path

# Defined here, not in ingest_images, which imports this module (one definition, no import cycle).
# HEIC/HEIF (what iPhones save by default) are read through pillow-heif and converted to JPEG.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".heic", ".heif"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".m4v", ".mkv", ".avi", ".webm"}


class InputKind(StrEnum):
    photos = "photos"  # a folder of photos
    zip = "zip"
    video = "video"
    photo = "photo"  # one image file


_JOB_KINDS = {
    InputKind.photos: "multi_view",
    InputKind.zip: "multi_view",
    InputKind.video: "video",
    InputKind.photo: "single_photo",
}


def job_kind(kind: InputKind | None) -> str:
    """The reconstruction an input gets: multi_view, video, single_photo, or unknown."""
    return _JOB_KINDS.get(kind, "unknown") if kind else "unknown"


def input_kind(path: Path) -> InputKind | None:
    """The kind of `path`, or None for a file scandrop cannot read.

    A folder (or a link to one) is `photos`; anything else is classified by its own name, so a
    link named "a.zip" is a zip and a dangling link is classified like the file it names.
    Never raises for a missing path: the caller reports that.
    """
    if path.is_dir():
        return InputKind.photos
    suffix = path.suffix.lower()
    if suffix == ".zip":
        return InputKind.zip
    if suffix in VIDEO_SUFFIXES:
        return InputKind.video
    if suffix in IMAGE_SUFFIXES:
        return InputKind.photo
    return None


Listing = tuple[tuple[str, int, int], ...]


def is_ignored(name: str, patterns: Sequence[str]) -> bool:
    """fnmatch, case-insensitive: junk names (".DS_Store", "*.part", ...) never count as content."""
    lowered = name.lower()
    return any(fnmatch.fnmatchcase(lowered, p.lower()) for p in patterns)


def listing(root: Path, ignore: Sequence[str] = ()) -> Listing:
    """(relative path, size, mtime ns) of every file of an input: below a folder (links are not
    followed, names matching `ignore` skipped), or the file itself. It tells when a drop has
    stopped changing and whether a workspace was made from this very input."""
    if not root.is_dir() or root.is_symlink():
        st = root.lstat()
        return ((root.name, st.st_size, st.st_mtime_ns),)
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not is_ignored(d, ignore))
        base = Path(folder)
        for name in sorted(files):
            if is_ignored(name, ignore):
                continue
            try:
                st = (base / name).lstat()
            except OSError:
                continue  # vanished while we looked: the next look sees the change
            found.append((str((base / name).relative_to(root)), st.st_size, st.st_mtime_ns))
    return tuple(found)
