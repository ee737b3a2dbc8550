"""The Streamlit search page: a client of the CIR gRPC server (it never loads the model).

Run it with ``cir ui --server HOST:PORT`` (which sets ``CIR_UI_*`` and starts ``streamlit run``).

Flow: pick a reference (upload, gallery sample/pages, or an id), type a modification text,
press **Search**; results come as a grid with rank and score. **Use as reference** on a result
makes it the next reference and searches again with the current text (iterative refinement);
every search is a history step (reference, text) that **Revisit** brings back.

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
from frontend.gateway import (
    Gateway,
    HitView,
    InfoView,
    UIError,
    payload_for_display,
    thumbnail_from_payload,
)
from frontend.state import (
    UPLOAD_TYPES,
    Query,
    Reference,
    UploadError,
    build_filter,
    check_upload,
    filter_problems,
)

logger = logging.getLogger(__name__)

GRID_COLUMNS = 4  # result cards per row
DEFAULT_TOP_K = 12  # three full rows
GALLERY_PAGE = 8  # gallery thumbnails per page (two rows)
REF_WIDTH = 240  # pixels of the current-reference preview

# Session-state keys (tests and docs/ui.md refer to these).
K_REF = "ref"  # Reference | None: the current reference
K_TEXT = "mod_text"  # the modification text widget
K_TOPK = "top_k"
K_MODE = "mode"
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
K_UPLOAD_ERR = "upload_error"  # str | None
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
        K_GAL_MODE: MODE_SAMPLE,
        K_GAL_SEED: random.randrange(1_000_000),
        K_GAL_OFFSET: 0,
        K_REF_ID: "",
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
    if not text:
        ss[K_ERROR] = "Type a modification text (e.g. “make it red”) before searching."
        return None
    if info and info.max_text_chars and len(text) > info.max_text_chars:
        ss[K_ERROR] = (
            f"The text is {len(text)} characters; the server accepts at most {info.max_text_chars}."
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
    )


def on_search() -> None:
    ss = st.session_state
    ss[K_ERROR] = ss[K_NOTICE] = None
    query = _current_query(ss[K_REF])
    if query is not None:
        ss[K_PENDING] = ("new", query)


def on_refine(image_id: str) -> None:
    """A result becomes the reference and the current text runs against it at once."""
    ss = st.session_state
    ss[K_ERROR] = ss[K_NOTICE] = None
    ss[K_REF] = Reference.gallery(image_id)
    query = _current_query(ss[K_REF])
    if query is not None:
        ss[K_PENDING] = ("new", query)


def on_more() -> None:
    ss = st.session_state
    ss[K_ERROR] = ss[K_NOTICE] = None
    if ss[K_QUERY] is not None:
        ss[K_PENDING] = ("more", ss[K_QUERY])


def on_revisit(index: int) -> None:
    """Bring a history step back: reference, text, settings and its results."""
    ss = st.session_state
    ss[K_ERROR] = ss[K_NOTICE] = None
    step: Query = ss[K_HISTORY][index]
    ss[K_REF] = step.reference
    ss[K_TEXT] = step.text
    ss[K_TOPK] = step.top_k
    ss[K_MODE] = step.mode
    for key, value in step.filter_widgets.items():
        ss[key] = value
    ss[K_PENDING] = ("revisit", step, index)


def on_pick(image_id: str) -> None:
    ss = st.session_state
    ss[K_ERROR] = None
    ss[K_REF] = Reference.gallery(image_id)


def on_use_id(gw: Gateway) -> None:
    ss = st.session_state
    ss[K_ERROR] = None
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


def on_clear_reference() -> None:
    st.session_state[K_REF] = None


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
            )
        except UIError as err:
            ss[K_ERROR] = err.message
            if err.kind == "unavailable":
                ss[K_INFO_ERR] = err.message
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
def show_image(
    gw: Gateway, image_id: str, payload: dict[str, Any] | None = None, width: Any = "stretch"
) -> None:
    """A gallery thumbnail through GetImage (cached), else the payload's, else a note."""
    data: bytes | None
    try:
        data, _mime = _image(gw.settings.server, image_id, "thumbnail", gw)
    except UIError as err:
        data = thumbnail_from_payload(payload or {})
        if data is None:
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
        fields = info.fields if info else {}
        if fields:
            st.subheader("Filters")
            for name, ftype in sorted(fields.items()):
                if ftype == "keyword":
                    st.text_input(
                        name,
                        key=f"flt_{name}",
                        placeholder="any (comma-separated: any of)",
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
            cols[0].markdown(f"{marker}**{i + 1}.** {step_q.summary()}")
            cols[1].button("Revisit", key=f"revisit_{i}", on_click=on_revisit, args=(i,))
        if history:
            st.button("Clear history", key="clear_history", on_click=on_clear_history)


def render_reference(gw: Gateway, box: Any) -> None:
    """The current reference (drawn into ``box``, a container placed above the pickers)."""
    ref: Reference | None = st.session_state[K_REF]
    with box:
        st.subheader("Reference")
        if ref is None:
            st.info("No reference yet: upload an image or pick one from the gallery.")
            st.caption("Without a reference the search uses the text alone.")
            return
        if ref.kind == "upload" and ref.data:
            st.image(ref.data, width=REF_WIDTH)
        elif ref.gallery_id:
            show_image(gw, ref.gallery_id, width=REF_WIDTH)
        st.markdown(f"**Current reference:** {ref.describe()}")
        st.button("Clear reference", key="clear_ref", on_click=on_clear_reference)


def render_pickers(gw: Gateway, settings: UISettings, info: InfoView | None) -> None:
    ss = st.session_state
    tab_gallery, tab_upload, tab_id = st.tabs(["Gallery", "Upload", "By id"])

    with tab_upload:
        limit = settings.max_upload_bytes
        if info and info.max_image_bytes:
            limit = min(limit, info.max_image_bytes)
        uploaded = st.file_uploader(
            f"Upload a reference image (at most {limit / 2**20:.0f} MiB)",
            type=list(UPLOAD_TYPES),
            key="upload",
            max_upload_size=max(1, math.ceil(2 * limit / 2**20)),
        )
        if uploaded is not None and uploaded.file_id != ss[K_UPLOAD_SEEN]:
            ss[K_UPLOAD_SEEN] = uploaded.file_id
            data = uploaded.getvalue()
            try:
                check_upload(data, limit)
            except UploadError as exc:
                ss[K_UPLOAD_ERR] = f"{uploaded.name}: {exc}"
            else:
                ss[K_UPLOAD_ERR] = None
                ss[K_REF] = Reference.upload(uploaded.name, data)
        if uploaded is None:
            ss[K_UPLOAD_SEEN] = None
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
                for row_start in range(0, len(page.items), GRID_COLUMNS):
                    cols = st.columns(GRID_COLUMNS)
                    for col, item in zip(
                        cols, page.items[row_start : row_start + GRID_COLUMNS], strict=False
                    ):
                        with col:
                            show_image(gw, item.id, item.payload)
                            st.caption(item.id)
                            st.button(
                                "Pick", key=f"pick_{item.id}", on_click=on_pick, args=(item.id,)
                            )

    with tab_id:
        st.text_input("Gallery id", key=K_REF_ID, placeholder="e.g. img-0001")
        st.button("Use this id", key="use_id", on_click=on_use_id, args=(gw,))


def render_results(gw: Gateway, info: InfoView | None) -> None:
    ss = st.session_state
    results: list[HitView] = ss[K_RESULTS]
    query: Query | None = ss[K_QUERY]
    if query is None:
        return
    st.subheader(f"Results for {query.summary()}")
    meta = ss[K_META] or {}
    timings = meta.get("timings") or {}
    bits = [f"{len(results)} shown", f"mode {query.mode}"]
    if query.filter:
        bits.append(f"filter {query.filter}")
    if meta.get("index_version"):
        bits.append(f"index {meta['index_version']}")
    if "total_ms" in timings:
        bits.append(f"{timings['total_ms']:.0f} ms on the server")
    st.caption(" · ".join(bits))
    if not results:
        st.info("No results. Try another text, or loosen the filters.")
        return
    for row_start in range(0, len(results), GRID_COLUMNS):
        cols = st.columns(GRID_COLUMNS)
        for col, hit in zip(cols, results[row_start : row_start + GRID_COLUMNS], strict=False):
            with col, st.container(border=True, key=f"card_{hit.rank}"):
                show_image(gw, hit.id, hit.payload)
                st.markdown(f"**#{hit.rank}** · score `{hit.score:.4f}`")
                st.caption(hit.id)
                st.button(
                    "Use as reference",
                    key=f"refine_{hit.rank}",
                    on_click=on_refine,
                    args=(hit.id,),
                    help="Make this image the reference and search again with the current text",
                )
                with st.expander("Details"):
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

    st.title("Composed image retrieval")
    st.caption("Pick a reference image, say what to change, and search the gallery.")
    banner = ss[K_INFO_ERR] if info is None else None
    if banner:
        st.error(banner, icon=":material/cloud_off:")

    left, right = st.columns([1, 2], gap="large")
    ref_box = left.container()
    with right:
        render_pickers(gw, settings, info)
    render_reference(gw, ref_box)

    st.divider()
    text_col, btn_col = st.columns([5, 1], vertical_alignment="bottom")
    with text_col:
        st.text_input(
            "Modification text",
            key=K_TEXT,
            placeholder="e.g. “the same but red and larger”",
            max_chars=info.max_text_chars if info and info.max_text_chars else None,
        )
    with btn_col:
        st.button("Search", key="search", type="primary", on_click=on_search, width="stretch")

    run_pending(gw)
    info = ss[K_INFO]
    if ss[K_ERROR] and ss[K_ERROR] != banner:  # the same "server down" message once is enough
        st.error(ss[K_ERROR], icon=":material/error:")
    render_sidebar(gw, settings, info)
    render_results(gw, info)


main()
