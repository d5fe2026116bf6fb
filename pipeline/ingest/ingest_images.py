"""Ingest: turn whatever photos a person dropped into clean 8-bit RGB images for COLMAP.

This module is the stage: its config, its result and `run`, which composes the parts that live in
their own modules: `drop_input` (which folder to read, refusing unsafe or unsupported drops),
`read_photo` (one photo, upright and bounded), `photo_masks` (alpha channels and mask files) and
`photo_hygiene` (blur, byte-identical copies, near duplicates).

Every later stage may assume: images are readable 8-bit RGB, upright (EXIF orientation applied),
no larger than `max_image_size`, with a mask in `ws.masks_dir` when the photo came with one (an alpha
channel or a mask file, see `photo_masks.MaskFinder`). Feature extraction and depth both ignore pixels
outside a mask. Files that cannot be used are skipped and named with the reason; the job goes on when
enough remain.

Hygiene is reported, not guessed at silently: byte-identical copies are skipped, blurred photos and
near-duplicate views are listed (see `IngestConfig.drop_blurred` for why blurred ones are kept).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.stage import (
    Progress,
    StopCheck,
    atomic_dir,
    check_stop,
    sha256_file,
    write_json_atomic,
)
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.ingest.drop_input import find_files, no_photos, photo_folder
from scandrop.pipeline.ingest.photo_hygiene import (
    THUMB_SIDE,
    blurred,
    near_duplicate_pairs,
    sharpness,
    thumbnail,
)
from scandrop.pipeline.ingest.photo_masks import MaskFinder, mask_owner, photo_mask
from scandrop.pipeline.ingest.read_photo import load_photo


class IngestConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_image_size: int = Field(1600, ge=256, description="Longest side after ingest, in pixels.")
    min_images: int = Field(3, ge=2, description="Fewer usable photos than this fails the job.")
    alpha_threshold: int = Field(128, ge=1, le=255, description="Alpha at or above this is object.")
    max_archive_bytes: int = Field(8 * 2**30, ge=1, description="Most bytes a zip drop may unpack to.")
    max_archive_files: int = Field(10_000, ge=1, description="A zip drop may hold at most this many files.")
    blur_ratio: float = Field(
        0.35,
        gt=0.0,
        lt=1.0,
        description="A photo whose sharpness (variance of the Laplacian at 512 px) is below this share of "
        "the set's median is reported as blurred. On real photo sets every photo scored >= 0.4 of its "
        "set's median, while a 2-pixel Gaussian blur drops a photo to about 0.01-0.03.",
    )
    drop_blurred: bool = Field(
        False,
        description="Skip blurred photos instead of only reporting them. Off by default: the measure also "
        "falls for sharp photos with little texture (a plain side of the object, more background), a "
        "blurred photo mostly just yields fewer features, and dropping one can lose the only view of a part.",
    )
    near_duplicate_mad: float = Field(
        2.0,
        ge=0.0,
        le=255.0,
        description="Two photos of the same size whose 64x64 grey thumbnails differ by less than this mean "
        "absolute difference (0-255) are reported as near duplicates (not skipped: a turntable at small "
        "steps is legitimate). Neighbouring views of real sets differ by 9 or more; a re-saved copy by < 1.",
    )


class Rejected(BaseModel):
    file: str
    reason: str


class IngestResult(BaseModel):
    images_in: int
    usable: int
    names: list[str] = Field(description="Workspace image names, in input order.")
    sources: dict[str, str] = Field(description="Workspace image name -> input file (relative).")
    rejected: list[Rejected]
    resized: int
    masked: int = Field(
        description="Images written with a mask (from an alpha channel, a mask file or both)."
    )
    masks_from_files: int = Field(0, description="Of `masked`, those whose mask came from a mask file.")
    sizes: dict[str, list[int]] = Field(description="Distinct original sizes 'WxH' -> count, [w,h,n].")
    cameras: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Camera key (size, EXIF make/model/focal) -> image names sharing it.",
    )
    blurred: list[str] = Field(
        default_factory=list,
        description="Input files much less sharp than the set's median (skipped only with drop_blurred).",
    )
    duplicates: list[list[str]] = Field(
        default_factory=list,
        description="Groups of byte-identical input files; the first is used, the others are skipped.",
    )
    near_duplicates: list[list[str]] = Field(
        default_factory=list,
        description="Pairs of input files that show nearly the same view; reported only, both are used.",
    )

    def camera_groups(self) -> list[list[str]]:
        """Images that share intrinsics: one COLMAP camera per group."""
        return [names for _, names in sorted(self.cameras.items())]


def _unique_name(stem: str, suffix: str, taken: set[str]) -> str:
    name = f"{stem}{suffix}"
    n = 1
    while name in taken:
        name = f"{stem}_{n}{suffix}"
        n += 1
    taken.add(name)
    return name


class _Kept(NamedTuple):
    """What the result and the hygiene checks need of a photo once it is in the workspace."""

    name: str  # workspace image name
    rel: str  # input file, relative to the drop
    orig_size: tuple[int, int]
    shown_size: tuple[int, int]
    resized: bool
    camera: str
    mask: str  # "" (none), "alpha" or "file" (a mask file, maybe intersected with alpha)
    sharpness: float
    thumb: np.ndarray


def run(
    config: IngestConfig, input_dir: Path, ws: Workspace, progress: Progress, should_stop: StopCheck
) -> IngestResult:
    """Copy usable photos from the drop `input_dir` (a folder or a zip) into the workspace, normalised."""
    if ws.ingest_json.exists():
        return IngestResult.model_validate_json(ws.ingest_json.read_text())
    drop_name = input_dir.name
    limits = config.max_archive_bytes, config.max_archive_files
    input_dir = photo_folder(input_dir, ws, limits, progress, should_stop)
    candidates, mask_files = find_files(input_dir)
    if not candidates:
        raise no_photos(drop_name)
    shutil.rmtree(ws.masks_dir, ignore_errors=True)
    finder = MaskFinder(input_dir)
    used_masks: set[Path] = set()
    rejected: list[Rejected] = []
    digests: dict[str, list[str]] = {}
    kept: list[_Kept] = []
    taken: set[str] = set()
    with atomic_dir(ws.images_dir) as staging:  # images/ appears only once every photo is in
        for i, path in enumerate(candidates):
            check_stop(should_stop)
            progress(0.9 * i / len(candidates), f"reading {path.name}")
            rel = str(path.relative_to(input_dir))
            mask_file = finder.find(path)
            if mask_file is not None:
                used_masks.add(mask_file)
            try:
                if path.stat().st_size > 0:
                    same = digests.setdefault(sha256_file(path), [])
                    same.append(rel)
                    if len(same) > 1:
                        raise ValueError(f"identical to {same[0]}")
                loaded = load_photo(path, config.max_image_size)
                rel_mask = str(mask_file.relative_to(input_dir)) if mask_file is not None else ""
                mask = photo_mask(loaded, mask_file, rel_mask, config.alpha_threshold)
            except ValueError as exc:
                rejected.append(Rejected(file=rel, reason=str(exc)))
                continue
            suffix = ".jpg" if path.suffix.lower() in (".jpg", ".jpeg", ".heic", ".heif") else ".png"
            name = _unique_name(path.stem, suffix, taken)
            out = staging / name
            if loaded.pristine:
                shutil.copyfile(path, out)
            elif suffix == ".jpg":
                # Full colour resolution (4:4:4): the texture atlas copies these pixels, and
                # Pillow's default 4:2:0 halves their colour detail (see README, "How it works").
                Image.fromarray(loaded.rgb).save(out, quality=95, subsampling=0, exif=loaded.exif)
            else:
                Image.fromarray(loaded.rgb).save(out, compress_level=1)
            if mask is not None:
                ws.masks_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(ws.mask_for(name), compress_level=1)
            source = "" if mask is None else "file" if mask_file is not None else "alpha"
            gray = cv2.cvtColor(loaded.rgb, cv2.COLOR_RGB2GRAY)
            kept.append(
                _Kept(
                    name,
                    rel,
                    loaded.orig_size,
                    loaded.shown_size,
                    loaded.resized,
                    loaded.camera,
                    source,
                    sharpness(gray, mask),
                    thumbnail(gray),
                )
            )

        progress(0.9, "checking for blur and near duplicates")
        sharpness_of = [k.sharpness for k in kept]
        blurry = [(kept[i], share) for i, share in blurred(sharpness_of, config.blur_ratio)]
        if config.drop_blurred:
            for k, share in blurry:
                (staging / k.name).unlink()
                ws.mask_for(k.name).unlink(missing_ok=True)
                reason = (
                    f"blurred: {share:.0%} of the set's median sharpness (blur_ratio {config.blur_ratio})"
                )
                rejected.append(Rejected(file=k.rel, reason=reason))
            dropped = {k.name for k, _ in blurry}
            kept = [k for k in kept if k.name not in dropped]
        pairs = near_duplicate_pairs(
            np.stack([k.thumb for k in kept]) if kept else np.zeros((0, THUMB_SIDE, THUMB_SIDE), np.float32),
            [k.shown_size for k in kept],
            config.near_duplicate_mad,
        )
        for path in mask_files:
            if path not in used_masks:
                owner = mask_owner(path)
                rejected.append(
                    Rejected(
                        file=str(path.relative_to(input_dir)),
                        reason=f"named like a mask file, but no photo named {owner}.* is beside it "
                        "(rename it if it is a photo)",
                    )
                )
        if len(kept) < config.min_images:
            detail = "; ".join(f"{r.file}: {r.reason}" for r in rejected[:5])
            raise ScandropError(
                ErrorCode.too_few_images,
                f"Only {len(kept)} usable photo(s) of {len(candidates)}; "
                f"at least {config.min_images} are needed." + (f" Skipped: {detail}" if detail else ""),
                "Drop at least 3 overlapping photos of the object, taken from different positions."
                if config.min_images > 1
                else "Drop a readable photo of at least 64 px showing the object (not fully transparent).",
            )
    sizes: dict[str, list[int]] = {}
    cameras: dict[str, list[str]] = {}
    for k in kept:
        width, height = k.orig_size
        key = f"{width}x{height}"
        sizes[key] = [width, height, sizes.get(key, [0, 0, 0])[2] + 1]
        cameras.setdefault(k.camera, []).append(k.name)
    result = IngestResult(
        images_in=len(candidates),
        usable=len(kept),
        names=[k.name for k in kept],
        sources={k.name: k.rel for k in kept},
        rejected=rejected,
        resized=sum(k.resized for k in kept),
        masked=sum(bool(k.mask) for k in kept),
        masks_from_files=sum(k.mask == "file" for k in kept),
        sizes=sizes,
        cameras=cameras,
        blurred=[k.rel for k, _ in blurry],
        duplicates=[group for group in digests.values() if len(group) > 1],
        near_duplicates=[[kept[i].rel, kept[j].rel] for i, j in pairs],
    )
    write_json_atomic(ws.ingest_json, result.model_dump(mode="json"))
    progress(1.0, f"{len(kept)} photos ready, {len(rejected)} skipped")
    return result
