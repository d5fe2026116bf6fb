"""Where numba keeps the pipeline's compiled kernels: one folder per version of their source.

numba checks a cached kernel against its own source file only, not against the kernels it calls
in other modules. After an update that changes a callee but not its caller (a `git pull` on an
editable install, the usual set-up here), the cached caller would run the old callee's code, or
fail to type: a stale cache once hid a changed kernel signature from the test suite here, and a
clean CI found it. Keying the folder by a digest of every kernel module's source makes any
changed kernel compile afresh; the daemon's warm-up then pays for it once (pipeline/warm_kernels).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba

PIPELINE = Path(__file__).resolve().parent


def kernel_sources(root: Path = PIPELINE) -> list[Path]:
    """The modules under root that define numba kernels, in a fixed order."""
    return sorted(p for p in root.rglob("*.py") if b"@njit" in p.read_bytes())


def sources_digest(paths: list[Path], root: Path = PIPELINE) -> str:
    """A short digest of the files' names (relative to root) and contents."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def cache_base() -> Path:
    """NUMBA_CACHE_DIR when set (the systemd unit points it into the state directory), else the
    user's cache folder."""
    if base := os.environ.get("NUMBA_CACHE_DIR"):
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scandrop" / "numba"


def point_numba_cache(root: Path = PIPELINE) -> Path:
    """Point numba's cache at this source version's folder; must run before any kernel module is
    imported (numba picks a kernel's cache folder when it is decorated). An unwritable folder makes
    numba fall back to its own places, as before."""
    folder = cache_base() / sources_digest(kernel_sources(root), root)
    numba.config.CACHE_DIR = str(folder)
    return folder
