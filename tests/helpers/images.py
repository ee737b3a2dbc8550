"""Images for tests: rendered shapes and scenes, random pixels, crafted PNG headers, and the
indexer's bad-input zoo."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
}
SHAPES = ("disc", "square", "triangle", "bar")


def render_images(n: int, seed: int = 0, size: tuple[int, int] = (64, 48)) -> list[Any]:
    """``n`` small RGB images: a solid colour with a shape (distinct enough for a test)."""
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


def png_claiming(width: int, height: int, *, grey: bool = False, idat: int = 64) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (8-bit RGB, or 1-bit greyscale with
    ``grey``) with ``idat`` zero bytes of pixel data: pixel-limit and decompression-bomb checks
    must refuse it before allocating anything."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    depth, colour = (1, 0) if grey else (8, 2)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    body = zlib.compress(b"\x00" * idat)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """An 8-bit RGB PNG that claims ``width`` x ``height`` (no real pixel data)."""
    return png_claiming(width, height)


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid-looking PNG whose header claims ``width x height`` (a few hundred bytes)."""
    return png_claiming(width, height, grey=True, idat=1024)


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
