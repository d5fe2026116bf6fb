"""The systemd unit: notify protocol, watchdog, restart policy, hardening that leaves GPUs visible."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "scandrop.service"


def _service() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(f"{section}.{key}", []).append(value)
    return values


def test_unit_speaks_notify_with_a_watchdog_and_restarts() -> None:
    unit = _service()
    assert unit["Service.Type"] == ["notify"]
    assert int(unit["Service.WatchdogSec"][0]) >= 30
    assert unit["Service.Restart"] == ["on-failure"]
    assert unit["Service.User"] == ["scandrop"] and unit["Service.KillMode"] == ["mixed"]
    assert unit["Service.ExecStart"][0].endswith("scandrop daemon")


def test_unit_is_hardened_without_hiding_devices() -> None:
    unit = _service()
    assert unit["Service.ProtectSystem"] == ["strict"] and unit["Service.NoNewPrivileges"] == ["yes"]
    writable = unit["Service.ReadWritePaths"][0].split()
    mounts = unit["Unit.RequiresMountsFor"][0].split()
    assert mounts == writable  # the inbox and outbox: writable and mounted before start
    assert unit["Service.StateDirectory"] == ["scandrop"]
    for hides_gpus in ("PrivateDevices", "DevicePolicy", "DeviceAllow"):
        assert f"Service.{hides_gpus}" not in unit
    assert "AF_UNIX" in unit["Service.RestrictAddressFamilies"][0]  # the notify socket
    # numba's kernel cache must be writable under ProtectSystem=strict: in the state directory.
    numba_cache = [
        e.split("=", 1)[1] for e in unit["Service.Environment"] if e.startswith("NUMBA_CACHE_DIR=")
    ]
    assert numba_cache and numba_cache[0].startswith("/var/lib/scandrop/")


def test_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    unit = tmp_path / "scandrop.service"  # the installed ExecStart path does not exist on a dev box
    unit.write_text(re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", UNIT.read_text(), flags=re.M))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
