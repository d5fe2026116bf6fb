"""Which views to pair for stereo, and which to check against in fusion, from sparse covisibility.

A good stereo partner shares many sparse points, sees them at a moderate triangulation angle
(too small: depth is imprecise; too large: appearance changes and occlusions grow) and sits
beside the reference rather than in front of it (forward motion puts the epipole in the image,
where rectified stereo degenerates). A second partner on the other side covers what the first
cannot see (occlusions are one-sided).
"""

from __future__ import annotations

import numpy as np

from scandrop.pipeline.dense.dense_views import DenseView


def _shared(a: DenseView, b: DenseView) -> np.ndarray:
    """World positions of the sparse points both views observe."""
    _, ia, _ = np.intersect1d(a.point_ids, b.point_ids, assume_unique=True, return_indices=True)
    return a.points[ia]


def _median_angle_deg(points: np.ndarray, ca: np.ndarray, cb: np.ndarray) -> float:
    ra = points - ca
    rb = points - cb
    cos = np.sum(ra * rb, axis=1) / (np.linalg.norm(ra, axis=1) * np.linalg.norm(rb, axis=1) + 1e-12)
    return float(np.degrees(np.median(np.arccos(np.clip(cos, -1.0, 1.0)))))


def _spread_score(candidate: tuple[float, int, np.ndarray], chosen: tuple) -> float:
    """Favour partners whose baseline points another way in the image than those already chosen."""
    d = candidate[2][:2] / (np.linalg.norm(candidate[2][:2]) + 1e-12)
    same = max((float(d @ (c[1][:2] / (np.linalg.norm(c[1][:2]) + 1e-12))) for c in chosen), default=-1.0)
    return candidate[0] * (1.0 - 0.4 * max(0.0, same))


def stereo_partners(
    views: list[DenseView],
    count: int,
    min_angle_deg: float,
    max_angle_deg: float,
    min_shared: int = 12,
) -> list[list[int]]:
    """For each view, up to `count` partner indices, best first, preferring opposite sides."""
    best_angle = 0.5 * (min_angle_deg + max_angle_deg)
    partners: list[list[int]] = []
    for i, ref in enumerate(views):
        scored: list[tuple[float, int, np.ndarray]] = []
        for j, other in enumerate(views):
            if j == i:
                continue
            pts = _shared(ref, other)
            if len(pts) < min_shared:
                continue
            base = other.center - ref.center
            length = float(np.linalg.norm(base))
            if length < 1e-9:
                continue
            base_dir = base / length
            lateral = float(np.sqrt(max(0.0, 1.0 - float(base_dir @ ref.axis) ** 2)))
            if lateral < 0.7 or float(ref.axis @ other.axis) < np.cos(np.radians(60.0)):
                continue
            angle = _median_angle_deg(pts, ref.center, other.center)
            if not min_angle_deg <= angle <= max_angle_deg:
                continue
            angle_weight = np.exp(-(((angle - best_angle) / (max_angle_deg - min_angle_deg)) ** 2) * 2.0)
            score = float(np.sqrt(len(pts)) * angle_weight * lateral**2)
            scored.append((score, j, ref.R @ base_dir))
        scored.sort(key=lambda s: -s[0])
        chosen: list[tuple[int, np.ndarray]] = []
        while scored and len(chosen) < count:
            pick = max(scored, key=lambda s, c=tuple(chosen): _spread_score(s, c))
            scored.remove(pick)
            chosen.append((pick[1], pick[2]))
        partners.append([c[0] for c in chosen])
    return partners


def fusion_neighbours(views: list[DenseView], count: int, min_shared: int = 8) -> list[list[int]]:
    """For each view, the `count` views sharing the most sparse points (the ones worth checking)."""
    result: list[list[int]] = []
    for i, ref in enumerate(views):
        shared = []
        for j, other in enumerate(views):
            if j != i:
                n = len(_shared(ref, other))
                if n >= min_shared:
                    shared.append((n, j))
        shared.sort(reverse=True)
        result.append([j for _, j in shared[:count]])
    return result


def mvs_sources(
    views: list[DenseView],
    count: int,
    min_angle_deg: float,
    max_angle_deg: float,
    lone_max_angle_deg: float = 0.0,
    min_shared: int = 12,
) -> tuple[list[list[int]], set[int]]:
    """For each view, up to `count` source views for multi-view stereo, best first: many shared
    points at a moderate triangulation angle (COLMAP's and ACMM's criterion). Unlike rectified
    pairs, forward motion is fine here; views facing more than 75 degrees apart are not.

    A view with no source within `max_angle_deg` takes its sources up to `lone_max_angle_deg`
    (few photos far apart): plane-induced windows still match there, and fusion still needs other
    views to agree, while without sources the photo would add no depth at all. Returns the sources
    and the indices of the views that got such wide-baseline sources."""
    best_angle = 0.5 * (min_angle_deg + max_angle_deg)
    widest = max(max_angle_deg, lone_max_angle_deg)
    sources: list[list[int]] = []
    wide: set[int] = set()
    for i, ref in enumerate(views):
        scored: list[tuple[float, int, bool]] = []
        for j, other in enumerate(views):
            if other is ref or float(ref.axis @ other.axis) < np.cos(np.radians(75.0)):
                continue
            pts = _shared(ref, other)
            if len(pts) < min_shared:
                continue
            angle = _median_angle_deg(pts, ref.center, other.center)
            if not min_angle_deg * 0.5 <= angle <= widest:
                continue
            weight = np.exp(-(((angle - best_angle) / (max_angle_deg - min_angle_deg)) ** 2) * 2.0)
            scored.append((float(np.sqrt(len(pts)) * weight), j, angle > max_angle_deg))
        usual = [s for s in scored if not s[2]]
        if usual or not scored:
            scored = usual
        else:
            wide.add(i)
        scored.sort(reverse=True)
        sources.append([j for _, j, _ in scored[:count]])
    return sources, wide
