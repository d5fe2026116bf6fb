"""Stage: fill weakly textured holes of the stereo depth maps with aligned monocular depth.

Stereo cannot match plain surfaces, so their depth maps have holes there. A learned monocular
depth model sees shape where there is no texture; its relative inverse depth is aligned per view
to the stereo depth around it (pipeline/align_depth.py) and used only where that alignment is
vouched for. Optional: with `mode = auto` it runs when the model is installed and otherwise says
in the report that it did not (the stereo result stands as it is); `on` requires the model.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from scandrop.models.registry import DEPTH_MODEL
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.stage import Progress, StopCheck, atomic_path, check_stop
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.dense.align_depth import MonoFillConfig, fill_weak_regions
from scandrop.pipeline.dense.estimate_depth import depth_normals


class FillConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: fill when the depth model is installed; on: require it; off: never."
    )
    model: str = Field(DEPTH_MODEL, description="Registry name of the monocular depth model.")
    models_dir: str | None = Field(None, description="Where models are installed (as for single view).")
    align: MonoFillConfig = MonoFillConfig()


class FillResult(BaseModel):
    used: bool
    reason: str
    backend: str | None = None
    views: int = 0
    views_filled: int = 0
    pixels_filled: int = 0
    seconds: float = 0.0
    per_view: dict[str, dict[str, Any]] = Field(default_factory=dict)


def load_model(config: FillConfig, device: str) -> Any | None:
    """The depth network, or None in auto mode when it is not installed (mode on: model_missing)."""
    from scandrop.models.mono_depth import open_depth_model

    try:
        return open_depth_model(config.model, config.models_dir, device)
    except ScandropError as exc:
        if config.mode == "auto" and exc.code == ErrorCode.model_missing:
            return None
        raise


def run(
    config: FillConfig,
    ws: Workspace,
    device: str,
    progress: Progress,
    should_stop: StopCheck,
) -> FillResult:
    """Rewrite ws.depth_dir/<view>.npz with filled depth, normals and (lower) confidence."""
    t0 = time.monotonic()
    model = None if config.mode == "off" else load_model(config, device)
    if model is None:
        reason = (
            "switched off (fill.mode = off)"
            if config.mode == "off"
            else f"the depth model {config.model} is not installed (scandrop models pull {config.model})"
        )
        progress(1.0, f"no monocular depth: {reason}")
        return FillResult(used=False, reason=reason)
    files = sorted(ws.depth_dir.glob("*.npz"))
    result = FillResult(used=True, reason="filled with aligned monocular depth", backend=model.backend)
    for i, path in enumerate(files):
        check_stop(should_stop)
        progress(i / max(1, len(files)), f"monocular depth {i + 1}/{len(files)}")
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
        name = str(arrays["name"])
        mask = arrays.get("mask")  # the object mask the depth stage used, on the same grid
        mono = model.predict(arrays["rgb"])
        depth, confidence, stats = fill_weak_regions(
            arrays["depth"], arrays["confidence"], mono, mask, config.align
        )
        result.views += 1
        result.per_view[name] = stats.model_dump(mode="json")
        if stats.filled == 0:
            continue
        filled = (depth > 0) & (arrays["depth"] <= 0)
        normals = arrays["normals"].copy()
        normals[filled] = depth_normals(depth, arrays["K"])[filled]
        arrays.update(depth=depth, confidence=confidence, normals=normals)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        result.views_filled += 1
        result.pixels_filled += stats.filled
    result.seconds = round(time.monotonic() - t0, 3)
    progress(1.0, f"filled {result.pixels_filled} pixels in {result.views_filled} of {result.views} views")
    return result
