"""Trainer and evaluator: known-answer ranking, a short run that learns, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.data.shapes import ShapesConfig, generate
from retrieval.encoder import Encoder
from retrieval.evaluate import evaluate, format_table, maxsim_scores, recall_at, target_ranks
from retrieval.train import TrainConfig, Trainer, lr_lambda


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def test_ranking_known_answer() -> None:
    # Gallery of 4 images with 2 token vectors each; query hits image 2's second token best,
    # image 0 (the reference) even better -> the reference is excluded, the target ranks first.
    e = np.eye(4, dtype=np.float32)
    gallery = torch.from_numpy(
        np.stack([[e[0], e[1]], [e[1], e[3]], [e[3], e[2]], [e[3], e[3]]]).astype(np.float32)
    )
    q = _unit(np.array([[1.0, 0.0, 0.9, 0.0], [0.0, 0.0, 0.0, 1.0]], np.float32))
    scores = maxsim_scores(q, gallery)
    assert scores.shape == (2, 4)
    np.testing.assert_allclose(
        scores[0].numpy(), _unit(np.array([1, 0, 0.9, 0]))[[0, 0, 2, 2]] * [1, 0, 1, 0], atol=1e-6
    )
    ranks = target_ranks(scores, target_idx=[2, 3], exclude_idx=[0, -1])
    assert ranks.tolist() == [0, 0]  # query 2: images 1, 2, 3 tie at 1.0 -> ties do not push down
    ranks_no_excl = target_ranks(scores, target_idx=[2, 3], exclude_idx=[-1, -1])
    assert ranks_no_excl.tolist() == [1, 0]  # without exclusion the reference outranks the target
    assert recall_at(np.array([0, 1, 5, 60]), (1, 5, 10, 50)) == {
        "1": 0.25,
        "5": 0.5,
        "10": 0.75,
        "50": 0.75,
    }
    assert lr_lambda(0, 100, 0.1) == pytest.approx(0.1)
    assert lr_lambda(10, 100, 0.1) == pytest.approx(1.0)
    assert lr_lambda(100, 100, 0.1) == pytest.approx(0.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate(
        ShapesConfig(
            seed=3,
            train=768,
            val=64,
            test=64,
            test_unseen=32,
            gallery=300,
            image_size=32,
            workers=1,
        ),
        out,
        overwrite=True,
    )
    return out


def _cfg(world: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(
        data=str(world),
        out=str(out),
        init="tiny",
        batch_size=32,
        lr=2e-3,
        warmup=0.1,
        train_vit=True,
        save_every=3,
        log_every=1,
        validate=False,
        seed=0,
        num_threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_short_training_raises_recall(world: Path, tmp_path: Path) -> None:
    before = evaluate(
        Encoder.from_pretrained("tiny"), world, "val", baselines=False, progress=False
    )
    cfg = _cfg(world, tmp_path / "run", max_steps=60, save_every=0)
    summary = Trainer(cfg).fit(resume=False)
    assert summary["steps"] == 60
    after = evaluate(
        Encoder.from_pretrained(tmp_path / "run" / "model"), world, "val", progress=False
    )
    # A random model is near chance on a ~300-image gallery; a minute of training must help clearly.
    assert after["recall"]["10"] >= before["recall"]["10"] + 0.15, (
        before["recall"],
        after["recall"],
    )
    losses = [
        json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    table = format_table(after)
    assert "image-only baseline" in table and "by type" in table
    assert set(after) >= {"recall", "baselines", "by_type", "n"}
    assert set(after["baselines"]) == {"image_only", "text_only"}
    assert after["n"] == 64 and sum(v["n"] for v in after["by_type"].values()) == 64


def test_resume_continues_same_loss_curve(world: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    Trainer(_cfg(world, straight, max_steps=6)).fit(resume=False)
    resumed = tmp_path / "resumed"
    assert (
        Trainer(_cfg(world, resumed, max_steps=6)).fit(resume=False, until=3)["stopped"]
        == "interrupted"
    )
    Trainer(_cfg(world, resumed, max_steps=6)).fit(resume=True)  # a new process would do the same

    def curve(run: Path) -> dict[int, float]:
        return {
            r["step"]: r["loss"]
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        }

    a, b = curve(straight), curve(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), step
    ea = Encoder.from_pretrained(straight / "model")
    eb = Encoder.from_pretrained(resumed / "model")
    assert ea.fingerprint == eb.fingerprint
