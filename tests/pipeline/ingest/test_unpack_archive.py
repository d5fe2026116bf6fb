"""A zip drop is unpacked whole or not at all, and a hostile zip writes nothing anywhere."""

from __future__ import annotations

import io
import stat
import struct
import zipfile
from pathlib import Path

import pytest

from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.stage import never_stop
from scandrop.pipeline.ingest.unpack_archive import copy_capped, extract_zip

GiB = 2**30


def _zip(path: Path, entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)  # a ZipInfo keeps the name exactly as given
            info.compress_type = compression
            zf.writestr(info, data)
    return path


def _extract(archive: Path, dest: Path, max_bytes: int = GiB, max_files: int = 100) -> int:
    return extract_zip(archive, dest, max_bytes, max_files, never_stop)


def _fails(archive: Path, dest: Path, code: ErrorCode, **limits: int) -> ScandropError:
    with pytest.raises(ScandropError) as info:
        _extract(archive, dest, **limits)
    assert info.value.code == code
    assert info.value.hint
    # Nothing was written: no destination, no half-unpacked temporary folder beside it.
    assert not dest.exists()
    assert not dest.parent.exists() or not any(dest.parent.iterdir())
    return info.value


def _patch_headers(path: Path, offset_local: int, offset_central: int, fmt: str, value: int) -> None:
    """Overwrite one field in every local and central header (a hand-made hostile zip)."""
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", offset_local), (b"PK\x01\x02", offset_central)):
        start = data.find(signature)
        while start >= 0:
            struct.pack_into(fmt, data, start + offset, value)
            start = data.find(signature, start + 4)
    path.write_bytes(bytes(data))


def test_regular_files_are_unpacked_and_junk_skipped(tmp_path: Path) -> None:
    entries = {
        "scan/": b"",
        "scan/a.jpg": b"A" * 1000,
        "scan/sub/b.png": b"B" * 10,
        "./c.jpg": b"C",
        "__MACOSX/scan/._a.jpg": b"resource fork",
        "scan/.DS_Store": b"x",
        "scan/._b.png": b"x",
        "scan/Thumbs.db": b"x",
        "scan/Desktop.ini": b"x",
    }
    archive = _zip(tmp_path / "drop.zip", entries)
    dest = tmp_path / "ws" / "unpacked"
    assert _extract(archive, dest) == 3
    found = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert found == ["c.jpg", "scan/a.jpg", "scan/sub/b.png"]
    assert (dest / "scan" / "a.jpg").read_bytes() == b"A" * 1000
    assert sorted(p.name for p in dest.parent.iterdir()) == ["unpacked"]  # no temporary folder left


@pytest.mark.parametrize(
    "name",
    ["../evil.jpg", "scan/../../evil.jpg", "/tmp/evil.jpg", "C:/evil.jpg", "..\\evil.jpg", "C:\\x.jpg"],
)
def test_paths_that_leave_the_folder_are_refused(tmp_path: Path, name: str) -> None:
    # A good entry first: the bad one must be found before anything at all is written.
    archive = _zip(tmp_path / "drop.zip", {"a.jpg": b"A", name: b"evil"})
    error = _fails(archive, tmp_path / "ws" / "unpacked", ErrorCode.unsafe_archive)
    assert repr(name) in error.message
    assert not (tmp_path / "evil.jpg").exists()


@pytest.mark.parametrize("kind", [stat.S_IFLNK, stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK])
def test_links_and_devices_are_refused(tmp_path: Path, kind: int) -> None:
    archive = tmp_path / "drop.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.jpg", b"A")
        special = zipfile.ZipInfo("special.jpg")
        special.create_system = 3  # Unix: external_attr carries the file type
        special.external_attr = (kind | 0o777) << 16
        zf.writestr(special, "/etc/passwd")
    error = _fails(archive, tmp_path / "ws" / "unpacked", ErrorCode.unsafe_archive)
    assert "special.jpg" in error.message


def test_not_a_zip_and_truncated_zip_are_bad_archives(tmp_path: Path) -> None:
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"this is not a zip file at all" * 10)
    _fails(junk, tmp_path / "ws" / "unpacked", ErrorCode.bad_archive)
    good = _zip(tmp_path / "good.zip", {f"p{i}.jpg": bytes(range(256)) * 40 for i in range(3)})
    cut = tmp_path / "cut.zip"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _fails(cut, tmp_path / "ws" / "unpacked", ErrorCode.bad_archive)


def test_corrupt_data_is_a_bad_archive(tmp_path: Path) -> None:
    payload = b"".join(i.to_bytes(4, "little") for i in range(5000))  # compressible but not trivial
    archive = _zip(tmp_path / "drop.zip", {"a.jpg": payload})
    data = bytearray(archive.read_bytes())
    middle = 30 + len("a.jpg") + 200  # inside the compressed data of the only entry
    data[middle : middle + 64] = bytes(64)
    archive.write_bytes(bytes(data))
    error = _fails(archive, tmp_path / "ws" / "unpacked", ErrorCode.bad_archive)
    assert "'a.jpg' could not be read" in error.message


def test_encrypted_zip_is_refused_with_a_hint(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "drop.zip", {"a.jpg": b"A"})
    _patch_headers(archive, 6, 8, "<H", 0x1)  # general purpose flag bit 0: encrypted
    error = _fails(archive, tmp_path / "ws" / "unpacked", ErrorCode.bad_archive)
    assert "encrypted" in error.message and "password" in error.hint.lower()


def test_too_many_files_or_bytes_declared(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "drop.zip", {f"p{i}.jpg": b"x" * 1000 for i in range(3)})
    error = _fails(archive, tmp_path / "ws" / "unpacked", ErrorCode.archive_too_large, max_files=2)
    assert "3 files" in error.message
    error = _fails(archive, tmp_path / "ws" / "unpacked", ErrorCode.archive_too_large, max_bytes=2999)
    assert "2999 bytes" in error.message
    # The limits are inclusive.
    assert _extract(archive, tmp_path / "ws" / "unpacked", max_bytes=3000, max_files=3) == 3


def test_junk_does_not_count_towards_the_file_limit(tmp_path: Path) -> None:
    entries = {f"p{i}.jpg": b"x" for i in range(3)} | {f"__MACOSX/._p{i}.jpg": b"x" for i in range(3)}
    archive = _zip(tmp_path / "drop.zip", entries)
    assert _extract(archive, tmp_path / "ws" / "unpacked", max_files=3) == 3


def test_lying_size_header_cannot_unpack_more_than_declared(tmp_path: Path) -> None:
    # A 4 MiB entry of zeros whose headers claim 1000 bytes: the declared total passes the limit,
    # the real data does not. zipfile stops at the declared size and the CRC then fails.
    archive = _zip(tmp_path / "bomb.zip", {"a.jpg": bytes(4 * 2**20)})
    assert archive.stat().st_size < 10_000
    _patch_headers(archive, 22, 24, "<I", 1000)  # uncompressed size, local and central
    _fails(archive, tmp_path / "ws" / "unpacked", ErrorCode.bad_archive, max_bytes=10_000)


def test_streaming_copy_counts_real_bytes() -> None:
    # The byte counter itself, for a source that yields more than the budget (whatever headers say).
    out = io.BytesIO()
    with pytest.raises(ScandropError) as info:
        copy_capped(io.BytesIO(bytes(3 * 2**20)), out, 2**20 + 5)
    assert info.value.code == ErrorCode.archive_too_large
    assert out.tell() <= 2**20 + 5
    assert copy_capped(io.BytesIO(b"abc"), io.BytesIO(), 3) == 3


def test_name_clash_is_a_bad_archive(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "drop.zip", {"a.jpg": b"file", "a.jpg/b.jpg": b"below a file"})
    error = _fails(archive, tmp_path / "ws" / "unpacked", ErrorCode.bad_archive)
    assert "a.jpg/b.jpg" in error.message


def test_stop_request_leaves_nothing(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "drop.zip", {f"p{i}.jpg": b"x" for i in range(3)})
    dest = tmp_path / "ws" / "unpacked"
    with pytest.raises(ScandropError) as info:
        extract_zip(archive, dest, GiB, 100, lambda: True)
    assert info.value.code == ErrorCode.cancelled
    assert not dest.exists() and not any(dest.parent.iterdir())
