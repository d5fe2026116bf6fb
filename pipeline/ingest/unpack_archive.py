"""Unpack a zip drop without trusting it: no writes outside the destination, no links, bounded size.

Every entry is checked before anything is written, so a hostile zip leaves nothing behind. Sizes
are bounded twice: by what the zip declares, and by the bytes actually written, because a zip bomb
can lie in its headers. The destination appears only once every file is in (atomic_dir).
"""

from __future__ import annotations

import lzma
import re
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.stage import StopCheck, atomic_dir, check_stop

CHUNK = 1 << 20
JUNK_NAMES = {"thumbs.db", "desktop.ini"}
_DRIVE = re.compile(r"^[A-Za-z]:")
# What decompressing a damaged entry can raise (bz2 reports bad data as OSError).
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, NotImplementedError)

UNSAFE_HINT = (
    "Zip a plain folder of photos (for example with your file manager's Compress) and drop that zip, "
    "or drop the folder itself."
)
BAD_HINT = "The zip may be damaged or incomplete: copy it again from its source, or drop the folder itself."
ENCRYPTED_HINT = (
    "Encrypted (password-protected) zips are not supported: zip the photos without a password, "
    "or drop the folder."
)


def _human(size: int) -> str:
    if size >= 2**30:
        return f"{size / 2**30:.1f} GiB"
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size} bytes"


def _too_large(what: str, max_bytes: int, max_files: int) -> ScandropError:
    return ScandropError(
        ErrorCode.archive_too_large,
        f"The zip {what}.",
        f"Split the photos into smaller zips (at most {max_files} files and {_human(max_bytes)} "
        "unpacked each), drop the folder itself, or raise ingest.max_archive_files/max_archive_bytes.",
    )


def _entry_parts(info: zipfile.ZipInfo) -> tuple[str, ...]:
    """The entry's path components; raises unsafe_archive for anything that could escape `dest`."""
    name = info.filename.replace("\\", "/")  # Windows tools write backslashes
    if name.startswith("/") or _DRIVE.match(name):
        raise ScandropError(
            ErrorCode.unsafe_archive, f"The zip entry {info.filename!r} has an absolute path.", UNSAFE_HINT
        )
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if ".." in parts:
        raise ScandropError(
            ErrorCode.unsafe_archive,
            f"The zip entry {info.filename!r} points outside the zip's folder ('..').",
            UNSAFE_HINT,
        )
    kind = stat.S_IFMT(info.external_attr >> 16)  # Unix file type, 0 when the zip was made elsewhere
    if kind == stat.S_IFLNK:
        raise ScandropError(
            ErrorCode.unsafe_archive, f"The zip entry {info.filename!r} is a symbolic link.", UNSAFE_HINT
        )
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise ScandropError(
            ErrorCode.unsafe_archive,
            f"The zip entry {info.filename!r} is a device or pipe, not a file.",
            UNSAFE_HINT,
        )
    return parts


def _is_junk(parts: tuple[str, ...]) -> bool:
    """Desktop and sync-tool leftovers (macOS resource forks, thumbnails, hidden files)."""
    return (
        not parts
        or parts[0] == "__MACOSX"
        or any(p.startswith(".") for p in parts)
        or parts[-1].lower() in JUNK_NAMES
    )


def copy_capped(src: BinaryIO, dst: BinaryIO, budget: int, name: str = "") -> int:
    """Copy `src` to `dst` in chunks; raise archive_too_large once more than `budget` bytes came out.

    Counts real bytes, not declared ones, so headers that understate a size cannot fill the disk.
    Read failures (corrupt or unsupported data) become bad_archive; `name` is the entry, for messages.
    """
    written = 0
    while True:
        try:
            chunk = src.read(CHUNK)
        except _READ_ERRORS as exc:
            message = f"The zip entry {name!r} could not be read ({type(exc).__name__}: {exc})."
            raise ScandropError(ErrorCode.bad_archive, message, BAD_HINT) from exc
        if not chunk:
            return written
        written += len(chunk)
        if written > budget:
            raise ScandropError(
                ErrorCode.archive_too_large,
                f"The zip entry {name!r} unpacks to more data than declared, or than allowed.",
                "The zip may be malicious (a zip bomb): do not open it; drop the folder of photos instead.",
            )
        dst.write(chunk)


def extract_zip(archive: Path, dest: Path, max_bytes: int, max_files: int, should_stop: StopCheck) -> int:
    """Extract the regular files of `archive` into `dest` (created whole, or not at all).

    Junk (directories, __MACOSX/, hidden files, Thumbs.db, desktop.ini) is skipped. Returns the
    number of files written.
    """
    try:
        with zipfile.ZipFile(archive) as zf:
            checked = [(info, _entry_parts(info)) for info in zf.infolist()]  # all of them, before writing
            files = [(info, parts) for info, parts in checked if not info.is_dir() and not _is_junk(parts)]
            for info, _ in files:
                if info.flag_bits & 0x1:
                    message = f"The zip entry {info.filename!r} is encrypted."
                    raise ScandropError(ErrorCode.bad_archive, message, ENCRYPTED_HINT)
            if len(files) > max_files:
                raise _too_large(f"holds {len(files)} files, more than {max_files}", max_bytes, max_files)
            declared = sum(info.file_size for info, _ in files)
            if declared > max_bytes:
                raise _too_large(
                    f"unpacks to {_human(declared)}, more than {_human(max_bytes)}",
                    max_bytes,
                    max_files,
                )
            left = max_bytes
            with atomic_dir(dest) as staging:
                for info, parts in files:
                    check_stop(should_stop)
                    target = staging.joinpath(*parts)
                    try:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with zf.open(info) as src, open(target, "wb") as dst:
                            left -= copy_capped(src, dst, left, info.filename)
                    except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
                        raise ScandropError(
                            ErrorCode.bad_archive,
                            f"The zip entry {info.filename!r} clashes with another entry of the same name.",
                            BAD_HINT,
                        ) from exc
            return len(files)
    except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, NotImplementedError, ValueError) as exc:
        message = f"{archive.name} is not a readable zip ({type(exc).__name__}: {exc})."
        raise ScandropError(ErrorCode.bad_archive, message, BAD_HINT) from exc
