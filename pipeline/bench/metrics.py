"""Accuracy scores as the issue defines them: relative rotation error, aligned camera-centre error,
and Tanks-and-Temples precision/recall/F-score at a distance threshold tau."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree


def rotation_angles_deg(r: np.ndarray) -> np.ndarray:
    """Angles of (..., 3, 3) rotations, robust near 0 (atan2 of sine and cosine, not arccos)."""
    cos = (np.trace(r, axis1=-2, axis2=-1) - 1.0) / 2.0
    v = np.stack([r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]], -1)
    sin = np.linalg.norm(v, axis=-1) / 2.0
    return np.degrees(np.arctan2(sin, cos))


def relative_rotation_errors(est: dict[str, np.ndarray], gt: dict[str, np.ndarray]) -> np.ndarray:
    """For every pair i<j of images in both dicts (world-to-camera R): the angle between the
    estimated and the true relative rotation, degrees. Independent of the world frame."""
    names = sorted(set(est) & set(gt))
    if len(names) < 2:
        return np.zeros(0)
    e = np.stack([est[n] for n in names])
    g = np.stack([gt[n] for n in names])
    i, j = np.triu_indices(len(names), k=1)
    rel_e = e[i] @ np.swapaxes(e[j], 1, 2)
    rel_g = g[i] @ np.swapaxes(g[j], 1, 2)
    return rotation_angles_deg(rel_e @ np.swapaxes(rel_g, 1, 2))


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity (s, R, t) with dst ≈ s R src + t (Umeyama 1991)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3 or len(src) < 3:
        raise ValueError("umeyama needs two (N, 3) arrays of the same shape with N >= 3")
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    u, d, vt = np.linalg.svd(cov)
    sign = np.ones(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2] = -1.0
    r = (u * sign) @ vt
    var_s = (xs**2).sum() / len(src)
    s = float((d * sign).sum() / var_s) if var_s > 0 else 1.0
    t = mu_d - s * r @ mu_s
    return s, r, t


@dataclass(frozen=True)
class Sim3:
    """x -> s R x + t; maps an estimate's points into the ground-truth frame."""

    s: float
    R: np.ndarray
    t: np.ndarray

    def __call__(self, points: np.ndarray) -> np.ndarray:
        # einsum, not @: BLAS is slow for (N, 3) x (3, 3)
        return self.s * np.einsum("ij,kj->ik", np.asarray(points, dtype=np.float64), self.R) + self.t


def centre_errors(est_centres: np.ndarray, gt_centres: np.ndarray) -> tuple[np.ndarray, Sim3]:
    """Distances between matching camera centres (same order) after the best similarity
    alignment, in ground-truth units, and that alignment."""
    s, r, t = umeyama(est_centres, gt_centres)
    sim = Sim3(s, r, t)
    return np.linalg.norm(sim(est_centres) - np.asarray(gt_centres), axis=1), sim


def precision_recall_fscore(
    points: np.ndarray, gt_points: np.ndarray, tau: float
) -> tuple[float, float, float]:
    """Precision: share of points within tau of the ground truth; recall: share of ground-truth
    samples within tau of the points; F: their harmonic mean."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    gt_points = np.asarray(gt_points, dtype=np.float64).reshape(-1, 3)
    if len(gt_points) == 0:
        raise ValueError("no ground-truth points to score against")
    if len(points) == 0:
        return 0.0, 0.0, 0.0
    d_est, _ = cKDTree(gt_points).query(points, k=1, distance_upper_bound=tau, workers=-1)
    d_gt, _ = cKDTree(points).query(gt_points, k=1, distance_upper_bound=tau, workers=-1)
    precision = float(np.mean(d_est <= tau))
    recall = float(np.mean(d_gt <= tau))
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f


def sample_mesh(vertices: np.ndarray, faces: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n points uniformly distributed by area over a triangle mesh."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if len(f) == 0:
        raise ValueError("mesh has no faces")
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    areas = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    if areas.sum() <= 0:
        raise ValueError("mesh has zero area")
    rng = np.random.default_rng(seed)
    tri = rng.choice(len(f), size=n, p=areas / areas.sum())
    r1 = np.sqrt(rng.uniform(0.0, 1.0, n))[:, None]
    r2 = rng.uniform(0.0, 1.0, n)[:, None]
    return (1 - r1) * a[tri] + r1 * (1 - r2) * b[tri] + r1 * r2 * c[tri]


def fscores_at(points: np.ndarray, gt_points: np.ndarray, taus: dict[str, float]) -> dict[str, float]:
    """F-score (precision, recall) at each named tau, e.g. {"1%": 0.01 * size, ...}."""
    out: dict[str, float] = {}
    for name, tau in taus.items():
        pr, re, f = precision_recall_fscore(points, gt_points, tau)
        out[f"f@{name}"] = f
        out[f"precision@{name}"] = pr
        out[f"recall@{name}"] = re
    return out


@dataclass(frozen=True)
class PhotoCamera:
    """One registered photo as transforms.json describes it (OPENCV model, OpenCV axes here)."""

    name: str
    R: np.ndarray  # world-to-camera rotation
    t: np.ndarray
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    dist: tuple[float, float, float, float]  # k1, k2, p1, p2

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates (COLMAP/nerfstudio: pixel centres at +0.5) and in-front mask."""
        cam = np.einsum("ij,kj->ki", self.R, np.asarray(points, dtype=np.float64)) + self.t
        front = cam[:, 2] > 1e-9
        z = np.where(front, cam[:, 2], 1.0)
        x, y = cam[:, 0] / z, cam[:, 1] / z
        k1, k2, p1, p2 = self.dist
        r2 = x * x + y * y
        radial = 1 + k1 * r2 + k2 * r2 * r2
        xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
        yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
        return np.stack([self.fx * xd + self.cx, self.fy * yd + self.cy], axis=1), front


def transforms_cameras(data: dict) -> list[PhotoCamera]:
    """The cameras of a transforms.json (dict): camera-to-world in OpenGL axes -> world-to-camera
    in OpenCV axes; intrinsics per frame or shared at the top level."""
    cams = []
    gl_to_cv = np.diag([1.0, -1.0, -1.0])
    for frame in data["frames"]:
        f = {**data, **frame}
        c2w = np.asarray(frame["transform_matrix"], dtype=np.float64)
        rot_c2w = c2w[:3, :3] @ gl_to_cv
        R = rot_c2w.T
        cams.append(
            PhotoCamera(
                name=str(frame["file_path"]),
                R=R,
                t=-R @ c2w[:3, 3],
                fx=float(f["fl_x"]),
                fy=float(f["fl_y"]),
                cx=float(f["cx"]),
                cy=float(f["cy"]),
                width=int(f["w"]),
                height=int(f["h"]),
                dist=tuple(float(f.get(k, 0.0)) for k in ("k1", "k2", "p1", "p2")),  # type: ignore[arg-type]
            )
        )
    return cams


def explained_share(points: np.ndarray, camera: PhotoCamera, cell: int = 8) -> float:
    """Share of the photo's cell x cell pixel cells that at least one point projects into
    (no occlusion test: a point behind another still counts, as the issue defines it)."""
    uv, front = camera.project(points)
    nx, ny = -(-camera.width // cell), -(-camera.height // cell)
    ok = front & (uv[:, 0] >= 0) & (uv[:, 1] >= 0) & (uv[:, 0] < camera.width) & (uv[:, 1] < camera.height)
    cells = (uv[ok, 1] // cell).astype(np.int64) * nx + (uv[ok, 0] // cell).astype(np.int64)
    return float(len(np.unique(cells)) / (nx * ny))
