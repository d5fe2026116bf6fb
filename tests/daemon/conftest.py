from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.bench.synthetic import render_scene, write_scene


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rendered orbit of a textured object: 24 photos that reconstruct in ~15 s with the fast preset."""
    folder = tmp_path_factory.mktemp("scene") / "photos"
    write_scene(render_scene(n_views=24, width=320, height=240, seed=0), folder)
    (folder / "gt_cameras.json").unlink()
    return folder
