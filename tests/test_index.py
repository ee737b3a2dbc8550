"""One suite for the gallery index, run against Edge and qdrant-client's local mode."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval.index import (
    GalleryIndexError,
    IndexInUseError,
    IndexNotFoundError,
    InvalidFilterError,
    InvalidQueryError,
    ModelMismatchError,
    VersionMeta,
    open_index,
    parse_uri,
)

Q, D, N = 4, 16, 300
FIELDS = {"category": "keyword", "price": "float", "stock": "integer", "sale": "bool"}
REPO = Path(__file__).resolve().parents[1]
# small galleries: make `fast` really prefetch (default L=2000 would cover everything)
OPTS = {"fast_min_candidates": 60, "fast_factor": 2}


def make_data(n: int = N, seed: int = 0, q: int = Q, d: int = D):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((8, d)).astype(np.float32)
    toks = centers[rng.integers(0, 8, n)][:, None, :] + rng.standard_normal((n, q, d)).astype(
        np.float32
    )
    toks /= np.linalg.norm(toks, axis=-1, keepdims=True)
    ids = [f"img-{i:05d}" for i in range(n)]
    cats = ["bag", "shoe", "dress"]
    payloads = [
        {
            "category": cats[i % 3],
            "price": float(i % 100),
            "stock": i % 7,
            "sale": i % 2 == 0,
            "title": f"item {i}",
        }
        for i in range(n)
    ]
    return ids, toks, payloads


def exact_scores(toks: np.ndarray, q: np.ndarray) -> np.ndarray:
    q = q / np.linalg.norm(q)
    return (toks @ q).max(axis=1)


def uri_for(backend: str, tmp_path: Path) -> str:
    return f"{backend}:{tmp_path / 'idx'}"


@pytest.fixture(params=["edge", "local"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def filled(backend, tmp_path):
    ids, toks, payloads = make_data()
    idx = open_index(
        uri_for(backend, tmp_path),
        "gallery",
        encoder_fingerprint="enc-A",
        preset="test",
        fields=FIELDS,
        options=OPTS,
    )
    idx.upsert(ids, toks, payloads)
    yield idx, ids, toks, payloads
    idx.close()


def test_parse_uri():
    assert parse_uri("edge:/x/y") == ("edge", "/x/y")
    assert parse_uri("local::memory:") == ("local", ":memory:")
    assert parse_uri("qdrant:http://h:6333") == ("qdrant", "http://h:6333")
    assert parse_uri("/plain/path") == ("edge", "/plain/path")
    with pytest.raises(GalleryIndexError, match="unknown index URI scheme"):
        parse_uri("redis:foo")


def test_local_memory_uri():
    ids, toks, payloads = make_data(50)
    idx = open_index("local::memory:", "g")
    idx.upsert(ids, toks, payloads)
    assert idx.count() == 50
    assert idx.search(toks[3, 1], top_k=1)[0].id == ids[3]
    idx.close()


@pytest.mark.parametrize("mode", ["exact", "fast", "auto"])
def test_search_matches_numpy(filled, mode):
    idx, ids, toks, _ = filled
    rng = np.random.default_rng(1)
    for qi in rng.integers(0, N, 5):
        q = toks[qi, 0] + 0.1 * rng.standard_normal(D).astype(np.float32)
        hits = idx.search(q, top_k=10, mode=mode)
        ref = exact_scores(toks, q)
        top = [ids[i] for i in np.argsort(-ref)[:10]]
        assert len(hits) == 10
        assert hits[0].id == top[0]
        got = {h.id for h in hits}
        assert len(got & set(top)) >= 9
        by_id = dict(zip(ids, ref, strict=True))
        for h in hits:  # scores are exact MaxSim (rescored), not int8 approximations
            assert abs(h.score - by_id[h.id]) < 1e-3
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_hit_shape_and_payload(filled):
    idx, ids, toks, payloads = filled
    h = idx.search(toks[5, 2], top_k=1)[0]
    assert h.id == ids[5] and isinstance(h.score, float)
    assert h.payload == payloads[5]  # internal keys (_id, ...) are not leaked


def test_search_batch_equals_single(filled):
    idx, _, toks, _ = filled
    qs = toks[[1, 50, 100], 0]
    batch = idx.search_batch(qs, top_k=7, filter={"category": "bag"})
    for q, hits in zip(qs, batch, strict=True):
        assert [h.id for h in hits] == [
            h.id for h in idx.search(q, top_k=7, filter={"category": "bag"})
        ]


def test_filters(filled):
    idx, ids, toks, payloads = filled

    def expect(flt, pred):
        want = {i for i, p in zip(ids, payloads, strict=True) if pred(p)}
        assert idx.count(flt) == len(want)
        hits = idx.search(toks[0, 0], top_k=1000, filter=flt, mode="exact")
        assert {h.id for h in hits} == want
        return want

    expect({"category": "bag"}, lambda p: p["category"] == "bag")
    expect({"price": {"gte": 10, "lt": 50}}, lambda p: 10 <= p["price"] < 50)
    expect({"category": ["bag", "dress"]}, lambda p: p["category"] in ("bag", "dress"))
    expect({"stock": [1, 2]}, lambda p: p["stock"] in (1, 2))
    expect({"stock": {"gt": 3}}, lambda p: p["stock"] > 3)
    expect({"sale": True}, lambda p: p["sale"])
    expect({"sale": False}, lambda p: not p["sale"])
    expect({"price": 42.0}, lambda p: p["price"] == 42.0)
    got = expect(
        {"category": "shoe", "price": {"lte": 30}, "sale": True, "stock": {"any": [0, 1, 2, 3]}},
        lambda p: p["category"] == "shoe" and p["price"] <= 30 and p["sale"] and p["stock"] <= 3,
    )
    assert got
    fast = idx.search(toks[0, 0], top_k=5, filter={"category": "dress"}, mode="fast")
    assert fast and all(h.payload["category"] == "dress" for h in fast)


@pytest.mark.parametrize(
    "flt,msg",
    [
        ({"title": "x"}, "not a declared filterable field"),
        ({"nope": 1}, "not a declared filterable field"),
        ({"price": {"between": [1, 2]}}, "unknown operators"),
        ({"category": {"gte": 1}}, "range filter on keyword"),
        ({"stock": "three"}, "bad value"),
        ({"category": []}, "empty any-of"),
        ("category=bag", "must be a dict"),
    ],
)
def test_bad_filters(filled, flt, msg):
    idx, _, toks, _ = filled
    with pytest.raises(InvalidFilterError, match=msg):
        idx.search(toks[0, 0], filter=flt)


def test_bad_queries(filled):
    idx, ids, toks, _ = filled
    with pytest.raises(InvalidQueryError, match="dimension"):
        idx.search(np.ones(D + 1, np.float32))
    with pytest.raises(InvalidQueryError, match=r"\[D\] vector"):
        idx.search(toks[0])
    with pytest.raises(InvalidQueryError, match="top_k"):
        idx.search(toks[0, 0], top_k=0)
    with pytest.raises(InvalidQueryError, match="top_k"):
        idx.search(toks[0, 0], top_k=1001)
    with pytest.raises(InvalidQueryError, match="offset"):
        idx.search(toks[0, 0], offset=-1)
    with pytest.raises(InvalidQueryError, match="mode"):
        idx.search(toks[0, 0], mode="turbo")  # type: ignore[arg-type]
    with pytest.raises(InvalidQueryError, match="NaN"):
        idx.search(np.full(D, np.nan, np.float32))
    with pytest.raises(InvalidQueryError, match="payloads"):
        idx.upsert(ids[:2], toks[:2], [{}])
    with pytest.raises(InvalidQueryError, match="tokens must be"):
        idx.upsert(ids[:2], toks[:3])
    with pytest.raises(ModelMismatchError, match="shape"):
        idx.upsert(ids[:2], np.ones((2, Q, D + 1), np.float32))
    with pytest.raises(InvalidQueryError, match="'_' prefix"):
        idx.upsert(ids[:1], toks[:1], [{"_id": "forged"}])
    assert idx.count() == N  # nothing was lost or written by the bad calls


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_pagination(filled, mode):
    idx, _, toks, _ = filled
    q = toks[10, 0]
    full = idx.search(q, top_k=30, mode=mode)
    pages = []
    for p in range(3):
        pages += idx.search(q, top_k=10, offset=10 * p, mode=mode)
    assert [h.id for h in pages] == [h.id for h in full]
    assert idx.search(q, top_k=10, offset=N + 5, mode=mode) == []
    assert len(idx.search(q, top_k=1000, mode="exact")) == N


def test_idempotent_upsert_and_get(filled):
    idx, ids, toks, payloads = filled
    idx.upsert(ids[:50], toks[:50], payloads[:50])
    assert idx.count() == N
    new = dict(payloads[3], title="changed")
    idx.upsert([ids[3]], toks[3:4], [new])
    assert idx.count() == N
    recs = idx.get([ids[3], "missing", ids[4]], with_vectors=True)
    assert [r.id for r in recs] == [ids[3], ids[4]]
    assert recs[0].payload["title"] == "changed"
    assert recs[0].tokens is not None and recs[0].tokens.shape == (Q, D)
    np.testing.assert_allclose(recs[0].tokens, toks[3], atol=1e-5)
    assert idx.get([ids[4]])[0].tokens is None
    # uuid ids are kept as they are, other strings map deterministically
    u = "0b0b7a5e-8d3b-4f63-9a4e-4ad3f7f1c0de"
    idx.upsert([u], toks[:1], [payloads[0]])
    assert idx.get([u])[0].id == u


def test_delete(filled):
    idx, ids, toks, _ = filled
    idx.delete(ids[:10] + ["never-existed"])
    assert idx.count() == N - 10
    assert idx.get(ids[:10]) == []
    assert ids[0] not in {h.id for h in idx.search(toks[0, 0], top_k=20)}


def test_versions_rollback_and_prune(backend, tmp_path):
    ids, toks, payloads = make_data(100)
    uri = uri_for(backend, tmp_path)
    idx = open_index(uri, "g", encoder_fingerprint="enc-A", fields=FIELDS, keep_versions=1)
    with pytest.raises(IndexNotFoundError):
        idx.search(toks[0, 0])
    idx.upsert(ids, toks, payloads)
    v1 = idx.active_version
    meta = VersionMeta("enc-A", "test", (Q, D), FIELDS, {"note": "rebuild"})
    built = []
    for n in (20, 30, 40):
        with idx.create_version(meta) as v:
            assert idx.count() == (100 if not built else built[-1][1])  # old one still serves
            v.upsert(ids[:n], toks[:n], payloads[:n])
            assert v.count() == n
        idx.activate(v.version)
        built.append((v.version, n))
        assert idx.count() == n and idx.active_version == v.version
    names = [x.version for x in idx.versions()]
    assert v1 not in names  # pruned: keep_versions=1 old one
    assert names == [built[1][0], built[2][0]]
    assert idx.meta is not None and idx.meta.extra == {"note": "rebuild"}
    assert idx.declared_fields() == FIELDS
    with pytest.raises(GalleryIndexError, match="active"):
        idx.drop_version(built[2][0])
    assert idx.rollback() == built[1][0]
    assert idx.count() == 30
    d = idx.describe()
    assert d["version"] == built[1][0] and d["count"] == 30 and d["shape"] == [Q, D]
    assert d["encoder_fingerprint"] == "enc-A" and d["backend"] == backend
    idx.drop_version(built[2][0])
    with pytest.raises(IndexNotFoundError):
        idx.rollback()
    idx.close()


def test_model_guard(backend, tmp_path):
    ids, toks, payloads = make_data(30)
    uri = uri_for(backend, tmp_path)
    with open_index(uri, "g", encoder_fingerprint="enc-A", preset="p1") as idx:
        idx.upsert(ids, toks, payloads)
    with pytest.raises(ModelMismatchError, match="enc-A.*enc-B|force=True"):
        open_index(uri, "g", encoder_fingerprint="enc-B")
    with open_index(uri, "g", encoder_fingerprint="enc-B", force=True) as idx:
        assert idx.count() == 30
    with open_index(uri, "g", encoder_fingerprint="enc-A", read_only=True) as idx:
        assert idx.meta is not None and idx.meta.preset == "p1"
        with pytest.raises(GalleryIndexError, match="read-only"):
            idx.upsert(ids[:1], toks[:1])


def test_read_only_missing(backend, tmp_path):
    with pytest.raises(IndexNotFoundError, match="no active version"):
        open_index(uri_for(backend, tmp_path), "nothing", read_only=True)


def test_refresh_guard(backend, tmp_path):
    """A server refuses to switch to a version built by another encoder and keeps serving."""
    if backend == "local":
        pytest.skip("local mode: one client per directory, so no second process/object")
    ids, toks, payloads = make_data(40)
    uri = uri_for(backend, tmp_path)
    with open_index(uri, "g", encoder_fingerprint="enc-A") as w:
        w.upsert(ids, toks, payloads)
    server = open_index(uri, "g", encoder_fingerprint="enc-A", read_only=True)
    w = open_index(uri, "g", force=True)
    with w.create_version(VersionMeta("enc-B", "", (Q, D))) as v:
        v.upsert(ids[:5], toks[:5])
    w.activate(v.version)
    with pytest.raises(ModelMismatchError):
        server.refresh()
    assert server.count() == 40
    w.close()
    server.close()


def _reader(idx, q, stop, errors, counts):
    while not stop.is_set():
        try:
            counts.append(len(idx.search(q, top_k=5)))
            idx.refresh()
        except Exception as exc:  # noqa: BLE001 - any failure is a test failure
            errors.append(repr(exc))


def test_version_switch_while_reading(backend, tmp_path):
    ids, toks, payloads = make_data(200)
    uri = uri_for(backend, tmp_path)
    writer = open_index(uri, "g", encoder_fingerprint="enc-A", fields=FIELDS)
    writer.upsert(ids, toks, payloads)
    if backend == "edge":
        # server-like reader in its own object (owns the active shard); writer builds new dirs
        writer.close()
        reader = open_index(uri, "g", encoder_fingerprint="enc-A", read_only=True)
        writer = open_index(uri, "g", encoder_fingerprint="enc-A")
    else:
        reader = writer  # local mode: one client per directory
    stop, errors, counts = threading.Event(), [], []
    t = threading.Thread(target=_reader, args=(reader, toks[0, 0], stop, errors, counts))
    t.start()
    try:
        versions = []
        for n in (150, 100, 120):
            with writer.create_version(VersionMeta("enc-A", "", (Q, D), FIELDS)) as v:
                v.upsert(ids[:n], toks[:n], payloads[:n])
            writer.activate(v.version)
            versions.append(v.version)
            deadline = time.time() + 10
            while reader.active_version != v.version and time.time() < deadline:
                time.sleep(0.01)
            assert reader.active_version == v.version
            assert reader.count() == n
    finally:
        stop.set()
        t.join(10)
    assert not errors, errors[:3]
    assert len(counts) > 10 and all(c == 5 for c in counts)
    if backend == "edge":  # the old version is kept (limit 3) and released by the reader
        writer.drop_version(versions[0])
    reader.close()
    if writer is not reader:
        writer.close()


CHILD_WRITER = """
import sys, numpy as np
sys.path.insert(0, {repo!r})
from retrieval.index import open_index
uri, chunk = sys.argv[1], 50
idx = open_index(uri, "g", encoder_fingerprint="enc-A")
rng = np.random.default_rng(0)
i = 0
while True:
    toks = rng.standard_normal((chunk, {q}, {d})).astype(np.float32)
    idx.upsert([f"p{{j}}" for j in range(i, i + chunk)], toks, [{{"n": j}} for j in range(i, i + chunk)])
    i += chunk
    idx.flush()
    print("FLUSHED", i, flush=True)
"""

CHILD_HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from retrieval.index import open_index
idx = open_index(sys.argv[1], "g", read_only=True)
print("READY", idx.count(), flush=True)
time.sleep(60)
"""


def _spawn(code: str, uri: str) -> subprocess.Popen:
    src = textwrap.dedent(code).format(repo=str(REPO), q=Q, d=D)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-c", src, uri], stdout=subprocess.PIPE, text=True, env=env
    )


def test_crash_durability(backend, tmp_path):
    uri = uri_for(backend, tmp_path)
    child = _spawn(CHILD_WRITER, uri)
    flushed = 0
    try:
        assert child.stdout is not None
        deadline = time.time() + 60
        while flushed < 300 and time.time() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            if line.startswith("FLUSHED"):
                flushed = int(line.split()[1])
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert flushed >= 300, "child wrote too little"
    idx = open_index(uri, "g", encoder_fingerprint="enc-A")
    assert idx.count() >= flushed  # everything flushed before the kill is there
    got = idx.get([f"p{j}" for j in range(flushed)])
    assert len(got) == flushed and got[-1].payload == {"n": flushed - 1}
    assert idx.search(np.ones(D, np.float32), top_k=3)  # and it is searchable
    idx.close()


def test_second_opener_gets_pid(backend, tmp_path):
    ids, toks, payloads = make_data(30)
    uri = uri_for(backend, tmp_path)
    with open_index(uri, "g", fields=FIELDS) as idx:
        idx.upsert(ids, toks, payloads)
    child = _spawn(CHILD_HOLDER, uri)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().startswith("READY 30")
        t0 = time.time()
        with pytest.raises(IndexInUseError, match=f"in use by process {child.pid}") as ei:
            other = open_index(uri, "g")
            other.upsert(ids[:1], toks[:1])  # Edge: the shard is opened on first use
        assert ei.value.pid == child.pid
        assert time.time() - t0 < 5  # never a hang
        if backend == "edge":
            # a new version can still be built (and activated) while the holder serves
            other = open_index(uri, "g")
            with other.create_version(VersionMeta("x", "", (Q, D))) as v:
                v.upsert(ids, toks)
            other.activate(v.version)
            other.close()
    finally:
        child.kill()
        child.wait(10)
    # a dead owner never blocks: the kernel released its lock
    with open_index(uri, "g") as idx:
        assert idx.count() == 30
