"""Bake a texture atlas for the mesh from the photos: what RealityScan, Meshroom and OpenMVS deliver.

Vertex colours hold one colour per vertex, a few millimetres apart at best; the photos hold far
more. The steps follow MVS-Texturing (Waechter et al. 2014), which OpenMVS and Meshroom also use,
in a light CPU form:

1. views per face: each registered photo renders the mesh into a z-buffer (core.raster, at most
   `visibility_size` px); a face is a candidate in a photo where it is in front (not occluded),
   faces the camera, lies inside the photo (and inside the object mask when there is one). Its
   quality there is its projected area in the photo's pixels: resolution, distance and viewing
   angle in one number;
2. photo-consistency: the face's colour in each candidate photo is compared with the median over
   its candidates, and photos far off (an occluder the mesh lacks, a reflection) are dropped;
3. labels: every face picks one photo, minimising (1 - quality / best quality) plus a Potts cost
   for each neighbour that picked another photo, by a few rounds of iterated conditional modes over
   the face adjacency graph (MVS-Texturing solves the same energy with graph cuts);
4. levelling: one gain per photo and channel, fitted in log space so that faces seen by several
   photos agree (exposure and white balance differ between photos), then seam levelling: at every
   vertex where faces of different photos meet, each side's colour is corrected to their mean,
   and the correction is spread into each patch by averaging along its edges (about 30 edges
   deep; a light form of MVS-Texturing's "global seam levelling");
5. atlas: each connected patch of faces that picked the same photo becomes one chart whose UVs are
   the faces' own projection into that photo, so the chart is the photo's rectangle around the
   patch (plus 2 px of padding for bilinear filtering and mipmaps), copied at the photo's
   resolution or scaled down evenly until all charts fit the atlas (shelf packing; the atlas is
   the smallest power of two that holds them, at most `size`). This is MVS-Texturing's and OpenMVS's
   layout: no resampling through a 3-D parameterisation, texel density that follows the photos.

Faces no photo sees keep their vertex colours, each in a 4x4-texel cell of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pycolmap
import scipy.sparse
import scipy.sparse.csgraph
import scipy.sparse.linalg
from pydantic import BaseModel

from scandrop.pipeline.core import raster
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.pointcloud import farthest_points
from scandrop.pipeline.core.stage import Progress, StopCheck, check_stop

_MAX_CANDIDATES = 6  # best photos kept per face before labelling
_MIN_COS = 0.1  # faces seen more grazing than ~84 degrees are not textured from that photo
_BORDER = 0.01  # share of the image size kept clear at the borders (lens distortion is worst there)
# A photo that sees a face right beside a nearer surface's outline is a last resort for that face:
# a pixel of error in the mesh or the pose there samples the occluder's colour (on the relief
# sphere, 45% of the held-out pixels more than 60 grey levels off where the mesh was right had the
# colour of a photo in which the true point is hidden).
_EDGE_PX = 3  # visibility z-buffer pixels (about 5 photo pixels at 1600 px) searched around the face
_EDGE_DEPTH = 0.01  # how much nearer (share of the face's depth) a surface must be to count
_EDGE_PENALTY = 0.01  # factor on the quality (projected area) of that photo for that face
_OUTLIER_RGB = 40.0  # a candidate this far (0..255, Euclidean) from the median colour is dropped
_POTTS = 0.4  # cost of a neighbour textured from another photo, against a data cost in [0, 1]
_ICM_ROUNDS = 6
_GAIN_PAIRS = 300_000  # most (face, photo, photo) samples the gain fit uses
_GAIN_PRIOR = 0.05  # weight pulling per-photo log gains towards 0 (fixes the free global scale)
_SEAM_SPREAD_ROUNDS = 30  # Jacobi rounds spreading seam corrections into each patch
_SEAM_SMOOTH_ROUNDS = 30  # Jacobi rounds averaging seam corrections along each seam (see _smooth_along_seams)
_SEAM_BLUR_PX = 3.0  # Gaussian sigma (photo pixels) of the colours compared at seam vertices
_PAD_PX = 2  # photo pixels around each patch's rectangle
_GAP = 1  # texels between packed rectangles
_FILL = 0.8  # share of the atlas that shelf packing is expected to fill
_CELL = 4  # texels per side of the cell of a face that no photo sees


@dataclass(frozen=True)
class View:
    """A registered photo: where it is and how it projects."""

    name: str
    image: Path
    mask: Path | None
    camera: pycolmap.Camera
    rotation: np.ndarray  # (3, 3) world to camera
    translation: np.ndarray  # (3,)

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates (COLMAP convention, with lens distortion) and camera depth; NaN pixels
        for points far outside the field of view, where a distortion polynomial folds back."""
        cam = np.einsum("ij,kj->ki", self.rotation, points) + self.translation
        z = cam[:, 2]
        safe = np.where(np.abs(z) < 1e-12, 1e-12, z)
        normalised = cam / safe[:, None]
        w, h = float(self.camera.width), float(self.camera.height)
        corners = np.asarray(self.camera.cam_from_img(np.array([[0.0, 0.0], [w, h], [0.0, h], [w, 0.0]])))
        limit = 1.5 * np.abs(corners).max(axis=0)
        far = (np.abs(normalised[:, :2]) > limit).any(axis=1)
        normalised[far] = 0.0
        px = np.asarray(self.camera.img_from_cam(normalised, check_cheirality=False), dtype=np.float64)
        px[far] = np.nan
        return px, z


def views_from_model(sparse_dir: Path, images_dir: Path, masks_dir: Path) -> list[View]:
    """The registered photos of a COLMAP model whose image files exist."""
    rec = pycolmap.Reconstruction(str(sparse_dir))
    views = []
    for image_id in sorted(rec.reg_image_ids()):
        image = rec.image(image_id)
        path = images_dir / image.name
        if not path.is_file():
            continue
        mask = masks_dir / f"{image.name}.png"
        pose = image.cam_from_world()
        views.append(
            View(
                name=image.name,
                image=path,
                mask=mask if mask.is_file() else None,
                camera=rec.cameras[image.camera_id],
                rotation=pose.rotation.matrix(),
                translation=np.asarray(pose.translation, dtype=np.float64),
            )
        )
    return views


def spread_views(views: list[View], most: int) -> list[View]:
    """At most `most` views, spread over the camera positions (farthest-point sampling): a video's
    240 neighbouring keyframes add little texture over 60 of them, and each costs a z-buffer."""
    if len(views) <= most:
        return views
    centres = np.array([-v.rotation.T @ v.translation for v in views])
    return [views[i] for i in farthest_points(centres, most)]


class TextureStats(BaseModel):
    atlas_size: int
    charts: int
    scale: float  # atlas texels per photo pixel (1: the photos' full resolution)
    views: int
    faces_textured: float  # share of faces whose texture comes from a photo
    views_per_face: float  # mean number of candidate photos per textured face
    seam_edges: float  # share of interior edges between faces of different photos
    seconds: dict[str, float]


@dataclass(frozen=True)
class TexturedMesh:
    vertices: np.ndarray  # (V', 3) float32, split along chart seams
    faces: np.ndarray  # (F, 3) uint32
    uv: np.ndarray  # (V', 2) float32, glTF convention: (0, 0) is the image's top-left corner
    atlas: np.ndarray  # (S, S, 3) uint8 RGB
    origin: np.ndarray  # (V',) index of each vertex in the input mesh
    stats: TextureStats


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"cannot read {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _face_adjacency(faces: np.ndarray) -> np.ndarray:
    """(E, 2) pairs of faces sharing an edge (manifold edges only)."""
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    owner = np.repeat(np.arange(len(faces)), 3)
    order = np.lexsort((edges[:, 1], edges[:, 0]))
    edges, owner = edges[order], owner[order]
    same = (edges[1:] == edges[:-1]).all(axis=1)
    pairs = np.stack([owner[:-1][same], owner[1:][same]], axis=1)
    return pairs[pairs[:, 0] != pairs[:, 1]]


def _candidates(
    vertices: np.ndarray,
    faces: np.ndarray,
    views: list[View],
    visibility_size: int,
    progress: Progress,
    should_stop: StopCheck,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per face, the best photos: (F, K) view index (-1 none), quality, mean colour (F, K, 3)."""
    n_faces = len(faces)
    tri = vertices[faces]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-30)
    centroid = tri.mean(axis=1)
    best_view = np.full((n_faces, _MAX_CANDIDATES), -1, dtype=np.int64)
    best_q = np.zeros((n_faces, _MAX_CANDIDATES))
    best_rgb = np.zeros((n_faces, _MAX_CANDIDATES, 3), dtype=np.float32)
    for i, view in enumerate(views):
        check_stop(should_stop)
        w, h = int(view.camera.width), int(view.camera.height)
        px, z = view.project(vertices)
        cpx, cz = view.project(centroid)
        s = min(1.0, visibility_size / max(w, h))
        size = (max(1, round(w * s)), max(1, round(h * s)))
        zb = raster.zbuffer(px * s, z, faces, size, should_stop)
        centre = -view.rotation.T @ view.translation
        cos = -np.einsum("ij,ij->i", normal, centroid - centre) / np.linalg.norm(centroid - centre, axis=1)
        margin = _BORDER * max(w, h)
        ok = (z[faces] > 0).all(axis=1) & (cos > _MIN_COS)
        ok &= (
            (cpx[:, 0] > margin) & (cpx[:, 0] < w - margin) & (cpx[:, 1] > margin) & (cpx[:, 1] < h - margin)
        )
        cpx = np.nan_to_num(cpx, nan=-1.0)  # outside the field of view: fails the margin test above
        cx = np.clip((cpx[:, 0] * s).astype(np.int64), 0, size[0] - 1)
        cy = np.clip((cpx[:, 1] * s).astype(np.int64), 0, size[1] - 1)
        front = zb.depth[cy * size[0] + cx]
        in_front = cz <= front * 1.005 + 1e-9
        in_front[zb.face[zb.face >= 0]] = True  # a face owning a pixel is visible, however small
        ok &= in_front
        if view.mask is not None:
            mask = cv2.imread(str(view.mask), cv2.IMREAD_GRAYSCALE)
            if mask is not None and mask.shape == (h, w):
                mx = np.clip(cpx[:, 0].astype(np.int64), 0, w - 1)
                my = np.clip(cpx[:, 1].astype(np.int64), 0, h - 1)
                ok &= mask[my, mx] > 127
        idx = np.flatnonzero(ok)
        p = px[faces[idx]]
        quality = 0.5 * np.abs(
            (p[:, 1, 0] - p[:, 0, 0]) * (p[:, 2, 1] - p[:, 0, 1])
            - (p[:, 2, 0] - p[:, 0, 0]) * (p[:, 1, 1] - p[:, 0, 1])
        )
        if _EDGE_PX > 0:
            side = 2 * _EDGE_PX + 1
            nearest = cv2.erode(
                zb.depth.reshape(size[1], size[0]).astype(np.float32), np.ones((side, side), np.uint8)
            ).ravel()
            quality[nearest[cy[idx] * size[0] + cx[idx]] < cz[idx] * (1 - _EDGE_DEPTH)] *= _EDGE_PENALTY
        small = cv2.resize(_read_rgb(view.image), size, interpolation=cv2.INTER_AREA)
        small = cv2.GaussianBlur(small, (3, 3), 0)
        colour = small[cy[idx], cx[idx]].astype(np.float32)
        # Replace the weakest candidate of each face where this photo is better.
        weakest = best_q[idx].argmin(axis=1)
        better = quality > best_q[idx, weakest]
        f, k = idx[better], weakest[better]
        best_view[f, k], best_q[f, k], best_rgb[f, k] = i, quality[better], colour[better]
        progress((i + 1) / len(views), f"visibility in {i + 1} of {len(views)} photos")
    return best_view, best_q, best_rgb


def _drop_inconsistent(view: np.ndarray, quality: np.ndarray, rgb: np.ndarray) -> None:
    """Drop candidates whose colour is far from the median of the face's candidates (in place);
    only where at least 3 photos see the face, so that a majority can be told from an outlier."""
    rows = np.flatnonzero((view >= 0).sum(axis=1) >= 3)
    valid = view[rows] >= 0
    median = np.nanmedian(np.where(valid[..., None], rgb[rows], np.nan), axis=1)
    far = np.linalg.norm(rgb[rows] - median[:, None, :], axis=2) > _OUTLIER_RGB
    drop = far & valid
    r, k = np.nonzero(drop)
    view[rows[r], k], quality[rows[r], k] = -1, 0.0


def _select_labels(view: np.ndarray, quality: np.ndarray, adjacency: np.ndarray, seed: int = 0) -> np.ndarray:
    """One photo per face (-1: none) by iterated conditional modes on data + Potts costs."""
    n_faces = len(view)
    best = np.maximum(quality.max(axis=1, keepdims=True), 1e-30)
    cost = np.where(view >= 0, 1.0 - quality / best, np.inf)
    label = view[np.arange(n_faces), cost.argmin(axis=1)]
    label[~(view >= 0).any(axis=1)] = -1
    # Neighbour lists as a padded (F, 3+) table.
    both = np.concatenate([adjacency, adjacency[:, ::-1]])
    both = both[np.argsort(both[:, 0], kind="stable")]
    degree = np.bincount(both[:, 0], minlength=n_faces)
    width = max(1, int(degree.max(initial=0)))
    slot = np.arange(len(both)) - np.repeat(np.cumsum(degree) - degree, degree)
    neighbours = np.full((n_faces, width), -1, dtype=np.int64)
    neighbours[both[:, 0], slot] = both[:, 1]
    rng = np.random.default_rng(seed)
    for _ in range(_ICM_ROUNDS):
        # Update half the faces at a time (chosen at random) so that neighbours do not flip together.
        update = rng.random(n_faces) < 0.5
        nl = np.where(neighbours >= 0, label[np.maximum(neighbours, 0)], -2)  # (F, W)
        disagree = (nl[:, None, :] != view[:, :, None]) & (nl[:, None, :] != -2)  # (F, K, W)
        total = cost + _POTTS * disagree.sum(axis=2)
        choice = view[np.arange(n_faces), total.argmin(axis=1)]
        has = (view >= 0).any(axis=1)
        label = np.where(update & has, choice, label)
    return label


def _photo_gains(view: np.ndarray, rgb: np.ndarray, n_views: int) -> np.ndarray:
    """Per-photo, per-channel gains making faces seen by several photos agree (least squares in log)."""
    rows_a, rows_b = [], []
    for a in range(view.shape[1]):
        for b in range(a + 1, view.shape[1]):
            ok = (view[:, a] >= 0) & (view[:, b] >= 0)
            rows_a.append(np.flatnonzero(ok) * view.shape[1] + a)
            rows_b.append(np.flatnonzero(ok) * view.shape[1] + b)
    ia, ib = np.concatenate(rows_a), np.concatenate(rows_b)
    if len(ia) > _GAIN_PAIRS:  # a few hundred thousand pairs pin a few hundred gains down
        pick = np.random.default_rng(0).choice(len(ia), _GAIN_PAIRS, replace=False)
        ia, ib = ia[pick], ib[pick]
    gains = np.ones((n_views, 3))
    if len(ia) == 0:
        return gains
    flat_view = view.reshape(-1)
    flat_rgb = np.log(np.maximum(rgb.reshape(-1, 3), 4.0))
    va, vb = flat_view[ia], flat_view[ib]
    n = len(ia)
    rows = np.concatenate([np.arange(n), np.arange(n), n + np.arange(n_views)])
    cols = np.concatenate([va, vb, np.arange(n_views)])
    vals = np.concatenate([np.ones(n), -np.ones(n), np.full(n_views, np.sqrt(_GAIN_PRIOR * n / n_views))])
    a_mat = scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(n + n_views, n_views))
    seen = np.zeros(n_views, dtype=bool)
    seen[np.concatenate([va, vb])] = True
    for c in range(3):
        rhs = np.concatenate([flat_rgb[ib, c] - flat_rgb[ia, c], np.zeros(n_views)])
        log_gain = scipy.sparse.linalg.lsqr(a_mat, rhs, atol=1e-8, btol=1e-8)[0]
        gains[:, c] = np.exp(log_gain - np.median(log_gain[seen]))  # the typical photo keeps its colours
    return gains


def _smooth_along_seams(offset: np.ndarray, adjacency: scipy.sparse.csr_matrix, rounds: int) -> np.ndarray:
    """Each seam corner's correction averaged with its neighbours along the seam (same photo), `rounds`
    times: what two photos disagree on at one vertex is mostly misregistered detail, what they disagree
    on along a whole seam is exposure."""
    if rounds <= 0 or len(offset) == 0:
        return offset
    with_self = adjacency + scipy.sparse.identity(len(offset), format="csr")
    degree = np.asarray(with_self.sum(axis=1)).ravel()[:, None]
    for _ in range(rounds):
        offset = (with_self @ offset) / degree
    return offset


def _seam_offsets(
    vertices: np.ndarray,
    faces: np.ndarray,
    label: np.ndarray,
    views: list[View],
    gains: np.ndarray,
    should_stop: StopCheck,
) -> np.ndarray:
    """Additive colour correction per face corner (F, 3, 3): zero inside a photo's patch, equal
    colours from both sides at seam vertices, fading into each patch along its edges."""
    corner_label = np.repeat(label, 3)
    corner_vertex = faces.reshape(-1)
    keys, key_of = np.unique(np.stack([corner_vertex, corner_label], axis=1), axis=0, return_inverse=True)
    key_of = key_of.reshape(-1)
    colour = np.zeros((len(keys), 3), dtype=np.float64)
    for i, view in enumerate(views):
        sel = np.flatnonzero(keys[:, 1] == i)
        if len(sel) == 0:
            continue
        check_stop(should_stop)
        image = cv2.GaussianBlur(_read_rgb(view.image), (0, 0), _SEAM_BLUR_PX)
        px, _ = view.project(vertices[keys[sel, 0]])
        colour[sel] = raster.sample_bilinear(image, px) * gains[i]
    textured = keys[:, 1] >= 0
    # Seam vertices: more than one photo (or a photo and plain vertex colour) meet there.
    labels_at = np.bincount(keys[:, 0], minlength=len(vertices))
    seam = (labels_at[keys[:, 0]] > 1) & textured
    sums = np.zeros((len(vertices), 3))
    np.add.at(sums, keys[seam, 0], colour[seam])
    counts = np.bincount(keys[seam, 0], weights=None, minlength=len(vertices)).astype(np.float64)
    target = sums / np.maximum(counts, 1)[:, None]
    offset = np.zeros((len(keys), 3))
    offset[seam] = target[keys[seam, 0]] - colour[seam]
    # Spread the corrections into each patch: Jacobi averaging over the patch's edges, seams fixed.
    ka = key_of.reshape(-1, 3)
    pairs = np.concatenate([ka[:, [0, 1]], ka[:, [1, 2]], ka[:, [2, 0]]])
    pairs = np.concatenate([pairs, pairs[:, ::-1]])
    adj = scipy.sparse.csr_matrix(
        (np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(keys), len(keys))
    )
    degree = np.maximum(np.asarray(adj.sum(axis=1)).ravel(), 1.0)
    offset[seam] = _smooth_along_seams(offset[seam], adj[seam][:, seam], _SEAM_SMOOTH_ROUNDS)
    free = ~seam & textured
    for _ in range(_SEAM_SPREAD_ROUNDS):
        spread = (adj @ offset) / degree[:, None]
        offset[free] = spread[free]
    offset[~textured] = 0.0
    return offset[key_of].reshape(-1, 3, 3)


def _patches(label: np.ndarray, adjacency: np.ndarray) -> np.ndarray:
    """Connected groups of neighbouring faces with the same photo: patch id per face, -1 for none."""
    n_faces = len(label)
    a, b = adjacency[:, 0], adjacency[:, 1]
    same = (label[a] == label[b]) & (label[a] >= 0)
    graph = scipy.sparse.coo_matrix((np.ones(int(same.sum())), (a[same], b[same])), shape=(n_faces, n_faces))
    _, comp = scipy.sparse.csgraph.connected_components(graph, directed=False)
    comp = np.where(label >= 0, comp, -1)
    used = np.unique(comp[comp >= 0])
    remap = np.full(n_faces, -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return np.where(comp >= 0, remap[np.maximum(comp, 0)], -1)


def _shelf_pack(sizes: np.ndarray, side: int) -> np.ndarray | None:
    """Top-left corners of (w, h) rectangles packed in rows into side x side, or None if they do not fit."""
    corners = np.zeros((len(sizes), 2), dtype=np.int64)
    x = y = row_h = 0
    for i in np.lexsort((-sizes[:, 0], -sizes[:, 1])):
        w, h = int(sizes[i, 0]), int(sizes[i, 1])
        if w > side:
            return None
        if x + w > side:
            x, y, row_h = 0, y + row_h + _GAP, 0
        if y + h > side:
            return None
        corners[i] = (x, y)
        x += w + _GAP
        row_h = max(row_h, h)
    return corners


def _layout(crops: np.ndarray, cells: int, max_side: int) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Rectangle sizes and corners for photo crops (P, 2) scaled by one factor, plus `cells` unit
    cells for unseen faces (returned after the crops), in the smallest power-of-two atlas that
    holds them: (sizes, corners, scale, side)."""
    cell_area = cells * (_CELL + _GAP) ** 2
    crop_area = float(np.prod(crops + _GAP, axis=1).sum()) if len(crops) else 0.0
    room = max(_FILL * max_side**2 - cell_area, 0.05 * max_side**2)
    scale = min(1.0, float(np.sqrt(room / crop_area))) if crop_area > 0 else 1.0
    side = 64
    while True:
        sizes = np.concatenate(
            [np.maximum(1, np.ceil(crops * scale)).astype(np.int64), np.full((cells, 2), _CELL, np.int64)]
        )
        while side < max_side and float(np.prod(sizes + _GAP, axis=1).sum()) > _FILL * side**2:
            side *= 2
        corners = _shelf_pack(sizes, side)
        if corners is not None:
            return sizes, corners, scale, side
        if side < max_side:
            side *= 2
        elif scale > 0.01:
            scale *= 0.9
        else:
            raise ScandropError(
                ErrorCode.export_failed,
                f"The mesh's {len(crops)} photo patches and {cells} unseen faces do not fit a "
                f"{max_side} px texture atlas.",
                "Raise export.texture_size, lower mesh.max_triangles, or set export.texture = 'vertex'.",
            )


def bake(
    vertices: np.ndarray,
    faces: np.ndarray,
    vertex_rgb: np.ndarray,
    views: list[View],
    size: int,
    visibility_size: int,
    progress: Progress,
    should_stop: StopCheck,
) -> TexturedMesh:
    """Texture the mesh from `views` into an atlas of at most size x size (see the module docstring)."""
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    n_faces = len(faces)
    cand_view, cand_q, cand_rgb = _candidates(
        vertices, faces, views, visibility_size, lambda f, m: progress(0.5 * f, m), should_stop
    )
    progress(0.5, f"comparing the photos' colours of {n_faces} faces")
    _drop_inconsistent(cand_view, cand_q, cand_rgb)
    seconds["views"] = time.perf_counter() - t0
    t = time.perf_counter()
    progress(0.52, "choosing a photo per face")  # each step a few seconds on 50 photos of 1080p
    adjacency = _face_adjacency(faces)
    label = _select_labels(cand_view, cand_q, adjacency)
    progress(0.55, "levelling the photos' exposure")
    gains = _photo_gains(cand_view, cand_rgb, len(views))
    progress(0.57, "levelling the seams")
    offsets = _seam_offsets(vertices, faces, label, views, gains, should_stop)
    seconds["labels_levelling"] = time.perf_counter() - t
    progress(0.6, "packing the texture atlas")
    t = time.perf_counter()

    # Each corner's pixel position in its face's photo.
    patch = _patches(label, adjacency)
    n_patches = int(patch.max()) + 1
    corner_px = np.full((n_faces, 3, 2), np.nan)
    for i, view in enumerate(views):
        sel = np.flatnonzero(label == i)
        if len(sel):
            corner_px[sel] = view.project(vertices[faces[sel].reshape(-1)])[0].reshape(-1, 3, 2)
    labelled = np.flatnonzero(patch >= 0)
    patch_view = np.full(n_patches, -1, dtype=np.int64)
    patch_view[patch[labelled]] = label[labelled]
    lo = np.full((n_patches, 2), np.inf)
    hi = np.full((n_patches, 2), -np.inf)
    np.minimum.at(lo, patch[labelled], np.nanmin(corner_px[labelled], axis=1))
    np.maximum.at(hi, patch[labelled], np.nanmax(corner_px[labelled], axis=1))
    dims = np.array([[int(v.camera.width), int(v.camera.height)] for v in views])[patch_view]
    crop_lo = np.clip(np.floor(lo) - _PAD_PX, 0, dims).astype(np.int64)
    crop_hi = np.clip(np.ceil(hi) + _PAD_PX, 0, dims).astype(np.int64)
    crop_hi = np.maximum(crop_hi, crop_lo + 1)
    unseen = np.flatnonzero(patch < 0)
    sizes, corners, scale, side = _layout(crop_hi - crop_lo, len(unseen), size)
    seconds["layout"] = time.perf_counter() - t
    t = time.perf_counter()

    atlas = np.full((side, side, 3), 128, dtype=np.uint8)
    uv_px = np.zeros((n_faces, 3, 2))
    # Photo patches: UV = the corner's photo position, mapped into the patch's rectangle.
    stretch = sizes[:n_patches] / (crop_hi - crop_lo)  # texels per photo pixel, per axis
    p = patch[labelled]
    uv_px[labelled] = (
        corners[p][:, None, :] + (corner_px[labelled] - crop_lo[p][:, None, :]) * stretch[p][:, None, :]
    )
    for i, view in enumerate(views):
        check_stop(should_stop)
        mine = np.flatnonzero(patch_view == i)
        if len(mine) == 0:
            continue
        photo = _read_rgb(view.image)
        for k in mine:
            (x0, y0), (x1, y1), (w, h), (cx, cy) = crop_lo[k], crop_hi[k], sizes[k], corners[k]
            crop = photo[y0:y1, x0:x1]
            if (w, h) != (x1 - x0, y1 - y0):
                crop = cv2.resize(crop, (int(w), int(h)), interpolation=cv2.INTER_AREA)
            atlas[cy : cy + h, cx : cx + w] = np.clip(crop * gains[i], 0, 255).astype(np.uint8)
        progress(0.6 + 0.3 * (i + 1) / len(views), f"copied patches of {i + 1} of {len(views)} photos")
    # Seam levelling inside the faces of each patch (the padding keeps the photo's own colours).
    for frag in raster.fragments(
        uv_px.reshape(-1, 2),
        np.arange(3 * n_faces).reshape(-1, 3),
        (side, side),
        should_stop,
        face_ids=labelled,
    ):
        shift = (frag.bary[:, :, None] * offsets[frag.face]).sum(axis=1)
        atlas[frag.y, frag.x] = np.clip(atlas[frag.y, frag.x] + shift, 0, 255).astype(np.uint8)
    # Unseen faces: their vertex colours, interpolated over a cell of their own.
    if len(unseen):
        cell_corner = corners[n_patches:]
        uv_px[unseen] = cell_corner[:, None, :] + np.array(
            [[0.5, 0.5], [_CELL - 0.5, 0.5], [0.5, _CELL - 0.5]]
        )
        grid = np.stack(np.meshgrid(np.arange(_CELL), np.arange(_CELL), indexing="xy"), -1).reshape(-1, 2)
        rel = grid / (_CELL - 1)  # texel centres in the frame of the cell's triangle corners
        w = np.clip(np.stack([1 - rel[:, 0] - rel[:, 1], rel[:, 0], rel[:, 1]], axis=1), 0, None)
        w /= w.sum(axis=1, keepdims=True)
        colour = np.einsum("kc,fcj->fkj", w, vertex_rgb[faces[unseen]].astype(np.float64))
        xy = cell_corner[:, None, :] + grid[None]
        atlas[xy[..., 1], xy[..., 0]] = np.clip(np.rint(colour), 0, 255).astype(np.uint8)
    seconds["bake"] = time.perf_counter() - t

    # One output vertex per (vertex, UV) pair.
    corner_vertex = faces.reshape(-1)
    uv = (uv_px / side).reshape(-1, 2).astype(np.float32)
    keys = np.concatenate([corner_vertex[:, None], uv.view(np.int32).astype(np.int64)], axis=1)
    unique, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    has = (cand_view >= 0).sum(axis=1)
    seam_share = float((label[adjacency[:, 0]] != label[adjacency[:, 1]]).mean()) if len(adjacency) else 0.0
    stats = TextureStats(
        atlas_size=side,
        charts=n_patches + len(unseen),
        scale=round(scale, 4),
        views=len(views),
        faces_textured=float((label >= 0).mean()) if n_faces else 0.0,
        views_per_face=float(has[has > 0].mean()) if (has > 0).any() else 0.0,
        seam_edges=seam_share,
        seconds={k: round(v, 3) for k, v in seconds.items()},
    )
    return TexturedMesh(
        vertices=vertices[unique[:, 0]].astype(np.float32),
        faces=inverse.reshape(-1, 3).astype(np.uint32),
        uv=uv[first],
        atlas=atlas,
        origin=unique[:, 0],
        stats=stats,
    )
