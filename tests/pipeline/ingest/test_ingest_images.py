"""Ingest turns messy drops into clean images, and names every file it had to skip."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter, JpegImagePlugin

from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.stage import never_stop, no_progress
from scandrop.pipeline.core.workspace import Workspace
from scandrop.pipeline.ingest import ingest_images, photo_hygiene


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
    with Image.open(ws.images_dir / "big_0.jpg") as written:
        assert written.size == (1000, 750)
        assert JpegImagePlugin.get_sampling(written) == 0  # 4:4:4: the texture keeps the colour detail


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
    # The linked file is read; being byte-identical to real/p0.jpg, only the first of the two is used.
    assert sorted(result.sources.values()) == ["extra.jpg", "real/p1.jpg", "real/p2.jpg"]
    assert result.duplicates == [["extra.jpg", "real/p0.jpg"]]


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


# --- masks beside photos -------------------------------------------------------------------------


def _rect_mask(w: int, h: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """255 inside the box given as fractions (x0, y0, x1, y1) of the image, sampled at pixel centres."""
    u = (np.arange(w) + 0.5) / w
    v = (np.arange(h) + 0.5) / h
    inside = ((u >= box[0]) & (u < box[2]))[None, :] & ((v >= box[1]) & (v < box[3]))[:, None]
    return np.where(inside, 255, 0).astype(np.uint8)


def _agreement(ws: Workspace, name: str, expected: np.ndarray) -> float:
    got = np.asarray(Image.open(ws.mask_for(name)))
    assert got.shape == expected.shape
    return float(np.mean((got > 127) == (expected > 127)))


BOX = (0.2, 0.25, 0.7, 0.8)


def test_mask_files_beside_photos_follow_the_resize(tmp_path: Path) -> None:
    src = tmp_path / "drop"
    src.mkdir()
    for i in range(3):
        Image.fromarray(_texture(400, 300, i)).save(src / f"p{i}.jpg")
    Image.fromarray(_rect_mask(400, 300, BOX)).save(src / "p0_mask.png")
    Image.fromarray(_rect_mask(200, 150, BOX)).save(src / "p1-MASK.PNG")  # half size, any case
    Image.fromarray(_rect_mask(400, 300, BOX)).save(src / "p2_mask.jpg", quality=80)  # JPEG noise
    ws = Workspace(tmp_path / "ws").create()
    config = ingest_images.IngestConfig(max_image_size=256)
    result = ingest_images.run(config, src, ws, no_progress, never_stop)
    assert result.images_in == 3 and result.usable == 3 and not result.rejected  # masks are not photos
    assert result.masked == 3 and result.masks_from_files == 3
    expected = _rect_mask(256, 192, BOX)
    for name in result.names:
        assert _agreement(ws, name, expected) > 0.99, name


def test_masks_folder_variants(tmp_path: Path) -> None:
    src = tmp_path / "drop"
    (src / "masks").mkdir(parents=True)
    (src / "sub" / "Masks").mkdir(parents=True)  # any case
    photos = ["a.jpg", "b.jpg", "sub/c.jpg", "sub/d.jpg", "e.jpg"]
    for i, rel in enumerate(photos):
        Image.fromarray(_texture(160, 120, i)).save(src / rel)
    Image.fromarray(_rect_mask(160, 120, BOX)).save(src / "masks" / "a.jpg.png")  # COLMAP naming
    Image.fromarray(_rect_mask(160, 120, BOX)).save(src / "masks" / "b.png")
    Image.fromarray(_rect_mask(160, 120, BOX)).save(src / "masks" / "c.bmp")  # drop root, photo in sub/
    Image.fromarray(_rect_mask(80, 60, BOX)).save(src / "sub" / "Masks" / "d.jpg.png")
    result = _ingest(src, tmp_path)
    assert result.images_in == 5 and result.usable == 5
    assert result.masked == 4 and result.masks_from_files == 4
    ws = Workspace(tmp_path / "ws")
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        assert _agreement(ws, name, _rect_mask(160, 120, BOX)) > 0.99, name
    assert not ws.mask_for("e.jpg").exists()


def test_alpha_and_mask_file_intersect(tmp_path: Path) -> None:
    src = tmp_path / "drop"
    src.mkdir()
    for i in range(3):
        rgba = np.dstack([_texture(200, 100, i), _rect_mask(200, 100, (0.0, 0.0, 0.5, 1.0))])  # left half
        Image.fromarray(rgba, "RGBA").save(src / f"cut{i}.png")
    Image.fromarray(_rect_mask(200, 100, (0.0, 0.0, 1.0, 0.5))).save(src / "cut0_mask.png")  # top half
    result = _ingest(src, tmp_path)
    assert result.masked == 3 and result.masks_from_files == 1
    ws = Workspace(tmp_path / "ws")
    assert _agreement(ws, "cut0.png", _rect_mask(200, 100, (0.0, 0.0, 0.5, 0.5))) == 1.0
    assert _agreement(ws, "cut1.png", _rect_mask(200, 100, (0.0, 0.0, 0.5, 1.0))) == 1.0


def test_unusable_masks_skip_their_photo(tmp_path: Path) -> None:
    src = tmp_path / "drop"
    src.mkdir()
    for i in range(5):
        Image.fromarray(_texture(160, 120, i)).save(src / f"p{i}.jpg")
    Image.fromarray(_rect_mask(120, 120, BOX)).save(src / "p3_mask.png")  # square mask, 4:3 photo
    Image.fromarray(np.zeros((120, 160), np.uint8)).save(src / "p4_mask.png")
    Image.fromarray(_texture(160, 120, 9)[..., 0]).save(src / "gone_mask.png")  # its photo was deleted
    result = _ingest(src, tmp_path)
    assert result.usable == 3 and result.masked == 0
    reasons = {r.file: r.reason for r in result.rejected}
    assert set(reasons) == {"p3.jpg", "p4.jpg", "gone_mask.png"}
    assert "p3_mask.png is 120x120" in reasons["p3.jpg"] and "aspect" in reasons["p3.jpg"]
    assert "all background" in reasons["p4.jpg"]
    assert "no photo named gone.*" in reasons["gone_mask.png"]


def test_masks_follow_exif_orientation(tmp_path: Path) -> None:
    """The photo is stored 300x200 with "rotate 90" and shows 200x300: a mask in either orientation
    lands on the same object pixels."""
    src = tmp_path / "drop"
    src.mkdir()
    stored_box = (0.1, 0.1, 0.4, 0.5)  # a box in the stored (landscape) pixels
    for i in range(3):
        img = Image.fromarray(_texture(300, 200, i))
        exif = img.getexif()
        exif[0x0112] = 6
        img.save(src / f"r{i}.jpg", exif=exif)
    stored = Image.fromarray(_rect_mask(300, 200, stored_box))
    shown = stored.transpose(Image.Transpose.ROTATE_270)  # what exif_transpose does for orientation 6
    stored.save(src / "r0_mask.png")
    shown.save(src / "r1_mask.png")
    shown.resize((100, 150), Image.Resampling.NEAREST).save(src / "r2_mask.png")
    result = _ingest(src, tmp_path)
    assert result.masks_from_files == 3
    ws = Workspace(tmp_path / "ws")
    expected = np.asarray(shown)
    assert expected.shape == (300, 200)
    for name in ("r0.jpg", "r1.jpg", "r2.jpg"):
        assert _agreement(ws, name, expected) > 0.99, name


def test_file_masks_reach_feature_extraction(tmp_path: Path) -> None:
    """COLMAP reads the ingested masks (masks/<image>.png): no keypoint lies outside the object."""
    pycolmap = pytest.importorskip("pycolmap")
    src = tmp_path / "drop"
    src.mkdir()
    for i in range(3):
        Image.fromarray(_texture(320, 240, i)).save(src / f"p{i}.png")
        Image.fromarray(_rect_mask(320, 240, BOX)).save(src / f"p{i}_mask.png")
    ws = Workspace(tmp_path / "ws").create()
    result = ingest_images.run(ingest_images.IngestConfig(), src, ws, no_progress, never_stop)
    reader = pycolmap.ImageReaderOptions()
    reader.mask_path = str(ws.masks_dir)
    pycolmap.extract_features(ws.database, ws.images_dir, image_names=result.names, reader_options=reader)
    db = pycolmap.Database.open(ws.database)
    for image in db.read_all_images():
        xy = db.read_keypoints(image.image_id)[:, :2]
        assert len(xy) > 50
        u, v = xy[:, 0] / 320, xy[:, 1] / 240
        inside = (u > BOX[0] - 0.01) & (u < BOX[2] + 0.01) & (v > BOX[1] - 0.01) & (v < BOX[3] + 0.01)
        assert inside.all(), image.name
    db.close()


# --- hygiene -------------------------------------------------------------------------------------


def _scene(w: int, h: int, seed: int) -> np.ndarray:
    """Photo-like texture: blobs of several sizes, not pixel noise."""
    rng = np.random.default_rng(seed)
    out = np.zeros((h, w, 3), np.float64)
    for cell in (4, 16, 64):
        coarse = rng.random((h // cell + 2, w // cell + 2, 3))
        up = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((w + 2 * cell, h + 2 * cell)))
        out += up[cell : cell + h, cell : cell + w] / 3
    return out.astype(np.uint8)


def test_blurred_photos_are_reported_and_can_be_dropped(tmp_path: Path) -> None:
    src = tmp_path / "drop"
    src.mkdir()
    for i in range(5):
        Image.fromarray(_scene(480, 360, i)).save(src / f"p{i}.png")
    Image.fromarray(_scene(480, 360, 7)).filter(ImageFilter.GaussianBlur(3)).save(src / "shaky.png")
    result = _ingest(src, tmp_path)
    assert result.blurred == ["shaky.png"]
    assert result.usable == 6 and not result.rejected  # reported, kept by default
    dropped = _ingest(src, tmp_path / "again", drop_blurred=True)
    assert dropped.blurred == ["shaky.png"] and dropped.usable == 5
    assert [r.file for r in dropped.rejected] == ["shaky.png"]
    assert "blurred" in dropped.rejected[0].reason
    assert not (tmp_path / "again" / "ws" / "images" / "shaky.png").exists()


def test_identical_files_are_skipped_and_near_duplicates_reported(tmp_path: Path) -> None:
    src = tmp_path / "drop"
    src.mkdir()
    for i in range(4):
        Image.fromarray(_scene(320, 240, i)).save(src / f"p{i}.png")
    (src / "p9 copy.png").write_bytes((src / "p0.png").read_bytes())
    nudged = _scene(320, 240, 2).astype(np.int16)
    nudged[::7, ::5] += 20  # a re-saved, slightly edited copy: not the same bytes, nearly the same view
    Image.fromarray(np.clip(nudged, 0, 255).astype(np.uint8)).save(src / "p2b.png")
    result = _ingest(src, tmp_path)
    assert result.duplicates == [["p0.png", "p9 copy.png"]]
    assert [(r.file, r.reason) for r in result.rejected] == [("p9 copy.png", "identical to p0.png")]
    assert result.near_duplicates == [["p2.png", "p2b.png"]]
    assert result.usable == 5  # near duplicates are kept


def test_near_duplicate_search_matches_all_pairs() -> None:
    """The k-d tree search finds exactly the pairs an all-pairs comparison finds."""
    rng = np.random.default_rng(0)
    n = 160
    thumbs = rng.uniform(0, 255, (n, 64, 64)).astype(np.float32)
    twins = rng.choice(n, size=(30, 2), replace=False)  # scattered in name order
    for a, b in twins:
        thumbs[b] = thumbs[a] + rng.normal(0, 1.0, (64, 64)).astype(np.float32)
    sizes = [(640, 480)] * n
    sizes[int(twins[0, 1])] = (480, 640)  # same picture, another size: not a near duplicate
    found = photo_hygiene.near_duplicate_pairs(thumbs, sizes, 2.0)
    brute = [
        (i, j)
        for i in range(n)
        for j in np.flatnonzero(np.abs(thumbs[i + 1 :] - thumbs[i]).mean(axis=(1, 2)) < 2.0) + i + 1
        if sizes[i] == sizes[j]
    ]
    assert found == brute and len(brute) == 29
    assert sum(j - i > 1 for i, j in found) > 20  # most were found by the tree, not by name order


# --- HEIC ---------------------------------------------------------------------------------------


def test_heic_is_read_upright_and_converted_to_jpeg(tmp_path: Path) -> None:
    pytest.importorskip("pillow_heif")
    src = tmp_path / "drop"
    src.mkdir()
    stored = []
    for i in range(3):
        arr = _scene(300, 200, i)
        arr[:40, :60] = (255, 0, 0)  # a red corner in the stored top-left
        stored.append(arr)
        img = Image.fromarray(arr)
        exif = img.getexif()
        exif[0x0112] = 6
        img.save(src / f"phone{i}.HEIC", format="HEIF", exif=exif.tobytes(), quality=90)
    ws = Workspace(tmp_path / "ws").create()
    result = ingest_images.run(ingest_images.IngestConfig(), src, ws, no_progress, never_stop)
    assert result.names == ["phone0.jpg", "phone1.jpg", "phone2.jpg"] and not result.rejected
    out = Image.open(ws.images_dir / "phone0.jpg")
    assert out.format == "JPEG" and out.size == (200, 300)
    got = np.asarray(out).astype(np.float64)
    upright = np.rot90(stored[0], k=-1).astype(np.float64)  # orientation 6: turn 90 degrees clockwise
    assert np.abs(got - upright).mean() < 8.0
    assert got[5, -5, 0] > 200 and got[5, -5, 1] < 60  # the red corner is now top-right
