"""What a caller asks the pipeline to do: a preset and per-stage overrides, nothing more.

Light on purpose: the daemon builds and queues these without importing the stages (and with them
pycolmap, OpenCV, SciPy, trimesh: about 130 MB a long-running process has no use for). The job
process resolves a spec into the full PipelineConfig.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import ErrorCode, ScandropError

if TYPE_CHECKING:
    from pipeline.presets import PipelineConfig


class Preset(StrEnum):
    fast = "fast"
    balanced = "balanced"
    quality = "quality"


class JobSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: Preset = Preset.balanced
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Stage name -> field -> value, on top of the preset."
    )

    def resolve(self) -> PipelineConfig:
        """The full, validated config (imports every stage); a bad override is invalid_settings."""
        from pipeline.presets import preset_config

        try:
            return preset_config(self.preset, self.overrides)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ScandropError(
                ErrorCode.invalid_settings,
                f"Invalid job setting {'.'.join(str(p) for p in first['loc'])}: {first['msg']}.",
                "Fix the setting (see `scandrop config` and the README's settings).",
            ) from None
