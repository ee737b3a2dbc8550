"""The triplet JSONL format: round trip and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrieval.data import (
    DataFormatError,
    GalleryItem,
    Triplet,
    check_split_against_gallery,
    load_gallery,
    load_triplets,
    read_jsonl,
    resolve_path,
    write_jsonl,
)


def _t(**kw: object) -> dict[str, object]:
    row: dict[str, object] = {
        "reference": "images/a.png",
        "caption": "make it red",
        "target": "images/b.png",
        "type": "color",
        "reference_id": "g1",
        "target_id": "g2",
    }
    row.update(kw)
    return row


def test_roundtrip(tmp_path: Path) -> None:
    trips = [
        Triplet.from_row(_t()),
        Triplet.from_row(_t(target=None, target_id=None, extra={"k": [1]})),
    ]
    assert write_jsonl(tmp_path / "test.jsonl", trips) == 2
    assert load_triplets(tmp_path, "test") == trips
    assert read_jsonl(tmp_path / "test.jsonl")[0]["extra"] == {}
    gal = [
        GalleryItem("g1", "images/a.png", {"signature": "x"}),
        GalleryItem("g2", "/abs/b.png", {}),
    ]
    write_jsonl(tmp_path / "gallery.jsonl", gal)
    assert load_gallery(tmp_path) == gal
    check_split_against_gallery(trips, gal, "test")
    assert resolve_path(tmp_path, "images/a.png") == tmp_path / "images/a.png"
    assert resolve_path(tmp_path, "/abs/b.png") == Path("/abs/b.png")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"reference": "a"}', "missing key(s) caption"),
        (
            '{"reference": "a", "caption": "c", "target": null, "type": "t", "reference_id": "", '
            '"target_id": null, "bogus": 1}',
            "unknown key(s) bogus",
        ),
        (
            '{"reference": "a", "caption": 3, "target": null, "type": "t", "reference_id": "", '
            '"target_id": null}',
            "'caption' must be a string",
        ),
        (
            '{"reference": "", "caption": "c", "target": null, "type": "t", "reference_id": "", '
            '"target_id": null}',
            "'reference' must not be empty",
        ),
        (
            '{"reference": "a", "caption": "c", "target": null, "type": "t", "reference_id": "", '
            '"target_id": null, "extra": 5}',
            "'extra' must be an object",
        ),
    ],
)
def test_bad_triplet_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    good = '{"reference": "a", "caption": "c", "target": "b", "type": "t", "reference_id": "", "target_id": null}'
    (tmp_path / "val.jsonl").write_text(good + "\n\n" + line + "\n")
    with pytest.raises(DataFormatError) as exc:
        load_triplets(tmp_path, "val")
    assert f"{tmp_path / 'val.jsonl'}:3:" in str(exc.value)
    assert message in str(exc.value)


def test_missing_split_lists_present(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [_t()])
    with pytest.raises(FileNotFoundError, match=r"splits present: \['train'\]"):
        load_triplets(tmp_path, "test")


def test_gallery_errors(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "gallery.jsonl", [{"id": "g1", "path": "a"}, {"id": "g1", "path": "b"}])
    with pytest.raises(DataFormatError, match=r"gallery.jsonl:2: duplicate gallery id 'g1'"):
        load_gallery(tmp_path)
    write_jsonl(tmp_path / "gallery.jsonl", [{"id": "g1"}])
    with pytest.raises(DataFormatError, match="missing key"):
        load_gallery(tmp_path)
    trips = [Triplet.from_row(_t(target_id="g9"))]
    with pytest.raises(DataFormatError, match="target_id 'g9' not in gallery"):
        check_split_against_gallery(trips, [GalleryItem("g1", "a", {})], "val")
