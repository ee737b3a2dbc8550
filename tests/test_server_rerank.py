"""The second stage in the server: SearchRequest.rerank_k re-ranks the first stage's top-K with
the re-ranker exactly as the offline scorer does, keeps both scores, pages past the window in
first-stage order, batches across requests, and guards the re-ranker's encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.rerank import DEFAULT_RERANK_K
from server.app import BackgroundServer, StartupError
from server.client import CIRClient, FailedPreconditionError, InvalidArgumentError
from server.config import load_settings
from tests.helpers import build_gallery

torch = pytest.importorskip("torch")

TEXT = "make it red and add a square"


def _settings(uri: str, **kw: Any) -> Any:
    base: dict[str, Any] = dict(
        index=uri, port=0, metrics_port=0, refresh_interval_s=0, grace_s=2.0, log_format="text"
    )
    base.update(kw)
    return load_settings(None, **base)


def _reranker(encoder: Any, folder: Path, encoder_fp: str | None = None) -> Any:
    from retrieval.rerank import Reranker, RerankerConfig, RerankerModel

    cfg = RerankerConfig.for_encoder(encoder, "targets", width=16, heads=2)
    if encoder_fp is not None:
        cfg.encoder = encoder_fp
    model = RerankerModel(cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a head that reorders: random, large enough to beat alpha * MaxSim
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
        model.alpha.fill_(1.0)
    rr = Reranker(model)
    rr.save_pretrained(folder, weights_dtype=torch.float32)
    return Reranker.from_pretrained(folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from retrieval.encoder import Encoder

    torch.set_num_threads(1)
    enc = Encoder.from_pretrained("tiny")
    root = tmp_path_factory.mktemp("rr-gallery")
    uri, ids = build_gallery(root, enc, 20)
    rr = _reranker(enc, root / "reranker")
    bg = BackgroundServer(_settings(uri, reranker=str(root / "reranker")), encoder=enc)
    bg.start()
    yield {"enc": enc, "ids": ids, "rr": rr, "srv": bg, "root": root, "uri": uri}
    bg.stop()


def _expected(
    world: dict[str, Any], client: CIRClient, ref_id: str, k: int, reranker: Any = None
) -> list[tuple]:
    """The offline computation: the first stage's top-k, re-scored by the same Reranker (or
    by ``reranker``)."""
    from retrieval.rerank import query_features

    first = client.search(TEXT, reference_id=ref_id, top_k=k, rerank_k=0)
    engine = world["srv"].server.service.engine
    recs = {r.id: r for r in engine.index.get([h.id for h in first.results], with_vectors=True)}
    ref = engine.index.get([ref_id], with_vectors=False)[0]
    from PIL import Image

    img = Image.open(world["root"] / "images" / Path(ref.payload["path"]).name).convert("RGB")
    enc = world["enc"]
    qf = query_features(enc, enc.reference_features([img]), [TEXT], "targets")
    cand = torch.stack([torch.from_numpy(recs[h.id].tokens) for h in first.results])[None]
    fs = torch.tensor([[h.score for h in first.results]])
    scores = (reranker or world["rr"]).score(qf, cand, fs)[0].tolist()
    rows = [(h.id, s, h.score) for h, s in zip(first.results, scores, strict=True)]
    return sorted(rows, key=lambda r: -r[1])


def test_rerank_matches_the_offline_scorer_and_keeps_both_scores(world: dict[str, Any]) -> None:
    ref_id = world["ids"][3]
    with CIRClient(world["srv"].target, timeout=30) as c:
        expected = _expected(world, c, ref_id, 8)
        res = c.search(TEXT, reference_id=ref_id, top_k=5, rerank_k=8)
        assert res.rerank_k == 8 and res.reranker_fingerprint == world["rr"].fingerprint
        assert [h.id for h in res.results] == [e[0] for e in expected[:5]]
        assert all(h.reranked for h in res.results)
        for h, e in zip(res.results, expected, strict=False):
            assert h.score == pytest.approx(e[1], abs=1e-4)
            assert h.first_stage_score == pytest.approx(e[2], abs=1e-5)
        assert [h.rank for h in res.results] == [1, 2, 3, 4, 5]
        assert res.timings["rerank_ms"] > 0
        # the order changed somewhere (the test's re-ranker is not the identity)
        first = c.search(TEXT, reference_id=ref_id, top_k=8, rerank_k=0)
        assert [h.id for h in first.results] != [e[0] for e in expected]
        assert all(not h.reranked and h.score == h.first_stage_score for h in first.results)
        assert first.rerank_k == 0 and first.reranker_fingerprint == ""

        # the next page: positions 6..8 re-ranked, 9..10 the first stage's 9th and 10th
        page = c.search(TEXT, reference_id=ref_id, top_k=5, offset=5, rerank_k=8)
        assert [h.reranked for h in page.results] == [True, True, True, False, False]
        assert [h.id for h in page.results[:3]] == [e[0] for e in expected[5:8]]
        ten = c.search(TEXT, reference_id=ref_id, top_k=10, rerank_k=0)
        assert [h.id for h in page.results[3:]] == [h.id for h in ten.results[8:10]]
        assert [h.rank for h in page.results] == [6, 7, 8, 9, 10]

        # the server's default (20 >= the page: all re-ranked) and the batch path
        default = c.search(TEXT, reference_id=ref_id, top_k=8)
        assert default.rerank_k == DEFAULT_RERANK_K and all(h.reranked for h in default.results)
        batch = c.search_batch(
            [
                {"text": TEXT, "reference_id": ref_id, "top_k": 5, "rerank_k": 8},
                {"text": "remove it", "reference_id": world["ids"][0], "top_k": 3, "rerank_k": 4},
            ]
        )
        assert [h.id for h in batch[0].results] == [h.id for h in res.results]
        assert all(h.reranked for h in batch[1].results) and batch[1].rerank_k == 4

        # text-only: nothing to compare a candidate with, so no second stage
        text_only = c.search(TEXT, top_k=3, rerank_k=8)
        assert text_only.rerank_k == 0 and not any(h.reranked for h in text_only.results)

        # Explain explains the score that ordered the results: the re-ranker's. Explain
        # differentiates in float32 while serving runs bf16 autocast where the CPU has it, so
        # its score is the float32 re-ranker's (this test's random head is large, so bf16's
        # rounding moves its score by a few percent)
        from retrieval.rerank import Reranker

        top = res.results[0]
        why = c.explain(TEXT, candidate_id=top.id, reference_id=ref_id)
        fp32 = dict(
            (e[0], e[1])
            for e in _expected(world, c, ref_id, 8, Reranker(world["rr"].model, bf16=False))
        )
        assert why.score == pytest.approx(fp32[top.id], rel=1e-3, abs=1e-3)
        assert top.score == pytest.approx(fp32[top.id], rel=5e-2, abs=5e-2)
        assert abs(why.score - top.first_stage_score) > 1e-3  # not the first stage's MaxSim

        info = c.info()
        assert info.reranker.loaded and info.reranker.fingerprint == world["rr"].fingerprint
        assert info.reranker.features == "targets"
        assert info.reranker.default_rerank_k == DEFAULT_RERANK_K
        assert info.limits.max_rerank_k == 200
        with pytest.raises(InvalidArgumentError, match="rerank_k must be in"):
            c.search(TEXT, reference_id=ref_id, rerank_k=201)


def test_no_reranker_and_wrong_encoder(world: dict[str, Any], tmp_path: Path) -> None:
    shared = {"index": world["srv"].server.service.engine.index}
    bare = BackgroundServer(_settings(world["uri"]), encoder=world["enc"], **shared)
    bare.start()
    try:
        with CIRClient(bare.target, timeout=30) as c:
            assert not c.info().reranker.loaded and c.info().reranker.default_rerank_k == 0
            with pytest.raises(FailedPreconditionError, match="no re-ranker"):
                c.search(TEXT, reference_id=world["ids"][1], rerank_k=5)
            plain = c.search(TEXT, reference_id=world["ids"][1], top_k=3)  # default: off
            assert plain.rerank_k == 0 and not any(h.reranked for h in plain.results)
    finally:
        bare.stop()
    _reranker(world["enc"], tmp_path / "other", encoder_fp="tiny-0123456789abcdef")
    with pytest.raises(StartupError, match="trained on encoder"):
        BackgroundServer(
            _settings(world["uri"], reranker=str(tmp_path / "other")),
            encoder=world["enc"],
            **shared,
        ).start()


def test_patches_reranker_reads_the_indexed_vit_tokens(tmp_path: Path) -> None:
    """A "patches" re-ranker in a model folder: `cir index build` stores every image's ViT tokens
    with its point (the same values the encoder computes), the server serving that folder finds
    the re-ranker by itself and re-ranks with them exactly as offline, clients never see them;
    an index built without them is refused at start-up."""
    from PIL import Image

    from indexer.pipeline import BuildConfig, build
    from retrieval.encoder import Encoder
    from retrieval.index import open_index
    from retrieval.index.api import PATCHES_KEY
    from retrieval.rerank import (
        RERANKER_DIR,
        Reranker,
        RerankerConfig,
        RerankerModel,
        candidate_patches,
        decode_patches,
        query_features,
    )
    from tests.helpers import render_images

    torch.set_num_threads(1)
    folder = tmp_path / "model"
    Encoder.from_pretrained("tiny").save_pretrained(folder)
    enc = Encoder.from_pretrained(folder)
    cfg = RerankerConfig.for_encoder(enc, "patches", width=16, heads=2)
    model = RerankerModel(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
        model.alpha.fill_(1.0)
    Reranker(model).save_pretrained(folder / RERANKER_DIR, weights_dtype=torch.float32)
    rr = Reranker.from_pretrained(folder / RERANKER_DIR)

    images = tmp_path / "images"
    images.mkdir()
    for i, im in enumerate(render_images(16, seed=4)):
        im.save(images / f"img-{i:02d}.png")
    uri = f"edge:{tmp_path / 'index'}"
    build(BuildConfig(source=images, index=uri, model=str(folder), workers=0))
    plain_uri = f"edge:{tmp_path / 'plain'}"
    build(BuildConfig(source=images, index=plain_uri, model=str(folder), workers=0), encoder=enc)

    with open_index(uri, "gallery", read_only=True) as idx:
        recs = idx.get([r.id for r in idx.sample(16, seed=0)], with_payload=True)
        by_path = {Path(r.payload["path"]).name: r for r in recs}
    im0 = Image.open(images / "img-05.png").convert("RGB")
    want = candidate_patches(enc, enc.preprocess([im0]))[0].numpy()
    got = decode_patches(by_path["img-05.png"].payload[PATCHES_KEY], cfg.pair_rows, cfg.pair_dim)
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=1e-2)  # stored as float16

    bg = BackgroundServer(_settings(uri, model=str(folder)))
    bg.start()
    try:
        with CIRClient(bg.target, timeout=30) as c:
            assert c.info().reranker.features == "patches"
            ref_id = by_path["img-05.png"].id
            first = c.search(TEXT, reference_id=ref_id, top_k=6, rerank_k=0)
            engine = bg.server.service.engine
            gets: list[Any] = []
            real_get = engine.index.get

            def counting_get(*a: Any, **k: Any) -> Any:
                gets.append(a)
                return real_get(*a, **k)

            engine.index.get = counting_get
            try:
                res = c.search(TEXT, reference_id=ref_id, top_k=6, rerank_k=6)
                paged = c.search(TEXT, reference_id=ref_id, top_k=2, offset=2, rerank_k=6)
            finally:
                del engine.index.get
            # the reference is looked up by id; the candidates' ViT tokens came with the hits
            assert gets and all(list(a[0]) == [ref_id] for a in gets)
            assert [h.id for h in paged.results] == [h.id for h in res.results[2:4]]
            assert all(
                PATCHES_KEY not in h.payload for h in res.results + first.results + paged.results
            )
            assert sorted(h.id for h in res.results) == sorted(h.id for h in first.results)
            qf = query_features(enc, enc.reference_features([im0]), [TEXT], "patches")
            cand = torch.stack(
                [
                    torch.from_numpy(
                        decode_patches(
                            next(r for r in recs if r.id == h.id).payload[PATCHES_KEY],
                            cfg.pair_rows,
                            cfg.pair_dim,
                        )
                    )
                    for h in first.results
                ]
            )[None]
            scores = rr.score(qf, cand, torch.tensor([[h.score for h in first.results]]))[0]
            order = [first.results[i].id for i in scores.argsort(descending=True).tolist()]
            assert [h.id for h in res.results] == order
            assert all(h.reranked for h in res.results)

            # a warm cache: searches stop reading the candidates' tokens from the index, and
            # a cold one (emptied while the rate is still high) reads its misses in one get
            from server.engine import RERANK_CACHE_WARM, FeatureCache

            for _ in range(30):
                if engine.rerank_hit_rate >= RERANK_CACHE_WARM:
                    break
                c.search(TEXT, reference_id=ref_id, top_k=6, rerank_k=6)
            assert engine.rerank_hit_rate >= RERANK_CACHE_WARM
            assert len(engine.rerank_cache) >= 6 and engine.rerank_cache.nbytes > 0
            payloads: list[Any] = []
            real_search = engine.index.search

            def recording_search(*a: Any, **k: Any) -> Any:
                payloads.append(a[5] if len(a) > 5 else k.get("with_payload"))
                return real_search(*a, **k)

            engine.index.search = recording_search
            engine.index.get = counting_get
            try:
                gets.clear()
                warm = c.search(TEXT, reference_id=ref_id, top_k=6, rerank_k=6)
                # (the reference is still looked up by id: its image, not its tokens)
                cand_gets = [a for a in gets if list(a[0]) != [ref_id]]
                assert payloads == [None] and cand_gets == []  # neither with the hits nor read
                engine.rerank_cache = FeatureCache(1 << 62, 1 << 30)
                cold = c.search(TEXT, reference_id=ref_id, top_k=6, rerank_k=6)
                cand_gets = [a for a in gets if list(a[0]) != [ref_id]]
                assert len(cand_gets) == 1  # the misses, in one call
                assert sorted(cand_gets[0][0]) == sorted(h.id for h in res.results)
            finally:
                del engine.index.search, engine.index.get
            for again in (warm, cold):
                assert [h.id for h in again.results] == [h.id for h in res.results]
                for a, b in zip(again.results, res.results, strict=True):
                    assert a.score == pytest.approx(b.score, abs=1e-5)
    finally:
        bg.stop()

    with open_index(plain_uri, "gallery", read_only=True) as idx:  # built by an injected encoder
        assert all(PATCHES_KEY in r.payload for r in idx.sample(3, seed=0))
    with pytest.raises(StartupError, match="ViT tokens"):
        # the same folder's re-ranker over an index whose points lack them
        bare = tmp_path / "bare"
        build(
            BuildConfig(source=images, index=f"edge:{bare}", model="tiny", allow_untrained=True),
            encoder=enc,
        )
        BackgroundServer(_settings(f"edge:{bare}", model=str(folder))).start()
