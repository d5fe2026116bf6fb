"""Ingest turns messy drops into clean images, and names every file it had to skip."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import ingest_images
from pipeline.errors import ErrorCode, ScandropError
from pipeline.stage import never_stop, no_progress
from pipeline.workspace import Workspace


def _texture(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


def _ingest(src: Path, tmp_path: Path, **cfg: int) -> ingest_images.IngestResult:
    ws = Workspace(tmp_path / "ws").create()
    return ingest_images.run(ingest_images.IngestConfig(**cfg), src, ws, no_progress, never_stop)


def test_bad_files_are_skipped_with_reasons(tmp_path: Path) -> None:
    src = tmp_path / "drop"
    src.mkdir()
    for i in range(3):
        Image.fromarray(_texture(200, 150, i)).save(src / f"ok_{i}.jpg")
    (src / "empty.jpg").write_bytes(b"")
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    Image.fromarray(_texture(1, 1)).save(src / "dot.png")
    (src / "notes.txt").write_text("not an image")
    (src / ".hidden.jpg").write_bytes(b"junk")

    result = _ingest(src, tmp_path)

    assert result.usable == 3
    reasons = {r.file: r.reason for r in result.rejected}
    assert set(reasons) == {"empty.jpg", "corrupt.png", "dot.png"}
    assert "0 bytes" in reasons["empty.jpg"]
    assert "corrupt" in reasons["corrupt.png"]
    assert "too small" in reasons["dot.png"]


def test_exif_rotation_grey_16bit_and_alpha(tmp_path: Path) -> None:
    src = tmp_path / "drop"
    src.mkdir()
    # A landscape pixel array tagged "rotate 90" must come out portrait.
    rotated = Image.fromarray(_texture(300, 200, 1))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(src / "rotated.jpg", exif=exif)
    Image.fromarray(_texture(300, 200, 2)[..., 0]).save(src / "grey.png")
    deep = (np.linspace(0, 60000, 300 * 200).reshape(200, 300)).astype(np.uint16)
    Image.fromarray(deep).save(src / "deep.png")
    rgba = np.dstack([_texture(300, 200, 3), np.zeros((200, 300), np.uint8)])
    rgba[50:150, 100:200, 3] = 255
    Image.fromarray(rgba, "RGBA").save(src / "cutout.png")

    ws = Workspace(tmp_path / "ws").create()
    result = ingest_images.run(ingest_images.IngestConfig(), src, ws, no_progress, never_stop)

    assert result.usable == 4 and not result.rejected
    assert Image.open(ws.images_dir / "rotated.jpg").size == (200, 300)
    for name in result.names:
        assert Image.open(ws.images_dir / name).mode == "RGB"
    deep_out = np.asarray(Image.open(ws.images_dir / "deep.png"))
    assert deep_out.max() >= 250 and deep_out.min() == 0  # 16-bit range mapped onto 8 bits
    mask = np.asarray(Image.open(ws.mask_for("cutout.png")))
    assert mask.shape == (200, 300)
    assert mask[100, 150] == 255 and mask[10, 10] == 0
    assert result.masked == 1


def test_large_images_are_bounded(tmp_path: Path) -> None:
    src = tmp_path / "drop"
    src.mkdir()
    for i in range(3):
        Image.fromarray(_texture(4000, 3000, i)).save(src / f"big_{i}.jpg")
    ws = Workspace(tmp_path / "ws").create()
    result = ingest_images.run(
        ingest_images.IngestConfig(max_image_size=1000), src, ws, no_progress, never_stop
    )
    assert result.resized == 3
    assert Image.open(ws.images_dir / "big_0.jpg").size == (1000, 750)


def test_fully_transparent_photo_is_rejected(tmp_path: Path) -> None:
    src = tmp_path / "drop"
    src.mkdir()
    for i in range(3):
        Image.fromarray(_texture(120, 100, i)).save(src / f"ok_{i}.png")
    Image.fromarray(np.zeros((100, 120, 4), np.uint8), "RGBA").save(src / "clear.png")
    result = _ingest(src, tmp_path)
    assert [r.file for r in result.rejected] == ["clear.png"]
    assert "transparent" in result.rejected[0].reason


@pytest.mark.parametrize("count", [0, 2])
def test_too_few_photos_is_a_clear_failure(tmp_path: Path, count: int) -> None:
    src = tmp_path / "drop"
    src.mkdir()
    for i in range(count):
        Image.fromarray(_texture(120, 100, i)).save(src / f"ok_{i}.png")
    (src / "readme.txt").write_text("x")
    with pytest.raises(ScandropError) as info:
        _ingest(src, tmp_path)
    assert info.value.code == (ErrorCode.no_input if count == 0 else ErrorCode.too_few_images)
    assert info.value.hint


def test_clean_photos_are_copied_untouched(tmp_path: Path) -> None:
    src = tmp_path / "drop"
    src.mkdir()
    for i in range(3):
        Image.fromarray(_texture(320, 240, i)).save(src / f"p{i}.jpg", quality=90)
    ws = Workspace(tmp_path / "ws").create()
    ingest_images.run(ingest_images.IngestConfig(), src, ws, no_progress, never_stop)
    # Byte-identical copies keep every EXIF field (focal length) for COLMAP and lose no quality.
    assert (ws.images_dir / "p0.jpg").read_bytes() == (src / "p0.jpg").read_bytes()


def test_mixed_cameras_get_their_own_intrinsics(tmp_path: Path) -> None:
    src = tmp_path / "drop"
    src.mkdir()
    for i in range(3):
        Image.fromarray(_texture(320, 240, i)).save(src / f"phone_{i}.png")
        Image.fromarray(_texture(400, 300, i + 10)).save(src / f"dslr_{i}.png")
    result = _ingest(src, tmp_path)
    groups = sorted(sorted(g) for g in result.camera_groups())
    assert groups == [[f"dslr_{i}.png" for i in range(3)], [f"phone_{i}.png" for i in range(3)]]


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_texture(160, 120, seed)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_zip_drop_is_unpacked_and_ingested(tmp_path: Path) -> None:
    drop = tmp_path / "inbox" / "scan.zip"
    drop.parent.mkdir()
    with zipfile.ZipFile(drop, "w") as zf:
        zf.writestr("scan/a.jpg", _jpeg(0))
        zf.writestr("scan/b.jpg", _jpeg(1))
        zf.writestr("scan/more/c.jpg", _jpeg(2))
        zf.writestr("__MACOSX/scan/._a.jpg", b"resource fork, not a photo")
        zf.writestr("scan/notes.txt", "not a photo")
    ws = Workspace(tmp_path / "ws").create()
    result = ingest_images.run(ingest_images.IngestConfig(), drop, ws, no_progress, never_stop)
    assert result.usable == 3 and not result.rejected
    assert sorted(result.sources.values()) == ["scan/a.jpg", "scan/b.jpg", "scan/more/c.jpg"]
    assert (ws.images_dir / "a.jpg").read_bytes() == _jpeg(0)


def test_zip_drop_limits_come_from_the_config(tmp_path: Path) -> None:
    drop = tmp_path / "scan.zip"
    with zipfile.ZipFile(drop, "w") as zf:
        for i in range(3):
            zf.writestr(f"p{i}.jpg", _jpeg(i))
    with pytest.raises(ScandropError) as info:
        _ingest(drop, tmp_path, max_archive_files=2)
    assert info.value.code == ErrorCode.archive_too_large


def test_zip_without_photos_is_no_input(tmp_path: Path) -> None:
    drop = tmp_path / "scan.zip"
    with zipfile.ZipFile(drop, "w") as zf:
        zf.writestr("readme.txt", "x")
    with pytest.raises(ScandropError) as info:
        _ingest(drop, tmp_path)
    assert info.value.code == ErrorCode.no_input
    assert "scan.zip" in info.value.message


def _photos(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"p{i}.jpg").write_bytes(_jpeg(i))
    return folder


@pytest.mark.parametrize("link", ["outside.jpg", "sub/outside.jpg", "elsewhere"])
def test_links_out_of_the_drop_are_refused(tmp_path: Path, link: str) -> None:
    outside = _photos(tmp_path / "private")
    drop = _photos(tmp_path / "inbox" / "drop")
    (drop / "sub").mkdir()
    target = outside if link == "elsewhere" else outside / "p0.jpg"
    (drop / link).symlink_to(target)
    with pytest.raises(ScandropError) as info:
        _ingest(drop, tmp_path)
    assert info.value.code == ErrorCode.unsafe_input
    assert link in info.value.message
    assert "copy" in info.value.hint.lower()


def test_a_drop_that_is_a_link_out_of_the_inbox_is_refused(tmp_path: Path) -> None:
    outside = _photos(tmp_path / "private")
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "drop").symlink_to(outside)
    with pytest.raises(ScandropError) as info:
        _ingest(tmp_path / "inbox" / "drop", tmp_path)
    assert info.value.code == ErrorCode.unsafe_input


def test_links_inside_the_drop_are_fine(tmp_path: Path) -> None:
    drop = _photos(tmp_path / "drop" / "real")
    (drop.parent / "alias").symlink_to(drop, target_is_directory=True)  # a linked folder: not descended
    (drop.parent / "extra.jpg").symlink_to(drop / "p0.jpg")  # a linked file: read like any other
    result = _ingest(drop.parent, tmp_path)
    assert sorted(result.sources.values()) == ["extra.jpg", "real/p0.jpg", "real/p1.jpg", "real/p2.jpg"]


@pytest.mark.parametrize(
    ("name", "words"),
    [("walk.mp4", "Video"), ("walk.MOV", "Video"), ("one.jpg", "single photo"), ("scan.rar", ".rar")],
)
def test_unsupported_drops_say_what_to_drop(tmp_path: Path, name: str, words: str) -> None:
    drop = tmp_path / name
    drop.write_bytes(_jpeg(0))
    with pytest.raises(ScandropError) as info:
        _ingest(drop, tmp_path)
    assert info.value.code == ErrorCode.unsupported_input
    assert words in info.value.message
    assert "folder" in info.value.hint


def test_missing_drop_is_input_missing(tmp_path: Path) -> None:
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    for drop in (tmp_path / "gone", tmp_path / "gone.zip", tmp_path / "dangling"):
        with pytest.raises(ScandropError) as info:
            _ingest(drop, tmp_path)
        assert info.value.code == ErrorCode.input_missing
        assert info.value.hint
