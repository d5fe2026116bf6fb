"""The status page in a real browser: headless Chromium (Debian's) driven by Playwright, against the
real daemon on loopback, with a token configured. The page must show a job's progress live from the
WebSocket, render the 3D viewer (mesh and splats, WebGL on SwiftShader), and cancel a running job."""

from __future__ import annotations

import io
import shutil
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daemon_process import Daemon, wait_for
from PIL import Image

from scandrop.daemon.status_page import BUILD_COMMAND, CONTENT_SECURITY_POLICY, viewer_versions

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "page-test-token"
BACKGROUND = np.array([0x1D, 0x21, 0x27])  # the viewer's clear colour (web/src/viewer.js)
# Chromium as root on a machine with no network and no GPU: no sandbox, no background traffic,
# WebGL on SwiftShader (software).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
]

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium); see README, Tests"
)


class Browser:
    """One page, and everything it asked for and was told."""

    def __init__(self, context: Any, origin: str) -> None:
        self.origin = origin
        self.page = context.new_page()
        self.requests: list[str] = []
        self.sockets: list[str] = []
        self.failures: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("websocket", lambda ws: self.sockets.append(ws.url))
        self.page.on("response", lambda r: r.status >= 400 and self.failures.append(f"{r.status} {r.url}"))
        self.page.on("pageerror", lambda e: self.failures.append(f"page error: {e}"))
        self.page.on("console", lambda m: m.type == "error" and self.failures.append(f"console: {m.text}"))
        self.page.on("dialog", lambda d: d.accept())

    def rows(self) -> dict[str, dict[str, Any]]:
        return {
            row["name"]: row
            for row in self.page.evaluate(
                """() => [...document.querySelectorAll("tr.job")].map((r) => ({
                    id: r.dataset.job, name: r.querySelector(".name span").textContent,
                    state: r.dataset.state, progress: r.querySelector("progress").value,
                    text: r.textContent, table: r.parentElement.id,
                    cancel_at: ((b) => b && [b.getBoundingClientRect().left - r.getBoundingClientRect().left,
                                             b.getBoundingClientRect().top - r.getBoundingClientRect().top])(
                                             r.querySelector("button.cancel")) }))"""
            )
        }

    def longest_frame_gap(self, seconds: float) -> float:
        """Milliseconds of the longest wait between two animation frames: how long the page froze."""
        return self.page.evaluate(
            """(seconds) => new Promise((done) => {
                const start = performance.now();
                let last = start, longest = 0;
                const frame = (now) => {
                    longest = Math.max(longest, now - last);
                    last = now;
                    if (now - start < seconds * 1000) requestAnimationFrame(frame); else done(longest);
                };
                requestAnimationFrame(frame);
            })""",
            seconds,
        )

    def viewer_pixels(self, kind: str) -> np.ndarray:
        selector = f"#viewer[data-kind={kind}][data-state=ready], #viewer[data-state=error]"
        self.page.wait_for_selector(selector, timeout=90_000)
        state = self.page.get_attribute("#viewer", "data-state")
        assert state == "ready", self.page.text_content("#viewer-note")
        time.sleep(2)  # a few frames: Spark sorts splats in a worker before they draw
        png = self.page.locator("#viewer canvas").screenshot()
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


@contextmanager
def chromium_context() -> Iterator[Any]:
    """A fresh headless Chromium with one 1280x900 browser context."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = chromium.new_context(viewport={"width": 1280, "height": 900})
        try:
            yield context
        finally:
            context.close()
            chromium.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    with chromium_context() as context:
        yield context


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, token=TOKEN).start()
    yield d
    d.stop()


def assert_rendered(pixels: np.ndarray, what: str) -> None:
    """Not blank: a real share of the canvas differs from the clear colour, in many colours."""
    covered = (np.abs(pixels - BACKGROUND).sum(axis=-1) > 30).mean()
    colours = len(np.unique((pixels // 16).reshape(-1, 3), axis=0))
    assert covered > 0.05, f"{what}: only {covered:.1%} of the canvas is drawn"
    assert colours > 50, f"{what}: only {colours} distinct colours"


def test_page_and_its_files_need_no_token_and_nothing_else_is_served(daemon: Daemon) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/", timeout=10) as page:
        assert b'<script type="module" src="/static/page.js">' in page.read()
        assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    policy = dict(p.split(" ", 1) for p in CONTENT_SECURITY_POLICY.split("; "))
    assert policy["default-src"] == "'self'"  # and no other origin anywhere:
    assert not [s for s in policy.values() if "http" in s or "*" in s]
    for name in ("page.js", "page.css", "build/viewer.js"):
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/static/{name}", timeout=10) as asset:
            assert asset.status == 200 and asset.headers["Cache-Control"] == "no-cache"
    for path in ("/static/../http_api.py", "/static/%2e%2e/http_api.py", "/static/nothing.js"):
        assert daemon.request("GET", path, token="")[0] == 404, path
    assert daemon.request("GET", "/api/status", token="")[0] == 401
    assert daemon.get("/api/status")["page"]["viewer"] == viewer_versions()


@needs_chromium
def test_page_shows_live_progress_renders_the_model_and_cancels(
    daemon: Daemon, browser: Any, photos: Path
) -> None:
    assert viewer_versions() is not None, f"the 3D viewer is not built: run `{BUILD_COMMAND}`"
    origin = f"http://127.0.0.1:{daemon.port}"
    status, _ = daemon.request("GET", "/", token="")
    assert status == 200  # the page itself holds no data: no token needed
    assert daemon.request("GET", "/api/jobs", token="")[0] == 401

    # Without the token the page asks for it, refuses a wrong one, connects with the right one.
    asking = Browser(browser, origin)
    asking.page.goto(f"{origin}/")
    asking.page.wait_for_selector("#token-form:not([hidden])", timeout=20_000)
    # No snapshot yet: the page says it is connecting, not that nothing is queued.
    assert asking.page.text_content("#queue-empty") == "Connecting…"
    assert asking.page.is_visible("#queue-empty")
    asking.page.fill("#token-input", "wrong")
    asking.page.click("#token-form button")
    asking.page.wait_for_selector("#token-error:has-text('not accepted')", timeout=20_000)
    asking.page.fill("#token-input", TOKEN)
    asking.page.click("#token-form button")
    asking.page.wait_for_selector("#health.ok", timeout=20_000)
    assert asking.page.text_content("#queue-empty").startswith("Nothing queued.")
    asking.page.close()

    b = Browser(browser, origin)
    b.page.goto(f"{origin}/#token={TOKEN}")
    b.page.wait_for_selector("#health.ok", timeout=20_000)
    assert "token=" not in b.page.url  # taken out of the address bar

    # A drop that fails, then a real one; the page hears both over the WebSocket.
    (daemon.inbox / "notes.txt").write_text("not a scan")
    shutil.copytree(photos, daemon.inbox / "scene")
    seen: list[float] = []
    states: list[str] = []
    cancel_at: set[tuple[float, float]] = set()  # where the Cancel button is in its row
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        row = b.rows().get("scene")
        if row:
            if not seen or row["progress"] != seen[-1]:
                seen.append(row["progress"])
            if not states or row["state"] != states[-1]:
                states.append(row["state"])
            if row["cancel_at"]:
                cancel_at.add(tuple(row["cancel_at"]))
            if row["state"] not in ("queued", "running"):
                break
        time.sleep(0.25)
    assert states[-1] == "succeeded", f"states seen on the page: {states}"
    assert "running" in states
    moving = [p for p in seen if 0 < p < 1]
    assert len(moving) >= 5, f"the progress bar hardly moved: {seen}"
    assert seen == sorted(seen), f"the progress bar went backwards: {seen}"
    assert seen[-1] == 1
    # A person aims at Cancel while the row changes: its stage, percent and time must not move it.
    assert len(cancel_at) == 1, f"the Cancel button moved as the row updated: {sorted(cancel_at)}"
    rows = b.rows()
    assert rows["scene"]["table"] == "recent"

    failed = daemon.wait_job(lambda j: j["input"]["name"] == "notes.txt", 30, "notes.txt to fail")
    assert failed["state"] == "failed"
    note = b.rows()["notes.txt"]["text"]
    assert failed["error"]["code"] in note and failed["error"]["hint"] in note

    # No polling: until a job is opened the page asked for nothing but itself and one WebSocket.
    assert [u for u in b.requests if "/api/" in u] == []
    assert b.sockets == [f"ws://127.0.0.1:{daemon.port}/api/ws?token={TOKEN}"]

    # One job: 3D viewer of the mesh, then of the splats, preview, report and every output.
    job = daemon.job(rows["scene"]["id"])
    b.page.click("tr.job[data-state=succeeded]")
    assert_rendered(b.viewer_pixels("mesh"), "model.glb")
    b.page.click("button[data-show=splats]")
    assert_rendered(b.viewer_pixels("splats"), "splats.splat")
    wait_for(
        lambda: b.page.evaluate("() => document.querySelector('#preview').naturalWidth") > 0,
        20,
        "preview.png to show",
    )
    registered = job["report"]["images"]["registered"]
    assert f"{registered} of {job['report']['images']['usable']} usable" in b.page.text_content("#report")
    links = b.page.eval_on_selector_all("#files a", "links => links.map((a) => a.textContent)")
    assert links == [o["name"] for o in job["outputs"]]
    with b.page.expect_download() as download:
        b.page.click("#files a >> text=cameras/transforms.json")
    saved = Path(download.value.path())
    assert saved.read_bytes() == (Path(job["outbox"]) / "cameras" / "transforms.json").read_bytes()

    # Cancel a running job from the page (the same drop again, forced to re-run).
    b.page.goto(f"{origin}/#")
    # Closing the job view frees the viewer's GL context at once: left to the garbage collector, the
    # page (software GL) drew no frame for 2-4 s a few seconds later (measured).
    assert b.longest_frame_gap(4) < 1000
    forced = daemon.inbox / "again"
    shutil.copytree(photos, forced)
    (forced / "FORCE").touch()
    wait_for(lambda: b.rows().get("again", {}).get("state") == "running", 60, "the second job to run")
    # ... and while a job keeps both cores busy: Playwright clicks only on a page that draws, and a
    # person cannot aim at a frozen one.
    assert b.longest_frame_gap(3) < 1000
    # Opened while it runs, its 3D view shows the model as photos are placed (the live snapshots).
    b.page.goto(f"{origin}/#job/{b.rows()['again']['id']}")
    b.page.wait_for_selector("#viewer[data-kind=live][data-state=ready]", timeout=90_000)
    kind, cameras, points = b.page.get_attribute("#viewer", "data-live").split(":")
    assert kind in ("sparse", "dense") and int(cameras) >= 2 and int(points) > 0
    pixels = b.viewer_pixels("live")
    assert (np.abs(pixels - BACKGROUND).sum(axis=-1) > 30).mean() > 0.001, "the live model drew nothing"
    b.page.goto(f"{origin}/#")
    with b.page.expect_response(lambda r: r.url.endswith("/cancel"), timeout=10_000) as asked:
        b.page.click("tr.job[data-state=running] button.cancel")
    assert asked.value.status == 202
    wait_for(lambda: b.rows()["again"]["state"] == "cancelled", 30, "the page to show the job cancelled")
    again = daemon.job(b.rows()["again"]["id"])
    assert again["state"] == "cancelled"

    # Health is pushed too: the inbox goes away, the badge turns; it comes back, so does the badge.
    shutil.rmtree(daemon.inbox)
    b.page.wait_for_selector("#health.down", timeout=30_000)
    assert "inbox" in b.page.text_content("#health")
    daemon.inbox.mkdir()
    b.page.wait_for_selector("#health.ok", timeout=30_000)

    # Offline: the browser asked this daemon and nothing else, and nothing failed.
    ours = (origin, f"ws://127.0.0.1:{daemon.port}/", "blob:")
    assert [u for u in b.requests + b.sockets if not u.startswith(ours)] == []
    assert b.failures == []

    # A station screen stays open across daemon restarts: the page reconnects by itself.
    daemon.stop()
    b.page.wait_for_selector("#connection:has-text('reconnecting')", timeout=20_000)
    daemon.start()
    b.page.wait_for_selector("#connection:has-text('live')", timeout=30_000)
    assert len(b.sockets) >= 2
