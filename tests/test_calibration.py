"""Issue 22 item 1: `fast`'s L is calibrated on the model's own composed queries at build time,
chosen against a held-out part, and a `fast` that cannot keep its recall target runs exactly
and says so."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from retrieval.index import open_index
from retrieval.index.policy import CALIBRATION_KEY, resolve_mode, uncalibrated_reason
from tests.helpers.indexing import build_config

N, Q, D = 1200, 8, 16


@pytest.fixture
def random_index(tmp_path: Path) -> str:
    rng = np.random.default_rng(3)
    toks = rng.standard_normal((N, Q, D)).astype(np.float32)
    uri = f"edge:{tmp_path / 'ix'}"
    with open_index(uri, "g", encoder_fingerprint="e", preset="t") as idx:
        idx.upsert([f"p{i}" for i in range(N)], toks)
    return uri


def test_heldout_rule_never_picks_an_l_below_the_target() -> None:
    from retrieval.index.calibrate import choose_l_heldout

    fit = {100: 0.999, 250: 1.0, 500: 1.0}
    # 100 fits, but its held-out recall is below the target: the next L that holds on both
    assert choose_l_heldout(fit, {100: 0.97, 250: 0.992, 500: 1.0}, 0.99) == 250
    assert choose_l_heldout(fit, {100: 0.9, 250: 0.95, 500: 0.989}, 0.99) is None
    assert choose_l_heldout({100: 0.99, 250: 0.996}, {100: 1.0, 250: 1.0}, 0.99) == 250  # margin


def test_calibration_records_the_heldout_recall(tmp_path: Path) -> None:
    from retrieval.index.calibrate import calibrate_fast

    rng = np.random.default_rng(1)
    # tokens close to their image's mean (as trained SPRC tokens are)
    img = rng.standard_normal((N, 1, D)).astype(np.float32)
    toks = img + 0.05 * rng.standard_normal((N, Q, D)).astype(np.float32)
    with open_index(f"edge:{tmp_path / 'easy'}", "g") as idx:
        idx.upsert([f"p{i}" for i in range(N)], toks)
        means = img[rng.integers(0, N, 60), 0] + 0.1 * rng.standard_normal((60, D))
        res = calibrate_fast(idx, 0.9, query_vectors=means, source="composed", ladder=(100, 250))
        assert res["source"] == "composed" and res["fit_queries"] == res["heldout_queries"] == 30
        assert res["L"] is not None
        assert res["heldout_recall"] == res["heldout_curve"][str(res["L"])] >= 0.9
        assert res["curve"][str(res["L"])] >= 0.95  # target + half the remaining error
        # too few queries to hold any out: not sure, so no L (fast then searches exactly)
        few = calibrate_fast(idx, 0.9, query_vectors=means[:8], ladder=(100, 250))
        assert few["L"] is None and "too few" in few["reason"]


def test_resolve_mode() -> None:
    failed = {"L": None, "recall_target": 0.99, "source": "proxy", "reason": "none reached it"}
    ok = {"L": 500, "recall_target": 0.99, "source": "composed"}
    mode, why = resolve_mode("fast", 10, 0, 100_000, {}, failed)
    assert mode == "exact" and "searched exactly" in why and "none reached it" in why
    assert resolve_mode("fast", 10, 0, 100_000, {}, ok) == ("fast", "")
    assert resolve_mode("auto", 10, 0, 100_000, {}, failed)[0] == "exact"
    assert resolve_mode("auto", 10, 0, 5_000, {}, failed) == ("exact", "")  # small: exact anyway
    assert resolve_mode("exact", 10, 0, 100_000, {}, ok) == ("exact", "")
    assert resolve_mode("fast", 10, 0, 300, {}, ok)[0] == "exact"  # L >= the gallery
    # the caller's own L (or a lower target than the one measured) takes the responsibility
    assert resolve_mode("fast", 10, 0, 100_000, {"fast_min_candidates": 800}, failed)[0] == "fast"
    assert uncalibrated_reason({"fast_recall": 0.9}, failed) is None
    assert uncalibrated_reason({}, None) is None  # uncalibrated: the table (the guard watches)


def test_explicit_fast_without_an_l_runs_exactly_and_says_so(
    random_index: str, caplog: pytest.LogCaptureFixture
) -> None:
    from retrieval.index.process import ProcessIndex

    rng = np.random.default_rng(2)
    qs = rng.standard_normal((5, D)).astype(np.float32)
    with open_index(random_index, "g") as idx:
        v = idx.active_version
        idx.update_version_meta(v, {CALIBRATION_KEY: {"L": 100, "recall_target": 0.99}})
        fast_100 = [[h.id for h in hs] for hs in idx.search_batch(qs, mode="fast")]
        exact = [[h.id for h in hs] for hs in idx.search_batch(qs, mode="exact")]
        assert fast_100 != exact  # L = 100 of 1200 random-token images loses some
    # a server's read-only opener records a calibration (the recall guard's path), through
    # the search process too; the searches of the served version use it at once
    with ProcessIndex(random_index, "g", read_only=True) as pidx:
        cal = {"L": None, "recall_target": 0.99, "source": "proxy", "reason": "test"}
        meta = pidx.set_fast_calibration(v, cal)
        assert meta.extra[CALIBRATION_KEY]["L"] is None
        assert pidx.meta.extra[CALIBRATION_KEY]["reason"] == "test"
        got = [[h.id for h in hs] for hs in pidx.search_batch(qs, mode="fast")]
        assert got == exact
    with open_index(random_index, "g", read_only=True) as idx:  # persisted
        assert idx.meta.extra[CALIBRATION_KEY]["reason"] == "test"
        with caplog.at_level(logging.WARNING, logger="retrieval.index"):
            got = [[h.id for h in hs] for hs in idx.search_batch(qs, mode="fast")]
        assert got == exact
        assert any("searched exactly" in r.getMessage() for r in caplog.records)


def test_served_version_picks_up_a_calibration_recorded_elsewhere(random_index: str) -> None:
    """`cir index calibrate` (or another server's guard) writes the served version's meta; the
    server's next refresh() uses it without a version switch."""
    from retrieval.index.process import ProcessIndex

    with ProcessIndex(random_index, "g", read_only=True) as served:
        v = served.active_version
        assert CALIBRATION_KEY not in served.meta.extra
        with open_index(random_index, "g") as writer:
            writer.update_version_meta(v, {CALIBRATION_KEY: {"L": 250, "recall_target": 0.99}})
        assert served.refresh() is False  # no switch ...
        assert served.meta.extra[CALIBRATION_KEY]["L"] == 250  # ... but the new L


# ------------------------------------------------------------------------ build-time queries
def write_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:03d}.png")


def cfg(source: Path, index: Path, **kw: Any) -> Any:
    return build_config(source, index, **{"verify_sample": 4, "calibrate_min_points": 0, **kw})


def test_build_calibrates_on_composed_queries(tmp_path: Path, enc: Any) -> None:
    from indexer.cli import register
    from indexer.pipeline import build

    src = tmp_path / "imgs"
    write_images(src, 30)
    caps = tmp_path / "captions.txt"
    caps.write_text("make it red\n\n  add a blue square on the left \n")
    rep = build(cfg(src, tmp_path / "ix", calibration_captions=str(caps)), encoder=enc)
    cal = rep.calibration
    assert rep.verified and cal is not None
    assert cal["source"] == "composed" and cal["captions"] == f"file {caps}"
    assert cal["references"] == cal["queries"] == 30  # every gallery image, once
    assert cal["fit_queries"] + cal["heldout_queries"] == 30
    with open_index(f"edge:{tmp_path / 'ix'}", "g") as idx:
        stored = idx.meta.extra[CALIBRATION_KEY]
        assert stored["source"] == "composed" and stored["captions"] == f"file {caps}"
    from typer import Typer

    app = Typer()
    register(app)
    res = CliRunner().invoke(
        app, ["index", "info", "--index", f"edge:{tmp_path / 'ix'}"] + ["--name", "g"]
    )
    assert res.exit_code == 0, res.output
    assert "fast calibration:" in res.output and "composed queries" in res.output
    # a preset names no training data: the built-in generic edits
    rep = build(cfg(src, tmp_path / "ix2", calibration_queries=12), encoder=enc)
    assert rep.calibration is not None and rep.calibration["captions"] == "built-in texts"
    assert rep.calibration["queries"] == 12
    # a bad captions file: a one-line error (exit 2) before anything is encoded
    for bad, msg in (
        (tmp_path / "none.txt", "cannot read"),
        (tmp_path / "empty.txt", "no caption"),
    ):
        if bad.name == "empty.txt":
            bad.write_text("\n \n")
        res = CliRunner().invoke(
            app,
            ["index", "build", str(src), "--index", f"edge:{tmp_path / 'ix3'}", "--name", "g"]
            + ["--model", "tiny", "--allow-untrained", "--calibration-captions", str(bad)],
        )
        assert res.exit_code == 2, res.output
        assert msg in res.output
    assert not (tmp_path / "ix3" / "g").exists() or not list(
        (tmp_path / "ix3" / "g").rglob("meta.json")
    )


def test_training_captions_from_the_model_folder(tmp_path: Path) -> None:
    from indexer.pipeline import training_captions

    folder = tmp_path / "models" / "m"
    folder.mkdir(parents=True)
    data = tmp_path / "data" / "trip"
    card = {"training": {"config": {"data": str(data)}}}
    (folder / "card.json").write_text(json.dumps(card))
    assert training_captions(folder) is None  # its data is not on this machine: fall through
    data.mkdir(parents=True)
    lines = [{"reference": "a.png", "caption": f"caption {i}", "target": "b.png"} for i in range(5)]
    (data / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    caps, what = training_captions(folder)  # type: ignore[misc]
    assert caps == [f"caption {i}" for i in range(5)] and str(data / "train.jsonl") in what
    # a relative data dir resolves against the folder holding `models/`
    card["training"]["config"]["data"] = "data/trip"
    (folder / "card.json").write_text(json.dumps(card))
    assert training_captions(folder) is not None
    (folder / "card.json").write_text("{}")
    assert training_captions(folder) is None
    # the committed demo model names data/shapes: its training captions when present
    demo = Path(__file__).resolve().parents[1] / "models" / "sprc-shapes"
    if (demo.parents[1] / "data" / "shapes" / "train.jsonl").is_file():
        got = training_captions(demo, limit=50)
        assert got is not None and len(got[0]) == 50


def test_calibrate_on_a_servers_traffic_reservoir(random_index: str, tmp_path: Path) -> None:
    """`cir index calibrate --queries INDEX/NAME/traffic_queries.npy` (what cir serve writes):
    the sidecar's encoder must be the version's."""
    from typer import Typer

    from indexer.cli import register

    app = Typer()
    register(app)
    rng = np.random.default_rng(5)
    path = tmp_path / "traffic_queries.npy"
    np.save(path, rng.standard_normal((40, D)).astype(np.float32))
    args = ["index", "calibrate", "--index", random_index, "--name", "g", "--queries", str(path)]
    path.with_suffix(".json").write_text(json.dumps({"encoder_fingerprint": "other"}))
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "not comparable" in res.output
    path.with_suffix(".json").write_text(json.dumps({"encoder_fingerprint": "e"}))
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["source"] == "queries" and out["queries"] == 40 and "heldout_curve" in out
