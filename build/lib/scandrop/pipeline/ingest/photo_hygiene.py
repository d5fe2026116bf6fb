"""Photo hygiene: blurred photos, byte-identical copies and near-duplicate views in a drop.

Ingest reports these instead of silently guessing: what it skips and what it only lists is its
config's choice (`IngestConfig.drop_blurred`, `near_duplicate_mad`); here are only the measures.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy.spatial import cKDTree

# Sharpness is measured at one fixed size so photos of different resolutions compare fairly.
SHARPNESS_SIDE = 512
THUMB_SIDE = 64  # grey thumbnails compared for near duplicates
NEAR_NEIGHBOURS = 4  # thumbnail neighbours checked per photo, besides its neighbours in name order


def sharpness(gray: np.ndarray, mask: np.ndarray | None) -> float:
    """Variance of the Laplacian at a fixed size (long side SHARPNESS_SIDE), inside the object when
    masked (eroded, so the silhouette's own edge does not count)."""
    scale = SHARPNESS_SIDE / max(gray.shape)
    size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    lap = cv2.Laplacian(cv2.resize(gray, size, interpolation=interp), cv2.CV_64F)
    if mask is not None:
        inside = cv2.erode(cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST), np.ones((5, 5), np.uint8))
        if np.count_nonzero(inside) >= 100:
            return float(lap[inside > 0].var())
    return float(lap.var())


def thumbnail(gray: np.ndarray) -> np.ndarray:
    """A small grey thumbnail (THUMB_SIDE square) for `near_duplicate_pairs`."""
    return cv2.resize(gray, (THUMB_SIDE, THUMB_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)


def near_duplicate_pairs(
    thumbs: np.ndarray, sizes: list[tuple[int, int]], max_mad: float
) -> list[tuple[int, int]]:
    """Index pairs (i < j) of same-size photos whose thumbnails differ by a mean absolute difference
    below `max_mad`, in O(n k log n): each photo is compared with the next one in name order and with
    its NEAR_NEIGHBOURS nearest thumbnails, found with a k-d tree on 8x8 block means. The block means'
    L1 distance is at most 64 x the thumbnails' MAD, so the tree's radius loses no true pair.
    """
    n = len(thumbs)
    if n < 2:
        return []
    candidates = {(i, i + 1) for i in range(n - 1)}
    block = THUMB_SIDE // 8
    coarse = thumbs.reshape(n, 8, block, 8, block).mean(axis=(2, 4)).reshape(n, 64)
    k = min(NEAR_NEIGHBOURS + 1, n)
    _, idx = cKDTree(coarse).query(coarse, k=k, p=1, distance_upper_bound=64 * max_mad)
    for i, row in enumerate(np.atleast_2d(idx.reshape(n, k))):
        candidates.update((min(i, int(j)), max(i, int(j))) for j in row if j < n and j != i)
    pairs = [
        (i, j)
        for i, j in sorted(candidates)
        if sizes[i] == sizes[j] and float(np.abs(thumbs[i] - thumbs[j]).mean()) < max_mad
    ]
    return pairs


def blurred(sharpness: list[float], ratio: float) -> list[tuple[int, float]]:
    """(index, share of the median) of the photos whose sharpness is below `ratio` x the set's median."""
    if len(sharpness) < 3:
        return []  # a median of two says nothing about which one is blurred
    median = float(np.median(sharpness))
    if median <= 0:
        return []
    return [(i, value / median) for i, value in enumerate(sharpness) if value < ratio * median]
