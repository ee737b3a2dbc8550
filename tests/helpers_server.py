"""Test helpers for the UI tests: a small gallery index built with the tiny model, and the
gRPC server started on it (in-process, or as a ``cir serve`` subprocess).

Owned by the frontend tests (tests/test_frontend*.py); not a conftest so it only loads where
it is imported.
"""

from __future__ import annotations

import base64
import io
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

MODEL = "tiny"  # preset name: random seeded weights, fast on CPU
INDEX_NAME = "gallery"
FIELDS = {"shape": "keyword", "color": "keyword", "size": "integer"}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
}
SHAPES = ("disc", "square", "triangle", "bar")
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


@dataclass(frozen=True)
class Gallery:
    """What ``build_gallery`` wrote."""

    index_uri: str  # open_index URI of the built index
    image_dir: Path  # the original PNGs
    ids: list[str]  # point ids (uuids, as the indexer makes them), in insertion order
    fingerprint: str  # encoder fingerprint the index was built with
    user_ids: list[str]  # the images' own ids ("img-000", ...; payload user_id), same order


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def draw(shape: str, rgb: tuple[int, int, int], size: int, canvas: int = 64) -> Image.Image:
    img = Image.new("RGB", (canvas, canvas), (245, 245, 240))
    d = ImageDraw.Draw(img)
    c, r = canvas // 2, size // 2
    box = (c - r, c - r, c + r, c + r)
    if shape == "disc":
        d.ellipse(box, fill=rgb)
    elif shape == "square":
        d.rectangle(box, fill=rgb)
    elif shape == "triangle":
        d.polygon([(c, c - r), (c - r, c + r), (c + r, c + r)], fill=rgb)
    else:
        d.rectangle((c - r, c - r // 3, c + r, c + r // 3), fill=rgb)
    return img


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def build_gallery(root: Path, n: int = 24, uri_scheme: str = "edge") -> Gallery:
    """``n`` shape images under ``root/images`` indexed with the tiny model under ``root/index``.

    Payloads: ``path`` (the PNG), ``thumbnail`` (base64 JPEG), ``shape``/``color`` (keyword) and
    ``size`` (integer), all three declared filterable, and ``user_id`` ("img-000", ...). Point
    ids are uuids, as the indexer makes them, so the page must show the user ids.
    """
    import uuid

    from retrieval.encoder import Encoder
    from retrieval.index import open_index

    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    enc = Encoder.from_pretrained(MODEL, num_threads=1)
    ids, user_ids, images, payloads = [], [], [], []
    names = list(COLORS)
    for i in range(n):
        shape, color = SHAPES[i % len(SHAPES)], names[(i // len(SHAPES)) % len(names)]
        size = 20 + 8 * (i % 5)
        img = draw(shape, COLORS[color], size)
        item_id = f"img-{i:03d}"
        path = image_dir / f"{item_id}.png"
        img.save(path)
        thumb = io.BytesIO()
        img.resize((48, 48)).save(thumb, format="JPEG", quality=85)
        ids.append(str(uuid.uuid5(uuid.NAMESPACE_URL, f"cir-test/{item_id}")))
        user_ids.append(item_id)
        images.append(img)
        payloads.append(
            {
                "path": str(path),
                "thumbnail": base64.b64encode(thumb.getvalue()).decode("ascii"),
                "shape": shape,
                "color": color,
                "size": size,
                "caption": f"a {color} {shape}",
                "user_id": item_id,
            }
        )
    tokens = enc.encode_targets(images)
    uri = f"{uri_scheme}:{root / 'index'}"
    with open_index(
        uri,
        INDEX_NAME,
        encoder_fingerprint=enc.fingerprint,
        preset=enc.preset,
        fields=FIELDS,  # type: ignore[arg-type]
    ) as idx:
        idx.upsert(ids, tokens, payloads)
    return Gallery(
        index_uri=uri, image_dir=image_dir, ids=ids, fingerprint=enc.fingerprint, user_ids=user_ids
    )


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
    """helper-3's BackgroundServer on ``gallery`` (a thread with its own event loop), started.

    Call ``.stop()`` when done; ``.target`` is "127.0.0.1:PORT".
    """
    from server.app import BackgroundServer
    from server.config import ServerSettings

    settings = ServerSettings(**server_kwargs(gallery, **overrides))
    return BackgroundServer(settings).start()
