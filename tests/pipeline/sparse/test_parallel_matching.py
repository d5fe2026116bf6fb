"""Matching split over single-thread processes: the same tables as one process, and it stops clean."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import shutil
import sqlite3
import time
from pathlib import Path

import psutil
import pycolmap
import pytest

from scandrop.pipeline.bench import synthetic
from scandrop.pipeline.core import cpu_budget
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.stage import StopCheck, never_stop
from scandrop.pipeline.sparse import parallel_matching


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, str]]]:
    """A database with SIFT features of a rendered orbit (12 photos), and all its pairs."""
    root = tmp_path_factory.mktemp("features")
    scene = synthetic.render_scene(n_views=12, width=320, height=240, seed=3)
    synthetic.write_scene(scene, root / "photos")
    database = root / "features.db"
    pycolmap.extract_features(database, root / "photos", camera_mode=pycolmap.CameraMode.SINGLE)
    return database, list(itertools.combinations(sorted(scene.names), 2))


def _tables(database: Path) -> dict[str, str]:
    """A digest of each result table, and its row count."""
    out = {}
    with contextlib.closing(sqlite3.connect(database)) as db:
        for table in ("matches", "two_view_geometries"):
            digest = hashlib.sha256()
            rows = db.execute(f"SELECT pair_id, rows, cols, data FROM {table} ORDER BY pair_id").fetchall()
            for pair_id, n, cols, data in rows:
                digest.update(repr((pair_id, n, cols)).encode() + (bytes(data) if data else b""))
            out[table] = f"{len(rows)} rows {digest.hexdigest()}"
    return out


def _match(
    features: tuple[Path, list[tuple[str, str]]],
    folder: Path,
    parts: int,
    ticks: list[int] | None = None,
    should_stop: StopCheck = never_stop,
    thorough: bool = False,
) -> Path:
    """Match every pair in `parts` processes (seed 7, blocks of 10 pairs) into a copy of the database."""
    source, pairs = features
    folder.mkdir()
    database = folder / "database.db"
    shutil.copy(source, database)
    heard = [] if ticks is None else ticks
    parallel_matching.match(database, pairs, parts, 7, 10, folder, heard.append, should_stop, 0.0, thorough)
    return database


def test_matching_in_processes_gives_what_one_thread_gives(
    features: tuple[Path, list[tuple[str, str]]], tmp_path: Path
) -> None:
    """A pair's matches and geometry depend on its two photos and the seed only, not on which
    process matched it: one process and three (pairs cut 22 / 22 / 22) write the same rows, also
    when some pairs are listed twice (a video's sequential pairs and loop closures overlap)."""
    one = _tables(_match(features, tmp_path / "one", 1))
    ticks: list[int] = []
    source, pairs = features
    again = [(b, a) for a, b in pairs[::3]]  # listed twice, the other way round: matched once
    three = _tables(_match((source, pairs + again), tmp_path / "three", 3, ticks=ticks))
    assert one == three
    assert one["matches"].startswith("66 rows") and one["two_view_geometries"].startswith("66 rows")
    with contextlib.closing(sqlite3.connect(tmp_path / "three" / "database.db")) as db:
        verified = db.execute("SELECT COUNT(*) FROM two_view_geometries WHERE rows >= 15").fetchone()[0]
    assert verified >= 24  # each photo with its two neighbours on either side: real matches
    assert ticks == sorted(ticks) and 0 < ticks[-1] <= 66
    assert not list((tmp_path / "three").glob("match_part_*"))  # copies, pair lists and logs removed


def test_how_many_processes() -> None:
    assert parallel_matching.processes_for(29, 8) == 1  # too few pairs to pay for a second process
    assert parallel_matching.processes_for(100, 8) == 3
    assert parallel_matching.processes_for(1000, 2) == 2
    assert 1 <= parallel_matching.processes_for(10_000, 0) <= cpu_budget.MAX_WORKER_PROCESSES
    pairs = [(f"{i}", f"{i + 1}") for i in range(7)]
    assert [len(run) for run in parallel_matching.split_pairs(pairs, 3)] == [3, 2, 2]
    # Listed twice, either way round (sequential pairs and loop closures overlap): matched once.
    assert parallel_matching.split_pairs([("a", "b"), ("b", "c"), ("b", "a"), ("a", "b")], 2) == [
        [("a", "b")],
        [("b", "c")],
    ]


def _children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def test_a_stop_kills_the_matching_processes(
    features: tuple[Path, list[tuple[str, str]]], tmp_path: Path
) -> None:
    before = _children()
    start = time.monotonic()

    def stop() -> bool:
        return time.monotonic() - start > 0.3

    with pytest.raises(ScandropError) as caught:
        _match(features, tmp_path / "stopped", 2, should_stop=stop)
    assert caught.value.code == ErrorCode.cancelled
    assert _children() <= before
    assert not list((tmp_path / "stopped").glob("match_part_*"))


def test_a_failed_matching_process_fails_the_job_with_a_reason(
    features: tuple[Path, list[tuple[str, str]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parallel_matching.sys, "executable", shutil.which("false") or "/bin/false")
    with pytest.raises(ScandropError) as caught:
        _match(features, tmp_path / "failed", 2)
    assert caught.value.code == ErrorCode.worker_crashed
    assert "matching process" in caught.value.message and "failed (1)" in caught.value.message


def test_a_thorough_verification_reaches_the_matching_processes(
    features: tuple[Path, list[tuple[str, str]]], tmp_path: Path
) -> None:
    """Small sets verify with a longer RANSAC. A matching process is told so on its command line,
    and writes what one in-process pass with those options writes (on this clean rendered orbit
    the default verification happens to find the same geometries)."""
    argv = parallel_matching.child_argv(Path("a.db"), Path("pairs.txt"), 7, 10, True)
    assert parallel_matching.read_child_argv(argv) == ("a.db", "pairs.txt", 7, 10, True)
    plain = parallel_matching.child_argv(Path("a.db"), Path("pairs.txt"), 3, 5, False)
    assert parallel_matching.read_child_argv(plain) == ("a.db", "pairs.txt", 3, 5, False)
    options = parallel_matching.verification_options(7, thorough=True).ransac
    default = pycolmap.TwoViewGeometryOptions().ransac
    assert options.random_seed == 7
    assert options.confidence > default.confidence and options.min_num_trials > default.min_num_trials
    assert parallel_matching.verification_options(7).ransac.confidence == default.confidence

    source, pairs = features
    thorough = _tables(_match(features, tmp_path / "thorough", 2, thorough=True))
    in_process = tmp_path / "in_process"
    in_process.mkdir()
    shutil.copy(source, in_process / "database.db")
    listed = in_process / "pairs.txt"
    listed.write_text("".join(f"{a} {b}\n" for a, b in pairs))
    pycolmap.match_image_pairs(
        in_process / "database.db",
        matching_options=parallel_matching.matching_options("cpu"),
        pairing_options=parallel_matching.pairing_options(listed, 10),
        verification_options=parallel_matching.verification_options(7, thorough=True),
        device=pycolmap.Device.cpu,
    )
    assert thorough == _tables(in_process / "database.db")
