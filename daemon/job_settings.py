"""What one job runs with: drop file > hot folder > global settings > defaults.

A hot folder is one more inbox with settings of its own (a "quality" folder beside a "fast" one on
a shared NAS). A drop may carry a `scandrop.toml` that overrides the settings for that drop only.
Both are validated: a bad hot folder stops start-up; a bad drop file fails that job as
`invalid_settings`, naming the key, and never touches the daemon.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scandrop.models.device import DeviceRequest
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.job_spec import Preset, merge_overrides

DROP_SETTINGS_FILE = "scandrop.toml"
MAX_DROP_SETTINGS_BYTES = 64 * 1024


class JobOptions(BaseModel):
    """What a hot folder or a drop may set for its jobs; anything left out is inherited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: Preset | None = Field(None, description="fast, balanced or quality.")
    device: DeviceRequest | None = Field(None, description="auto, cpu, cuda or mps.")
    max_triangles: int | None = Field(None, ge=1000, description="Triangle cap of model.glb.")
    stages: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-stage overrides on top of the preset, e.g. [stages.mesh] depth = 8; "
        "checked by the job against the stage configs.",
    )


class HotFolder(JobOptions):
    """One more inbox, declared in the settings file as [[hot_folders]]."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$", description="Shown in status.json.")
    inbox: Path = Field(description="Folder watched for drops.")
    outbox: Path | None = Field(None, description="Its jobs' output folders; default: the global outbox.")


class JobSettings(BaseModel):
    """The settings a job ran with, and where they came from (in status.json)."""

    preset: Preset
    device: DeviceRequest
    max_triangles: int | None = Field(None, description="Triangle cap of model.glb; None: the preset's.")
    stages: dict[str, dict[str, Any]] = Field(default_factory=dict)
    sources: list[str] = Field(default_factory=list, description="The layers applied, lowest first.")

    def same_work(self, other: JobSettings) -> bool:
        """Whether two jobs of identical input would make the same outputs (the device aside)."""
        keys = {"preset", "max_triangles", "stages"}
        return self.model_dump(include=keys) == other.model_dump(include=keys)


def effective(base: JobSettings, *layers: tuple[str, JobOptions | None]) -> JobSettings:
    """`base` with each named layer on top, in order; stage overrides merge field by field."""
    merged = base.model_copy(deep=True)
    for name, options in layers:
        if options is None:
            continue
        stages = merge_overrides(merged.stages, options.stages)
        set_fields = options.model_dump(exclude_none=True, exclude={"stages", "name", "inbox", "outbox"})
        merged = merged.model_copy(
            update={**set_fields, "stages": stages, "sources": [*merged.sources, name]}
        )
    return merged


def read_drop_options(drop: Path) -> JobOptions | None:
    """The drop's own scandrop.toml (folder drops only), or None when it has none."""
    path = drop / DROP_SETTINGS_FILE
    if not drop.is_dir() or drop.is_symlink() or not path.is_file() or path.is_symlink():
        return None

    def bad(what: str) -> ScandropError:
        return ScandropError(
            ErrorCode.invalid_settings,
            f"{DROP_SETTINGS_FILE} in {drop.name}: {what}.",
            "Fix or remove the drop's scandrop.toml (keys: preset, device, max_triangles, [stages.<stage>]; "
            "see the README's Settings), then move the drop back into the inbox.",
        )

    try:
        if path.stat().st_size > MAX_DROP_SETTINGS_BYTES:
            raise bad(f"larger than {MAX_DROP_SETTINGS_BYTES // 1024} KiB")
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise bad(f"cannot be read ({exc})") from None
    try:
        return JobOptions.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise bad(f"{where}: {first['msg']}") from None
