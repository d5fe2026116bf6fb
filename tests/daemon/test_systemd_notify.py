"""sd_notify spoken directly: a no-op outside systemd, one datagram inside, never blocking."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from scandrop.daemon.systemd_notify import notify, watchdog_interval


@pytest.fixture(autouse=True)
def no_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"]:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield sock, path
    sock.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    assert notify(READY=1) is False


def test_datagram_is_exact(monkeypatch: pytest.MonkeyPatch, listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify(READY=1, STATUS="x") is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=x"
    assert notify(WATCHDOG=1) is True
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"scandrop-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify(STOPPING=1, STATUS="draining 2 jobs") is True
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=draining 2 jobs"


def test_missing_socket_is_not_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert notify(READY=1) is False


def test_a_listener_that_never_reads_never_blocks(
    monkeypatch: pytest.MonkeyPatch, listener: tuple[socket.socket, str]
) -> None:
    _, path = listener  # bound, never read
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    started = time.monotonic()
    results = [notify(STATUS=f"progress {i} " + "x" * 200) for i in range(200)]
    elapsed = time.monotonic() - started
    assert elapsed < 1.0
    assert results[0] is True  # the first ones fit the queue
    assert False in results  # once it is full, messages are dropped instead of waiting


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    assert watchdog_interval() == 2.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 2.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None  # meant for another process
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "20000")
    assert watchdog_interval() == 0.05  # never busier than 20 pings a second
    monkeypatch.setenv("WATCHDOG_USEC", "garbage")
    assert watchdog_interval() is None
