"""The Streamlit UI without a model: pure helpers, the CLI, and AppTest runs against a fake client.

The tests against a real in-process server (small model) live in test_frontend_app.py, the
browser test in test_frontend_e2e.py.
"""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from PIL import Image

from frontend.config import UISettings
from frontend.gateway import Gateway, UIError, classify, payload_for_display, to_ui_error
from frontend.state import (
    Query,
    Reference,
    UploadError,
    build_filter,
    check_upload,
    describe_filter,
    filter_problems,
    known_values,
    parse_keyword,
    shorten,
    upload_limit,
)
from server import client_errors as cerr
from server.client import (
    Hit,
    ImageItem,
    ImagePage,
    IndexInfo,
    Limits,
    ModelInfo,
    SearchResult,
    ServerInfo,
)

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "frontend" / "app.py"


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------ config
def test_settings_roundtrip_through_env() -> None:
    s = UISettings(server="h:1", api_key="k", timeout=3.5, tls_ca=None, max_upload_bytes=2**20)
    assert UISettings.from_env(s.to_env()) == s


def test_settings_bad_numbers_fall_back() -> None:
    s = UISettings.from_env({"CIR_UI_TIMEOUT": "soon", "CIR_UI_MAX_UPLOAD_MB": "-1"})
    # no cap of the UI's own: the server's max_image_bytes is the one limit
    assert s.timeout == 10.0 and s.max_upload_bytes is None and s.api_key is None
    assert UISettings.from_env(UISettings().to_env()).max_upload_bytes is None


def test_one_upload_limit_from_the_server() -> None:
    assert upload_limit(32 * 2**20, None) == 32 * 2**20  # the server's Info
    assert upload_limit(32 * 2**20, 5 * 2**20) == 5 * 2**20  # a lower cap of cir ui
    assert upload_limit(0, None) == 10 * 2**20  # unknown: the server's default


# ------------------------------------------------------------------------------ filters
def test_build_filter_per_type() -> None:
    fields = {"category": "keyword", "year": "integer", "price": "float", "sale": "bool"}
    values = {"category": "bag, shoe", "year": (2000, None), "price": (None, 9.5), "sale": "true"}
    assert build_filter(fields, values) == {
        "category": ["bag", "shoe"],
        "year": {"gte": 2000},
        "price": {"lte": 9.5},
        "sale": True,
    }
    empty = {"category": "  ", "year": (None, None), "price": None, "sale": "any"}
    assert build_filter(fields, empty) == {}
    assert parse_keyword("red") == "red"
    assert build_filter({"c": "keyword"}, {"c": ["x"]}) == {"c": "x"}


def test_filter_problems_min_above_max() -> None:
    assert filter_problems({"year": "integer"}, {"year": (5, 1)})
    assert not filter_problems({"year": "integer"}, {"year": (1, 5)})


# ------------------------------------------------------------------------------ uploads
def test_check_upload_accepts_an_image() -> None:
    assert check_upload(png_bytes(size=20), 2**20) == (20, 20)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "The file is empty"),
        (b"not an image at all", "The file is text, not a JPEG, PNG, WebP, GIF, BMP or TIFF"),
        (b"%PDF-1.5 ...", "a PDF document"),
        (png_bytes()[:60], "PNG"),  # truncated: says which format and what is wrong
        (b"\0" * (2 * 2**20), "The file is 2 MB; the server accepts at most 1 MB"),
    ],
)
def test_check_upload_refuses_bad_files(data: bytes, needle: str) -> None:
    with pytest.raises(UploadError, match=needle) as err:
        check_upload(data, 2**20)
    assert "BytesIO" not in str(err.value) and " at 0x" not in str(err.value)


def test_check_upload_refuses_too_many_pixels_before_decoding() -> None:
    big = io.BytesIO()
    Image.new("RGB", (3000, 2000)).save(big, format="PNG")
    with pytest.raises(UploadError, match="3000x2000 = 6,000,000 pixels; the limit is 5,000,000"):
        check_upload(big.getvalue(), 2**20, max_pixels=5_000_000)
    assert check_upload(big.getvalue(), 2**20, max_pixels=6_000_000) == (3000, 2000)


def test_filter_in_words_known_values_and_short_headings() -> None:
    flt = {"color": ["red", "blue"], "size": {"gte": 30, "lt": 50.0}, "sale": True, "c": "x"}
    assert describe_filter(flt) == (
        "color is red or blue · size ≥ 30 and size < 50 · sale is true · c is x"
    )
    fields = {"color": "keyword", "size": "integer", "tags": "keyword"}
    pays = [{"color": "red", "tags": ["a", "b"]}, {"color": "Blue", "size": 3}, {"color": ""}]
    assert known_values(pays, fields) == {"color": ["Blue", "red"], "tags": ["a", "b"]}
    long = "make it " + "much " * 1000 + "redder"
    assert len(shorten(long, 60)) <= 60 and shorten(long, 60).endswith("…")
    assert shorten("short text", 60) == "short text"
    summary = Query(reference=None, text=long).summary(60)
    assert summary.startswith("(text only) + “make it much") and len(summary) < 90


def test_reference_knows_itself_among_results() -> None:
    ref = Reference.gallery("3f2b-point", "g001")
    assert ref.label == "g001" and ref.is_hit("3f2b-point") and ref.is_hit("other", "g001")
    assert not ref.is_hit("other", "g002")
    data = png_bytes()
    up = Reference.upload("mine.png", data)
    import hashlib

    assert up.is_hit("p", "u", {"sha256": hashlib.sha256(data).hexdigest()})
    assert not up.is_hit("p", "u", {"sha256": "0" * 64}) and not up.is_hit("p", "u", {})


def test_reference_identity() -> None:
    a, b = Reference.upload("a.png", b"1"), Reference.upload("b.png", b"1")
    assert a.key == b.key and Reference.gallery("x").key == "gallery:x"


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("exc", "kind", "needle"),
    [
        (
            cerr.ServerUnavailableError(grpc.StatusCode.UNAVAILABLE, "refused"),
            "unavailable",
            "Cannot reach",
        ),
        (
            cerr.UnauthenticatedError(grpc.StatusCode.UNAUTHENTICATED, "bad key"),
            "unauthenticated",
            "API key",
        ),
        (
            cerr.InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, "text: empty"),
            "invalid",
            "text: empty",
        ),
        (
            cerr.DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED, "late"),
            "timeout",
            "within 2 s",
        ),
        (cerr.NotFoundError(grpc.StatusCode.NOT_FOUND, "id x"), "not_found", "id x"),
        (cerr.ResourceExhaustedError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full"), "busy", "busy"),
        (RuntimeError("boom"), "other", "boom"),
    ],
)
def test_errors_become_messages(exc: Exception, kind: str, needle: str) -> None:
    err = to_ui_error(exc, UISettings(server="h:1", timeout=2.0))
    assert classify(exc) == kind and err.kind == kind and needle in err.message


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("UNAVAILABLE", "unavailable"),
        ("UNAUTHENTICATED", "unauthenticated"),
        ("PERMISSION_DENIED", "unauthenticated"),
        ("INVALID_ARGUMENT", "invalid"),
        ("OUT_OF_RANGE", "invalid"),
        ("NOT_FOUND", "not_found"),
        ("DEADLINE_EXCEEDED", "timeout"),
        ("RESOURCE_EXHAUSTED", "busy"),
        ("FAILED_PRECONDITION", "mismatch"),
        ("INTERNAL", "other"),
        ("UNKNOWN", "other"),
    ],
)
def test_ui_maps_the_clients_error_code(code: str, kind: str) -> None:
    """The kind comes from ``CIRError.code`` alone: the base class with a code maps the same as
    the client's subclass for that code."""
    status = grpc.StatusCode[code]
    assert classify(cerr.CIRError(status, "why")) == kind
    assert classify(cerr.from_rpc_error(_RpcError(status, "why"))) == kind
    err = to_ui_error(cerr.CIRError(status, "the details"), UISettings(server="h:1"))
    assert err.kind == kind and "the details" in err.message and err.details == "the details"


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


def test_ui_does_not_match_class_names() -> None:
    """An exception that only looks like a client error (its class name, a ``code`` attribute)
    is "other": the UI maps the typed client's code, nothing else."""
    NotFoundError = type("NotFoundError", (Exception,), {})  # noqa: N806
    assert classify(NotFoundError("x")) == "other"
    fake = RuntimeError("x")
    fake.code = grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert classify(fake) == "other"


def test_ui_imports_only_the_client_from_server() -> None:
    allowed = ("server.client", "server.client_errors", "server._generated")
    for path in (REPO / "frontend").glob("*.py"):
        names = {n for n in _imports(path) if n.split(".")[0] == "server"}
        bad = {n for n in names if not n.startswith(allowed)}
        assert not bad, f"{path.name} imports {bad}"


def test_payload_display_drops_thumbnail_and_shortens() -> None:
    out = payload_for_display({"thumbnail": "x" * 10, "path": "p" * 500, "n": 1})
    assert "thumbnail" not in out and out["n"] == 1 and len(out["path"]) < 260


# ------------------------------------------------------------------------------ CLI
def test_cli_registers_ui_and_builds_streamlit_command() -> None:
    import typer
    from typer.testing import CliRunner

    from frontend.cli import APP_PATH, register, streamlit_command

    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command so typer keeps `ui` as a subcommand
        pass

    res = CliRunner().invoke(app, ["ui", "--help"])
    assert res.exit_code == 0, res.output
    for flag in ("--server", "--port", "--api-key", "--host", "--timeout"):
        assert flag in res.output
    cmd = streamlit_command("127.0.0.1", 9999)
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == str(APP_PATH)
    joined = " ".join(cmd)
    assert "--server.headless true" in joined and "--server.port 9999" in joined
    assert "--server.address 127.0.0.1" in joined and "--browser.gatherUsageStats false" in joined
    bad = CliRunner().invoke(app, ["ui", "--server", "nocolon"])
    assert bad.exit_code != 0 and "HOST:PORT" in bad.output


def test_cli_sets_streamlits_upload_cap_to_the_one_limit() -> None:
    from frontend.cli import streamlit_command, upload_limit_mb
    from tests.helpers import free_port

    joined = " ".join(streamlit_command("127.0.0.1", 9999, max_upload_mb=32))
    assert "--server.maxUploadSize 32" in joined
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    # the server cannot be asked: its default limit (10 MiB), or the UI's lower cap
    assert upload_limit_mb(UISettings(server=down, timeout=1.0), probe_timeout=0.5) == 10
    capped = UISettings(server=down, timeout=1.0, max_upload_bytes=3 * 2**20)
    assert upload_limit_mb(capped, probe_timeout=0.5) == 3


# ------------------------------------------------------------------------------ no model in the UI
def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_frontend_never_imports_the_model() -> None:
    for path in (REPO / "frontend").glob("*.py"):
        bad = {n for n in _imports(path) if n.split(".")[0] in ("torch", "transformers")}
        bad |= {
            n for n in _imports(path) if n.startswith(("retrieval.encoder", "retrieval.modeling"))
        }
        assert not bad, f"{path.name} imports {bad}"


def test_app_run_loads_no_torch() -> None:
    """Run the whole script (server down) in a fresh interpreter: torch must stay unloaded."""
    code = textwrap.dedent(
        f"""
        import os, sys
        os.environ["CIR_UI_SERVER"] = "127.0.0.1:9"
        os.environ["CIR_UI_TIMEOUT"] = "2"
        from streamlit.testing.v1 import AppTest
        at = AppTest.from_file({str(APP)!r}, default_timeout=30).run()
        assert not at.exception, at.exception
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")
                       or m.startswith("retrieval.encoder"))
        print("HEAVY", heavy)
        assert not heavy, heavy
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------------------ AppTest, fake client
class FakeClient:
    """Stands in for server.client.CIRClient; ``fail`` maps a method name to an exception."""

    fail: dict[str, Exception] = {}
    calls: list[tuple[str, dict[str, Any]]] = []

    def __init__(self, target: str, **kwargs: Any) -> None:
        self.target = target

    def _maybe_fail(self, name: str, **kwargs: Any) -> None:
        FakeClient.calls.append((name, kwargs))
        if name in FakeClient.fail:
            raise FakeClient.fail[name]

    def info(self) -> ServerInfo:
        self._maybe_fail("info")
        return ServerInfo(
            model=ModelInfo("fake", "fp", 8, 4, 64, 32, "cpu", "float32"),
            index=IndexInfo(
                name="g",
                backend="local",
                version="v1",
                count=3,
                filterable_fields={"shape": "keyword", "size": "integer"},
                encoder_fingerprint="fp",
            ),
            limits=Limits(
                max_top_k=50,
                max_offset=0,  # unset: the UI's default
                max_text_chars=100,
                max_image_bytes=2**20,
                max_image_pixels=0,
                max_batch_queries=0,
                max_message_bytes=0,
                max_page_size=0,
            ),
            server_version="0",
            max_batch=1,
            max_wait_ms=1.0,
        )

    def search(self, text: str, **kw: Any) -> SearchResult:
        self._maybe_fail("search", text=text, **kw)
        off = kw.get("offset", 0)
        return SearchResult(
            results=[
                Hit(
                    id=f"img-{off + i}",
                    user_id=f"u{off + i}",
                    score=0.9 - 0.1 * i,
                    rank=off + i + 1,
                    payload={"shape": "disc", "user_id": f"u{off + i}"},
                )
                for i in range(min(kw.get("top_k", 10), 3))
            ],
            index_version="v1",
            encoder_fingerprint="fp",
            timings={"total_ms": 5.0},
        )

    def get_image(self, id: str, kind: str = "thumbnail") -> tuple[bytes, str]:
        self._maybe_fail("get_image", id=id)
        return png_bytes(), "image/png"

    def list_images(
        self, page_size: int = 50, offset: int = 0, random_seed: int | None = None
    ) -> ImagePage:
        self._maybe_fail("list_images", page_size=page_size)
        shapes = ["disc", "square", "bar"]
        items = [
            ImageItem(id=f"img-{i}", payload={"shape": shapes[i], "user_id": f"u{i}"})
            for i in range(3)
        ]
        return ImagePage(items, None, 3)


@pytest.fixture
def fake_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    import server.client

    monkeypatch.setattr(server.client, "CIRClient", FakeClient)
    monkeypatch.setenv("CIR_UI_SERVER", "fake:1")
    monkeypatch.setenv("CIR_UI_TIMEOUT", "1.5")
    FakeClient.fail, FakeClient.calls = {}, []
    st.cache_resource.clear()
    st.cache_data.clear()
    yield AppTest.from_file(str(APP), default_timeout=30)
    st.cache_resource.clear()
    st.cache_data.clear()


def _errors(at: Any) -> str:
    return " | ".join(e.value for e in at.error)


def test_fake_search_shows_grid_and_history(fake_app: Any) -> None:
    at = fake_app.run()
    assert not at.exception and not at.error
    at.text_input(key="mod_text").input("make it blue")
    # a keyword filter offers the values the gallery has
    assert at.multiselect(key="flt_shape").options == ["bar", "disc", "square"]
    at.multiselect(key="flt_shape").set_value(["disc", "square"])
    at.button(key="search").click().run()
    assert not at.exception and not at.error, _errors(at)
    assert [b.key for b in at.button if b.key.startswith("refine_")] == [
        "refine_1",
        "refine_2",
        "refine_3",
    ]
    kw = next(c[1] for c in reversed(FakeClient.calls) if c[0] == "search")
    assert kw["filter"] == {"shape": ["disc", "square"]} and kw["reference_id"] is None
    assert len(at.session_state["history"]) == 1


def test_fake_empty_text_is_refused_politely(fake_app: Any) -> None:
    at = fake_app.run()
    at.button(key="search").click().run()
    assert not at.exception
    assert "modification text" in _errors(at)


@pytest.mark.parametrize(
    ("exc", "needle"),
    [
        (
            cerr.DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"),
            "did not answer within 1.5 s",
        ),
        (
            cerr.UnauthenticatedError(grpc.StatusCode.UNAUTHENTICATED, "bad key"),
            "rejected the API key",
        ),
        (
            cerr.InvalidArgumentError(
                grpc.StatusCode.INVALID_ARGUMENT, "reference_image: not an image"
            ),
            "reference_image: not an image",
        ),
        (cerr.ResourceExhaustedError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"), "busy"),
        (RuntimeError("kaboom"), "kaboom"),
    ],
)
def test_fake_search_failures_are_messages(fake_app: Any, exc: Exception, needle: str) -> None:
    at = fake_app.run()
    FakeClient.fail = {"search": exc}
    at.text_input(key="mod_text").input("anything")
    at.button(key="search").click().run()
    assert not at.exception
    assert needle in _errors(at)


def test_fake_wrong_api_key_at_startup(fake_app: Any) -> None:
    FakeClient.fail = {"info": cerr.UnauthenticatedError(grpc.StatusCode.UNAUTHENTICATED, "no key")}
    at = fake_app.run()
    assert not at.exception
    assert "rejected the API key" in _errors(at)


def uploader(at: Any) -> Any:
    return at.file_uploader(key=f"upload_{at.session_state['upload_gen']}")


def test_fake_bad_upload_is_refused(fake_app: Any) -> None:
    at = fake_app.run()
    uploader(at).set_value(("broken.png", b"\x89PNG garbage", "image/png"))
    at.run()
    assert not at.exception
    assert "`broken.png` was refused" in _errors(at) and at.session_state["ref"] is None
    assert "not a JPEG, PNG" in _errors(at) and "BytesIO" not in _errors(at)
    uploader(at).set_value(("big.png", png_bytes(size=600) + b"\0" * 2**20, "image/png"))
    at.run()
    # the one limit: the server's Info (the fake says 1 MiB), also in the uploader's label
    assert "the server accepts at most 1 MB" in _errors(at)
    assert "at most 1 MB" in uploader(at).label


def test_fake_failed_upload_then_search_says_no_usable_reference(fake_app: Any) -> None:
    at = fake_app.run()
    uploader(at).set_value(("notes.png", b"just some text", "image/png"))
    at.run()
    at.text_input(key="mod_text").input("make it blue")
    at.button(key="search").click().run()
    assert not at.exception
    assert "There is no usable reference: `notes.png` was refused" in _errors(at)
    assert not [c for c in FakeClient.calls if c[0] == "search"]  # nothing ran text-only
    assert at.session_state["results"] == []
    assert any("No usable reference" in w.value for w in at.warning)
    # removing the file from the box makes a text-only search possible again
    uploader(at).set_value(None)
    at.run()
    at.button(key="search").click().run()
    assert not at.error, _errors(at)
    assert [c for c in FakeClient.calls if c[0] == "search"]


def test_fake_clear_and_use_as_reference_reset_the_uploader(fake_app: Any) -> None:
    at = fake_app.run()
    uploader(at).set_value(("red.png", png_bytes(), "image/png"))
    at.run()
    assert at.session_state["ref"].kind == "upload" and uploader(at).value is not None
    gen = at.session_state["upload_gen"]
    at.button(key="clear_ref").click().run()
    assert at.session_state["ref"] is None and at.session_state["upload_gen"] == gen + 1
    assert uploader(at).value is None  # a fresh, empty uploader
    uploader(at).set_value(("red.png", png_bytes(), "image/png"))
    at.run()
    at.text_input(key="mod_text").input("make it blue")
    at.button(key="search").click().run()
    n_search = len([c for c in FakeClient.calls if c[0] == "search"])
    # Use as reference: the result is the reference, the uploader is empty, nothing searched
    at.button(key="refine_2").click().run()
    assert not at.exception and not at.error, _errors(at)
    ref = at.session_state["ref"]
    assert ref.kind == "gallery" and ref.gallery_id == "img-1" and uploader(at).value is None
    assert len([c for c in FakeClient.calls if c[0] == "search"]) == n_search
    assert any("Type the next change" in i.value for i in at.info)
    at.text_input(key="mod_text").input("now smaller")
    at.button(key="search").click().run()
    kw = next(c[1] for c in reversed(FakeClient.calls) if c[0] == "search")
    assert kw["text"] == "now smaller" and kw["reference_id"] == "img-1"


def test_fake_filter_error_clears_results_and_caption_is_words(fake_app: Any) -> None:
    at = fake_app.run()
    at.text_input(key="mod_text").input("any")
    at.number_input(key="flt_size_min").set_value(3)
    at.button(key="search").click().run()
    assert at.session_state["results"]
    assert any("filter: size ≥ 3" in c.value for c in at.caption), [c.value for c in at.caption]
    assert not any("{" in c.value for c in at.caption)
    at.number_input(key="flt_size_max").set_value(1)
    at.button(key="search").click().run()
    assert "minimum 3 is above the maximum 1" in _errors(at)
    assert at.session_state["results"] == [] and not [b for b in at.button if b.key == "more"]


def test_fake_long_text_flagged_at_the_box_and_heading_shortened(fake_app: Any) -> None:
    at = fake_app.run()
    long = "make it " + "much " * 40 + "redder"  # the fake server's limit is 100 characters
    at.text_input(key="mod_text").input(long)
    at.run()
    assert at.text_input(key="mod_text").value == long  # not cut without a word
    assert any(f"{len(long.strip())} characters; the server reads at most 100" in w.value
               for w in at.warning)  # fmt: skip
    at.button(key="search").click().run()
    assert "at most 100" in _errors(at)
    at.text_input(key="mod_text").input(long[:95])
    at.button(key="search").click().run()
    assert not at.error, _errors(at)
    heading = next(h.value for h in at.subheader if h.value.startswith("Results for"))
    assert heading.endswith("…”") and len(heading) < 100


def test_fake_results_show_user_ids_and_mark_the_reference(fake_app: Any) -> None:
    at = fake_app.run()
    at.button(key="pick_img-0").click().run()
    pick = at.button(key="pick_img-0")
    assert pick.disabled and pick.label == "Picked"  # the picked gallery image stands out
    assert any(c.value == "**✓ u0**" for c in at.caption)
    at.text_input(key="mod_text").input("make it blue")
    at.button(key="search").click().run()
    assert not at.error, _errors(at)
    captions = [c.value for c in at.caption]
    assert {"u0", "u1", "u2"} <= set(captions)  # user ids, not point ids
    marked = [m.value for m in at.markdown if "the reference" in m.value]
    assert len(marked) == 1 and marked[0].startswith("**#1**")


def test_fake_gateway_raises_only_ui_errors() -> None:
    FakeClient.fail = {"get_image": KeyError("weird")}
    gw = Gateway(UISettings(server="x:1"), client=FakeClient("x:1"))
    with pytest.raises(UIError) as info:
        gw.get_image("a")
    assert info.value.kind == "other"
    FakeClient.fail = {}
    assert gw.list_images(3).total == 3 and gw.info().fields["size"] == "integer"


def test_fake_revisit_restores_text_and_filters(fake_app: Any) -> None:
    at = fake_app.run()
    at.text_input(key="mod_text").input("one")
    at.number_input(key="flt_size_min").set_value(3)
    at.button(key="search").click().run()
    at.text_input(key="mod_text").input("two")
    at.number_input(key="flt_size_min").set_value(None)
    at.button(key="search").click().run()
    assert at.session_state["query"].filter == {}
    at.button(key="revisit_0").click().run()
    assert not at.exception and not at.error and not at.warning, _errors(at)
    assert at.text_input(key="mod_text").value == "one"
    assert at.number_input(key="flt_size_min").value == 3
    assert at.session_state["query"].filter == {"size": {"gte": 3}}
    assert len(at.session_state["history"]) == 2 and at.session_state["history_pos"] == 0
    assert at.button(key="more").disabled  # the fake's page came back short


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
