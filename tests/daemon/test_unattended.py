"""Unattended operation with the real daemon: drop settings and hot folders, on_finish, a signed
webhook delivered across a restart, /metrics, a disk that fills mid-job, and low free space.

One daemon for the module: global preset quality, a hot folder with preset balanced, one real job
(fast, from its drop's scandrop.toml, in the hot folder) and tiny drops that fail within seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from daemon_process import Daemon, free_port, wait_for
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

SECRET = "webhook-secret"

# Imported by every Python process of the daemon (PYTHONPATH): in the job process only, opening a
# file for writing under a path that names a drop "diskfull" fails as a full disk would.
FULL_DISK = """
import builtins, errno, io, multiprocessing, os
_open = io.open
def _open_on_full_disk(file, mode="r", *args, **kwargs):
    if (isinstance(file, (str, os.PathLike)) and "diskfull" in os.fspath(file)
            and any(c in mode for c in "wax+")
            and multiprocessing.current_process().name == "scandrop-job"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(file))
    return _open(file, mode, *args, **kwargs)
builtins.open = io.open = _open_on_full_disk
"""

# on_finish: writes the SCANDROP_* environment it was given to <folder>/<job id>.json.
ON_FINISH = """
import json, os, sys
env = {k: v for k, v in os.environ.items() if k.startswith("SCANDROP_JOB_")}
with open(os.path.join(sys.argv[1], env["SCANDROP_JOB_ID"] + ".json"), "w") as f:
    json.dump(env, f)
"""


class Receiver:
    """A webhook receiver: a local aiohttp server in a thread that keeps every POST."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        async def take(request: web.Request) -> web.Response:
            self.posts.append((dict(request.headers), await request.read()))
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/hook", take)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def __enter__(self) -> Receiver:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def _tiny_drop(folder: Path, settings: str | None = None) -> None:
    """Two random photos: a job that fails (too_few_images) within seconds."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(folder.name))
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    if settings is not None:
        (folder / "scandrop.toml").write_text(settings)
    (folder / "READY").touch()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("unattended")
    hooks, site = root / "hooks", root / "site"
    hooks.mkdir()
    site.mkdir()
    (site / "sitecustomize.py").write_text(FULL_DISK)
    (root / "on_finish.py").write_text(ON_FINISH)
    hook_port = free_port()
    config = root / "scandrop.toml"
    config.write_text(
        f"""
on_finish = "{sys.executable} '{root / "on_finish.py"}' '{hooks}'"
webhook_url = "http://127.0.0.1:{hook_port}/hook"
webhook_secret = "{SECRET}"

[[hot_folders]]
name = "sharp"
inbox = "{root / "sharp-inbox"}"
outbox = "{root / "sharp-outbox"}"
preset = "balanced"
"""
    )
    daemon = Daemon(root, preset="quality", concurrency=2)
    env = {"SCANDROP_CONFIG": str(config), "PYTHONPATH": str(site)}
    daemon.start(env)
    yield {"daemon": daemon, "hooks": hooks, "hook_port": hook_port, "env": env, "root": root}
    daemon.stop()


@pytest.fixture(scope="module")
def finished(setup: dict[str, Any], photos: Path) -> dict[str, dict[str, Any]]:
    """Every drop of the module, run to its end; by drop name."""
    daemon: Daemon = setup["daemon"]
    fast = setup["root"] / "sharp-inbox" / "fast robot"
    shutil.copytree(photos, fast)
    (fast / "scandrop.toml").write_text('preset = "fast"\n')
    (fast / "READY").touch()
    _tiny_drop(daemon.inbox / "typo", 'presett = "fast"\n')
    _tiny_drop(setup["root"] / "sharp-inbox" / "hot")
    _tiny_drop(daemon.inbox / "diskfull")
    names = {"fast robot", "typo", "hot", "diskfull"}
    seen: list[dict[str, Any]] = []  # every poll of every job, for the remaining-time estimate

    def all_done() -> bool:
        jobs = daemon.jobs()
        seen.extend(jobs)
        return {j["input"]["name"] for j in jobs if j["state"] in ("succeeded", "failed")} == names

    wait_for(all_done, 240, "every drop to finish", every=0.5)
    setup["seen"] = seen
    return {j["input"]["name"]: j for j in daemon.jobs()}


def _report(job: dict[str, Any]) -> dict[str, Any]:
    return json.loads((Path(job["outbox"]) / "report.json").read_text())


def test_drop_settings_and_hot_folders(setup: dict[str, Any], finished: dict[str, dict[str, Any]]) -> None:
    fast, typo, hot, main = (finished[n] for n in ("fast robot", "typo", "hot", "diskfull"))
    # The drop's scandrop.toml beats its hot folder's preset (balanced), and the job really ran fast.
    assert fast["state"] == "succeeded", fast["error"]
    assert _report(fast)["preset"] == "fast" and fast["report"]["preset"] == "fast"
    assert fast["settings"]["preset"] == "fast"
    assert fast["settings"]["sources"] == ["settings", "hot folder sharp", "scandrop.toml"]
    # A bad key fails that job only, naming the key.
    assert typo["state"] == "failed" and typo["error"]["code"] == "invalid_settings"
    assert "presett" in typo["error"]["message"] and "scandrop.toml" in typo["error"]["message"]
    # Without a drop file: the hot folder's own preset there, the global one in the main inbox.
    assert hot["error"]["code"] == "too_few_images" and _report(hot)["preset"] == "balanced"
    assert main["report"]["preset"] == "quality" and main["settings"]["sources"] == ["settings"]
    assert hot["hot_folder"] == "sharp" and main["hot_folder"] is None
    root = setup["root"]
    assert Path(hot["outbox"]).parent == root / "sharp-outbox" == Path(fast["outbox"]).parent
    assert Path(main["outbox"]).parent == setup["daemon"].outbox
    assert Path(hot["input"]["location"]).parent.parent == root / "sharp-inbox" / ".scandrop" / "failed"
    assert Path(fast["input"]["location"]).parent.parent == root / "sharp-inbox" / ".scandrop" / "done"
    status = setup["daemon"].get("/api/status")
    assert [h["name"] for h in status["hot_folders"]] == ["sharp"]
    assert status["hot_folders"][0]["watcher"]["healthy"]


def test_a_disk_filling_mid_job_fails_it_as_disk_full(
    setup: dict[str, Any], finished: dict[str, dict[str, Any]]
) -> None:
    daemon: Daemon = setup["daemon"]
    job = finished["diskfull"]
    assert job["state"] == "failed" and job["error"]["code"] == "disk_full", job["error"]
    assert "No space left" in job["error"]["message"] and job["error"]["hint"]
    torn = [p for p in (daemon.state / "work").rglob("*") if ".part" in p.name]
    torn += [p for p in Path(job["outbox"]).rglob("*") if ".part" in p.name]
    assert torn == []
    assert daemon.request("GET", "/healthz")[0] == 200
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_on_finish_gets_each_job_in_its_environment(
    setup: dict[str, Any], finished: dict[str, dict[str, Any]]
) -> None:
    for name in ("fast robot", "hot"):
        job = finished[name]
        path = setup["hooks"] / f"{job['job_id']}.json"
        env = wait_for(lambda p=path: p.is_file() and json.loads(p.read_text()), 20, f"on_finish of {name}")
        assert env["SCANDROP_JOB_ID"] == job["job_id"]
        assert env["SCANDROP_JOB_STATE"] == job["state"]
        assert env["SCANDROP_JOB_DIR"] == job["outbox"]
    assert (
        json.loads((setup["hooks"] / f"{finished['hot']['job_id']}.json").read_text())["SCANDROP_JOB_ERROR"]
        == "too_few_images"
    )


def _metrics(daemon: Daemon) -> dict[str, list[Any]]:
    families: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(daemon.get("/metrics").decode()):
        families[family.name] = family.samples
    return families


def test_metrics_parse_with_prometheus_client(
    setup: dict[str, Any], finished: dict[str, dict[str, Any]]
) -> None:
    daemon: Daemon = setup["daemon"]
    m = _metrics(daemon)
    jobs = {s.labels["state"]: s.value for s in m["scandrop_jobs"]}
    assert jobs["succeeded"] == 1 and jobs["failed"] == 3 and jobs["queued"] == 0
    assert m["scandrop_queue_length"][0].value == 0
    inboxes = {s.labels["inbox"]: s.value for s in m["scandrop_inbox_healthy"]}
    assert inboxes == {str(daemon.inbox): 1.0, str(setup["root"] / "sharp-inbox"): 1.0}
    assert {s.labels["role"] for s in m["scandrop_free_bytes"]} >= {"state_dir"}
    assert all(s.value > 0 for s in m["scandrop_free_bytes"])
    sparse = [
        s for s in m["scandrop_stage_seconds"] if s.name.endswith("_count") and s.labels["stage"] == "sparse"
    ]
    assert sparse and sparse[0].value == 1
    finished_total = {
        (s.labels["state"], s.labels["code"]): s.value
        for s in m["scandrop_jobs_finished"]
        if s.name.endswith("_total")
    }
    assert finished_total[("failed", "too_few_images")] == 1 and finished_total[("succeeded", "")] == 1
    assert finished_total[("failed", "disk_full")] == 1
    assert m["scandrop_webhooks_pending"][0].value == 4  # the receiver is not there yet


def test_webhook_is_signed_and_delivered_after_a_restart_then_low_disk_makes_jobs_wait(
    setup: dict[str, Any], finished: dict[str, dict[str, Any]]
) -> None:
    daemon: Daemon = setup["daemon"]
    daemon.stop()
    with Receiver(setup["hook_port"]) as receiver:
        # Restarted with a free-space floor no disk meets: deliveries go out, new jobs wait.
        daemon.start({**setup["env"], "SCANDROP_MIN_FREE_SPACE_MB": str(10**12)}, healthy=False)
        wait_for(lambda: len(receiver.posts) >= 4, 30, "the webhook deliveries")
        _tiny_drop(daemon.inbox / "later")
        waiting = daemon.wait_job(
            lambda j: j["input"]["name"] == "later" and "disk space" in j["message"], 20, "the drop to wait"
        )
        health = daemon.request("GET", "/healthz")
        status = daemon.get("/api/status")
        still = daemon.job(waiting["job_id"])
    delivered = {}
    for headers, body in receiver.posts:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Scandrop-Signature"], expected)
        job = json.loads(body)
        delivered[job["job_id"]] = job["state"]
    assert delivered == {j["job_id"]: j["state"] for j in finished.values()}
    assert health[0] == 503 and any("low disk space" in p for p in health[1]["problems"])
    assert status["disk"]["ok"] is False and status["disk"]["min_free_space_mb"] == 10**12
    assert still["state"] == "queued"


def test_a_running_job_has_a_remaining_time_estimate(
    setup: dict[str, Any], finished: dict[str, dict[str, Any]]
) -> None:
    fast = finished["fast robot"]
    running = [j for j in setup["seen"] if j["job_id"] == fast["job_id"] and j["state"] == "running"]
    etas = [j["eta_seconds"] for j in running]
    known = [e for e in etas if e is not None]
    assert known and all(e >= 0 for e in known), etas
    assert fast["eta_seconds"] is None  # finished: nothing left
