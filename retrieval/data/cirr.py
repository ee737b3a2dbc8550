"""Convert CIRR annotations (Liu et al., ICCV 2021) into the triplet JSONL format.

Input layout (as released, ``cirr/`` of the CIRR repository)::

    SRC/captions/cap.rc2.{train,val,test1}.json
        [{"pairid": 12063, "reference": "test1-147-1-img1", "target_hard": "test1-83-0-img1",
          "caption": "...", "target_soft": {"test1-83-0-img1": 1.0},
          "img_set": {"id": 1, "members": ["test1-147-1-img1", ...]}}, ...]
        (test1 entries have no target_hard / target_soft)
    SRC/image_splits/split.rc2.{train,val,test1}.json
        {"test1-147-1-img1": "./test1/test1-147-1-img1.png", ...}

Image paths in the split files are relative to ``image_root`` (default: SRC). The output
JSONL stores absolute image paths (the loader resolves absolute and relative paths alike), so
the images stay where they are.

Output: ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (from test1; ``target`` is null),
``gallery.jsonl`` (the images of ``gallery_split``, default val: the standard CIRR protocol ranks
the split's own images), ``meta.json``. Triplet type is ``"cirr"``; ``extra`` holds ``pairid``,
``img_set_id``, ``img_set`` (members, for Recall_subset), ``target_soft``, the image names and
the source split. Gallery ids are CIRR image names.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from retrieval.data.triplets import DataFormatError, GalleryItem, Triplet, write_jsonl

logger = logging.getLogger(__name__)

# CIRR split name -> our split name
SPLIT_MAP = {"train": "train", "val": "val", "test1": "test"}


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected CIRR layout, see docs/data.md)")
    try:
        with path.open("r", encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc


def load_image_split(src: Path, split: str, image_root: Path) -> dict[str, str]:
    """name -> absolute image path for one CIRR split."""
    path = src / "image_splits" / f"split.rc2.{split}.json"
    data = _load_json(path)
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}: expected an object {{name: relative path}}")
    out = {}
    for name, rel in data.items():
        if not isinstance(rel, str):
            raise DataFormatError(f"{path}: path of {name!r} must be a string")
        out[str(name)] = str((image_root / rel).resolve())
    return out


def convert_cirr(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    image_root: str | Path | None = None,
    gallery_split: str = "val",
    splits: tuple[str, ...] = ("train", "val", "test1"),
) -> dict[str, Any]:
    """Convert CIRR at ``src_dir`` into ``out_dir``; returns the meta dict (counts).

    Splits whose caption file is missing are skipped with a warning, except the gallery split.
    """
    src = Path(src_dir)
    out = Path(out_dir)
    root = Path(image_root) if image_root is not None else src
    if gallery_split not in SPLIT_MAP or gallery_split == "train":
        raise ValueError(f"gallery_split must be 'val' or 'test1', got {gallery_split!r}")
    gallery_images = load_image_split(src, gallery_split, root)
    counts: dict[str, int] = {}
    missing_images = 0
    for split in splits:
        cap_path = src / "captions" / f"cap.rc2.{split}.json"
        if not cap_path.is_file() and split != gallery_split:
            logger.warning("%s missing: split %s skipped", cap_path, split)
            continue
        entries = _load_json(cap_path)
        if not isinstance(entries, list):
            raise DataFormatError(f"{cap_path}: expected a list of annotation objects")
        images = gallery_images if split == gallery_split else load_image_split(src, split, root)
        in_gallery = split == gallery_split
        rows: list[Triplet] = []
        for i, e in enumerate(entries):
            where = f"{cap_path}: entry #{i}"
            if not isinstance(e, dict):
                raise DataFormatError(f"{where}: expected an object")
            for key in ("pairid", "reference", "caption"):
                if key not in e:
                    raise DataFormatError(f"{where}: missing {key!r}")
            ref, tgt = e["reference"], e.get("target_hard")
            if ref not in images:
                raise DataFormatError(f"{where}: reference {ref!r} not in split.rc2.{split}.json")
            if tgt is not None and tgt not in images:
                raise DataFormatError(f"{where}: target_hard {tgt!r} not in split.rc2.{split}.json")
            img_set = e.get("img_set") or {}
            rows.append(
                Triplet(
                    reference=images[ref],
                    caption=str(e["caption"]).strip(),
                    target=images[tgt] if tgt is not None else None,
                    type="cirr",
                    reference_id=ref if in_gallery else "",
                    target_id=tgt if (in_gallery and tgt is not None) else None,
                    extra={
                        "pairid": e["pairid"],
                        "reference_name": ref,
                        "target_name": tgt,
                        "img_set_id": img_set.get("id"),
                        "img_set": list(img_set.get("members", [])),
                        "target_soft": e.get("target_soft", {}),
                        "source_split": split,
                    },
                )
            )
            for p in (rows[-1].reference, rows[-1].target):
                if p is not None and not Path(p).exists():
                    missing_images += 1
        counts[SPLIT_MAP[split]] = write_jsonl(out / f"{SPLIT_MAP[split]}.jsonl", rows)
    counts["gallery"] = write_jsonl(
        out / "gallery.jsonl",
        (
            GalleryItem(id=name, path=path, metadata={"split": gallery_split})
            for name, path in sorted(gallery_images.items())
        ),
    )
    if missing_images:
        logger.warning("%d triplet image paths do not exist (yet) under %s", missing_images, root)
    meta = {
        "dataset": "cirr",
        "source": str(src.resolve()),
        "image_root": str(root.resolve()),
        "gallery_split": gallery_split,
        "counts": counts,
        "missing_images": missing_images,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta
