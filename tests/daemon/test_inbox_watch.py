"""Which filesystem the inbox is on, which watch mode follows, and the native observer's life cycle."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from scandrop.daemon.inbox_watch import InboxWatch, choose_mode, filesystem_type, is_network
from scandrop.daemon.settings import WatchMode


def _mountinfo(tmp_path: Path) -> tuple[Path, Path]:
    """A fake /proc/self/mountinfo whose mounts sit under a real folder (so paths resolve)."""
    base = tmp_path.resolve() / "mnt"
    for name in ["nas", "nas2", "my share", "ssh", "nas/inner"]:
        (base / name).mkdir(parents=True)
    text = "\n".join(
        [
            "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro",
            f"40 22 0:45 / {base}/nas rw,relatime shared:20 - nfs4 nas:/export rw,vers=4.2,addr=10.0.0.2",
            f"41 22 8:17 / {base}/nas2 rw,relatime shared:21 - xfs /dev/sdb1 rw,attr2,inode64",
            f"42 22 0:47 / {base}/my\\040share rw,relatime shared:22 - cifs //srv/my\\040share rw,vers=3.1.1",
            f"43 22 0:48 / {base}/ssh rw,nosuid,nodev,relatime shared:23 - fuse.sshfs u@h:/ rw,user_id=1000",
            f"44 40 0:49 / {base}/nas/inner rw,relatime shared:24 - btrfs /dev/sdc1 rw,space_cache=v2",
            "",
        ]
    )
    path = tmp_path / "mountinfo"
    path.write_text(text)
    return path, base


def test_filesystem_type_per_mount(tmp_path: Path) -> None:
    mountinfo, base = _mountinfo(tmp_path)
    (base / "nas" / "inbox").mkdir()
    (base / "my share" / "inbox").mkdir()
    assert filesystem_type(base / "nas", mountinfo) == "nfs4"
    assert filesystem_type(base / "nas" / "inbox", mountinfo) == "nfs4"
    assert filesystem_type(base / "my share" / "inbox", mountinfo) == "cifs"
    assert filesystem_type(base / "ssh", mountinfo) == "fuse.sshfs"
    assert filesystem_type(tmp_path, mountinfo) == "ext4"  # only "/" contains it
    assert filesystem_type(Path("/"), mountinfo) == "ext4"


def test_filesystem_type_longest_prefix_wins(tmp_path: Path) -> None:
    mountinfo, base = _mountinfo(tmp_path)
    assert filesystem_type(base / "nas2", mountinfo) == "xfs"  # /mnt/nas2 is not inside /mnt/nas
    assert filesystem_type(base / "nas" / "inner", mountinfo) == "btrfs"  # nested mount beats its parent


def test_filesystem_type_of_a_path_not_there_yet(tmp_path: Path) -> None:
    mountinfo, base = _mountinfo(tmp_path)
    assert filesystem_type(base / "nas" / "not" / "yet", mountinfo) == "nfs4"
    assert filesystem_type(base / "my share" / "later", mountinfo) == "cifs"
    assert filesystem_type(base / "nas2-missing" / "x", mountinfo) == "ext4"


def test_filesystem_type_relative_path_and_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mountinfo, base = _mountinfo(tmp_path)
    (tmp_path / "to-nas").symlink_to(base / "nas")
    assert filesystem_type(tmp_path / "to-nas", mountinfo) == "nfs4"  # resolved before matching
    monkeypatch.chdir(base / "ssh")
    assert filesystem_type(Path("inbox"), mountinfo) == "fuse.sshfs"


def test_filesystem_type_unreadable_mountinfo(tmp_path: Path) -> None:
    assert filesystem_type(tmp_path, tmp_path / "no-such-mountinfo") == "unknown"


def test_filesystem_type_mount_point_with_non_ascii_and_space(tmp_path: Path) -> None:
    base = tmp_path.resolve()
    (base / "Fotos ü").mkdir()
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        f"45 22 0:50 / {base}/Fotos\\040ü rw,relatime - cifs //srv/fotos rw\n",
        encoding="utf-8",
    )
    assert filesystem_type(base / "Fotos ü" / "inbox", mountinfo) == "cifs"


def test_filesystem_type_of_this_machine_is_known(tmp_path: Path) -> None:
    assert filesystem_type(tmp_path) != "unknown"


@pytest.mark.parametrize(
    ("fstype", "network"),
    [
        ("nfs", True),
        ("nfs4", True),
        ("cifs", True),
        ("smb3", True),
        ("fuse.sshfs", True),
        ("fuse.rclone", True),
        ("9p", True),
        ("virtiofs", True),
        ("ext4", False),
        ("xfs", False),
        ("btrfs", False),
        ("overlay", False),
        ("tmpfs", False),
        ("zfs", False),
    ],
)
def test_is_network(fstype: str, network: bool) -> None:
    assert is_network(fstype) is network


@pytest.mark.parametrize(
    ("setting", "fstype", "expected"),
    [
        (WatchMode.auto, "nfs4", WatchMode.poll),
        (WatchMode.auto, "cifs", WatchMode.poll),
        (WatchMode.auto, "fuse.sshfs", WatchMode.poll),
        (WatchMode.auto, "ext4", WatchMode.native),
        (WatchMode.auto, "xfs", WatchMode.native),
        (WatchMode.auto, "btrfs", WatchMode.native),
        (WatchMode.auto, "overlay", WatchMode.native),
        (WatchMode.native, "nfs4", WatchMode.native),
        (WatchMode.native, "cifs", WatchMode.native),
        (WatchMode.poll, "ext4", WatchMode.poll),
        (WatchMode.poll, "xfs", WatchMode.poll),
    ],
)
def test_choose_mode(setting: WatchMode, fstype: str, expected: WatchMode) -> None:
    assert choose_mode(setting, fstype) == expected


def test_native_watch_wakes_and_survives_a_new_inbox(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    woke = threading.Event()
    watch = InboxWatch(inbox, WatchMode.native, woke.set)
    try:
        watch.ensure()
        first = watch._observer
        assert first is not None and first.is_alive()
        watch.ensure()  # same inbox: the same observer stays
        assert watch._observer is first

        (inbox / "shoot").mkdir()
        assert woke.wait(2.0)

        shutil.rmtree(inbox)
        inbox.mkdir()  # re-created at once: often the same inode, but the old watch ended with the folder
        deadline = time.monotonic() + 2.0
        while watch._observer is first and time.monotonic() < deadline:
            time.sleep(0.02)
            watch.ensure()  # the scanner calls this on every scan
        second = watch._observer
        assert second is not None and second is not first and second.is_alive()
        assert not first.is_alive()  # stopped and joined: it can no longer call wake
        woke.clear()
        watch.ensure()
        assert watch._observer is second
        (inbox / "photo.jpg").write_bytes(b"x")
        assert woke.wait(2.0)
    finally:
        watch.stop()
    assert watch._observer is None
    leftover = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert leftover == []


def test_native_watch_stops_when_the_inbox_is_gone(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    inbox = tmp_path / "inbox"
    watch = InboxWatch(inbox, WatchMode.native, lambda: None)
    watch.ensure()  # not there yet: nothing to watch
    assert watch._observer is None
    inbox.mkdir()
    watch.ensure()
    assert watch._observer is not None
    inbox.rmdir()
    watch.ensure()
    assert watch._observer is None
    assert [t for t in set(threading.enumerate()) - before if t.is_alive()] == []


def test_poll_mode_never_starts_an_observer(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    woke = threading.Event()
    watch = InboxWatch(tmp_path, WatchMode.poll, woke.set)
    watch.ensure()
    (tmp_path / "a.jpg").write_bytes(b"x")
    time.sleep(0.2)
    assert watch._observer is None
    assert not woke.is_set()
    assert set(threading.enumerate()) - before == set()
    watch.stop()
