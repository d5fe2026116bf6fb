"""Daemon settings: defaults < TOML file < SCANDROP_* environment variables.

The field names are a contract (docs, packaging and tests use them): inbox, outbox, state_dir,
http_host, http_port, token, watch_mode, stability_seconds, ready_marker, concurrency, job_timeout,
device, ...
"""

from __future__ import annotations

import ipaddress
import os
from enum import StrEnum
from pathlib import Path
from typing import Any, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from scandrop.daemon.job_settings import HotFolder
from scandrop.models.device import DeviceRequest
from scandrop.models.model_store import user_models_dir
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.job_spec import Preset

DEFAULT_CONFIG_FILE = Path("/etc/scandrop/scandrop.toml")

# What scanners, desktops and sync tools leave behind; fnmatch patterns on each path component.
DEFAULT_IGNORE = [
    ".*",
    "~$*",
    "Thumbs.db",
    "desktop.ini",
    "@eaDir",
    "#recycle",
    "#snapshot",
    "__MACOSX",
    "$RECYCLE.BIN",
    "System Volume Information",
    "*.part",
    "*.partial",
    "*.crdownload",
    "*.download",
    "*.tmp",
    "*.temp",
    "*.!sync",
    "*.syncthing.*",
    "*.sb-*",
]


class WatchMode(StrEnum):
    auto = "auto"
    native = "native"
    poll = "poll"


class ExecutorKind(StrEnum):
    local = "local"
    ray = "ray"


class RayData(StrEnum):
    """How ray jobs reach their data: probe the nodes (auto), or say so."""

    auto = "auto"
    shared = "shared"
    shipped = "shipped"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SCANDROP_", extra="forbid", frozen=True)

    inbox: Path = Field(Path("inbox"), description="Folder watched for drops.")
    outbox: Path = Field(Path("outbox"), description="Folder that receives one folder per job.")
    state_dir: Path = Field(Path("outbox/.scandrop-state"), description="Job workspaces and state.")
    http_host: str = Field("127.0.0.1", min_length=1, description="Address the status server binds.")
    http_port: int = Field(8765, ge=0, le=65535, description="Port of the status server (0: any free).")
    token: SecretStr | None = Field(
        None, description="Bearer token for the API; required when http_host is not loopback."
    )
    device: DeviceRequest = Field(DeviceRequest.auto, description="auto, cpu, cuda or mps.")
    preset: Preset = Field(Preset.balanced, description="Pipeline preset for daemon jobs.")
    watch_mode: WatchMode = Field(
        WatchMode.auto, description="native (inotify), poll, or auto: poll on network/fuse filesystems."
    )
    stability_seconds: float = Field(5.0, gt=0, description="A drop unchanged this long is complete.")
    network_stability_seconds: float = Field(
        60.0, gt=0, description="The stability window when the inbox is on a network filesystem."
    )
    ready_marker: str = Field("READY", min_length=1, description="A file of this name marks a drop complete.")
    force_marker: str = Field(
        "FORCE", min_length=1, description="A file of this name re-runs a drop already reconstructed."
    )
    ignore: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IGNORE), description="Names never treated as (part of) a drop."
    )
    poll_seconds: float = Field(2.0, gt=0, description="Scan interval while drops settle, and in poll mode.")
    rescan_seconds: float = Field(300.0, gt=0, description="Full rescan interval whatever events say.")
    concurrency: int = Field(1, ge=1, le=64, description="Jobs run at the same time.")
    job_timeout: float = Field(3600.0, gt=0, description="Seconds before a job is stopped as timed out.")
    max_retries: int = Field(1, ge=0, le=10, description="Re-runs of a job whose process crashed.")
    max_triangles: int | None = Field(
        None,
        ge=1000,
        description="Triangle cap of model.glb; default: the preset's (300 000; quality 1 000 000).",
    )
    warm_up: bool = Field(
        True,
        description="Compile the reconstruction kernels at start (ray: on each node as it joins), at "
        "the lowest CPU priority, so that the first job after an install does not wait for them.",
    )
    executor: ExecutorKind = Field(
        ExecutorKind.local, description="local: child processes here; ray: tasks on a Ray cluster."
    )
    ray_address: str = Field(
        "auto",
        min_length=1,
        description="The Ray cluster: auto (this machine's), HOST:6379 or ray://HOST:10001.",
    )
    ray_data: RayData = Field(
        RayData.auto,
        description="auto: probe whether the nodes see the inbox and outbox (shared) or ship the data; "
        "shared or shipped to decide it.",
    )
    ray_job_cpus: float = Field(
        1.0, gt=0, description="CPUs a job reserves on a Ray node, and uses (its pools are sized to them)."
    )
    ray_fanout_min_views: int = Field(
        40,
        ge=0,
        description="A ray job with at least this many views computes its depth maps as Ray tasks across "
        "the cluster (one per view); 0 = never, each job stays on one node.",
    )
    ray_fanout_cpus: float = Field(1.0, gt=0, description="CPUs each fanned-out depth-map task reserves.")
    models_dir: Path = Field(
        default_factory=user_models_dir,
        description="Installed learned models (`scandrop models pull`); default ~/.cache/scandrop/models "
        "(XDG_CACHE_HOME), shared by every working directory; the service sets its own.",
    )

    hot_folders: list[HotFolder] = Field(
        default_factory=list,
        description="More inboxes, each with its own name, inbox, outbox, preset, device, max_triangles "
        "and [stages] overrides ([[hot_folders]] tables in the TOML file).",
    )
    on_finish: str | None = Field(
        None, description="A command run after every finished job (split like a shell would; no shell)."
    )
    on_finish_timeout: float = Field(60.0, gt=0, description="Seconds before on_finish is killed.")
    webhook_url: str | None = Field(
        None, pattern=r"^https?://", description="Receives a POST of each finished job's status.json."
    )
    webhook_secret: SecretStr | None = Field(
        None, description="Key of the X-Scandrop-Signature HMAC-SHA256 header of webhook POSTs."
    )
    retention_days: float | None = Field(
        None, gt=0, description="Delete finished jobs' inputs, outboxes and workspaces older than this."
    )
    min_free_space_mb: int = Field(
        0, ge=0, description="Below this free space on state_dir or an outbox, new jobs wait."
    )

    @model_validator(mode="after")
    def _distinct_inboxes(self) -> Self:
        names = [h.name for h in self.hot_folders]
        if len(set(names)) != len(names):
            raise ValueError(f"hot_folders: names must differ ({', '.join(names)})")
        inboxes = [self.inbox.absolute(), *(h.inbox.absolute() for h in self.hot_folders)]
        if len(set(inboxes)) != len(inboxes):
            raise ValueError("hot_folders: every hot folder needs its own inbox, not the main one's")
        return self

    @model_validator(mode="after")
    def _token_beyond_loopback(self) -> Self:
        if not _is_loopback(self.http_host) and not (self.token and self.token.get_secret_value()):
            raise ValueError(
                f"http_host {self.http_host} is reachable from other machines: set a token "
                "(SCANDROP_TOKEN) or bind 127.0.0.1"
            )
        return self

    @property
    def spool(self) -> Path:
        """Claimed drops live here, on the inbox's filesystem, so claiming is an atomic rename."""
        return self.inbox / ".scandrop"

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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    if config_file is not None:
        os.environ["SCANDROP_CONFIG"] = str(config_file)
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
