"""Synthetic image collections: the indexer tests' bad-input zoo and the benchmark's images."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def random_image(seed: int, size: tuple[int, int] = (24, 24)) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def write_images(folder: Path, n: int, start: int = 0, sub: int = 0) -> list[Path]:
    """``n`` distinct PNGs (16-40 px), spread over ``sub`` sub-folders."""
    out = []
    for k in range(start, start + n):
        d = folder / (f"d{k % sub}" if sub else "")
        d.mkdir(parents=True, exist_ok=True)
        side = 16 + (k * 7) % 25
        p = d / f"img{k:04d}.png"
        random_image(k, (side, 16 + (k * 3) % 25)).save(p)
        out.append(p)
    return out


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid-looking PNG whose header claims ``width x height`` (a few hundred bytes)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_inputs(folder: Path) -> dict[str, str | None]:
    """Every bad-input class in one folder: relpath -> expected skip reason (None: indexed)."""
    folder.mkdir(parents=True, exist_ok=True)
    expect: dict[str, str | None] = {}

    (folder / "zero.png").write_bytes(b"")
    expect["zero.png"] = "empty"

    buf = io.BytesIO()
    random_image(1, (40, 40)).save(buf, "PNG")
    (folder / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expect["truncated.png"] = "truncated"

    buf = io.BytesIO()
    random_image(2, (40, 40)).save(buf, "JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expect["truncated.jpg"] = "truncated"

    (folder / "text.jpg").write_text("this is not an image\n")
    expect["text.jpg"] = "not-an-image"

    (folder / "bomb.png").write_bytes(png_bomb())
    expect["bomb.png"] = "decompression-bomb"

    Image.new("RGB", (10000, 1), (10, 20, 30)).save(folder / "aspect.png")
    expect["aspect.png"] = "extreme-aspect"

    (folder / "dangling.png").symlink_to(folder / "does-not-exist.png")
    expect["dangling.png"] = "unreadable"

    random_image(3, (32, 32)).convert("CMYK").save(folder / "cmyk.jpg", "JPEG")
    expect["cmyk.jpg"] = None

    arr16 = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16)
    Image.fromarray(arr16).save(folder / "gray16.png")
    expect["gray16.png"] = None

    pal = random_image(4, (32, 32)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(folder / "palette.png", transparency=0)
    expect["palette.png"] = None

    rgba = random_image(5, (32, 32)).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    expect["rgba.png"] = None

    frames = [random_image(10 + i, (32, 32)) for i in range(3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    expect["anim.gif"] = None

    random_image(6, (30, 20)).save(folder / "plain.webp", "WEBP")
    expect["plain.webp"] = None
    random_image(7, (20, 30)).save(folder / "plain.bmp", "BMP")
    expect["plain.bmp"] = None

    (folder / "notes.txt").write_text("ignored: not an image extension")
    return expect
