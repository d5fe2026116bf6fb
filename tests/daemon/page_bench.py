"""Benchmark of the status page in headless Chromium (software WebGL): what an open job view costs.

    .venv/bin/python tests/daemon/page_bench.py

Prints, for the mesh and the splat view of a synthetic job: the browser's CPU while nobody touches
the view, the time of a canvas screenshot, the time of a 10-step drag and the CPU after it; then the
longest frame gap of the list right after the job view closes and while a job runs. Numbers, not
pass/fail: the page test asserts behaviour, this says how it performs (README, "The status page").
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import psutil
from daemon_process import Daemon, wait_for, write_photos
from playwright.sync_api import Page
from test_status_page import Browser, chromium_context

IDLE_SECONDS = 6.0


def browser_cpu_seconds() -> float:
    total = 0.0
    for proc in psutil.process_iter(["name"]):
        try:
            if "chrom" in (proc.info["name"] or ""):
                times = proc.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            continue
    return total


def cpu_share(seconds: float) -> float:
    """Cores' worth of CPU the browser used over the next `seconds`."""
    start, t0 = browser_cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    return (browser_cpu_seconds() - start) / (time.monotonic() - t0)


def drag(page: Page, steps: int = 10) -> float:
    box = page.locator("#viewer canvas").bounding_box()
    assert box is not None
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    t0 = time.monotonic()
    for i in range(steps):
        page.mouse.move(x + 10 * (i + 1), y)
        time.sleep(0.1)
    page.mouse.up()
    return time.monotonic() - t0


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="scandrop-page-bench-"))
    photos = write_photos(root / "photos")
    daemon = Daemon(root / "daemon").start()
    try:
        shutil.copytree(photos, daemon.inbox / "scene")
        daemon.wait_job(lambda j: j["state"] == "succeeded", 300, "the synthetic job to succeed")
        origin = f"http://127.0.0.1:{daemon.port}"
        with chromium_context() as context:
            b = Browser(context, origin)
            b.page.goto(f"{origin}/")
            b.page.click("tr.job[data-state=succeeded]")
            print("view    idle CPU (cores)  screenshot s  10-step drag s  CPU 3-9 s after the drag")
            for kind in ("mesh", "splats"):
                if kind == "splats":
                    b.page.click("button[data-show=splats]")
                b.page.wait_for_selector(f"#viewer[data-kind={kind}][data-state=ready]", timeout=90_000)
                time.sleep(2)
                idle = cpu_share(IDLE_SECONDS)
                t0 = time.monotonic()
                b.page.locator("#viewer canvas").screenshot(timeout=120_000)
                shot = time.monotonic() - t0
                dragged = drag(b.page)
                time.sleep(3)
                after = cpu_share(IDLE_SECONDS)
                print(f"{kind:7} {idle:17.2f}  {shot:12.1f}  {dragged:14.1f}  {after:.2f}")
            b.page.goto(f"{origin}/#")
            print(f"list right after the job view closed: longest frame gap {b.longest_frame_gap(4):.0f} ms")
            again = daemon.inbox / "again"
            shutil.copytree(photos, again)
            (again / "FORCE").touch()
            wait_for(lambda: b.rows().get("again", {}).get("state") == "running", 60, "the second job to run")
            print(f"list while a job runs: longest frame gap {b.longest_frame_gap(3):.0f} ms")
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
