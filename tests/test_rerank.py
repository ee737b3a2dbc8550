"""The re-ranker: shapes and invariants of the model, training with exact resume, evaluation
with the first stage beside the re-ranked ranking, the encoder guard, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cir.cli import app
from retrieval.data.shapes import ShapesConfig, generate
from retrieval.encoder import Encoder
from retrieval.evaluate import evaluate, format_table
from retrieval.rerank import (
    DEFAULT_RERANK_K,
    QueryFeatures,
    Reranker,
    RerankerConfig,
    RerankerError,
    RerankerModel,
    load_reranker_for,
)
from retrieval.rerank_train import RerankTrainConfig, RerankTrainer


def _features(b: int, k: int, cfg: RerankerConfig, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    t, f, h = cfg.pair_rows, cfg.pair_dim, cfg.query_dim
    mask = torch.ones(b, 7, dtype=torch.bool)
    mask[0, 5:] = False
    qf = QueryFeatures(
        torch.randn(b, 4, h, generator=g),
        torch.randn(b, 7, h, generator=g),
        mask,
        torch.randn(b, t, f, generator=g),
        torch.randn(b, f, generator=g),
    )
    return qf, torch.randn(b, k, t, f, generator=g), torch.randn(b, k, generator=g)


def _random_head(model: RerankerModel, seed: int = 1) -> RerankerModel:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_untrained_head_keeps_the_first_stage_order() -> None:
    cfg = RerankerConfig(pair_rows=5, pair_dim=8, query_dim=12, width=16, heads=2)
    qf, cand, first = _features(3, 6, cfg)
    scores = RerankerModel(cfg).eval()(qf, cand, first)
    assert scores.shape == (3, 6)
    torch.testing.assert_close(scores, cfg.alpha_init * first)


@torch.no_grad()
def test_a_candidate_is_scored_on_its_own() -> None:
    """No leakage across candidates: a candidate's score does not depend on the others in the
    list, and padding caption tokens (mask False) do not change any score."""
    cfg = RerankerConfig(pair_rows=5, pair_dim=8, query_dim=12, width=16, heads=2)
    model = _random_head(RerankerModel(cfg))
    qf, cand, first = _features(3, 6, cfg, seed=2)
    full = model(qf, cand, first)
    part = model(qf, cand[:, [4, 1]], first[:, [4, 1]])
    torch.testing.assert_close(part, full[:, [4, 1]], atol=1e-5, rtol=0)
    assert (full - cfg.alpha_init * first).abs().max() > 1e-3  # the head is not a no-op
    changed = QueryFeatures(
        qf.prompt, qf.text.clone(), qf.text_mask, qf.reference, qf.query
    )  # scramble row 0's padded caption positions only
    changed.text[0, 5:] = 100.0
    torch.testing.assert_close(model(changed, cand, first), full, atol=1e-5, rtol=0)
    # ... while a real caption token does count
    changed.text[0, 0] = 100.0
    assert (model(changed, cand, first)[0] - full[0]).abs().max() > 1e-4


@torch.no_grad()
def test_block_matches_multihead_attention_and_softmax_attention() -> None:
    """The block's written-out attention (for speed on short rows) is the textbook one: its
    nn.MultiheadAttention called as a module, then softmax cross-attention to the memory."""
    cfg = RerankerConfig(pair_rows=5, pair_dim=8, query_dim=12, width=16, heads=2)
    model = _random_head(RerankerModel(cfg))
    qf, cand, first = _features(3, 6, cfg, seed=3)
    kvs, bias = model.encode_query(qf)
    x = torch.randn(3, 6, cfg.pair_rows + 1, cfg.width)
    blk = model.blocks[0]
    b, k, s, w = x.shape
    h = blk.norm1(x).view(b * k, s, w)
    ref = x + blk.self_attn(h, h, h, need_weights=False)[0].view(b, k, s, w)
    hd = w // cfg.heads
    q = blk.q(blk.norm2(ref)).view(b, k, s, cfg.heads, hd).transpose(2, 3)  # [B,K,h,S,d]
    keys, values = kvs[0]
    att = torch.einsum("bkhsd,bhmd->bkhsm", q, keys) * hd**-0.5 + bias[:, None]
    out = torch.einsum("bkhsm,bhmd->bkhsd", att.softmax(-1), values)
    ref = ref + blk.o(out.transpose(2, 3).reshape(b, k, s, w))
    ref = ref + blk.ffn(blk.norm3(ref))
    torch.testing.assert_close(blk(x, kvs[0], bias), ref, atol=1e-5, rtol=1e-5)
    assert (bias == float("-inf")).any()  # the padded caption rows were masked in both


def test_cpu_bf16_only_for_large_calls() -> None:
    """On a CPU, bf16 autocast starts at CPU_BF16_MIN_CANDIDATES (smaller calls are faster in
    float32): a small call scores exactly as the float32 re-ranker, a large one within bf16."""
    from retrieval.rerank import CPU_BF16_MIN_CANDIDATES

    cfg = RerankerConfig(pair_rows=5, pair_dim=8, query_dim=12, width=16, heads=2)
    model = _random_head(RerankerModel(cfg))
    fp32, bf16 = Reranker(model, bf16=False), Reranker(model, bf16=True)
    assert not bf16.uses_bf16(CPU_BF16_MIN_CANDIDATES - 1)
    assert bf16.uses_bf16(CPU_BF16_MIN_CANDIDATES) and not fp32.uses_bf16(10_000)
    small = _features(2, 6, cfg, seed=4)
    assert torch.equal(bf16.score(*small), fp32.score(*small))
    k = -(-CPU_BF16_MIN_CANDIDATES // 4)  # 4 queries x k candidates >= the threshold
    large = _features(4, k, cfg, seed=5)
    a, b = fp32.score(*large), bf16.score(*large)
    assert not torch.equal(a, b)  # autocast ran
    torch.testing.assert_close(b, a, atol=0.1, rtol=0.05)


def test_save_load_round_trip_and_fingerprint(tmp_path: Path) -> None:
    cfg = RerankerConfig(pair_rows=5, pair_dim=8, query_dim=12, width=16, heads=2, encoder="x")
    rr = Reranker(_random_head(RerankerModel(cfg)))
    rr.save_pretrained(tmp_path / "rr", weights_dtype=torch.float32)
    back = Reranker.from_pretrained(tmp_path / "rr")
    qf, cand, first = _features(2, 4, cfg)
    torch.testing.assert_close(back.score(qf, cand, first), rr.score(qf, cand, first))
    assert back.fingerprint == rr.fingerprint and back.fingerprint.startswith("rerank-targets-")
    (tmp_path / "rr" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RerankerError, match="cannot load"):
        Reranker.from_pretrained(tmp_path / "rr")
    with pytest.raises(RerankerError, match="not a re-ranker folder"):
        Reranker.from_pretrained(tmp_path / "missing")


# ----------------------------------------------------------------------- on a tiny world
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rr-world")
    generate(
        ShapesConfig(
            seed=11,
            train=256,
            val=48,
            test=48,
            test_unseen=16,
            gallery=200,
            image_size=32,
            workers=1,
        ),
        out,
        overwrite=True,
    )
    return out


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny first stage saved as a folder (random weights are fine for the mechanics)."""
    out = tmp_path_factory.mktemp("enc") / "tiny"
    Encoder.from_pretrained("tiny").save_pretrained(out)
    return out


def _cfg(world: Path, enc: Path, out: Path, **kw: object) -> RerankTrainConfig:
    base = dict(
        data=str(world),
        encoder=str(enc),
        out=str(out),
        mine_k=12,
        negatives=5,
        in_batch=3,
        batch_size=16,
        max_steps=8,
        lr=2e-3,
        width=32,
        heads=2,
        save_every=3,
        log_every=1,
        val_every=0,
        val_limit=32,
        val_gallery=0,
        val_rerank_k=10,
        num_threads=1,
    )
    base.update(kw)
    return RerankTrainConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("features", ["targets", "patches"])
def test_resume_is_exact_and_eval_reports_both_stages(
    world: Path, encoder_dir: Path, tmp_path: Path, features: str
) -> None:
    straight = tmp_path / "straight"
    summary = RerankTrainer(_cfg(world, encoder_dir, straight, features=features)).fit(resume=False)
    assert summary["steps"] == 8 and set(summary["val"]) == {"first", "rerank"}
    # alpha fitted on the whole val split at the serving K, recorded beside the weights
    cal = summary["calibration"]
    assert cal["split"] == "val" and cal["n"] == 48 and cal["k"] == DEFAULT_RERANK_K
    saved = json.loads((straight / "model" / "calibration.json").read_text())
    assert saved["alpha"] == pytest.approx(cal["alpha"])
    assert float(Reranker.from_pretrained(straight / "model").model.alpha.detach()) == (
        pytest.approx(cal["alpha"], rel=1e-3)
    )
    resumed = tmp_path / "resumed"
    first = RerankTrainer(_cfg(world, encoder_dir, resumed, features=features))
    assert first.fit(resume=False, until=4)["stopped"] == "interrupted"
    RerankTrainer(_cfg(world, encoder_dir, resumed, features=features)).fit(resume=True)

    def curve(run: Path) -> dict[int, float]:
        rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    a, b = curve(straight), curve(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), step
    ra = Reranker.from_pretrained(straight / "model")
    rb = Reranker.from_pretrained(resumed / "model")
    assert ra.fingerprint == rb.fingerprint and ra.config.features == features

    enc = Encoder.from_pretrained(encoder_dir)
    res = evaluate(enc, world, "test", progress=False, reranker=ra, rerank_k=10)
    rr = res["rerank"]
    assert rr["k"] == 10 and rr["reranker"] == ra.fingerprint
    assert set(rr["recall"]) == set(res["recall"]) and set(rr["by_type"]) == set(res["by_type"])
    assert sum(v["n"] for v in rr["by_type"].values()) == res["n"]
    # Re-ranking only permutes the top-10: R@10 and beyond cannot change.
    assert rr["recall"]["10"] == res["recall"]["10"]
    assert rr["recall"]["50"] == res["recall"]["50"]
    assert "re-rank@10" in format_table(res)


def test_zero_head_reranker_reproduces_first_stage_ranks(world: Path, encoder_dir: Path) -> None:
    enc = Encoder.from_pretrained(encoder_dir)
    cfg = RerankerConfig.for_encoder(enc, "targets", width=16, heads=2)
    res = evaluate(
        enc,
        world,
        "test",
        progress=False,
        baselines=False,
        reranker=Reranker(RerankerModel(cfg)),
        rerank_k=20,
    )
    assert res["rerank"]["recall"] == res["recall"]
    assert res["rerank"]["mean_rank"] == pytest.approx(res["mean_rank"])


def test_training_lowers_the_loss(world: Path, encoder_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(world, encoder_dir, tmp_path / "run", max_steps=60, save_every=0, lr=3e-3)
    RerankTrainer(cfg).fit(resume=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


def test_encoder_guard_and_cli(world: Path, encoder_dir: Path, tmp_path: Path) -> None:
    enc = Encoder.from_pretrained(encoder_dir)
    other = RerankerConfig.for_encoder(enc, "targets", width=16, heads=2)
    other.encoder = "sprc-small-0000000000000000"
    Reranker(RerankerModel(other)).save_pretrained(tmp_path / "wrong")
    with pytest.raises(RerankerError, match="trained on encoder"):
        load_reranker_for(encoder_dir, tmp_path / "wrong", enc)
    assert load_reranker_for(encoder_dir, None, enc) is None  # the folder has none

    runner = CliRunner()
    base = ["eval", "--model", str(encoder_dir), "--data", str(world), "--no-baselines"]
    res = runner.invoke(app, [*base, "--reranker", str(tmp_path / "wrong")])
    assert res.exit_code == 2 and "trained on encoder" in res.output
    res = runner.invoke(app, [*base, "--rerank", "5"])
    assert res.exit_code == 2 and "needs a re-ranker" in res.output

    good = RerankerConfig.for_encoder(enc, "targets", width=16, heads=2)
    Reranker(RerankerModel(good)).save_pretrained(encoder_dir / "reranker")
    try:
        out = tmp_path / "eval.json"
        res = runner.invoke(app, [*base, "--json", str(out)])  # picked up from the folder
        assert res.exit_code == 0, res.output
        assert json.loads(out.read_text())["rerank"]["k"] == DEFAULT_RERANK_K
        res = runner.invoke(app, [*base, "--rerank", "0", "--json", str(out)])
        assert res.exit_code == 0 and "rerank" not in json.loads(out.read_text())
    finally:
        import shutil

        shutil.rmtree(encoder_dir / "reranker")

    bad = runner.invoke(
        app,
        [
            "train-reranker",
            "--data",
            str(world),
            "--encoder",
            str(encoder_dir),
            "--out",
            str(tmp_path / "bad"),
            "--features",
            "pixels",
        ],
    )
    assert bad.exit_code == 2 and "features must be one of" in bad.output
