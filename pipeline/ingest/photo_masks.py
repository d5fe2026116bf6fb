"""Object masks of photos: from the alpha channel and from mask files that came with the drop.

A mask file has no EXIF and is often saved by a tool that ignored the photo's, so finding it
(`MaskFinder`) and fitting it to the photo as ingest wrote it (`photo_mask`) live here together.
A photo with a mask that does not fit is skipped rather than reconstructed with a wrong mask.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from scandrop.pipeline.ingest.read_photo import DEEP_MODES, MAX_DECODE_PIXELS, UPRIGHT, Loaded

MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_MASK_NAME = re.compile(r"^(?P<stem>.+)[_-]mask$", re.IGNORECASE)


def mask_owner(path: Path) -> str | None:
    """The photo stem that a mask file named like `<stem>_mask.png` (or `-mask`, any case) belongs to."""
    if path.suffix.lower() not in MASK_SUFFIXES:
        return None
    match = _MASK_NAME.match(path.stem)
    return match.group("stem") if match else None


class MaskFinder:
    """Finds the mask file of a photo, looking (first hit wins) for, case-insensitively:

    1. `<stem>_mask.<ext>` or `<stem>-mask.<ext>` beside the photo,
    2. `masks/<photo file name>.png`, `masks/<stem>.png` or `masks/<stem>.<ext>` beside the photo,
    3. the same names in `masks/<folder of the photo>/` at the drop's root, then in `masks/` there,

    with <ext> one of MASK_SUFFIXES. Folder listings are read once each.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._listings: dict[Path, tuple[dict[str, Path], dict[str, Path]]] = {}
        self._masks_dirs: dict[Path, Path] = {}

    def _lookup(self, folder: Path, names: list[str]) -> Path | None:
        if folder not in self._listings:
            exact: dict[str, Path] = {}
            lower: dict[str, Path] = {}
            if folder.is_dir() and not folder.is_symlink():
                for p in sorted(folder.iterdir()):
                    if p.is_file():
                        exact[p.name] = p
                        lower.setdefault(p.name.lower(), p)
            self._listings[folder] = exact, lower
        exact, lower = self._listings[folder]
        for name in names:
            found = exact.get(name) or lower.get(name.lower())
            if found is not None:
                return found
        return None

    def _masks_dir(self, folder: Path) -> Path:
        """`folder`'s masks folder, whatever the case of its name (`Masks` from Windows or macOS)."""
        if folder not in self._masks_dirs:
            named = [p for p in sorted(folder.glob("[mM][aA][sS][kK][sS]")) if p.is_dir()]
            self._masks_dirs[folder] = named[0] if named else folder / "masks"
        return self._masks_dirs[folder]

    def find(self, photo: Path) -> Path | None:
        stem = photo.stem
        beside = [f"{stem}{sep}mask{ext}" for sep in "_-" for ext in MASK_SUFFIXES]
        in_masks = [f"{photo.name}.png", *(f"{stem}{ext}" for ext in MASK_SUFFIXES)]
        folders = [self._masks_dir(photo.parent)]
        sub = photo.parent.relative_to(self.root)
        if sub != Path("."):
            folders += [self._masks_dir(self.root) / sub, self._masks_dir(self.root)]
        found = self._lookup(photo.parent, beside)
        for folder in folders:
            if found is None:
                found = self._lookup(folder, in_masks)
        return found


def _read_mask(path: Path) -> np.ndarray:
    """A mask file as a bool array (True = object), in the file's own pixel orientation.

    Object is a value over half the format's range (over 127 for 8-bit, so JPEG noise around black
    and white does not matter); a mask with values from 0 to 1 (a label image, a probability map) is
    object over 0.5. When the
    file has an alpha channel that is not fully opaque, the alpha is the mask.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.size[0] * img.size[1] > MAX_DECODE_PIXELS:
                    raise ValueError(f"mask file {path.name} is too large to decode safely")
                img.load()
                if img.mode == "P" and "transparency" in img.info:
                    img = img.convert("RGBA")
                values = None
                if "A" in img.getbands():
                    alpha = np.asarray(img.getchannel("A"))
                    values = alpha if alpha.min() < 255 else None
                if values is None:
                    values = np.asarray(img) if img.mode in DEEP_MODES else np.asarray(img.convert("L"))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ValueError(f"mask file {path.name} is too large to decode safely") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"mask file {path.name} is unreadable or corrupt ({type(exc).__name__})") from exc
    top = float(values.max()) if values.size else 0.0
    if top <= 1.0:
        return values > 0.5
    return values > (32767.5 if values.dtype != np.uint8 and top > 255 else 127)


def _same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return abs(a[0] * b[1] - b[0] * a[1]) <= 0.01 * b[0] * a[1]


def _fit_mask(mask: np.ndarray, loaded: Loaded, name: str) -> np.ndarray:
    """A mask file's bool array turned and resized exactly like its photo (nearest neighbour).

    A mask file has no EXIF of its own. It is taken to be in the photo's orientation as displayed
    (after EXIF) when its aspect ratio matches that, else in the photo's stored orientation when that
    matches (a tool that ignored EXIF); for a 180-degree turn or a mirror both match, and displayed
    wins. A mask of another size with the same aspect ratio (within 1%) is resized; any other mask
    does not belong to this photo and the photo is skipped rather than reconstructed with a wrong mask.
    """
    size = (mask.shape[1], mask.shape[0])
    shown = loaded.shown_size
    stored = (shown[1], shown[0]) if loaded.orientation >= 5 else shown
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    if not _same_aspect(size, shown):
        if not _same_aspect(size, stored):
            raise ValueError(
                f"mask {name} is {size[0]}x{size[1]}, which does not fit the photo's "
                f"{shown[0]}x{shown[1]} (aspect ratios differ by more than 1%)"
            )
        img = img.transpose(UPRIGHT[loaded.orientation])  # differing aspects: orientation 5-8
    height, width = loaded.rgb.shape[:2]
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(img) > 127


def photo_mask(
    loaded: Loaded, mask_file: Path | None, rel_mask: str, alpha_threshold: int
) -> np.ndarray | None:
    """The object mask (uint8, 255 = object) from the alpha channel and/or mask file; None when the
    whole photo is object. Raises ValueError when nothing is object."""
    keep = None
    if loaded.alpha is not None:
        keep = loaded.alpha >= alpha_threshold
        if keep.mean() < 0.001:
            raise ValueError("alpha channel is fully transparent: nothing to reconstruct")
    if mask_file is not None:
        from_file = _fit_mask(_read_mask(mask_file), loaded, rel_mask)
        if from_file.mean() < 0.001:
            raise ValueError(f"mask {rel_mask} is all background: nothing to reconstruct")
        keep = from_file if keep is None else keep & from_file
        if keep.mean() < 0.001:
            raise ValueError(f"mask {rel_mask} and the alpha channel share no object pixels")
    if keep is None or keep.all():
        return None
    return np.where(keep, 255, 0).astype(np.uint8)
