from __future__ import annotations

from pathlib import Path

import pytest
from daemon_process import write_photos


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_photos(tmp_path_factory.mktemp("scene") / "photos")
