"""The decode stage: read bytes, hash, decode, preprocess and thumbnail, in DataLoader workers.

Everything here is picklable (the Dataset carries the preprocessor and the list of items), and no
exception escapes ``__getitem__``: a bad file becomes a ``Decoded`` with ``reason`` set.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from indexer.sources import Item

logger = logging.getLogger(__name__)

#: Namespace of point ids: id = uuid5(ID_NAMESPACE, sha256 hex of the file's bytes). Fixed forever
#: (changing it would re-id every collection).
ID_NAMESPACE = uuid.UUID("5b0c7a52-7f0e-5d4c-9a51-2c1d0f3e8b67")
THUMB_SIDE = 128  # thumbnail max side in pixels
THUMB_QUALITY = 80  # JPEG quality of thumbnails (a few KB at 128 px)
MAX_FILE_BYTES = 512 * 1024 * 1024  # larger files are skipped as "too-large" without reading


def image_id(sha256_hex: str) -> str:
    """The point id of an image: uuid5 of its content hash (duplicates share it)."""
    return str(uuid.uuid5(ID_NAMESPACE, sha256_hex))


@dataclass
class Decoded:
    """What a worker made of one item."""

    index: int  # position in the item list
    id: str | None = None  # point id (None when the file could not be read)
    sha256: str | None = None
    reason: str | None = None  # skip reason; None when usable
    detail: str = ""  # human detail for the report
    present: bool = False  # already in the target version: not decoded, not encoded
    payload: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # read / decode / preprocess


@dataclass
class DecodedBatch:
    """A collated batch: per-item results, and stacked pixels for the usable ones (in order)."""

    items: list[Decoded]
    pixels: Any  # torch.Tensor [M, 3, S, S] or None when no item in the batch is usable
    usable: list[int]  # positions in ``items`` that ``pixels`` rows belong to


def _mime(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
        return Image.MIME.get(fmt, f"image/{fmt.lower()}" if fmt else "application/octet-stream")
    except Exception:
        return "application/octet-stream"


def thumbnail_b64(image: Any, side: int = THUMB_SIDE, quality: int = THUMB_QUALITY) -> str:
    """Base64 JPEG, longest side <= ``side`` (never upscaled)."""
    thumb = image.copy()
    thumb.thumbnail((side, side))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=quality, optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class PresentSet:
    """Ids already in the target version (resume/incremental), compact and picklable."""

    def __init__(self, ids: Sequence[str] = ()) -> None:
        raw = sorted({uuid.UUID(i).bytes for i in ids})
        self._arr = np.array(raw, dtype="S16") if raw else np.zeros(0, dtype="S16")

    def __len__(self) -> int:
        return int(self._arr.shape[0])

    def __contains__(self, id_: object) -> bool:
        if not isinstance(id_, str) or len(self._arr) == 0:
            return False
        key = np.array(uuid.UUID(id_).bytes, dtype="S16")
        pos = int(np.searchsorted(self._arr, key))
        return pos < len(self._arr) and self._arr[pos] == key


class ImageDataset:
    """Map-style dataset over items; ``__getitem__`` never raises (see ``Decoded.reason``)."""

    def __init__(
        self,
        items: Sequence[Item],
        preprocess: Callable[[Any], Any],
        present: PresentSet | None = None,
        max_pixels: int | None = None,
        thumbnails: bool = True,
    ) -> None:
        self.items = list(items)
        self.preprocess = preprocess
        self.present = present or PresentSet()
        self.max_pixels = max_pixels
        self.thumbnails = thumbnails

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Decoded, Any]:
        try:
            return self._load(index)
        except Exception as exc:  # never let one file kill a worker
            logger.debug("unexpected error on %s", self.items[index].location, exc_info=True)
            return Decoded(index, reason="corrupt", detail=f"{type(exc).__name__}: {exc}"), None

    def _load(self, index: int) -> tuple[Decoded, Any]:
        from retrieval.imageio import ImageDecodeError, decode_image

        item = self.items[index]
        if item.problem:
            return Decoded(index, reason=item.problem, detail=item.location), None
        t0 = time.perf_counter()
        try:
            with open(item.location, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:  # missing, dangling symlink, a directory, permission
            # the OS's words ("No such file or directory"), not the exception's repr
            why = exc.strerror or type(exc).__name__
            return Decoded(index, reason="unreadable", detail=f"cannot open the file: {why}"), None
        if len(data) > MAX_FILE_BYTES:
            detail = f"the file is larger than {MAX_FILE_BYTES:,} bytes"
            return Decoded(index, reason="too-large", detail=detail), None
        sha = hashlib.sha256(data).hexdigest()
        out = Decoded(index, id=image_id(sha), sha256=sha)
        t1 = time.perf_counter()
        out.seconds["read"] = t1 - t0
        if out.id in self.present:
            out.present = True
            return out, None
        try:
            kwargs = {"max_pixels": self.max_pixels} if self.max_pixels else {}
            image = decode_image(data, **kwargs)
        except ImageDecodeError as exc:
            out.reason, out.detail = exc.reason, exc.detail
            return out, None
        t2 = time.perf_counter()
        pixels = self.preprocess(image)
        t3 = time.perf_counter()
        out.payload = {
            "path": item.path,
            "relpath": item.relpath,
            "user_id": item.user_id,
            "sha256": sha,
            "width": image.width,
            "height": image.height,
            "bytes": len(data),
            "mime": _mime(data),
            "thumbnail": thumbnail_b64(image) if self.thumbnails else "",
            **item.meta,
        }
        out.seconds["decode"] = (t2 - t1) + (time.perf_counter() - t3)  # decode + thumbnail
        out.seconds["preprocess"] = t3 - t2
        return out, pixels


def collate(batch: list[tuple[Decoded, Any]]) -> DecodedBatch:
    """Stack usable pixels in the worker (one shared-memory tensor per batch)."""
    import torch

    items = [d for d, _ in batch]
    usable = [i for i, (_, px) in enumerate(batch) if px is not None]
    pixels = torch.stack([batch[i][1] for i in usable]) if usable else None
    return DecodedBatch(items, pixels, usable)


def worker_init(_: int) -> None:
    """One intra-op thread per worker: the workers are the parallelism."""
    import torch

    torch.set_num_threads(1)
