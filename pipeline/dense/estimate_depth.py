"""Per-view depth maps on the CPU: rectified pair stereo (OpenCV semi-global matching), the fast
preset's method; the other presets use PatchMatch multi-view stereo (patchmatch_cpu), which
shares this module's config, file layout and helpers.

Each registered view is matched against one to three partners chosen from sparse covisibility
(see view_selection). The partners' depth maps are merged per pixel: where two agree they are
averaged, where they disagree the pixel is dropped. Normals come from the depth map itself.
Views run in worker processes (one per core) because the numpy parts are single-threaded.

Output per view, ws.depth_dir/<image name>.npz:
    depth (H, W) float32 camera z, 0 = unknown; normals (H, W, 3) float32 camera frame, toward the
    camera; confidence (H, W) float32 in [0, 1]; rgb (H, W, 3) uint8 undistorted colours;
    K (3, 3) pinhole intrinsics of the grid; R, t world-to-camera; scale = grid px per photo px;
    mask (H, W) bool object mask on the grid, only when the photo has one.
"""

from __future__ import annotations

import os
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from scandrop.pipeline.core.child_process import die_with_parent
from scandrop.pipeline.core.cpu_budget import worker_processes
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.stage import Progress, StopCheck, atomic_path, check_stop
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.dense.dense_views import DenseView, stereo_views
from scandrop.pipeline.dense.pair_stereo import SgbmParams, pair_depth
from scandrop.pipeline.dense.view_map import LocalRun, ViewMapper, ViewWork, view_done
from scandrop.pipeline.dense.view_selection import stereo_partners


class DepthConfig(BaseModel):
    """Dense depth settings; the defaults are the `balanced` preset."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_image_size: int = Field(
        1280, ge=160, le=4000, description="Longest side of the depth grid (px; fast 1000, quality 4000)."
    )
    partners: int = Field(4, ge=1, le=4, description="Stereo partners per view (more: fewer holes, slower).")
    min_angle_deg: float = Field(3.0, gt=0, lt=45, description="Smallest triangulation angle of a partner.")
    max_angle_deg: float = Field(40.0, gt=0, le=60, description="Largest triangulation angle of a partner.")
    lone_max_angle_deg: float = Field(
        60.0,
        ge=0,
        le=75,
        description="PatchMatch: a view with no source within max_angle_deg takes sources up to this"
        " angle (few photos far apart) instead of having no depth map; 0 = never.",
    )
    block_size: int = Field(3, ge=3, le=11, description="SGBM matching window (odd, px).")
    uniqueness: int = Field(5, ge=0, le=50, description="SGBM uniqueness margin (%): higher drops ambiguity.")
    max_disparities: int = Field(256, ge=16, le=512, description="Cap on the disparity search range (px).")
    stereo_max_size: int = Field(
        400,
        ge=160,
        le=4000,
        description="Match at most at this longest side (px), then sample back onto the depth grid:"
        " SGBM time falls with the cube of the scale (pixels x disparities), depth precision linearly.",
    )
    mode: Literal["sgbm", "3way", "hh"] = Field(
        "3way", description="SGBM variant: 3way is fastest, hh (8 directions) slowest."
    )
    normalise: bool = Field(False, description="Local contrast normalisation before matching.")
    min_texture: float = Field(1.5, ge=0, description="Drop pixels whose local grey-level std is below this.")
    agree_rel: float = Field(0.01, gt=0, lt=0.2, description="Relative depth difference partners may have.")
    max_grazing_deg: float = Field(80.0, gt=30, le=90, description="Drop pixels seen more obliquely.")
    workers: int = Field(0, ge=0, le=64, description="Worker processes; 0 = one per CPU core.")
    method: Literal["patchmatch", "sgbm"] = Field(
        "patchmatch",
        description="patchmatch: multi-view PatchMatch (precise, exposure-invariant); sgbm: pair stereo"
        " at stereo_max_size (fast, coarse).",
    )
    pm_sources: int = Field(5, ge=1, le=16, description="PatchMatch: source views per reference view.")
    pm_best_k: int = Field(
        2, ge=1, le=16, description="PatchMatch: a pixel's cost is the mean of its best k."
    )
    pm_levels: int = Field(4, ge=1, le=5, description="PatchMatch: pyramid levels (each halves the size).")
    pm_iterations_coarse: int = Field(4, ge=1, le=12, description="PatchMatch: sweeps at the coarsest level.")
    pm_iterations_fine: int = Field(1, ge=1, le=12, description="PatchMatch: sweeps at each finer level.")
    pm_window_half: int = Field(2, ge=1, le=7, description="PatchMatch: window samples each side of a pixel.")
    pm_window_step: int = Field(1, ge=1, le=3, description="PatchMatch: pixels between window samples.")
    pm_far: int = Field(5, ge=1, le=25, description="PatchMatch: distance of the far propagation neighbours.")
    pm_rescue_sweeps: int = Field(
        1,
        ge=0,
        le=8,
        description="PatchMatch: sweeps, on each refining level, in which the pixels whose upsampled"
        " plane fails pm_max_cost search as on the coarsest level (far neighbours, large steps).",
    )
    pm_max_cost: float = Field(
        0.5, gt=0, le=2, description="PatchMatch: drop pixels whose best sources' mean 1 - NCC is above."
    )
    few_views: int = Field(
        12, ge=0, description="PatchMatch: sets of at most this many photos keep depth to pm_max_cost_few."
    )
    pm_max_cost_few: float = Field(
        0.7,
        gt=0,
        le=2,
        description="PatchMatch: the cost bar of the depth written for few photos, which see each"
        " surface from far apart (a true match's NCC is lower there; fusion's cross-check keeps the"
        " precision). The search keeps pm_max_cost.",
    )
    pm_geometric_sweeps: int = Field(
        1,
        ge=0,
        le=8,
        description="PatchMatch: sweeps of the geometric-consistency pass at full size, run once every"
        " view has its photometric depth (0 = none): a source's cost adds how far its own depth map"
        " disagrees.",
    )
    pm_geometric_within: float = Field(
        1.0,
        ge=0,
        le=3,
        description="PatchMatch: in the geometric pass, pixels that best_k sources' own depth maps"
        " bring back within this many pixels keep their plane and are not searched (0: search all).",
    )

    def sgbm(self, grid_size: tuple[int, int]) -> SgbmParams:
        """Matcher settings for a view whose depth grid has this (width, height)."""
        block = self.block_size | 1
        scale = min(1.0, self.stereo_max_size / max(grid_size))
        return SgbmParams(block, self.uniqueness, self.max_disparities, self.mode, scale)


class DepthResult(BaseModel):
    views: int
    views_with_depth: int
    mean_valid_fraction: float
    seconds: float
    nodes: dict[str, str] = Field(
        default_factory=dict, description="Where each view ran (Ray node id), when the views fanned out."
    )
    wide_baseline_views: list[str] = Field(
        default_factory=list,
        description="Views whose sources all lie beyond max_angle_deg (see lone_max_angle_deg).",
    )
    max_cost: float | None = Field(None, description="PatchMatch: the cost bar of the depth written.")


@dataclass(frozen=True)
class _Task:
    ref: DenseView
    partners: tuple[DenseView, ...]
    image_dir: Path
    mask_path: Path | None
    out_path: Path
    config: DepthConfig
    prior_dir: None = None  # pair stereo has one pass
    prior_names: tuple[str, ...] = ()

    @property
    def photo_names(self) -> tuple[str, ...]:
        return (self.ref.name, *(p.name for p in self.partners))


def read_photo(path: Path) -> np.ndarray:
    photo = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if photo is None:
        raise ScandropError(ErrorCode.dense_failed, f"Cannot read image {path.name}.", "Rerun the job.")
    return photo


def normalise_contrast(gray: np.ndarray, sigma: float = 5.0, floor: float = 2.0) -> np.ndarray:
    """Local contrast normalisation, so dark or low-contrast texture matches as well as bright."""
    g = gray.astype(np.float32)
    mean = cv2.GaussianBlur(g, (0, 0), sigma)
    var = cv2.GaussianBlur(g * g, (0, 0), sigma) - mean * mean
    out = (g - mean) / np.sqrt(np.maximum(var, 0.0) + floor * floor)
    return np.clip(out * 40.0 + 128.0, 0, 255).astype(np.uint8)


def texture_strength(gray: np.ndarray, window: int = 7) -> np.ndarray:
    """Local standard deviation of grey levels: where it is ~0 no stereo match can be trusted."""
    g = gray.astype(np.float32)
    mean = cv2.blur(g, (window, window))
    var = cv2.blur(g * g, (window, window)) - mean * mean
    return np.sqrt(np.maximum(var, 0.0))


def depth_normals(depth: np.ndarray, K: np.ndarray, step: int = 2) -> np.ndarray:
    """Camera-frame unit normals facing the camera, from central differences of the depth map."""
    h, w = depth.shape
    u, v = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    z = np.where(depth > 0, depth, np.nan).astype(np.float32)
    pts = np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], axis=-1)
    dx = np.full_like(pts, np.nan)
    dy = np.full_like(pts, np.nan)
    dx[:, step:-step] = pts[:, 2 * step :] - pts[:, : -2 * step]
    dy[step:-step] = pts[2 * step :] - pts[: -2 * step]
    n = np.cross(dx, dy)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    flip = np.sum(n * pts, axis=-1) > 0
    n[flip] *= -1.0
    return np.nan_to_num(n, nan=0.0).astype(np.float32)


def _merge(depths: list[np.ndarray], agree_rel: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel merge of partner depths: mean of the agreeing ones; confidence = share agreeing."""
    stack = np.stack(depths)
    valid = np.isfinite(stack)
    count = valid.sum(axis=0)
    # Median of the valid values (NaN sorts last); np.nanmedian is 10x slower on a few layers.
    ordered = np.sort(stack, axis=0)
    lo = np.take_along_axis(ordered, np.maximum((count - 1) // 2, 0)[None], axis=0)[0]
    hi = np.take_along_axis(ordered, (count // 2)[None], axis=0)[0] if len(depths) > 1 else lo
    med = np.where(count > 0, 0.5 * (lo + hi), np.nan)
    with np.errstate(invalid="ignore"):
        agree = valid & (np.abs(stack - med) <= agree_rel * med)
    n_agree = agree.sum(axis=0)
    total = np.where(agree, stack, 0.0).sum(axis=0)
    depth = np.where(n_agree > 0, total / np.maximum(n_agree, 1), 0.0)
    # Several partners and no two agree: none is trusted.
    depth[(count >= 2) & (n_agree < 2)] = 0.0
    conf = np.where(depth > 0, n_agree / len(depths), 0.0)
    return depth.astype(np.float32), conf.astype(np.float32)


def _view_depth(task: _Task) -> tuple[str, float]:
    """Depth, normals and colours of one view, written to its npz. Returns the valid share."""
    if task.config.workers != 1:
        cv2.setNumThreads(1)
    cfg = task.config
    ref = task.ref
    ref_photo = read_photo(task.image_dir / ref.name)
    ref_gray = cv2.cvtColor(ref_photo, cv2.COLOR_BGR2GRAY)
    maps = ref.grid_map()
    textured = ref.undistort(texture_strength(ref_gray), maps=maps) >= cfg.min_texture
    mask = None
    points, point_ids = ref.points, ref.point_ids
    if task.mask_path is not None:
        mask_img = cv2.imread(str(task.mask_path), cv2.IMREAD_GRAYSCALE)
        if mask_img is not None:
            mask = ref.undistort(mask_img, cv2.INTER_NEAREST, maps) > 127
            uv = ref.camera().img_from_cam(points @ ref.R.T + ref.t, check_cheirality=False)
            ui = np.floor(uv[:, 0]).astype(np.int64)
            vi = np.floor(uv[:, 1]).astype(np.int64)
            inside = (ui >= 0) & (vi >= 0) & (ui < mask_img.shape[1]) & (vi < mask_img.shape[0])
            keep = np.zeros(len(points), bool)
            keep[inside] = mask_img[vi[inside], ui[inside]] > 127
            if keep.sum() >= 10:
                points, point_ids = points[keep], point_ids[keep]
    ref_in = normalise_contrast(ref_gray) if cfg.normalise else ref_gray
    depths = []
    params = cfg.sgbm(ref.grid_size)
    for src in task.partners:
        src_gray = cv2.cvtColor(read_photo(task.image_dir / src.name), cv2.COLOR_BGR2GRAY)
        if cfg.normalise:
            src_gray = normalise_contrast(src_gray)
        # The pair's depth range (hence SGBM's disparity range) from the points both views see.
        shared = np.isin(point_ids, src.point_ids, assume_unique=True)
        d = pair_depth(ref, src, ref_in, src_gray, points[shared] if shared.sum() >= 20 else points, params)
        if d is not None:
            depths.append(d)
    w, h = ref.grid_size
    if depths:
        depth, conf = _merge(depths, cfg.agree_rel)
    else:
        depth, conf = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
    depth[~textured] = 0.0
    if mask is not None:
        depth[~mask] = 0.0
    normals = depth_normals(depth, ref.K)
    depth = view_normal_filter(depth, normals, ref, cfg.max_grazing_deg)
    normals[depth <= 0] = 0.0
    conf[depth <= 0] = 0.0
    rgb = cv2.cvtColor(ref.undistort(ref_photo, maps=maps), cv2.COLOR_BGR2RGB)
    write_depth_file(task.out_path, ref, depth, normals, conf, rgb, mask)
    return ref.name, float(np.mean(depth > 0))


def read_grid_mask(
    ref: DenseView, mask_path: Path | None, maps: tuple[np.ndarray, np.ndarray]
) -> np.ndarray | None:
    """The photo's object mask on the view's depth grid, or None without one."""
    if mask_path is None:
        return None
    mask_img = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    return None if mask_img is None else ref.undistort(mask_img, cv2.INTER_NEAREST, maps) > 127


def view_normal_filter(
    depth: np.ndarray, normals: np.ndarray, ref: DenseView, max_grazing_deg: float
) -> np.ndarray:
    """Depth with pixels dropped that have no normal or are seen more obliquely than the limit."""
    rays = ref.grid_rays()
    cos_view = -np.sum(normals * rays, axis=-1) / np.linalg.norm(rays, axis=-1)
    out = depth.copy()
    out[(cos_view < np.cos(np.radians(max_grazing_deg))) | ~np.any(normals != 0, axis=-1)] = 0.0
    return out


def write_depth_file(
    path: Path,
    ref: DenseView,
    depth: np.ndarray,
    normals: np.ndarray,
    conf: np.ndarray,
    rgb: np.ndarray,
    mask: np.ndarray | None,
) -> None:
    """One view's depth file in the layout of this module's docstring (atomically)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            depth=depth.astype(np.float32),
            normals=normals.astype(np.float32),
            confidence=conf.astype(np.float32),
            rgb=rgb,
            K=ref.K,
            R=ref.R,
            t=ref.t,
            scale=np.float64(ref.scale),
            name=np.str_(ref.name),
            **({"mask": mask} if mask is not None else {}),
        )


def read_depth_camera(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """A depth file's grid camera: K, R, t and the grid's (height, width), without reading its maps
    (write_depth_file stores the arrays uncompressed, one .npy each)."""
    with zipfile.ZipFile(path) as archive:
        K, R, t = (np.lib.format.read_array(archive.open(f"{key}.npy")) for key in ("K", "R", "t"))
        with archive.open("depth.npy") as fh:
            version = np.lib.format.read_magic(fh)
            header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            height, width = header(fh)[0]
    return K, R, t, (height, width)


def _worker_count(config: DepthConfig) -> int:
    return config.workers or worker_processes()


def run(
    config: DepthConfig,
    ws: Workspace,
    progress: Progress,
    should_stop: StopCheck,
    map_views: ViewMapper | None = None,
) -> DepthResult:
    """Compute a depth map for every registered view of the sparse model."""
    start = time.monotonic()
    check_stop(should_stop)
    progress(0.0, "reading the cameras")
    views = stereo_views(ws.sparse_dir, config.max_image_size)
    partners = stereo_partners(views, config.partners, config.min_angle_deg, config.max_angle_deg)
    ws.fresh_depth_dir()
    tasks = []
    for view, chosen in zip(views, partners, strict=True):
        mask = ws.mask_for(view.name)
        tasks.append(
            _Task(
                ref=view,
                partners=tuple(views[j] for j in chosen),
                image_dir=ws.images_dir,
                mask_path=mask if mask.exists() else None,
                out_path=ws.depth_dir / f"{view.name}.npz",
                config=config,
            )
        )
    tasks = [t for t in tasks if t.partners]
    if not tasks:
        raise ScandropError(
            ErrorCode.dense_failed,
            "No pair of views is suitable for stereo (too little overlap or too little parallax).",
            "Take photos around the object, each a small step (about 10 degrees) from the last.",
        )
    fractions, nodes = run_views(_view_depth, tasks, _worker_count(config), progress, should_stop, map_views)
    valid = [f for f in fractions if f > 0]
    if float(np.mean(fractions)) < 1e-3:
        raise ScandropError(
            ErrorCode.dense_failed,
            "Stereo matching found no reliable depth in the photos.",
            "Photograph a textured object in good light; plain, shiny or see-through surfaces cannot match.",
        )
    return DepthResult(
        views=len(views),
        views_with_depth=len(valid),
        mean_valid_fraction=round(float(np.mean(fractions)), 4),
        seconds=round(time.monotonic() - start, 2),
        nodes=nodes,
    )


def run_views(
    work: ViewWork,
    tasks: list[Any],
    workers: int,
    progress: Progress,
    should_stop: StopCheck,
    map_views: ViewMapper | None,
    local: LocalRun | None = None,
) -> tuple[list[float], dict[str, str]]:
    """The views' valid shares and where each ran: through `map_views` when there is one and the job
    has at least its `min_views` views, else here (`local`, by default run_tasks; no placement to
    report)."""
    progress(0.0, f"depth 0/{len(tasks)}: views and their sources chosen")
    if map_views is None or len(tasks) < map_views.min_views:
        if local is not None:
            return local(tasks, progress, should_stop), {}
        return run_tasks(work, tasks, workers, progress, should_stop), {}
    done = map_views.map(work, tasks, progress, should_stop)
    return [d.valid_fraction for d in done], {d.name: d.node for d in done}


@contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Spawned workers start with one BLAS/OpenMP thread each and no spinning: one process per core
    is the parallelism, and spinning BLAS threads on shared cores made numpy 10x slower (measured)."""
    wanted = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    saved = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_tasks(
    work: Callable[[Any], tuple[str, float]],
    tasks: list[Any],
    workers: int,
    progress: Progress,
    should_stop: StopCheck,
) -> list[float]:
    """Run per-view tasks (`work(task) -> (name, valid share)`) in this process or a process pool."""
    fractions: list[float] = []
    total = len(tasks)
    if workers <= 1:
        for task in tasks:
            check_stop(should_stop)
            name, frac = work(task)
            fractions.append(frac)
            view_done(progress, len(fractions), total, name)
        return fractions
    with (
        _single_threaded_children(),
        ProcessPoolExecutor(
            workers, mp_context=get_context("spawn"), initializer=die_with_parent, initargs=(os.getpid(),)
        ) as pool,
    ):
        pending: set[Future] = set()
        queue = list(tasks)
        try:
            while queue or pending:
                while queue and len(pending) < workers * 2:
                    check_stop(should_stop)
                    pending.add(pool.submit(work, queue.pop(0)))
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        name, frac = fut.result()
                    except BrokenProcessPool as exc:  # a worker was killed, most likely out of memory
                        raise ScandropError(
                            ErrorCode.dense_failed,
                            "A depth worker stopped unexpectedly (probably out of memory).",
                            "Use --preset fast or smaller photos, or give the machine more memory.",
                        ) from exc
                    fractions.append(frac)
                    view_done(progress, len(fractions), total, name)
                check_stop(should_stop)
        except BaseException:
            for fut in pending:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return fractions
