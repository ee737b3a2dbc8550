"""The re-ranker's first-stage weight fitted on held-out triplets: the grid choice on lists whose
best alpha is known, and `cir calibrate-reranker` end to end on a tiny world, where the figures
it reports are the ones `evaluate` then measures with the written re-ranker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cir.cli import app
from retrieval.data.shapes import ShapesConfig, generate
from retrieval.encoder import Encoder
from retrieval.evaluate import RerankLists, evaluate
from retrieval.rerank import Reranker, RerankerConfig, RerankerModel
from retrieval.rerank_calibrate import CALIBRATION_JSON, choose_alpha


def _lists(head_noise: float, first_noise: float, n: int = 400, k: int = 10) -> RerankLists:
    """Target in column 0 of every list; head and first stage each see it through noise."""
    g = torch.Generator().manual_seed(0)
    signal = torch.zeros(n, k)
    signal[:, 0] = 1.0
    head = signal + head_noise * torch.randn(n, k, generator=g)
    first = (signal + first_noise * torch.randn(n, k, generator=g)) * 0.1
    hit = torch.zeros(n, k, dtype=torch.bool)
    hit[:, 0] = True
    return RerankLists(first, head, hit, torch.zeros(n, dtype=torch.long))


def test_ranks_follow_the_fused_score() -> None:
    lists = RerankLists(
        first=torch.tensor([[0.9, 0.5], [0.9, 0.5]]),
        head=torch.tensor([[0.0, 1.0], [0.0, 1.0]]),
        hit=torch.tensor([[True, False], [False, False]]),
        first_rank=torch.tensor([0, 7]),
    )
    assert lists.ranks(1.0).tolist() == [1, 7]  # 0.9 < 1.5: the target drops to 2nd
    assert lists.ranks(10.0).tolist() == [0, 7]  # 9 > 6: the first stage decides
    # a target outside the top-K keeps its first-stage rank whatever alpha is


def test_the_grid_weighs_the_more_informative_score() -> None:
    # a noisy head, a sharp first stage: a larger alpha wins
    best, rows = choose_alpha(_lists(head_noise=2.0, first_noise=0.2), trained=1.0)
    assert best["scale"] > 1.0
    assert best["recall"]["1"] > next(r for r in rows if r["scale"] == 1.0)["recall"]["1"]
    # a sharp head, a noisy first stage: a smaller alpha wins
    best, _ = choose_alpha(_lists(head_noise=0.2, first_noise=20.0), trained=50.0)
    assert best["scale"] < 1.0
    # both perfect: every alpha ties, and the trained one is kept
    best, rows = choose_alpha(_lists(head_noise=0.0, first_noise=0.0), trained=3.0)
    assert best["scale"] == 1.0 and best["alpha"] == 3.0
    assert [r["scale"] for r in rows] == sorted(r["scale"] for r in rows)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cal-world")
    generate(
        ShapesConfig(
            seed=23,
            train=64,
            val=64,
            test=32,
            test_unseen=8,
            gallery=160,
            image_size=32,
            workers=1,
        ),
        out,
        overwrite=True,
    )
    return out


def test_cli_writes_the_calibrated_alpha_and_evaluate_measures_what_it_reported(
    world: Path, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    enc_dir = tmp_path / "tiny"
    enc = Encoder.from_pretrained("tiny")
    enc.save_pretrained(enc_dir)
    cfg = RerankerConfig.for_encoder(enc, "targets", width=16, heads=2)
    cfg.encoder = enc.fingerprint
    model = RerankerModel(cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a random head that scrambles the first stage's order
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        model.alpha.fill_(1.0)
    rr_dir = enc_dir / "reranker"
    Reranker(model).save_pretrained(rr_dir, weights_dtype=torch.float32)
    before = Reranker.from_pretrained(rr_dir).fingerprint

    runner = CliRunner()
    res = runner.invoke(
        app, ["calibrate-reranker", "--model", str(enc_dir), "--data", str(world), "--k", "12"]
    )
    assert res.exit_code == 0, res.output
    report = json.loads((rr_dir / CALIBRATION_JSON).read_text())
    assert report["split"] == "val" and report["n"] == 64 and report["k"] == 12
    assert "| alpha | x trained |" in res.output and report["fingerprint"] in res.output
    best = report["recall"]
    for row in report["grid"]:  # the chosen alpha is the grid's best by R@1 + R@5
        assert best["1"] + best["5"] >= row["recall"]["1"] + row["recall"]["5"] - 1e-9
    after = Reranker.from_pretrained(rr_dir)
    assert float(after.model.alpha.detach()) == pytest.approx(report["alpha"])
    assert after.fingerprint == report["fingerprint"]
    assert (after.fingerprint != before) == (report["scale"] != 1.0)

    # evaluate, with the written re-ranker, measures the figures the calibration reported
    enc = Encoder.from_pretrained(enc_dir)
    got = evaluate(enc, world, "val", baselines=False, progress=False, reranker=after, rerank_k=12)[
        "rerank"
    ]["recall"]
    for key in ("1", "5", "10"):
        assert got[key] == pytest.approx(best[key], abs=1.5 / report["n"]), key

    # errors: a folder with no re-ranker, a split that is not there
    bare = tmp_path / "bare"
    Encoder.from_pretrained("tiny").save_pretrained(bare)
    res = runner.invoke(app, ["calibrate-reranker", "--model", str(bare), "--data", str(world)])
    assert res.exit_code == 2 and "has no re-ranker" in res.output
    res = runner.invoke(
        app,
        ["calibrate-reranker", "--model", str(enc_dir), "--data", str(world), "--split", "nope"],
    )
    assert res.exit_code == 2 and "error:" in res.output
