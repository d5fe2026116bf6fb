"""Read one photo as ingest needs it: upright, 8-bit RGB, no larger than asked, decoded safely.

Kept apart from ingest so that fitting a mask file to its photo (`photo_masks`) can share the EXIF
orientation table and the decode limit without importing the stage.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Refuse to decode anything bigger than this: a 250-megapixel RGB image is 750 MB in memory.
MAX_DECODE_PIXELS = 250_000_000
MIN_SIDE = 64
# Pillow modes of more than 8 bits per sample, scaled (photos) or thresholded (masks) as numbers.
DEEP_MODES = ("I;16", "I;16B", "I;16L", "I", "F")
# Pillow's own table (ImageOps.exif_transpose): EXIF orientation -> transform that makes it upright.
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

try:  # HEIC/HEIF (iPhone photos); registered once, when this module is first imported
    import pillow_heif
except ImportError:  # pragma: no cover - a declared dependency; without it HEIC photos are skipped
    HEIF_READER = False
else:
    pillow_heif.register_heif_opener()
    HEIF_READER = True


def _to_rgb8(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode any PIL mode to (8-bit RGB array, alpha array or None), scaling 16-bit data down."""
    alpha = None
    if img.mode in DEEP_MODES:
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
    """One photo as `load_photo` read it, with what its mask file and the ingest result need of it."""

    rgb: np.ndarray
    alpha: np.ndarray | None
    orig_size: tuple[int, int]  # as Pillow opened it, before the EXIF orientation
    resized: bool
    exif: bytes
    camera: str
    pristine: bool  # already an upright 8-bit RGB JPEG/PNG within size: copy the file as it is
    orientation: int  # EXIF orientation of the pixels as stored (1 = upright)
    shown_size: tuple[int, int]  # full-resolution size once upright


def _stored_orientation(img: Image.Image) -> tuple[int, tuple[int, int]]:
    """(EXIF orientation of the stored pixels, their size). pillow-heif already rotates HEIC pixels
    upright on decoding and keeps the orientation they were stored in as `original_orientation`."""
    if img.format == "HEIF" and "original_orientation" in img.info:
        orientation = int(img.info["original_orientation"] or 1)
        w, h = img.size
        return orientation, ((h, w) if orientation >= 5 else (w, h))
    orientation = img.getexif().get(0x0112, 1)
    return (orientation if orientation in UPRIGHT else 1), img.size


def load_photo(path: Path, max_size: int) -> Loaded:
    """Read one photo upright and bounded in size; raise ValueError with a reason when unusable."""
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            orig_size = img.size
            orientation, stored = _stored_orientation(img)
            shown_size = (stored[1], stored[0]) if orientation >= 5 else stored
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
        if path.suffix.lower() in (".heic", ".heif") and not HEIF_READER:
            raise ValueError("HEIC/HEIF support (pillow-heif) is not installed") from exc
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
    pristine = upright_rgb and not resized
    return Loaded(rgb, alpha, orig_size, resized, exif, camera, pristine, orientation, shown_size)
