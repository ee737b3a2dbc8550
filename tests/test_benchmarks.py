"""Benchmark scripts run end to end at toy sizes and report every variant they compare."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, args: list[str], out: Path, timeout: int = 300) -> Any:
    """Run ``benchmarks/<script>`` with ``--json out``; its stdout on success."""
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_attn_precision_benchmark_compares_all_variants(tmp_path: Path) -> None:
    out = tmp_path / "k.json"
    args = ["--preset", "tiny", "--batch", "4", "--reps", "2", "--query-reps", "2"]
    res = _run("attn_precision.py", args, out)
    rows = json.loads(out.read_text())["rows"]
    assert {(r["attention"], r["precision"]) for r in rows} == {
        ("sdpa", "fp32"),
        ("eager", "fp32"),
        ("sdpa", "bf16"),
        ("eager", "bf16"),
    }
    assert all(r["train_step_s"] > 0 and r["query_ms"] > 0 for r in rows)
    assert rows[0]["train_speedup"] == 1.0  # the baseline row
    assert "| eager | bf16 |" in res.stdout


def test_first_stage_benchmark_compares_centroid_counts(tmp_path: Path) -> None:
    out = tmp_path / "fs.json"
    args = ["--n", "600", "--queries", "10", "--centroids", "1,4", "--L", "10,100,599"]
    res = _run("first_stage.py", args, out)
    rows = json.loads(out.read_text())["rows"]
    assert [r["centroids"] for r in rows] == [1, 4]
    for r in rows:
        rec = [r["recall@10"][k] for k in ("10", "100", "599")]
        assert rec == sorted(rec) and rec[0] >= 0.0 and rec[-1] >= 0.99  # L = all but one
    assert "| 1 (pooled) |" in res.stdout


def test_first_stage_centroids_are_group_means() -> None:
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from benchmarks.first_stage import centroids, first_stage_recall

    toks = np.zeros((2, 4, 3), np.float32)
    toks[0, :2, 0] = 1.0
    toks[0, 2:, 1] = 1.0
    toks[1, :, 2] = 1.0
    c2 = centroids(toks, 2)
    np.testing.assert_allclose(c2[0], [[1, 0, 0], [0, 1, 0]])
    np.testing.assert_allclose(centroids(toks, 1)[0], [[2**-0.5, 2**-0.5, 0]], rtol=1e-6)
    # A query along token group 2 of image 0: the 2-centroid summary ranks image 0 first.
    q = np.array([[0.0, 1.0, 0.0]], np.float32)
    assert first_stage_recall(c2, q, [{0}], [1], k=1) == {1: 1.0}


def test_misses_difference_kinds() -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.misses import difference
    from retrieval.data.shapes import parse_signature as p

    t = p("0:red-circle-L|4:blue-square-S")
    assert difference(t, p("1:red-circle-L|4:blue-square-S")) == "cell"
    assert difference(t, p("0:red-circle-S|4:blue-square-S")) == "size"
    assert difference(t, p("0:red-cross-S|4:blue-square-S")) == "shape+size"
    assert difference(t, p("0:red-circle-L|4:green-square-S")) == "color"
    assert difference(t, p("1:red-circle-L|5:blue-square-S")) == "2 objects differ"
    assert difference(t, p("0:red-circle-L")) == "count"
    assert difference(t, t) == "same"


def test_server_cpu_benchmark_compares_batching_on_and_off(tmp_path: Path) -> None:
    from retrieval.data.shapes import ShapesConfig, generate

    world = tmp_path / "world"  # the query images and captions (a fresh clone has no data/)
    cfg = ShapesConfig(seed=1, train=64, val=8, test=16, test_unseen=8, gallery=60, workers=1)
    generate(cfg, world, overwrite=True)
    out = tmp_path / "cpu.json"
    args = ["--size", "300", "--duration", "1", "--concurrency", "4", "--work-dir", str(tmp_path)]
    # behaviour, not throughput: each mode is measured until 16 requests were answered, however
    # busy the machine is (a fixed 1 s window can end before the first answer)
    args += ["--data", str(world), "--min-requests", "16"]
    res = _run("server_cpu.py", args, out, timeout=900)
    rows = json.loads(out.read_text())
    modes = [(r["search_process"], r["batching"]) for r in rows]
    assert modes == [(True, True), (True, False), (False, True), (False, False)]
    for r in rows:
        assert r["requests"] >= 16, r
        assert r["qps"] > 0 and r["server_cpu_ms_per_query"] > 0 and r["server_cpu_pct"] > 0
        assert not r["errors"]
        # the search process exists (and its CPU counts as the server's) only when asked for
        assert r["child_processes"] == (1 if r["search_process"] else 0)
        # every request reports its server stages; a reference image is decoded and encoded
        assert set(r["stage_ms"]) == {"queue", "decode", "reference", "encode", "search", "rerank"}
        assert r["stage_ms"]["encode"] > 0 and r["stage_ms"]["search"] > 0
    assert rows[1]["mean_batch"] == rows[3]["mean_batch"] == 1.0  # batching off is batch 1
    assert "search process on: batching" in res.stdout and "x the QPS" in res.stdout


def test_search_batch_benchmark_compares_edge_and_ram(tmp_path: Path) -> None:
    import numpy as np

    from retrieval.data.shapes import ShapesConfig, generate
    from retrieval.index import open_index

    world = tmp_path / "world"  # composed test queries (a fresh clone has no data/)
    cfg = ShapesConfig(seed=1, train=64, val=8, test=24, test_unseen=8, gallery=60, workers=1)
    generate(cfg, world, overwrite=True)
    rng = np.random.default_rng(0)
    toks = rng.normal(size=(300, 16, 256)).astype(np.float32)
    toks /= np.linalg.norm(toks, axis=-1, keepdims=True)
    idx = open_index(f"edge:{tmp_path / 'ix'}", "g", encoder_fingerprint="fp", preset="sprc-small")
    idx.upsert([f"p{i}" for i in range(300)], toks)
    idx.close()
    out = tmp_path / "sb.json"
    args = ["--index", f"edge:{tmp_path / 'ix'}", "--name", "g", "--model", "sprc-small"]
    args += ["--data", str(world), "--queries", "8", "--skip", "0", "--batches", "1,4"]
    args += ["--limit", "299", "--rescore", "300", "--repeat", "1"]
    res = _run("search_batch.py", args, out)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["search"], r["batch"]) for r in rows] == [
        ("edge", 1),
        ("edge", 4),
        ("ram", 1),
        ("ram", 4),
    ]
    # 300 points: the index searches exactly; the RAM search shortlists all but one image and
    # rescores every candidate in float32, so both find the exact top 10
    assert all(r["recall@10"] >= 0.98 and r["ms_per_query"] > 0 for r in rows)
    assert rows[0]["ratio"] == 1.0
    assert "| ram | 4 |" in res.stdout


def test_server_benchmark_rows_with_reranking_on_and_off(tmp_path: Path) -> None:
    """`benchmarks/server.py --rerank 0,K` measures the same server with the second stage off
    and on, in one run, and says what it adds (behaviour, not speed: a busy machine is fine)."""
    from retrieval.encoder import Encoder
    from retrieval.rerank import RERANKER_DIR, Reranker, RerankerConfig, RerankerModel

    model = tmp_path / "tiny-model"
    enc = Encoder.from_pretrained("tiny")
    enc.save_pretrained(model)
    enc = Encoder.from_pretrained(model)
    cfg = RerankerConfig.for_encoder(enc, "targets", width=16, heads=2)
    Reranker(RerankerModel(cfg)).save_pretrained(model / RERANKER_DIR)
    out = tmp_path / "server.json"
    args = ["--model", str(model), "--sizes", "200", "--concurrency", "1,2", "--duration", "1"]
    args += ["--warmup", "0.5", "--gallery", "synthetic", "--rerank", "0,10"]
    args += ["--dtypes", "float32", "--work-dir", str(tmp_path / "work")]
    res = _run("server.py", args, out, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert {(r["batching"], r["rerank_k"], r["concurrency"]) for r in rows} == {
        (b, k, c) for b in (True, False) for k in (0, 10) for c in (1, 2)
    }
    for r in rows:
        assert not r["errors"], r
        if r["requests"]:  # a 1 s window on a busy machine may end before an answer
            assert (r["stage_ms"]["rerank"] > 0) == (r["rerank_k"] > 0), r
    assert "rerank_k=10 adds" in res.stdout and "of no re-ranking" in res.stdout


def test_rerank_benchmark_times_every_variant(tmp_path: Path) -> None:
    """`benchmarks/rerank.py` times the committed re-ranker beside both feature sources at the
    demo and the BLIP-2 size, and states the bytes per image each needs."""
    out = tmp_path / "rerank.json"
    res = _run("rerank.py", ["--k", "5,10", "--batch", "1", "--reps", "1"], out, timeout=600)
    rows = json.loads(out.read_text())
    names = {r["reranker"] for r in rows}
    assert {"sprc-small targets (random)", "blip2-vitg patches (random)"} <= names
    assert "demo (committed)" in names
    for r in rows:
        assert r["ms_per_call"] > 0 and r["k"] in (5, 10)
        # targets are the index's own vectors; patches need T x C float16 per image
        assert (r["new_bytes_per_image"] == 0) == (r["features"] == "targets")
    big = next(r for r in rows if r["reranker"] == "blip2-vitg patches (random)")
    assert big["new_bytes_per_image"] == 257 * 1408 * 2 and big["vit_gflops_per_candidate"] > 100
    assert "| demo (committed) | patches |" in res.stdout


@pytest.mark.timeout(1300)  # its benchmark's own bound is 1200 s: a starved Ray cluster ends there
def test_indexer_benchmark_puts_the_ray_executor_beside_inprocess(tmp_path: Path) -> None:
    """`benchmarks/indexer.py --executor inprocess,ray` builds the same images with both
    executors in one run (Ray: a local cluster, a cold and a warm build) and prints the ratio."""
    out = tmp_path / "ix.json"
    args = ["--presets", "tiny", "--n", "tiny=24", "--batch-size", "8", "--workers", "0"]
    res = _run("indexer.py", [*args, "--executor", "inprocess,ray"], out, timeout=1200)
    rows = json.loads(out.read_text())["results"]
    assert [r["executor"] for r in rows] == ["inprocess", "ray (cold)", "ray (warm)"]
    assert all(r["indexed"] == 24 and r["verified"] for r in rows)
    assert all(r["images_per_s_end_to_end"] > 0 for r in rows)
    assert "| ratio to inprocess (same round) |" in res.stdout
    assert "| tiny | 0 | ray (warm) | 24 |" in res.stdout


def test_streamed_index_benchmark_builds_from_a_memmap_and_resumes(tmp_path: Path) -> None:
    """benchmarks/index.py --streamed at toy size: rendered features in a float16 memmap, a
    float16 Edge build calibrated on composed queries, queries in a fresh process; a second run
    reuses the features and the build (what a killed 1M run relies on)."""
    import numpy as np

    out = tmp_path / "streamed.json"
    args = ["--features", "tiny", "--render", "300", "--streamed", "--queries-n", "20"]
    args += ["--calibrate-queries", "40", "--tokens-dtype", "float16"]
    args += ["--cache", str(tmp_path / "cache"), "--workdir", str(tmp_path / "work")]
    res = _run("index.py", args, out)
    doc = json.loads(out.read_text())
    assert doc["n"] == 300 and doc["encode"]["done"] == 300
    feats = np.load(Path(doc["encode"]["folder"]) / "targets_f16.npy", mmap_mode="r")
    assert feats.shape[0] == 300 and feats.dtype == np.float16
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(feats[:5], np.float32), axis=-1), 1.0, atol=2e-3
    )
    build = doc["build"]
    assert build["options"] == {"tokens_dtype": "float16"}
    assert build["calibration"]["source"] == "composed" and build["calibration"]["queries"] == 40
    rows = {r["mode"]: r for r in doc["serve"]["rows"]}
    assert set(rows) == {"exact", "fast"} and rows["exact"]["recall10"] >= 0.99
    assert doc["serve"]["rss_after_queries"]["rss_mb"] > 0
    assert "| exact | exact |" in res.stdout
    again = _run("index.py", args, out)  # features, ground truth and build are reused
    assert json.loads(out.read_text())["build"] == build and "encoded" not in again.stderr


def test_rerank_alpha_benchmark_puts_k_and_alpha_side_by_side(tmp_path: Path) -> None:
    """`benchmarks/rerank_alpha.py`: R@1 / R@5 of the committed re-ranker for each K x alpha on
    two splits from one pass each; a K's R@K cannot depend on alpha (it only re-orders)."""
    from retrieval.data.shapes import ShapesConfig, generate

    world = tmp_path / "w"
    generate(
        ShapesConfig(seed=5, train=16, val=40, test=40, test_unseen=8, gallery=150, workers=1),
        world,
        overwrite=True,
    )
    out = tmp_path / "alpha.json"
    args = ["--data", f"{world}:val,{world}:test", "--k", "5,10", "--scales", "1,8"]
    res = _run("rerank_alpha.py", [*args, "--threads", "1"], out, timeout=600)
    rows = json.loads(out.read_text())
    assert [(r["k"], r["scale"]) for r in rows] == [(5, 1.0), (5, 8.0), (10, 1.0), (10, 8.0)]
    names = [f"{world}:val", f"{world}:test"]
    for r in rows:
        for n in names:
            assert 0.0 <= r[n]["1"] <= r[n]["5"] <= r[n]["10"] <= 1.0
    for n in names:  # membership of the top 10 is the first stage's: alpha cannot change R@10
        assert rows[2][n]["10"] == rows[3][n]["10"]
        assert rows[0][n]["5"] == rows[1][n]["5"]
    assert abs(rows[1]["alpha"] - 8 * rows[0]["alpha"]) < 1e-6
    assert "| K | alpha x trained |" in res.stdout and "alpha trained 15.87" in res.stdout
