"""Named presets are plain values of the stage configs; the resolved config is saved per job."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from pipeline.build_mesh import MeshConfig
from pipeline.estimate_depth import DepthConfig
from pipeline.export_assets import ExportConfig
from pipeline.extract_frames import FramesConfig
from pipeline.fill_depth import FillConfig
from pipeline.fuse_depth import FuseConfig
from pipeline.ingest_images import IngestConfig
from pipeline.job_spec import Preset
from pipeline.make_splats import SplatConfig
from pipeline.optimise_splats import OptimiseConfig
from pipeline.reconstruct_sparse import SparseConfig
from pipeline.render_preview import PreviewConfig
from pipeline.single_view import SingleViewConfig


class PipelineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: Preset = Preset.balanced
    frames: FramesConfig = FramesConfig()
    ingest: IngestConfig = IngestConfig()
    sparse: SparseConfig = SparseConfig()
    depth: DepthConfig = DepthConfig()
    fill: FillConfig = FillConfig()
    fuse: FuseConfig = FuseConfig()
    mesh: MeshConfig = MeshConfig()
    splats: SplatConfig = SplatConfig()
    optimise: OptimiseConfig = OptimiseConfig()
    export: ExportConfig = ExportConfig()
    preview: PreviewConfig = PreviewConfig()
    single_view: SingleViewConfig = SingleViewConfig()


# Only what differs from the stage defaults (which are the balanced preset).
_OVERRIDES: dict[Preset, dict[str, dict[str, Any]]] = {
    Preset.fast: {
        "frames": {"max_frames": 60},
        "ingest": {"max_image_size": 1024},
        "sparse": {"max_num_features": 2048, "small_set_features": 4096},
        "depth": {"partners": 3, "stereo_max_size": 320},
        "fuse": {"neighbours": 6},
        "mesh": {"depth": 7},
    },
    Preset.balanced: {},
    Preset.quality: {
        "frames": {"max_frames": 240},
        "ingest": {"max_image_size": 2400},
        "sparse": {"max_num_features": 8192},
        "depth": {"stereo_max_size": 1000},
        "fuse": {"neighbours": 12},
        "mesh": {"depth": 9},
    },
}


def preset_config(
    preset: Preset | str = Preset.balanced, overrides: dict[str, dict[str, Any]] | None = None
) -> PipelineConfig:
    """The config of a named preset, with per-stage field overrides (e.g. from the CLI) on top."""
    name = Preset(preset)
    merged: dict[str, dict[str, Any]] = {k: dict(v) for k, v in _OVERRIDES[name].items()}
    for stage, fields in (overrides or {}).items():
        merged.setdefault(stage, {}).update(fields)
    return PipelineConfig.model_validate({"preset": name, **merged})
