"""numba's cache folder follows the kernels' source: a changed callee is never run from a stale caller."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numba

from scandrop.pipeline import kernel_cache
from scandrop.pipeline.dense import patchmatch_kernel

CALLER = textwrap.dedent(
    """
    from numba import njit
    from kernels.callee import value

    @njit(cache=True)
    def caller():
        return value()
    """
)
CALLEE = "from numba import njit\n\n@njit(cache=True)\ndef value():\n    return {}\n"
# Runs the caller in a fresh interpreter; with `keyed`, numba's folder is the one point_numba_cache picks.
RUN = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numba
    if sys.argv[2] == "keyed":
        from scandrop.pipeline import kernel_cache
        kernel_cache.point_numba_cache(Path(sys.argv[1]) / "kernels")
    else:
        numba.config.CACHE_DIR = sys.argv[3]
    sys.path.insert(0, sys.argv[1])
    from kernels.caller import caller
    print(caller())
    """
)


def _package(root: Path) -> None:
    (root / "kernels").mkdir(parents=True)
    (root / "kernels" / "__init__.py").write_text("")
    (root / "kernels" / "caller.py").write_text(CALLER)
    _change_callee(root, 1)


def _change_callee(root: Path, returns: int) -> None:
    """A new callee with a later time (numba's own check of a file: its time and size)."""
    callee = root / "kernels" / "callee.py"
    later = callee.stat().st_mtime + 10.0 if callee.exists() else None
    callee.write_text(CALLEE.format(returns))
    if later is not None:
        os.utime(callee, (later, later))


def _run(root: Path, mode: str, cache: Path) -> int:
    env = {"NUMBA_CACHE_DIR": str(cache), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", RUN, str(root), mode, str(cache)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


def test_a_changed_callee_is_compiled_afresh_where_numba_alone_keeps_the_stale_caller(tmp_path: Path) -> None:
    """Only the callee's file changes, as after a `git pull` that touched one kernel module."""
    for mode in ("plain", "keyed"):
        root = tmp_path / mode
        _package(root)
        assert _run(root, mode, tmp_path / f"cache-{mode}") == 1
        _change_callee(root, 2)
        seen = _run(root, mode, tmp_path / f"cache-{mode}")
        # numba by itself checks the caller's own file only: it runs the old callee's code.
        assert seen == (1 if mode == "plain" else 2)


def test_the_digest_covers_the_kernel_modules_and_nothing_else(tmp_path: Path) -> None:
    _package(tmp_path)
    (tmp_path / "kernels" / "notes.py").write_text("NOTE = 'no kernel here'\n")
    sources = kernel_cache.kernel_sources(tmp_path)
    assert [p.name for p in sources] == ["callee.py", "caller.py"]
    before = kernel_cache.sources_digest(sources, tmp_path)
    (tmp_path / "kernels" / "notes.py").write_text("NOTE = 'changed'\n")
    assert kernel_cache.sources_digest(kernel_cache.kernel_sources(tmp_path), tmp_path) == before
    _change_callee(tmp_path, 2)
    assert kernel_cache.sources_digest(kernel_cache.kernel_sources(tmp_path), tmp_path) != before


def test_the_pipelines_kernels_cache_under_their_sources_digest() -> None:
    folder = kernel_cache.cache_base() / kernel_cache.sources_digest(kernel_cache.kernel_sources())
    assert str(folder) == numba.config.CACHE_DIR
    assert Path(patchmatch_kernel.source_costs._cache.cache_path).is_relative_to(folder)
    names = {p.name for p in kernel_cache.kernel_sources()}
    kernels = {"patchmatch_kernel.py", "fuse_depth.py", "raster.py", "refine_mesh.py"}
    assert kernels <= names
