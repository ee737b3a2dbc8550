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
            # reopening the served version (to write or to read) names the holder too
            other = open_index(uri, "g")
            active = other.active_version
            assert active is not None
            for ro in (False, True):
                with pytest.raises(IndexInUseError, match=f"process {child.pid}") as ei:
                    other.open_version(active, read_only=ro)
                assert ei.value.pid == child.pid
            other.close()
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


# ------------------------------------------------------------------ reopen, scroll, metadata
def test_open_version_resume_and_read_only(backend, tmp_path):
    ids, toks, payloads = make_data(60)
    uri = uri_for(backend, tmp_path)
    idx = open_index(uri, "g", encoder_fingerprint="enc-A", fields=FIELDS)
    idx.upsert(ids[:10], toks[:10], payloads[:10])  # v1, active
    meta = VersionMeta("enc-A", "test", (Q, D), FIELDS, {"build_key": "k"})
    with idx.create_version(meta) as v:
        v.upsert(ids[:30], toks[:30], payloads[:30])  # a build killed half-way
    version = v.version
    if backend == "edge":  # another object (e.g. a resumed indexer run) picks it up
        idx.close()
        idx = open_index(uri, "g", encoder_fingerprint="enc-A")
    with idx.open_version(version) as h:  # resume: same handle type as create_version
        assert h.version == version and h.meta.extra == {"build_key": "k"}
        assert h.count() == 30 and not h.read_only
        h.upsert(ids[30:], toks[30:], payloads[30:])
        assert h.count() == 60
    assert idx.count() == 10  # the active version is untouched
    with idx.open_version(version, read_only=True) as h:  # verify before activate
        assert h.count() == 60 and h.read_only
        hit = h.search(toks[42, 1], top_k=1, mode="exact")[0]
        assert hit.id == ids[42] and hit.payload == payloads[42]
        with pytest.raises(GalleryIndexError, match="read-only"):
            h.upsert(ids[:1], toks[:1])
        with pytest.raises(GalleryIndexError, match="read-only"):
            h.delete(ids[:1])
    with pytest.raises(GalleryIndexError, match="closed"):
        h.count()
    idx.activate(version)
    assert idx.count() == 60
    # the active version this object already serves: the handle shares it
    with idx.open_version(version, read_only=True) as h:
        assert h.count() == 60
    assert idx.count() == 60  # still open after the handle closed
    with pytest.raises(IndexNotFoundError):
        idx.open_version("v000099")
    with pytest.raises(IndexNotFoundError):
        idx.open_version("nope")
    idx.close()
    ro = open_index(uri, "g", encoder_fingerprint="enc-A", read_only=True)
    with pytest.raises(GalleryIndexError, match="read-only"):
        ro.open_version(version)
    ro.close()


def test_open_version_model_guard(backend, tmp_path):
    ids, toks, _ = make_data(20)
    uri = uri_for(backend, tmp_path)
    with open_index(uri, "g", encoder_fingerprint="enc-A") as idx:
        idx.upsert(ids, toks)
        with idx.create_version(VersionMeta("enc-B", "", (Q, D))) as v:
            v.upsert(ids[:5], toks[:5])
        with pytest.raises(ModelMismatchError, match="enc-B"):
            idx.open_version(v.version)


def test_open_version_twice_in_one_process(tmp_path):
    ids, toks, _ = make_data(20)
    with open_index(uri_for("edge", tmp_path), "g") as idx:
        idx.upsert(ids, toks)
        with idx.create_version(VersionMeta("x", "", (Q, D))) as v:
            v.upsert(ids, toks)
        h = idx.open_version(v.version)
        with pytest.raises(IndexInUseError, match="this process") as ei:
            idx.open_version(v.version, read_only=True)
        assert ei.value.pid == os.getpid()
        h.close()
        with idx.open_version(v.version, read_only=True) as h2:
            assert h2.count() == 20


def test_scroll_and_sample(filled):
    idx, ids, toks, payloads = filled
    seen: list[str] = []
    offset = None
    pages = 0
    while True:
        recs, offset = idx.scroll(limit=70, offset=offset)
        seen += [r.id for r in recs]
        pages += 1
        if offset is None:
            break
    assert pages == 5 and len(seen) == N and set(seen) == set(ids)  # none twice, none lost
    by_id = dict(zip(ids, payloads, strict=True))
    recs, _ = idx.scroll(limit=5)
    assert all(r.payload == by_id[r.id] and r.tokens is None for r in recs)
    # skip a heavy key / keep only some keys / ids only
    recs, _ = idx.scroll(limit=5, with_payload={"exclude": ["title"]})
    assert all("title" not in r.payload and r.payload["category"] for r in recs)
    recs, _ = idx.scroll(limit=5, with_payload=["title"])
    assert all(r.payload == {"title": by_id[r.id]["title"]} for r in recs)
    recs, _ = idx.scroll(limit=5, with_payload=False)
    assert all(r.payload == {} and r.id in by_id for r in recs)
    recs, _ = idx.scroll(limit=3, with_vectors=True)
    tok = {i: t for i, t in zip(ids, toks, strict=True)}
    for r in recs:
        assert r.tokens is not None and np.allclose(r.tokens, tok[r.id], atol=1e-5)
    bags = list(idx.iter_records(batch=17, filter={"category": "bag"}))
    assert {r.id for r in bags} == {i for i, p in by_id.items() if p["category"] == "bag"}
    assert len(list(idx.iter_records(batch=1000, with_payload=False))) == N
    got = idx.get(ids[:3], with_payload={"exclude": ["title", "price"]})
    assert [r.id for r in got] == ids[:3] and "price" not in got[0].payload
    for bad in ({"limit": 0}, {"limit": 10_001}, {"with_payload": "title"}):
        with pytest.raises(InvalidQueryError):
            idx.scroll(**bad)
    with pytest.raises(InvalidQueryError):
        idx.scroll(with_payload={"include": ["x"]})
    with pytest.raises(InvalidFilterError):
        idx.scroll(filter={"title": "x"})
    # seeded sample: reproducible, distinct, uniform over the ids
    a, b = idx.sample(12, seed=3), idx.sample(12, seed=3)
    assert [r.id for r in a] == [r.id for r in b] and len({r.id for r in a}) == 12
    assert [r.id for r in idx.sample(12, seed=4)] != [r.id for r in a]
    assert all(r.payload == by_id[r.id] for r in a)
    assert len(idx.sample(5000, seed=1)) == N
    light = idx.sample(4, with_payload={"exclude": ["title"]})
    assert len({r.id for r in light}) == 4 and all("title" not in r.payload for r in light)
    with pytest.raises(InvalidQueryError):
        idx.sample(0)


def test_version_handles_scroll(backend, tmp_path):
    ids, toks, payloads = make_data(40)
    idx = open_index(uri_for(backend, tmp_path), "g", fields=FIELDS)
    with idx.create_version(VersionMeta("x", "", (Q, D), FIELDS)) as v:
        v.upsert(ids, toks, payloads)
        assert {r.id for r in v.iter_records(batch=9)} == set(ids)
        assert len(v.sample(7, seed=0)) == 7
        recs, nxt = v.scroll(limit=40, with_payload=["category"])
        assert nxt is None and len(recs) == 40
    idx.close()


def test_version_meta_update_and_ever_active(backend, tmp_path):
    ids, toks, payloads = make_data(30)
    uri = uri_for(backend, tmp_path)
    idx = open_index(uri, "g", encoder_fingerprint="enc-A", fields=FIELDS)
    idx.upsert(ids, toks, payloads)
    v1 = idx.active_version
    meta = VersionMeta("enc-A", "", (Q, D), FIELDS, {"build_key": "k", "n": 1})
    with idx.create_version(meta) as v:
        v.upsert(ids[:10], toks[:10])
    v2 = v.version
    with idx.create_version(meta) as v:
        v.upsert(ids[:5], toks[:5])
    v3 = v.version  # never activated: an unfinished build
    t0 = time.time()
    idx.activate(v2)
    assert idx.rollback() == v1
    info = {x.version: x for x in idx.versions()}
    assert info[v1].active and info[v1].ever_active and info[v1].activated_at is not None
    # rolled back from: not active, but it was (a plain build must not resume it)
    assert not info[v2].active and info[v2].ever_active
    assert info[v2].activated_at is not None and info[v2].activated_at >= t0 - 1
    assert not info[v3].ever_active and info[v3].activated_at is None
    first = info[v2].activated_at
    idx.activate(v2)  # a second activation keeps the first time
    assert {x.version: x for x in idx.versions()}[v2].activated_at == first
    new = idx.update_version_meta(v3, {"verified": True, "n": None})
    assert new.extra == {"build_key": "k", "verified": True}
    assert new.encoder_fingerprint == "enc-A" and new.fields == FIELDS
    idx.update_version_meta(v2, {"note": "x"})  # the active one too
    assert idx.meta is not None and idx.meta.extra["note"] == "x"
    with pytest.raises(IndexNotFoundError):
        idx.update_version_meta("v000099", {"a": 1})
    idx.close()
    with open_index(uri, "g", encoder_fingerprint="enc-A") as idx:  # persisted
        info = {x.version: x for x in idx.versions()}
        assert info[v3].meta.extra == {"build_key": "k", "verified": True}
        assert info[v2].ever_active and not info[v3].ever_active


def test_qdrant_version_creation_claims_the_number(tmp_path):
    """Two creators that pick the same number: the collection create is the claim, so the
    second one moves on instead of sharing (or overwriting) the version."""
    ids, toks, _ = make_data(10)
    idx = open_index(uri_for("local", tmp_path), "g")
    idx.upsert(ids, toks)  # v000001
    client = idx._backend.client  # type: ignore[attr-defined]
    real_exists = client.collection_exists
    # another process claimed v000002 between our check and our create, and has not written
    # its catalog entry yet (or died): our existence check does not see it
    client.create_collection(
        "g__v000002",
        vectors_config=__import__("qdrant_client").models.VectorParams(size=1, distance="Dot"),
    )
    client.collection_exists = lambda name: False if name == "g__v000002" else real_exists(name)
    try:
        with idx.create_version(VersionMeta("x", "", (Q, D))) as v:
            v.upsert(ids, toks)
        assert v.version == "v000003"
    finally:
        client.collection_exists = real_exists
    assert [x.version for x in idx.versions()] == ["v000001", "v000003"]  # orphan not listed
    idx.close()


def test_fast_plan_from_recall_target():
    from retrieval.index.policy import FAST_RECALL_TABLE, fast_plan

    for target, cands in FAST_RECALL_TABLE:
        assert fast_plan(10, 0, {"fast_recall": target})[0] == cands
    lo = fast_plan(10, 0, {"fast_recall": 0.5})[0]
    hi = fast_plan(10, 0, {"fast_recall": 0.999})[0]
    assert lo <= fast_plan(10, 0, {})[0] <= hi
    big, ef, _ = fast_plan(1000, 500, {"fast_recall": 0.9})
    assert big >= 8 * 1500 and ef >= big  # deeper pages get more; ef never below L
    opts = {"fast_min_candidates": 300, "fast_exact_prefetch": False}
    assert fast_plan(10, 0, {**opts, "fast_hnsw_ef": 10}) == (300, 300, False)
    assert fast_plan(10, 0, {**opts, "fast_ef_factor": 2}) == (300, 600, False)
    # auto: an exact prefetch scan once L is a sizeable share of the gallery
    assert fast_plan(10, 0, {"fast_min_candidates": 300}, n=1000)[2]
    assert not fast_plan(10, 0, {"fast_min_candidates": 300}, n=10_000_000)[2]


def test_auto_mode_prefers_exact_when_l_is_a_large_share():
    from retrieval.index.policy import auto_mode

    assert auto_mode(10, 0, 10_000, {}) == "exact"  # below auto_fast_min_points
    assert auto_mode(10, 0, 30_000, {}) == "exact"  # L=8000 > 25% of 30k: exact is faster
    assert auto_mode(10, 0, 100_000, {}) == "fast"
    assert auto_mode(10, 0, 30_000, {"fast_recall": 0.95}) == "fast"  # L=2000


def test_exact_mode_is_exact_on_near_ties(tmp_path):
    """int8 candidates + rescoring must still give the exact top-k when scores nearly tie (real
    features of a weak model do: oversampling 2 lost 8% of recall@10 on the demo model)."""
    rng = np.random.default_rng(0)
    n, q, d = 3000, 32, 256
    base = rng.standard_normal(d).astype(np.float32)
    toks = base + 0.3 * rng.standard_normal((n, q, d)).astype(np.float32)
    toks /= np.linalg.norm(toks, axis=-1, keepdims=True)
    queries = base + 0.3 * rng.standard_normal((30, d)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=-1, keepdims=True)
    truth = np.argsort(-np.einsum("md,nqd->mnq", queries, toks).max(-1), axis=1)[:, :10]
    ids = [f"i{i}" for i in range(n)]
    uri = f"edge:{tmp_path}"
    with open_index(uri, "g", encoder_fingerprint="x") as idx:
        with idx.create_version(VersionMeta("x", "p", (q, d), {})) as v:
            v.upsert(ids, toks, [{} for _ in ids])
        idx.activate(v.version)

    def recall(options):
        with open_index(uri, "g", encoder_fingerprint="x", read_only=True, options=options) as idx:
            got = [{h.id for h in idx.search(qv, top_k=10, mode="exact")} for qv in queries]
        return np.mean(
            [len(g & {f"i{j}" for j in t}) / 10 for g, t in zip(got, truth, strict=True)]
        )

    assert recall({}) == 1.0
    assert recall({"oversampling": 1.0}) < 1.0  # the int8 scan alone is not exact here


def test_float16_token_storage(tmp_path, monkeypatch):
    """tokens_dtype=float16 (or CIR_INDEX_TOKENS_DTYPE): the originals take about half the disk,
    and exact search keeps the float32 top-10 with scores within float16 rounding."""
    ids, toks, payloads = make_data(n=1500, q=16, d=256)
    queries = toks[::150, 0] + 0.1 * np.random.default_rng(1).standard_normal((10, 256))
    sizes, found = {}, {}
    for dtype in ("float32", "float16"):
        if dtype == "float16":
            monkeypatch.setenv("CIR_INDEX_TOKENS_DTYPE", "float16")
        uri = f"edge:{tmp_path / dtype}"
        with open_index(uri, "g", encoder_fingerprint="x") as idx:
            with idx.create_version(VersionMeta("x", "p", (16, 256), {})) as v:
                v.upsert(ids, toks, payloads)
            idx.activate(v.version)
        monkeypatch.delenv("CIR_INDEX_TOKENS_DTYPE", raising=False)
        sizes[dtype] = sum(  # allocated bytes: engine files are sparse and preallocated
            f.stat().st_blocks * 512 for f in (tmp_path / dtype).rglob("*") if f.is_file()
        )
        with open_index(uri, "g", read_only=True) as idx:  # a reader needs no option
            found[dtype] = [idx.search(qv, top_k=10, mode="exact") for qv in queries]
    for a, b, qv in zip(found["float32"], found["float16"], queries, strict=True):
        assert [h.id for h in a][:5] == [h.id for h in b][:5]
        true_b = exact_scores(toks[[ids.index(h.id) for h in b]], qv)
        np.testing.assert_allclose([h.score for h in b], true_b, atol=2e-3)
        assert true_b.min() >= a[-1].score - 2e-3  # past the top 5 only near ties may swap
    originals = 1500 * 16 * 256 * 2  # the bytes float16 saves
    assert sizes["float32"] - sizes["float16"] > 0.8 * originals
    with pytest.raises(ValueError, match="tokens_dtype"):
        open_index(f"edge:{tmp_path / 'bad'}", "g", options={"tokens_dtype": "int4"})


def test_qdrant_settings_from_environment(monkeypatch):
    monkeypatch.setenv("CIR_INDEX_SHARD_NUMBER", "3")
    monkeypatch.setenv("CIR_INDEX_REPLICATION_FACTOR", "2")
    with open_index("local::memory:", "g") as idx:
        assert (idx._backend.shard_number, idx._backend.replication_factor) == (3, 2)
    with open_index("local::memory:", "g", shard_number=5) as idx:
        assert idx._backend.shard_number == 5  # an explicit argument wins


def test_fast_plan_uses_a_versions_calibration():
    from retrieval.index.policy import FAST_RECALL_TABLE, auto_mode, fast_plan

    cal = {"L": 500, "recall_target": 0.99}
    table_l = FAST_RECALL_TABLE[-1][1]
    assert fast_plan(10, 0, {}, 100_000, cal)[0] == 500
    assert fast_plan(10, 0, {"fast_recall": 0.95}, 100_000, cal)[0] == 500  # a lower target
    assert fast_plan(10, 0, {"fast_recall": 0.999}, 100_000, cal)[0] >= table_l  # a higher one
    assert fast_plan(10, 0, {"fast_min_candidates": 77}, 100_000, cal)[0] == 80  # 8 x top_k
    assert fast_plan(10, 0, {"fast_ignore_calibration": True}, 100_000, cal)[0] == table_l
    assert fast_plan(10, 0, {}, 100_000, {"L": None, "recall_target": 0.99})[0] == table_l
    assert fast_plan(100, 0, {}, 100_000, cal)[0] == 800  # deep pages still get 8 x top_k
    # a calibrated small L makes `auto` use `fast` where the table's 8000 would not pay off
    assert auto_mode(10, 0, 30_000, {}) == "exact"
    assert auto_mode(10, 0, 30_000, {}, cal) == "fast"
    # a calibration that found no L for the target: `auto` searches exactly (the table's L
    # would silently lose recall), unless the caller overrides L or a lower target was measured
    failed = {"L": None, "recall_target": 0.99}
    assert auto_mode(10, 0, 100_000, {}) == "fast"
    assert auto_mode(10, 0, 100_000, {}, failed) == "exact"
    assert auto_mode(10, 0, 100_000, {"fast_min_candidates": 2000}, failed) == "fast"
    assert auto_mode(10, 0, 100_000, {"fast_ignore_calibration": True}, failed) == "fast"
    assert auto_mode(10, 0, 100_000, {"fast_recall": 0.9}, failed) == "fast"


def test_choose_l_keeps_a_margin():
    from retrieval.index.calibrate import choose_l

    curve = {100: 0.9, 250: 0.991, 500: 0.996, 1000: 1.0}
    assert choose_l(curve, 0.99) == 500  # 0.991 < 0.995 (target + half the remaining error)
    assert choose_l(curve, 0.8) == 100
    assert choose_l({100: 0.5}, 0.99) is None


def test_calibration_measures_this_index_and_is_recorded(backend, tmp_path):
    from indexer.pipeline import calibrate_index
    from retrieval.index.calibrate import measure_fast_recall
    from retrieval.index.policy import CALIBRATION_KEY

    n, q, d = 1200, 8, 16
    rng = np.random.default_rng(5)
    # "hard": tokens spread far from their mean; "easy": every token of an image identical
    # (pooled == MaxSim ranking, so a first stage of top_k already holds the exact top_k)
    hard = rng.standard_normal((n, q, d)).astype(np.float32)
    easy = np.repeat(rng.standard_normal((n, 1, d)).astype(np.float32), q, axis=1)
    ids = [f"p{i}" for i in range(n)]
    curves = {}
    for name, toks in (("hard", hard), ("easy", easy)):
        uri = f"{backend}:{tmp_path / name}"
        idx = open_index(uri, "g", encoder_fingerprint="e", preset="t")
        idx.upsert(ids, toks)
        idx.flush()
        res = measure_fast_recall(idx, queries=40, ladder=(100, 250, 500, 1000))
        idx.close()
        curve = res["curve"]
        assert res["n"] == n and res["queries"] == 40 and res["top_k"] == 10
        assert list(curve) == [100, 250, 500, 1000]
        vals = list(curve.values())
        assert all(0.0 <= v <= 1.0 for v in vals) and vals == sorted(vals)
        curves[name] = curve
        # Recorded in the active version's metadata, read back by a new opener.
        rec = calibrate_index(uri, "g", recall_target=0.9)
        idx = open_index(uri, "g", read_only=True)
        try:
            stored = idx.meta.extra[CALIBRATION_KEY]
        finally:
            idx.close()
        assert stored["L"] == rec["L"] and stored["recall_target"] == 0.9
    assert curves["easy"][100] == 1.0
    assert curves["hard"][100] < 0.9  # random tokens: the mean is a poor proxy for the max
    assert curves["hard"][1000] > curves["hard"][100]


def test_calibration_from_real_query_vectors(backend, tmp_path):
    """Given real queries, the curve is measured on them, not on proxy queries: queries that
    point at an image as a whole (as trained composed queries do) need a small L even where the
    token-plus-noise proxies find none; unusable vectors are refused with a clear message."""
    from indexer.pipeline import IndexerError, calibrate_index
    from retrieval.index.calibrate import measure_fast_recall

    n, q, d = 1200, 8, 16
    rng = np.random.default_rng(7)
    toks = rng.standard_normal((n, q, d)).astype(np.float32)  # tokens far from their mean
    uri = f"{backend}:{tmp_path / 'g'}"
    with open_index(uri, "g", encoder_fingerprint="e", preset="t") as idx:
        idx.upsert([f"p{i}" for i in range(n)], toks)
        idx.flush()
        means = toks[rng.integers(0, n, 30)].mean(1)
        real = measure_fast_recall(idx, ladder=(100, 250), query_vectors=means)
        proxy = measure_fast_recall(idx, queries=30, ladder=(100, 250))
        assert real["source"] == "queries" and real["queries"] == 30
        assert proxy["source"] == "proxy"
        # the curve is the one of these queries, computed here independently
        unit = toks / np.linalg.norm(toks, axis=-1, keepdims=True)
        pooled = unit.mean(1)
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
        qv = means / np.linalg.norm(means, axis=1, keepdims=True)
        exact = np.einsum("md,nqd->mnq", qv, unit).max(-1)
        order = np.argsort(-(qv @ pooled.T), axis=1)
        for L in (100, 250):
            want = np.mean(
                [
                    len(set(np.argsort(-e)[:10]) & set(o[:L])) / 10
                    for e, o in zip(exact, order, strict=True)
                ]
            )
            assert real["curve"][L] == pytest.approx(want, abs=1e-6)
        assert real["curve"] != proxy["curve"]
        for bad, msg in (
            (np.zeros((0, d)), "non-empty"),
            (np.zeros((3, d)), "non-zero"),
            (np.ones((3, d + 1)), "dimensions"),
        ):
            with pytest.raises(ValueError, match=msg):
                measure_fast_recall(idx, ladder=(100,), query_vectors=bad)
    rec = calibrate_index(uri, "g", recall_target=0.9, query_vectors=means)
    assert rec["source"] == "queries" and rec["L"] is not None
    with pytest.raises(IndexerError, match="dimensions"):
        calibrate_index(uri, "g", query_vectors=np.ones((3, d + 1), np.float32))


# ------------------------------------------------------------------ one call: hits + version
def test_search_returns_the_version_it_searched(backend, tmp_path):
    """``search`` / ``search_batch`` return Hits that name the version that answered and the
    mode that ran, in the same call; after a switch they name the new version."""
    ids, toks, payloads = make_data(60)
    uri = uri_for(backend, tmp_path)
    writer = open_index(uri, "g", encoder_fingerprint="enc-A", fields=FIELDS, options=OPTS)
    writer.upsert(ids, toks, payloads)
    v1 = writer.active_version
    if backend == "edge":  # a server-like reader of its own (the writer builds new shards)
        writer.close()
        reader = open_index(uri, "g", encoder_fingerprint="enc-A", read_only=True, options=OPTS)
        writer = open_index(uri, "g", encoder_fingerprint="enc-A")
    else:
        reader = writer  # local mode: one client per directory
    hits = reader.search(toks[3, 0], top_k=5, mode="exact")
    assert hits.version == v1 and hits.mode == "exact" and hits.note == ""
    assert hits[0].id == ids[3] and len(hits) == 5 and hits == list(hits)
    # fast with L = 60 over 60 points runs exactly, and says so
    fast = reader.search(toks[3, 0], top_k=5, mode="fast")
    assert fast.version == v1 and fast.mode == "exact" and "fast is exact here" in fast.note
    batch = reader.search_batch(toks[[1, 2], 0], top_k=3, mode="auto")
    assert [h.version for h in batch] == [v1, v1] and {h.mode for h in batch} == {"exact"}
    new_ids = [f"new-{i}" for i in range(20)]
    with writer.create_version(VersionMeta("enc-A", "", (Q, D), FIELDS)) as v:
        v.upsert(new_ids, toks[:20], payloads[:20])
    writer.activate(v.version)
    reader.refresh()
    after = reader.search(toks[3, 0], top_k=5, mode="exact")
    assert after.version == v.version != v1 and all(h.id.startswith("new-") for h in after)
    if writer is not reader:
        writer.close()
    reader.close()


def test_reported_version_is_the_one_searched_while_refresh_swaps(tmp_path):
    """Readers search while another object activates new versions and the reader's refresh
    swaps them in: every Hits names the version whose points it holds (ids carry it)."""
    uri = uri_for("edge", tmp_path)
    _, toks, _ = make_data(40)
    with open_index(uri, "g", encoder_fingerprint="enc-A") as w:
        w.upsert([f"v000001-{i}" for i in range(40)], toks)  # auto-created: v000001
    reader = open_index(uri, "g", encoder_fingerprint="enc-A", read_only=True)
    stop, seen, errors = threading.Event(), [], []

    def search() -> None:
        while not stop.is_set():
            try:
                hits = reader.search(toks[0, 0], top_k=3, mode="exact")
                seen.append((hits.version, {h.id.split("-")[0] for h in hits}))
            except Exception as exc:  # noqa: BLE001 - any failure is a test failure
                errors.append(repr(exc))

    threads = [threading.Thread(target=search) for _ in range(2)]
    for t in threads:
        t.start()
    writer = open_index(uri, "g", encoder_fingerprint="enc-A")
    try:
        for _ in range(3):
            with writer.create_version(VersionMeta("enc-A", "", (Q, D))) as v:
                v.upsert([f"{v.version}-{i}" for i in range(40)], toks)
            writer.activate(v.version)
            assert reader.refresh()
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        writer.close()
        reader.close()
    assert not errors, errors[:3]
    assert len({v for v, _ in seen}) >= 2
    assert all(prefixes == {version} for version, prefixes in seen), seen[:5]


def test_backend_contract(backend, tmp_path):
    """The narrow backend protocol (retrieval.index.backend) on both engines: create, point,
    history, metadata, open/upsert/query/retrieve/scroll, drop."""
    from retrieval.index.policy import plan_search
    from retrieval.index.validate import payload_spec, pooled_of

    ids, toks, payloads = make_data(30)
    idx = open_index(uri_for(backend, tmp_path), "g", fields=FIELDS)
    b = idx._backend  # type: ignore[attr-defined]
    assert b.kind == backend and b.active() is None and b.history() == []
    meta = VersionMeta("fp", "p", (Q, D), FIELDS, {"k": 1})
    v1, v2 = b.create(meta), b.create(meta)
    assert (v1, v2) == ("v000001", "v000002") and b.list_versions() == [v1, v2]
    assert b.read_meta(v1)[0] == meta and b.exists(v1)
    b.write_meta(v1, meta.with_extra({"k": None, "x": 2}))
    assert b.read_meta(v1)[0].extra == {"x": 2} and b.records()[v1][2] is None
    with b.mutex():
        b.mark_activated(v1)
        b.point(v1, [])
    assert b.active() == v1 and b.records()[v1][2] is not None
    b.point(v2, [v1])
    assert b.active() == v2 and b.history() == [v1]
    b.set_history([])
    assert b.history() == [] and b.active() == v2
    store = b.open(v2, meta)
    unit = toks / np.linalg.norm(toks, axis=-1, keepdims=True)
    assert store.upsert(ids, unit, pooled_of(unit), payloads) == 30
    store.flush()
    assert store.count() == 30
    plan = plan_search("exact", 3, 0, 30, [], {}, None, "test")
    (hits,) = store.query(unit[[4], 0], plan)
    assert hits[0].id == ids[4] and hits[0].payload == payloads[4]
    recs = store.retrieve([ids[1], "nope"], True, payload_spec(["title"]))
    assert [r.id for r in recs] == [ids[1]] and recs[0].payload == {"title": "item 1"}
    page, nxt = store.scroll(10, None, payload_spec(False), False, [])
    assert len(page) == 10 and nxt is not None
    store.delete(ids[:5])
    assert store.count() == 25
    store.close(finish=True)
    b.finish(v2, None)  # indexes built: nothing to do, nothing refused
    b.drop(v1)
    assert b.list_versions() == [v2]
    with pytest.raises(IndexNotFoundError):
        b.read_meta(v1)
    idx.close()


def test_a_dead_qdrant_server_is_unavailable_not_a_crash() -> None:
    """A Qdrant URL nobody listens on: the transport's error (httpx, or grpc with
    prefer_grpc) becomes IndexUnavailableError (the server's UNAVAILABLE), quickly."""
    from retrieval.index import IndexUnavailableError
    from tests.helpers import free_port

    t0 = time.time()
    with pytest.raises(IndexUnavailableError, match="unreachable|unavailable"):
        open_index(f"qdrant:http://127.0.0.1:{free_port()}", "g", encoder_fingerprint="e")
    assert time.time() - t0 < 30
