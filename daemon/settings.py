"""Daemon settings: defaults < TOML file < SCANDROP_* environment variables.

The field names are a contract (docs, packaging and tests use them): inbox, outbox, state_dir,
device, stability_seconds, ready_marker, job_timeout, ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from models.device import DeviceRequest
from pipeline.errors import ErrorCode, ScandropError
from pipeline.presets import Preset

DEFAULT_CONFIG_FILE = Path("/etc/scandrop/scandrop.toml")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SCANDROP_", extra="forbid", frozen=True)

    inbox: Path = Field(Path("inbox"), description="Folder watched for drops.")
    outbox: Path = Field(Path("outbox"), description="Folder that receives one folder per job.")
    state_dir: Path = Field(Path("outbox/.scandrop-state"), description="Job workspaces and state.")
    device: DeviceRequest = Field(DeviceRequest.auto, description="auto, cpu or cuda.")
    preset: Preset = Field(Preset.balanced, description="Pipeline preset for daemon jobs.")
    stability_seconds: float = Field(5.0, gt=0, description="A drop unchanged this long is complete.")
    ready_marker: str = Field("READY", min_length=1, description="A file of this name marks a drop complete.")
    poll_seconds: float = Field(2.0, gt=0, description="How often the inbox is scanned.")
    job_timeout: float = Field(3600.0, gt=0, description="Seconds before a job is stopped as timed out.")
    max_triangles: int = Field(300_000, ge=1000, description="Triangle cap of model.glb.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get("SCANDROP_CONFIG") or (
            str(DEFAULT_CONFIG_FILE) if DEFAULT_CONFIG_FILE.exists() else None
        )
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path and not Path(path).is_file():
            raise ScandropError(
                ErrorCode.invalid_settings,
                f"The config file {path} does not exist.",
                "Fix --config or SCANDROP_CONFIG, or leave both unset to use the defaults.",
            )
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    if config_file is not None:
        os.environ["SCANDROP_CONFIG"] = str(config_file)
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
