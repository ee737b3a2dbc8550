"""Small gallery indexes for tests, written through the index API (no indexer run).

Two kinds, one writer (:func:`_write_index`):

- :func:`build_gallery`: ``n`` rendered scenes encoded by the caller's encoder, point ids
  ``img-000``... (the server tests);
- :func:`build_shapes_gallery`: ``n`` shape images encoded with the tiny model, uuid point ids and
  user ids ``img-000``... (the UI, explain and safety tests).
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.images import COLORS, SHAPES, draw, jpeg_b64, render_images

CATEGORIES = ("bag", "shoe", "dress")
FIELDS: dict[str, Any] = {"category": "keyword", "size": "integer"}
SHAPES_FIELDS: dict[str, Any] = {"shape": "keyword", "color": "keyword", "size": "integer"}


@dataclass(frozen=True)
class Gallery:
    """What ``build_shapes_gallery`` wrote."""

    index_uri: str  # open_index URI of the built index
    image_dir: Path  # the original PNGs
    ids: list[str]  # point ids (uuids, as the indexer makes them), in insertion order
    fingerprint: str  # encoder fingerprint the index was built with
    user_ids: list[str]  # the images' own ids ("img-000", ...; payload user_id), same order


def _write_index(
    uri: str,
    name: str,
    encoder: Any,
    ids: list[str],
    images: list[Any],
    payloads: list[dict[str, Any]],
    fields: dict[str, Any],
) -> None:
    """Encode ``images`` with ``encoder`` and write them as index ``name`` at ``uri``."""
    from retrieval.index import open_index

    tokens = encoder.encode_targets(images)
    with open_index(
        uri, name, encoder_fingerprint=encoder.fingerprint, preset=encoder.preset, fields=fields
    ) as idx:
        idx.upsert(ids, tokens, payloads)
        idx.flush()


def build_gallery(
    root: Path,
    encoder: Any,
    n: int = 24,
    *,
    prefix: str = "img",
    seed: int = 0,
    name: str = "gallery",
    missing_original: int | None = None,
) -> tuple[str, list[str]]:
    """Render ``n`` images under ``root/images``, encode them and write an Edge index at
    ``root/index`` (payloads: path, thumbnail, sha256, width, height, bytes, category, size).
    ``missing_original``: the position of an item whose original file is deleted afterwards.
    Returns (index URI, ids)."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images = render_images(n, seed)
    ids, payloads = [], []
    for i, im in enumerate(images):
        path = images_dir / f"{prefix}-{i:03d}.png"
        im.save(path)
        data = path.read_bytes()
        ids.append(f"{prefix}-{i:03d}")
        payloads.append(
            {
                "path": str(path),
                "thumbnail": jpeg_b64(im),
                "sha256": hashlib.sha256(data).hexdigest(),
                "width": im.width,
                "height": im.height,
                "bytes": len(data),
                "category": CATEGORIES[i % len(CATEGORIES)],
                "size": i,
            }
        )
    uri = f"edge:{root / 'index'}"
    _write_index(uri, name, encoder, ids, images, payloads, FIELDS)
    if missing_original is not None:
        Path(payloads[missing_original]["path"]).unlink()
    return uri, ids


def build_shapes_gallery(root: Path, n: int = 24, uri_scheme: str = "edge") -> Gallery:
    """``n`` shape images under ``root/images`` indexed with the tiny model under ``root/index``.

    Payloads: ``path`` (the PNG), ``thumbnail`` (base64 JPEG), ``shape``/``color`` (keyword) and
    ``size`` (integer), all three declared filterable, and ``user_id`` ("img-000", ...). Point
    ids are uuids, as the indexer makes them, so the page must show the user ids.
    """
    import base64

    from retrieval.encoder import Encoder
    from tests.helpers.serving import INDEX_NAME, MODEL

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
    uri = f"{uri_scheme}:{root / 'index'}"
    _write_index(uri, INDEX_NAME, enc, ids, images, payloads, SHAPES_FIELDS)
    return Gallery(
        index_uri=uri, image_dir=image_dir, ids=ids, fingerprint=enc.fingerprint, user_ids=user_ids
    )


def add_version(
    uri: str, encoder: Any, ids: Sequence[str], images: Sequence[Any], name: str = "gallery"
) -> str:
    """Build and activate a new version holding ``ids``/``images``; returns the version."""
    from retrieval.index import VersionMeta, open_index

    tokens = encoder.encode_targets(list(images))
    payloads = [
        {"category": CATEGORIES[i % len(CATEGORIES)], "size": i, "thumbnail": jpeg_b64(im)}
        for i, im in enumerate(images)
    ]
    idx = open_index(uri, name, encoder_fingerprint=encoder.fingerprint)
    try:
        meta = VersionMeta(
            encoder.fingerprint, encoder.preset, (tokens.shape[1], tokens.shape[2]), dict(FIELDS)
        )
        handle = idx.create_version(meta)
        with handle:
            handle.upsert(list(ids), tokens, payloads)
        version = handle.version
        idx.activate(version)
    finally:
        idx.close()
    return version
