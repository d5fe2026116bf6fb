"""Ingest: turn whatever photos a person dropped into clean 8-bit RGB images for COLMAP.

A drop is a folder of photos or a zip of them (unpacked safely into the workspace first). A drop
may not reach outside itself: a link to a file or folder elsewhere fails the job (`unsafe_input`).

Every later stage may assume: images are readable 8-bit RGB, upright (EXIF orientation applied),
no larger than `max_image_size`, with a mask beside them when the photo had an alpha channel.
Files that cannot be used are skipped and named with the reason; the job goes on when enough remain.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import ErrorCode, ScandropError
from pipeline.input_kind import IMAGE_SUFFIXES, VIDEO_SUFFIXES, InputKind, input_kind
from pipeline.stage import Progress, StopCheck, atomic_dir, check_stop, write_json_atomic
from pipeline.unpack_archive import extract_zip
from pipeline.workspace import Workspace

# Refuse to decode anything bigger than this: a 250-megapixel RGB image is 750 MB in memory.
MAX_DECODE_PIXELS = 250_000_000
MIN_SIDE = 64


class IngestConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_image_size: int = Field(1600, ge=256, description="Longest side after ingest, in pixels.")
    min_images: int = Field(3, ge=2, description="Fewer usable photos than this fails the job.")
    alpha_threshold: int = Field(128, ge=1, le=255, description="Alpha at or above this is object.")
    max_archive_bytes: int = Field(8 * 2**30, ge=1, description="Most bytes a zip drop may unpack to.")
    max_archive_files: int = Field(10_000, ge=1, description="A zip drop may hold at most this many files.")


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
    masked: int
    sizes: dict[str, list[int]] = Field(description="Distinct original sizes 'WxH' -> count, [w,h,n].")
    cameras: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Camera key (size, EXIF make/model/focal) -> image names sharing it.",
    )

    def camera_groups(self) -> list[list[str]]:
        """Images that share intrinsics: one COLMAP camera per group."""
        return [names for _, names in sorted(self.cameras.items())]


Listing = tuple[tuple[str, int, int], ...]


def listing(folder: Path) -> Listing:
    """(relative path, size, mtime) of every file below `folder`: what tells a drop is complete
    (it stops changing) and whether a workspace was made from this very input."""
    entries = []
    for p in sorted(folder.rglob("*")):
        try:
            if p.is_file():
                st = p.stat()
                entries.append((str(p.relative_to(folder)), st.st_size, st.st_mtime_ns))
        except OSError:
            continue  # vanished while we looked: the next look sees the change
    return tuple(entries)


def find_images(input_dir: Path) -> list[Path]:
    """Candidate photo files below `input_dir`, skipping hidden entries and scandrop's own folders."""
    found = []
    for path in sorted(input_dir.rglob("*")):
        rel = path.relative_to(input_dir)
        if any(part.startswith((".", "_")) or part == "masks" for part in rel.parts):
            continue
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found.append(path)
    return found


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
    config: IngestConfig, drop: Path, ws: Workspace, progress: Progress, should_stop: StopCheck
) -> Path:
    """The folder to read photos from: the drop itself, or its zip unpacked into the workspace."""
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
            limits = config.max_archive_bytes, config.max_archive_files
            extract_zip(drop, ws.unpacked_dir, *limits, should_stop)
        return ws.unpacked_dir
    if kind is InputKind.video:
        raise ScandropError(
            ErrorCode.unsupported_input,
            "Video drops are not supported by this version yet.",
            "Extract the frames (for example: ffmpeg -i video.mp4 -vf fps=2 frames/%04d.jpg) and drop "
            "that folder, or drop a folder of photos.",
        )
    if kind is InputKind.photo:
        raise ScandropError(
            ErrorCode.unsupported_input,
            "A single photo has no multi-view geometry; "
            "single-photo reconstruction is not in this version yet.",
            "Drop a folder (or zip) of at least 3 overlapping photos of the object, taken from different "
            "positions.",
        )
    suffix = drop.suffix or "a file without a suffix"
    raise ScandropError(
        ErrorCode.unsupported_input,
        f"{drop.name} is not something scandrop can read ({suffix}).",
        f"Drop a folder of photos or a .zip of them (photos: {', '.join(sorted(IMAGE_SUFFIXES))}; "
        f"videos {', '.join(sorted(VIDEO_SUFFIXES))} are not supported yet).",
    )


def _to_rgb8(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode any PIL mode to (8-bit RGB array, alpha array or None), scaling 16-bit data down."""
    alpha = None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = np.percentile(arr, 99.9) if arr.size else 0.0
        scale = 255.0 / hi if hi > 0 else 0.0
        gray = np.clip(arr * scale, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2), None
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = np.asarray(img.getchannel("A"))
    if img.mode == "RGB;16" or img.mode.startswith("RGBA;16"):
        img = img.convert("RGB")
    rgb = np.asarray(img.convert("RGB"))
    return rgb, alpha


def _camera_key(img: Image.Image) -> str:
    """Photos with the same size, camera body and focal length share intrinsics."""
    exif = img.getexif()
    sub = exif.get_ifd(0x8769)  # Exif IFD: FocalLength, FocalLengthIn35mmFilm
    parts = [
        f"{img.size[0]}x{img.size[1]}",
        str(exif.get(0x010F, "")).strip(),
        str(exif.get(0x0110, "")).strip(),
        str(sub.get(0x920A, "")),
        str(sub.get(0xA405, "")),
    ]
    return "|".join(parts)


def _is_8bit(path: Path, img: Image.Image) -> bool:
    """JPEG is always 8-bit; Pillow reads 16-bit RGB PNGs as "RGB" too, so read the PNG header."""
    if img.format == "JPEG":
        return True
    if img.format == "PNG":
        with open(path, "rb") as fh:
            header = fh.read(26)
        return len(header) == 26 and header[24] == 8
    return False


class Loaded(NamedTuple):
    rgb: np.ndarray
    alpha: np.ndarray | None
    orig_size: tuple[int, int]
    resized: bool
    exif: bytes
    camera: str
    pristine: bool  # already an upright 8-bit RGB JPEG/PNG within size: copy the file as it is


def _load(path: Path, max_size: int) -> Loaded:
    """Read one photo upright and bounded in size; raise ValueError with a reason when unusable."""
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            orig_size = img.size
            upright_rgb = img.mode == "RGB" and img.getexif().get(0x0112, 1) == 1 and _is_8bit(path, img)
            if orig_size[0] * orig_size[1] > MAX_DECODE_PIXELS:
                raise ValueError(f"image too large to decode safely ({orig_size[0]}x{orig_size[1]})")
            # JPEG can decode at 1/2, 1/4, 1/8 scale directly: big photos never reach memory whole.
            img.draft("RGB", (max_size, max_size))
            img = ImageOps.exif_transpose(img)
            img.load()
            # Keep EXIF (focal length) for COLMAP's intrinsics prior; orientation is already applied.
            exif = img.getexif().tobytes() if img.getexif() else b""
            camera = _camera_key(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"unreadable or corrupt image ({type(exc).__name__})") from exc
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ValueError("image too large to decode safely") from exc
    if min(img.size) < MIN_SIDE:
        raise ValueError(f"image too small ({img.size[0]}x{img.size[1]}, need {MIN_SIDE} px or more)")
    resized = max(img.size) > max_size
    if resized:
        scale = max_size / max(img.size)
        img = img.resize(
            (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))), Image.Resampling.LANCZOS
        )
    rgb, alpha = _to_rgb8(img)
    return Loaded(rgb, alpha, orig_size, resized, exif, camera, upright_rgb and not resized)


def _unique_name(stem: str, suffix: str, taken: set[str]) -> str:
    name = f"{stem}{suffix}"
    n = 1
    while name in taken:
        name = f"{stem}_{n}{suffix}"
        n += 1
    taken.add(name)
    return name


def run(
    config: IngestConfig, input_dir: Path, ws: Workspace, progress: Progress, should_stop: StopCheck
) -> IngestResult:
    """Copy usable photos from the drop `input_dir` (a folder or a zip) into the workspace, normalised."""
    if ws.ingest_json.exists():
        return IngestResult.model_validate_json(ws.ingest_json.read_text())
    drop_name = input_dir.name
    input_dir = photo_folder(config, input_dir, ws, progress, should_stop)
    candidates = find_images(input_dir)
    if not candidates:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ScandropError(
            ErrorCode.no_input,
            f"No photos found in {drop_name}.",
            f"Drop photos of one of these kinds: {kinds}.",
        )
    shutil.rmtree(ws.masks_dir, ignore_errors=True)
    names: list[str] = []
    sources: dict[str, str] = {}
    rejected: list[Rejected] = []
    sizes: dict[str, list[int]] = {}
    cameras: dict[str, list[str]] = {}
    taken: set[str] = set()
    resized_count = masked = 0
    with atomic_dir(ws.images_dir) as staging:  # images/ appears only once every photo is in
        for i, path in enumerate(candidates):
            check_stop(should_stop)
            progress(i / len(candidates), f"reading {path.name}")
            rel = str(path.relative_to(input_dir))
            try:
                loaded = _load(path, config.max_image_size)
                mask = None
                if loaded.alpha is not None:
                    mask = np.where(loaded.alpha >= config.alpha_threshold, 255, 0).astype(np.uint8)
                    if mask.mean() < 255 * 0.001:
                        raise ValueError("alpha channel is fully transparent: nothing to reconstruct")
                    if mask.min() == 255:
                        mask = None  # opaque everywhere: no mask needed
            except ValueError as exc:
                rejected.append(Rejected(file=rel, reason=str(exc)))
                continue
            width, height = loaded.orig_size
            key = f"{width}x{height}"
            sizes[key] = [width, height, sizes.get(key, [0, 0, 0])[2] + 1]
            suffix = ".jpg" if path.suffix.lower() in (".jpg", ".jpeg") else ".png"
            name = _unique_name(path.stem, suffix, taken)
            out = staging / name
            if loaded.pristine:
                shutil.copyfile(path, out)
            elif suffix == ".jpg":
                Image.fromarray(loaded.rgb).save(out, quality=95, exif=loaded.exif)
            else:
                Image.fromarray(loaded.rgb).save(out, compress_level=1)
            if mask is not None:
                ws.masks_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(ws.mask_for(name), compress_level=1)
                masked += 1
            resized_count += int(loaded.resized)
            names.append(name)
            sources[name] = rel
            cameras.setdefault(loaded.camera, []).append(name)
        if len(names) < config.min_images:
            detail = "; ".join(f"{r.file}: {r.reason}" for r in rejected[:5])
            raise ScandropError(
                ErrorCode.too_few_images,
                f"Only {len(names)} usable photo(s) of {len(candidates)}; "
                f"at least {config.min_images} are needed." + (f" Skipped: {detail}" if detail else ""),
                "Drop at least 3 overlapping photos of the object, taken from different positions.",
            )
    result = IngestResult(
        images_in=len(candidates),
        usable=len(names),
        names=names,
        sources=sources,
        rejected=rejected,
        resized=resized_count,
        masked=masked,
        sizes=sizes,
        cameras=cameras,
    )
    write_json_atomic(ws.ingest_json, result.model_dump(mode="json"))
    progress(1.0, f"{len(names)} photos ready, {len(rejected)} skipped")
    return result
