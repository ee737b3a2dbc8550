"""Convert FashionIQ annotations (Wu et al., CVPR 2021) into the triplet JSONL format.

Input layout (as used by CLIP4Cir / SPRC)::

    SRC/captions/cap.{dress,shirt,toptee}.{train,val,test}.json
        [{"target": "B008BHCT58", "candidate": "B003FGW7MK",
          "captions": ["is solid black with no sleeves", "is black with straps"]}, ...]
    SRC/image_splits/split.{dress,shirt,toptee}.{train,val,test}.json
        ["B008BHCT58", "B003FGW7MK", ...]
    SRC/images/{name}.png   (or .jpg)

The two captions are joined SPRC-style: ``"c1 and c2"`` (trailing ``.?,`` and spaces
stripped). With ``both_orders`` the train split also gets ``"c2 and c1"`` as a second triplet.
Output image paths are absolute. ``gallery.jsonl`` holds the images of ``gallery_split``
(default val) of the converted categories; ids are image names, ``metadata.categories`` lists the
categories an image belongs to, and each triplet's ``extra.category`` names its own: the
standard FashionIQ protocol ranks within the category's gallery (convert one category per
directory, or filter the gallery by category). Triplet type is ``"fashioniq-{category}"``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from retrieval.data.triplets import DataFormatError, GalleryItem, Triplet, write_jsonl

logger = logging.getLogger(__name__)

CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("train", "val", "test")


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file (expected FashionIQ layout, see docs/data.md)"
        )
    try:
        with path.open("r", encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc


def join_captions(c1: str, c2: str) -> str:
    """SPRC/CLIP4Cir-style join of the two relative captions."""
    return f"{c1.strip('.?, ')} and {c2.strip('.?, ')}"


def image_path(src: Path, name: str) -> str:
    """Absolute path of ``images/{name}.png`` (or ``.jpg`` when only that exists)."""
    png = src / "images" / f"{name}.png"
    if not png.exists():
        jpg = src / "images" / f"{name}.jpg"
        if jpg.exists():
            return str(jpg.resolve())
    return str(png.resolve())


def convert_fashioniq(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    categories: tuple[str, ...] = CATEGORIES,
    gallery_split: str = "val",
    both_orders: bool = False,
) -> dict[str, Any]:
    """Convert FashionIQ at ``src_dir`` into ``out_dir``; returns the meta dict (counts).

    Caption files that do not exist are skipped with a warning (the test split is often
    absent); the gallery split's image lists are required.
    """
    src = Path(src_dir)
    out = Path(out_dir)
    bad = [c for c in categories if c not in CATEGORIES]
    if bad or not categories:
        raise ValueError(f"unknown FashionIQ categories {bad}; choose from {', '.join(CATEGORIES)}")
    if gallery_split not in ("val", "test"):
        raise ValueError(f"gallery_split must be 'val' or 'test', got {gallery_split!r}")

    gallery: dict[str, list[str]] = {}  # name -> categories
    for cat in categories:
        path = src / "image_splits" / f"split.{cat}.{gallery_split}.json"
        names = _load_json(path)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataFormatError(f"{path}: expected a list of image names")
        for n in names:
            gallery.setdefault(n, []).append(cat)

    counts: dict[str, int] = {}
    missing = 0
    for split in SPLITS:
        rows: list[Triplet] = []
        present = False
        for cat in categories:
            cap_path = src / "captions" / f"cap.{cat}.{split}.json"
            if not cap_path.is_file():
                logger.warning("%s missing: skipped", cap_path)
                continue
            present = True
            entries = _load_json(cap_path)
            if not isinstance(entries, list):
                raise DataFormatError(f"{cap_path}: expected a list of annotation objects")
            in_gallery = split == gallery_split
            for i, e in enumerate(entries):
                where = f"{cap_path}: entry #{i}"
                if not isinstance(e, dict):
                    raise DataFormatError(f"{where}: expected an object")
                for key in ("candidate", "captions"):
                    if key not in e:
                        raise DataFormatError(f"{where}: missing {key!r}")
                caps = e["captions"]
                if (
                    not isinstance(caps, list)
                    or not caps
                    or not all(isinstance(c, str) for c in caps)
                ):
                    raise DataFormatError(
                        f"{where}: 'captions' must be a non-empty list of strings"
                    )
                ref, tgt = e["candidate"], e.get("target")
                if in_gallery:
                    for role, name in (("candidate", ref), ("target", tgt)):
                        if name is not None and name not in gallery:
                            raise DataFormatError(
                                f"{where}: {role} {name!r} not in split.*.{gallery_split}.json"
                            )
                c1, c2 = (caps[0], caps[1]) if len(caps) > 1 else (caps[0], "")
                orders = [(c1, c2)]
                if both_orders and split == "train" and c2:
                    orders.append((c2, c1))
                for k, (a, b) in enumerate(orders):
                    caption = join_captions(a, b) if b else a.strip(".?, ")
                    t = Triplet(
                        reference=image_path(src, ref),
                        caption=caption,
                        target=image_path(src, tgt) if tgt is not None else None,
                        type=f"fashioniq-{cat}",
                        reference_id=ref if in_gallery else "",
                        target_id=tgt if (in_gallery and tgt is not None) else None,
                        extra={
                            "category": cat,
                            "reference_name": ref,
                            "target_name": tgt,
                            "captions": list(caps),
                            "order": k,
                        },
                    )
                    rows.append(t)
                    if k == 0:
                        missing += sum(
                            1 for p in (t.reference, t.target) if p and not Path(p).exists()
                        )
        if present:
            counts[split] = write_jsonl(out / f"{split}.jsonl", rows)
    counts["gallery"] = write_jsonl(
        out / "gallery.jsonl",
        (
            GalleryItem(
                id=name,
                path=image_path(src, name),
                metadata={"categories": cats, "split": gallery_split},
            )
            for name, cats in sorted(gallery.items())
        ),
    )
    if missing:
        logger.warning("%d triplet image paths do not exist under %s/images", missing, src)
    meta = {
        "dataset": "fashioniq",
        "source": str(src.resolve()),
        "categories": list(categories),
        "gallery_split": gallery_split,
        "both_orders": both_orders,
        "counts": counts,
        "missing_images": missing,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta
