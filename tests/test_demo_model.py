"""The committed demo model: it loads, it is small, and `cir eval` reproduces its card."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval.data.shapes import ShapesConfig, generate
from retrieval.encoder import Encoder

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "sprc-shapes"
CARD = json.loads((MODEL / "card.json").read_text())


@pytest.fixture(scope="session")
def card_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The card's data recipe (seed, default sizes). `cir demo` keeps the same world in
    data/shapes: reuse it when its meta.json is the card's recipe, else generate it afresh."""
    data = CARD["data"]
    local = ROOT / "data" / "shapes"
    meta_path = local / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if (
            meta.get("seed") == data["seed"]
            and meta.get("generator") == data["generator"]
            and meta.get("sizes_per_split") == data["sizes"]
        ):
            return local
    out = tmp_path_factory.mktemp("shapes-card")
    generate(ShapesConfig(seed=data["seed"]), out, overwrite=True)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["sizes_per_split"] == data["sizes"], (
        "the generator no longer makes the card's world"
    )
    return out


def test_checkpoint_loads_and_is_small() -> None:
    files = {p.name: p.stat().st_size for p in MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.txt", "card.json", "MODEL_CARD.md"} <= set(
        files
    )
    assert sum(files.values()) <= 25 * 1024 * 1024
    enc = Encoder.from_pretrained(MODEL)
    assert enc.fingerprint == CARD["fingerprint"]
    # the second stage: at most 25 MB more, trained on this very first stage
    from retrieval.rerank import Reranker, find_reranker

    folder = find_reranker(MODEL)
    assert folder is not None and "reranker" in CARD
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 25 * 1024 * 1024
    rr = Reranker.from_pretrained(folder)
    rr.check_encoder(enc)
    assert rr.fingerprint == CARD["reranker"]["fingerprint"]
    assert enc.preset == "sprc-small"
    # the tokenizer is the checkpoint's own and knows the world's words
    ids = enc.tokenizer(["make the circle red"]).input_ids[0].tolist()
    assert enc.tokenizer.unk_token_id not in ids


def test_card_metrics_reproduced_by_cir_eval(card_world: Path, tmp_path: Path) -> None:
    out = tmp_path / "test.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cir.cli",
            "eval",
            "--model",
            str(MODEL),
            "--data",
            str(card_world),
            "--split",
            "test",
            "--json",
            str(out),
        ],
        check=True,
        cwd=ROOT,
    )
    got = json.loads(out.read_text())
    want = CARD["eval"]["test"]
    assert got["n"] == want["n"] and got["gallery_size"] == want["gallery_size"]
    for k, v in want["recall"].items():
        assert got["recall"][k] == pytest.approx(v, abs=0.003), k
    for name in ("image_only", "text_only"):
        for k, v in want["baselines"][name]["recall"].items():
            assert got["baselines"][name]["recall"][k] == pytest.approx(v, abs=0.003), (name, k)
    # the committed re-ranker is picked up by default, and its figures are the card's too
    want_rr = CARD["reranker"]["eval"]["test"]["rerank"]
    assert got["rerank"]["k"] == want_rr["k"]
    for k, v in want_rr["recall"].items():
        assert got["rerank"]["recall"][k] == pytest.approx(v, abs=0.003), ("rerank", k)
    assert got["rerank"]["recall"]["1"] > got["recall"]["1"]
    # what the card claims (MODEL_CARD.md): far above text-only, above image-only at R@50
    assert got["recall"]["10"] > got["baselines"]["text_only"]["recall"]["10"] + 0.2
    assert got["recall"]["50"] > got["baselines"]["image_only"]["recall"]["50"] + 0.1
