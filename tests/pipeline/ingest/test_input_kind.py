"""Drops are classified by what they are on disk (folders) or by their own name (files, links)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scandrop.pipeline.ingest.input_kind import InputKind, input_kind


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("scan.zip", InputKind.zip),
        ("SCAN.ZIP", InputKind.zip),
        ("walk.mp4", InputKind.video),
        ("walk.MOV", InputKind.video),
        ("clip.webm", InputKind.video),
        ("one.jpg", InputKind.photo),
        ("one.TIFF", InputKind.photo),
        ("iphone.HEIC", InputKind.photo),
        ("burst.heif", InputKind.photo),
        ("notes.txt", None),
        ("noext", None),
    ],
)
def test_files_are_classified_by_suffix(tmp_path: Path, name: str, kind: InputKind | None) -> None:
    (tmp_path / name).write_bytes(b"x")
    assert input_kind(tmp_path / name) == kind


def test_folders_and_links(tmp_path: Path) -> None:
    (tmp_path / "photos.zip").mkdir()  # a folder is a folder, whatever its name
    assert input_kind(tmp_path / "photos.zip") == InputKind.photos
    (tmp_path / "linked").symlink_to(tmp_path / "photos.zip", target_is_directory=True)
    assert input_kind(tmp_path / "linked") == InputKind.photos
    (tmp_path / "a.txt").write_bytes(b"x")
    (tmp_path / "link.zip").symlink_to(tmp_path / "a.txt")  # a link to a file: its own name counts
    assert input_kind(tmp_path / "link.zip") == InputKind.zip
    (tmp_path / "dangling.mp4").symlink_to(tmp_path / "gone")
    assert input_kind(tmp_path / "dangling.mp4") == InputKind.video
    assert input_kind(tmp_path / "missing.jpg") == InputKind.photo  # no error: the caller reports it
