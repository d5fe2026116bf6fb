"""Synthetic scenes with exact ground truth: analytic shapes, a solid texture, known cameras.

Rendering is numpy ray casting against a sphere, a box and a cylinder standing on a square base
plate, so the cameras and the true surface are known exactly and accuracy can be measured rather
than eyeballed. World frame: +y up (as scandrop's), the plate's top face is y = 0.

Pixel convention is COLMAP's: the top-left pixel covers [0, 1) x [0, 1), its centre is (0.5, 0.5),
and K's principal point is (W/2, H/2). Code that puts pixel centres on integers (OpenCV) must
subtract 0.5 from K's principal point.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

_BACKGROUND = 0.5  # flat mid-grey where rays miss
_AMBIENT = 0.3
_LIGHT = np.array([0.35, 1.0, 0.45]) / np.linalg.norm([0.35, 1.0, 0.45])  # towards the light, world
_TARGET = np.array([0.0, 0.35, 0.0])  # what the cameras look at
_DISTANCE = 2.7  # camera distance from the target
_ELEVATIONS_DEG = (20.0, 40.0)
_HFOV_DEG = 55.0
_TEXTURE_SPACING = 0.01  # finest texture lattice step, world units (~2 px at 640 px wide)


def _mul(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(N, 3) @ (3, 3) without BLAS, which is ten times slower for such thin matrices."""
    return np.einsum("ij,jk->ik", points, m)


class Primitive(Protocol):
    """An analytic solid: ray intersection, signed distance, normals and area-uniform samples."""

    tint: tuple[float, float, float]

    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray: ...

    def sdf(self, points: np.ndarray) -> np.ndarray: ...

    def normal_at(self, points: np.ndarray) -> np.ndarray: ...

    def area(self) -> float: ...

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray: ...

    def bounds(self) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class Sphere:
    centre: tuple[float, float, float]
    radius: float
    tint: tuple[float, float, float]

    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        oc = origin - np.asarray(self.centre)
        b = dirs @ oc
        disc = b * b - (oc @ oc - self.radius**2)
        with np.errstate(invalid="ignore"):
            t = -b - np.sqrt(disc)
        return np.where((disc >= 0) & (t > 0), t, np.inf)

    def sdf(self, points: np.ndarray) -> np.ndarray:
        return np.linalg.norm(points - np.asarray(self.centre), axis=1) - self.radius

    def normal_at(self, points: np.ndarray) -> np.ndarray:
        d = points - np.asarray(self.centre)
        return d / np.linalg.norm(d, axis=1, keepdims=True)

    def area(self) -> float:
        return 4.0 * math.pi * self.radius**2

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        d = rng.standard_normal((n, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        return np.asarray(self.centre) + self.radius * d

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        c = np.asarray(self.centre)
        return c - self.radius, c + self.radius


@dataclass(frozen=True)
class Box:
    """A box turned by `yaw_deg` about the world y axis."""

    centre: tuple[float, float, float]
    half: tuple[float, float, float]
    yaw_deg: float
    tint: tuple[float, float, float]

    def _axes(self) -> np.ndarray:
        a = math.radians(self.yaw_deg)
        c, s = math.cos(a), math.sin(a)
        return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])  # columns: local axes in world

    def _local(self, points: np.ndarray) -> np.ndarray:
        return _mul(points - np.asarray(self.centre), self._axes())

    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        axes = self._axes()
        o = (origin - np.asarray(self.centre)) @ axes
        tmin = np.full(len(dirs), -np.inf)
        tmax = np.full(len(dirs), np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            for a in range(3):  # slab test, one axis at a time on 1D arrays (fast in numpy)
                inv = 1.0 / (dirs @ axes[:, a])
                t1 = (-self.half[a] - o[a]) * inv
                t2 = (self.half[a] - o[a]) * inv
                np.maximum(tmin, np.minimum(t1, t2), out=tmin)
                np.minimum(tmax, np.maximum(t1, t2), out=tmax)
        return np.where((tmax >= tmin) & (tmin > 0), tmin, np.inf)

    def sdf(self, points: np.ndarray) -> np.ndarray:
        q = np.abs(self._local(points)) - np.asarray(self.half)
        outside = np.linalg.norm(np.maximum(q, 0.0), axis=1)
        return outside + np.minimum(q.max(axis=1), 0.0)

    def normal_at(self, points: np.ndarray) -> np.ndarray:
        p = self._local(points)
        q = np.abs(p) - np.asarray(self.half)
        axis = q.argmax(axis=1)
        n = np.zeros_like(p)
        rows = np.arange(len(p))
        n[rows, axis] = np.sign(p[rows, axis])
        return _mul(n, self._axes().T)

    def _face_areas(self) -> np.ndarray:
        hx, hy, hz = self.half
        a = np.array([4 * hy * hz, 4 * hx * hz, 4 * hx * hy])
        return np.concatenate([a, a])  # faces -x,-y,-z,+x,+y,+z

    def area(self) -> float:
        return float(self._face_areas().sum())

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        areas = self._face_areas()
        face = rng.choice(6, size=n, p=areas / areas.sum())
        h = np.asarray(self.half)
        p = rng.uniform(-1.0, 1.0, (n, 3)) * h
        axis = face % 3
        rows = np.arange(n)
        p[rows, axis] = np.where(face < 3, -1.0, 1.0) * h[axis]
        return _mul(p, self._axes().T) + np.asarray(self.centre)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
        world = (corners * np.asarray(self.half)) @ self._axes().T + np.asarray(self.centre)
        return world.min(axis=0), world.max(axis=0)


@dataclass(frozen=True)
class Cylinder:
    """An upright capped cylinder whose bottom cap is centred at `base`."""

    base: tuple[float, float, float]
    radius: float
    height: float
    tint: tuple[float, float, float]

    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        bx, y0, bz = self.base
        y1 = y0 + self.height
        ox, oy, oz = origin[0] - bx, origin[1], origin[2] - bz
        dx, dy, dz = dirs[:, 0], dirs[:, 1], dirs[:, 2]
        a = dx * dx + dz * dz
        b = ox * dx + oz * dz
        c = ox * ox + oz * oz - self.radius**2
        disc = b * b - a * c
        with np.errstate(divide="ignore", invalid="ignore"):
            ts = (-b - np.sqrt(disc)) / a
            ys = oy + ts * dy
            side = np.where((disc >= 0) & (ts > 0) & (ys >= y0) & (ys <= y1), ts, np.inf)
            best = side
            for yc in (y0, y1):
                tc = (yc - oy) / dy
                xc, zc = ox + tc * dx, oz + tc * dz
                ok = (tc > 0) & (xc * xc + zc * zc <= self.radius**2)
                best = np.minimum(best, np.where(ok, tc, np.inf))
        return best

    def _split(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        bx, y0, bz = self.base
        rho = np.hypot(points[:, 0] - bx, points[:, 2] - bz) - self.radius
        dy = np.abs(points[:, 1] - (y0 + 0.5 * self.height)) - 0.5 * self.height
        return rho, dy

    def sdf(self, points: np.ndarray) -> np.ndarray:
        rho, dy = self._split(points)
        inside = np.minimum(np.maximum(rho, dy), 0.0)
        return inside + np.hypot(np.maximum(rho, 0.0), np.maximum(dy, 0.0))

    def normal_at(self, points: np.ndarray) -> np.ndarray:
        bx, y0, bz = self.base
        rho, dy = self._split(points)
        radial = np.stack([points[:, 0] - bx, np.zeros(len(points)), points[:, 2] - bz], axis=1)
        radial /= np.maximum(np.linalg.norm(radial, axis=1, keepdims=True), 1e-12)
        cap = np.zeros_like(points)
        cap[:, 1] = np.sign(points[:, 1] - (y0 + 0.5 * self.height))
        return np.where((dy > rho)[:, None], cap, radial)

    def area(self) -> float:
        return 2 * math.pi * self.radius * self.height + 2 * math.pi * self.radius**2

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        bx, y0, bz = self.base
        side_area = 2 * math.pi * self.radius * self.height
        on_side = rng.uniform(0, self.area(), n) < side_area
        theta = rng.uniform(0, 2 * math.pi, n)
        r = np.where(on_side, self.radius, self.radius * np.sqrt(rng.uniform(0, 1, n)))
        cap_y = np.where(rng.uniform(0, 1, n) < 0.5, y0, y0 + self.height)
        y = np.where(on_side, rng.uniform(y0, y0 + self.height, n), cap_y)
        return np.stack([bx + r * np.cos(theta), y, bz + r * np.sin(theta)], axis=1)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        bx, y0, bz = self.base
        r = self.radius
        return np.array([bx - r, y0, bz - r]), np.array([bx + r, y0 + self.height, bz + r])


def scene_primitives() -> tuple[Primitive, ...]:
    """The fixed test object: plate (index 0), sphere, turned box and cylinder resting on it."""
    return (
        Box(centre=(0.0, -0.05, 0.0), half=(1.0, 0.05, 1.0), yaw_deg=0.0, tint=(0.62, 0.57, 0.5)),
        Sphere(centre=(-0.38, 0.4, 0.12), radius=0.4, tint=(0.78, 0.42, 0.36)),
        Box(centre=(0.38, 0.3, -0.28), half=(0.25, 0.3, 0.2), yaw_deg=30.0, tint=(0.36, 0.46, 0.76)),
        Cylinder(base=(0.35, 0.0, 0.45), radius=0.18, height=0.85, tint=(0.42, 0.7, 0.45)),
    )


def cast_rays(
    primitives: tuple[Primitive, ...], origin: np.ndarray, dirs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit of unit rays from one origin: distance (inf on a miss) and primitive index (-1)."""
    best = np.full(len(dirs), np.inf)
    which = np.full(len(dirs), -1, dtype=np.int64)
    for k, prim in enumerate(primitives):
        lo, hi = prim.bounds()
        oc = origin - (lo + hi) / 2
        b = dirs @ oc
        near = np.flatnonzero(b * b - (oc @ oc - float(np.sum((hi - lo) ** 2)) / 4) >= 0)
        t = prim.intersect(origin, dirs[near])  # only rays that reach the bounding sphere
        closer = t < best[near]
        best[near[closer]] = t[closer]
        which[near[closer]] = k
    return best, which


@dataclass(frozen=True)
class SolidTexture:
    """Multi-octave value noise on a 3D lattice: colour is a function of the surface point alone,
    so every view sees the same texture on the same point (what SfM and stereo need)."""

    origin: np.ndarray  # (3,) world position of lattice index (0, 0, 0)
    spacing: float
    grid: np.ndarray  # (nx, ny, nz, 3) float32, zero mean, unit std per channel

    def __call__(self, points: np.ndarray) -> np.ndarray:
        g = (points - self.origin) / self.spacing
        shape = np.array(self.grid.shape[:3])
        i0 = np.clip(np.floor(g).astype(np.int64), 0, shape - 2)
        f = np.clip(g - i0, 0.0, 1.0)
        flat = self.grid.reshape(-1, 3)
        sx, sy = int(shape[1] * shape[2]), int(shape[2])
        base = i0[:, 0] * sx + i0[:, 1] * sy + i0[:, 2]
        out = np.zeros((len(points), 3), dtype=np.float32)
        for dx, dy, dz, w in trilinear_corners(f.astype(np.float32)):
            out += w[:, None] * flat[base + dx * sx + dy * sy + dz]
        return out.astype(np.float64)


def trilinear_corners(f: np.ndarray) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """The 8 lattice corners around points at fractions f (n, 3) of a cell, with their weights."""
    for dx in (0, 1):
        wx = f[:, 0] if dx else 1.0 - f[:, 0]
        for dy in (0, 1):
            wxy = wx * (f[:, 1] if dy else 1.0 - f[:, 1])
            for dz in (0, 1):
                yield dx, dy, dz, wxy * (f[:, 2] if dz else 1.0 - f[:, 2])


def _upsample_matrix(n_fine: int, ratio: int, n_coarse: int) -> np.ndarray:
    """Linear interpolation weights from a coarse 1D lattice onto a lattice `ratio` times finer."""
    x = np.arange(n_fine) / ratio
    i0 = np.minimum(np.floor(x).astype(np.int64), n_coarse - 2)
    f = x - i0
    m = np.zeros((n_fine, n_coarse), dtype=np.float32)
    m[np.arange(n_fine), i0] = 1.0 - f
    m[np.arange(n_fine), i0 + 1] = f
    return m


def make_texture(
    primitives: tuple[Primitive, ...], seed: int, spacing: float = _TEXTURE_SPACING
) -> SolidTexture:
    """Sum of value-noise octaves (1, 3, 9, 27 lattice steps): fine blobs of a few pixels for
    features plus coarse colour variation so that matching is not ambiguous."""
    rng = np.random.default_rng(seed)
    lo = np.min([p.bounds()[0] for p in primitives], axis=0) - 2 * spacing
    hi = np.max([p.bounds()[1] for p in primitives], axis=0) + 2 * spacing
    n = np.ceil((hi - lo) / spacing).astype(int) + 2
    grid = rng.standard_normal((*n, 3)).astype(np.float32)
    for ratio, amp in ((3, 0.9), (9, 0.8), (27, 0.7)):
        nc = n // ratio + 2
        coarse = rng.standard_normal((*nc, 3)).astype(np.float32) * amp
        for axis in range(3):
            m = _upsample_matrix(int(n[axis]), ratio, int(nc[axis]))
            coarse = np.moveaxis(np.tensordot(m, coarse, axes=([1], [axis])), 0, axis)
        grid += coarse
    grid -= grid.mean(axis=(0, 1, 2))
    grid /= grid.std(axis=(0, 1, 2))
    return SolidTexture(origin=lo, spacing=spacing, grid=np.ascontiguousarray(grid))


def _look_at(centre: np.ndarray, target: np.ndarray) -> np.ndarray:
    z = target - centre
    z /= np.linalg.norm(z)
    x = np.cross(z, [0.0, 1.0, 0.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    return np.stack([x, y, z])  # rows: camera axes in world (x right, y down, z forward)


def orbit_cameras(n_views: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """World-to-camera (R, t): two rings (20 and 40 degrees up) all around the object; the upper
    ring is turned by half a step so that neighbouring views interleave."""
    rs, ts = [], []
    rings = [n_views - n_views // 2, n_views // 2]
    for ring, (count, elev) in enumerate(zip(rings, _ELEVATIONS_DEG, strict=True)):
        for k in range(count):
            r, t = _camera_at(2 * math.pi * (k + 0.5 * ring) / count, math.radians(elev))
            rs.append(r)
            ts.append(t)
    return rs, ts


def _camera_at(az: float, el: float) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera (R, t) of a camera at azimuth/elevation (radians) looking at the target."""
    dirn = np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])
    centre = _TARGET + _DISTANCE * dirn
    r = _look_at(centre, _TARGET)
    return r, -r @ centre


@dataclass(frozen=True)
class SyntheticScene:
    names: list[str]
    images: list[np.ndarray]  # (H, W, 3) uint8 RGB, or (H, W, 4) with alpha = coverage
    K: np.ndarray  # (3, 3) shared intrinsics, COLMAP pixel convention
    R: list[np.ndarray]  # world-to-camera rotations, OpenCV axes
    t: list[np.ndarray]  # world-to-camera translations
    width: int
    height: int
    size: float  # diagonal of the true surface's bounding box; tau = 0.01 * size
    primitives: tuple[Primitive, ...]

    def centres(self) -> np.ndarray:
        return np.array([-r.T @ t for r, t in zip(self.R, self.t, strict=True)])

    def cameras(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Image name -> world-to-camera (R, t), the form load_gt_cameras and the scorers use."""
        return dict(zip(self.names, zip(self.R, self.t, strict=True), strict=True))

    def surface_samples(self, n: int, min_views: int = 2, seed: int = 0) -> np.ndarray:
        """Area-uniform points on the true surface that at least `min_views` cameras see: the
        reference for completeness (a surface no camera sees cannot be asked for)."""
        points = self._raw_samples(n, seed)
        normals = self.normals(points)
        seen = np.zeros(len(points), dtype=np.int64)
        for i in range(len(self.R)):
            seen += self._visible(points, normals, i)
        return points[seen >= min_views]

    def _raw_samples(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        areas = np.array([p.area() for p in self.primitives])
        counts = rng.multinomial(n, areas / areas.sum())
        tol = 1e-4 * self.size
        chunks = []
        for k, (prim, count) in enumerate(zip(self.primitives, counts, strict=True)):
            pts = prim.sample(int(count), rng)
            keep = np.ones(len(pts), dtype=bool)
            for j, other in enumerate(self.primitives):
                if j != k:
                    keep &= other.sdf(pts) > tol  # drop contact faces and points inside others
            chunks.append(pts[keep])
        return np.concatenate(chunks)

    def visible_in(self, points: np.ndarray, view: int, normals: np.ndarray | None = None) -> np.ndarray:
        """Which surface points camera `view` sees: in frame, front-facing and not occluded
        (`normals`: the points' own, when the caller has them already)."""
        return self._visible(points, self.normals(points) if normals is None else normals, view)

    def _visible(self, points: np.ndarray, normals: np.ndarray, view: int) -> np.ndarray:
        r, t = self.R[view], self.t[view]
        cam = _mul(points, r.T) + t
        with np.errstate(divide="ignore", invalid="ignore"):
            u = (self.K[0, 0] * cam[:, 0] + self.K[0, 2] * cam[:, 2]) / cam[:, 2]
            v = (self.K[1, 1] * cam[:, 1] + self.K[1, 2] * cam[:, 2]) / cam[:, 2]
        ok = (cam[:, 2] > 0) & (u >= 0) & (u < self.width) & (v >= 0) & (v < self.height)
        centre = -r.T @ t
        idx = np.flatnonzero(ok)
        rays = points[idx] - centre
        dist = np.linalg.norm(rays, axis=1)
        dirs = rays / dist[:, None]
        facing = np.einsum("ij,ij->i", normals[idx], dirs) < 0
        idx, dirs, dist = idx[facing], dirs[facing], dist[facing]
        hit, _ = cast_rays(self.primitives, centre, dirs)
        ok[:] = False
        ok[idx[hit >= dist - 1e-6 * self.size]] = True
        return ok

    def normals(self, points: np.ndarray) -> np.ndarray:
        """Outward unit normals of the true surface at points on it."""
        sdf = np.stack([p.sdf(points) for p in self.primitives], axis=1)
        owner = np.abs(sdf).argmin(axis=1)
        normals = np.zeros_like(points)
        for k, prim in enumerate(self.primitives):
            sel = owner == k
            if sel.any():
                normals[sel] = prim.normal_at(points[sel])
        return normals


def _intrinsics(width: int, height: int) -> np.ndarray:
    f = 0.5 * width / math.tan(math.radians(_HFOV_DEG) / 2)
    return np.array([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])


def _render_view(
    primitives: tuple[Primitive, ...],
    texture: Callable[[np.ndarray], np.ndarray],
    contrast: np.ndarray,
    cam_dirs: np.ndarray,
    r: np.ndarray,
    t: np.ndarray,
    width: int,
    height: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Linear RGB in [0, 1] and coverage in [0, 1], averaged over each pixel's rays."""
    dirs = _mul(cam_dirs, r)  # camera to world: R^T d
    origin = -r.T @ t
    colour = np.full((len(dirs), 3), _BACKGROUND)
    cover = np.zeros(len(dirs))
    dist, which = cast_rays(primitives, origin, dirs)
    idx = np.flatnonzero(which >= 0)
    dist, which = dist[idx], which[idx]
    points = origin + dist[:, None] * dirs[idx]
    tints = np.array([p.tint for p in primitives])
    normals = np.zeros_like(points)
    for j, prim in enumerate(primitives):
        sel = which == j
        if sel.any():
            normals[sel] = prim.normal_at(points[sel])
    # Mostly luminance contrast (what SIFT and stereo see), some colour so that views look real.
    noise = texture(points)
    c = contrast[which]
    lum = 1.0 + 1.6 * c * noise[:, 0]
    chroma = 0.4 * c[:, None] * np.stack([noise[:, 1], noise[:, 2], -0.5 * (noise[:, 1] + noise[:, 2])], 1)
    albedo = np.clip(tints[which] * lum[:, None] + chroma, 0.02, 0.98)
    shade = _AMBIENT + (1 - _AMBIENT) * np.clip(normals @ _LIGHT, 0.0, None)
    colour[idx] = albedo * shade[:, None]
    cover[idx] = 1.0
    ss = round(math.sqrt(len(dirs) / (width * height)))  # samples per pixel side
    colour = colour.reshape(height, ss, width, ss, 3).mean(axis=(1, 3))
    cover = cover.reshape(height, ss, width, ss).mean(axis=(1, 3))
    return colour, cover


def held_out_cameras(n_views: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """World-to-camera (R, t) at 30 degrees up, between the two rings, at azimuths a quarter step
    off both rings: viewpoints the reconstruction never saw, for scoring appearance (PSNR)."""
    rs, ts = [], []
    for k in range(n_views):
        r, t = _camera_at(2 * math.pi * (k + 0.3) / n_views, math.radians(30.0))
        rs.append(r)
        ts.append(t)
    return rs, ts


def video_cameras(n_frames: int, turns: float = 1.0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """World-to-camera (R, t) along a smooth hand-held-like path: `turns` orbits around the object
    while the elevation swings between 15 and 45 degrees, so neighbouring frames overlap heavily."""
    rs, ts = [], []
    for k in range(n_frames):
        u = k / max(1, n_frames - 1)
        r, t = _camera_at(2 * math.pi * turns * u, math.radians(30 + 15 * math.sin(2 * math.pi * u)))
        rs.append(r)
        ts.append(t)
    return rs, ts


def sweep_cameras(n_views: int, baseline: float = 0.5) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """World-to-camera (R, t) of a forward-facing sweep (LLFF-like): one viewing direction, centres on
    two rows across `baseline` (world units, at distance 2.7), so every pair's triangulation angle
    stays under about 11 degrees, below the incremental mapper's 16 degree initialisation default."""
    r, t = _camera_at(0.0, math.radians(25.0))
    centre0 = -r.T @ t
    cols = n_views - n_views // 2
    rs, ts = [], []
    for k in range(n_views):
        row, col = divmod(k, cols)
        x = baseline * (col / max(1, cols - 1) - 0.5)
        y = 0.12 * (row - 0.5)
        centre = centre0 + x * r[0] + y * r[1]
        rs.append(r.copy())
        ts.append(-r @ centre)
    return rs, ts


def render_scene(
    n_views: int = 24,
    width: int = 640,
    height: int = 480,
    seed: int = 0,
    alpha: bool = False,
    texture: str = "rich",
    path: str = "rings",
    baseline: float = 0.5,
) -> SyntheticScene:
    """Render the test object from `n_views` cameras orbiting it at two elevations (path="rings"),
    or along one smooth video-like path (path="video", frames in time order), as a forward-facing
    sweep with small baselines (path="sweep", across `baseline` world units), or from held-out
    viewpoints between the rings (path="held_out", see held_out_cameras).

    `seed` picks the texture; cameras and geometry are fixed. texture="weak" leaves the sphere
    almost uniform, the hard case for feature matching and stereo.
    """
    paths = {
        "rings": orbit_cameras,
        "video": video_cameras,
        "held_out": held_out_cameras,
        "sweep": lambda n: sweep_cameras(n, baseline),
    }
    if path not in paths:
        raise ValueError(f"path must be one of {sorted(paths)}, not {path!r}")
    if texture not in ("rich", "weak"):
        raise ValueError(f"texture must be 'rich' or 'weak', not {texture!r}")
    if n_views < 2 or width < 16 or height < 16:
        raise ValueError("need at least 2 views of at least 16x16 pixels")
    primitives = scene_primitives()
    tex = make_texture(primitives, seed)
    contrast = np.full(len(primitives), 0.22)
    if texture == "weak":
        contrast[1] = 0.01
    rs, ts = paths[path](n_views)
    return render_views(primitives, tex, contrast, rs, ts, width, height, alpha)


def render_views(
    primitives: tuple[Primitive, ...],
    tex: Callable[[np.ndarray], np.ndarray],
    contrast: np.ndarray,
    rs: list[np.ndarray],
    ts: list[np.ndarray],
    width: int,
    height: int,
    alpha: bool = False,
    supersample: int = 2,
) -> SyntheticScene:
    """Render `primitives` from the cameras (R, t) with the shared intrinsics of this module,
    `supersample` x `supersample` rays per pixel."""
    lo = np.min([p.bounds()[0] for p in primitives], axis=0)
    hi = np.max([p.bounds()[1] for p in primitives], axis=0)
    k = _intrinsics(width, height)
    sub = (np.arange(supersample) + 0.5) / supersample  # ray offsets inside each pixel
    uu, vv = np.meshgrid(
        (np.arange(width)[:, None] + sub).ravel(), (np.arange(height)[:, None] + sub).ravel()
    )
    cam_dirs = np.stack([(uu - k[0, 2]) / k[0, 0], (vv - k[1, 2]) / k[1, 1], np.ones_like(uu)], axis=-1)
    cam_dirs = cam_dirs.reshape(-1, 3)
    cam_dirs /= np.linalg.norm(cam_dirs, axis=1, keepdims=True)
    images = []
    for r, t in zip(rs, ts, strict=True):
        colour, cover = _render_view(primitives, tex, contrast, cam_dirs, r, t, width, height)
        rgb = np.round(colour * 255).astype(np.uint8)
        if alpha:
            a = np.round(cover * 255).astype(np.uint8)
            rgb = np.concatenate([rgb, a[..., None]], axis=2)
        images.append(rgb)
    return SyntheticScene(
        names=[f"view_{i:03d}.png" for i in range(len(rs))],
        images=images,
        K=k,
        R=list(rs),
        t=list(ts),
        width=width,
        height=height,
        size=float(np.linalg.norm(hi - lo)),
        primitives=primitives,
    )


def write_scene(scene: SyntheticScene, folder: Path) -> None:
    """PNGs (RGBA when rendered with alpha) plus gt_cameras.json in the Strecha layout."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in zip(scene.names, scene.images, strict=True):
        Image.fromarray(image).save(folder / name)
    cameras = [
        {"file": name, "R": r.tolist(), "t": t.tolist(), "center": c.tolist()}
        for name, r, t, c in zip(scene.names, scene.R, scene.t, scene.centres(), strict=True)
    ]
    data = {
        "K": scene.K.tolist(),
        "width": scene.width,
        "height": scene.height,
        "size": scene.size,
        "cameras": cameras,
    }
    (folder / "gt_cameras.json").write_text(json.dumps(data, indent=1))


def write_video(scene: SyntheticScene, path: Path, fps: int = 30) -> None:
    """The scene's frames as an H.264 (or MPEG-4 Part 2) video, in the order they were rendered."""
    import av  # only the video benchmark and tests need it

    with av.open(str(path), "w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = scene.width, scene.height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        else:
            stream.bit_rate = 8_000_000
        for image in scene.images:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[..., :3]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def load_gt_cameras(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """file name -> world-to-camera (R, t) from a gt_cameras.json (ours or Strecha's)."""
    data = json.loads(Path(path).read_text())
    return {
        cam["file"]: (np.asarray(cam["R"], dtype=np.float64), np.asarray(cam["t"], dtype=np.float64))
        for cam in data["cameras"]
    }
