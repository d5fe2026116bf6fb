"""The executor seam without a cluster: Ray stays unloaded for local jobs; shipped data round-trips."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from scandrop.daemon.ray_tasks import pack, unpack


def test_the_local_executor_never_loads_ray() -> None:
    code = (
        "import sys; from scandrop.daemon.job_runner import make_executor; "
        "from scandrop.daemon.settings import Settings; "
        "import scandrop.daemon.service; make_executor(Settings()); print('ray' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_a_drop_and_its_outputs_travel_whole(tmp_path: Path) -> None:
    drop = tmp_path / "Scan 1"
    (drop / "sub").mkdir(parents=True)
    (drop / "a.jpg").write_bytes(b"\xff\xd8photo")
    (drop / "sub" / "b.png").write_bytes(bytes(range(256)) * 40)
    single = tmp_path / "one.heic"
    single.write_bytes(b"heic" * 1000)
    for source in (drop, single):
        (root,) = unpack(pack(source), tmp_path / f"out-{source.name}")
        assert root.name == source.name
        if source.is_dir():
            files = {p.relative_to(source): p.read_bytes() for p in source.rglob("*") if p.is_file()}
            assert {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()} == files
        else:
            assert root.read_bytes() == source.read_bytes()


def test_a_pack_cannot_write_outside_its_folder(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(tarfile.OutsideDestinationError):
        unpack(buffer.getvalue(), tmp_path / "in")
    assert not (tmp_path / "escaped").exists()
