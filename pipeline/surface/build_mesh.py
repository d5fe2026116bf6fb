"""Stage: fused points -> coloured triangle mesh (ws.mesh).

Screened Poisson (COLMAP's `poisson_meshing`) closes the surface, at an octree depth that follows
the fused points' spacing and the depth maps' pixels (a finest cell of about two of the coarser,
capped by `depth`); Poisson also invents surface where there were no points (holes, the far side of
a scene), so faces far from any fused point and small floating pieces are removed. The mesh is then
decimated by quadric edge collapse (fast-simplification: 1 s for 1M -> 300k faces on this 2-core
box, where pycolmap's `simplify_mesh` took 6-7 s), moved onto what the photos say at their full
resolution (`refine_mesh`: fused depth and Poisson both smooth), and its vertices re-coloured from
the nearest fused points, because decimation loses colour.

pycolmap runs in a child interpreter: Poisson segfaults on some inputs, and a crash must become
a `mesh_failed` error, not a silently dead job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import fast_simplification
import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field
from scipy import sparse
from scipy.spatial import cKDTree

from scandrop.pipeline.core import plyio
from scandrop.pipeline.core.cpu_budget import usable_cpus
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.pointcloud import PointCloud, load_points
from scandrop.pipeline.core.stage import Progress, StopCheck, check_stop
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.dense.estimate_depth import read_depth_camera
from scandrop.pipeline.surface import refine_mesh

_MIN_POINTS = 100
# Poisson says nothing until it is done (9 s on the kitchen, 31 s on the synthetic scene): the
# stage says how long it has been running instead, so the page never sits silent.
HEARTBEAT_SECONDS = 2.0


class MeshConfig(BaseModel):
    """How the mesh is built. Defaults are the balanced preset."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    depth: int = Field(
        9, ge=5, le=12, description="Deepest Poisson octree level (the fixed level when adaptive is off)."
    )
    adaptive: bool = Field(
        True,
        description="Pick the Poisson depth from the fused points' spacing (see cell_spacings), up to"
        " `depth`: the mesh is as fine as the points, not finer.",
    )
    min_depth: int = Field(7, ge=5, le=12, description="Shallowest Poisson depth the adaptive choice uses.")
    cell_spacings: float = Field(
        2.0,
        ge=0.5,
        le=8.0,
        description="Adaptive depth: finest Poisson cell in spacings, the coarser of the points' and"
        " the depth maps' pixels' (finer cells hold too few points, and the density trim then removes"
        " true surface).",
    )
    trim: float = Field(7.0, ge=0.0, le=20.0, description="COLMAP density trim: drop low-density surface.")
    point_weight: float = Field(1.0, ge=0.0, description="Screened Poisson point interpolation weight.")
    max_distance_factor: float = Field(
        3.0, gt=0.0, description="Drop faces farther from every fused point than this x the point spacing."
    )
    min_component_fraction: float = Field(
        0.005, ge=0.0, lt=1.0, description="Drop connected pieces with fewer faces than this share of all."
    )
    thin_cells: float = Field(
        0.5,
        ge=0.0,
        le=4.0,
        description="Average the points in voxels of this many Poisson cells before Poisson (0: off);"
        " Poisson time follows the point count and finer points do not refine the surface.",
    )
    refine: bool = Field(
        True,
        description="Move the vertices to where the photos agree best, at the photos' full resolution"
        " (see refine_mesh), after decimation.",
    )
    max_triangles: int = Field(300_000, ge=100, description="Decimate the mesh to at most this many faces.")
    border_rings: int = Field(
        2,
        ge=0,
        le=8,
        description="Remove the faces that touch a vertex fewer than this many edges from an open border"
        " of the finished mesh (0: keep them): past the last points the density trim cuts Poisson's"
        " extrapolation, which bulges outward (see erode_borders).",
    )
    num_threads: int = Field(-1, description="Threads for Poisson (-1: every usable core).")
    child_timeout_s: float = Field(1800.0, gt=0, description="Give up on one pycolmap call after this long.")


class MeshResult(BaseModel):
    poisson_depth: int
    vertices: int
    triangles: int
    poisson_triangles: int
    removed_far_triangles: int
    removed_small_component_triangles: int
    removed_border_triangles: int = 0
    decimated: bool
    refined: refine_mesh.RefineStats | None = None
    seconds: dict[str, float]


def _run_child(
    kind: str,
    src: Path,
    dst: Path,
    options: dict,
    config: MeshConfig,
    should_stop: StopCheck,
    waiting: Callable[[float], None],
) -> None:
    """Run one pycolmap call in a child interpreter; its crash or failure raises mesh_failed.
    `waiting(seconds)` hears every HEARTBEAT_SECONDS how long the call has run."""
    code = f"from scandrop.pipeline.surface.poisson_child import main; main({os.getpid()})"
    log = dst.with_suffix(".log")
    with open(log, "wb") as log_fh:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, kind, str(src), str(dst), json.dumps(options)],
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Spinning OpenMP threads slow Poisson 4-10x when the cores are shared (measured).
            env={**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")},
        )
        start = heard = time.monotonic()
        try:
            while True:
                try:
                    proc.wait(timeout=0.25)
                    break
                except subprocess.TimeoutExpired:
                    check_stop(should_stop)
                    if time.monotonic() - heard >= HEARTBEAT_SECONDS:
                        heard = time.monotonic()
                        waiting(heard - start)
                    if time.monotonic() - start > config.child_timeout_s:
                        raise ScandropError(
                            ErrorCode.mesh_failed,
                            f"Meshing step '{kind}' took longer than {config.child_timeout_s:.0f} s.",
                            "Use a lower Poisson depth or the fast preset.",
                        ) from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode != 0 or not dst.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        how = f"crashed (signal {-proc.returncode})" if proc.returncode < 0 else f"failed ({proc.returncode})"
        structlog.get_logger("scandrop.mesh").error("colmap_failed", step=kind, how=how, log_tail=tail)
        raise ScandropError(
            ErrorCode.mesh_failed,
            f"Building the surface failed ({kind} {how}).",
            "The dense points may be too few or too noisy to mesh; try more photos with more overlap.",
        )


def _check_cloud(cloud: PointCloud) -> PointCloud:
    """Keep finite points with unit normals; Poisson on empty or normal-less input segfaults."""
    if len(cloud) == 0:
        raise ScandropError(
            ErrorCode.mesh_failed,
            "There are no dense points to mesh.",
            "Dense reconstruction found no surface; check the photos overlap.",
        )
    norm = np.linalg.norm(cloud.normals, axis=1)
    ok = np.isfinite(cloud.xyz).all(axis=1) & np.isfinite(norm) & (norm > 0.5)
    if ok.sum() < _MIN_POINTS:
        raise ScandropError(
            ErrorCode.mesh_failed,
            f"Only {int(ok.sum())} dense points have a position and normal; {_MIN_POINTS} are needed.",
            "Dense reconstruction found too little surface; take more photos around the object.",
        )
    return PointCloud(xyz=cloud.xyz[ok], normals=cloud.normals[ok] / norm[ok, None], rgb=cloud.rgb[ok])


def _sample(xyz: np.ndarray, size: int) -> np.ndarray:
    """At most `size` of the points, drawn the same way every run (medians on them, for speed)."""
    return xyz[np.random.default_rng(0).choice(len(xyz), size=min(size, len(xyz)), replace=False)]


def median_spacing(xyz: np.ndarray, tree: cKDTree, sample: int = 20_000) -> float:
    """Median distance from a point to its nearest neighbour (on a random sample, for speed)."""
    dist, _ = tree.query(_sample(xyz, sample), k=2, workers=-1)
    return float(np.median(dist[:, 1]))


def photo_spacing(xyz: np.ndarray, depth_dir: Path, sample: int = 20_000) -> float:
    """Median over a sample of points of the finest spacing at which a depth map samples the
    surface there (depth / focal length, in that map's pixels; 0 without depth maps).

    Points fused from many views interleave more closely than any one photo samples: on the
    rendered 640x480 scene their nearest-neighbour spacing was 0.56-0.63 of this, and from it
    quality picked Poisson depth 10, whose cells of about one pixel hold too few points: the density
    trim cut true surface (mesh F 0.980 and held-out PSNR 27.9 dB, against 0.992 and 31.7 dB at 9)."""
    files = sorted(depth_dir.glob("*.npz"))
    if not files or len(xyz) == 0:
        return 0.0
    points = _sample(xyz, sample).astype(np.float64)
    finest = np.full(len(points), np.inf)
    for path in files:
        K, R, t, (height, width) = read_depth_camera(path)
        cam = points @ R.T + t
        z = cam[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = K[0, 0] * cam[:, 0] / z + K[0, 2]
            v = K[1, 1] * cam[:, 1] / z + K[1, 2]
        seen = (z > 0) & (u >= 0) & (v >= 0) & (u < width) & (v < height)
        finest[seen] = np.minimum(finest[seen], z[seen] / K[0, 0])
    seen = np.isfinite(finest)
    return float(np.median(finest[seen])) if seen.any() else 0.0


def poisson_depth(extent: float, spacing: float, config: MeshConfig) -> int:
    """The octree depth whose finest cell (box = 1.1 x extent) is about `cell_spacings` spacings
    (run passes the coarser of the points' and the photos'), within [min_depth, depth]: finer cells
    only add triangles the points cannot support."""
    if spacing <= 0 or extent <= 0:
        return config.depth
    wanted = int(np.ceil(np.log2(1.1 * extent / (config.cell_spacings * spacing))))
    return int(min(config.depth, max(min(config.min_depth, config.depth), wanted)))


def thin(cloud: PointCloud, voxel: float) -> PointCloud:
    """One point per occupied voxel: mean position and colour, normalised mean normal."""
    if voxel <= 0:
        return cloud
    xyz = cloud.xyz.astype(np.float64)
    cell = np.floor((xyz - xyz.min(axis=0)) / voxel).astype(np.int64)
    dims = cell.max(axis=0) + 1
    key = (cell[:, 0] * dims[1] + cell[:, 1]) * dims[2] + cell[:, 2]
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    n = len(counts)

    def mean(values: np.ndarray) -> np.ndarray:
        out = np.stack([np.bincount(inverse, values[:, i], minlength=n) for i in range(3)], axis=1)
        return out / counts[:, None]

    normals = mean(cloud.normals.astype(np.float64))
    norm = np.linalg.norm(normals, axis=1)
    ok = norm > 0.3  # voxels whose normals cancel out (thin walls seen from both sides) are dropped
    return PointCloud(
        xyz=mean(xyz)[ok].astype(np.float32),
        normals=(normals[ok] / norm[ok, None]).astype(np.float32),
        rgb=np.clip(np.rint(mean(cloud.rgb.astype(np.float64))[ok]), 0, 255).astype(np.uint8),
    )


def _compact(vertices: np.ndarray, faces: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep the faces in mask `keep` and only the vertices they use."""
    faces = faces[keep]
    used = np.unique(faces)
    remap = np.full(len(vertices), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return vertices[used], remap[faces]


def erode_borders(vertices: np.ndarray, faces: np.ndarray, rings: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The mesh without the faces that touch a vertex fewer than `rings` edges from an open border.

    Every open border of our mesh is a cut through Poisson's closed surface (density trim, far
    faces), so the faces there are its extrapolation past the last points, not the points. On the
    relief sphere (balanced, 2026-12-05) the vertices 0-2 rings from the border sat a median
    0.05-0.08% of the object's size outside the true surface (10% of those on it over 0.2%), those 4
    or more rings in 0.00%. A mesh that would lose half its faces (a strip a few rings wide) is left
    whole: eroding it would remove what little surface there is. Returns (vertices, faces, faces
    removed)."""
    if rings <= 0 or len(faces) == 0:
        return vertices, faces, 0
    n = len(vertices)
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1).astype(np.int64)
    keys, counts = np.unique(edges[:, 0] * n + edges[:, 1], return_counts=True)
    a, b = keys // n, keys % n
    near = np.zeros(n, dtype=bool)
    near[a[counts == 1]] = near[b[counts == 1]] = True
    adjacency = sparse.csr_matrix((np.ones(len(keys), np.int8), (a, b)), shape=(n, n))
    adjacency = (adjacency + adjacency.T).tocsr()
    for _ in range(rings - 1):
        near |= (adjacency @ near.astype(np.int8)) > 0
    keep = ~near[faces].any(axis=1)
    if keep.sum() < len(faces) // 2:
        return vertices, faces, 0
    vertices, kept = _compact(vertices, faces, keep)
    return vertices, kept, len(faces) - len(kept)


def _component_face_counts(n_vertices: int, faces: np.ndarray) -> np.ndarray:
    """Size (in faces) of the connected component each face belongs to."""
    rows = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2]])
    cols = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0]])
    graph = sparse.coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n_vertices,) * 2)
    _, labels = sparse.csgraph.connected_components(graph, directed=False)
    face_label = labels[faces[:, 0]]
    return np.bincount(face_label)[face_label]


def decimate(vertices: np.ndarray, faces: np.ndarray, max_triangles: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric decimation to at most `max_triangles`, keeping hole outlines when that reaches it."""
    faces32 = faces.astype(np.int32)
    for preserve_border in (True, False):
        v, f = fast_simplification.simplify(
            vertices, faces32, target_count=max_triangles, preserve_border=preserve_border
        )
        if len(f) <= max_triangles:
            break
    if len(f) > max_triangles:
        raise ScandropError(
            ErrorCode.mesh_failed,
            f"Decimation stopped at {len(f)} triangles, above the limit of {max_triangles}.",
            "Raise max_triangles or lower the Poisson depth.",
        )
    return _compact(v.astype(np.float64), f.astype(np.int64), np.ones(len(f), dtype=bool))


def recolour(vertices: np.ndarray, tree: cKDTree, rgb: np.ndarray, k: int = 4) -> np.ndarray:
    """Vertex colours as the inverse-distance-weighted mean of the k nearest fused points."""
    k = min(k, len(rgb))
    dist, idx = tree.query(vertices, k=k, workers=-1)
    dist, idx = dist.reshape(len(vertices), k), idx.reshape(len(vertices), k)
    w = 1.0 / np.maximum(dist, 1e-12)
    w /= w.sum(axis=1, keepdims=True)
    col = (rgb[idx].astype(np.float64) * w[..., None]).sum(axis=1)
    return np.clip(np.rint(col), 0, 255).astype(np.uint8)


def run(config: MeshConfig, ws: Workspace, progress: Progress, should_stop: StopCheck) -> MeshResult:
    """Mesh ws.fused into ws.mesh; raises mesh_failed when there is nothing real to mesh."""
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if not ws.fused.exists():
        raise ScandropError(
            ErrorCode.mesh_failed, "The dense point cloud is missing.", "Run the dense stages first."
        )
    cloud = _check_cloud(load_points(ws.fused))
    tree = cKDTree(cloud.xyz)
    check_stop(should_stop)
    extent = float(np.ptp(cloud.xyz, axis=0).max())
    spacing = median_spacing(cloud.xyz, tree)
    # The mesh is no finer than the points and no finer than the photos sample the surface.
    sampled = max(spacing, photo_spacing(cloud.xyz, ws.depth_dir))
    depth = poisson_depth(extent, sampled, config) if config.adaptive else config.depth
    progress(0.02, f"Meshing {len(cloud)} points (Poisson depth {depth})")

    with tempfile.TemporaryDirectory(dir=ws.root, prefix=".mesh-") as tmp_name:
        tmp = Path(tmp_name)
        src, poisson_out = tmp / "points.ply", tmp / "poisson.ply"
        cell = 1.1 * extent / 2**depth  # Poisson's finest cell (COLMAP pads the box by 1.1)
        sparse_cloud = thin(cloud, config.thin_cells * cell)
        if len(sparse_cloud) < _MIN_POINTS:
            sparse_cloud = cloud
        seconds["thin"] = time.perf_counter() - t0
        tp = time.perf_counter()
        plyio.write_ply(src, plyio.points_vertex(sparse_cloud.xyz, sparse_cloud.normals, sparse_cloud.rgb))
        options = {
            "depth": depth,
            # COLMAP's trim is an absolute density level (octree depth of the samples): near the
            # octree depth itself it removes true surface too (at depth 7, trim 7 kept nothing of a
            # 6500-point test cloud), so it stays two levels below the depth.
            "trim": min(config.trim, max(0.0, depth - 2.0)),
            "color": True,
            "point_weight": config.point_weight,
            "num_threads": config.num_threads if config.num_threads > 0 else usable_cpus(),
        }
        said = f"Poisson surface (depth {depth}) from {len(sparse_cloud)} points"
        _run_child(
            "poisson",
            src,
            poisson_out,
            options,
            config,
            should_stop,
            lambda seconds: progress(0.02, f"{said}: {seconds:.0f} s so far"),
        )
        mesh = plyio.read_ply(poisson_out)
        seconds["poisson"] = time.perf_counter() - tp
        progress(0.6, f"Poisson surface: {len(mesh.faces)} triangles")
        check_stop(should_stop)

        t1 = time.perf_counter()
        vertices = plyio.xyz_of(mesh.vertex).astype(np.float64)
        faces = mesh.faces
        poisson_triangles = len(faces)
        faces = faces[
            (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
        ]
        # Poisson's smallest cell: faces closer than a cell to the points are not invented.
        limit = config.max_distance_factor * max(spacing, cell)
        dist, _ = tree.query(vertices[faces].mean(axis=1), distance_upper_bound=limit, workers=-1)
        near = np.isfinite(dist)
        removed_far = int((~near).sum())
        vertices, faces = _compact(vertices, faces, near)
        if len(faces) == 0:
            raise ScandropError(
                ErrorCode.mesh_failed,
                "Poisson produced no surface near the dense points.",
                "The dense points may be too sparse; take more photos.",
            )
        sizes = _component_face_counts(len(vertices), faces)
        big = sizes >= config.min_component_fraction * len(faces)
        removed_small = int((~big).sum())
        vertices, faces = _compact(vertices, faces, big)
        seconds["clean"] = time.perf_counter() - t1
        progress(0.7, f"Kept {len(faces)} triangles near the points")
        check_stop(should_stop)

        t2 = time.perf_counter()
        decimated = len(faces) > config.max_triangles
        if decimated:
            progress(0.72, f"Decimating {len(faces)} to {config.max_triangles} triangles")
            vertices, faces = decimate(vertices, faces, config.max_triangles)
        seconds["decimate"] = time.perf_counter() - t2
        refined = None
        if config.refine:
            tr = time.perf_counter()
            vertices, refined = refine_mesh.refine(
                vertices,
                faces,
                ws.sparse_dir,
                ws.images_dir,
                lambda f, m: progress(0.75 + 0.2 * f, m),
                should_stop,
            )
            seconds["refine"] = time.perf_counter() - tr
            progress(0.95, f"Refined {refined.measured:.0%} of the vertices against the photos")
            check_stop(should_stop)
        vertices, faces, removed_border = erode_borders(vertices, faces, config.border_rings)

    check_stop(should_stop)

    t3 = time.perf_counter()
    rgb = recolour(vertices, tree, cloud.rgb)
    xyz32 = vertices.astype(np.float32)
    plyio.write_ply(
        ws.mesh,
        plyio.vertex_array(
            {
                "x": xyz32[:, 0],
                "y": xyz32[:, 1],
                "z": xyz32[:, 2],
                "red": rgb[:, 0],
                "green": rgb[:, 1],
                "blue": rgb[:, 2],
            }
        ),
        faces,
        comment="scandrop mesh: screened Poisson, cleaned, decimated, refined, vertex colours",
    )
    seconds["colour_write"] = time.perf_counter() - t3
    seconds["total"] = time.perf_counter() - t0
    progress(1.0, f"Mesh: {len(vertices)} vertices, {len(faces)} triangles")
    return MeshResult(
        poisson_depth=depth,
        vertices=len(vertices),
        triangles=len(faces),
        poisson_triangles=poisson_triangles,
        removed_far_triangles=removed_far,
        removed_small_component_triangles=removed_small,
        removed_border_triangles=removed_border,
        decimated=decimated,
        refined=refined,
        seconds={k: round(v, 3) for k, v in seconds.items()},
    )
