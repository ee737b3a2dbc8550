"""The user's own ids (issue 17, item 4): read from a manifest's id column or a folder's relative
paths, unique within a version, stored in the payload under a keyword index, accepted wherever
an id is taken (reference_id, GetImage, `cir search --id`) and returned in every result.
Also the one list of image formats (.tiff) and plain-words decode errors (item 6)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from indexer.pipeline import build
from indexer.sources import IMAGE_EXTENSIONS, SourceError, read_source
from retrieval.imageio import IMAGE_EXTENSIONS as READABLE
from retrieval.imageio import ImageDecodeError, decode_image
from tests.helpers import write_images
from tests.helpers.indexing import build_config


def cfg(source: Path, index: Path, **kw: Any) -> Any:
    return build_config(source, index, **{"verify_sample": 4, **kw})


def write_manifest(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def payloads(index: Path) -> dict[str, dict[str, Any]]:
    """user_id -> payload of the active version."""
    from retrieval.index import open_index

    idx = open_index(f"edge:{index}", "g")
    try:
        return {r.payload["user_id"]: r.payload for r in idx.iter_records()}
    finally:
        idx.close()


# ----------------------------------------------------------------------------- sources
def test_folder_ids_are_relative_paths_and_tiff_is_read(tmp_path: Path) -> None:
    write_images(tmp_path / "f", 3, sub=2)
    Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "f" / "scan.TIFF")
    Image.new("RGB", (20, 20), (4, 5, 6)).save(tmp_path / "f" / "page.tif")
    col = read_source(tmp_path / "f")
    assert {it.user_id for it in col.items} == {it.relpath for it in col.items}
    assert {"scan.TIFF", "page.tif"} <= {it.user_id for it in col.items}
    assert col.ignored == 0 and col.id_source == "relpath"
    # one list of formats: the indexer's and the UI's are the same
    from frontend.state import UPLOAD_TYPES

    assert set(IMAGE_EXTENSIONS) == set(READABLE) >= {".tif", ".tiff"}
    assert {f".{t}" for t in UPLOAD_TYPES} == set(READABLE)
    with pytest.raises(SourceError, match="applies to manifests"):
        read_source(tmp_path / "f", id_column="id")


def test_manifest_id_column_default_explicit_and_errors(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", 3)
    rows = [{"path": f"imgs/img{i:04d}.png", "id": f"g{i:03d}", "sku": i * 10} for i in range(3)]
    m = write_manifest(tmp_path / "m.jsonl", rows)
    col = read_source(m)  # `id` is taken by default
    assert [it.user_id for it in col.items] == ["g000", "g001", "g002"]
    assert col.id_source == "column:id" and col.items[0].meta["id"] == "g000"
    col = read_source(m, id_column="sku")  # numbers become text ids
    assert [it.user_id for it in col.items] == ["0", "10", "20"]
    no_id = write_manifest(tmp_path / "n.jsonl", [{"path": r["path"]} for r in rows])
    assert [it.user_id for it in read_source(no_id).items] == [r["path"] for r in rows]

    with pytest.raises(SourceError, match="no column 'colour'.*id, path, sku"):
        read_source(m, id_column="colour")
    clash = write_manifest(tmp_path / "c.jsonl", [{**r, "id": "same"} for r in rows])
    with pytest.raises(SourceError, match=r"'same' \(3 rows: imgs/img0000.png") as err:
        read_source(clash)
    assert "unique" in str(err.value) and "--id-column" in str(err.value)
    blank = write_manifest(tmp_path / "b.jsonl", [rows[0], {**rows[1], "id": ""}])
    with pytest.raises(SourceError, match="1 row.*no value in the id column 'id': imgs/img0001"):
        read_source(blank)
    reserved = write_manifest(tmp_path / "r.jsonl", [{**rows[0], "user_id": "x"}])
    with pytest.raises(SourceError, match="'user_id' clashes"):
        read_source(reserved)
    # ... unless it is the id column itself
    assert read_source(reserved, id_column="user_id").items[0].user_id == "x"


def test_cli_build_with_a_clash_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    from cir.cli import app

    write_images(tmp_path / "imgs", 2)
    m = write_manifest(
        tmp_path / "m.jsonl",
        [{"path": "imgs/img0000.png", "gid": "x1"}, {"path": "imgs/img0001.png", "gid": "x1"}],
    )
    res = CliRunner().invoke(
        app,
        [
            "index", "build", str(m), "--index", f"edge:{tmp_path / 'ix'}", "--name", "g",
            "--model", "tiny", "--allow-untrained", "--id-column", "gid", "--workers", "0",
            "--no-progress",
        ],
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "'x1' (2 rows: imgs/img0000.png, imgs/img0001.png)" in res.output
    assert not (tmp_path / "ix" / "g").exists() or not any((tmp_path / "ix" / "g").iterdir())


# ----------------------------------------------------------------------------- the index
@pytest.mark.parametrize("scheme", ["edge", "local"])
def test_find_by_user_id_on_both_backends(tmp_path: Path, scheme: str) -> None:
    from retrieval.index import InvalidQueryError, open_index

    uri = f"{scheme}:{tmp_path / 'ix'}"
    rng = np.random.default_rng(0)
    with open_index(uri, "g", encoder_fingerprint="fp", preset="p") as idx:
        idx.upsert(
            [f"p{i}" for i in range(50)],
            rng.standard_normal((50, 4, 8)).astype(np.float32),
            [{"user_id": f"u{i % 49}", "n": i} for i in range(50)],  # u0 twice
        )
        (rec,) = idx.find_by_user_id("u7")
        assert rec.id == "p7" and rec.payload["n"] == 7
        assert sorted(r.id for r in idx.find_by_user_id("u0")) == ["p0", "p49"]
        assert len(idx.find_by_user_id("u0", limit=1)) == 1
        assert idx.find_by_user_id("nobody") == []
        assert idx.find_by_user_id("u7", with_payload=False)[0].payload == {}
        with pytest.raises(InvalidQueryError):
            idx.find_by_user_id("")
        if scheme == "edge":  # the lookup is a keyword payload index, not a scan
            with idx._use() as sh:  # type: ignore[attr-defined]
                schema = sh.shard.info().payload_schema
            assert "Keyword" in str(schema["user_id"].data_type)


def test_process_index_forwards_find_by_user_id(tmp_path: Path) -> None:
    from retrieval.index import open_index
    from retrieval.index.process import ProcessIndex

    uri = f"edge:{tmp_path / 'ix'}"
    with open_index(uri, "g", encoder_fingerprint="fp", preset="p") as idx:
        idx.upsert(["a", "b"], np.ones((2, 2, 4), np.float32), [{"user_id": "A"}, {"user_id": "B"}])
    with ProcessIndex(uri, "g", connections=1) as pidx:
        assert [r.id for r in pidx.find_by_user_id("B")] == ["b"]


# ----------------------------------------------------------------------------- the build
def test_build_stores_user_ids_and_incremental_follows_a_rename(tmp_path: Path, enc: Any) -> None:
    src = tmp_path / "f"
    write_images(src, 4, sub=2)
    ix = tmp_path / "ix"
    rep = build(cfg(src, ix), encoder=enc)
    assert rep.indexed == 4 and rep.activated
    got = payloads(ix)
    assert set(got) == {"d0/img0000.png", "d1/img0001.png", "d0/img0002.png", "d1/img0003.png"}
    assert all(p["user_id"] == p["relpath"] for p in got.values())
    from retrieval.index import open_index

    idx = open_index(f"edge:{ix}", "g")
    try:
        assert idx.meta is not None and idx.meta.extra["user_ids"] == "relpath"
    finally:
        idx.close()
    # a moved file keeps its point and takes its new path as its id
    shutil.move(str(src / "d0" / "img0000.png"), str(src / "moved.png"))
    rep = build(cfg(src, ix, incremental=True), encoder=enc)
    got = payloads(ix)
    assert rep.moved == 1 and "moved.png" in got and "d0/img0000.png" not in got


def test_build_from_a_manifest_with_ids(tmp_path: Path, enc: Any) -> None:
    write_images(tmp_path / "imgs", 3)
    rows = [{"path": f"imgs/img{i:04d}.png", "gallery_id": f"g{i:06d}"} for i in range(3)]
    m = write_manifest(tmp_path / "m.jsonl", rows)
    ix = tmp_path / "ix"
    rep = build(cfg(m, ix, id_column="gallery_id"), encoder=enc)
    assert rep.indexed == 3
    got = payloads(ix)
    assert set(got) == {"g000000", "g000001", "g000002"}
    assert got["g000001"]["relpath"] == "imgs/img0001.png"
    assert got["g000001"]["gallery_id"] == "g000001"  # the column stays in the payload too
    # cir demo reuses an index only when it knows the images by their gallery ids
    from cir.demo import index_is_current

    assert index_is_current(f"edge:{ix}", "g", enc.fingerprint, 3)
    build(cfg(m, tmp_path / "by-path"), encoder=enc)  # no id column: ids are the paths
    assert not index_is_current(f"edge:{tmp_path / 'by-path'}", "g", enc.fingerprint, 3)


# ----------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, enc: Any) -> Iterator[dict[str, Any]]:
    """A server on a gallery built by the indexer from a manifest with user ids."""
    from server.app import BackgroundServer
    from server.config import load_settings

    root = tmp_path_factory.mktemp("uid-served")
    write_images(root / "imgs", 8)
    rows = [{"path": f"imgs/img{i:04d}.png", "id": f"item-{i}"} for i in range(8)]
    m = write_manifest(root / "m.jsonl", rows)
    rep = build(cfg(m, root / "ix"), encoder=enc)
    assert rep.indexed == 8 and rep.activated
    settings = load_settings(
        None,
        index=f"edge:{root / 'ix'}",
        name="g",
        model="tiny",
        port=0,
        metrics_port=0,
        refresh_interval_s=0,
        grace_s=0.5,
        log_format="text",
        **({"allow_untrained": True} if _has_allow_untrained() else {}),
    )
    bg = BackgroundServer(settings, encoder=enc).start()
    try:
        yield {"target": bg.target, "server": bg}
    finally:
        bg.stop()


def _has_allow_untrained() -> bool:
    from server.config import ServerSettings

    return "allow_untrained" in getattr(ServerSettings, "model_fields", {})


def test_search_by_user_id_and_results_carry_it(served: dict[str, Any]) -> None:
    from server.client import CIRClient, NotFoundError

    with CIRClient(served["target"], timeout=30) as c:
        by_user = c.search("make it red", reference_id="item-3", top_k=8, mode="exact")
        assert {h.user_id for h in by_user.results} == {f"item-{i}" for i in range(8)}
        assert all(h.user_id == h.payload["user_id"] for h in by_user.results)
        point = next(h.id for h in by_user.results if h.user_id == "item-3")
        assert point != "item-3" and len(point) == 36  # the uuid point id
        by_point = c.search("make it red", reference_id=point, top_k=8, mode="exact")
        assert [h.id for h in by_point.results] == [h.id for h in by_user.results]
        # the same features: the second query (by the other id) came from the feature cache
        assert by_point.timings["reference_cached"] == 1.0
        # results carry the user id even without payloads
        bare = c.search("make it red", reference_id="item-3", top_k=3, include_payload=False)
        assert all(h.user_id.startswith("item-") and not h.payload for h in bare.results)
        # GetImage by either id gives the same bytes
        assert c.get_image("item-5") == c.get_image(
            next(h.id for h in by_user.results if h.user_id == "item-5")
        )
        with pytest.raises(NotFoundError, match="neither a point id nor a user id"):
            c.get_image("item-99")
        page = c.list_images(page_size=8)
        assert {it.user_id for it in page.items} == {f"item-{i}" for i in range(8)}


def test_cir_search_by_user_id_text_only_and_top_k_zero(served: dict[str, Any]) -> None:
    from cir.cli import app

    runner = CliRunner()
    base = ["search", "--server", served["target"], "--timeout", "30"]
    res = runner.invoke(app, [*base, "--id", "item-2", "--text", "make it red", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert len(out["results"]) == 8
    first = out["results"][0]
    assert set(first) >= {"rank", "user_id", "id", "score", "payload"}
    assert first["user_id"].startswith("item-") and first["user_id"] != first["id"]

    res = runner.invoke(app, [*base, "--text", "something blue", "--top-k", "3"])  # text only
    assert res.exit_code == 0, res.output
    assert "3 results" in res.stdout and "item-" in res.stdout

    res = runner.invoke(app, [*base, "--text", "x", "--top-k", "0"])
    assert res.exit_code == 2 and "--top-k" in res.output
    img = Path(__file__)
    res = runner.invoke(app, [*base, "--text", "x", "--id", "item-1", "--image", str(img)])
    assert res.exit_code == 2 and "at most one of --image" in res.output
    res = runner.invoke(app, [*base, "--text", "x", "--id", "nope"])
    assert res.exit_code == 1 and "NOT_FOUND" in res.output


def test_a_user_id_clash_in_an_index_is_reported(tmp_path: Path, enc: Any) -> None:
    """Two points with one user id (written around the indexer): FAILED_PRECONDITION naming
    both point ids, never one of them silently."""
    from retrieval.index import open_index
    from server.app import BackgroundServer
    from server.client import CIRClient, CIRError
    from server.config import load_settings

    uri = f"edge:{tmp_path / 'ix'}"
    imgs = [Image.new("RGB", (32, 32), c) for c in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    with open_index(uri, "g", encoder_fingerprint=enc.fingerprint, preset=enc.preset) as idx:
        thumbs = []
        for im in imgs:
            import base64
            import io

            buf = io.BytesIO()
            im.save(buf, "PNG")
            thumbs.append(base64.b64encode(buf.getvalue()).decode())
        idx.upsert(
            ["p-a", "p-b", "p-c"],
            enc.encode_targets(imgs),
            [
                {"user_id": u, "thumbnail": t}
                for u, t in zip(["dup", "dup", "one"], thumbs, strict=True)
            ],
        )
    settings = load_settings(
        None, index=uri, name="g", model="tiny", port=0, metrics_port=0,
        refresh_interval_s=0, grace_s=0.5, log_format="text",
        **({"allow_untrained": True} if _has_allow_untrained() else {}),
    )  # fmt: skip
    bg = BackgroundServer(settings, encoder=enc).start()
    try:
        with CIRClient(bg.target, timeout=30) as c:
            with pytest.raises(CIRError) as err:
                c.get_image("dup")
            assert err.value.code.name == "FAILED_PRECONDITION"
            assert "p-a" in err.value.details and "p-b" in err.value.details
            assert c.get_image("one")[1] == "image/png"
            assert c.get_image("p-a")[1] == "image/png"  # point ids still resolve
    finally:
        bg.stop()


# ----------------------------------------------------------------------------- messages
@pytest.mark.parametrize(
    ("data", "reason", "words"),
    [
        (b"hello, this is a note", "not-an-image", "the file is text, not a JPEG, PNG"),
        (b"%PDF-1.7\n...", "not-an-image", "a PDF document"),
        (b"<!DOCTYPE html><html>", "not-an-image", "an HTML page"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00", "not-an-image", "HEIC/HEIF photo"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "corrupt", "starts like a PNG image but its data"),
        (b"\x89PNG garbage", "not-an-image", "binary data of an unknown kind"),
        ("caf\u00e9 cr\u00e8me".encode()[:-1], "not-an-image", "the file is text"),  # cut UTF-8
        (b"", "empty", "no bytes"),
    ],
)
def test_decode_errors_say_what_the_file_is(data: bytes, reason: str, words: str) -> None:
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    assert err.value.reason == reason and words in err.value.detail
    assert "BytesIO" not in str(err.value) and "0x" not in str(err.value)


def test_index_report_names_the_problem_in_plain_words(tmp_path: Path, enc: Any) -> None:
    src = tmp_path / "f"
    write_images(src, 2)
    (src / "notes.png").write_text("shopping list: milk")
    (src / "cut.png").write_bytes((src / "img0000.png").read_bytes()[:60])
    rep = build(cfg(src, tmp_path / "ix"), encoder=enc)
    details = {Path(s["path"]).name: s["detail"] for s in rep.skipped}
    assert "the file is text, not a JPEG" in details["notes.png"]
    assert "PNG" in details["cut.png"]
    assert not any("BytesIO" in d or " at 0x" in d for d in details.values())
