"""The UI's second-stage toggle against a real server with a re-ranker (tiny model): on, the
results are re-ranked and Details shows both scores; off, the first stage alone; a server
without a re-ranker leaves the toggle disabled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_frontend_app import make_app, search, uploader

from tests.helpers import build_shapes_gallery, draw, png, start_server


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import torch

    from retrieval.encoder import Encoder
    from retrieval.rerank import Reranker, RerankerConfig, RerankerModel

    root = tmp_path_factory.mktemp("ui-rerank")
    gallery = build_shapes_gallery(root / "gallery")
    enc = Encoder.from_pretrained("tiny")
    assert enc.fingerprint == gallery.fingerprint
    model = RerankerModel(RerankerConfig.for_encoder(enc, "targets", width=16, heads=2))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a head that changes the order
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
        model.alpha.fill_(1.0)
    Reranker(model).save_pretrained(root / "reranker", weights_dtype=torch.float32)
    srv = start_server(gallery, reranker=str(root / "reranker"))
    yield srv
    srv.stop()


def _details(at: Any) -> list[str]:
    return [c.value for c in at.caption if "score `" in c.value]


def test_rerank_toggle_on_and_off(monkeypatch: pytest.MonkeyPatch, served: Any) -> None:
    at = make_app(monkeypatch, served.target).run()
    assert not at.exception, at.exception
    toggle = at.toggle(key="rerank")
    assert toggle.value is True and not toggle.disabled
    uploader(at).set_value(("disc.png", png(draw("disc", (220, 40, 40), 40)), "image/png"))
    at.run()
    search(at, "make it blue")
    on = at.session_state["results"]
    assert on and all(h.reranked for h in on)
    assert any("re-ranked score" in c and "first stage (MaxSim)" in c for c in _details(at))
    at.toggle(key="rerank").set_value(False).run()
    search(at, "make it blue")
    off = at.session_state["results"]
    assert off and not any(h.reranked for h in off)
    assert all(h.score == h.first_stage_score for h in off)
    assert [h.id for h in on] != [h.id for h in off]  # the second stage changed the order
    # the first stage's scores of the re-ranked hits are the plain search's scores
    first = {h.id: h.score for h in off}
    assert all(abs(h.first_stage_score - first[h.id]) < 1e-5 for h in on if h.id in first)


def test_toggle_disabled_without_a_reranker(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gallery = build_shapes_gallery(tmp_path / "gallery")
    srv = start_server(gallery)
    try:
        at = make_app(monkeypatch, srv.target).run()
        assert not at.exception, at.exception
        assert at.toggle(key="rerank").disabled
        uploader(at).set_value(("disc.png", png(draw("disc", (40, 70, 220), 40)), "image/png"))
        at.run()
        search(at, "make it red")
        assert not any(h.reranked for h in at.session_state["results"])
    finally:
        srv.stop()
