"""AppTest runs of the search page against a real in-process gRPC server (tiny model).

One gallery (24 shape images) and one server per module; each test drives a fresh AppTest.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.helpers import COLORS, Gallery, build_shapes_gallery, draw, free_port, png, start_server

APP = Path(__file__).resolve().parents[1] / "frontend" / "app.py"
API_KEY = "ui-test-key"


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Gallery:
    return build_shapes_gallery(tmp_path_factory.mktemp("ui-gallery"))


@pytest.fixture(scope="module")
def server(gallery: Gallery) -> Iterator[Any]:
    srv = start_server(gallery)
    yield srv
    srv.stop()


def _clear_caches() -> None:
    import streamlit as st

    st.cache_resource.clear()
    st.cache_data.clear()


def make_app(monkeypatch: pytest.MonkeyPatch, target: str, **env: str) -> Any:
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CIR_UI_SERVER", target)
    monkeypatch.setenv("CIR_UI_TIMEOUT", env.pop("timeout", "20"))
    monkeypatch.delenv("CIR_UI_API_KEY", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _clear_caches()
    return AppTest.from_file(str(APP), default_timeout=60)


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch, server: Any) -> Iterator[Any]:
    at = make_app(monkeypatch, server.target)
    yield at
    _clear_caches()


def errors(at: Any) -> str:
    return " | ".join(e.value for e in at.error)


def refine_keys(at: Any) -> list[str]:
    return [b.key for b in at.button if b.key and b.key.startswith("refine_")]


def uploader(at: Any) -> Any:
    return at.file_uploader(key=f"upload_{at.session_state['upload_gen']}")


def search(at: Any, text: str) -> Any:
    at.text_input(key="mod_text").input(text)
    at.button(key="search").click().run()
    assert not at.exception, at.exception
    assert not at.error, errors(at)
    return at


def test_upload_search_shows_results(app: Any) -> None:
    at = app.run()
    assert not at.exception and not at.error, errors(at)
    upload = png(draw("disc", (220, 40, 40), 40))
    uploader(at).set_value(("red-disc.png", upload, "image/png"))
    at.run()
    ref = at.session_state["ref"]
    assert ref.kind == "upload" and ref.data == upload and ref.label == "red-disc.png"
    assert any("uploaded `red-disc.png`" in m.value for m in at.markdown)

    search(at, "make it blue")
    results = at.session_state["results"]
    assert len(results) == 12 and [h.rank for h in results] == list(range(1, 13))
    assert refine_keys(at) == [f"refine_{r}" for r in range(1, 13)]
    assert all(h.user_id.startswith("img-") and h.id != h.user_id for h in results)
    # cards name images by their own ids, not by the uuid point ids
    assert {h.user_id for h in results} <= {c.value for c in at.caption}
    assert any(f"#1** · score `{results[0].score:.4f}`" in m.value for m in at.markdown)
    assert len(at.image) >= 13  # the reference + one thumbnail per result (+ gallery)
    assert "thumbnail" not in results[0].payload and results[0].payload["shape"]
    assert [s.text for s in at.session_state["history"]] == ["make it blue"]


def test_refine_makes_a_result_the_reference_then_the_next_text_searches(app: Any) -> None:
    at = app.run()
    search(at, "a larger one")
    first = list(at.session_state["results"])
    chosen = first[1]  # rank 2
    at.button(key="refine_2").click().run()
    assert not at.exception and not at.error, errors(at)
    ref = at.session_state["ref"]
    assert ref.kind == "gallery" and ref.gallery_id == chosen.id
    assert any(f"gallery image `{chosen.user_id}`" in m.value for m in at.markdown)
    assert len(at.session_state["history"]) == 1  # it waits for the next change
    search(at, "now a smaller one")
    history = at.session_state["history"]
    assert len(history) == 2 and history[1].reference.gallery_id == chosen.id
    assert history[1].text == "now a smaller one"
    assert at.session_state["query"].reference.gallery_id == chosen.id
    assert [h.id for h in at.session_state["results"]] != [h.id for h in first]
    # the whole gallery: the reference itself comes back among the results, marked once
    at.number_input(key="top_k").set_value(24)
    search(at, "now a smaller one")
    results = at.session_state["results"]
    rank = next(h.rank for h in results if h.id == chosen.id)
    marked = [m.value for m in at.markdown if "the reference" in m.value]
    assert len(marked) == 1 and marked[0].startswith(f"**#{rank}**")

    # Revisit step 1: the text-only query comes back with its results
    at.button(key="revisit_0").click().run()
    assert not at.exception and not at.error, errors(at)
    assert at.session_state["ref"] is None and at.session_state["history_pos"] == 0
    assert [h.id for h in at.session_state["results"]] == [h.id for h in first]
    assert len(at.session_state["history"]) == 3


def test_more_results_pages_through(app: Any) -> None:
    at = app.run()
    at.number_input(key="top_k").set_value(5)
    search(at, "the same but green")
    assert [h.rank for h in at.session_state["results"]] == [1, 2, 3, 4, 5]
    at.button(key="more").click().run()
    assert not at.exception and not at.error, errors(at)
    results = at.session_state["results"]
    assert [h.rank for h in results] == list(range(1, 11))
    assert len({h.id for h in results}) == 10
    assert refine_keys(at)[-1] == "refine_10"


def test_gallery_pick_and_filters(app: Any, gallery: Gallery) -> None:
    at = app.run()
    picks = [b.key for b in at.button if b.key and b.key.startswith("pick_")]
    assert len(picks) == 8  # one page of the random sample
    at.button(key=picks[0]).click().run()
    picked = picks[0].removeprefix("pick_")
    assert at.session_state["ref"].gallery_id == picked and picked in gallery.ids

    # the picked image is highlighted in the gallery
    assert at.button(key=picks[0]).disabled and at.button(key=picks[0]).label == "Picked"
    # keyword filters offer the gallery's values
    assert set(at.multiselect(key="flt_color").options) <= set(COLORS)
    assert "blue" in at.multiselect(key="flt_color").options
    at.multiselect(key="flt_color").set_value(["blue"])
    at.number_input(key="flt_size_min").set_value(30)
    search(at, "same shape")
    results = at.session_state["results"]
    assert results and all(
        h.payload["color"] == "blue" and h.payload["size"] >= 30 for h in results
    )
    assert at.session_state["query"].filter == {"color": "blue", "size": {"gte": 30}}

    (caption,) = [c.value for c in at.caption if " shown · " in c.value]
    assert "color is blue" in caption and "size ≥ 30" in caption and "{" not in caption

    # by id: the image's own id and its point id both work; an unknown one says so
    at.text_input(key="ref_id_input").input("img-007")
    at.button(key="use_id").click().run()
    assert at.session_state["ref"].gallery_id == "img-007"
    search(at, "make it red")
    assert at.session_state["results"]
    at.text_input(key="ref_id_input").input(gallery.ids[7])
    at.button(key="use_id").click().run()
    assert not at.error, errors(at)
    assert at.session_state["ref"].gallery_id == gallery.ids[7]
    at.text_input(key="ref_id_input").input("no-such-id")
    at.button(key="use_id").click().run()
    assert not at.exception and "no gallery image with id `no-such-id`" in errors(at)
    assert at.session_state["ref"].gallery_id == gallery.ids[7]


def test_upload_limit_comes_from_the_server(app: Any, server: Any) -> None:
    from frontend.cli import upload_limit_mb
    from frontend.config import UISettings
    from server.client import CIRClient

    with CIRClient(server.target) as c:
        lim = c.info().limits
    at = app.run()
    assert f"at most {lim.max_image_bytes // 2**20} MB" in uploader(at).label
    assert f"{lim.max_image_pixels / 1e6:.0f} megapixels" in uploader(at).label
    assert upload_limit_mb(UISettings(server=server.target)) == -(-lim.max_image_bytes // 2**20)
    # an image over the server's pixel limit is refused on upload, with the reason
    side = int(lim.max_image_pixels**0.5) + 10
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG")
    uploader(at).set_value(("huge.png", buf.getvalue(), "image/png"))
    at.run()
    assert f"`huge.png` was refused: The image is too large: the image is {side}x{side}" in errors(
        at
    )
    assert at.session_state["ref"] is None


def test_browse_pages(app: Any) -> None:
    at = app.run()
    at.radio(key="gallery_mode").set_value("Browse pages").run()
    first = [b.key for b in at.button if b.key and b.key.startswith("pick_")]
    at.button(key="gal_next").click().run()
    second = [b.key for b in at.button if b.key and b.key.startswith("pick_")]
    assert len(first) == len(second) == 8 and not set(first) & set(second)
    assert not at.exception and not at.error, errors(at)


def test_server_down_shows_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    at = make_app(monkeypatch, f"127.0.0.1:{free_port()}", timeout="3")
    at.run()
    assert not at.exception
    assert "Cannot reach the search server" in errors(at)
    at.text_input(key="mod_text").input("make it blue")
    at.button(key="search").click().run()
    assert not at.exception
    assert "Cannot reach the search server" in errors(at)
    assert at.session_state["results"] == []
    _clear_caches()


def test_wrong_api_key_shows_a_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # its own small gallery: an Edge shard has one opener, and the module's server holds that one
    srv = start_server(build_shapes_gallery(tmp_path, n=8), api_key=API_KEY)
    try:
        at = make_app(monkeypatch, srv.target, CIR_UI_API_KEY="wrong")
        at.run()
        assert not at.exception and "rejected the API key" in errors(at)
        at = make_app(monkeypatch, srv.target, CIR_UI_API_KEY=API_KEY)
        at.run()
        assert not at.exception and not at.error, errors(at)
        search(at, "make it red")
        assert at.session_state["results"]
    finally:
        srv.stop()
        _clear_caches()
