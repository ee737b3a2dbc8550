"""The gRPC server in-process on 127.0.0.1 with the tiny model and a small Edge index."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from server.app import BackgroundServer, CIRServer, StartupError
from server.client import (
    CIRClient,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    ServerUnavailableError,
    UnauthenticatedError,
)
from server.config import ServerSettings, load_settings
from tests.helpers import (
    add_version,
    build_gallery,
    free_port,
    png_header_only,
    render_images,
    self_signed_cert,
)

torch = pytest.importorskip("torch")

N = 24


@pytest.fixture(scope="module")
def encoder() -> Any:
    from retrieval.encoder import Encoder

    torch.set_num_threads(1)
    return Encoder.from_pretrained("tiny")


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory, encoder: Any) -> tuple[str, list[str]]:
    return build_gallery(tmp_path_factory.mktemp("gallery"), encoder, N, missing_original=5)


def settings(uri: str, **kw: Any) -> ServerSettings:
    base: dict[str, Any] = dict(
        index=uri, port=0, metrics_port=0, refresh_interval_s=0, grace_s=2.0, log_format="text"
    )
    base.update(kw)
    return load_settings(None, **base)


@pytest.fixture(scope="module")
def srv(gallery: tuple[str, list[str]], encoder: Any) -> Any:
    bg = BackgroundServer(settings(gallery[0], metrics_port=free_port()), encoder=encoder)
    bg.start()
    yield bg
    bg.stop()


@pytest.fixture(scope="module")
def shared(srv: BackgroundServer) -> dict[str, Any]:
    """Extra servers reuse the module server's open index (an Edge shard has one opener)."""
    return {"index": srv.server.service.engine.index}


@pytest.fixture(scope="module")
def client(srv: BackgroundServer) -> Any:
    with CIRClient(srv.target, timeout=20) as c:
        yield c


def png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- happy paths
def test_health_and_reflection(srv: BackgroundServer, client: CIRClient) -> None:
    assert client.health() == "SERVING"
    assert client.health("cir.v1.SearchService") == "SERVING"
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(srv.target) as ch:
        services = ProtoReflectionDescriptorDatabase(ch).get_services()
    assert "cir.v1.SearchService" in services and "grpc.health.v1.Health" in services


def test_search_by_reference_id(client: CIRClient, gallery: tuple[str, list[str]]) -> None:
    ids = gallery[1]
    res = client.search("make it brighter", reference_id=ids[3], top_k=5)
    assert len(res.results) == 5
    assert [h.rank for h in res.results] == [1, 2, 3, 4, 5]
    scores = [h.score for h in res.results]
    assert scores == sorted(scores, reverse=True)
    assert res.index_version.startswith("v")
    assert res.encoder_fingerprint.startswith("tiny-")
    assert {"queue_ms", "encode_ms", "search_ms", "total_ms"} <= set(res.timings)
    assert res.request_id
    hit = res.results[0]
    assert hit.id in ids and "thumbnail" not in hit.payload and hit.payload["category"]
    again = client.search("make it brighter", reference_id=ids[3], top_k=5)
    assert again.timings["reference_cached"] == 1.0  # second time from the feature cache
    assert [h.id for h in again.results] == [h.id for h in res.results]


def test_search_by_image_matches_local_encoder(client: CIRClient, encoder: Any) -> None:
    img = render_images(3, seed=7)[2]
    res = client.search("a red one", reference_image=png_bytes(img), top_k=3, mode="exact")
    assert len(res.results) == 3
    vec = client.encode_query("a red one", reference_image=png_bytes(img))
    local = encoder.encode_queries([img], ["a red one"])[0]
    assert vec.shape == (encoder.dim,)
    np.testing.assert_allclose(vec, local, atol=1e-4)


def test_search_text_only_filter_paging_and_payload(client: CIRClient) -> None:
    res = client.search("shoes", top_k=4, filter={"category": "shoe"})
    assert res.results and all(h.payload["category"] == "shoe" for h in res.results)
    res = client.search("x", top_k=5, filter='{"size": {"gte": 10, "lt": 14}}')
    assert sorted(h.payload["size"] for h in res.results) == [10, 11, 12, 13]
    page1 = client.search("x", reference_id="img-001", top_k=4)
    page2 = client.search("x", reference_id="img-001", top_k=4, offset=4)
    assert [h.rank for h in page2.results] == [5, 6, 7, 8]
    assert not {h.id for h in page1.results} & {h.id for h in page2.results}
    bare = client.search("x", reference_id="img-001", top_k=2, include_payload=False)
    assert all(h.payload == {} for h in bare.results)


def test_search_batch(client: CIRClient) -> None:
    out = client.search_batch(
        [
            {"text": "a", "reference_id": "img-001", "top_k": 3},
            {"text": "b", "top_k": 2, "filter": {"category": "bag"}},
            {"text": "c", "reference_id": "img-002", "top_k": 3},
        ]
    )
    assert [len(r.results) for r in out] == [3, 2, 3]
    assert all(h.payload["category"] == "bag" for h in out[1].results)
    single = client.search("a", reference_id="img-001", top_k=3)
    assert [h.id for h in out[0].results] == [h.id for h in single.results]


def test_get_image(client: CIRClient) -> None:
    from PIL import Image

    data, mime = client.get_image("img-002")
    assert mime == "image/jpeg" and Image.open(io.BytesIO(data)).size[0] <= 32
    data, mime = client.get_image("img-002", kind="original")
    assert mime == "image/png" and Image.open(io.BytesIO(data)).size == (64, 48)
    with pytest.raises(NotFoundError, match="missing"):
        client.get_image("img-005", kind="original")  # its file was deleted
    with pytest.raises(NotFoundError, match="not in index"):
        client.get_image("../../etc/passwd", kind="original")


def test_points_without_a_user_id_keep_working(client: CIRClient) -> None:
    """This gallery was written through the index API with readable caller ids and no user
    ids (as before issue 17): those ids still resolve, and hits say they have no user id."""
    res = client.search("make it brighter", reference_id="img-004", top_k=3)
    assert len(res.results) == 3 and all(h.user_id == "" for h in res.results)
    assert client.get_image("img-004")[1] == "image/jpeg"
    with pytest.raises(NotFoundError, match="neither a point id nor a user id"):
        client.search("x", reference_id="00000000-0000-0000-0000-000000000000")


def test_list_images(client: CIRClient, gallery: tuple[str, list[str]]) -> None:
    seen: list[str] = []
    offset: int | None = 0
    while offset is not None:
        page = client.list_images(page_size=10, offset=offset)
        assert page.total == N
        seen += [it.id for it in page.items]
        offset = page.next_offset
    assert sorted(seen) == sorted(gallery[1])
    assert all("thumbnail" not in it.payload for it in page.items)
    a = client.list_images(page_size=5, random_seed=11)
    b = client.list_images(page_size=5, random_seed=11)
    assert [i.id for i in a.items] == [i.id for i in b.items] and a.next_offset is None


def test_info(client: CIRClient, encoder: Any) -> None:
    info = client.info()
    assert info.model.fingerprint == encoder.fingerprint and info.model.dim == encoder.dim
    assert info.index.count == N and info.index.version.startswith("v")
    assert info.index.filterable_fields == {"category": "keyword", "size": "integer"}
    assert info.limits.max_top_k == 1000 and info.limits.max_text_chars == 1000


def test_metrics_and_json_logs(srv: BackgroundServer, client: CIRClient) -> None:
    client.search("x", reference_id="img-001", top_k=1)
    url = f"http://127.0.0.1:{srv.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'cir_requests_total{code="OK",method="Search"}' in text
    for name in ("cir_stage_seconds_bucket", "cir_batch_size_bucket", "cir_queue_depth"):
        assert name in text
    from server.logs import JsonFormatter

    rec = logging.LogRecord("server.access", logging.INFO, "", 0, "Search OK", (), None)
    rec.request_id = "abc"
    assert json.loads(JsonFormatter().format(rec))["request_id"] == "abc"


# ----------------------------------------------------------------------------- bad requests
@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"text": ""}, InvalidArgumentError, "text is empty"),
        ({"text": "   \n"}, InvalidArgumentError, "text is empty"),
        ({"text": "x" * 1001}, InvalidArgumentError, "limit is 1000"),
        ({"text": "x", "reference_image": b"not an image"}, InvalidArgumentError, "not-an-image"),
        ({"text": "x", "reference_image": b"\x89PNG\r\n\x1a\n12"}, InvalidArgumentError, "cannot"),
        (
            {"text": "x", "reference_image": png_header_only(7000, 6000)},
            InvalidArgumentError,
            "too-many-pixels",
        ),
        (
            {"text": "x", "reference_image": png_header_only(20000, 20000)},
            InvalidArgumentError,
            "bomb",
        ),
        ({"text": "x", "reference_id": "nope"}, NotFoundError, "'nope' is not in index"),
        ({"text": "x", "top_k": 1001}, InvalidArgumentError, "top_k must be in"),
        ({"text": "x", "offset": 9001}, InvalidArgumentError, "offset must be in"),
        ({"text": "x", "filter": "{bad json"}, InvalidArgumentError, "not valid JSON"),
        ({"text": "x", "filter": "[1, 2]"}, InvalidArgumentError, "JSON object"),
        ({"text": "x", "filter": {"colour": "red"}}, InvalidArgumentError, "colour"),
        ({"text": "x", "filter": {"size": {"near": 3}}}, InvalidArgumentError, "near"),
        ({"text": "x", "filter": {"category": 3}}, InvalidArgumentError, "bad value"),
    ],
)
def test_bad_requests(client: CIRClient, kwargs: dict[str, Any], exc: type, match: str) -> None:
    with pytest.raises(exc, match=match) as info:
        client.search(**kwargs)
    assert info.value.details  # a message for humans


def test_bad_requests_other_rpcs(srv: BackgroundServer, client: CIRClient) -> None:
    with pytest.raises(InvalidArgumentError, match="image is 10485761 bytes"):
        client.search("x", reference_image=b"\xff" * (10 * 1024 * 1024 + 1))
    with pytest.raises(InvalidArgumentError, match=r"queries\[1\]: text is empty"):
        client.search_batch([{"text": "ok"}, {"text": ""}])
    with pytest.raises(InvalidArgumentError, match="page_size"):
        client.list_images(page_size=100_000)
    with pytest.raises(NotFoundError):
        client.get_image("nope")
    with pytest.raises(NotFoundError):
        client.encode_query("x", reference_id="nope")
    from server._generated.cir.v1 import search_pb2 as pb
    from server._generated.cir.v1 import search_pb2_grpc as pb_grpc

    with grpc.insecure_channel(srv.target) as ch:
        req = pb.SearchRequest(text="x")
        req.mode = 99  # type: ignore[assignment]
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.SearchServiceStub(ch).Search(req, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_index_unavailable_maps_to_unavailable(srv: BackgroundServer, client: CIRClient) -> None:
    from retrieval.index import IndexUnavailableError

    engine = srv.server.service.engine
    original = engine.index

    class Down:
        def __getattr__(self, name: str) -> Any:
            return getattr(original, name)

        def search(self, *a: Any, **k: Any) -> Any:
            raise IndexUnavailableError("qdrant at 10.0.0.1:6334 refused the connection")

        search_batch = search

    engine.index = Down()
    try:
        with pytest.raises(ServerUnavailableError, match="index unavailable"):
            CIRClient(srv.target, retries=0).search("x", top_k=1)
    finally:
        engine.index = original
    assert client.search("x", top_k=1).results


def _table_examples() -> dict[type, BaseException]:
    """One instance of every type in the server's error table (server/errors.py)."""
    from retrieval.index import errors as ie
    from server import batching

    return {
        ie.InvalidFilterError: ie.InvalidFilterError("field 'colour' is not filterable"),
        ie.InvalidQueryError: ie.InvalidQueryError("vector has 7 dims, expected 256"),
        ie.IndexNotFoundError: ie.IndexNotFoundError("index 'gallery' has no active version"),
        ie.IndexInUseError: ie.IndexInUseError("shard in use by process 4242", pid=4242),
        ie.ModelMismatchError: ie.ModelMismatchError("built by enc-A, served with enc-B"),
        ie.IndexUnavailableError: ie.IndexUnavailableError("qdrant at 10.0.0.1 refused"),
        ie.GalleryIndexError: ie.GalleryIndexError("segment 3 is corrupt"),
        batching.QueueFullError: batching.QueueFullError(64, 64, 120),
        batching.BatcherClosedError: batching.BatcherClosedError("the batcher is stopping"),
        batching.DeadlineUnmeetableError: batching.DeadlineUnmeetableError("2 ms left"),
    }


#: The documented table (docs/api.md, "Errors"): exception type name -> code, client class,
#: what the client's message starts with.
DOCUMENTED = {
    "InvalidFilterError": ("INVALID_ARGUMENT", "InvalidArgumentError", ""),
    "InvalidQueryError": ("INVALID_ARGUMENT", "InvalidArgumentError", ""),
    "IndexNotFoundError": ("NOT_FOUND", "NotFoundError", "index not found: "),
    "IndexInUseError": ("FAILED_PRECONDITION", "FailedPreconditionError", "index in use: "),
    "ModelMismatchError": (
        "FAILED_PRECONDITION",
        "FailedPreconditionError",
        "index and model differ: ",
    ),
    "IndexUnavailableError": ("UNAVAILABLE", "ServerUnavailableError", "index unavailable: "),
    "GalleryIndexError": ("INTERNAL", "CIRError", "index error: "),
    "QueueFullError": ("RESOURCE_EXHAUSTED", "ResourceExhaustedError", ""),
    "BatcherClosedError": ("UNAVAILABLE", "ServerUnavailableError", ""),
    "DeadlineUnmeetableError": ("DEADLINE_EXCEEDED", "DeadlineExceededError", ""),
}


def test_error_table_is_the_documented_one() -> None:
    from server.errors import TABLE

    assert set(_table_examples()) == set(TABLE)
    assert {t.__name__ for t in TABLE} == set(DOCUMENTED)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    for name, (code, _, _) in DOCUMENTED.items():
        assert f"| `{name}` | {code} |" in doc, name


def _expect_call_fails(call: Any, exc: BaseException) -> None:
    import server.client as sc

    code, klass, prefix = DOCUMENTED[type(exc).__name__]
    with pytest.raises(sc.CIRError) as info:
        call()
    err = info.value
    assert err.code == grpc.StatusCode[code], (type(exc).__name__, err)
    assert type(err) is getattr(sc, klass)
    assert err.details == f"{prefix}{exc}"
    if code == "RESOURCE_EXHAUSTED":
        assert err.retry_after_ms == 120.0  # the queue's hint reaches the client


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_error_table_row_reaches_the_client(
    name: str, srv: BackgroundServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each exception raised inside the engine reaches a gRPC client as its documented code and
    message: through the RPC wrapper (GetImage) and, for the index's own errors, through a
    search's per-query results."""
    from retrieval.index import GalleryIndexError

    exc = next(e for t, e in _table_examples().items() if t.__name__ == name)
    engine = srv.server.service.engine

    def raise_it(*a: Any, **k: Any) -> Any:
        raise exc

    with CIRClient(srv.target, retries=0) as c:
        monkeypatch.setattr(engine, "get_image", raise_it)
        _expect_call_fails(lambda: c.get_image("img-000"), exc)
        monkeypatch.undo()
        if isinstance(exc, GalleryIndexError):
            original = engine.index

            class Broken:
                def __getattr__(self, attr: str) -> Any:
                    return getattr(original, attr)

                search = search_batch = staticmethod(raise_it)

            engine.index = Broken()
            try:
                _expect_call_fails(lambda: c.search("x", top_k=1), exc)
            finally:
                engine.index = original
        assert c.search("x", top_k=1).results  # the server is fine afterwards


def test_an_unlisted_exception_is_internal_and_not_sent(
    srv: BackgroundServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = srv.server.service.engine

    def boom(*a: Any, **k: Any) -> Any:
        raise KeyError("secret path /srv/keys")

    monkeypatch.setattr(engine, "get_image", boom)
    with CIRClient(srv.target, retries=0) as c, pytest.raises(Exception) as info:
        c.get_image("img-000")
    err = info.value
    assert getattr(err, "code", None) == grpc.StatusCode.INTERNAL
    assert "internal error (request id" in str(err) and "secret" not in str(err)


# ----------------------------------------------------------------------------- auth and TLS
def test_api_key_auth(gallery: tuple[str, list[str]], encoder: Any, shared: Any) -> None:
    with BackgroundServer(
        settings(gallery[0], api_keys=["k1", "secret"]), encoder=encoder, **shared
    ) as bg:
        with CIRClient(bg.target, retries=0) as anon:
            assert anon.health() == "SERVING"  # health stays open
            with pytest.raises(UnauthenticatedError, match="API key"):
                anon.search("x", top_k=1)
        with (
            CIRClient(bg.target, api_key="wrong", retries=0) as bad,
            pytest.raises(UnauthenticatedError),
        ):
            bad.info()
        with CIRClient(bg.target, api_key="secret") as good:
            assert good.search("x", top_k=2).results
        with grpc.insecure_channel(bg.target) as ch:
            from server._generated.cir.v1 import search_pb2 as pb
            from server._generated.cir.v1 import search_pb2_grpc as pb_grpc

            resp = pb_grpc.SearchServiceStub(ch).Info(
                pb.InfoRequest(), metadata=(("authorization", "Bearer k1"),), timeout=10
            )
            assert resp.index.count == N


def test_tls(tmp_path: Path, gallery: tuple[str, list[str]], encoder: Any, shared: Any) -> None:
    cert, key = self_signed_cert(tmp_path)
    with BackgroundServer(
        settings(gallery[0], tls_cert=cert, tls_key=key), encoder=encoder, **shared
    ) as bg:
        with CIRClient(bg.target, tls_ca=cert) as c:
            assert c.search("x", top_k=1).results
        plain = CIRClient(bg.target, retries=0, timeout=3)
        with plain, pytest.raises((ServerUnavailableError, DeadlineExceededError)):
            plain.search("x", top_k=1)


def test_message_size_limit(gallery: tuple[str, list[str]], encoder: Any, shared: Any) -> None:
    s = settings(gallery[0], max_message_bytes=1024 * 1024)
    with BackgroundServer(s, encoder=encoder, **shared) as bg, CIRClient(bg.target, retries=0) as c:
        with pytest.raises(ResourceExhaustedError):
            c.search("x", reference_image=b"\0" * (2 * 1024 * 1024))
        assert c.search("x", top_k=1).results


# ----------------------------------------------------------------------------- load behaviour
@pytest.fixture()
def slow_srv(gallery: tuple[str, list[str]], encoder: Any, shared: Any) -> Any:
    """Batches wait 400 ms to fill, and only 4 queries may queue."""
    s = settings(gallery[0], max_batch=64, max_wait_ms=400, queue_size=4, adaptive_wait=False)
    with BackgroundServer(s, encoder=encoder, **shared) as bg:
        yield bg


def test_deadline_expiry_drops_work(slow_srv: BackgroundServer) -> None:
    with CIRClient(slow_srv.target, retries=0) as c:
        with pytest.raises(DeadlineExceededError):
            c.search("x", reference_id="img-001", timeout=0.1)
        time.sleep(0.6)  # the batch fires; the expired query is skipped, not encoded
        b = slow_srv.server.service.batcher
        assert b.dropped_expired + b.dropped_cancelled >= 1
        assert c.search("x", top_k=1, timeout=5).results


def test_overload_then_recovery(slow_srv: BackgroundServer) -> None:
    with CIRClient(slow_srv.target, retries=0, timeout=10) as c:

        def one(i: int) -> Any:
            try:
                return c.search(f"q{i}", top_k=1)
            except ResourceExhaustedError as exc:
                return exc

        with ThreadPoolExecutor(12) as pool:
            out = list(pool.map(one, range(12)))
        rejected = [o for o in out if isinstance(o, ResourceExhaustedError)]
        assert rejected and len(rejected) < 12
        assert all(r.retry_after_ms and r.retry_after_ms > 0 for r in rejected)
        assert "retry after" in rejected[0].details
        assert c.search("again", top_k=1).results  # recovered
    with CIRClient(slow_srv.target, retries=8, timeout=20) as patient:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda i: patient.search(f"q{i}", top_k=1), range(12)))
        assert all(r.results for r in results)  # retry-after honoured, all eventually served


def test_batching_groups_concurrent_queries(
    gallery: tuple[str, list[str]], encoder: Any, shared: Any
) -> None:
    s = settings(gallery[0], max_batch=8, max_wait_ms=150)
    with BackgroundServer(s, encoder=encoder, **shared) as bg, CIRClient(bg.target) as c:
        with ThreadPoolExecutor(8) as pool:
            out = list(pool.map(lambda i: c.search(f"q{i}", reference_id="img-002"), range(8)))
        assert max(r.timings["batch_size"] for r in out) > 1


def test_batch_threads_follow_the_batch_size(
    gallery: tuple[str, list[str]], encoder: Any, shared: Any
) -> None:
    from server.engine import BATCH_THREADS_MIN, Engine, Query

    engine = Engine(settings(gallery[0], batch_threads=2), encoder, shared["index"])
    seen: list[tuple[int, int]] = []

    def run(n: int) -> None:
        vecs, _ = engine.encode([Query(text=f"q{i}", search=False) for i in range(n)])
        assert vecs.shape == (n, encoder.dim)
        seen.append((engine._threads_now, torch.get_num_threads()))

    try:
        with ThreadPoolExecutor(1) as pool:  # like the server's single inference thread
            for n in (1, BATCH_THREADS_MIN, 2):
                pool.submit(run, n).result()
        assert seen == [(1, 1), (2, 2), (1, 1)]
    finally:
        torch.set_num_threads(1)


def test_index_version_switch_under_load(tmp_path: Path, encoder: Any) -> None:
    uri, ids = build_gallery(tmp_path, encoder, 12)
    s = settings(uri, refresh_interval_s=0.1, max_wait_ms=1)
    errors: list[BaseException] = []
    versions: set[str] = set()
    stop = threading.Event()
    ref = png_bytes(render_images(1, seed=9)[0])
    with BackgroundServer(s, encoder=encoder) as bg, CIRClient(bg.target, retries=0) as c:
        v1 = c.info().index.version

        def hammer() -> None:
            while not stop.is_set():
                try:
                    res = c.search("x", top_k=3)
                    versions.add(res.index_version)
                    assert len(res.results) == 3
                    res = c.search("y", reference_image=ref, top_k=2)
                    versions.add(res.index_version)
                except BaseException as exc:  # noqa: BLE001 - every failure counts
                    errors.append(exc)

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        new_ids = [f"new-{i:02d}" for i in range(16)]
        v2 = add_version(uri, encoder, new_ids, render_images(16, seed=5))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and v2 not in versions:
            time.sleep(0.05)
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(10)
        assert errors == []
        assert {v1, v2} <= versions
        res = c.search("x", top_k=3)
        assert res.index_version == v2 and all(h.id.startswith("new-") for h in res.results)
        assert c.info().index.count == 16


# ----------------------------------------------------------------------------- lifecycle
class _GatedServer(CIRServer):
    gate = threading.Event()

    def _load(self) -> Any:
        assert self.gate.wait(30)
        return super()._load()


def test_health_transitions_and_graceful_stop(
    gallery: tuple[str, list[str]], encoder: Any, shared: Any
) -> None:
    loop = asyncio.new_event_loop()
    th = threading.Thread(target=loop.run_forever, daemon=True)
    th.start()
    port = free_port()
    s = settings(gallery[0], port=port, max_wait_ms=300, max_batch=64, adaptive_wait=False)

    async def make() -> CIRServer:
        return _GatedServer(s, encoder=encoder, **shared)

    server = asyncio.run_coroutine_threadsafe(make(), loop).result()
    started = asyncio.run_coroutine_threadsafe(server.start(), loop)
    try:
        with CIRClient(f"127.0.0.1:{port}", retries=0, timeout=5) as c:
            deadline = time.monotonic() + 20
            status = "?"
            while time.monotonic() < deadline:
                try:
                    status = c.health()
                    break
                except ServerUnavailableError:
                    time.sleep(0.05)
            assert status == "NOT_SERVING"  # listening, model/index not ready yet
            with pytest.raises(ServerUnavailableError, match="not ready"):
                c.search("x", top_k=1)
            _GatedServer.gate.set()
            started.result(30)
            assert c.health() == "SERVING"
            # requests in flight (waiting 300 ms for their batch) when stop begins
            with ThreadPoolExecutor(4) as pool:
                futs = [pool.submit(c.search, f"q{i}", None, None, 2) for i in range(4)]
                time.sleep(0.1)
                stopping = asyncio.run_coroutine_threadsafe(server.stop(grace=5), loop)
                results = [f.result(10) for f in futs]
            stopping.result(10)
            assert all(len(r.results) == 2 for r in results)
            assert asyncio.run_coroutine_threadsafe(_health_status(server), loop).result() == 2
    finally:
        _GatedServer.gate.clear()
        loop.call_soon_threadsafe(loop.stop)
        th.join(5)


async def _health_status(server: CIRServer) -> int:
    from grpc_health.v1 import health_pb2

    class Ctx:
        async def abort(self, *a: Any) -> None:
            raise AssertionError(a)

        def set_code(self, *a: Any) -> None:
            pass

    resp = await server.health.Check(health_pb2.HealthCheckRequest(service=""), Ctx())
    return int(resp.status)  # 2 == NOT_SERVING


def test_model_mismatch_refuses_to_start(gallery: tuple[str, list[str]], shared: Any) -> None:
    from retrieval.encoder import Encoder

    other = Encoder.from_pretrained("tiny", seed=1)
    with pytest.raises(StartupError, match="another encoder"):
        BackgroundServer(settings(gallery[0]), encoder=other, **shared).start()


# ----------------------------------------------------------------------------- config
def test_settings_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "server.toml"
    cfg.write_text('[server]\nport = 7000\nmax_batch = 4\nmax_wait_ms = 9.5\nname = "file"\n')
    monkeypatch.setenv("CIR_MAX_BATCH", "8")
    monkeypatch.setenv("CIR_API_KEYS", '["e1", "e2"]')
    s = load_settings(cfg, name="flag", port=None)
    assert (s.port, s.max_batch, s.max_wait_ms, s.name, s.keys) == (
        7000,
        8,
        9.5,
        "flag",
        ["e1", "e2"],
    )
    yml = tmp_path / "server.yaml"
    yml.write_text("port: 7100\nrefresh_interval_s: 0.5\n")
    assert load_settings(yml).port == 7100
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        load_settings(None, tls_cert=cfg)
    with pytest.raises(ValueError):
        load_settings(None, no_such_field=1)


# ----------------------------------------------------------------------------- search process
def test_search_process_owns_the_index_and_survives_its_death(tmp_path: Path, encoder: Any) -> None:
    """By default an Edge index is searched in a child process (its engine holds the GIL while
    it searches). A killed child costs no failed request: the next call starts a new one."""
    import os
    import signal

    import psutil

    from retrieval.index.process import ProcessIndex

    uri, ids = build_gallery(tmp_path, encoder, 8)
    bg = BackgroundServer(settings(uri), encoder=encoder).start()
    try:
        idx = bg.server.service.engine.index
        assert isinstance(idx, ProcessIndex) and idx.pid is not None
        first = idx.pid
        assert psutil.Process(first).ppid() == os.getpid()
        with CIRClient(bg.target, timeout=20, retries=0) as c:
            before = c.search("make it red", reference_id=ids[1], top_k=3)
            os.kill(first, signal.SIGKILL)
            psutil.Process(first).wait(10)
            after = c.search("make it red", reference_id=ids[1], top_k=3)
            assert [h.id for h in after.results] == [h.id for h in before.results]
            assert c.info().index.count == 8
        assert idx.restarts == 1 and idx.pid != first
        second = idx.pid
    finally:
        bg.stop()
    assert not psutil.pid_exists(second) or psutil.Process(second).status() == "zombie"
    # --no-search-process: the same index, searched in the server's own process
    bg = BackgroundServer(settings(uri, search_process=False), encoder=encoder).start()
    try:
        assert not isinstance(bg.server.service.engine.index, ProcessIndex)
        with CIRClient(bg.target, timeout=20, retries=0) as c:
            again = c.search("make it red", reference_id=ids[1], top_k=3)
        assert [h.id for h in again.results] == [h.id for h in before.results]
    finally:
        bg.stop()


def test_default_threads_leave_a_core_to_the_search_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os

    from server.app import default_threads, uses_search_process

    monkeypatch.delenv("CIR_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert uses_search_process(settings("edge:/x"))
    assert default_threads(settings("edge:/x")) == 7
    assert default_threads(settings("local:/x")) == 7
    assert default_threads(settings("edge:/x", num_threads=3)) == 3  # configured: kept
    assert default_threads(settings("edge:/x", search_process=False)) is None  # torch default
    assert not uses_search_process(settings("qdrant:http://127.0.0.1:6333"))
    assert default_threads(settings("qdrant:http://127.0.0.1:6333")) is None
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert default_threads(settings("edge:/x")) == 1
