"""Resolve a drop to the files ingest reads, refusing drops it must not or cannot read.

A drop is a folder of photos or a zip of them (unpacked safely into the workspace first). A drop
may not reach outside itself: a link to a file or folder elsewhere fails the job (`unsafe_input`).
A missing drop is `input_missing`; a video, a single photo or a file of another kind is
`unsupported_input`, each with a hint on what to drop instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.stage import Progress, StopCheck
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.ingest.input_kind import IMAGE_SUFFIXES, VIDEO_SUFFIXES, InputKind, input_kind
from scandrop.pipeline.ingest.photo_masks import mask_owner
from scandrop.pipeline.ingest.unpack_archive import extract_zip


def _links_out(link: Path, root: Path) -> bool:
    """Whether the symlink `link` resolves to somewhere outside the folder `root`."""
    try:
        return not link.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a loop of links (RuntimeError before Python 3.13)
        return True


def _unsafe(entry: str) -> ScandropError:
    return ScandropError(
        ErrorCode.unsafe_input,
        f"{entry} is a link to a file or folder outside the drop; scandrop reads only what is in the drop.",
        "Copy the photos into the drop instead of linking to them.",
    )


def refuse_links_out(drop: Path) -> None:
    """Fail with `unsafe_input` when the drop, or anything below a folder drop, links outside it.

    Otherwise a drop could make the job read (and publish) any file the daemon can read.
    Links that stay inside the drop are fine; linked folders are never descended into.
    """
    if drop.is_symlink() and _links_out(drop, drop.parent):
        raise _unsafe(drop.name)
    if not drop.is_dir():
        return
    root = drop.resolve()
    for folder, dirs, files in os.walk(drop, followlinks=False):
        for name in sorted((*dirs, *files)):
            entry = Path(folder) / name
            if entry.is_symlink() and _links_out(entry, root):
                raise _unsafe(str(entry.relative_to(drop)))


def photo_folder(
    drop: Path,
    ws: Workspace,
    limits: tuple[int, int],
    progress: Progress,
    should_stop: StopCheck,
) -> Path:
    """The folder to read photos from: the drop itself, or its zip unpacked into the workspace.

    `limits` are the most bytes and files a zip drop may unpack to (a zip bomb fails the job).
    """
    if not drop.exists():  # also a link to nothing
        kind = "link to a missing file" if drop.is_symlink() else "path"
        raise ScandropError(
            ErrorCode.input_missing,
            f"The input {drop} does not exist ({kind}).",
            "Check the path; the drop may have been moved or deleted before the job started.",
        )
    refuse_links_out(drop)
    kind = input_kind(drop)
    if kind is InputKind.photos:
        return drop
    if kind is InputKind.zip:
        if not ws.unpacked_dir.is_dir():  # present only when a previous try unpacked it whole
            progress(0.0, f"unpacking {drop.name}")
            extract_zip(drop, ws.unpacked_dir, *limits, should_stop)
        return ws.unpacked_dir
    if kind is InputKind.video:
        raise ScandropError(
            ErrorCode.unsupported_input,
            "Video drops are read by the frames stage, not by photo ingest.",
            "Drop the video itself into the inbox (it becomes a video job), or drop a folder of photos.",
        )
    if kind is InputKind.photo:
        raise ScandropError(
            ErrorCode.unsupported_input,
            "A single photo is read through the single-photo path, not by multi-view ingest.",
            "Drop the photo itself into the inbox (it becomes a single-photo job), or a folder (or zip) "
            "of at least 3 overlapping photos.",
        )
    suffix = drop.suffix or "a file without a suffix"
    raise ScandropError(
        ErrorCode.unsupported_input,
        f"{drop.name} is not something scandrop can read ({suffix}).",
        f"Drop a folder of photos or a .zip of them (photos: {', '.join(sorted(IMAGE_SUFFIXES))}), "
        f"one photo, or a video ({', '.join(sorted(VIDEO_SUFFIXES))}).",
    )


def find_files(input_dir: Path) -> tuple[list[Path], list[Path]]:
    """(photos, mask files named like `<stem>_mask.png`) below `input_dir`, skipping hidden entries
    and `masks` folders."""
    photos, masks = [], []
    for path in sorted(input_dir.rglob("*")):
        rel = path.relative_to(input_dir)
        if any(part.startswith((".", "_")) or part.lower() == "masks" for part in rel.parts):
            continue
        if not path.is_file():
            continue
        if mask_owner(path) is not None:
            masks.append(path)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            photos.append(path)
    return photos, masks


def no_photos(drop_name: str) -> ScandropError:
    """`no_input`: the drop holds no file of a photo kind scandrop reads."""
    kinds = ", ".join(sorted(IMAGE_SUFFIXES))
    return ScandropError(
        ErrorCode.no_input, f"No photos found in {drop_name}.", f"Drop photos of one of these kinds: {kinds}."
    )
