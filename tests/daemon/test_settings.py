"""Settings: contract names, defaults < TOML < SCANDROP_* env, the token rule, and `scandrop config`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from pydantic import ValidationError

import scandrop.daemon.settings as settings_module
from scandrop.daemon.cli import main
from scandrop.daemon.settings import DEFAULT_IGNORE, Settings, WatchMode, load_settings
from scandrop.models.device import DeviceRequest

CONTRACT = [
    "inbox",
    "outbox",
    "state_dir",
    "http_host",
    "http_port",
    "token",
    "watch_mode",
    "stability_seconds",
    "ready_marker",
    "concurrency",
    "job_timeout",
    "device",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No SCANDROP_* from the caller's shell or another test; none left behind (load_settings sets one)."""
    for name in [n for n in os.environ if n.startswith("SCANDROP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_FILE", tmp_path / "no-such" / "scandrop.toml")
    logging_config = structlog.get_config()
    yield
    for name in [n for n in os.environ if n.startswith("SCANDROP_")]:
        del os.environ[name]
    structlog.configure(**logging_config)  # cli.main configures logging onto the captured stderr


def test_contract_fields_exist() -> None:
    missing = [name for name in CONTRACT if name not in Settings.model_fields]
    assert missing == []


def test_defaults() -> None:
    s = Settings()
    assert s.inbox == Path("inbox")
    assert s.outbox == Path("outbox")
    assert s.http_host == "127.0.0.1"
    assert s.http_port == 8765
    assert s.token is None
    assert s.watch_mode == WatchMode.auto
    assert s.stability_seconds == 5.0
    assert s.ready_marker == "READY"
    assert s.concurrency == 1
    assert s.job_timeout == 3600.0
    assert s.device == DeviceRequest.auto
    assert s.ignore == DEFAULT_IGNORE
    assert s.spool == Path("inbox/.scandrop")


def test_environment_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {
        "SCANDROP_INBOX": str(tmp_path / "in"),
        "SCANDROP_OUTBOX": str(tmp_path / "out"),
        "SCANDROP_STATE_DIR": str(tmp_path / "state"),
        "SCANDROP_HTTP_HOST": "::1",
        "SCANDROP_HTTP_PORT": "9000",
        "SCANDROP_TOKEN": "s3cret",
        "SCANDROP_WATCH_MODE": "poll",
        "SCANDROP_STABILITY_SECONDS": "2.5",
        "SCANDROP_READY_MARKER": "DONE",
        "SCANDROP_CONCURRENCY": "3",
        "SCANDROP_JOB_TIMEOUT": "120",
        "SCANDROP_DEVICE": "cpu",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = Settings()
    assert s.inbox == tmp_path / "in"
    assert s.outbox == tmp_path / "out"
    assert s.state_dir == tmp_path / "state"
    assert s.http_host == "::1"
    assert s.http_port == 9000
    assert s.token is not None and s.token.get_secret_value() == "s3cret"
    assert s.watch_mode == WatchMode.poll
    assert s.stability_seconds == 2.5
    assert s.ready_marker == "DONE"
    assert s.concurrency == 3
    assert s.job_timeout == 120.0
    assert s.device == DeviceRequest.cpu


def test_environment_values_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCANDROP_CONCURRENCY", "0")
    with pytest.raises(ValidationError, match="concurrency"):
        Settings()


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scandrop.toml"
    path.write_text(text)
    return path


TOML = """
inbox = "/srv/scans/inbox"
http_port = 8000
watch_mode = "native"
concurrency = 2
ready_marker = "GO"
ignore = ["*.bak"]
"""


def test_toml_file_from_scandrop_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SCANDROP_CONFIG", str(_toml(tmp_path, TOML)))
    s = Settings()
    assert s.inbox == Path("/srv/scans/inbox")
    assert s.http_port == 8000
    assert s.watch_mode == WatchMode.native
    assert s.concurrency == 2
    assert s.ready_marker == "GO"
    assert s.ignore == ["*.bak"]
    assert s.outbox == Path("outbox")  # not in the file: the default


def test_environment_beats_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SCANDROP_CONFIG", str(_toml(tmp_path, TOML)))
    monkeypatch.setenv("SCANDROP_HTTP_PORT", "9000")
    monkeypatch.setenv("SCANDROP_WATCH_MODE", "poll")
    s = Settings()
    assert s.http_port == 9000
    assert s.watch_mode == WatchMode.poll
    assert s.concurrency == 2  # only in the file


def test_load_settings_overrides_beat_everything(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SCANDROP_INBOX", "/from/env")
    s = load_settings(_toml(tmp_path, TOML), inbox=tmp_path / "cli", outbox=None)
    assert s.inbox == tmp_path / "cli"
    assert s.outbox == Path("outbox")  # None means "not given"
    assert s.http_port == 8000


def test_toml_unknown_key_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SCANDROP_CONFIG", str(_toml(tmp_path, 'inbx = "typo"\n')))
    with pytest.raises(ValidationError, match="inbx"):
        Settings()


def test_missing_config_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from scandrop.pipeline.core.errors import ErrorCode, ScandropError

    monkeypatch.setenv("SCANDROP_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ScandropError) as info:
        Settings()
    assert info.value.code == ErrorCode.invalid_settings


def test_public_host_without_token_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCANDROP_HTTP_HOST", "0.0.0.0")
    with pytest.raises(ValidationError, match="token"):
        Settings()
    with pytest.raises(ValidationError, match="token"):
        Settings(http_host="192.168.1.20")
    with pytest.raises(ValidationError, match="token"):
        Settings(http_host="0.0.0.0", token="")


def test_public_host_with_token_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCANDROP_HTTP_HOST", "0.0.0.0")
    monkeypatch.setenv("SCANDROP_TOKEN", "s3cret")
    s = Settings()
    assert s.http_host == "0.0.0.0"
    assert s.token is not None and s.token.get_secret_value() == "s3cret"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_hosts_need_no_token(host: str) -> None:
    assert Settings(http_host=host).token is None


def test_config_command_prints_json_with_the_token_masked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SCANDROP_HTTP_HOST", "0.0.0.0")
    monkeypatch.setenv("SCANDROP_TOKEN", "very-secret-token-42")
    monkeypatch.setenv("SCANDROP_HTTP_PORT", "9000")
    assert main(["config"]) == 0
    out, err = capsys.readouterr()
    assert "very-secret-token-42" not in out + err
    printed = json.loads(out)
    assert printed["token"] == "**********"
    assert printed["http_host"] == "0.0.0.0"
    assert printed["http_port"] == 9000
    assert set(CONTRACT) <= set(printed)


def test_config_command_with_config_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "--config", str(_toml(tmp_path, TOML))]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["http_port"] == 8000
    assert printed["token"] is None


def test_config_command_reports_invalid_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SCANDROP_HTTP_HOST", "0.0.0.0")
    assert main(["config"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error [invalid_settings]: http_host 0.0.0.0 is reachable from other machines")
    assert "token" in err and "Value error" not in err and ": :" not in err
    monkeypatch.setenv("SCANDROP_HTTP_HOST", "127.0.0.1")
    monkeypatch.setenv("SCANDROP_CONCURRENCY", "0")
    assert main(["config"]) == 2
    assert capsys.readouterr().err.startswith("error [invalid_settings]: concurrency: Input should be")


def test_hot_folders_from_the_toml_file_and_their_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = """
inbox = "/srv/in"
[[hot_folders]]
name = "quality"
inbox = "/srv/quality"
preset = "quality"
device = "cpu"
[hot_folders.stages.mesh]
depth = 9
"""
    s = load_settings(_toml(tmp_path, good))
    (folder,) = s.hot_folders
    assert folder.name == "quality" and folder.inbox == Path("/srv/quality") and folder.outbox is None
    assert folder.preset == "quality" and folder.device == DeviceRequest.cpu
    assert folder.stages == {"mesh": {"depth": 9}}
    same_inbox = good.replace('"/srv/quality"', '"/srv/in"')
    assert main(["config", "--config", str(_toml(tmp_path, same_inbox))]) == 2
    assert capsys.readouterr().err.startswith("error [invalid_settings]: hot_folders: every hot folder")
    typo = good.replace("preset =", "presett =")
    assert main(["config", "--config", str(_toml(tmp_path, typo))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error [invalid_settings]: hot_folders.0.presett: Extra inputs are not permitted")
