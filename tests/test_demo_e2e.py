"""The demo path end to end, as a new user runs it: `cir demo` on a small synthetic gallery
(generate -> index build with the committed model -> gRPC server + Streamlit UI), then the Python
client finds the known targets at rank 1 as often as the evaluator measures on that gallery,
the page loads in headless Chromium and shows results,
Ctrl-C stops everything, and a second run reuses the index."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from retrieval.data.shapes import ShapesConfig, generate
from retrieval.data.triplets import load_triplets, resolve_path
from server.client import CIRClient
from tests.helpers import CHROMIUM, CHROMIUM_ARGS, free_port

ROOT = Path(__file__).resolve().parents[1]
CARD = json.loads((ROOT / "models" / "sprc-shapes" / "card.json").read_text())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo-world")
    # the demo recipe's seed, a small gallery: the test exercises the path, not the scale
    generate(
        ShapesConfig(seed=0, train=0, val=0, test=60, test_unseen=0, gallery=300),
        out,
        overwrite=True,
    )
    return out


def _wait_for(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        m = re.search(pattern, text)
        if m:
            return m.group(0)
        if proc.poll() is not None:
            raise AssertionError(f"cir demo exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(
        f"no {pattern!r} within {timeout}s:\n{log.read_text(errors='replace')[-3000:]}"
    )


def _start_demo(world: Path, log: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int, int]:
    grpc_port, ui_port = free_port(), free_port()
    cmd = [
        sys.executable,
        "-m",
        "cir.cli",
        "demo",
        "--data",
        str(world),
        "--index",
        f"edge:{world / 'index'}",
        "--grpc-port",
        str(grpc_port),
        "--ui-port",
        str(ui_port),
        *extra,
    ]
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return proc, grpc_port, ui_port


def _stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(
            "cir demo did not stop on Ctrl-C:\n" + log.read_text()[-3000:]
        ) from None
    assert code == 0, log.read_text()[-3000:]
    assert "[demo] stopped" in log.read_text()


class Demo:
    def __init__(self, world: Path, log: Path) -> None:
        self.log = log
        self.proc, grpc_port, ui_port = _start_demo(world, log)
        self.target = f"127.0.0.1:{grpc_port}"
        self.url = f"http://127.0.0.1:{ui_port}/"

    def stop(self) -> None:
        if self.proc.returncode is None:
            _stop(self.proc, self.log)


@pytest.fixture(scope="module")
def demo(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    d = Demo(world, tmp_path_factory.mktemp("demo-log") / "demo.log")
    try:
        _wait_for(d.log, r"search UI\s+http://\S+", d.proc, timeout=600)
        yield d
    finally:
        d.stop()


def test_client_finds_known_targets_at_rank_1(world: Path, demo: Demo) -> None:
    target = demo.target
    assert "indexing 300 gallery images" in demo.log.read_text()
    triplets = load_triplets(world, "test")[:40]
    at_1 = at_10 = 0
    with CIRClient(target, timeout=30) as client:
        assert client.info().index.count == 300  # type: ignore[attr-defined]
        for t in triplets:
            ref = resolve_path(world, t.reference).read_bytes()
            res = client.search(t.caption, reference_image=ref, top_k=11)
            # as in evaluation (and CIRR), the reference itself is not an answer
            ranked = [h.payload.get("gallery_id") for h in res.results]
            ranked = [g for g in ranked if g != t.reference_id][:10]
            at_1 += ranked[0] == t.target_id
            at_10 += t.target_id in ranked
    # thresholds from the model's measured recall on this very gallery and sample: `cir eval`'s
    # evaluator (float32, in process) must agree with the served path, image bytes -> gRPC ->
    # Qdrant Edge, up to near-ties. This 300-image gallery is not easier than the card's 7456:
    # it holds ~3 one-attribute distractors per target (the card's gallery ~1). The server
    # re-ranks the first stage's top DEFAULT_RERANK_K with the model folder's re-ranker by
    # default, so the evaluator's re-ranked recall is the one to agree with.
    from retrieval.encoder import Encoder
    from retrieval.evaluate import evaluate
    from retrieval.rerank import DEFAULT_RERANK_K, load_reranker_for

    model = ROOT / "models" / "sprc-shapes"
    enc = Encoder.from_pretrained(model, device="cpu")
    reranker = load_reranker_for(model, None, enc)
    measured = evaluate(
        enc,
        world,
        "test",
        limit=len(triplets),
        baselines=False,
        progress=False,
        reranker=reranker,
        rerank_k=DEFAULT_RERANK_K if reranker is not None else 0,
    )
    recall = measured["rerank"]["recall"] if reranker is not None else measured["recall"]
    want_1 = round(recall["1"] * len(triplets))
    want_10 = round(recall["10"] * len(triplets))
    assert abs(at_1 - want_1) <= 2, (at_1, recall)
    assert abs(at_10 - want_10) <= 2, (at_10, recall)
    print(f"served: {at_1}/{len(triplets)} at rank 1, {at_10} in the top 10; {recall}")
    # and far above what the reference image alone finds (the card: R@1 16x image-only)
    # "most" at rank 1: the demo model has 25 of these 40 at rank 1 (62.5 %), 33 re-ranked
    assert at_1 > 0.5 * len(triplets) and at_10 >= 0.9 * len(triplets), (at_1, at_10)


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason="run `make setup-browser`")
def test_ui_page_shows_results(demo: Demo) -> None:
    from playwright.sync_api import expect, sync_playwright

    url = demo.url
    (ROOT / "artifacts").mkdir(exist_ok=True)
    expect.set_options(timeout=60_000)  # a busy machine renders slowly (the default is 5 s)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url)
            expect(page.get_by_text("Connected").first).to_be_visible()
            page.locator("[class*='st-key-pick_'] button").first.click()
            expect(page.get_by_text("Current reference: gallery image")).to_be_visible()
            page.get_by_role("textbox", name="Modification text").fill("remove the red cross")
            page.get_by_role("button", name="Search", exact=True).click()
            expect(page.locator(".st-key-card_1 img")).to_be_visible()
            expect(page.get_by_text(re.compile(r"#1 · score -?\d+\.\d{4}"))).to_be_visible()
            page.screenshot(path=str(ROOT / "artifacts" / "demo-e2e.png"), full_page=True)
        finally:
            browser.close()


def test_ctrl_c_stops_all_then_second_run_reuses(world: Path, demo: Demo, tmp_path: Path) -> None:
    demo.stop()  # Ctrl-C: exit code 0, "[demo] stopped", children gone
    with pytest.raises(Exception):  # noqa: B017 - the server is gone: nothing answers there
        CIRClient(demo.target, timeout=2, retries=0).info()
    log = tmp_path / "demo2.log"
    proc, _, _ = _start_demo(world, log, "--no-ui")
    try:
        _wait_for(log, r"gRPC server\s+127\.0\.0\.1:\d+", proc, timeout=180)
    finally:
        _stop(proc, log)
    text = log.read_text()
    assert "reusing index" in text and "generating" not in text and "indexing" not in text


def test_manifest_paths_are_absolute_for_a_relative_data_dir(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `cir demo` defaults to the relative data/shapes; the indexer resolves manifest paths
    # against the manifest's folder, so relative paths would point at data/shapes/data/shapes
    from cir.demo import write_manifest

    monkeypatch.chdir(world.parent)
    manifest = write_manifest(Path(world.name), tmp_path / "manifest.jsonl")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 300
    assert all(Path(r["path"]).is_absolute() and Path(r["path"]).is_file() for r in rows)
