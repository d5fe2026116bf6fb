"""Dense depth on the CPU by PatchMatch multi-view stereo (see patchmatch_kernel for the method).

Coarse to fine: random planes at 1/4 of the depth grid converge in a few sweeps (few pixels,
large windows in world terms), then each finer level starts from the planes of the one below
and only refines. Precision therefore follows the photos: at the finest level the window is a
few pixels of the photo itself. The numba kernels use every core of the machine for one view at
a time; `depth_for_view` takes one small picklable task and writes that view's file, so views can
as well be fanned out over processes or machines. Run here, a helper thread reads the next view
and writes the last one while the kernels run (`run_overlapped`).

Then, once every view has its depth, a geometric-consistency pass (`geometric_planes`, COLMAP's
second pass) runs the views again at full size, from their own planes, with their sources' depth
maps in the cost: a second round of the same per-view tasks, which read the first round's files.

Output: the same per-view npz as estimate_depth (fill and fuse run unchanged); `confidence` is
1 - cost (mean NCC of the best sources).
"""

from __future__ import annotations

import itertools
import shutil
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.stage import Progress, StopCheck, check_stop
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.dense import patchmatch_kernel as kernel
from scandrop.pipeline.dense.dense_views import DenseView, stereo_views
from scandrop.pipeline.dense.estimate_depth import (
    DepthConfig,
    DepthResult,
    read_grid_mask,
    read_photo,
    run_views,
    view_normal_filter,
    write_depth_file,
)
from scandrop.pipeline.dense.view_map import ViewMapper, view_done
from scandrop.pipeline.dense.view_selection import mvs_sources

# The kernels' geometric-consistency arguments (source depth maps, their projections into the
# reference, weight, most error) for a photometric-only pass.
NO_GEOMETRY = (np.zeros((0, 1, 1), np.float32), np.zeros((0, 3, 4)), 0.0, 0.0)
# COLMAP's defaults (geom_consistency_regularizer, geom_consistency_max_cost): a source whose own
# depth map disagrees by 3 px or more adds 0.9 to that source's 1 - NCC (which lies in 0..2).
GEOMETRIC_WEIGHT = 0.3
GEOMETRIC_MAX_ERROR = 3.0
PHOTOMETRIC_SHARE = 0.6  # of the stage's progress, when a geometric pass follows


@dataclass(frozen=True)
class DepthTask:
    """Everything one view's depth needs; plain data, so it pickles to another process or host."""

    ref: DenseView
    sources: tuple[DenseView, ...]
    image_dir: Path
    mask_path: Path | None
    out_path: Path
    config: DepthConfig
    max_cost: float  # the cost bar of the depth it writes (kept_cost)
    wide_baseline: bool = False  # its sources lie beyond config.max_angle_deg (view_selection)
    # The photometric pass's depth files of every view: set, the task is the view's geometric pass.
    prior_dir: Path | None = None

    @property
    def photo_names(self) -> tuple[str, ...]:
        return (self.ref.name, *(s.name for s in self.sources))

    @property
    def prior_names(self) -> tuple[str, ...]:
        """The depth files (in prior_dir) the geometric pass reads: its own view's, its sources'."""
        return () if self.prior_dir is None else tuple(f"{name}.npz" for name in self.photo_names)


@dataclass(frozen=True)
class ViewImages:
    """A reference photo and its sources as PatchMatch reads them: grey levels (0-255) on their
    depth grids, intrinsics with OpenCV pixel centres, poses source-from-reference (R, t)."""

    ref_gray: np.ndarray
    ref_K: np.ndarray
    src_grays: list[np.ndarray]
    src_Ks: list[np.ndarray]
    rel_poses: list[tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class PlaneMaps:
    depth: np.ndarray  # (H, W) float32 camera z, 0 = none
    normal: np.ndarray  # (H, W, 3) float32 camera frame, facing the camera
    cost: np.ndarray  # (H, W) float32 mean of the best sources' 1 - NCC


def scaled_intrinsics(K: np.ndarray, scale: float) -> np.ndarray:
    """K of an image resized by `scale`, pixel centres on integers (OpenCV)."""
    out = K.astype(np.float64).copy()
    out[0, 0] *= scale
    out[1, 1] *= scale
    out[0, 1] *= scale
    out[0, 2] = (K[0, 2] + 0.5) * scale - 0.5
    out[1, 2] = (K[1, 2] + 0.5) * scale - 0.5
    return out


def depth_range(ref: DenseView) -> tuple[float, float] | None:
    """Depths to search, from the sparse points the view sees (with a margin); None with too few."""
    z = (ref.points @ ref.R.T + ref.t)[:, 2] if len(ref.points) else np.zeros(0)
    z = z[z > 0]
    if len(z) < 5:
        return None
    lo, hi = np.percentile(z, [1, 99])
    return float(lo * 0.75), float(hi * 1.33)


def selected_sources(best_k: int, sources: int) -> int:
    """How many of its sources a pixel's cost averages: best_k, but always fewer than the view has.

    With no more sources than best_k there is nothing to select, and a pixel counts only where
    every source sees it: each view of the 3-photo barn has 2 sources, each pair of its photos
    shares a different part of the building, and 34% of its pixels kept a depth (44% with the best
    1 of 2). Fusion still needs another view's depth map to agree with each point."""
    return max(1, min(best_k, sources - 1))


def patchmatch_planes(
    images: ViewImages, dmin: float, dmax: float, config: DepthConfig, seed: int = 0
) -> PlaneMaps:
    """Depth and normal of every reference pixel, coarse to fine."""
    salts = kernel_salts(seed)
    levels = config.pm_levels
    half, step = config.pm_window_half, config.pm_window_step
    best_k = selected_sources(config.pm_best_k, len(images.src_grays))
    depth = normal = cost = kinv_prev = None
    # One pixel of disparity in relative depth at full size; a level's pixel is 1 / scale of those.
    one_px_full = _depth_per_pixel(images.ref_K[0, 0], images.rel_poses, dmin, dmax)
    for level in range(levels - 1, -1, -1):
        scale = 0.5**level
        ref, kinv, ref_mean, ref_std, stack, src_hw, A, b = _level(images, scale, config)
        h, w = ref.shape
        if depth is None:
            depth = np.zeros((h, w), np.float32)
            normal = np.zeros((h, w, 3), np.float32)
            randomise, iterations = True, config.pm_iterations_coarse
        else:
            depth, normal = kernel.upsample_planes(depth, normal, kinv_prev, kinv, h, w)
            randomise, iterations = False, config.pm_iterations_fine
        cost = np.empty((h, w), np.float32)
        selection = np.empty((h, w), np.uint16)
        sources = (stack, src_hw, A, b, *NO_GEOMETRY)
        args = (ref, ref_mean, ref_std, *sources, kinv, dmin, dmax, half, step, best_k, selection)
        # A refining level starts from planes that are nearly right: where one already passes the
        # cost bar, the sources it matches best are the pixel's sources for the level (its best_k
        # and one spare), and the sweeps score only those.
        keep = len(images.src_grays) if randomise else best_k + 1
        kernel.initialise(depth, normal, cost, randomise, *args, keep, config.pm_max_cost, next(salts))
        if not randomise:
            rescue(depth, normal, cost, args, config, salts)
        for it in range(iterations):
            # Perturbations shrink with the iterations. Refining levels start from planes good to
            # about a pixel of the level below: their neighbours' planes and one depth perturbation
            # of half a pixel of disparity do (a rendered 779x520 view: median depth error 0.035% ->
            # 0.024% of the depth, and 14% fewer windows scored, than with two perturbations of 2%
            # of the depth and of the normal).
            if randomise:
                schedule = searching(config, it)
            else:
                schedule = (1, 0.5 * one_px_full / scale * 0.5**it, 0.0, 1)
            for colour in (0, 1):
                kernel.sweep(colour, depth, normal, cost, *args, *schedule, next(salts))
        kinv_prev = kinv
    return PlaneMaps(depth=depth, normal=normal, cost=cost)


def _level(images: ViewImages, scale: float, config: DepthConfig) -> tuple[np.ndarray, ...]:
    """One pyramid level's kernel inputs: the reference, its Kinv and window statistics (no
    texture: deviation 0), the source stack with each source's size, and the plane warps."""
    ref = _resize(images.ref_gray, scale)
    kinv = np.linalg.inv(scaled_intrinsics(images.ref_K, scale))
    stack, src_hw = source_stack([_resize(g, scale) for g in images.src_grays])
    A, b = plane_warps(kinv, [scaled_intrinsics(Ks, scale) for Ks in images.src_Ks], images.rel_poses)
    ref_mean, ref_std = kernel.ref_window_stats(ref, config.pm_window_half, config.pm_window_step)
    ref_std[ref_std < config.min_texture] = 0.0
    return ref, kinv, ref_mean, ref_std, stack, src_hw, A, b


def geometric_planes(
    images: ViewImages,
    dmin: float,
    dmax: float,
    config: DepthConfig,
    own: tuple[np.ndarray, np.ndarray, np.ndarray],
    src_depths: list[np.ndarray],
    seed: int = 0,
) -> PlaneMaps:
    """The geometric-consistency pass at full size (COLMAP's second PatchMatch pass), from the
    view's photometric planes `own` (depth, normals, cost; depth 0 = none, a random plane there):
    each source's cost adds GEOMETRIC_WEIGHT x its forward-backward error in reference pixels (at
    most GEOMETRIC_MAX_ERROR), read from that source's photometric depth map (`src_depths`, on its
    depth grid), so a pixel prefers the plane its sources' own depth maps agree with. With
    `config.pm_geometric_within` > 0, pixels that already agree that closely with as many sources
    as they count (best_k) keep their plane and are not searched: the pass costs what the rest
    costs. The returned cost is photometric only: the stage's cost bar means the same with and
    without this pass."""
    salts = kernel_salts(seed)
    half, step = config.pm_window_half, config.pm_window_step
    best_k = selected_sources(config.pm_best_k, len(images.src_grays))
    ref, kinv, ref_mean, ref_std, stack, src_hw, A, b = _level(images, 1.0, config)
    geometry = (source_stack(src_depths)[0], ref_projections(A, b))
    within = config.pm_geometric_within
    settled = np.zeros(own[0].shape, bool)
    if within > 0:
        settled = kernel.agreeing_sources(own[0], A, b, *geometry, within) >= best_k
    depth = np.array(own[0], np.float32)
    normal = np.array(own[1], np.float32)
    cost = np.array(own[2], np.float32)
    searched = np.where(settled, 0.0, ref_std).astype(np.float32)  # a deviation of 0: skipped
    selection = np.empty(depth.shape, np.uint16)

    def kernel_args(geo: tuple) -> tuple:
        """The kernels' arguments with these geometric-consistency ones (NO_GEOMETRY: none)."""
        sources = (stack, src_hw, A, b, *geo)
        return (ref, ref_mean, searched, *sources, kinv, dmin, dmax, half, step, best_k, selection)

    args = kernel_args((*geometry, GEOMETRIC_WEIGHT, GEOMETRIC_MAX_ERROR))
    trusted = config.pm_max_cost + GEOMETRIC_WEIGHT
    kernel.initialise(depth, normal, cost, False, *args, best_k + 1, trusted, next(salts))
    depth[settled], normal[settled] = own[0][settled], own[1][settled]  # initialise cleared them
    one_px = _depth_per_pixel(images.ref_K[0, 0], images.rel_poses, dmin, dmax)
    for it in range(config.pm_geometric_sweeps):
        for colour in (0, 1):
            kernel.sweep(colour, depth, normal, cost, *args, 1, 0.5 * one_px * 0.5**it, 0.0, 1, next(salts))
    photometric = kernel_args(NO_GEOMETRY)
    kernel.initialise(
        depth.copy(), normal.copy(), cost, False, *photometric, best_k + 1, config.pm_max_cost, next(salts)
    )
    cost[settled] = own[2][settled]
    return PlaneMaps(depth=depth, normal=normal, cost=cost)


def ref_projections(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(S, 3, 4) per source: reference pixel ~ depth x P[:, :3] (x, y, 1) + P[:, 3] for a source
    pixel (x, y) at that source's depth. The plane warps (plane_warps, at full size) map the other
    way, source pixel ~ depth x A (u, v, 1) + b, so P = [A^-1, -A^-1 b]."""
    inverse = np.linalg.inv(A)
    return np.concatenate([inverse, -(inverse @ b[:, :, None])], axis=2)


def searching(config: DepthConfig, it: int) -> tuple[int, float, float, int]:
    """A searching sweep's (far neighbour distance, depth and normal perturbation ranges, trials):
    the coarsest level's, and a refining level's rescue; the perturbations halve each sweep."""
    return config.pm_far, 0.2 * 0.5**it, 0.4 * 0.5**it, 3


def rescue(
    depth: np.ndarray,
    normal: np.ndarray,
    cost: np.ndarray,
    args: tuple[Any, ...],
    config: DepthConfig,
    salts: Iterator[int],
) -> None:
    """On a refining level, the pixels whose upsampled plane fails the cost bar search again as on
    the coarsest level (far neighbours, large perturbations). `args` are the level's kernel
    arguments as patchmatch_planes builds them (ref, ref_mean, ref_std, ...); the pixels that pass
    get a window deviation of 0 here, which the sweeps skip.

    A plane that a coarse level got wrong is more than a pixel off, out of reach of the refining
    sweeps' half-pixel steps. Where a coarse window mixes a thin band with what lies behind it
    (the dark underside of the relief object above its bright plate), the band kept the plate's
    depth or none: on the lower ring's photos, 35-62% of that band's pixels had a depth within
    0.25% of the object's size; with one rescue sweep 54-81%, with two 65-91%. Each sweep costs
    the kitchen's depth maps about a fifth more time, and adds 9% of their pixels (75% -> 84%)."""
    ref, ref_mean, ref_std = args[:3]
    lost_std = np.where(cost > config.pm_max_cost, ref_std, 0.0).astype(np.float32)
    lost_args = (ref, ref_mean, lost_std, *args[3:])
    for it in range(config.pm_rescue_sweeps):
        for colour in (0, 1):
            kernel.sweep(colour, depth, normal, cost, *lost_args, *searching(config, it), next(salts))


def source_stack(grays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The source images in one zero-padded (S, H + 1, W + 1) stack (the spare row and column keep
    bilinear reads in bounds) and each one's (h, w): the kernels' layout."""
    hmax = max(g.shape[0] for g in grays)
    wmax = max(g.shape[1] for g in grays)
    stack = np.zeros((len(grays), hmax + 1, wmax + 1), np.float32)
    for i, g in enumerate(grays):
        stack[i, : g.shape[0], : g.shape[1]] = g
    return stack, np.array([g.shape for g in grays], np.int64)


def plane_warps(
    kinv: np.ndarray, src_Ks: list[np.ndarray], rel_poses: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """A_s = K_s R_s Kinv and b_s = K_s t_s of each source: the plane homographies' parts
    (patchmatch_kernel), from source-from-reference poses."""
    A = np.array([Ks @ R @ kinv for (R, _), Ks in zip(rel_poses, src_Ks, strict=True)], np.float64)
    b = np.array([Ks @ t for (_, t), Ks in zip(rel_poses, src_Ks, strict=True)], np.float64)
    return A, b


def relative_pose(ref: DenseView, src: DenseView) -> tuple[np.ndarray, np.ndarray]:
    """Source-from-reference (R, t)."""
    R = src.R @ ref.R.T
    return R, src.t - R @ ref.t


def _depth_per_pixel(
    focal: float, rel_poses: list[tuple[np.ndarray, np.ndarray]], dmin: float, dmax: float
) -> float:
    """Relative depth change that moves a point by one pixel of disparity in the median source, at
    the middle of the search range: z / (f B). A fixed relative range (it was 2%) is several pixels
    on a wide baseline and a fraction of one on a narrow one."""
    baseline = float(np.median([np.linalg.norm(t) for _, t in rel_poses]))
    if baseline <= 0:  # sources at the reference's centre: no disparity to scale by
        return 0.02
    return float(np.sqrt(dmin * dmax)) / (focal * baseline)


def kernel_salts(seed: int) -> Iterator[int]:
    """A salt for each kernel call of a run, from which the call draws its random planes and
    perturbations (patchmatch_kernel): a run's result depends on the seed, not on the threads."""
    return ((seed * 1_000_003 + n) % 2**63 for n in itertools.count())


def _resize(gray: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        # A writable copy: the cached greys are read-only, and numba compiles every kernel again
        # for a read-only array type (the first job compiled the finest level twice).
        return np.array(gray, dtype=np.float32, order="C")
    h, w = gray.shape
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    return cv2.resize(gray.astype(np.float32), size, interpolation=cv2.INTER_AREA)


# Undistorted grey photos of recent views: each photo is a source of about pm_sources other views,
# and undistorting it (its remap grid from COLMAP's camera model) costs more than reading it.
_GREYS: OrderedDict[tuple, np.ndarray] = OrderedDict()
GREY_CACHE_BYTES = 256 * 2**20


def grey_on_grid(
    view: DenseView,
    image_dir: Path,
    photo: np.ndarray | None = None,
    maps: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """The view's photo in grey levels (float32) on its depth grid, from this process's cache when
    the same file (path, size, mtime) was resampled onto the same grid before."""
    path = image_dir / view.name
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, view.grid_size, view.camera_params, view.K.tobytes())
    grey = _GREYS.get(key)
    if grey is not None:
        _GREYS.move_to_end(key)
        return grey
    if photo is None:
        photo = read_photo(path)
    grey = view.undistort(cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY), maps=maps).astype(np.float32)
    grey.flags.writeable = False  # shared by the views that use it
    _GREYS[key] = grey
    while sum(g.nbytes for g in _GREYS.values()) > GREY_CACHE_BYTES:
        _GREYS.popitem(last=False)
    return grey


@dataclass(frozen=True)
class ViewInputs:
    """What one view's kernels read from disk: its depth range, photo, undistortion maps, the grey
    photos, and in the geometric pass the first pass's planes of the view and its sources."""

    bounds: tuple[float, float]
    photo: np.ndarray
    maps: tuple[np.ndarray, np.ndarray]
    images: ViewImages
    priors: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None


def read_view(task: DepthTask) -> ViewInputs | None:
    """The view's inputs; None when too few sparse points bound its search (no depth map then)."""
    ref = task.ref
    bounds = depth_range(ref)
    if bounds is None:
        return None
    photo = read_photo(task.image_dir / ref.name)
    maps = ref.grid_map()
    ref_gray = grey_on_grid(ref, task.image_dir, photo, maps)
    src_grays = [grey_on_grid(src, task.image_dir) for src in task.sources]
    rel = [relative_pose(ref, src) for src in task.sources]
    images = ViewImages(ref_gray, ref.K, src_grays, [src.K for src in task.sources], rel)
    priors = None
    if task.prior_dir is not None:
        priors = [_prior(task.prior_dir / name, g.shape) for name, g in
                  zip(task.prior_names, [ref_gray, *src_grays], strict=True)]  # fmt: skip
    return ViewInputs(bounds, photo, maps, images, priors)


def view_planes(task: DepthTask, inputs: ViewInputs | None) -> PlaneMaps | None:
    """The view's planes: the photometric pass, or the geometric one where the task has priors
    (None for a view read_view found nothing to search in)."""
    if inputs is None:
        return None
    dmin, dmax = inputs.bounds
    if inputs.priors is None:
        return patchmatch_planes(inputs.images, dmin, dmax, task.config)
    own, *sources = inputs.priors
    return geometric_planes(inputs.images, dmin, dmax, task.config, own, [p[0] for p in sources])


def write_view(task: DepthTask, inputs: ViewInputs | None, planes: PlaneMaps | None) -> tuple[str, float]:
    """The view's depth file from its planes, to task.out_path. Returns (name, valid share)."""
    ref = task.ref
    if inputs is None or planes is None:
        return ref.name, 0.0
    dmin, dmax = inputs.bounds
    depth = planes.depth.copy()
    depth[(planes.cost > task.max_cost) | (depth < dmin) | (depth > dmax)] = 0.0
    mask = read_grid_mask(ref, task.mask_path, inputs.maps)
    if mask is not None:
        depth[~mask] = 0.0
    normals = planes.normal.copy()
    depth = view_normal_filter(depth, normals, ref, task.config.max_grazing_deg)
    normals[depth <= 0] = 0.0
    conf = np.where(depth > 0, 1.0 - planes.cost, 0.0).astype(np.float32)
    rgb = cv2.cvtColor(ref.undistort(inputs.photo, maps=inputs.maps), cv2.COLOR_BGR2RGB)
    write_depth_file(task.out_path, ref, depth, normals, conf, rgb, mask)
    return ref.name, float(np.mean(depth > 0))


def depth_for_view(task: DepthTask) -> tuple[str, float]:
    """PatchMatch depth of one view, written to task.out_path. Returns (name, valid share)."""
    inputs = read_view(task)
    return write_view(task, inputs, view_planes(task, inputs))


def run_overlapped(tasks: list[DepthTask], progress: Progress, should_stop: StopCheck) -> list[float]:
    """The views one after another, each on all cores, while a helper thread reads the next view
    and writes the last one: the kernels release the GIL, and reading, undistorting and writing,
    one core's work, took about a sixth of the kitchen's depth stage. Same files as depth_for_view."""
    shares: list[float] = []
    if not tasks:
        return shares
    with ThreadPoolExecutor(1, thread_name_prefix="depth-io") as helper:
        ahead = helper.submit(read_view, tasks[0])
        writing: Future | None = None
        for k, task in enumerate(tasks):
            check_stop(should_stop)
            inputs = ahead.result()
            if k + 1 < len(tasks):
                ahead = helper.submit(read_view, tasks[k + 1])
            planes = view_planes(task, inputs)
            if writing is not None:
                shares.append(_written(writing, len(shares), len(tasks), progress))
            writing = helper.submit(write_view, task, inputs, planes)
        if writing is not None:
            shares.append(_written(writing, len(shares), len(tasks), progress))
    return shares


def _written(writing: Future, done: int, total: int, progress: Progress) -> float:
    name, share = writing.result()
    view_done(progress, done + 1, total, name)
    return share


def _prior(path: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A view's photometric depth, normals and cost (1 - confidence; where no depth: the worst);
    none (zeros) where the view got no depth file."""
    worst = kernel.INVALID_COST
    if not path.exists():
        none = np.zeros(shape, np.float32)
        return none, np.zeros((*shape, 3), np.float32), np.full(shape, worst, np.float32)
    with np.load(path) as data:
        depth = data["depth"]
        return depth, data["normals"], np.where(depth > 0, 1.0 - data["confidence"], worst).astype(np.float32)


def kept_cost(config: DepthConfig, views: int) -> float:
    """The cost bar a depth pixel must meet to be written, for a set of this many photos; the
    search itself (which pixels are rescued) keeps pm_max_cost.

    In a few photos far apart (the 7-photo NLE tower: photo 0 has no other within 59 degrees), true
    matches are seen at wide angles and in other light, and their NCC is lower; fusion's
    cross-check, not this bar, then keeps the precision. Dense captures keep pm_max_cost: a bar of
    0.7 on the relief sphere's 24 photos cost 0.6 dB of held-out PSNR, with no gain in the kitchen's
    share of a photo explained."""
    return config.pm_max_cost_few if views <= config.few_views else config.pm_max_cost


def plan_tasks(views: list[DenseView], config: DepthConfig, ws: Workspace) -> list[DepthTask]:
    """One task per view that has source views."""
    sources, wide = mvs_sources(
        views, config.pm_sources, config.min_angle_deg, config.max_angle_deg, config.lone_max_angle_deg
    )
    bar = kept_cost(config, len(views))
    tasks = []
    for i, (view, chosen) in enumerate(zip(views, sources, strict=True)):
        if not chosen:
            continue
        mask = ws.mask_for(view.name)
        tasks.append(
            DepthTask(
                ref=view,
                sources=tuple(views[j] for j in chosen),
                image_dir=ws.images_dir,
                mask_path=mask if mask.exists() else None,
                out_path=ws.depth_dir / f"{view.name}.npz",
                config=config,
                max_cost=bar,
                wide_baseline=i in wide,
            )
        )
    return tasks


def run(
    config: DepthConfig,
    ws: Workspace,
    progress: Progress,
    should_stop: StopCheck,
    map_views: ViewMapper | None = None,
) -> DepthResult:
    """PatchMatch depth for every registered view; here one view at a time, all cores per view, or
    fanned out through `map_views`."""
    start = time.monotonic()
    check_stop(should_stop)
    progress(0.0, "reading the cameras")
    views = stereo_views(ws.sparse_dir, config.max_image_size)
    ws.fresh_depth_dir()
    tasks = plan_tasks(views, config, ws)
    if not tasks:
        raise ScandropError(
            ErrorCode.dense_failed,
            "No view has neighbours suitable for stereo (too little overlap or too little parallax).",
            "Take photos around the object, each a small step (about 10 degrees) from the last.",
        )
    geometric = config.pm_geometric_sweeps > 0
    prior_dir = ws.depth_dir / "photometric"
    shutil.rmtree(prior_dir, ignore_errors=True)
    if geometric:  # the photometric pass writes its maps aside; the geometric pass reads them
        prior_dir.mkdir()
        tasks = [replace(t, out_path=prior_dir / t.out_path.name) for t in tasks]
    share = PHOTOMETRIC_SHARE if geometric else 1.0
    fractions, nodes = run_views(
        depth_for_view, tasks, 1, lambda f, m: progress(share * f, m), should_stop, map_views, run_overlapped
    )
    if geometric:
        tasks = [replace(t, out_path=ws.depth_dir / t.out_path.name, prior_dir=prior_dir) for t in tasks]
        fractions, nodes = run_views(
            depth_for_view,
            tasks,
            1,
            lambda f, m: progress(share + (1 - share) * f, f"consistency {m}"),
            should_stop,
            map_views,
            run_overlapped,
        )
        shutil.rmtree(prior_dir)
    if float(np.mean(fractions)) < 1e-3:
        raise ScandropError(
            ErrorCode.dense_failed,
            "Multi-view stereo found no reliable depth in the photos.",
            "Photograph a textured object in good light; plain, shiny or see-through surfaces cannot match.",
        )
    return DepthResult(
        views=len(views),
        views_with_depth=sum(f > 0 for f in fractions),
        mean_valid_fraction=round(float(np.mean(fractions)), 4),
        seconds=round(time.monotonic() - start, 2),
        nodes=nodes,
        wide_baseline_views=[t.ref.name for t in tasks if t.wide_baseline],
        max_cost=tasks[0].max_cost,
    )
