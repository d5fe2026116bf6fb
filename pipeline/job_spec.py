"""What a caller asks the pipeline to do: a preset and per-stage overrides, nothing more.

Light on purpose: the daemon builds and queues these without importing the stages (and with them
pycolmap, OpenCV, SciPy, trimesh: about 130 MB a long-running process has no use for). The job
process resolves a spec into the full PipelineConfig with `presets.resolve`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Preset(StrEnum):
    fast = "fast"
    balanced = "balanced"
    quality = "quality"


def merge_overrides(*layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-stage overrides, each layer on top of the ones before it, field by field."""
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for stage, fields in layer.items():
            merged.setdefault(stage, {}).update(fields)
    return merged


def triangle_cap(max_triangles: int | None) -> dict[str, dict[str, Any]]:
    """The mesh override of a `max_triangles` setting; None leaves the preset's cap (quality's is
    1 000 000, the others' 300 000)."""
    return {} if max_triangles is None else {"mesh": {"max_triangles": max_triangles}}


class JobSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: Preset = Preset.balanced
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Stage name -> field -> value, on top of the preset."
    )
