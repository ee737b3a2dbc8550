"""The "Why?" of a result card: the server's Explain for (the query's reference, its text, this
result), shown as the candidate and reference heatmap overlays and the caption with each word
coloured by its attribution (green raised the score, red lowered it; stronger = larger).

``render_why(gw, query, hit)`` draws the toggle and, when open, the explanation; the call is
cached per (server, reference, text, result) and failures are shown in the card, never raised.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import streamlit as st

from frontend.gateway import Gateway, HitView, UIError, to_ui_error
from frontend.state import Query

logger = logging.getLogger(__name__)

K_WHY = "why_open"  # set[tuple[str, str, str]]: (reference key, text, hit id) shown open
WHY_WIDTH = 160  # pixels of each overlay in a card


@dataclass(frozen=True)
class ExplainView:
    """What a card shows."""

    score: float
    candidate_png: bytes
    reference_png: bytes
    words: list[tuple[str, float]]  # (word, signed attribution), caption order


def fetch_explanation(gw: Gateway, query: Query, hit_id: str) -> ExplainView:
    """Explain ``hit_id`` for ``query``; raises only :class:`UIError`."""
    ref = query.reference
    if ref is None:
        raise UIError("invalid", "Why? needs a reference image (this was a text-only search).")
    try:
        res = gw.client.explain(
            query.text,
            hit_id,
            reference_image=ref.data if ref.kind == "upload" else None,
            reference_id=ref.gallery_id if ref.kind == "gallery" else None,
        )
    except UIError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message in the card
        err = to_ui_error(exc, gw.settings)
        logger.info("explain failed (%s): %s", err.kind, err.details)
        raise err from exc
    return ExplainView(
        score=float(res.score),
        candidate_png=bytes(res.candidate_map.png),
        reference_png=bytes(res.reference_map.png),
        words=[(w.word, float(w.score)) for w in res.words],
    )


@st.cache_data(show_spinner=False, max_entries=256)
def _cached(server: str, ref_key: str, text: str, hit_id: str, _gw: Gateway, _q: Query) -> Any:
    """Explanations cached per (server, reference, text, result); failures are not cached."""
    return fetch_explanation(_gw, _q, hit_id)


def words_html(words: Sequence[tuple[str, float]]) -> str:
    """The caption as HTML spans, each word's background green (> 0) or red (< 0) with an
    opacity proportional to |score| / max |score|; the score is in the tooltip."""
    top = max((abs(s) for _, s in words), default=0.0)
    spans = []
    for word, score in words:
        alpha = 0.0 if top == 0 else min(1.0, abs(score) / top)
        rgb = "40,160,70" if score > 0 else "215,50,50"
        spans.append(
            f'<span title="{score:+.4f}" style="background: rgba({rgb},{0.75 * alpha:.2f}); '
            f'padding: 0 2px; border-radius: 3px">{html.escape(word)}</span>'
        )
    return " ".join(spans)


def _key(query: Query, hit: HitView) -> tuple[str, str, str]:
    return (query.reference.key if query.reference else "", query.text, hit.id)


def _toggle(key: tuple[str, str, str]) -> None:
    opened: set[tuple[str, str, str]] = st.session_state.setdefault(K_WHY, set())
    opened.symmetric_difference_update({key})


def render_why(gw: Gateway, query: Query, hit: HitView) -> None:
    """A "Why?" toggle on a result card; when open, both overlays and the coloured caption."""
    key = _key(query, hit)
    opened = key in st.session_state.get(K_WHY, set())
    st.button(
        "Hide why" if opened else "Why?",
        key=f"why_{hit.rank}",
        on_click=_toggle,
        args=(key,),
        disabled=query.reference is None,
        help="Which parts of this image and of the reference, and which words, the score "
        "depends on" + ("" if query.reference else " (needs a reference image)"),
    )
    if not opened:
        return
    with st.spinner("Explaining…"):
        try:
            view: ExplainView = _cached(gw.settings.server, key[0], key[1], key[2], gw, query)
        except UIError as err:
            st.error(err.message, icon=":material/error:")
            return
    left, right = st.columns(2)
    left.image(view.candidate_png, caption="this result", width=WHY_WIDTH)
    right.image(view.reference_png, caption="reference", width=WHY_WIDTH)
    st.markdown(words_html(view.words), unsafe_allow_html=True)
    st.caption(f"explained score `{view.score:.4f}`: red/yellow = the score depends on it")
