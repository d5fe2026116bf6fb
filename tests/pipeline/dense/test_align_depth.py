"""Aligning monocular inverse depth to stereo depth and filling weakly textured holes, against the
exact depth of a synthetic view (ray cast) with a stand-in for the network's output."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pytest

from scandrop.pipeline.bench.synthetic import cast_rays, render_scene
from scandrop.pipeline.dense.align_depth import MonoFillConfig, fill_weak_regions, fit_inverse_depth
from scandrop.pipeline.dense.estimate_depth import texture_strength

W, H = 320, 240
SPHERE = 1  # the primitive texture="weak" leaves almost uniform
TOL = 0.01  # relative depth error counted as correct (the benchmark's 1%)


@dataclass(frozen=True)
class View:
    z: np.ndarray  # (H, W) true camera z, 0 where rays miss
    which: np.ndarray  # (H, W) primitive index, -1 where rays miss
    stereo: np.ndarray  # (H, W) simulated multi-view depth, holes (0) where texture is weak
    mono: np.ndarray  # (H, W) stand-in network output: a / z + b + noise, blurred edges

    @property
    def object(self) -> np.ndarray:
        return self.which >= 0


def _true_depth(scene, view: int) -> tuple[np.ndarray, np.ndarray]:
    k, r, t = scene.K, scene.R[view], scene.t[view]
    u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)  # COLMAP pixel centres
    d = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], axis=-1).reshape(-1, 3)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    dist, which = cast_rays(scene.primitives, -r.T @ t, d @ r)
    z = np.where(which >= 0, dist * d[:, 2], 0.0)
    return z.reshape(H, W), which.reshape(H, W)


@pytest.fixture(scope="module")
def view() -> View:
    scene = render_scene(n_views=2, width=W, height=H, texture="weak")
    z, which = _true_depth(scene, 0)
    hit = which >= 0
    rng = np.random.default_rng(1)
    inv = np.where(hit, 1.0 / np.where(hit, z, 1.0), 0.0)
    # The network: affine in inverse depth with a scale and shift the code does not know, a little
    # noise, and edges blurred over a pixel or two as real networks do.
    a, b = 3.7, -0.4
    mono = a * inv + b + rng.normal(0.0, 0.002 * a, inv.shape)
    mono = cv2.GaussianBlur(mono.astype(np.float32), (0, 0), 1.0)
    # Stereo: accurate (0.2%) where the photo has texture, nothing where it has none, 3% outliers.
    gray = cv2.cvtColor(scene.images[0], cv2.COLOR_RGB2GRAY)
    textured = hit & (texture_strength(gray) >= 6.0)
    stereo = np.where(textured, z * (1.0 + rng.normal(0.0, 0.002, z.shape)), 0.0)
    wild = textured & (rng.random(z.shape) < 0.03)
    stereo[wild] = rng.uniform(1.5, 4.5, int(wild.sum()))
    return View(z=z, which=which, stereo=stereo.astype(np.float32), mono=mono)


def _correct(depth: np.ndarray, v: View) -> np.ndarray:
    return (depth > 0) & v.object & (np.abs(depth - v.z) < TOL * np.where(v.object, v.z, 1.0))


def _recall(depth: np.ndarray, v: View, where: np.ndarray | None = None) -> float:
    where = v.object if where is None else where
    return float(np.count_nonzero(_correct(depth, v) & where) / np.count_nonzero(where))


def _precision(depth: np.ndarray, v: View) -> float:
    return float(np.count_nonzero(_correct(depth, v)) / np.count_nonzero(depth > 0))


def test_fit_recovers_scale_and_shift(view: View) -> None:
    fit = fit_inverse_depth(view.mono, view.stereo, view.stereo > 0)
    s, t, inliers = fit
    assert s > 0 and inliers > 0.85  # 3% outliers plus blurred edges
    assert s == pytest.approx(1 / 3.7, rel=0.01) and t == pytest.approx(0.4 / 3.7, rel=0.02)
    obj = view.object
    aligned = 1.0 / (s * view.mono[obj] + t)
    rel = np.abs(aligned - view.z[obj]) / view.z[obj]
    assert np.median(rel) < 0.01


def test_fit_survives_heavy_outliers() -> None:
    rng = np.random.default_rng(3)
    z = rng.uniform(1.0, 4.0, 5000)
    mono = 2.0 / z - 0.3
    z_obs = z.copy()
    bad = rng.random(5000) < 0.4
    z_obs[bad] = rng.uniform(0.5, 8.0, int(bad.sum()))
    s, t, inliers = fit_inverse_depth(mono, z_obs, np.ones(5000, bool))
    assert s == pytest.approx(0.5, rel=1e-3) and t == pytest.approx(0.15, rel=1e-3)
    assert inliers == pytest.approx(0.6, abs=0.03)


def test_fill_raises_recall_and_keeps_precision(view: View) -> None:
    conf = (view.stereo > 0).astype(np.float32)
    depth, confidence, stats = fill_weak_regions(view.stereo, conf, view.mono, view.object)
    sphere = view.which == SPHERE
    before, after = _recall(view.stereo, view), _recall(depth, view)
    sphere_before, sphere_after = _recall(view.stereo, view, sphere), _recall(depth, view, sphere)
    p_before, p_after = _precision(view.stereo, view), _precision(depth, view)
    print(
        f"recall {before:.3f} -> {after:.3f}, sphere {sphere_before:.3f} -> {sphere_after:.3f},"
        f" precision {p_before:.4f} -> {p_after:.4f}, filled {stats.filled}"
    )
    assert stats.reason == "filled" and stats.filled > 0
    assert sphere_before < 0.2 and sphere_after > 0.85
    assert after > before + 0.12
    assert p_after >= p_before - 0.005
    filled = (depth > 0) & (view.stereo == 0)
    assert np.count_nonzero(filled) == stats.filled
    assert np.count_nonzero(_correct(depth, view) & filled) / stats.filled > 0.98
    np.testing.assert_array_equal(confidence[filled], np.float32(MonoFillConfig().confidence))
    kept = view.stereo > 0
    np.testing.assert_array_equal(depth[kept], view.stereo[kept])  # stereo depth is never replaced
    assert not np.any(filled & ~view.object)  # nothing outside the mask


def test_unmasked_fill_stays_off_the_background(view: View) -> None:
    conf = (view.stereo > 0).astype(np.float32)
    depth, _, stats = fill_weak_regions(view.stereo, conf, view.mono)
    filled = (depth > 0) & (view.stereo == 0)
    assert stats.filled > 0
    assert np.count_nonzero(filled & ~view.object) < 0.01 * stats.filled
    assert _precision(depth, view) >= _precision(view.stereo, view) - 0.005


def test_unrelated_network_output_fills_nothing(view: View) -> None:
    rng = np.random.default_rng(7)
    conf = (view.stereo > 0).astype(np.float32)
    for noise in (
        rng.random(view.mono.shape).astype(np.float32),
        cv2.GaussianBlur(rng.random(view.mono.shape).astype(np.float32), (0, 0), 8.0),
    ):
        depth, confidence, stats = fill_weak_regions(view.stereo, conf, noise, view.object)
        assert stats.filled == 0 and stats.reason == "poor_fit"
        np.testing.assert_array_equal(depth, view.stereo)
        np.testing.assert_array_equal(confidence, conf)


def test_too_little_stereo_fills_nothing(view: View) -> None:
    sparse = view.stereo.copy()
    keep = np.zeros_like(sparse, dtype=bool)
    keep[100:110, 100:130] = True  # 300 pixels: too small a patch to extrapolate from
    sparse[~keep] = 0.0
    _, _, stats = fill_weak_regions(sparse, (sparse > 0).astype(np.float32), view.mono, view.object)
    assert stats.filled == 0 and stats.reason == "too_few_valid"


def test_fill_is_limited_to_near_valid_depth(view: View) -> None:
    conf = (view.stereo > 0).astype(np.float32)
    config = MonoFillConfig(max_distance_px=5.0)
    depth, _, stats = fill_weak_regions(view.stereo, conf, view.mono, view.object, config)
    filled = (depth > 0) & (view.stereo == 0)
    dist = cv2.distanceTransform((view.stereo <= 0).astype(np.uint8), cv2.DIST_L2, 5)
    assert stats.filled > 0 and dist[filled].max() <= 5.0
    _, _, wide = fill_weak_regions(view.stereo, conf, view.mono, view.object)
    assert wide.filled > 2 * stats.filled


def test_nan_holes_and_shape_checks(view: View) -> None:
    nan_holes = np.where(view.stereo > 0, view.stereo, np.nan).astype(np.float32)
    conf = np.ones_like(nan_holes)
    depth, _, stats = fill_weak_regions(nan_holes, conf, view.mono, view.object)
    assert stats.filled > 0 and np.all(np.isfinite(depth))
    with pytest.raises(ValueError, match="differ"):
        fill_weak_regions(view.stereo, conf, view.mono[:-1])
