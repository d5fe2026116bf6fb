"""A synthetic object with fine relief, for the question "is the model as sharp as the photos?".

A star-shaped solid (a sphere or a pebble) whose radius carries bumps and grooves of about
0.2-1% of the object's size, standing on a textured plate, rendered with a fine solid texture
(a texel is about 2 photo pixels at 1600 px wide) from the benchmark's two camera rings. A
few more cameras between the rings are held out: the pipeline never sees them, and a renderer
of the model can be scored against their images (`held_out_views`).

Parametric (`seed` draws the relief, texture and proportions; `shape` the base solid), so a
held-out object of the same kind checks that nothing was tuned to one object.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from scandrop.pipeline.bench import synthetic
from scandrop.pipeline.bench.synthetic import Box, SyntheticScene

SHAPES = ("sphere", "pebble")
TEXTURE_SPACING = 0.004  # world units: about 2 px at 1600 px wide and the rig's distance
HELD_OUT_VIEWS = 4
MARCH_STEPS = 200  # ray-marching steps at most (80 before 2026-12-04)
GRAZE = 1e-3  # of the radius (about 0.2 px at 1600 px): a grazing ray this close hits the surface


@dataclass(frozen=True)
class ReliefSolid:
    """{centre + rho(d) d}: rho = radius * (1 + d . stretch d) + relief(d); relief is a sum of
    sinusoidal ridges (bumps where they cross) and a few sharper grooves."""

    centre: tuple[float, float, float]
    radius: float
    stretch: tuple[float, float, float]
    waves: np.ndarray = field(repr=False)  # (K, 6): direction xyz, frequency, phase, amplitude
    grooves: np.ndarray = field(repr=False)  # (G, 5): direction xyz, frequency, amplitude (depth)
    tint: tuple[float, float, float] = (0.74, 0.5, 0.4)

    def _rho(self, d: np.ndarray) -> np.ndarray:
        # Column by column: BLAS is slow on (N, 3) x (3, K) products (FIELD-NOTES).
        x, y, z = d[:, 0], d[:, 1], d[:, 2]
        sx, sy, sz = self.stretch
        rho = self.radius * (1.0 + sx * x * x + sy * y * y + sz * z * z)
        for wx, wy, wz, freq, phase, amp in self.waves:
            rho += amp * np.sin((wx * x + wy * y + wz * z) * freq + phase)
        # cos^8 dips: narrow grooves (about 1/6 of their period wide), depth g[4].
        for gx, gy, gz, freq, depth in self.grooves:
            rho -= depth * np.cos(0.5 * freq * (gx * x + gy * y + gz * z)) ** 8
        return rho

    def max_relief(self) -> float:
        return float(np.abs(self.waves[:, 5]).sum() + np.abs(self.grooves[:, 4]).sum())

    def _excess(self, p: np.ndarray) -> np.ndarray:
        """|p - c| - rho(direction): positive outside; its zero set is the surface."""
        q = p - np.asarray(self.centre)
        r = np.linalg.norm(q, axis=1)
        return r - self._rho(q / np.maximum(r, 1e-12)[:, None])

    def _lipschitz(self) -> float:
        slope = (
            np.abs(self.waves[:, 3] * self.waves[:, 5]).sum()
            + 2.0 * np.abs(self.grooves[:, 3] * self.grooves[:, 4]).sum()
        )
        return 1.0 + float(slope) / self.radius + 2.0 * float(np.abs(self.stretch).max())

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        outer = self.radius * (1.0 + max(0.0, *self.stretch)) + self.max_relief()
        c = np.asarray(self.centre)
        return c - outer, c + outer

    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """March from the bounding sphere by the radial excess (for a sphere exactly the distance
        left at normal incidence, never more than it), then bisect the first crossing.

        A ray that grazes the surface (a silhouette, a ridge's occluding contour) closes in with
        ever smaller steps; one still marching at the end within GRAZE of the surface hits it there.
        Counted as misses (before 2026-12-04, after 80 steps), such rays showed the plate behind the
        object as bright lines along its contours, in the photos and the held-out truth alike."""
        c = np.asarray(self.centre)
        outer = float(self.bounds()[1][0] - c[0])
        oc = origin - c
        b = dirs @ oc
        disc = b * b - (oc @ oc - outer**2)
        out = np.full(len(dirs), np.inf)
        idx = np.flatnonzero(disc > 0)
        t = np.maximum(-b[idx] - np.sqrt(disc[idx]), 0.0)
        t_exit = -b[idx] + np.sqrt(disc[idx])
        t_prev = t.copy()
        state = np.zeros(len(idx), np.int8)  # 0 marching, 1 on the surface, 2 crossed, 3 missed
        tol = 1e-6 * self.radius
        g_last = np.full(len(idx), np.inf)
        for _ in range(MARCH_STEPS):
            k = np.flatnonzero(state == 0)
            if len(k) == 0:
                break
            g = self._excess(origin + t[k, None] * dirs[idx[k]])
            g_last[k] = g
            state[k[(g >= 0) & (g < tol)]] = 1
            state[k[g < 0]] = 2
            go = k[g >= tol]
            t_prev[go] = t[go]
            t[go] += 0.9 * g[g >= tol]
            state[go[t[go] > t_exit[go]]] = 3
        state[(state == 0) & (g_last < GRAZE * self.radius)] = 1
        state[state == 0] = 3  # still marching farther off: passing the object by
        k = np.flatnonzero(state == 2)
        lo, hi = t_prev[k], t[k].copy()
        for _ in range(30):  # lo outside, hi inside
            mid = 0.5 * (lo + hi)
            inside = self._excess(origin + mid[:, None] * dirs[idx[k]]) <= 0
            hi = np.where(inside, mid, hi)
            lo = np.where(inside, lo, mid)
        t[k] = hi
        hit = state <= 2
        out[idx[hit]] = t[hit]
        return out

    def sdf(self, points: np.ndarray) -> np.ndarray:
        return self._excess(points) / self._lipschitz()

    def normal_at(self, points: np.ndarray) -> np.ndarray:
        eps = 1e-5 * self.radius
        grad = np.stack(
            [self._excess(points + eps * e) - self._excess(points - eps * e) for e in np.eye(3)],
            axis=1,
        )
        return grad / np.maximum(np.linalg.norm(grad, axis=1, keepdims=True), 1e-12)

    def area(self) -> float:
        return 4.0 * math.pi * self.radius**2 * (1.0 + float(np.mean(self.stretch))) ** 2

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Points on the surface; area-uniform on the base sphere (the relief skews it slightly,
        which only weights the scores, never moves a sample off the surface)."""
        d = rng.standard_normal((n, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        return np.asarray(self.centre) + self._rho(d)[:, None] * d


@dataclass(frozen=True)
class HashedTexture:
    """Value noise like synthetic.SolidTexture, but lattice values come from hashing the lattice
    index into a random table: no volume grid, so a texel can be a few photo pixels at 1600 px
    (a grid that fine would hold ~70M values)."""

    spacing: float
    table: np.ndarray = field(repr=False)  # (2**20, 3) float32 random values
    octaves: tuple[tuple[int, float], ...] = ((1, 1.0), (3, 0.9), (9, 0.8), (27, 0.7))

    def _octave(self, points: np.ndarray, step: float, salt: int) -> np.ndarray:
        g = points / step
        i0 = np.floor(g).astype(np.int64)
        f = (g - i0).astype(np.float32)
        mask = len(self.table) - 1
        out = np.zeros((len(points), 3), np.float32)
        for dx, dy, dz, w in synthetic.trilinear_corners(f):
            key = (i0[:, 0] + dx) * 73856093 ^ (i0[:, 1] + dy) * 19349663 ^ (i0[:, 2] + dz) * 83492791
            out += w[:, None] * self.table[(key ^ salt) & mask]
        return out

    def __call__(self, points: np.ndarray) -> np.ndarray:
        total = np.zeros((len(points), 3), np.float32)
        for k, (ratio, amp) in enumerate(self.octaves):
            total += amp * self._octave(points, ratio * self.spacing, k * 0x9E3779B1)
        # Trilinear interpolation of unit-variance values keeps about 0.3 of the variance.
        norm = np.sqrt(sum(a * a for _, a in self.octaves) * 0.3)
        return (total / norm).astype(np.float64)


def hashed_texture(seed: int, spacing: float = TEXTURE_SPACING) -> HashedTexture:
    rng = np.random.default_rng(20_000 + seed)
    return HashedTexture(spacing=spacing, table=rng.standard_normal((2**20, 3)).astype(np.float32))


def relief_solid(seed: int, shape: str = "sphere") -> ReliefSolid:
    """A random relief object: ridges 0.2-0.5% and grooves about 0.6% of the scene's size deep."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, not {shape!r}")
    rng = np.random.default_rng(10_000 + seed)
    radius = float(rng.uniform(0.36, 0.44))
    stretch = (0.0, 0.0, 0.0) if shape == "sphere" else tuple(float(x) for x in rng.uniform(-0.2, 0.25, 3))

    def directions(n: int) -> np.ndarray:
        d = rng.standard_normal((n, 3))
        return d / np.linalg.norm(d, axis=1, keepdims=True)

    n_waves = 10
    waves = np.zeros((n_waves, 6))
    waves[:, :3] = directions(n_waves)
    waves[:, 3] = rng.uniform(12.0, 30.0, n_waves)  # periods of 8-20% of the radius
    waves[:, 4] = rng.uniform(0.0, 2 * math.pi, n_waves)
    waves[:, 5] = rng.uniform(0.002, 0.004, n_waves)  # the sum reaches ~1% of the size at most
    n_grooves = 3
    grooves = np.zeros((n_grooves, 5))
    grooves[:, :3] = directions(n_grooves)
    grooves[:, 3] = rng.uniform(6.0, 12.0, n_grooves)
    grooves[:, 4] = rng.uniform(0.008, 0.012, n_grooves)
    lift = radius * (1.0 + max(0.0, stretch[1])) + 0.015
    return ReliefSolid(
        centre=(float(rng.uniform(-0.1, 0.1)), lift, float(rng.uniform(-0.1, 0.1))),
        radius=radius,
        stretch=stretch,  # type: ignore[arg-type]
        waves=waves,
        grooves=grooves,
    )


def relief_primitives(seed: int, shape: str = "sphere") -> tuple[Box, ReliefSolid]:
    """The plate (index 0) and the relief object floating just above it (no contact seam)."""
    plate = Box(centre=(0.0, -0.05, 0.0), half=(0.6, 0.05, 0.6), yaw_deg=0.0, tint=(0.6, 0.58, 0.52))
    return plate, relief_solid(seed, shape)


def held_out_cameras(n: int = HELD_OUT_VIEWS) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Cameras between the two rings (30 degrees up) at azimuths no training view has."""
    rs, ts = [], []
    for k in range(n):
        r, t = synthetic._camera_at(2 * math.pi * (k + 0.37) / n, math.radians(30.0))
        rs.append(r)
        ts.append(t)
    return rs, ts


@dataclass(frozen=True)
class ReliefScene:
    train: SyntheticScene
    held_out: SyntheticScene


def render_relief_scene(
    n_views: int = 24, width: int = 1600, height: int = 1200, seed: int = 0, shape: str = "sphere",
    n_held_out: int = HELD_OUT_VIEWS,
) -> ReliefScene:  # fmt: skip
    """The training photos (two rings) and the held-out views of one relief object."""
    primitives = relief_primitives(seed, shape)
    tex = hashed_texture(seed)
    contrast = np.full(len(primitives), 0.22)
    rs, ts = synthetic.orbit_cameras(n_views)
    # One ray per pixel: at 1600 px a texel spans ~2 pixels, and 2x2 rays would take 4x as long.
    train = synthetic.render_views(primitives, tex, contrast, rs, ts, width, height, supersample=1)
    hr, ht = held_out_cameras(n_held_out)
    # Alpha = coverage: held-out PSNR is scored over the object, not the blank background.
    held = synthetic.render_views(primitives, tex, contrast, hr, ht, width, height, alpha=True, supersample=1)
    held = SyntheticScene(
        names=[f"held_out_{i:02d}.png" for i in range(n_held_out)],
        images=held.images, K=held.K, R=held.R, t=held.t, width=width, height=height,
        size=train.size, primitives=primitives,
    )  # fmt: skip
    return ReliefScene(train=train, held_out=held)


def write_held_out(scene: SyntheticScene, folder: Path) -> None:
    """Held-out images plus their cameras (gt_cameras.json layout) for scoring renders of a model."""
    synthetic.write_scene(scene, folder)
    meta = json.loads((folder / "gt_cameras.json").read_text())
    meta["note"] = "held out: the pipeline never saw these views"
    (folder / "gt_cameras.json").write_text(json.dumps(meta, indent=1))


def load_held_out(folder: Path) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, image RGB uint8, K, R, t) of each held-out view written by write_held_out."""
    meta = json.loads((folder / "gt_cameras.json").read_text())
    K = np.asarray(meta["K"], dtype=np.float64)
    return [
        (
            cam["file"],
            np.asarray(Image.open(folder / cam["file"]).convert("RGB")),
            K,
            np.asarray(cam["R"], dtype=np.float64),
            np.asarray(cam["t"], dtype=np.float64),
        )
        for cam in meta["cameras"]
    ]
