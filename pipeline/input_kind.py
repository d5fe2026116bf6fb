"""What a drop is, from its name alone: a folder of photos, a zip, a video or one photo.

The daemon sorts inbox entries with this and ingest picks how to read its input. It only
classifies; whether a drop is safe to read (links out of it, hostile zips) is ingest's job.
"""

from __future__ import annotations

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
