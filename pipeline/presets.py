"""Named presets are plain values of the stage configs; the resolved config is saved per job."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.dense.estimate_depth import DepthConfig
from scandrop.pipeline.dense.fill_depth import FillConfig
from scandrop.pipeline.dense.fuse_depth import FuseConfig
from scandrop.pipeline.export.export_assets import ExportConfig
from scandrop.pipeline.export.render_preview import PreviewConfig
from scandrop.pipeline.ingest.extract_frames import FramesConfig
from scandrop.pipeline.ingest.ingest_images import IngestConfig
from scandrop.pipeline.job_spec import JobSpec, Preset, merge_overrides
from scandrop.pipeline.sparse.reconstruct_sparse import SparseConfig
from scandrop.pipeline.surface.build_mesh import MeshConfig
from scandrop.pipeline.surface.make_splats import SplatConfig
from scandrop.pipeline.surface.optimise_splats import OptimiseConfig
from scandrop.pipeline.surface.single_view import SingleViewConfig


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
        "frames": {"max_frames": 60, "min_frames": 24},
        "export": {"texture_size": 2048, "texture_jpeg_quality": 90},
        "ingest": {"max_image_size": 1024},
        "sparse": {"max_num_features": 2048, "small_set_features": 4096},
        "depth": {"method": "sgbm", "partners": 3, "stereo_max_size": 320, "max_image_size": 1000},
        "fuse": {"neighbours": 6},
        # Refining a mesh of depth 7 from 320 px stereo against the photos would cost a job that
        # promised speed more than it gains there.
        # Fast's 50k triangles make two rings a wide strip: on the relief sphere its mesh F rose
        # (0.849 -> 0.881 at 0.25%) but held-out PSNR fell (21.33 -> 21.02 dB), so it keeps its rim.
        "mesh": {"depth": 7, "refine": False, "border_rings": 0},
    },
    Preset.balanced: {},
    Preset.quality: {
        "frames": {"max_frames": 240},
        "export": {"texture_size": 8192, "texture_jpeg_quality": 100},
        "ingest": {"max_image_size": 2400},
        "sparse": {"max_num_features": 8192},
        # PatchMatch on the full working resolution (the grid never exceeds the photo). A pixel
        # counts its best 2 of 5 sources, as balanced: with the best 3, surfaces that only two
        # photos see well (an object's underside from the lower ring) lost their depth and the
        # relief sphere's mesh recall at 1% fell below balanced (0.975 vs 0.985; best 2: 0.985).
        # Eight sources (until 2026-12-06) put more points on a lip past the ground slab's rim in
        # the rendered video's 50 keyframes: points F at 1% 0.9945 against balanced's 0.9947, with
        # five 0.9953. Each relief object's view has four sources within max_angle_deg either way;
        # the kitchen and the fern explained a little less with five (0.908 and 0.904
        # of a photo against 0.913 and 0.915), still above balanced (0.904, 0.898).
        # Four levels, as balanced, over the full resolution leave more coarse mistakes to rescue
        # (see patchmatch_cpu.rescue): two rescue sweeps. The geometric pass searches every pixel,
        # not only those its sources' depth maps disagree with (see patchmatch_cpu.geometric_planes),
        # and in three sweeps, not one: on Sacre Coeur's internet photos, with one sweep, quality's
        # fused points explained a median 0.428 of a photo against balanced's 0.433 (three seeds,
        # no single setting the cause); with two 0.449, with three 0.456, for 10-20% more
        # depth-map time there and on the kitchen. Balanced keeps one: three gave it 0.461 on
        # Sacre Coeur, but its depth maps took 49 s instead of about 31 s.
        "depth": {
            "max_image_size": 4000,
            "stereo_max_size": 1000,
            "pm_best_k": 2,
            "pm_iterations_fine": 2,
            "pm_rescue_sweeps": 2,
            "pm_geometric_within": 0.0,
            "pm_geometric_sweeps": 3,
        },
        # Fusion checks 8 neighbours, as balanced. With 12, each point marks its pixels used in more
        # views, so fewer points came out (relief sphere 2.09 M against 2.60 M) and they were less
        # precise: points F at 1% on the rendered video fell below balanced's (0.9946 vs 0.9952),
        # and the sphere's and pebble's points F were lower at every tau (2026-12-06).
        # Three border rings (balanced two): with one-witness fusion, balanced's pebble mesh passed
        # quality's at 0.25% (0.9869 vs 0.9863-0.9866 in three runs); three rings give 0.9884
        # there and keep quality above balanced at every tau on the sphere and the pebble.
        "mesh": {"depth": 10, "max_triangles": 1_000_000, "border_rings": 3},
    },
}


def preset_config(
    preset: Preset | str = Preset.balanced, overrides: dict[str, dict[str, Any]] | None = None
) -> PipelineConfig:
    """The config of a named preset, with per-stage field overrides (e.g. from the CLI) on top."""
    name = Preset(preset)
    merged = merge_overrides(_OVERRIDES[name], overrides or {})
    return PipelineConfig.model_validate({"preset": name, **merged})


def resolve(spec: JobSpec) -> PipelineConfig:
    """The full, validated config of a spec (imports every stage); a bad override is invalid_settings."""
    try:
        return preset_config(spec.preset, spec.overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ScandropError(
            ErrorCode.invalid_settings,
            f"Invalid job setting {'.'.join(str(p) for p in first['loc'])}: {first['msg']}.",
            "Fix the setting (see `scandrop config` and the README's settings).",
        ) from None
