"""The UI's "Why?" (frontend/explain_view.py): caption colouring, and an AppTest run against a
real in-process gRPC server (tiny model) where "Why?" on a result card shows both overlays and
the coloured caption."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from frontend.explain_view import words_html
from tests.helpers import Gallery, build_shapes_gallery, start_server

APP = Path(__file__).resolve().parents[1] / "frontend" / "app.py"


def test_words_html_colours_by_sign_and_size_and_escapes() -> None:
    out = words_html([("make", 0.5), ("it", -0.25), ("<red>", 0.0)])
    spans = out.split("</span>")
    assert "rgba(40,160,70,0.75)" in spans[0] and ">make" in spans[0]  # largest |score|, green
    assert "rgba(215,50,50,0.38)" in spans[1] and ">it" in spans[1]  # half as large, red
    assert "&lt;red&gt;" in spans[2] and "<red>" not in out  # escaped
    assert 'title="+0.5000"' in spans[0] and 'title="-0.2500"' in spans[1]
    assert ",0.00);" in words_html([("a", 0.0)])  # nothing to colour: transparent


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Gallery:
    return build_shapes_gallery(tmp_path_factory.mktemp("why-gallery"), n=8)


@pytest.fixture(scope="module")
def server(gallery: Gallery) -> Iterator[Any]:
    srv = start_server(gallery)
    yield srv
    srv.stop()


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch, server: Any) -> Iterator[Any]:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CIR_UI_SERVER", server.target)
    monkeypatch.setenv("CIR_UI_TIMEOUT", "60")
    monkeypatch.delenv("CIR_UI_API_KEY", raising=False)
    st.cache_resource.clear()
    st.cache_data.clear()
    yield AppTest.from_file(str(APP), default_timeout=120)
    st.cache_resource.clear()
    st.cache_data.clear()


def _ok(at: Any) -> None:
    assert not at.exception, at.exception
    assert not at.error, " | ".join(e.value for e in at.error)


def test_why_shows_both_overlays_and_the_coloured_caption(app: Any, gallery: Gallery) -> None:
    at = app.run()
    _ok(at)
    at.text_input(key="ref_id_input").input(gallery.user_ids[0])
    at.button(key="use_id").click().run()
    _ok(at)
    at.text_input(key="mod_text").input("make it a green square")
    at.button(key="search").click().run()
    _ok(at)
    results = at.session_state["results"]
    assert results and at.button(key="why_1").label == "Why?"
    assert all(at.button(key=f"why_{h.rank}") for h in results)  # on every card
    images_before = len(at.image)
    at.button(key="why_1").click().run()
    _ok(at)
    assert at.button(key="why_1").label == "Hide why"
    assert len(at.image) == images_before + 2  # the result's and the reference's overlays
    caption = [m.value for m in at.markdown if "<span" in m.value]
    assert len(caption) == 1
    for word in ("make", "it", "a", "green", "square"):
        assert f">{word}</span>" in caption[0]
    assert any("explained score" in c.value for c in at.caption)
    # closing it hides the overlays again
    at.button(key="why_1").click().run()
    _ok(at)
    assert len(at.image) == images_before
    assert at.button(key="why_1").label == "Why?"
