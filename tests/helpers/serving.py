"""The gRPC server started on a test gallery (in-process, on a free 127.0.0.1 port), and the
browser the UI tests drive."""

from __future__ import annotations

from typing import Any

from tests.helpers.gallery import Gallery
from tests.helpers.net import free_port

MODEL = "tiny"  # preset name: random seeded weights, fast on CPU
INDEX_NAME = "gallery"
CHROMIUM = "/usr/bin/chromium"  # Debian's package (make setup-browser); never a downloaded build
# headless on a closed network: without the background-networking flags Chromium keeps trying
# to reach Google's hosts
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def server_kwargs(gallery: Gallery, **overrides: Any) -> dict[str, Any]:
    """ServerSettings fields for serving ``gallery`` on a free 127.0.0.1 port."""
    kw: dict[str, Any] = dict(
        model=MODEL,
        index=gallery.index_uri,
        name=INDEX_NAME,
        host="127.0.0.1",
        port=free_port(),
        metrics_port=0,
        num_threads=1,
        max_wait_ms=1.0,
        refresh_interval_s=0,
        grace_s=0.5,
        log_format="text",
    )
    kw.update(overrides)
    return kw


def start_server(gallery: Gallery, **overrides: Any) -> Any:
    """A started ``server.app.BackgroundServer`` on ``gallery`` (a thread with its own event
    loop). Call ``.stop()`` when done; ``.target`` is "127.0.0.1:PORT"."""
    from server.app import BackgroundServer
    from server.config import ServerSettings

    settings = ServerSettings(**server_kwargs(gallery, **overrides))
    return BackgroundServer(settings).start()
