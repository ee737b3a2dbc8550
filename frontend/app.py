"""The Streamlit search page: a client of the CIR gRPC server (it never loads the model).

Run it with ``cir ui --server HOST:PORT`` (which sets ``CIR_UI_*`` and starts ``streamlit run``).

Flow: pick a reference (upload, gallery sample/pages, or an id), type a modification text,
press **Search**; results come as a grid with rank, score and the image's own id (the result
that is the reference itself is marked). **Use as reference** on a result makes it the next
reference and waits for the next change to be typed (iterative refinement); every search is a
history step (reference, text) that **Revisit** brings back.

Layout: the reference and its pickers on the left, the query box and the results on the right,
so that both are in view without scrolling on a 1400x900 window.

Every button only records what to do (callbacks run before the script); the script then runs
the pending search once, under a spinner, so the results below always match the state.
All server failures arrive as ``UIError`` and become an ``st.error`` box; nothing raises.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any

import streamlit as st

from frontend.config import UISettings
from frontend.explain_view import render_why
from frontend.gateway import (
    Gateway,
    HitView,
    InfoView,
    UIError,
    payload_for_display,
)
from frontend.state import (
    MAX_UPLOAD_PIXELS,
    UPLOAD_TYPES,
    Query,
    Reference,
    UploadError,
    build_filter,
    check_upload,
    describe_filter,
    filter_problems,
    human_bytes,
    known_values,
    upload_limit,
)

logger = logging.getLogger(__name__)

GRID_COLUMNS = 4  # result cards per row
GALLERY_COLUMNS = 4  # gallery thumbnails per row (in the narrower left column)
DEFAULT_TOP_K = 12  # three full rows
GALLERY_PAGE = 8  # gallery thumbnails per page (two rows)
REF_WIDTH = 160  # pixels of the current-reference preview
VALUE_SAMPLE = 100  # gallery items sampled for the keyword filters' known values
HEADING_TEXT = 60  # characters of the text shown in the results heading
# the picked gallery image and the result that is the reference stand out
CSS = """
<style>
.st-key-gal_picked { outline: 3px solid #ff4b4b; outline-offset: 2px; border-radius: 0.5rem; }
[class*="st-key-isref_"] { outline: 3px solid #1c83e1; outline-offset: 2px;
  border-radius: 0.5rem; }
</style>
"""

# Session-state keys (tests and docs/ui.md refer to these).
K_REF = "ref"  # Reference | None: the current reference
K_TEXT = "mod_text"  # the modification text widget
K_TOPK = "top_k"
K_MODE = "mode"
K_RERANK = "rerank"
K_QUERY = "query"  # Query | None: what the shown results answer
K_RESULTS = "results"  # list[HitView]: every page loaded so far
K_META = "search_meta"  # dict: index version, timings of the last page
K_DONE = "results_exhausted"  # bool: the last page came back short
K_HISTORY = "history"  # list[Query]: one per search
K_HPOS = "history_pos"  # int | None: the step the results belong to
K_PENDING = "pending"  # tuple: the action the next script run performs
K_ERROR = "error"  # str | None: the last failure, shown until the next action
K_NOTICE = "notice"  # str | None: a non-error note (e.g. "no more results")
K_INFO = "server_info"  # InfoView | None
K_INFO_ERR = "server_info_error"  # str | None
K_UPLOAD_SEEN = "upload_seen"  # file id of the last processed upload
K_UPLOAD_ERR = "upload_error"  # str | None: why the last upload was refused
K_UPLOAD_GEN = "upload_gen"  # int: the uploader's key is upload_<gen>; +1 empties it
K_HINT = "hint"  # str | None: what to do next (e.g. after Use as reference)
K_GAL_MODE = "gallery_mode"
K_GAL_SEED = "gallery_seed"
K_GAL_OFFSET = "gallery_offset"
K_REF_ID = "ref_id_input"

MODE_SAMPLE = "Random sample"
MODE_BROWSE = "Browse pages"


# ---------------------------------------------------------------------------- caches
@st.cache_resource(show_spinner=False)
def _gateway(server: str, api_key: str | None, timeout: float, tls_ca: str | None) -> Gateway:
    """One client (gRPC channel) per server/key, shared by every browser session."""
    return Gateway(UISettings(server=server, api_key=api_key, timeout=timeout, tls_ca=tls_ca))


def gateway(settings: UISettings) -> Gateway:
    return _gateway(settings.server, settings.api_key, settings.timeout, settings.tls_ca)


@st.cache_data(show_spinner=False, max_entries=4096)
def _image(server: str, image_id: str, kind: str, _gw: Gateway) -> tuple[bytes, str]:
    """Thumbnail/original bytes, cached per (server, id, kind); failures are not cached."""
    return _gw.get_image(image_id, kind)


@st.cache_data(show_spinner=False, ttl=60, max_entries=256)
def _gallery_page(
    server: str, page_size: int, offset: int, seed: int | None, version: str, _gw: Gateway
) -> Any:
    return _gw.list_images(page_size=page_size, offset=offset, random_seed=seed)


@st.cache_data(show_spinner=False, ttl=600, max_entries=64)
def _sample_values(
    server: str, version: str, fields: tuple[tuple[str, str], ...], size: int, _gw: Gateway
) -> dict[str, list[str]]:
    """Keyword values seen in a seeded gallery sample (one ListImages call per index version)."""
    page = _gw.list_images(page_size=size, random_seed=0)
    return known_values([item.payload for item in page.items], dict(fields))


def keyword_options(gw: Gateway, info: InfoView) -> dict[str, list[str]]:
    """Values to offer per keyword field: a gallery sample's, plus those in the results."""
    fields = tuple(sorted(info.fields.items()))
    try:
        sampled = _sample_values(
            gw.settings.server,
            info.index_version,
            fields,
            min(VALUE_SAMPLE, info.max_page_size),
            gw,
        )
    except UIError:
        sampled = {}
    seen = known_values([h.payload for h in st.session_state[K_RESULTS]], info.fields)
    return {
        name: sorted(set(sampled.get(name, [])) | set(values), key=str.casefold)
        for name, values in seen.items()
    }


# ---------------------------------------------------------------------------- state
def init_state() -> None:
    defaults: dict[str, Any] = {
        K_REF: None,
        K_TEXT: "",
        K_TOPK: DEFAULT_TOP_K,
        K_QUERY: None,
        K_RESULTS: [],
        K_META: {},
        K_DONE: False,
        K_HISTORY: [],
        K_HPOS: None,
        K_PENDING: None,
        K_ERROR: None,
        K_NOTICE: None,
        K_INFO: None,
        K_INFO_ERR: None,
        K_UPLOAD_SEEN: None,
        K_UPLOAD_ERR: None,
        K_UPLOAD_GEN: 0,
        K_HINT: None,
        K_GAL_MODE: MODE_SAMPLE,
        K_GAL_SEED: random.randrange(1_000_000),
        K_GAL_OFFSET: 0,
        K_REF_ID: "",
        K_RERANK: True,
    }
    for key, value in defaults.items():
        if key not in st.session_state:
            st.session_state[key] = value


def load_info(gw: Gateway, force: bool = False) -> InfoView | None:
    """Info once per session (again on Reconnect or when the index version moved)."""
    ss = st.session_state
    if ss[K_INFO] is not None and not force:
        return ss[K_INFO]
    if ss[K_INFO_ERR] is not None and not force:
        return None  # do not hammer a down server on every rerun; Reconnect retries
    try:
        ss[K_INFO] = gw.info()
        ss[K_INFO_ERR] = None
    except UIError as err:
        ss[K_INFO] = None
        ss[K_INFO_ERR] = err.message
    return ss[K_INFO]


# ---------------------------------------------------------------------------- callbacks
def _filter_widget_values(info: InfoView | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(field -> value for build_filter, widget key -> raw value for restoring)."""
    values: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    ss = st.session_state
    for name, ftype in (info.fields if info else {}).items():
        if ftype in ("integer", "float"):
            lo, hi = ss.get(f"flt_{name}_min"), ss.get(f"flt_{name}_max")
            values[name] = (lo, hi)
            raw[f"flt_{name}_min"], raw[f"flt_{name}_max"] = lo, hi
        else:
            values[name] = ss.get(f"flt_{name}")
            raw[f"flt_{name}"] = values[name]
    return values, raw


def _current_query(reference: Reference | None) -> Query | None:
    """The query the widgets describe, or None (with K_ERROR set) when it is not sendable."""
    ss = st.session_state
    info: InfoView | None = ss[K_INFO]
    text = str(ss.get(K_TEXT) or "").strip()
    if reference is None and ss[K_UPLOAD_ERR]:
        # the person meant to search with the file that was refused: never fall back to text
        ss[K_ERROR] = (
            f"There is no usable reference: {ss[K_UPLOAD_ERR]} Upload another image or pick "
            "one from the gallery (or remove the file to search by text alone)."
        )
        return None
    if not text:
        ss[K_ERROR] = "Type a modification text (e.g. “make it red”) before searching."
        return None
    if info and info.max_text_chars and len(text) > info.max_text_chars:
        ss[K_ERROR] = (
            f"The text is {len(text):,} characters; the server accepts at most "
            f"{info.max_text_chars:,}. Shorten it and search again."
        )
        return None
    values, raw = _filter_widget_values(info)
    fields = info.fields if info else {}
    problems = filter_problems(fields, values)
    if problems:
        ss[K_ERROR] = " ".join(problems)
        return None
    return Query(
        reference=reference,
        text=text,
        top_k=int(ss.get(K_TOPK) or DEFAULT_TOP_K),
        mode=str(ss.get(K_MODE) or "auto"),
        filter=build_filter(fields, values),
        filter_widgets=raw,
        rerank=bool(ss.get(K_RERANK)) and bool(info and info.reranker),
    )


def _clear_results() -> None:
    """No results on screen that the current state does not answer (e.g. after an error)."""
    ss = st.session_state
    ss[K_RESULTS], ss[K_QUERY], ss[K_META], ss[K_HPOS] = [], None, {}, None


def _reset_uploader() -> None:
    """A new uploader widget (a new key): the old file leaves the box with its error."""
    ss = st.session_state
    ss[K_UPLOAD_GEN] = int(ss[K_UPLOAD_GEN]) + 1
    ss[K_UPLOAD_SEEN] = ss[K_UPLOAD_ERR] = None


def on_search() -> None:
    ss = st.session_state
    ss[K_ERROR] = ss[K_NOTICE] = ss[K_HINT] = None
    query = _current_query(ss[K_REF])
    if query is None:
        _clear_results()
    else:
        ss[K_PENDING] = ("new", query)


def on_refine(image_id: str, user_id: str = "") -> None:
    """A result becomes the reference; the next change is typed before searching again."""
    ss = st.session_state
    ss[K_ERROR] = ss[K_NOTICE] = None
    ss[K_REF] = Reference.gallery(image_id, user_id)
    _reset_uploader()
    ss[K_HINT] = (
        f"The reference is now `{user_id or image_id}`. Type the next change and press Search."
    )


def on_more() -> None:
    ss = st.session_state
    ss[K_ERROR] = ss[K_NOTICE] = None
    if ss[K_QUERY] is not None:
        ss[K_PENDING] = ("more", ss[K_QUERY])


def on_revisit(index: int) -> None:
    """Bring a history step back: reference, text, settings and its results."""
    ss = st.session_state
    ss[K_ERROR] = ss[K_NOTICE] = ss[K_HINT] = None
    step: Query = ss[K_HISTORY][index]
    ss[K_REF] = step.reference
    if step.reference is not None:
        _reset_uploader()
    ss[K_TEXT] = step.text
    ss[K_TOPK] = step.top_k
    ss[K_MODE] = step.mode
    ss[K_RERANK] = step.rerank
    for key, value in step.filter_widgets.items():
        ss[key] = value
    ss[K_PENDING] = ("revisit", step, index)


def on_pick(image_id: str, user_id: str = "") -> None:
    ss = st.session_state
    ss[K_ERROR] = ss[K_HINT] = None
    ss[K_REF] = Reference.gallery(image_id, user_id)
    _reset_uploader()


def on_use_id(gw: Gateway) -> None:
    ss = st.session_state
    ss[K_ERROR] = ss[K_HINT] = None
    image_id = str(ss.get(K_REF_ID) or "").strip()
    if not image_id:
        ss[K_ERROR] = "Type a gallery id first."
        return
    try:
        _image(gw.settings.server, image_id, "thumbnail", gw)
    except UIError as err:
        if err.kind == "not_found":
            ss[K_ERROR] = f"There is no gallery image with id `{image_id}`."
        else:
            ss[K_ERROR] = err.message
        return
    ss[K_REF] = Reference.gallery(image_id)
    _reset_uploader()


def on_clear_reference() -> None:
    ss = st.session_state
    ss[K_REF] = ss[K_HINT] = ss[K_ERROR] = None
    _reset_uploader()


def on_clear_history() -> None:
    st.session_state[K_HISTORY] = []
    st.session_state[K_HPOS] = None


def on_shuffle() -> None:
    st.session_state[K_GAL_SEED] = random.randrange(1_000_000)


def on_gallery_page(delta: int) -> None:
    ss = st.session_state
    ss[K_GAL_OFFSET] = max(0, int(ss[K_GAL_OFFSET]) + delta)


def on_reconnect(gw: Gateway) -> None:
    ss = st.session_state
    ss[K_ERROR] = None
    load_info(gw, force=True)


# ---------------------------------------------------------------------------- actions
def run_pending(gw: Gateway) -> None:
    """Perform the recorded action (at most one per script run)."""
    ss = st.session_state
    pending = ss[K_PENDING]
    ss[K_PENDING] = None
    if not pending:
        return
    action, query = pending[0], pending[1]
    offset = len(ss[K_RESULTS]) if action == "more" else 0
    ref: Reference | None = query.reference
    with st.spinner("Searching…"):
        try:
            page = gw.search(
                query.text,
                reference_image=ref.data if ref and ref.kind == "upload" else None,
                reference_id=ref.gallery_id if ref and ref.kind == "gallery" else None,
                top_k=query.top_k,
                offset=offset,
                filter=query.filter or None,
                mode=query.mode,
                rerank_k=None if query.rerank else 0,
            )
        except UIError as err:
            ss[K_ERROR] = err.message
            if err.kind == "unavailable":
                ss[K_INFO_ERR] = err.message
            if action != "more":  # the old results do not answer the refused query
                _clear_results()
            return
    ss[K_META] = {"index_version": page.index_version, "timings": page.timings}
    ss[K_DONE] = len(page.hits) < query.top_k
    if action == "more":
        ss[K_RESULTS] = list(ss[K_RESULTS]) + page.hits
        if not page.hits:
            ss[K_NOTICE] = "No more results."
        return
    ss[K_RESULTS] = page.hits
    ss[K_QUERY] = query
    if action == "revisit":
        ss[K_HPOS] = pending[2]
    else:
        ss[K_HISTORY] = [*ss[K_HISTORY], query]
        ss[K_HPOS] = len(ss[K_HISTORY]) - 1
    info: InfoView | None = ss[K_INFO]
    if info is None or (page.index_version and page.index_version != info.index_version):
        load_info(gw, force=True)  # the server came back, or a new index version went live


# ---------------------------------------------------------------------------- rendering
def show_image(gw: Gateway, image_id: str, width: Any = "stretch") -> None:
    """A gallery thumbnail through GetImage (cached), else a note (the server never sends
    thumbnails in payloads: GetImage is the one source)."""
    try:
        data, _mime = _image(gw.settings.server, image_id, "thumbnail", gw)
    except UIError as err:
        st.caption(f"(no preview: {err.kind.replace('_', ' ')})")
        return
    st.image(data, width=width)


def render_sidebar(gw: Gateway, settings: UISettings, info: InfoView | None) -> None:
    ss = st.session_state
    with st.sidebar:
        st.header("Server")
        st.caption(f"`{settings.server}`")
        if info is not None:
            st.success(f"Connected · {info.index_count:,} images", icon=":material/check_circle:")
            st.caption(
                f"model `{info.preset}` · index `{info.index_name}` {info.index_version} "
                f"({info.backend}) · server {info.server_version}"
            )
        else:
            st.warning("Not connected.", icon=":material/cloud_off:")
        st.button("Reconnect", key="reconnect", on_click=on_reconnect, args=(gw,))

        st.header("Search settings")
        max_k = info.max_top_k if info else 100
        if int(ss[K_TOPK]) > max_k:
            ss[K_TOPK] = max_k
        st.number_input(
            "Results per page (top-k)", min_value=1, max_value=max_k, step=1, key=K_TOPK
        )
        modes = list(info.modes) if info else ["auto", "exact", "fast"]
        if ss.get(K_MODE) not in modes:
            ss[K_MODE] = modes[0]
        st.selectbox(
            "Search mode",
            modes,
            key=K_MODE,
            help="auto: exact for small galleries, fast above; exact: exact MaxSim over every "
            "token; fast: approximate candidates, then exact rerank.",
        )
        has_rr = bool(info and info.reranker)
        st.toggle(
            "Re-rank the top results",
            key=K_RERANK,
            disabled=not has_rr,
            help=(
                f"Second stage: the server's re-ranker looks at the reference, the text and each "
                f"of the first {info.default_rerank_k if info else 0} candidates together "
                "(slower, better first results). Off: the first stage's order alone."
                if has_rr
                else "This server has no re-ranker: results are the first stage's order."
            ),
        )
        fields = info.fields if info else {}
        if fields and info is not None:
            st.subheader("Filters")
            options = keyword_options(gw, info)
            for name, ftype in sorted(fields.items()):
                if ftype == "keyword":
                    key = f"flt_{name}"
                    chosen = ss.get(key)
                    if isinstance(chosen, str):  # a text from an older step: the same choice
                        chosen = ss[key] = [v.strip() for v in chosen.split(",") if v.strip()]
                    offered = sorted(
                        set(options.get(name, [])) | set(chosen or []), key=str.casefold
                    )
                    st.multiselect(
                        name,
                        offered,
                        key=key,
                        placeholder="any",
                        accept_new_options=True,
                        help="Any of the chosen values. The list holds the values seen in the "
                        "gallery; type another one to add it.",
                    )
                elif ftype in ("integer", "float"):
                    step: Any = 1 if ftype == "integer" else None
                    lo_col, hi_col = st.columns(2)
                    for col, end in ((lo_col, "min"), (hi_col, "max")):
                        key = f"flt_{name}_{end}"
                        # value=None: empty means an open end (and None, unlike other
                        # defaults, does not clash with Revisit writing the key)
                        col.number_input(f"{name} {end}", value=None, step=step, key=key)
                elif ftype == "bool":
                    st.selectbox(name, ["any", "true", "false"], key=f"flt_{name}")

        st.header("History")
        history: list[Query] = ss[K_HISTORY]
        if not history:
            st.caption("Each search adds a step (reference + text) you can come back to.")
        for i, step_q in enumerate(history):
            marker = "▶ " if ss[K_HPOS] == i else ""
            cols = st.columns([5, 3], vertical_alignment="center")
            cols[0].markdown(f"{marker}**{i + 1}.** {step_q.summary(40)}")
            cols[1].button("Revisit", key=f"revisit_{i}", on_click=on_revisit, args=(i,))
        if history:
            st.button("Clear history", key="clear_history", on_click=on_clear_history)


def render_reference(gw: Gateway) -> None:
    """The current reference, with Clear reference."""
    ref: Reference | None = st.session_state[K_REF]
    st.subheader("Reference")
    if ref is None:
        if st.session_state[K_UPLOAD_ERR]:
            st.warning("No usable reference: the uploaded file was refused (see Upload).")
        else:
            st.info("No reference yet: upload an image or pick one from the gallery.")
            st.caption("Without a reference the search uses the text alone.")
        return
    if ref.kind == "upload" and ref.data:
        st.image(ref.data, width=REF_WIDTH)
    elif ref.gallery_id:
        show_image(gw, ref.gallery_id, width=REF_WIDTH)
    st.markdown(f"**Current reference:** {ref.describe()}")
    st.button("Clear reference", key="clear_ref", on_click=on_clear_reference)


def _is_picked(ref: Reference | None, item: Any) -> bool:
    if ref is None or ref.kind != "gallery":
        return False
    return ref.gallery_id in (item.id, item.user_id) or bool(
        ref.user_id and ref.user_id == item.user_id
    )


def render_pickers(gw: Gateway, settings: UISettings, info: InfoView | None) -> None:
    ss = st.session_state
    tab_gallery, tab_upload, tab_id = st.tabs(["Gallery", "Upload", "By id"])

    with tab_upload:
        limit = upload_limit(info.max_image_bytes if info else 0, settings.max_upload_bytes)
        pixels = info.max_image_pixels if info and info.max_image_pixels else MAX_UPLOAD_PIXELS
        # Streamlit's own cap (its MB is 2**20 bytes) is the same limit, so its chip agrees
        uploaded = st.file_uploader(
            f"Upload a reference image (at most {human_bytes(limit)} and "
            f"{pixels / 1e6:.0f} megapixels)",
            type=list(UPLOAD_TYPES),
            key=f"upload_{ss[K_UPLOAD_GEN]}",
            max_upload_size=max(1, math.ceil(limit / 2**20)),
        )
        if uploaded is not None and uploaded.file_id != ss[K_UPLOAD_SEEN]:
            ss[K_UPLOAD_SEEN] = uploaded.file_id
            ss[K_HINT] = ss[K_ERROR] = None  # a new file answers the last complaint
            data = uploaded.getvalue()
            try:
                check_upload(data, limit, pixels)
            except UploadError as exc:
                ss[K_UPLOAD_ERR] = f"`{uploaded.name}` was refused: {exc}"
                ss[K_REF] = None  # never search with the previous reference by mistake
            else:
                ss[K_UPLOAD_ERR] = None
                ss[K_REF] = Reference.upload(uploaded.name, data)
        if uploaded is None and ss[K_UPLOAD_SEEN] is not None:
            ss[K_UPLOAD_SEEN] = ss[K_UPLOAD_ERR] = None  # the file was removed
        if ss[K_UPLOAD_ERR]:
            st.error(ss[K_UPLOAD_ERR], icon=":material/broken_image:")

    with tab_gallery:
        if info is None:
            st.caption("The gallery shows once the server is reachable.")
        else:
            st.radio("Show", [MODE_SAMPLE, MODE_BROWSE], key=K_GAL_MODE, horizontal=True)
            sample = ss[K_GAL_MODE] == MODE_SAMPLE
            page_size = min(GALLERY_PAGE, info.max_page_size)
            try:
                page = _gallery_page(
                    settings.server,
                    page_size,
                    0 if sample else int(ss[K_GAL_OFFSET]),
                    int(ss[K_GAL_SEED]) if sample else None,
                    info.index_version,
                    gw,
                )
            except UIError as err:
                st.error(err.message)
                page = None
            nav = st.columns(3, vertical_alignment="center")
            if sample:
                nav[0].button("Shuffle", key="gal_shuffle", on_click=on_shuffle)
            else:
                nav[0].button(
                    "Previous",
                    key="gal_prev",
                    on_click=on_gallery_page,
                    args=(-page_size,),
                    disabled=int(ss[K_GAL_OFFSET]) <= 0,
                )
                nav[1].button(
                    "Next",
                    key="gal_next",
                    on_click=on_gallery_page,
                    args=(page_size,),
                    disabled=page is None or page.next_offset is None,
                )
                if page is not None:
                    start = int(ss[K_GAL_OFFSET])
                    nav[2].caption(f"{start + 1}–{start + len(page.items)} of {page.total:,}")
            if page is not None:
                if not page.items:
                    st.caption("The gallery is empty.")
                ref: Reference | None = ss[K_REF]
                for row_start in range(0, len(page.items), GALLERY_COLUMNS):
                    cols = st.columns(GALLERY_COLUMNS)
                    for col, item in zip(
                        cols, page.items[row_start : row_start + GALLERY_COLUMNS], strict=False
                    ):
                        picked = _is_picked(ref, item)
                        box = col.container(key="gal_picked" if picked else None)
                        with box:
                            show_image(gw, item.id)
                            st.caption(f"**✓ {item.label}**" if picked else item.label)
                            st.button(
                                "Picked" if picked else "Pick",
                                key=f"pick_{item.id}",
                                on_click=on_pick,
                                args=(item.id, item.user_id),
                                disabled=picked,
                                type="primary" if picked else "secondary",
                            )

    with tab_id:
        st.text_input(
            "Gallery id",
            key=K_REF_ID,
            placeholder="e.g. img-0001 or photos/cat.jpg",
            help="The image's own id (the manifest's id column, or its path relative to the "
            "indexed folder) or its point id.",
        )
        st.button("Use this id", key="use_id", on_click=on_use_id, args=(gw,))


def render_query(info: InfoView | None) -> None:
    """The modification text and Search; a text over the server's limit is flagged here."""
    ss = st.session_state
    limit = info.max_text_chars if info and info.max_text_chars else 0
    text_col, btn_col = st.columns([5, 1], vertical_alignment="bottom")
    with text_col:
        # no max_chars: Streamlit would cut a longer paste without a word; say so instead
        st.text_input(
            "Modification text",
            key=K_TEXT,
            placeholder="e.g. “the same but red and larger”",
            help=f"At most {limit:,} characters." if limit else None,
        )
    with btn_col:
        st.button("Search", key="search", type="primary", on_click=on_search, width="stretch")
    n = len(str(ss.get(K_TEXT) or "").strip())
    if limit and n > limit:
        st.warning(
            f"The text is {n:,} characters; the server reads at most {limit:,}. Shorten it "
            "before searching.",
            icon=":material/short_text:",
        )
    if ss[K_HINT]:
        st.info(ss[K_HINT], icon=":material/edit:")


def render_results(gw: Gateway, info: InfoView | None) -> None:
    ss = st.session_state
    results: list[HitView] = ss[K_RESULTS]
    query: Query | None = ss[K_QUERY]
    if query is None:
        return
    st.subheader(f"Results for {query.summary(HEADING_TEXT)}")
    meta = ss[K_META] or {}
    timings = meta.get("timings") or {}
    bits = [f"{len(results)} shown", f"mode {query.mode}"]
    if query.filter:
        bits.append(f"filter: {describe_filter(query.filter)}")
    if meta.get("index_version"):
        bits.append(f"index {meta['index_version']}")
    if "total_ms" in timings:
        bits.append(f"{timings['total_ms']:.0f} ms on the server")
    st.caption(" · ".join(bits))
    if not results:
        st.info("No results. Try another text, or loosen the filters.")
        return
    ref = query.reference
    for row_start in range(0, len(results), GRID_COLUMNS):
        cols = st.columns(GRID_COLUMNS)
        for col, hit in zip(cols, results[row_start : row_start + GRID_COLUMNS], strict=False):
            is_ref = ref is not None and ref.is_hit(hit.id, hit.user_id, hit.payload)
            with col, st.container(border=True, key=f"card_{hit.rank}"):
                marker = st.container(key=f"isref_{hit.rank}") if is_ref else st.container()
                with marker:
                    show_image(gw, hit.id)
                line = f"**#{hit.rank}** · score `{hit.score:.4f}`"
                st.markdown(line + (" · :blue-badge[the reference]" if is_ref else ""))
                st.caption(hit.label)
                st.button(
                    "Use as reference",
                    key=f"refine_{hit.rank}",
                    on_click=on_refine,
                    args=(hit.id, hit.user_id),
                    help="Make this image the reference, then type the next change",
                )
                render_why(gw, query, hit)
                with st.expander("Details"):
                    st.caption(f"point id `{hit.id}`")
                    if hit.reranked:
                        st.caption(
                            f"re-ranked score `{hit.score:.4f}` · first stage (MaxSim) "
                            f"`{hit.first_stage_score:.4f}`"
                        )
                    else:
                        st.caption(f"first stage (MaxSim) score `{hit.score:.4f}`")
                    st.json(payload_for_display(hit.payload), expanded=True)
    max_offset = info.max_offset if info else 10_000
    st.button(
        "More results",
        key="more",
        on_click=on_more,
        disabled=bool(ss[K_DONE]) or len(results) >= max_offset,
    )
    if ss[K_NOTICE]:
        st.caption(ss[K_NOTICE])


def main() -> None:
    st.set_page_config(page_title="CIR search", page_icon=":material/image_search:", layout="wide")
    settings = UISettings.from_env()
    init_state()
    gw = gateway(settings)
    info = load_info(gw)
    ss = st.session_state
    st.html(CSS)

    st.title("Composed image retrieval")
    st.caption("Pick a reference image, say what to change, and search the gallery.")
    banner = ss[K_INFO_ERR] if info is None else None
    if banner:
        st.error(banner, icon=":material/cloud_off:")

    left, right = st.columns([1, 2], gap="large")
    with left:
        ref_box = st.container()
        render_pickers(gw, settings, info)  # first: an upload sets the reference drawn above
        with ref_box:
            render_reference(gw)
    with right:
        render_query(info)
        run_pending(gw)
        info = ss[K_INFO]
        if ss[K_ERROR] and ss[K_ERROR] != banner:  # the same "server down" message once is enough
            st.error(ss[K_ERROR], icon=":material/error:")
        render_results(gw, info)
    render_sidebar(gw, settings, info)


main()
