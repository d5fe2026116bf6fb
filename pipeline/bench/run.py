"""`scandrop bench`: run the pipeline on known datasets, score it, print one table, write JSON.

Datasets:
- synthetic: a rendered textured scene with exact cameras and surface (always available);
- herzjesu: ../shared/datasets/strecha_herz_jesus_p8, surveyed cameras; compared with a plain
  pycolmap run at the same image size;
- kitchen: ../shared/datasets/vggt_kitchen, timed side by side with a plain pycolmap sparse run;
  the share of each photo the dense points explain, and the texture's PSNR at three registered
  photos it was not baked from (bench/texture_held_out.py);
- room: ../shared/datasets/vggt_room, photos that barely overlap (must fail clearly or say what
  it left out);
- apple: ../shared/datasets/video_cotracker_apple/apple.mp4, a hand-held video arc (>= 90% of the
  kept frames must register);
- video: a rendered orbit clip of 240 frames run at two frame budgets (50 and 200 keyframes): the
  time ratio (target <= 4 for 4x the frames), registered fractions, pose accuracy and the points'
  and mesh's F at 1% against the rendered scene;
- relief: a rendered object with fine relief (bench/relief.py), 24 photos at 1600x1200: points and
  mesh F-score at 1%, 0.5%, 0.25% and 0.125% of its size, wall time against a plain pycolmap
  sparse run on the same photos; held-out views are written beside for texture scoring.
  `relief:seed=1,shape=pebble` is a held-out object of the same kind; views=, width=, height=
  give reduced settings for quick runs;
- fern, sacre_coeur, nle_tower: real sets without ground truth; like kitchen they report the
  share of each photo that the dense points explain (median over registered photos).
- hard captures, by name only (minutes each on a CPU): cake, barn, tower, apple-photos: small
  wide-baseline photo sets SIFT alone cannot connect; the row adds the learned matcher's time.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap
import trimesh

from scandrop.daemon.worker import run_job
from scandrop.models.device import resolve_device
from scandrop.pipeline.bench import appearance, baseline, metrics, relief, synthetic, texture_held_out
from scandrop.pipeline.core.stage import never_stop, no_progress
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.export import export_assets, model_glb
from scandrop.pipeline.job_spec import JobSpec, merge_overrides
from scandrop.pipeline.presets import resolve
from scandrop.pipeline.report import Report

DEFAULT_DATASETS = ["synthetic", "herzjesu", "kitchen", "room", "apple", "video"]
DEFAULT_DATASETS += ["relief", "fern", "sacre_coeur", "nle_tower"]
SHARED_NAMES = {
    "herzjesu": "strecha_herz_jesus_p8",
    "kitchen": "vggt_kitchen",
    "room": "vggt_room",
    "apple": "video_cotracker_apple",
    "fern": "vggt_llff_fern",
    "sacre_coeur": "hloc_sacre_coeur",
    "nle_tower": "mast3r_nle_tower",
}
RELIEF_TAUS = {"1%": 0.01, "0.5%": 0.005, "0.25%": 0.0025, "0.125%": 0.00125}
VIDEO_BUDGETS = (50, 200)
HARD_CAPTURES = {
    "cake": "vggsfm_cake",
    "barn": "instantsplat_tnt_barn_3view",
    "tower": "mast3r_nle_tower",
    "apple-photos": "vggsfm_apple",
}


def default_datasets_dir() -> Path:
    return Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


def estimated_cameras(out_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rec = pycolmap.Reconstruction(str(out_dir / "cameras" / "sparse"))
    cams = {}
    for image_id in rec.reg_image_ids():
        image = rec.images[image_id]
        pose = image.cam_from_world()
        cams[image.name] = (pose.rotation.matrix(), np.asarray(pose.translation))
    return cams


def _centre(r: np.ndarray, t: np.ndarray) -> np.ndarray:
    return -r.T @ t


def score_poses(
    est: dict[str, tuple[np.ndarray, np.ndarray]],
    gt: dict[str, tuple[np.ndarray, np.ndarray]],
) -> dict[str, Any]:
    """Relative rotation errors over camera pairs, centre errors after a similarity alignment."""
    common = sorted(set(est) & set(gt))
    errs = metrics.relative_rotation_errors({n: est[n][0] for n in common}, {n: gt[n][0] for n in common})
    src = np.stack([_centre(*est[n]) for n in common])
    dst = np.stack([_centre(*gt[n]) for n in common])
    centre_err, sim3 = metrics.centre_errors(src, dst)
    extent = float(np.linalg.norm(dst.max(axis=0) - dst.min(axis=0)))
    return {
        "rot_err_median_deg": float(np.median(errs)) if len(errs) else None,
        "rot_err_max_deg": float(np.max(errs)) if len(errs) else None,
        "centre_err_median_rel": float(np.median(centre_err) / extent) if extent > 0 else None,
        "sim3": sim3,
    }


def score_geometry(out_dir: Path, to_gt: metrics.Sim3, gt_points: np.ndarray, tau: float) -> dict[str, float]:
    """Points and mesh samples, mapped into the ground-truth frame, against the true surface."""
    points = to_gt(trimesh.load(out_dir / "points.ply").vertices)
    mesh = trimesh.load(out_dir / "model.glb", force="mesh")
    mesh_pts = to_gt(metrics.sample_mesh(np.asarray(mesh.vertices), np.asarray(mesh.faces), 300_000))
    p_pr, p_re, p_f = metrics.precision_recall_fscore(points, gt_points, tau)
    m_pr, m_re, m_f = metrics.precision_recall_fscore(mesh_pts, gt_points, tau)
    return {
        "points_precision": p_pr,
        "points_recall": p_re,
        "points_f": p_f,
        "mesh_precision": m_pr,
        "mesh_recall": m_re,
        "mesh_f": m_f,
    }


def score_held_out(
    result: Path, work: Path, to_gt: metrics.Sim3, held_out: synthetic.SyntheticScene
) -> dict[str, Any]:
    """PSNR at views the pipeline never saw (rendered with alpha = coverage): the job's model.glb,
    and the same mesh with vertex colours, re-exported from the job's workspace for comparison."""
    cameras = [(held_out.K, r, t) for r, t in zip(held_out.R, held_out.t, strict=True)]
    images = [image[..., :3] for image in held_out.images]
    masks = [image[..., 3] == 255 for image in held_out.images]
    row: dict[str, Any] = {}
    textured = model_glb.load_model(result / "model.glb").moved(to_gt)
    scores = appearance.score_views(textured, cameras, images, masks)
    row["psnr_db"], row["psnr_per_view_db"] = scores["psnr_db"], scores["psnr_per_view_db"]
    row["textured"] = textured.texture is not None
    if work.is_dir() and textured.texture is not None:
        vertex_out = result.parent / "vertex-colours"
        config = export_assets.ExportConfig(texture="vertex", points=False, splats=False, cameras=False)
        export_assets.run(config, Workspace(work), vertex_out, no_progress, never_stop)
        vertex = model_glb.load_model(vertex_out / "model.glb").moved(to_gt)
        row["psnr_vertex_db"] = appearance.score_views(vertex, cameras, images, masks)["psnr_db"]
    glb = result / "model.glb"
    row["glb_mb"] = round(glb.stat().st_size / 2**20, 2)
    return row


def _run_ours(
    images: Path, out: Path, spec: JobSpec, overrides: dict[str, dict[str, Any]] | None = None
) -> Report:
    """One job as the daemon runs it, with a row's own `overrides` on top of the bench's; `seconds`
    becomes the wall time of the whole job process."""
    device = resolve_device("auto")
    t0 = time.perf_counter()
    spec = spec.model_copy(update={"overrides": merge_overrides(spec.overrides, overrides or {})})
    report = run_job(images, out, spec, out / ".work", device.model_dump())
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def _summary(report: Report) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "error": report.error.model_dump(mode="json") if report.error else None,
        "images": report.images.usable,
        "registered": report.images.registered,
        "unregistered": report.images.unregistered,
        "reproj_err_px": report.mean_reprojection_error_px,
        "points": report.points,
        "triangles": report.triangles,
        "splats": report.splats,
        "seconds": report.seconds,
        "peak_rss_mb": report.peak_rss_mb,
        "stages": {s.name: {"seconds": s.seconds, "peak_rss_mb": s.peak_rss_mb} for s in report.stages},
    }


def bench_synthetic(out: Path, spec: JobSpec) -> dict[str, Any]:
    scene = synthetic.render_scene(n_views=24, width=640, height=480, seed=0)
    held_out = synthetic.render_scene(n_views=4, width=640, height=480, seed=0, alpha=True, path="held_out")
    images = out / "images"
    synthetic.write_scene(scene, images)
    report = _run_ours(images, out / "result", spec)
    row = _summary(report)
    if report.ok:
        poses = score_poses(estimated_cameras(out / "result"), scene.cameras())
        row.update(poses)
        row.update(
            score_geometry(out / "result", poses["sim3"], scene.surface_samples(400_000), 0.01 * scene.size)
        )
        row.update(score_held_out(out / "result", out / "result" / ".work", poses.pop("sim3"), held_out))
        row.pop("sim3", None)
    return row


def bench_herzjesu(root: Path, out: Path, spec: JobSpec) -> dict[str, Any]:
    images = root / "images"
    report = _run_ours(images, out / "result", spec)
    row = _summary(report)
    gt = synthetic.load_gt_cameras(root / "gt_cameras.json")
    size = resolve(spec).ingest.max_image_size
    plain = baseline.run_plain_pycolmap(images, out / "plain", max_image_size=size)
    plain_rot = {n: r for n, r in plain.rotation_matrices().items() if n in gt}
    plain_err = metrics.relative_rotation_errors(plain_rot, {n: gt[n][0] for n in plain_rot})
    row["plain_registered"] = plain.registered
    row["plain_rot_err_median_deg"] = float(np.median(plain_err)) if len(plain_err) else None
    if report.ok:
        poses = score_poses(estimated_cameras(out / "result"), gt)
        poses.pop("sim3")
        row.update(poses)
    return row


def bench_kitchen(root: Path, out: Path, spec: JobSpec) -> dict[str, Any]:
    images = root / "images"
    plain = baseline.run_plain_pycolmap(images, out / "plain")
    report = _run_ours(images, out / "result", spec)
    row = _summary(report)
    row["plain_registered"] = plain.registered
    row["plain_seconds"] = plain.seconds.wall
    row["plain_peak_rss_mb"] = plain.peak_rss_mb
    row["time_ratio"] = report.seconds / plain.seconds.wall if plain.seconds.wall else None
    if report.ok:
        row.update(share_explained(out / "result"))
        row.update(texture_held_out.score(out / "result" / ".work", resolve(spec).export))
    return row


def share_explained(out_dir: Path) -> dict[str, Any]:
    """Median over registered photos of the 8x8-pixel cells that points.ply projects into."""
    cams = metrics.transforms_cameras(json.loads((out_dir / "cameras" / "transforms.json").read_text()))
    points = np.asarray(trimesh.load(out_dir / "points.ply").vertices)
    shares = [metrics.explained_share(points, cam) for cam in cams]
    return {
        "explained_median": float(np.median(shares)) if shares else None,
        "explained_min": float(np.min(shares)) if shares else None,
    }


def bench_explained(root: Path, out: Path, spec: JobSpec) -> dict[str, Any]:
    report = _run_ours(root / "images", out / "result", spec)
    row = _summary(report)
    if report.ok:
        row.update(share_explained(out / "result"))
    return row


def relief_options(name: str) -> dict[str, Any]:
    """`relief` or `relief:seed=1,shape=pebble,views=12,width=800,height=600` -> scene options."""
    options: dict[str, Any] = {"n_views": 24, "width": 1600, "height": 1200, "seed": 0, "shape": "sphere"}
    _, _, spec = name.partition(":")
    keys = {"views": "n_views", "width": "width", "height": "height", "seed": "seed", "shape": "shape"}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in keys:
            raise ValueError(f"unknown relief option {key!r}; known: {', '.join(keys)}")
        options[keys[key]] = value if key == "shape" else int(value)
    return options


def bench_relief(out: Path, spec: JobSpec, options: dict[str, Any]) -> dict[str, Any]:
    """Fine relief at the photos' resolution: F at four taus, time against plain pycolmap."""
    scene = relief.render_relief_scene(**options)
    images = out / "images"
    synthetic.write_scene(scene.train, images)
    relief.write_held_out(scene.held_out, out / "held_out")
    plain = baseline.run_plain_pycolmap(images, out / "plain")
    report = _run_ours(images, out / "result", spec)
    row = _summary(report)
    row["scene"] = options
    row["held_out_dir"] = str(out / "held_out")
    row["plain_registered"] = plain.registered
    row["plain_seconds"] = plain.seconds.wall
    row["plain_peak_rss_mb"] = plain.peak_rss_mb
    row["time_ratio"] = report.seconds / plain.seconds.wall if plain.seconds.wall else None
    if report.ok:
        poses = score_poses(estimated_cameras(out / "result"), scene.train.cameras())
        row.update(poses)
        to_gt = row.pop("sim3")
        taus = {k: v * scene.train.size for k, v in RELIEF_TAUS.items()}
        gt = scene.train.surface_samples(600_000)
        points = to_gt(trimesh.load(out / "result" / "points.ply").vertices)
        mesh = trimesh.load(out / "result" / "model.glb", force="mesh")
        mesh_pts = to_gt(metrics.sample_mesh(np.asarray(mesh.vertices), np.asarray(mesh.faces), 600_000))
        row["points_scores"] = metrics.fscores_at(points, gt, taus)
        row["mesh_scores"] = metrics.fscores_at(mesh_pts, gt, taus)
        row["points_f"] = row["points_scores"]["f@1%"]
        row["mesh_f"] = row["mesh_scores"]["f@1%"]
        row.update(share_explained(out / "result"))
        row.update(score_held_out(out / "result", out / "result" / ".work", to_gt, scene.held_out))
        row["psnr_ceiling_db"] = appearance.photo_ceiling(scene.train, scene.held_out)
    return row


def bench_room(root: Path, out: Path, spec: JobSpec) -> dict[str, Any]:
    return _summary(_run_ours(root / "images", out / "result", spec))


def bench_hard(root: Path, out: Path, spec: JobSpec) -> dict[str, Any]:
    """A hard capture: what was placed, by which matcher, and what the learned matcher cost."""
    report = _run_ours(root / "images", out / "result", spec)
    row = _summary(report)
    sparse = next((s.result for s in report.stages if s.name == "sparse"), {})
    learned = sparse.get("learned", {})
    row["learned"] = {k: learned.get(k) for k in ("used", "why", "pairs", "pairs_written", "seconds")}
    row["placed_by"] = sparse.get("placed_by", {})
    return row


def _frames_row(report: Report) -> dict[str, Any]:
    row = _summary(report)
    kept = (report.frames or {}).get("kept", 0)
    row["frames_kept"] = kept
    row["registered_fraction"] = report.images.registered / kept if kept else None
    return row


def bench_apple(root: Path, out: Path, spec: JobSpec) -> dict[str, Any]:
    return _frames_row(_run_ours(root / "apple.mp4", out / "result", spec))


def bench_video(out: Path, spec: JobSpec) -> dict[str, dict[str, Any]]:
    """The same rendered clip at two frame budgets: how cost grows with the number of keyframes."""
    scene = synthetic.render_scene(n_views=240, width=320, height=240, seed=0, path="video")
    clip = out / "orbit.mp4"
    synthetic.write_video(scene, clip)
    truth = {f"frame_{i:06d}.jpg": cam for i, cam in enumerate(scene.cameras().values())}
    surface = scene.surface_samples(400_000)
    rows = {}
    for budget in VIDEO_BUDGETS:
        # a tiny target_motion lets the budget alone decide how many keyframes are kept
        overrides = {"frames": {"max_frames": budget, "target_motion": 1e-4}}
        result = out / f"budget-{budget}"
        report = _run_ours(clip, result, spec, overrides)
        row = _frames_row(report)
        if report.ok:
            row.update(score_poses(estimated_cameras(result), truth))
            row.update(score_geometry(result, row.pop("sim3"), surface, 0.01 * scene.size))
        rows[f"video-{budget}"] = row
    small, big = (rows[f"video-{b}"] for b in VIDEO_BUDGETS)
    if small.get("seconds") and big.get("seconds"):
        big["time_ratio"] = big["seconds"] / small["seconds"]
    return rows


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def print_table(rows: dict[str, dict[str, Any]], file: Any = sys.stdout) -> None:
    head = (
        f"{'dataset':10} {'ok':3} {'reg':>7} {'reproj':>6} {'points':>8} {'tris':>7} {'time s':>7} "
        f"{'RSS MB':>7} {'rot° med':>9} {'plain rot°':>10} {'F pts':>6} {'F mesh':>6} {'x plain':>7}"
    )
    print(head, file=file)
    print("-" * len(head), file=file)
    for name, r in rows.items():
        reg = f"{_fmt(r.get('registered'))}/{_fmt(r.get('images'))}"
        print(
            f"{name:10} {'yes' if r.get('ok') else 'NO':3} {reg:>7} {_fmt(r.get('reproj_err_px'), '.2f'):>6} "
            f"{_fmt(r.get('points')):>8} {_fmt(r.get('triangles')):>7} {_fmt(r.get('seconds'), '.1f'):>7} "
            f"{_fmt(r.get('peak_rss_mb'), '.0f'):>7} {_fmt(r.get('rot_err_median_deg'), '.4f'):>9} "
            f"{_fmt(r.get('plain_rot_err_median_deg'), '.4f'):>10} {_fmt(r.get('points_f'), '.3f'):>6} "
            f"{_fmt(r.get('mesh_f'), '.3f'):>6} {_fmt(r.get('time_ratio'), '.2f'):>7}",
            file=file,
        )
    print("\nper stage: seconds / peak RSS MB", file=file)
    for name, r in rows.items():
        stages = "  ".join(
            f"{s}={v['seconds']:.1f}/{v['peak_rss_mb']:.0f}" for s, v in r.get("stages", {}).items()
        )
        print(f"{name:10} {stages}", file=file)
        if r.get("error"):
            print(f"{'':10} error {r['error']['code']}: {r['error']['message']}", file=file)
        if r.get("unregistered"):
            print(f"{'':10} left out: {', '.join(r['unregistered'])}", file=file)
        if "frames_kept" in r:
            print(
                f"{'':10} video: {r['frames_kept']} keyframes kept, registered fraction "
                f"{_fmt(r.get('registered_fraction'), '.2f')}"
                + (f", time x{r['time_ratio']:.2f} of video-{VIDEO_BUDGETS[0]}" if "time_ratio" in r else ""),
                file=file,
            )
        if r.get("learned", {}).get("used"):
            secs = r["learned"]["seconds"]
            print(
                f"{'':10} learned matching ({r['learned']['why']}): DISK {secs['extract']:.1f} s, "
                f"LightGlue {secs['match']:.1f} s for {r['learned']['pairs']} pairs",
                file=file,
            )
        if "points_scores" in r:
            taus = "  ".join(
                f"{t}: {r['points_scores'][f'f@{t}']:.3f}/{r['mesh_scores'][f'f@{t}']:.3f}"
                for t in RELIEF_TAUS
            )
            print(f"{'':10} F points/mesh at tau  {taus}", file=file)
        if r.get("explained_median") is not None:
            print(
                f"{'':10} share of a photo explained: median {r['explained_median']:.3f}, "
                f"min {r['explained_min']:.3f}",
                file=file,
            )
        if "psnr_db" in r:
            print(
                f"{'':10} held-out views: PSNR {r['psnr_db']:.2f} dB "
                f"({'texture' if r.get('textured') else 'vertex colours'}; vertex colours "
                f"{_fmt(r.get('psnr_vertex_db'), '.2f')} dB), model.glb {r['glb_mb']} MB",
                file=file,
            )
        if "texture_held_out_db" in r:
            print(
                f"{'':10} texture at {len(r['texture_held_out_photos'])} photos it was not baked from: "
                f"PSNR {r['texture_held_out_db']:.2f} dB "
                f"({', '.join(f'{p:.2f}' for p in r['texture_held_out_per_view_db'])})",
                file=file,
            )
        if "psnr_ceiling_db" in r:
            ceiling = r["psnr_ceiling_db"]
            print(
                f"{'':10} held-out ceiling (true geometry and cameras, colours from the photos): "
                f"one photo {ceiling['one_photo']:.2f} dB (closest direction), "
                f"{ceiling['largest']:.2f} dB (largest, the atlas's choice), "
                f"blend {ceiling['blend']:.2f} dB",
                file=file,
            )
        if "plain_seconds" in r:
            print(
                f"{'':10} plain pycolmap: {r['plain_registered']} registered, {r['plain_seconds']:.1f} s, "
                f"{r['plain_peak_rss_mb']:.0f} MB",
                file=file,
            )


def main(names: list[str], out: Path, spec: JobSpec, datasets_dir: Path | None = None) -> int:
    datasets_dir = datasets_dir or default_datasets_dir()
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    for name in names or DEFAULT_DATASETS:
        work = Path(tempfile.mkdtemp(prefix=f"bench-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-", dir=out))
        if name == "synthetic":
            rows[name] = bench_synthetic(work, spec)
            continue
        if name == "video":
            rows.update(bench_video(work, spec))
            continue
        if name.partition(":")[0] == "relief":
            rows[name] = bench_relief(work, spec, relief_options(name))
            continue
        root = datasets_dir / {**SHARED_NAMES, **HARD_CAPTURES}.get(name, name)
        if not root.exists():
            print(
                f"skipping {name}: {root} not found (the shared datasets live beside the project)",
                file=sys.stderr,
            )
            continue
        runner = {
            "herzjesu": bench_herzjesu,
            "kitchen": bench_kitchen,
            "room": bench_room,
            "apple": bench_apple,
            **dict.fromkeys(HARD_CAPTURES, bench_hard),
            "fern": bench_explained,
            "sacre_coeur": bench_explained,
            "nle_tower": bench_explained,
        }.get(name)
        if runner is None:
            known = ", ".join([*DEFAULT_DATASETS, *HARD_CAPTURES])
            print(f"unknown dataset {name!r}; known: {known}", file=sys.stderr)
            return 2
        rows[name] = runner(root, work, spec)
    for row in rows.values():  # what ran, beside what it gave
        row["spec"] = spec.model_dump(mode="json")
    (out / "bench.json").write_text(json.dumps(rows, indent=2, default=float) + "\n")
    print(
        f"preset {spec.preset.value}"
        + (f", overrides {json.dumps(spec.overrides)}" if spec.overrides else "")
    )
    print_table(rows)
    print(f"\nJSON: {out / 'bench.json'}")
    return 0
