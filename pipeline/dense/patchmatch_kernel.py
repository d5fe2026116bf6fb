"""PatchMatch multi-view stereo kernels (numba, all cores): per-pixel plane hypotheses scored by
normalised cross-correlation against several source views.

The method of COLMAP, Gipuma and ACMM, reduced to what runs on a CPU:
- a hypothesis is a depth and a normal per reference pixel, i.e. a local plane; the plane
  induces a homography into every source view, so the matching window follows the surface's
  slant (fronto-parallel windows blur slanted and curved relief);
- the cost of a hypothesis is 1 - NCC (exposure- and gain-invariant) per source view, and the
  mean of the best `best_k` sources (per-pixel view selection: an occluded or differently lit
  source does not spoil the pixel);
- red-black (checkerboard) sweeps propagate the planes of near and far neighbours, then random
  refinement perturbs depth and normal with a shrinking range;
- in the geometric-consistency pass (`geo` given) a source's cost also has the forward-backward
  error of its own depth map, weighted, in reference pixels (`_reprojection_error`);
- on a refining level a pixel's sweeps score only the few sources that matched its starting plane
  best (`selection`): the others were not among its best, and not scoring them saves 17% of the
  windows of a rendered view, 9% of a kitchen photo's (most of its pixels see only 2-3 sources).

Planes: a camera-frame plane {X : n . X = c}; the ray of pixel x is r = Kinv x (z = 1), so the
plane's depth at x is c / (n . r) and its image in source s is y ~ A_s x + b_s (m . x), with
A_s = K_s R_s Kinv, b_s = K_s t_s, m = Kinv^T n / c. Over the few pixels of a window the
homography is sampled through its Jacobian at the window's centre (no division per sample: 28%
less time per view on the kitchen, the same depth error on a rendered scene).

The parallel kernels release the GIL (`nogil`): a Ray job computes its own views in a thread while
its main thread hands out and gathers the cluster's (daemon/ray_fanout.py).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

INVALID_COST = 2.0  # cost of a source the window does not land in (worst possible 1 - NCC)
SKIPPED = 3.0  # a source left out of a pixel's selection: sorts after every evaluated one
# numba splits a prange into one contiguous block of slots per thread. A photo's work is not spread
# evenly over its rows (sky and plain walls are skipped, and a rescue or geometric sweep searches
# only some pixels), so one thread often waited for the other. The kernels walk the rows through
# `spread_row`: the image is cut into bands of rows and each band into pieces of about ROW_PIECE
# rows, and the slots take the bands' first pieces in turn, then their second pieces, and so on, so
# that every contiguous block of slots (a thread's) takes its share of every band.
ROW_PIECE = 16
ROW_BANDS = 8


@njit(cache=True, inline="always")
def _ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


@njit(cache=True, inline="always")
def _row_layout(h: int) -> tuple[int, int, int]:
    """(bands, pieces per band, slots per piece) of h rows: as many bands (up to ROW_BANDS) as
    hold 4 pieces each; an image of fewer than 4 pieces' rows is one band."""
    bands = max(1, min(ROW_BANDS, h // (4 * ROW_PIECE)))
    per_band = max(1, _ceil_div(h, bands * ROW_PIECE))
    return bands, per_band, _ceil_div(_ceil_div(h, bands), per_band)


@njit(cache=True, inline="always")
def row_slots(h: int) -> int:
    """The prange length that `spread_row` maps onto h rows."""
    bands, per_band, slots = _row_layout(h)
    return bands * per_band * slots


@njit(cache=True, inline="always")
def spread_row(i: int, h: int) -> int:
    """Row of prange slot i, or -1 (a slot of a shorter piece)."""
    bands, per_band, slots = _row_layout(h)
    q = i // slots
    band = q % bands
    piece = q // bands
    start = band * h // bands
    size = (band + 1) * h // bands - start
    row = start + piece * size // per_band + i % slots
    return row if row < start + (piece + 1) * size // per_band else -1


@njit(cache=True, fastmath=True, parallel=True, nogil=True)
def ref_window_stats(ref: np.ndarray, half: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each pixel's sampled matching window in the reference."""
    h, w = ref.shape
    mean = np.zeros((h, w), np.float32)
    std = np.zeros((h, w), np.float32)
    span = half * step
    for i in prange(row_slots(h)):
        v = spread_row(i, h)
        if v < span or v >= h - span:  # -1 included
            continue
        for u in range(span, w - span):
            mean[v, u], std[v, u] = window_stats(ref, u, v, half, step)
    return mean, std


@njit(cache=True, fastmath=True)
def window_stats(ref: np.ndarray, u: int, v: int, half: int, step: int) -> tuple[float, float]:
    """Mean and standard deviation of the sampled matching window around reference pixel (u, v)."""
    span = half * step
    n = (2 * half + 1) ** 2
    s = 0.0
    ss = 0.0
    for dy in range(-span, span + 1, step):
        for dx in range(-span, span + 1, step):
            val = ref[v + dy, u + dx]
            s += val
            ss += val * val
    m = s / n
    return m, np.sqrt(max(ss / n - m * m, 0.0))


@njit(cache=True, fastmath=True)
def source_costs(
    u: int,
    v: int,
    depth: float,
    nx: float,
    ny: float,
    nz: float,
    ref: np.ndarray,
    ref_mean: float,
    ref_std: float,
    srcs: np.ndarray,
    src_hw: np.ndarray,
    A: np.ndarray,
    b: np.ndarray,
    geo: np.ndarray,
    geo_P: np.ndarray,
    geo_weight: float,
    geo_max: float,
    kinv: np.ndarray,
    half: int,
    step: int,
    sources: int,
    costs: np.ndarray,
) -> None:
    """Each source's 1 - NCC for plane (depth, n) at pixel (u, v), in costs[s] for the sources whose
    bit is set in `sources` (SKIPPED for the others; INVALID_COST for all when the plane faces away)."""
    rx = kinv[0, 0] * u + kinv[0, 1] * v + kinv[0, 2]
    ry = kinv[1, 1] * v + kinv[1, 2]
    c = depth * (nx * rx + ny * ry + nz)  # n . X with X = depth * r
    if c > -1e-12:  # the plane must face the camera (n . X < 0)
        costs[:] = INVALID_COST
        return
    # m = Kinv^T n / c
    m0 = (kinv[0, 0] * nx) / c
    m1 = (kinv[0, 1] * nx + kinv[1, 1] * ny) / c
    m2 = (kinv[0, 2] * nx + kinv[1, 2] * ny + nz) / c
    span = half * step
    count = (2 * half + 1) ** 2
    n_src = srcs.shape[0]
    for s in range(n_src):
        if not (sources >> s) & 1:
            costs[s] = SKIPPED
            continue
        sh = src_hw[s, 0]
        sw = src_hw[s, 1]
        # y(x) = A x + b (m . x): linear in x, so centre value plus per-pixel increments.
        mc = m0 * u + m1 * v + m2
        y0 = A[s, 0, 0] * u + A[s, 0, 1] * v + A[s, 0, 2] + b[s, 0] * mc
        y1 = A[s, 1, 0] * u + A[s, 1, 1] * v + A[s, 1, 2] + b[s, 1] * mc
        y2 = A[s, 2, 0] * u + A[s, 2, 1] * v + A[s, 2, 2] + b[s, 2] * mc
        gx0 = A[s, 0, 0] + b[s, 0] * m0
        gx1 = A[s, 1, 0] + b[s, 1] * m0
        gx2 = A[s, 2, 0] + b[s, 2] * m0
        gy0 = A[s, 0, 1] + b[s, 0] * m1
        gy1 = A[s, 1, 1] + b[s, 1] * m1
        gy2 = A[s, 2, 1] + b[s, 2] * m1
        # Over a window of a few pixels the homography is affine to within a tiny fraction of a
        # pixel (its perspective term changes by gx2 * span / y2, ~1e-3): samples step by the
        # Jacobian at the window's centre, no division per sample.
        if y2 <= 1e-9:
            costs[s] = INVALID_COST
            continue
        iz = 1.0 / y2
        pcx = y0 * iz
        pcy = y1 * iz
        jxx = (gx0 - pcx * gx2) * iz
        jyx = (gx1 - pcy * gx2) * iz
        jxy = (gy0 - pcx * gy2) * iz
        jyy = (gy1 - pcy * gy2) * iz
        ex = (abs(jxx) + abs(jxy)) * span
        ey = (abs(jyx) + abs(jyy)) * span
        if pcx - ex < 0.0 or pcy - ey < 0.0 or pcx + ex >= sw - 1.001 or pcy + ey >= sh - 1.001:
            costs[s] = INVALID_COST
            continue
        src = srcs[s]
        sum_s = 0.0
        sum_ss = 0.0
        sum_rs = 0.0
        sx = jxx * step
        sy = jyx * step
        for dy in range(-span, span + 1, step):
            px = pcx + jxy * dy - jxx * span
            py = pcy + jyy * dy - jyx * span
            for dx in range(-span, span + 1, step):
                x0 = int(px)
                y0i = int(py)
                fx = px - x0
                fy = py - y0i
                top = src[y0i, x0] + (src[y0i, x0 + 1] - src[y0i, x0]) * fx
                bottom = src[y0i + 1, x0] + (src[y0i + 1, x0 + 1] - src[y0i + 1, x0]) * fx
                val = top + (bottom - top) * fy
                sum_s += val
                sum_ss += val * val
                sum_rs += val * ref[v + dy, u + dx]
                px += sx
                py += sy
        mean_s = sum_s / count
        var_s = sum_ss / count - mean_s * mean_s
        if var_s <= 1e-10:
            costs[s] = INVALID_COST
            continue
        ncc = (sum_rs / count - ref_mean * mean_s) / (ref_std * np.sqrt(var_s))
        costs[s] = 1.0 - min(1.0, max(-1.0, ncc))
        if geo.shape[0]:
            costs[s] += geo_weight * _reprojection_error(geo[s], geo_P[s], pcx, pcy, u, v, geo_max)


@njit(cache=True, fastmath=True, parallel=True, nogil=True)
def agreeing_sources(
    depth: np.ndarray, A: np.ndarray, b: np.ndarray, geo: np.ndarray, geo_P: np.ndarray, within: float
) -> np.ndarray:
    """Per reference pixel with a depth: how many sources' own depth maps bring it back within
    `within` pixels (the forward-backward error of `_reprojection_error`)."""
    h, w = depth.shape
    count = np.zeros((h, w), np.uint8)
    for i in prange(row_slots(h)):
        v = spread_row(i, h)
        if v < 0:
            continue
        for u in range(w):
            d = depth[v, u]
            if d <= 0:
                continue
            for s in range(A.shape[0]):
                y0 = d * (A[s, 0, 0] * u + A[s, 0, 1] * v + A[s, 0, 2]) + b[s, 0]
                y1 = d * (A[s, 1, 0] * u + A[s, 1, 1] * v + A[s, 1, 2]) + b[s, 1]
                y2 = d * (A[s, 2, 0] * u + A[s, 2, 1] * v + A[s, 2, 2]) + b[s, 2]
                if y2 <= 1e-9:
                    continue
                if _reprojection_error(geo[s], geo_P[s], y0 / y2, y1 / y2, u, v, 2 * within) < within:
                    count[v, u] += 1
    return count


@njit(cache=True, fastmath=True)
def _reprojection_error(
    src_depth: np.ndarray, P: np.ndarray, x: float, y: float, u: int, v: int, most: float
) -> float:
    """Forward-backward error in reference pixels: the source's own depth at (x, y), back into
    the reference through P (3 x 4: ref pixel ~ depth * P[:, :3] (x, y, 1) + P[:, 3]); `most`
    where (x, y) is outside the source, the source has no depth there or the error is larger."""
    if x < -0.5 or y < -0.5:
        return most
    xi = int(x + 0.5)
    yi = int(y + 0.5)
    if yi >= src_depth.shape[0] or xi >= src_depth.shape[1]:
        return most
    d = src_depth[yi, xi]
    if d <= 0:
        return most
    p0 = d * (P[0, 0] * xi + P[0, 1] * yi + P[0, 2]) + P[0, 3]
    p1 = d * (P[1, 0] * xi + P[1, 1] * yi + P[1, 2]) + P[1, 3]
    p2 = d * (P[2, 0] * xi + P[2, 1] * yi + P[2, 2]) + P[2, 3]
    if p2 <= 1e-9:
        return most
    du = p0 / p2 - u
    dv = p1 / p2 - v
    return min(most, np.sqrt(du * du + dv * dv))


@njit(cache=True, fastmath=True)
def mean_of_best(costs: np.ndarray, best_k: int) -> float:
    """Mean of the best_k smallest costs among the evaluated sources (sorts `costs` in place)."""
    n_src = costs.shape[0]
    for i in range(1, n_src):  # insertion sort on a handful of values
        key = costs[i]
        j = i - 1
        while j >= 0 and costs[j] > key:
            costs[j + 1] = costs[j]
            j -= 1
        costs[j + 1] = key
    total = 0.0
    k = 0
    for i in range(min(best_k, n_src)):
        if costs[i] == SKIPPED:
            break
        total += costs[i]
        k += 1
    return total / k if k else INVALID_COST


@njit(cache=True, fastmath=True)
def _cheapest_sources(costs: np.ndarray, keep: int) -> int:
    """Bit mask of the `keep` sources with the smallest costs (unsorted `costs`, one per source)."""
    n_src = costs.shape[0]
    if keep >= n_src:
        return (1 << n_src) - 1
    chosen = 0
    for _ in range(keep):
        best = -1
        for s in range(n_src):
            if not (chosen >> s) & 1 and (best < 0 or costs[s] < costs[best]):
                best = s
        chosen |= 1 << best
    return chosen


# Counter-based random numbers: a pixel's draws in one kernel call are a hash of the call's salt,
# the pixel and the draw's index, so they do not depend on which thread ran the pixel or what it
# ran before. np.random in a parallel kernel draws from one state per thread, and which rows a
# thread gets varies from run to run: PatchMatch was not repeatable, even seeded.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(cache=True, inline="always")
def _mix(x: np.uint64) -> np.uint64:
    """splitmix64's finaliser: every input bit flips about half of the output bits."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(cache=True, inline="always")
def _pixel_stream(salt: int, v: int, u: int) -> np.uint64:
    return _mix(np.uint64(salt) ^ _mix(np.uint64(v) * _GOLDEN + np.uint64(u)))


@njit(cache=True, inline="always")
def _uniform(stream: np.uint64, k: int) -> float:
    """The k-th draw of a pixel's stream, uniform in (0, 1)."""
    x = _mix(stream + np.uint64(k + 1) * _GOLDEN)
    return (float(x >> np.uint64(11)) + 0.5) * (1.0 / 9007199254740992.0)


@njit(cache=True, inline="always")
def _normal(stream: np.uint64, k: int) -> float:
    """A standard normal from draws k and k + 1 (Box-Muller)."""
    return np.sqrt(-2.0 * np.log(_uniform(stream, k))) * np.cos(2.0 * np.pi * _uniform(stream, k + 1))


@njit(cache=True, fastmath=True)
def _random_normal(rx: float, ry: float, stream: np.uint64, k: int) -> tuple[float, float, float]:
    """A random unit normal facing the camera along ray (rx, ry, 1), not grazing (draws k, k + 1, ...)."""
    while True:
        nx = _normal(stream, k)
        ny = _normal(stream, k + 2)
        nz = _normal(stream, k + 4)
        k += 6
        norm = np.sqrt(nx * nx + ny * ny + nz * nz)
        if norm < 1e-6:
            continue
        nx /= norm
        ny /= norm
        nz /= norm
        dot = (nx * rx + ny * ry + nz) / np.sqrt(rx * rx + ry * ry + 1.0)
        if dot > 0:
            nx, ny, nz, dot = -nx, -ny, -nz, -dot
        if dot < -0.1:
            return nx, ny, nz


@njit(cache=True, fastmath=True, parallel=True, nogil=True)
def initialise(
    depth: np.ndarray,
    normal: np.ndarray,
    cost: np.ndarray,
    randomise: bool,
    ref: np.ndarray,
    ref_mean: np.ndarray,
    ref_std: np.ndarray,
    srcs: np.ndarray,
    src_hw: np.ndarray,
    A: np.ndarray,
    b: np.ndarray,
    geo: np.ndarray,
    geo_P: np.ndarray,
    geo_weight: float,
    geo_max: float,
    kinv: np.ndarray,
    dmin: float,
    dmax: float,
    half: int,
    step: int,
    best_k: int,
    selection: np.ndarray,
    keep: int,
    trusted_cost: float,
    salt: int,
) -> None:
    """Random planes (when `randomise`, or where the given depth is 0; drawn from `salt`) and their
    costs over all sources. A pixel's `selection` (bit mask of the sources its sweeps score)
    becomes the `keep` sources that match its plane best where that plane costs at most
    `trusted_cost`, else all."""
    h, w = ref.shape
    span = half * step
    n_src = srcs.shape[0]
    every_source = (1 << n_src) - 1
    inv_lo = 1.0 / dmax
    inv_hi = 1.0 / dmin
    for i in prange(row_slots(h)):
        v = spread_row(i, h)
        if v < 0:
            continue
        costs = np.empty(n_src)
        for u in range(w):
            selection[v, u] = every_source
            if v < span or u < span or v >= h - span or u >= w - span or ref_std[v, u] <= 0:
                depth[v, u] = 0.0
                cost[v, u] = INVALID_COST
                continue
            rx = kinv[0, 0] * u + kinv[0, 1] * v + kinv[0, 2]
            ry = kinv[1, 1] * v + kinv[1, 2]
            if randomise or depth[v, u] <= 0:
                stream = _pixel_stream(salt, v, u)
                depth[v, u] = 1.0 / (inv_lo + _uniform(stream, 0) * (inv_hi - inv_lo))
                nx, ny, nz = _random_normal(rx, ry, stream, 1)
                normal[v, u, 0] = nx
                normal[v, u, 1] = ny
                normal[v, u, 2] = nz
            source_costs(
                u, v, depth[v, u], normal[v, u, 0], normal[v, u, 1], normal[v, u, 2],
                ref, ref_mean[v, u], ref_std[v, u], srcs, src_hw, A, b, geo, geo_P, geo_weight, geo_max, kinv,
                half, step, every_source, costs,
            )  # fmt: skip
            best = _cheapest_sources(costs, keep)
            cost[v, u] = mean_of_best(costs, best_k)
            if cost[v, u] <= trusted_cost:  # a plane that fails the bar ranks its sources by chance
                selection[v, u] = best


@njit(cache=True, fastmath=True, parallel=True, nogil=True)
def sweep(
    colour: int,
    depth: np.ndarray,
    normal: np.ndarray,
    cost: np.ndarray,
    ref: np.ndarray,
    ref_mean: np.ndarray,
    ref_std: np.ndarray,
    srcs: np.ndarray,
    src_hw: np.ndarray,
    A: np.ndarray,
    b: np.ndarray,
    geo: np.ndarray,
    geo_P: np.ndarray,
    geo_weight: float,
    geo_max: float,
    kinv: np.ndarray,
    dmin: float,
    dmax: float,
    half: int,
    step: int,
    best_k: int,
    selection: np.ndarray,
    far: int,
    depth_range: float,
    normal_range: float,
    trials: int,
    salt: int,
) -> None:
    """One red-black half sweep: every pixel of `colour` tries its neighbours' planes (at distance
    1, and at `far` when far > 1), then `trials` random refinements (a perturbed depth, a perturbed
    normal, both; drawn from `salt`); keeps the cheapest."""
    h, w = ref.shape
    n_src = srcs.shape[0]
    offsets = np.array(
        [[0, -1], [0, 1], [-1, 0], [1, 0], [0, -far], [0, far], [-far, 0], [far, 0]], dtype=np.int64
    )
    n_off = 8 if far > 1 else 4
    for i in prange(row_slots(h)):
        v = spread_row(i, h)
        if v < 0:
            continue
        costs = np.empty(n_src)
        tried = np.empty((n_off + 1, 4))  # planes already scored at this pixel: nx, ny, nz, c
        for u in range((v + colour) % 2, w, 2):
            if ref_std[v, u] <= 0:  # border or textureless: no hypothesis is testable
                continue
            rx = kinv[0, 0] * u + kinv[0, 1] * v + kinv[0, 2]
            ry = kinv[1, 1] * v + kinv[1, 2]
            best_d = float(depth[v, u])
            best_nx = float(normal[v, u, 0])
            best_ny = float(normal[v, u, 1])
            best_nz = float(normal[v, u, 2])
            best_c = float(cost[v, u])
            sources = int(selection[v, u])
            # Propagation copies planes, and a refined level starts with 2x2 blocks of one plane:
            # many neighbours offer a plane this pixel has (or has just scored). Scoring it again
            # cannot win, so it is skipped (equal up to float32 storage of the depth).
            tried[0, 0], tried[0, 1], tried[0, 2] = best_nx, best_ny, best_nz
            tried[0, 3] = best_d * (best_nx * rx + best_ny * ry + best_nz)
            n_tried = 1
            for k in range(n_off):
                qv = v + offsets[k, 0]
                qu = u + offsets[k, 1]
                if qv < 0 or qu < 0 or qv >= h or qu >= w or depth[qv, qu] <= 0:
                    continue
                nx = float(normal[qv, qu, 0])
                ny = float(normal[qv, qu, 1])
                nz = float(normal[qv, qu, 2])
                qrx = kinv[0, 0] * qu + kinv[0, 1] * qv + kinv[0, 2]
                qry = kinv[1, 1] * qv + kinv[1, 2]
                c = depth[qv, qu] * (nx * qrx + ny * qry + nz)
                denom = nx * rx + ny * ry + nz
                if abs(denom) < 1e-9:
                    continue
                d = c / denom  # the neighbour's plane at this pixel
                if d < 0.5 * dmin or d > 2.0 * dmax:
                    continue
                if _already_tried(tried, n_tried, nx, ny, nz, c):
                    continue
                tried[n_tried, 0], tried[n_tried, 1], tried[n_tried, 2], tried[n_tried, 3] = nx, ny, nz, c
                n_tried += 1
                source_costs(
                    u, v, d, nx, ny, nz, ref, ref_mean[v, u], ref_std[v, u], srcs, src_hw, A, b,
                    geo, geo_P, geo_weight, geo_max, kinv, half, step, sources, costs,
                )  # fmt: skip
                cc = mean_of_best(costs, best_k)
                if cc < best_c:
                    best_c, best_d, best_nx, best_ny, best_nz = cc, d, nx, ny, nz
            if best_d <= 0:
                continue
            # Random refinement: perturbed depth, perturbed normal, both.
            stream = _pixel_stream(salt, v, u)
            pd = best_d * (1.0 + depth_range * (2.0 * _uniform(stream, 0) - 1.0))
            pnx = best_nx + normal_range * _normal(stream, 1)
            pny = best_ny + normal_range * _normal(stream, 3)
            pnz = best_nz + normal_range * _normal(stream, 5)
            norm = np.sqrt(pnx * pnx + pny * pny + pnz * pnz)
            pnx /= norm
            pny /= norm
            pnz /= norm
            if (pnx * rx + pny * ry + pnz) / np.sqrt(rx * rx + ry * ry + 1.0) > -0.1:
                pnx, pny, pnz = best_nx, best_ny, best_nz
            base_d, base_nx, base_ny, base_nz = best_d, best_nx, best_ny, best_nz
            for t in range(trials):
                d = base_d if t == 1 else pd
                nx = base_nx if t == 0 else pnx
                ny = base_ny if t == 0 else pny
                nz = base_nz if t == 0 else pnz
                if d < 0.5 * dmin or d > 2.0 * dmax:
                    continue
                source_costs(
                    u, v, d, nx, ny, nz, ref, ref_mean[v, u], ref_std[v, u], srcs, src_hw, A, b,
                    geo, geo_P, geo_weight, geo_max, kinv, half, step, sources, costs,
                )  # fmt: skip
                cc = mean_of_best(costs, best_k)
                if cc < best_c:
                    best_c, best_d, best_nx, best_ny, best_nz = cc, d, nx, ny, nz
            depth[v, u] = best_d
            normal[v, u, 0] = best_nx
            normal[v, u, 1] = best_ny
            normal[v, u, 2] = best_nz
            cost[v, u] = best_c


@njit(cache=True, fastmath=True)
def _already_tried(tried: np.ndarray, n: int, nx: float, ny: float, nz: float, c: float) -> bool:
    for i in range(n):
        if (
            tried[i, 0] == nx
            and tried[i, 1] == ny
            and tried[i, 2] == nz
            and abs(tried[i, 3] - c) <= 1e-5 * abs(c)
        ):
            return True
    return False


@njit(cache=True, fastmath=True, parallel=True, nogil=True)
def upsample_planes(
    depth: np.ndarray, normal: np.ndarray, kinv_coarse: np.ndarray, kinv_fine: np.ndarray, h: int, w: int
) -> tuple[np.ndarray, np.ndarray]:
    """Planes of a coarse level onto a finer grid: each fine pixel takes the plane of its nearest
    coarse pixel, evaluated along its own ray (not the coarse depth: slanted surfaces stay slanted)."""
    hc, wc = depth.shape
    out_d = np.zeros((h, w), np.float32)
    out_n = np.zeros((h, w, 3), np.float32)
    sy = hc / h
    sx = wc / w
    for i in prange(row_slots(h)):
        v = spread_row(i, h)
        if v < 0:
            continue
        for u in range(w):
            cv_ = min(hc - 1, int((v + 0.5) * sy))
            cu = min(wc - 1, int((u + 0.5) * sx))
            d = depth[cv_, cu]
            if d <= 0:
                continue
            nx = normal[cv_, cu, 0]
            ny = normal[cv_, cu, 1]
            nz = normal[cv_, cu, 2]
            crx = kinv_coarse[0, 0] * cu + kinv_coarse[0, 1] * cv_ + kinv_coarse[0, 2]
            cry = kinv_coarse[1, 1] * cv_ + kinv_coarse[1, 2]
            c = d * (nx * crx + ny * cry + nz)
            rx = kinv_fine[0, 0] * u + kinv_fine[0, 1] * v + kinv_fine[0, 2]
            ry = kinv_fine[1, 1] * v + kinv_fine[1, 2]
            denom = nx * rx + ny * ry + nz
            fd = c / denom if abs(denom) > 1e-9 else d
            out_d[v, u] = fd if 0.5 * d < fd < 2.0 * d else d
            out_n[v, u, 0] = nx
            out_n[v, u, 1] = ny
            out_n[v, u, 2] = nz
    return out_d, out_n
