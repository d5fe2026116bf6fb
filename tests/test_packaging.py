"""The installed package: one `scandrop` namespace, every module in it, nothing else at the top level."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"daemon": "scandrop/daemon", "pipeline": "scandrop/pipeline", "models": "scandrop/models"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"  # a copy: setuptools leaves build/ and egg-info beside what it builds
    for name in FOLDERS:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run(
        [*pip, "-w", str(out), str(source)],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("scandrop-*.whl")
    return zipfile.ZipFile(built)


def test_wheel_installs_only_the_scandrop_namespace(wheel: zipfile.ZipFile) -> None:
    tops = {name.split("/")[0] for name in wheel.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"scandrop"}
    assert "scandrop/__init__.py" not in wheel.namelist()  # a namespace: nothing to clash with


def test_wheel_holds_every_module_and_the_page(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for folder, package in FOLDERS.items():
        for source in (ROOT / folder).rglob("*.py"):
            assert f"{package}/{source.relative_to(ROOT / folder).as_posix()}" in names, source
    for page in (ROOT / "daemon" / "page").glob("*.*"):
        assert f"scandrop/daemon/page/{page.name}" in names, page
    entry = wheel.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "scandrop = scandrop.daemon.cli:main" in entry


def test_repository_folders_are_not_import_roots(tmp_path: Path) -> None:
    """From anywhere but the checkout, only scandrop.* imports: no bare daemon/pipeline/models."""
    probe = (
        "import importlib.util as u, scandrop.daemon.cli, scandrop.pipeline.run, scandrop.models.device;"
        "print([n for n in ('daemon', 'pipeline', 'models') if u.find_spec(n)])"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True, timeout=120
    )
    assert found.stdout.strip() == "[]"
