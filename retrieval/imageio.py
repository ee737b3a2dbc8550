"""Safe image decoding shared by the indexer, the server and the trainer.

Pillow's decompression-bomb limit stays on; every mode a collection throws at us (CMYK, 16-bit,
palette with transparency, LA/RGBA, 1-bit) is converted to RGB, and alpha is composited on white.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 64_000_000  # well below Pillow's bomb error threshold (2 x 89.5 Mpx)
MIN_SIDE = 1

#: The image files this project reads, as lower-case extensions: the indexer's folder walk
#: picks up exactly these, and the UI's uploader offers exactly these (one list for both).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".gif",
    ".bmp",
    ".tif",
    ".tiff",
)
#: The same formats by name, for messages.
IMAGE_FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"

#: What common non-image files start with -> what to call them in a message.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (or an Office document)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"7z\xbc\xaf", "a 7-Zip archive"),
    (b"Rar!", "a RAR archive"),
    (b"\x00\x00\x01\x00", "a Windows icon"),
    (b"OggS", "an Ogg audio/video file"),
    (b"ID3", "an MP3 audio file"),
    (b"\x7fELF", "a program (ELF executable)"),
)
#: Signatures of the readable formats: such a file that does not open is damaged, not foreign.
_IMAGE_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def image_format_of(head: bytes) -> str | None:
    """The readable format a file's first bytes announce (None: none of them)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _IMAGE_SIGNATURES if head.startswith(magic)), None)


def describe_bytes(head: bytes) -> str:
    """What a file that is not a readable image is, from its first bytes (for messages)."""
    if not head:
        return "an empty file"
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return what
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"mif1", b"msf1", b"hevc"):
            return "a HEIC/HEIF photo (save it as JPEG or PNG)"
        if brand in (b"avif", b"avis"):
            return "an AVIF image (save it as JPEG or PNG)"
        return "an MP4/QuickTime video"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<svg", b"<?xml")) and b"svg" in text:
        return "an SVG drawing (export it as PNG)"
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "an HTML page"
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError as exc:  # text only if a multi-byte character was cut at the end
        decoded = head[: exc.start].decode("utf-8") if exc.start >= len(head) - 3 else ""
    if decoded and all(c.isprintable() or c in "\r\n\t" for c in decoded):
        return "text"
    return "binary data of an unknown kind"


def _clean(text: str) -> str:
    """Pillow's message without Python object reprs (``<_io.BytesIO object at 0x...>``)."""
    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", text)
    return text.strip().rstrip(":").strip()


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; ``reason`` is short and stable (for reports/metrics),
    ``detail`` says in plain words what the file is and why it was refused."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (alpha composited on white, 16-bit scaled down)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(image, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / (65535.0 if hi > 255 else max(hi, 1.0))
        image = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        image = Image.fromarray(arr.astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def decode_image(
    data: bytes | str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect: float = 100.0,
) -> Image.Image:
    """Decode bytes or a file into an RGB image, or raise ``ImageDecodeError``.

    Checks the header's size before decoding pixels (a bomb is rejected without allocating it),
    takes the first frame of animations, applies EXIF orientation and forces a full decode so
    truncated files fail here rather than later.
    """
    if isinstance(data, (str, Path)):
        try:
            st = Path(data).stat()
        except OSError as exc:
            raise ImageDecodeError("unreadable", exc.strerror or str(exc)) from exc
        if not Path(data).is_file():
            raise ImageDecodeError("unreadable", f"{data} is not a regular file")
        size = st.st_size
        if size == 0:
            raise ImageDecodeError("empty", "the file has no bytes")
        src: io.BytesIO | str = str(data)
    else:
        if not data:
            raise ImageDecodeError("empty", "the file has no bytes")
        src = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as im:
                w, h = im.size
                if w < MIN_SIDE or h < MIN_SIDE:
                    raise ImageDecodeError("bad-dimensions", f"the image is {w}x{h} pixels")
                if w * h > max_pixels:
                    raise ImageDecodeError(
                        "too-many-pixels",
                        f"the image is {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,}",
                    )
                if max(w, h) / min(w, h) > max_aspect:
                    raise ImageDecodeError(
                        "extreme-aspect",
                        f"the image is {w}x{h} pixels, more than {max_aspect:g} times longer "
                        "than wide",
                    )
                im.seek(0)  # first frame of gif/webp animations
                im.load()
                frame = ImageOps.exif_transpose(im) or im
                return to_rgb(frame.copy())
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(
            "decompression-bomb",
            f"the file declares far more pixels than it holds ({_clean(str(exc))})",
        ) from exc
    except Image.UnidentifiedImageError as exc:
        head = _head(data)
        fmt = image_format_of(head)
        if fmt is not None:  # the right signature, but Pillow cannot parse what follows
            raise ImageDecodeError(
                "corrupt",
                f"the file starts like a {fmt} image but its data is damaged or cut short",
            ) from exc
        raise ImageDecodeError(
            "not-an-image", f"the file is {describe_bytes(head)}, not a {IMAGE_FORMAT_NAMES} image"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        why = _clean(str(exc)) or type(exc).__name__
        what = f"{image_format_of(_head(data)) or 'image'} file"
        if "truncated" in why.lower():
            raise ImageDecodeError(
                "truncated", f"the {what} stops before the end of its picture ({why})"
            ) from exc
        raise ImageDecodeError("corrupt", f"the {what} is damaged ({why})") from exc
    except MemoryError as exc:
        raise ImageDecodeError("too-many-pixels", "out of memory while decoding") from exc


def _head(data: bytes | str | Path, n: int = 64) -> bytes:
    """The first ``n`` bytes of the input (for describing what it is)."""
    if isinstance(data, bytes):
        return data[:n]
    try:
        with open(data, "rb") as f:
            return f.read(n)
    except OSError:
        return b""
