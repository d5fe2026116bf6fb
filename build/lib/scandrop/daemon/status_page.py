"""The browser status page: one HTML page, its script and style, and the 3D viewer bundle.

The page and its script are ours (daemon/page/). The viewer (three.js + Spark) is bundled from
pinned npm packages into daemon/page/build/ by `npm ci --prefix web`; nothing is loaded from
elsewhere, and the Content-Security-Policy makes the browser refuse anything that is not ours.
The page and its assets hold no job data, so they are served without the token; the page asks for
it and sends it with every API call.
"""

from __future__ import annotations

import json
from pathlib import Path

from aiohttp import web

PAGE_DIR = Path(__file__).with_name("page")
VIEWER_VERSIONS = PAGE_DIR / "build" / "versions.json"
STATIC_PREFIX = "/static/"
BUILD_COMMAND = "npm ci --prefix web"

# Same origin only. Spark decodes splats in blob: workers with WebAssembly; previews and downloads
# fetched with a token become blob: URLs.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' 'wasm-unsafe-eval'",
        "worker-src 'self' blob:",
        "img-src 'self' blob: data:",
        "connect-src 'self' blob: data:",
        "style-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ]
)


def viewer_versions() -> dict[str, str] | None:
    """The npm packages inside the built viewer, or None when `npm ci --prefix web` was not run."""
    try:
        return dict(json.loads(VIEWER_VERSIONS.read_text()))
    except (OSError, ValueError):
        return None


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(
        PAGE_DIR / "index.html",
        headers={"Cache-Control": "no-cache", "Content-Security-Policy": CONTENT_SECURITY_POLICY},
    )


def is_open(path: str) -> bool:
    return path == "/" or path.startswith(STATIC_PREFIX)


async def _revalidate_assets(request: web.Request, response: web.StreamResponse) -> None:
    """Browsers must ask again (a cheap 304) so an upgraded scandrop never runs last version's script."""
    if request.path.startswith(STATIC_PREFIX):
        response.headers["Cache-Control"] = "no-cache"


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_static(STATIC_PREFIX, PAGE_DIR, follow_symlinks=False, show_index=False)
    app.on_response_prepare.append(_revalidate_assets)
