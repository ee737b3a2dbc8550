"""Safe image decoding shared by the indexer, the server and the trainer.

Pillow's decompression-bomb limit stays on; every mode a collection throws at us (CMYK, 16-bit,
palette with transparency, LA/RGBA, 1-bit) is converted to RGB, and alpha is composited on white.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 64_000_000  # well below Pillow's bomb error threshold (2 x 89.5 Mpx)
MIN_SIDE = 1


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; ``reason`` is short and stable (for reports/metrics)."""

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
            raise ImageDecodeError("unreadable", str(exc)) from exc
        if not Path(data).is_file():
            raise ImageDecodeError("unreadable", f"{data} is not a regular file")
        size = st.st_size
        if size == 0:
            raise ImageDecodeError("empty", "zero-byte file")
        src: io.BytesIO | str = str(data)
    else:
        if not data:
            raise ImageDecodeError("empty", "no bytes")
        src = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as im:
                w, h = im.size
                if w < MIN_SIDE or h < MIN_SIDE:
                    raise ImageDecodeError("bad-dimensions", f"{w}x{h}")
                if w * h > max_pixels:
                    raise ImageDecodeError("too-many-pixels", f"{w}x{h} > {max_pixels} pixels")
                if max(w, h) / min(w, h) > max_aspect:
                    raise ImageDecodeError("extreme-aspect", f"{w}x{h}")
                im.seek(0)  # first frame of gif/webp animations
                im.load()
                frame = ImageOps.exif_transpose(im) or im
                return to_rgb(frame.copy())
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("decompression-bomb", str(exc)) from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError("not-an-image", str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise ImageDecodeError(reason, str(exc)) from exc
    except MemoryError as exc:
        raise ImageDecodeError("too-many-pixels", "out of memory while decoding") from exc
