"""Drops: what counts as junk, what the inbox holds, when a drop is complete, what it contains."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scandrop.daemon.drops import Drop, Settling, content_hash, content_patterns, scan_inbox
from scandrop.daemon.settings import DEFAULT_IGNORE
from scandrop.pipeline.ingest.input_kind import InputKind, is_ignored

READY, FORCE = "READY", "FORCE"


def _write(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _scan(inbox: Path) -> dict[str, Drop]:
    return {d.name: d for d in scan_inbox(inbox, DEFAULT_IGNORE, READY, FORCE)}


@pytest.mark.parametrize(
    "name",
    [
        ".DS_Store",
        "._x.jpg",
        "Thumbs.db",
        "desktop.ini",
        "@eaDir",
        "#recycle",
        ".stfolder",
        ".Trashes",
        "__MACOSX",
        "x.part",
        "x.crdownload",
        "x.tmp",
        "~$doc.docx",
        ".scandrop",
        # case does not matter: Windows and macOS shares are case-insensitive
        "THUMBS.DB",
        "Desktop.INI",
        "@EADIR",
        "__macosx",
        "X.PART",
        "x.CrDownload",
        "X.TMP",
    ],
)
def test_default_ignore_list_matches_junk(name: str) -> None:
    assert is_ignored(name, DEFAULT_IGNORE) is True


@pytest.mark.parametrize(
    "name", ["photo.jpg", "Scan 01.png", "ü.jpg", "IMG_0001.JPG", "scan.zip", "clip.mp4"]
)
def test_default_ignore_list_keeps_real_files(name: str) -> None:
    assert is_ignored(name, DEFAULT_IGNORE) is False


def test_scan_inbox_kinds(tmp_path: Path) -> None:
    _write(tmp_path / "shoot" / "a.jpg")
    _write(tmp_path / "archive.zip", b"zipzip")
    _write(tmp_path / "clip.MP4", b"v" * 10)
    _write(tmp_path / "one.jpeg", b"p" * 3)
    _write(tmp_path / "notes.txt", b"t")
    drops = _scan(tmp_path)
    assert sorted(drops) == ["archive.zip", "clip.MP4", "notes.txt", "one.jpeg", "shoot"]
    assert {n: d.kind for n, d in drops.items()} == {
        "archive.zip": InputKind.zip,
        "clip.MP4": InputKind.video,
        "notes.txt": None,
        "one.jpeg": InputKind.photo,
        "shoot": InputKind.photos,
    }
    # a single-file drop lists itself, by name, with its size
    assert [(rel, size) for rel, size, _ in drops["archive.zip"].listing] == [("archive.zip", 6)]
    assert drops["clip.MP4"].size == 10
    assert drops["one.jpeg"].ready is False and drops["one.jpeg"].forced is False


def test_scan_inbox_listing_skips_junk_files_and_folders(tmp_path: Path) -> None:
    shoot = tmp_path / "shoot"
    _write(shoot / "a.jpg", b"aaaa")
    _write(shoot / "sub" / "b.png", b"bb")
    for junk in [".DS_Store", "._a.jpg", "Thumbs.db", "desktop.ini", "c.jpg.part", "~$x.docx", "d.tmp"]:
        _write(shoot / junk)
    for folder in ["@eaDir", "__MACOSX", "#recycle", ".stfolder", ".Trashes"]:
        _write(shoot / folder / "hidden.jpg")
    _write(shoot / "sub" / "@eaDir" / "b.png" / "SYNOPHOTO_THUMB_M.jpg")
    drop = _scan(tmp_path)["shoot"]
    assert [rel for rel, _, _ in drop.listing] == ["a.jpg", "sub/b.png"]
    assert drop.size == 6
    assert drop.listing[0][2] == (shoot / "a.jpg").stat().st_mtime_ns


@pytest.mark.parametrize("marker", ["READY", ".ready"])
def test_ready_marker_sets_ready_and_is_not_listed(tmp_path: Path, marker: str) -> None:
    _write(tmp_path / "shoot" / "a.jpg")
    _write(tmp_path / "shoot" / marker, b"")
    drop = _scan(tmp_path)["shoot"]
    assert drop.ready is True and drop.forced is False
    assert [rel for rel, _, _ in drop.listing] == ["a.jpg"]


def test_force_marker_sets_forced_and_is_not_listed(tmp_path: Path) -> None:
    _write(tmp_path / "shoot" / "a.jpg")
    _write(tmp_path / "shoot" / "FORCE", b"")
    drop = _scan(tmp_path)["shoot"]
    assert drop.forced is True and drop.ready is False
    assert [rel for rel, _, _ in drop.listing] == ["a.jpg"]


def test_hidden_and_marker_top_level_entries_are_not_drops(tmp_path: Path) -> None:
    _write(tmp_path / ".scandrop" / "work" / "job" / "a.jpg")
    _write(tmp_path / ".hidden" / "a.jpg")
    _write(tmp_path / ".DS_Store")
    _write(tmp_path / "READY", b"")
    _write(tmp_path / "upload.jpg.crdownload")
    _write(tmp_path / "@eaDir" / "a.jpg")
    _write(tmp_path / "real" / "a.jpg")
    assert sorted(_scan(tmp_path)) == ["real"]


def test_empty_inbox_has_no_drops(tmp_path: Path) -> None:
    assert scan_inbox(tmp_path, DEFAULT_IGNORE, READY, FORCE) == []


def _drop(listing: tuple[tuple[str, int, int], ...], ready: bool = False, name: str = "shoot") -> Drop:
    return Drop(path=Path("/inbox") / name, kind=InputKind.photos, listing=listing, ready=ready, forced=False)


ONE = (("a.jpg", 10, 1),)
TWO = (("a.jpg", 10, 1), ("b.jpg", 20, 2))


def test_settling_empty_listing_is_never_complete() -> None:
    settling = Settling()
    for t in [0.0, 10.0, 1000.0]:
        assert settling.complete(_drop(()), window=5.0, now=t) is False
    # not even with a ready marker: an empty folder is made before anything is copied into it
    assert settling.complete(_drop((), ready=True), window=5.0, now=2000.0) is False


def test_settling_completes_after_the_window() -> None:
    settling = Settling()
    assert settling.complete(_drop(ONE), window=5.0, now=100.0) is False
    assert settling.complete(_drop(ONE), window=5.0, now=104.999) is False
    assert settling.waited("shoot", now=104.0) == pytest.approx(4.0)
    assert settling.complete(_drop(ONE), window=5.0, now=105.0) is True
    assert settling.complete(_drop(ONE), window=5.0, now=200.0) is True


def test_settling_a_change_resets_the_clock() -> None:
    settling = Settling()
    assert settling.complete(_drop(ONE), window=5.0, now=0.0) is False
    assert settling.complete(_drop(TWO), window=5.0, now=4.0) is False  # a file was added
    assert settling.complete(_drop(TWO), window=5.0, now=8.0) is False  # 4 s since the change
    assert settling.complete(_drop(TWO), window=5.0, now=9.0) is True
    grown = (("a.jpg", 10, 1), ("b.jpg", 25, 3))  # a file grew: also a change
    assert settling.complete(_drop(grown), window=5.0, now=9.5) is False
    assert settling.complete(_drop(grown), window=5.0, now=14.5) is True


def test_settling_empty_listing_forgets_the_clock() -> None:
    settling = Settling()
    assert settling.complete(_drop(ONE), window=5.0, now=0.0) is False
    assert settling.complete(_drop(()), window=5.0, now=3.0) is False
    assert settling.complete(_drop(ONE), window=5.0, now=6.0) is False  # starts over at 6
    assert settling.complete(_drop(ONE), window=5.0, now=11.0) is True


def test_settling_ready_completes_at_once() -> None:
    settling = Settling()
    assert settling.complete(_drop(ONE, ready=True), window=60.0, now=0.0) is True
    assert settling.complete(_drop(TWO, ready=True), window=60.0, now=0.1) is True


def test_settling_tracks_drops_separately_and_forgets() -> None:
    settling = Settling()
    assert settling.complete(_drop(ONE, name="a"), window=5.0, now=0.0) is False
    assert settling.complete(_drop(ONE, name="b"), window=5.0, now=3.0) is False
    assert settling.complete(_drop(ONE, name="a"), window=5.0, now=5.0) is True
    assert settling.complete(_drop(ONE, name="b"), window=5.0, now=5.0) is False
    settling.forget_missing({"b"})
    assert settling.waited("a", now=5.0) == 0.0
    assert settling.waited("b", now=5.0) == pytest.approx(2.0)
    settling.forget("b")
    assert settling.waited("b", now=5.0) == 0.0


def _photo_folder(root: Path, content: dict[str, bytes], mtime: int) -> Path:
    for rel, data in content.items():
        path = _write(root / rel, data)
        os.utime(path, ns=(mtime, mtime))
    return root


CONTENT = {"a.jpg": b"\xff\xd8first", "sub/b.png": b"\x89PNGsecond", "c.jpg": b""}
PATTERNS = content_patterns(DEFAULT_IGNORE, READY, FORCE)


def test_content_hash_ignores_folder_name_and_mtimes(tmp_path: Path) -> None:
    first = _photo_folder(tmp_path / "shoot", CONTENT, mtime=1_000_000_000)
    again = _photo_folder(tmp_path / "shoot (copy)", CONTENT, mtime=2_000_000_000)
    digest = content_hash(first, PATTERNS)
    assert len(digest) == 64
    assert content_hash(again, PATTERNS) == digest


def test_content_hash_changes_with_one_byte(tmp_path: Path) -> None:
    first = _photo_folder(tmp_path / "a", CONTENT, mtime=1_000_000_000)
    changed = dict(CONTENT, **{"sub/b.png": b"\x89PNGsecoNd"})
    second = _photo_folder(tmp_path / "b", changed, mtime=1_000_000_000)
    assert content_hash(first, PATTERNS) != content_hash(second, PATTERNS)


def test_content_hash_depends_on_relative_paths(tmp_path: Path) -> None:
    first = _photo_folder(tmp_path / "a", {"x.jpg": b"1"}, mtime=1)
    renamed = _photo_folder(tmp_path / "b", {"y.jpg": b"1"}, mtime=1)
    assert content_hash(first, PATTERNS) != content_hash(renamed, PATTERNS)


def test_content_hash_ignores_junk_and_markers(tmp_path: Path) -> None:
    clean = _photo_folder(tmp_path / "clean", CONTENT, mtime=1_000_000_000)
    noisy = _photo_folder(tmp_path / "noisy", CONTENT, mtime=1_000_000_000)
    for extra in [
        "READY",
        ".ready",
        "FORCE",
        ".DS_Store",
        "Thumbs.db",
        "sub/._b.png",
        "@eaDir/t.jpg",
        "d.tmp",
    ]:
        _write(noisy / extra, b"junk")
    assert content_hash(noisy, PATTERNS) == content_hash(clean, PATTERNS)


def test_content_hash_of_a_single_file_ignores_its_name(tmp_path: Path) -> None:
    a = _write(tmp_path / "scan.zip", b"PK\x03\x04data")
    b = _write(tmp_path / "scan again.zip", b"PK\x03\x04data")
    c = _write(tmp_path / "other.zip", b"PK\x03\x04datb")
    assert content_hash(a, PATTERNS) == content_hash(b, PATTERNS)
    assert content_hash(a, PATTERNS) != content_hash(c, PATTERNS)
