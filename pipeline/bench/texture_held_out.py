"""The texture of a real set, judged at registered photos that the atlas was not baked from.

A real set has no true model, but its photos are true images at known poses. The job's mesh is
textured again from all its registered photos but a few, and rendered at those few; PSNR is taken
over the pixels the model covers. The mesh itself was built with every photo, so this judges the
texture (photo choice, levelling, seams, resolution) on real exposures and misregistration, not
novel-view geometry; a level to compare texture choices by, not an absolute score.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from scandrop.pipeline.bench import appearance
from scandrop.pipeline.core.stage import never_stop, no_progress
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.export import export_assets, model_glb
from scandrop.pipeline.export.bake_texture import View

_BORDER_PX = 8  # photo border left out: undistortion's edge and the model's clipped rim


def held_out_views(views: list[View], n: int) -> list[View]:
    """`n` of the views, evenly spaced through the model's order and never the first or last (a
    sequence's ends are the photos whose surroundings only they see)."""
    picks = np.linspace(0, len(views) - 1, n + 2)[1:-1]
    return [views[i] for i in sorted(set(np.rint(picks).astype(int)))]


def pinhole_photo(view: View) -> tuple[np.ndarray, np.ndarray]:
    """The view's photo resampled to the pinhole camera of its focal length and principal point
    (what appearance.render draws), and that camera's K: lens distortion removed."""
    k = np.asarray(view.camera.calibration_matrix(), dtype=np.float64)
    w, h = int(view.camera.width), int(view.camera.height)
    u, v = np.meshgrid(np.arange(w, dtype=np.float64) + 0.5, np.arange(h, dtype=np.float64) + 0.5)
    rays = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], axis=-1)
    px = np.asarray(view.camera.img_from_cam(rays.reshape(-1, 3), check_cheirality=False), dtype=np.float32)
    px = px.reshape(h, w, 2) - 0.5  # COLMAP's pixel centres are at +0.5, OpenCV's at 0
    bgr = cv2.imread(str(view.image), cv2.IMREAD_COLOR)
    photo = cv2.remap(bgr, px[..., 0], px[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return cv2.cvtColor(photo, cv2.COLOR_BGR2RGB).astype(np.float64), k


def score(work: Path, config: export_assets.ExportConfig, n_held: int = 3) -> dict[str, Any]:
    """PSNR of the re-textured model at `n_held` registered photos it was not baked from; empty
    where the workspace has no mesh or too few photos to spare any."""
    ws = Workspace(work)
    views = export_assets.registered_views(ws)
    if not ws.mesh.exists() or len(views) < n_held + 3:
        return {}
    held = held_out_views(views, n_held)
    names = {v.name for v in held}
    kept = [v for v in views if v.name not in names]
    with tempfile.TemporaryDirectory() as tmp:
        glb = Path(tmp) / "model.glb"
        export_assets.write_textured_glb(config, ws, kept, glb, no_progress, never_stop)
        model = model_glb.load_model(glb)
    errors, counts = [], []
    for view in held:
        photo, k = pinhole_photo(view)
        h, w = photo.shape[:2]
        rendered, covered = appearance.render(model, k, view.rotation, view.translation, (w, h))
        covered[:_BORDER_PX] = covered[-_BORDER_PX:] = False
        covered[:, :_BORDER_PX] = covered[:, -_BORDER_PX:] = False
        errors.append(appearance.mse(rendered, photo, covered))
        counts.append(int(covered.sum()))
    pixels = sum(counts)
    pooled = sum(e * n for e, n in zip(errors, counts, strict=True)) / pixels if pixels else 0.0
    return {
        "texture_held_out_db": round(appearance.db(pooled), 3),
        "texture_held_out_per_view_db": [round(appearance.db(e), 3) for e in errors],
        "texture_held_out_photos": [v.name for v in held],
        "texture_held_out_pixels": pixels,
    }
