"""systemd's notify protocol (sd_notify), spoken directly: one datagram to $NOTIFY_SOCKET.

No dependency: the protocol is a newline-separated list of VAR=value sent to a Unix socket
("@" starts an abstract one). Outside systemd NOTIFY_SOCKET is unset and every call is a no-op.
"""

from __future__ import annotations

import os
import socket


def notify(**fields: str | int) -> bool:
    """notify(READY=1, STATUS="...") -> True when systemd was told."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)  # a listener that does not read must never stall the daemon
            sock.sendto(message, address)
    except OSError:  # includes BlockingIOError: a full queue drops this one message
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.05, int(usec) / 2e6)
    except ValueError:
        return None
