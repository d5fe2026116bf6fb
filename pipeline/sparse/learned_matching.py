"""Learned matches (DISK + LightGlue) added to the SIFT database, where SIFT cannot connect the photos.

hloc's way: the learned keypoints and matches go into the COLMAP database, then COLMAP's own
geometric verification and incremental mapping run on them. Here they are appended to each photo's
SIFT keypoints (indices after SIFT's), so one mapping uses both: SIFT where it connected photos, the
learned matches where it did not. LightGlue costs about 100x a SIFT pair on a CPU, so only pairs
that a cheap score ranks high are matched: for each photo its `neighbours` best partners by
ratio-tested mutual nearest neighbours of DISK descriptors (a dense dot product, milliseconds a pair),
and for each group of unplaced photos its best bridges to the others, at most `max_pairs`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import pycolmap
from pydantic import BaseModel, Field
from scipy import sparse

from scandrop.pipeline.core.stage import Progress, StopCheck, check_stop
from scandrop.pipeline.sparse import learned_features, parallel_matching
from scandrop.pipeline.sparse.learned_features import Features

T = TypeVar("T")

MIN_MATCHES = 15  # fewer LightGlue matches than this: the pair is not written


class LearnedStats(BaseModel):
    """What the learned matcher did, for report.json."""

    photos: list[str] = Field(description="Photos DISK ran on.")
    pairs: int = Field(description="Pairs LightGlue matched.")
    pairs_written: int = Field(description="Pairs with enough matches to go to geometric verification.")
    keypoints_from: dict[str, int] = Field(
        description="Per photo, the index where its learned keypoints start (before it: SIFT's)."
    )
    seconds: dict[str, float]


def _named_pairs(
    database: Path, read: Callable[[pycolmap.Database], tuple[Sequence[int], Sequence[T]]]
) -> list[tuple[str, str, T]]:
    """A per-pair table of the database (`read` returns pair ids and one value each), by photo names."""
    db = pycolmap.Database.open(str(database))
    try:
        by_id = {image.image_id: image.name for image in db.read_all_images()}
        pair_ids, values = read(db)
    finally:
        db.close()
    pairs = [pycolmap.pair_id_to_image_pair(pair_id) for pair_id in pair_ids]
    return [(by_id[i], by_id[j], value) for (i, j), value in zip(pairs, values, strict=True)]


def candidate_pairs(database: Path, names: list[str], focus: list[str], width: int) -> list[tuple[str, str]]:
    """Pairs worth scoring: every pair among each focus photo and its `width` partners with the most
    SIFT matches (verified or not: an unplaced photo still has some), so the partners' learned
    points can be triangulated among themselves too. All pairs when every photo is in focus."""
    if set(focus) >= set(names):
        return [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    sift: dict[str, dict[str, int]] = {name: {} for name in names}
    for a, b, count in _named_pairs(database, lambda db: db.read_num_matches()):
        sift[a][b] = sift[b][a] = count
    pairs: set[tuple[str, str]] = set()
    for f in focus:
        others = sorted((n for n in names if n != f), key=lambda n: (-sift[f].get(n, 0), n))[:width]
        group = sorted([f, *others])
        pairs.update((a, b) for i, a in enumerate(group) for b in group[i + 1 :])
    return sorted(pairs)


# The cheap score counts mutual nearest neighbours that also pass Lowe's ratio test (nearest over
# second-nearest distance, both ways). Without it, 1024 DISK descriptors of any two photos of one
# scene find 140-210 mutual neighbours whether the photos overlap or not (the apple photos: the
# bridging pair 25-43, 89-95 verified inliers once matched, ranked below unrelated pairs and was not
# matched); with it, unrelated pairs score 0-19 and that pair 25, its side's best.
SCORE_RATIO = 0.95


def overlap_scores(features: dict[str, Features], pairs: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """Ratio-tested mutual nearest neighbours of each pair's descriptors: a cheap overlap score."""
    scores: dict[tuple[str, str], int] = {}
    for a, b in pairs:
        sim = features[a].descriptors @ features[b].descriptors.T
        if sim.size == 0:
            scores[(a, b)] = 0
            continue
        ab = sim.argmax(axis=1)
        ba = sim.argmax(axis=0)
        rows = np.arange(len(ab))
        distinct = _passes_ratio(sim) & _passes_ratio(sim.T)[ab]
        scores[(a, b)] = int(np.count_nonzero((ba[ab] == rows) & distinct))
    return scores


def _passes_ratio(sim: np.ndarray) -> np.ndarray:
    """Per row: nearest / second-nearest descriptor distance under SCORE_RATIO (unit descriptors, so
    distance = sqrt(2 - 2 cos)); a row with one candidate passes."""
    if sim.shape[1] < 2:
        return np.ones(sim.shape[0], bool)
    top2 = -np.partition(-sim, 1, axis=1)[:, :2]
    dist = np.sqrt(np.maximum(2.0 - 2.0 * top2, 0.0))
    return dist[:, 0] < SCORE_RATIO * dist[:, 1]


def focus_groups(database: Path, focus: list[str], least: int) -> list[list[str]]:
    """The focus photos split into groups that verified pairs of at least `least` inliers tie together.

    A group tends to be placed all at once or not at all: its photos follow each other into the
    model, so what it lacks is a bridge to the rest (select_pairs)."""
    index = {name: i for i, name in enumerate(focus)}
    tied = [
        (index[a], index[b])
        for a, b, geometry in _named_pairs(database, lambda db: db.read_two_view_geometries())
        if a in index and b in index and len(geometry.inlier_matches) >= least
    ]
    edges = np.array(tied, np.int64).reshape(-1, 2)
    graph = sparse.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(len(focus),) * 2)
    _, labels = sparse.csgraph.connected_components(graph, directed=False)
    groups: dict[int, list[str]] = {}
    for name, label in zip(focus, labels, strict=True):
        groups.setdefault(int(label), []).append(name)
    return sorted(groups.values())


def select_pairs(
    scores: dict[tuple[str, str], int],
    names: list[str],
    neighbours: int,
    max_pairs: int,
    groups: Sequence[Sequence[str]] = (),
) -> list[tuple[str, str]]:
    """Each group's `neighbours` best-scored pairs to photos outside it (first: a group of photos tied
    to each other picks its partners among its own members, and the bridge is what was missing),
    then each photo's `neighbours` best-scored partners (union), best first; at most `max_pairs`."""
    ranked = sorted(scores, key=lambda pair: (-scores[pair], pair))
    bridges: list[tuple[str, str]] = []
    for group in groups:
        members = set(group)
        outward = [pair for pair in ranked if (pair[0] in members) != (pair[1] in members)]
        bridges.extend(pair for pair in outward[:neighbours] if pair not in bridges)
    chosen: set[tuple[str, str]] = set()
    for name in names:
        chosen.update([pair for pair in ranked if name in pair][:neighbours])
    rest = [pair for pair in ranked if pair in chosen and pair not in bridges]
    return (sorted(bridges, key=lambda pair: (-scores[pair], pair)) + rest)[:max_pairs]


def add_matches(
    database: Path,
    images_dir: Path,
    candidates: list[tuple[str, str]],
    groups: list[list[str]],
    nets: learned_features.Networks,
    *,
    max_size: int,
    num_keypoints: int,
    neighbours: int,
    max_pairs: int,
    progress: Progress,
    should_stop: StopCheck,
) -> tuple[LearnedStats, list[tuple[str, str]]]:
    """DISK on the photos of `candidates`, LightGlue on the best-scored of those pairs (`groups`: see
    select_pairs), all written into `database`.

    Returns the stats and the pairs written (the caller runs geometric verification on them).
    Progress: 0..0.4 per photo, 0.4..1 per pair.
    """
    t0 = time.perf_counter()
    photos = sorted({name for pair in candidates for name in pair})
    features: dict[str, Features] = {}
    for i, name in enumerate(photos):
        check_stop(should_stop)
        progress(0.4 * i / len(photos), f"learned features: photo {i + 1} of {len(photos)}")
        features[name] = learned_features.extract(nets, images_dir / name, max_size, num_keypoints)
    t_extract = time.perf_counter() - t0

    t0 = time.perf_counter()
    pairs = select_pairs(overlap_scores(features, candidates), photos, neighbours, max_pairs, groups)
    matches: dict[tuple[str, str], np.ndarray] = {}
    for k, (a, b) in enumerate(pairs):
        check_stop(should_stop)
        progress(0.4 + 0.6 * k / max(1, len(pairs)), f"learned matching: pair {k + 1} of {len(pairs)}")
        found = learned_features.match(nets, features[a], features[b])
        if len(found) >= MIN_MATCHES:
            matches[(a, b)] = found
    t_match = time.perf_counter() - t0

    offsets = _write(database, features, matches)
    stats = LearnedStats(
        photos=photos,
        pairs=len(pairs),
        pairs_written=len(matches),
        keypoints_from=offsets,
        seconds={"extract": round(t_extract, 3), "match": round(t_match, 3)},
    )
    return stats, sorted(matches)


def _write(
    database: Path, features: dict[str, Features], matches: dict[tuple[str, str], np.ndarray]
) -> dict[str, int]:
    """Append learned keypoints after SIFT's; merge matches into each pair's SIFT matches; clear the
    pair's old verification so it is verified again with both."""
    db = pycolmap.Database.open(str(database))
    offsets: dict[str, int] = {}
    try:
        ids = {image.name: image.image_id for image in db.read_all_images()}
        for name, f in features.items():
            sift = db.read_keypoints(ids[name])
            offsets[name] = len(sift)
            learned = np.zeros((len(f.keypoints), sift.shape[1] if sift.size else 6), np.float32)
            learned[:, :2] = f.keypoints
            if learned.shape[1] == 6:  # COLMAP's affine shape: identity (scale 1, no rotation)
                learned[:, 2] = learned[:, 5] = 1.0
            elif learned.shape[1] == 4:  # x, y, scale, orientation
                learned[:, 2] = 1.0
            db.update_keypoints(ids[name], np.ascontiguousarray(np.concatenate([sift, learned])))
        for (a, b), found in matches.items():
            ia, ib = ids[a], ids[b]
            shifted = found.astype(np.uint32) + np.array([offsets[a], offsets[b]], np.uint32)
            old = db.read_matches(ia, ib) if db.exists_matches(ia, ib) else np.zeros((0, 2), np.uint32)
            if db.exists_matches(ia, ib):
                db.delete_matches(ia, ib)
            if db.exists_two_view_geometry(ia, ib):
                db.delete_two_view_geometry(ia, ib)
            db.write_matches(ia, ib, np.ascontiguousarray(np.concatenate([old, shifted])))
    finally:
        db.close()
    return offsets


def verify(
    database: Path, pairs: list[tuple[str, str]], pairs_file: Path, seed: int, thorough: bool = False
) -> None:
    """COLMAP's geometric verification of the merged matches of `pairs` (the SIFT path's own step)."""
    pairs_file.write_text("".join(f"{a} {b}\n" for a, b in pairs))
    options = parallel_matching.verification_options(seed, thorough)
    pycolmap.verify_matches(database, pairs_file, options=options)


def tie_points_by_matcher(rec: pycolmap.Reconstruction, offsets: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per registered photo: its 3D-point observations from SIFT keypoints and from learned ones."""
    out: dict[str, dict[str, int]] = {}
    for image_id in rec.reg_image_ids():
        image = rec.images[image_id]
        start = offsets.get(image.name)
        sift = learned = 0
        for idx, p in enumerate(image.points2D):
            if p.has_point3D():
                if start is not None and idx >= start:
                    learned += 1
                else:
                    sift += 1
        out[image.name] = {"sift": sift, "learned": learned}
    return out
