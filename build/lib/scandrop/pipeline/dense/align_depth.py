"""Fill holes of multi-view depth with monocular depth aligned to it.

Multi-view stereo leaves holes where the surface has no texture to match; a monocular network
(models.mono_depth) still sees shape there, but only as relative inverse depth with an unknown
scale and shift per image. This module fits that scale and shift to the stereo depth of the same
view, robustly and in inverse-depth space (where the network's output is affine), optionally
corrects slow drift with a smooth residual field, and fills only holes it can vouch for: near
valid stereo depth, inside the object, away from the network's depth discontinuities, within the
view's depth range, and not at all when the fit is poor.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class InverseDepthFit(NamedTuple):
    """1 / depth ~= scale * mono + shift; inlier_fraction = share of the fitted pixels whose depth
    the fit reproduces within the inlier tolerance (relative)."""

    scale: float
    shift: float
    inlier_fraction: float


class MonoFillConfig(BaseModel):
    """How monocular depth may fill stereo holes; the defaults are the `balanced` preset."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_valid_pixels: int = Field(
        500, ge=10, description="Fewer valid stereo pixels than this: no fit, nothing filled."
    )
    min_valid_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Valid stereo pixels needed, as a share of the object mask (or image): below it the"
        " scale/shift fit rests on too small a patch of the scene to extrapolate.",
    )
    inlier_rel: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="Relative depth error under which a stereo pixel agrees with the global scale/shift"
        " fit (networks are affine in inverse depth only to a few percent).",
    )
    agree_rel: float = Field(
        0.01,
        gt=0,
        lt=0.5,
        description="Relative depth error under which a stereo pixel agrees with the locally corrected"
        " network depth: the accuracy filled pixels are vouched for (1% = the benchmark's tolerance).",
    )
    min_agreement: float = Field(
        0.7,
        gt=0,
        le=1,
        description="Share of the stereo pixels around a hole pixel (see agreement_sigma_px) that must"
        " agree with the corrected network depth before it is filled.",
    )
    min_inlier_fraction: float = Field(
        0.6,
        gt=0,
        le=1,
        description="Share of stereo pixels that must agree with the fit; below it the network's depth is"
        " not an affine image of this view's geometry and nothing is filled.",
    )
    max_distance_px: float = Field(
        80.0, gt=0, description="Fill only within this distance (depth-grid px) of valid stereo depth."
    )
    local_sigma_px: float = Field(
        24.0,
        ge=0,
        description="Width (px) of the smooth residual correction interpolated from nearby stereo depth"
        " into holes, to absorb slow drift of the network; 0 = global scale/shift only.",
    )
    max_correction: float = Field(
        0.02,
        ge=0,
        description="Largest local correction (relative to the depth) under which a hole pixel is still"
        " filled: where the network needs more bending than this it is too distorted to extrapolate.",
    )
    agreement_sigma_px: float = Field(
        16.0,
        gt=0,
        description="Width (px) of the neighbourhood whose stereo pixels must agree with the aligned"
        " network depth (at least min_agreement of them) before a hole pixel is filled.",
    )
    max_local_range: float = Field(
        0.08,
        gt=0,
        description="Skip pixels where the aligned depth varies by more than this share within"
        " `edge_window_px`: depth discontinuities, where the network blurs foreground into background.",
    )
    edge_window_px: int = Field(7, ge=3, le=31, description="Window (px, odd) of the discontinuity test.")
    depth_margin: float = Field(
        0.1,
        ge=0,
        description="Filled depth must lie within the view's stereo depth range (1st-99th percentile)"
        " widened by this share.",
    )
    confidence: float = Field(
        0.3, gt=0, le=1, description="Confidence given to filled pixels (stereo's is up to 1)."
    )
    inside_hull: bool = Field(
        True, description="Fill only inside the convex hull of the valid stereo pixels (no extrapolation)."
    )


class FillStats(BaseModel):
    """What filling did to one view, for the log and report.json."""

    valid_before: int
    filled: int
    scale: float = 0.0
    shift: float = 0.0
    inlier_fraction: float = 0.0
    reason: Literal["filled", "nothing_to_fill", "too_few_valid", "poor_fit"]


def _lstsq(m: np.ndarray, z: np.ndarray, w: np.ndarray | None = None) -> tuple[float, float]:
    """Minimise sum w * (z * (s m + t) - 1)^2: the inverse-depth residual times z is the relative
    depth error, so near and far pixels count alike."""
    a = np.stack([m * z, z], axis=1)
    b = np.ones_like(z)
    if w is not None:
        a, b = a * w[:, None], b * w
    (s, t), *_ = np.linalg.lstsq(a, b, rcond=None)
    return float(s), float(t)


def fit_inverse_depth(
    mono: np.ndarray,
    depth: np.ndarray,
    valid: np.ndarray,
    inlier_rel: float = 0.03,
    max_samples: int = 20000,
    seed: int = 0,
) -> InverseDepthFit:
    """Robust fit of 1 / depth ~= scale * mono + shift over `valid` pixels with depth > 0.

    A small RANSAC on pixel pairs finds the consensus (stereo depth has outliers, the network has
    regions it gets wrong), then least squares on the inliers, re-selected three times. Residuals
    are relative depth errors. Deterministic for a given seed.
    """
    sel = valid & (depth > 0) & np.isfinite(depth) & np.isfinite(mono)
    m = mono[sel].astype(np.float64)
    z = depth[sel].astype(np.float64)
    if len(z) < 10:
        return InverseDepthFit(0.0, 0.0, 0.0)
    rng = np.random.default_rng(seed)
    if len(z) > max_samples:  # the fit has two unknowns: a sample is as good and bounds the time
        keep = rng.choice(len(z), max_samples, replace=False)
        m, z = m[keep], z[keep]
    inv = 1.0 / z

    def rel_err(s: float, t: float) -> np.ndarray:
        return np.abs(z * (s * m + t) - 1.0)

    best, best_count = (0.0, 0.0), -1
    pairs = rng.integers(0, len(z), size=(200, 2))
    for i, j in pairs:
        dm = m[i] - m[j]
        if abs(dm) < 1e-12:
            continue
        s = (inv[i] - inv[j]) / dm
        if s <= 0:  # larger mono must mean nearer
            continue
        t = inv[i] - s * m[i]
        count = int(np.count_nonzero(rel_err(s, t) < inlier_rel))
        if count > best_count:
            best, best_count = (s, t), count
    if best_count < 2:
        return InverseDepthFit(0.0, 0.0, 0.0)
    s, t = best
    for _ in range(3):
        inl = rel_err(s, t) < inlier_rel
        if np.count_nonzero(inl) < 2:
            break
        s, t = _lstsq(m[inl], z[inl])
    fraction = float(np.mean(rel_err(s, t) < inlier_rel)) if s > 0 else 0.0
    return InverseDepthFit(s, t, fraction)


def _blur_mean(values: np.ndarray, weights: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Normalised convolution: Gaussian-weighted mean of `values` where `weights` > 0, and the
    local weight itself (0 far from any weighted pixel)."""
    w = weights.astype(np.float32)
    num = cv2.GaussianBlur(np.where(w > 0, values, 0.0).astype(np.float32) * w, (0, 0), sigma)
    den = cv2.GaussianBlur(w, (0, 0), sigma)
    return np.where(den > 1e-6, num / np.maximum(den, 1e-6), 0.0).astype(np.float32), den


def _local_correction(
    inv: np.ndarray, depth: np.ndarray, fit_px: np.ndarray, sigma: float, inlier_rel: float
) -> np.ndarray:
    """Smooth inverse-depth correction interpolated from stereo-minus-network residuals: the
    network's error varies slowly, so nearby stereo depth says how to bend it inside a hole. Two
    passes: a coarse gate (4x the inlier tolerance) keeps stereo outliers out of the first field,
    the second uses only pixels that agree with the first."""
    residual = np.where(fit_px, 1.0 / np.where(fit_px, depth, 1.0) - inv, 0.0).astype(np.float32)
    rel = np.abs(residual) * np.where(fit_px, depth, 0.0)
    field, _ = _blur_mean(residual, fit_px & (rel < 4 * inlier_rel), sigma)
    agree = fit_px & (np.abs(residual - field) * np.where(fit_px, depth, 0.0) < inlier_rel)
    field, _ = _blur_mean(residual, agree, sigma)
    return field


def _smooth_enough(inv: np.ndarray, ok: np.ndarray, window: int, max_range: float) -> np.ndarray:
    """False near depth discontinuities: (max - min) / min of depth in the window above max_range."""
    kernel = np.ones((window | 1, window | 1), np.uint8)
    big = np.float32(1e9)
    d = np.where(ok, 1.0 / np.maximum(inv, 1e-12), np.nan).astype(np.float32)
    hi = cv2.dilate(np.where(ok, d, -big), kernel)
    lo = cv2.erode(np.where(ok, d, big), kernel)
    # A window that touches an unusable pixel (negative or invalid aligned depth) is not trusted.
    touches_bad = cv2.dilate((~ok).astype(np.uint8), kernel) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        rng = (hi - lo) / lo
    return ~touches_bad & (rng <= max_range)


def fill_weak_regions(
    depth: np.ndarray,
    confidence: np.ndarray,
    mono: np.ndarray,
    mask: np.ndarray | None = None,
    config: MonoFillConfig | None = None,
) -> tuple[np.ndarray, np.ndarray, FillStats]:
    """Depth (H, W; 0 or NaN = unknown) with holes filled by aligned monocular depth, its confidence
    (filled pixels get config.confidence), and what happened. `mono` is the network's relative
    inverse depth at the same resolution; `mask` (bool, True = object) limits fit and fill."""
    config = config or MonoFillConfig()
    if depth.shape != mono.shape or depth.shape != confidence.shape:
        raise ValueError(f"depth {depth.shape}, confidence {confidence.shape}, mono {mono.shape} differ")
    if mask is not None and mask.shape != depth.shape:
        raise ValueError(f"mask {mask.shape} does not match depth {depth.shape}")
    region = np.ones(depth.shape, bool) if mask is None else mask.astype(bool)
    region &= np.isfinite(mono)
    valid = np.isfinite(depth) & (depth > 0)
    fit_px = valid & region
    n_valid = int(np.count_nonzero(fit_px))
    out_depth = np.where(valid, depth, 0.0).astype(np.float32)
    out_conf = np.where(valid, confidence, 0.0).astype(np.float32)

    def done(
        reason: str, filled: int = 0, fit: InverseDepthFit | None = None
    ) -> tuple[np.ndarray, np.ndarray, FillStats]:
        fit = fit or InverseDepthFit(0.0, 0.0, 0.0)
        stats = FillStats(
            valid_before=int(np.count_nonzero(valid)),
            filled=filled,
            scale=fit.scale,
            shift=fit.shift,
            inlier_fraction=fit.inlier_fraction,
            reason=reason,
        )
        return out_depth, out_conf, stats

    holes = region & ~valid
    if not holes.any():
        return done("nothing_to_fill")
    if n_valid < max(config.min_valid_pixels, config.min_valid_fraction * np.count_nonzero(region)):
        return done("too_few_valid")
    fit = fit_inverse_depth(mono, depth, fit_px, config.inlier_rel)
    if fit.scale <= 0 or fit.inlier_fraction < config.min_inlier_fraction:
        return done("poor_fit", fit=fit)

    inv = (fit.scale * mono + fit.shift).astype(np.float32)
    # Near the network's depth discontinuities neither it (it blurs edges) nor stereo (occlusions)
    # is a fair reference: such pixels are neither filled nor used to judge or bend the fit.
    smooth = _smooth_enough(inv, (inv > 0) & region, config.edge_window_px, config.max_local_range)
    ref = fit_px & smooth
    bent_ok = np.ones(depth.shape, bool)
    if config.local_sigma_px > 0:
        correction = _local_correction(inv, depth, ref, config.local_sigma_px, config.inlier_rel)
        # A large bend means the network is distorted here: extrapolating it into a hole is a guess.
        with np.errstate(divide="ignore", invalid="ignore"):
            bent_ok = np.abs(correction) <= config.max_correction * np.abs(inv)
        inv = inv + correction
    # Fill only where the nearby stereo pixels agree with the aligned network depth: a global fit
    # that holds on most of the image can still be wrong in one corner.
    agrees = ref & (np.abs(np.where(ref, depth, 0.0) * inv - 1.0) < config.agree_rel)
    share, weight = _blur_mean(agrees.astype(np.float32), ref, config.agreement_sigma_px)
    candidate = holes & smooth & bent_ok & (inv > 0) & (weight > 1e-6) & (share >= config.min_agreement)
    dist = cv2.distanceTransform((~valid).astype(np.uint8), cv2.DIST_L2, 5)
    candidate &= dist <= config.max_distance_px
    if config.inside_hull:
        ys, xs = np.nonzero(fit_px)
        hull = cv2.convexHull(np.stack([xs, ys], axis=1).astype(np.int32))
        inside = np.zeros(depth.shape, np.uint8)
        cv2.fillConvexPoly(inside, hull, 1)
        candidate &= inside.astype(bool)
    filled_depth = 1.0 / np.where(candidate, inv, 1.0)
    lo, hi = np.percentile(depth[fit_px], [1.0, 99.0])
    candidate &= (filled_depth >= lo / (1.0 + config.depth_margin)) & (
        filled_depth <= hi * (1.0 + config.depth_margin)
    )
    out_depth[candidate] = filled_depth[candidate]
    out_conf[candidate] = config.confidence
    return done("filled", int(np.count_nonzero(candidate)), fit)
