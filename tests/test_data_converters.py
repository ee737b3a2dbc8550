"""CIRR and FashionIQ converters on small samples written in the original layouts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from retrieval.data import DataFormatError, load_gallery, load_meta, load_triplets, resolve_path
from retrieval.data.cirr import convert_cirr
from retrieval.data.fashioniq import convert_fashioniq, join_captions


def _dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


# --------------------------------------------------------------------------- CIRR


def _cirr_sample(src: Path) -> None:
    for split, prefix in (("train", "train-1"), ("val", "dev-1"), ("test1", "test1-1")):
        names = [f"{prefix}-{i}-img0" for i in range(6)]
        sub = {"train": "train/34", "val": "dev", "test1": "test1"}[split]
        _dump(
            src / "image_splits" / f"split.rc2.{split}.json",
            {n: f"./{sub}/{n}.png" for n in names},
        )
        entries = []
        for i in range(3):
            e: dict[str, Any] = {
                "pairid": 100 * len(split) + i,
                "reference": names[i],
                "caption": f"  make it {split} {i} ",
                "img_set": {"id": i, "members": names[i : i + 4]},
            }
            if split != "test1":
                e["target_hard"] = names[i + 3]
                e["target_soft"] = {names[i + 3]: 1.0}
            entries.append(e)
        _dump(src / "captions" / f"cap.rc2.{split}.json", entries)
    img = src / "dev" / "dev-1-0-img0.png"  # one image present, the rest missing
    img.parent.mkdir(parents=True, exist_ok=True)
    img.write_bytes(b"png")


def test_cirr(tmp_path: Path) -> None:
    src, out = tmp_path / "cirr", tmp_path / "out"
    _cirr_sample(src)
    meta = convert_cirr(src, out)
    assert meta["counts"] == {"train": 3, "val": 3, "test": 3, "gallery": 6}
    assert load_meta(out)["dataset"] == "cirr"

    gallery = load_gallery(out)
    ids = {g.id for g in gallery}
    assert ids == {f"dev-1-{i}-img0" for i in range(6)}
    g0 = next(g for g in gallery if g.id == "dev-1-0-img0")
    assert Path(g0.path).is_absolute()
    assert resolve_path(out, g0.path) == (src / "dev" / "dev-1-0-img0.png").resolve()
    assert resolve_path(out, g0.path).is_file()

    val = load_triplets(out, "val")
    t = val[0]
    assert t.type == "cirr" and t.caption == "make it val 0"
    assert t.reference_id == "dev-1-0-img0" and t.target_id == "dev-1-3-img0"
    assert t.target is not None and t.target.endswith("dev/dev-1-3-img0.png")
    assert t.extra["pairid"] == 300 and t.extra["img_set"] == [f"dev-1-{i}-img0" for i in range(4)]
    assert t.extra["target_soft"] == {"dev-1-3-img0": 1.0}
    assert all(v.target_id in ids and v.reference_id in ids for v in val)

    train = load_triplets(out, "train")
    assert train[0].reference.endswith("train/34/train-1-0-img0.png")
    assert train[0].reference_id == "" and train[0].target_id is None

    test = load_triplets(out, "test")
    assert all(x.target is None and x.target_id is None for x in test)
    assert test[0].extra["img_set"][0] == "test1-1-0-img0"


def test_cirr_image_root_and_test_gallery(tmp_path: Path) -> None:
    src, out = tmp_path / "cirr", tmp_path / "out"
    _cirr_sample(src)
    root = tmp_path / "raw"
    meta = convert_cirr(src, out, image_root=root, gallery_split="test1")
    assert meta["counts"]["gallery"] == 6
    test = load_triplets(out, "test")
    assert test[0].reference_id == "test1-1-0-img0"
    assert test[0].reference == str((root / "test1" / "test1-1-0-img0.png").resolve())
    assert load_triplets(out, "val")[0].reference_id == ""


def test_cirr_bad_input(tmp_path: Path) -> None:
    src = tmp_path / "cirr"
    with pytest.raises(FileNotFoundError, match=r"split\.rc2\.val\.json"):
        convert_cirr(src, tmp_path / "o1")
    _cirr_sample(src)
    caps = json.loads((src / "captions" / "cap.rc2.val.json").read_text())
    caps[1]["target_hard"] = "nope"
    _dump(src / "captions" / "cap.rc2.val.json", caps)
    with pytest.raises(DataFormatError, match=r"entry #1: target_hard 'nope'"):
        convert_cirr(src, tmp_path / "o2")
    del caps[1]["caption"]
    _dump(src / "captions" / "cap.rc2.val.json", caps)
    with pytest.raises(DataFormatError, match="missing 'caption'"):
        convert_cirr(src, tmp_path / "o3")
    (src / "captions" / "cap.rc2.val.json").write_text("[{")
    with pytest.raises(DataFormatError, match=r"cap\.rc2\.val\.json:1"):
        convert_cirr(src, tmp_path / "o4")
    with pytest.raises(ValueError, match="gallery_split"):
        convert_cirr(src, tmp_path / "o5", gallery_split="train")


# --------------------------------------------------------------------------- FashionIQ


def _fiq_sample(src: Path, with_test: bool = False) -> None:
    splits = ("train", "val", "test") if with_test else ("train", "val")
    for cat in ("dress", "shirt", "toptee"):
        for split in splits:
            names = [f"{cat[0].upper()}{split[:2]}{i:03d}" for i in range(5)]
            _dump(src / "image_splits" / f"split.{cat}.{split}.json", names)
            _dump(
                src / "captions" / f"cap.{cat}.{split}.json",
                [
                    {
                        "target": names[i + 1],
                        "candidate": names[i],
                        "captions": [f"is {cat} {i}.", f"has {split} sleeves "],
                    }
                    for i in range(4)
                ],
            )
    (src / "images").mkdir(parents=True, exist_ok=True)
    (src / "images" / "Dva000.jpg").write_bytes(b"jpg")  # a .jpg is picked up when present


def test_fashioniq(tmp_path: Path) -> None:
    src, out = tmp_path / "fiq", tmp_path / "out"
    _fiq_sample(src)
    meta = convert_fashioniq(src, out)
    assert meta["counts"] == {"train": 12, "val": 12, "gallery": 15}
    assert not (out / "test.jsonl").exists()
    val = load_triplets(out, "val")
    assert {t.type for t in val} == {"fashioniq-dress", "fashioniq-shirt", "fashioniq-toptee"}
    t = val[0]
    assert t.caption == "is dress 0 and has val sleeves"
    assert t.reference_id == "Dva000" and t.target_id == "Dva001"
    assert t.reference == str((src / "images" / "Dva000.jpg").resolve())
    assert t.target == str((src / "images" / "Dva001.png").resolve())
    assert t.extra["category"] == "dress" and t.extra["captions"] == [
        "is dress 0.",
        "has val sleeves ",
    ]
    gallery = {g.id: g for g in load_gallery(out)}
    assert gallery["Sva002"].metadata["categories"] == ["shirt"]
    assert all(x.target_id in gallery and x.reference_id in gallery for x in val)
    train = load_triplets(out, "train")
    assert train[0].reference_id == "" and train[0].target_id is None


def test_fashioniq_categories_both_orders_and_test(tmp_path: Path) -> None:
    src, out = tmp_path / "fiq", tmp_path / "out"
    _fiq_sample(src, with_test=True)
    meta = convert_fashioniq(src, out, categories=("shirt",), both_orders=True)
    assert meta["counts"] == {"train": 8, "val": 4, "test": 4, "gallery": 5}
    train = load_triplets(out, "train")
    assert train[0].caption == "is shirt 0 and has train sleeves"
    assert train[1].caption == "has train sleeves and is shirt 0"
    assert {t.type for t in train} == {"fashioniq-shirt"}
    assert len(load_triplets(out, "val")) == 4  # both orders only for train


def test_fashioniq_bad_input(tmp_path: Path) -> None:
    src = tmp_path / "fiq"
    with pytest.raises(FileNotFoundError, match=r"split\.dress\.val\.json"):
        convert_fashioniq(src, tmp_path / "o1")
    _fiq_sample(src)
    with pytest.raises(ValueError, match="unknown FashionIQ categories"):
        convert_fashioniq(src, tmp_path / "o2", categories=("shoes",))
    _dump(
        src / "captions" / "cap.dress.val.json",
        [{"target": "x", "candidate": "Dva000", "captions": ["a", "b"]}],
    )
    with pytest.raises(DataFormatError, match=r"entry #0: target 'x' not in"):
        convert_fashioniq(src, tmp_path / "o3")
    _dump(
        src / "captions" / "cap.dress.val.json",
        [{"target": "Dva001", "candidate": "Dva000", "captions": []}],
    )
    with pytest.raises(DataFormatError, match="non-empty list"):
        convert_fashioniq(src, tmp_path / "o4")


def test_join_captions() -> None:
    assert join_captions("Is red.", " has a collar? ") == "Is red and has a collar"


def test_cli_converters(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from retrieval.data.cli import register

    app = typer.Typer()
    register(app)
    _cirr_sample(tmp_path / "cirr")
    _fiq_sample(tmp_path / "fiq")
    r = CliRunner().invoke(
        app, ["data", "cirr", str(tmp_path / "cirr"), "--out", str(tmp_path / "c")]
    )
    assert r.exit_code == 0, r.output
    assert "gallery=6" in r.output
    r = CliRunner().invoke(
        app,
        [
            "data",
            "fashioniq",
            str(tmp_path / "fiq"),
            "--out",
            str(tmp_path / "f"),
            "--categories",
            "dress,toptee",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "gallery=10" in r.output
    r = CliRunner().invoke(
        app, ["data", "cirr", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]
    )
    assert r.exit_code == 2 and "no such file" in r.output
