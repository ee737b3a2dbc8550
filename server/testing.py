"""Helpers for tests and benchmarks: a small synthetic gallery, certificates, crafted images.

Not used by the server itself.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import ipaddress
import socket
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CATEGORIES = ("bag", "shoe", "dress")
FIELDS: dict[str, Any] = {"category": "keyword", "size": "integer"}


def render_images(n: int, seed: int = 0, size: tuple[int, int] = (64, 48)) -> list[Any]:
    """``n`` small RGB images: a solid colour with a shape (distinct enough for a test)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        colour = tuple(int(x) for x in rng.integers(0, 256, 3))
        im = Image.new("RGB", size, colour)
        d = ImageDraw.Draw(im)
        fill = tuple(int(x) for x in rng.integers(0, 256, 3))
        box = (8 + i % 7, 6 + i % 5, 40 + i % 11, 36 + i % 9)
        (d.ellipse if i % 2 else d.rectangle)(box, fill=fill)
        out.append(im)
    return out


def jpeg_b64(image: Any, max_side: int = 32) -> str:
    thumb = image.copy()
    thumb.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    thumb.save(buf, "JPEG", quality=80)
    return base64.b64encode(buf.getvalue()).decode()


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
    from retrieval.index import open_index

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
    tokens = encoder.encode_targets(images)
    uri = f"edge:{root / 'index'}"
    idx = open_index(
        uri, name, encoder_fingerprint=encoder.fingerprint, preset=encoder.preset, fields=FIELDS
    )
    try:
        idx.upsert(ids, tokens, payloads)
        idx.flush()
    finally:
        idx.close()
    if missing_original is not None:
        Path(payloads[missing_original]["path"]).unlink()
    return uri, ids


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


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (no real pixel data): pixel-limit and
    decompression-bomb checks must refuse it before allocating anything."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A throwaway certificate for localhost / 127.0.0.1; returns (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
