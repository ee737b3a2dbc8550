"""retrieval/explain.py on the tiny preset, and the Explain RPC / client / CLI end to end."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.data.shapes import parse_signature, render_scene
from retrieval.encoder import Encoder
from retrieval.explain import (
    CAM_METHODS,
    WORD_METHODS,
    Explainer,
    MaxSimScorer,
    grad_cam,
    overlay_png,
)
from tests.helpers import Gallery, build_shapes_gallery, png, start_server

REF_SIG = "0:red-circle-L|4:blue-square-S"
CAPTION = "add a big green cross in the bottom right"


def scene(sig: str, key: int) -> Image.Image:
    return render_scene(parse_signature(sig), 64, (7, 0, key))


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.from_pretrained("tiny", num_threads=1)


@pytest.fixture(scope="module")
def explainer(encoder: Encoder) -> Explainer:
    return Explainer(encoder)


# ------------------------------------------------------------------------------ the maths
def test_grad_cam_formulas() -> None:
    # [CLS] + 4 patches of 2 channels, as a 2x2 grid
    a = torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 2.0], [-1.0, 1.0], [3.0, -1.0]])
    g = torch.tensor([[5.0, 5.0], [2.0, 0.0], [0.0, -1.0], [1.0, 1.0], [1.0, 0.0]])
    hires = grad_cam(a, g, 2, 2, "hirescam")  # per token: relu(sum_c a*g), [CLS] ignored
    np.testing.assert_allclose(hires, [[2.0, 0.0], [0.0, 3.0]])
    classic = grad_cam(a, g, 2, 2, "gradcam")  # w = mean patch grads = (1, 0)
    np.testing.assert_allclose(classic, [[1.0, 0.0], [0.0, 3.0]])
    with pytest.raises(ValueError, match="cam method"):
        grad_cam(a, g, 2, 2, "nope")
    # contrast: |sum_c (a - b) * g| against the other image's tokens b
    b = a.clone()
    b[1] = torch.tensor([0.0, 0.0])  # patch 0: (1, 0) . (2, 0) = 2
    b[4] = torch.tensor([5.0, -1.0])  # patch 3: (-2, 0) . (1, 0) = -2 -> 2
    np.testing.assert_allclose(
        grad_cam(a, g, 2, 2, "contrast", baseline=b), [[2.0, 0.0], [0.0, 2.0]]
    )
    np.testing.assert_allclose(
        grad_cam(a, g, 2, 2, "contrast", baseline=b, signed=True), [[2.0, 0.0], [0.0, -2.0]]
    )
    np.testing.assert_allclose(grad_cam(a, g, 2, 2, "contrast", baseline=a), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="baseline"):
        grad_cam(a, g, 2, 2, "contrast")


def test_maps_have_the_patch_grid_and_the_score_is_maxsim(
    encoder: Encoder, explainer: Explainer
) -> None:
    ref = scene(REF_SIG, 1)
    cand = scene(REF_SIG + "|8:green-cross-L", 2)
    e = explainer.explain(ref, CAPTION, cand)
    side = encoder.config.image_size // encoder.config.patch_size  # tiny: 32 / 8 = 4
    for m in (e.candidate_map, e.reference_map, e.attention_map):
        assert m is not None and m.shape == (side, side) and m.dtype == np.float32
        assert (m >= 0).all()
    methods = [*CAM_METHODS, "contrast_signed"]
    assert set(e.variants) == {f"{w}/{c}" for w in ("candidate", "reference") for c in methods}
    np.testing.assert_allclose(
        e.variants["candidate/contrast"], np.abs(e.variants["candidate/contrast_signed"])
    )
    np.testing.assert_array_equal(e.candidate_map, e.variants["candidate/contrast"])
    np.testing.assert_array_equal(e.reference_map, e.variants["reference/contrast"])
    # the explained score is exactly what Search ranks by
    q = encoder.encode_queries([ref], [CAPTION])[0]
    t = encoder.encode_targets([cand])[0]
    assert e.score == pytest.approx(float((t @ q).max()), abs=1e-5)
    assert e.winning_query == int((t @ q).argmax())
    # attention: a probability row over the patches of the winning query (and [CLS])
    assert 0.0 < float(e.attention_map.sum()) <= 1.0 + 1e-5  # type: ignore[union-attr]


def test_grad_cam_changes_when_the_candidate_changes(explainer: Explainer) -> None:
    ref = scene(REF_SIG, 1)
    a = explainer.explain(ref, CAPTION, scene(REF_SIG + "|8:green-cross-L", 2))
    b = explainer.explain(ref, CAPTION, scene("2:yellow-triangle-L|6:black-square-S", 3))
    assert a.candidate_map.max() > 0 or b.candidate_map.max() > 0
    assert not np.allclose(a.candidate_map, b.candidate_map)
    # the reference is the same, but what the query takes from it depends on the candidate
    assert not np.allclose(a.reference_map, b.reference_map)


def test_words_align_with_wordpieces(encoder: Encoder, explainer: Explainer) -> None:
    text = "Make the turquoise disc ENORMOUS, please"
    e = explainer.explain(scene(REF_SIG, 1), text, scene(REF_SIG, 5))
    assert [w.word for w in e.words] == ["make", "the", "turquoise", "disc", "enormous", ","] + [
        "please"
    ]
    pieces = encoder.tokenizer.tokenize("make the turquoise disc enormous, please")
    assert e.tokens == pieces and len(e.token_scores) == len(pieces)
    assert len(pieces) > len(e.words)  # some words are several WordPieces here
    # each word's score is the sum of its pieces' scores, in order
    i = 0
    for w in e.words:
        n = len(encoder.tokenizer.tokenize(w.word))
        assert w.score == pytest.approx(float(e.token_scores[i : i + n].sum()), abs=1e-6)
        i += n
    assert i == len(pieces)
    assert any(abs(w.score) > 0 for w in e.words)


def test_word_attribution_is_gradient_x_input(encoder: Encoder, explainer: Explainer) -> None:
    """First-order check: scaling one word's embedding by (1 + eps) changes the score by about
    eps * its attribution (the attribution is d score / d e . e)."""
    ref, cand = scene(REF_SIG, 1), scene(REF_SIG + "|8:green-cross-L", 2)
    e = Explainer(encoder, words="input").explain(ref, CAPTION, cand)
    target = 4  # "cross": one WordPiece, token position 5 after [CLS]
    assert e.words[target].word == "cross" and e.tokens[target] == "cross"
    eps = 1e-3
    emb = encoder.model.embeddings.word_embeddings

    def scaled(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, target + 1] *= 1.0 + eps
        return out

    px = explainer.pixels([ref, cand])
    base = explainer.score(px[:1], [CAPTION], px[1:])[0]
    handle = emb.register_forward_hook(scaled)
    try:
        bumped = explainer.score(px[:1], [CAPTION], px[1:])[0]
    finally:
        handle.remove()
    assert (bumped - base) / eps == pytest.approx(e.words[target].score, rel=0.05, abs=1e-4)


def test_contrast_map_is_zero_where_the_images_agree(explainer: Explainer) -> None:
    """Against itself there is no difference to explain; against the reference the candidate
    map of an added object is non-zero."""
    ref = scene(REF_SIG, 1)
    same = explainer.explain(ref, CAPTION, ref)
    np.testing.assert_allclose(same.variants["candidate/contrast"], 0.0, atol=1e-6)
    np.testing.assert_allclose(same.variants["reference/contrast"], 0.0, atol=1e-6)
    e = explainer.explain(ref, CAPTION, scene(REF_SIG + "|8:green-cross-L", 2))
    assert set(e.word_variants) == {explainer.words_method}


def test_every_word_method_on_request(encoder: Encoder) -> None:
    ex = Explainer(encoder, all_words=True)
    e = ex.explain(scene(REF_SIG, 1), CAPTION, scene(REF_SIG + "|8:green-cross-L", 2))
    assert set(e.word_variants) == set(WORD_METHODS)
    for m in WORD_METHODS:
        assert [w.word for w in e.word_variants[m]] == [w.word for w in e.words]


def test_contrast_and_occlusion_words_are_margins_over_the_reference(encoder: Encoder) -> None:
    """``contrast`` = grad x input of S(ref, t, cand) - S(ref, t, ref), so the reference as
    its own candidate has nothing to attribute; ``occlusion`` = that margin minus the margin
    with the word's pieces as [MASK], recomputed here by hand."""
    ref, cand = scene(REF_SIG, 1), scene(REF_SIG + "|8:green-cross-L", 2)
    for method in ("contrast", "occlusion"):
        ex = Explainer(encoder, words=method)
        same = ex.explain(ref, CAPTION, ref)
        np.testing.assert_allclose([w.score for w in same.words], 0.0, atol=1e-5)
    ex = Explainer(encoder, words="occlusion")
    e = ex.explain(ref, CAPTION, cand)
    tok = encoder.tokenizer([CAPTION])
    px = ex.pixels([ref, cand])
    scorer = ex.maxsim

    def margin(ids: torch.Tensor) -> float:
        with torch.inference_mode():
            s = scorer.score_pixels(
                torch.cat([px[:1], px[:1]]), ids.repeat(2, 1), tok.attention_mask.repeat(2, 1),
                px,
            )  # fmt: skip
        return float(s[1] - s[0])  # rows: (ref, ref), (ref, cand)

    full = margin(tok.input_ids)
    target = 4  # "cross": token position 5 after [CLS]
    assert e.words[target].word == "cross"
    masked = tok.input_ids.clone()
    masked[0, target + 1] = encoder.tokenizer.mask_token_id
    assert e.words[target].score == pytest.approx(full - margin(masked), abs=1e-5)
    assert any(abs(w.score) > 1e-6 for w in e.words)


def test_word_baselines_differ_by_the_baseline_term(encoder: Encoder, explainer: Explainer) -> None:
    """grad x (e - b) = grad x e - grad . b: the words' scores of two baselines differ by the
    gradient's dot product with the baseline embedding, which is what separates them."""
    ref, cand = scene(REF_SIG, 1), scene(REF_SIG + "|8:green-cross-L", 2)
    e = Explainer(encoder, words="input", all_words=True).explain(ref, CAPTION, cand)
    plain = np.array([w.score for w in e.word_variants["input"]])
    mask = np.array([w.score for w in e.word_variants["mask"]])
    assert plain.shape == mask.shape and not np.allclose(plain, mask)
    np.testing.assert_allclose([w.score for w in e.words], plain)  # asked for: input
    with pytest.raises(ValueError, match="words must be"):
        Explainer(encoder, words="nope")
    by_mask = Explainer(encoder, words="mask").explain(ref, CAPTION, cand)
    np.testing.assert_allclose([w.score for w in by_mask.words], mask, rtol=1e-4, atol=1e-6)


def test_batch_equals_single(explainer: Explainer) -> None:
    refs = [scene(REF_SIG, 1), scene("3:purple-triangle-S", 2)]
    cands = [scene(REF_SIG + "|8:green-cross-L", 3), scene("3:purple-triangle-L", 4)]
    texts = [CAPTION, "make the triangle bigger"]
    batch = explainer.explain_batch(explainer.pixels(refs), texts, explainer.pixels(cands))
    for r, t, c, b in zip(refs, texts, cands, batch, strict=True):
        one = explainer.explain(r, t, c)
        assert one.score == pytest.approx(b.score, abs=1e-5)
        np.testing.assert_allclose(one.candidate_map, b.candidate_map, atol=1e-6)
        np.testing.assert_allclose(one.reference_map, b.reference_map, atol=1e-6)
        np.testing.assert_allclose(one.token_scores, b.token_scores, atol=1e-6)


class ConcatScorer:
    """A plug-in scorer that runs the reference and the candidate through the ViT in ONE
    batch (as a re-ranker might): the explainer must still find each image's tokens."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def score_pixels(
        self, ref_pixels: Any, input_ids: Any, attention_mask: Any, cand_pixels: Any
    ) -> Any:
        m, n = self.model, ref_pixels.shape[0]
        feats = m.image_features(torch.cat([ref_pixels, cand_pixels]))
        q = m.composed_query(feats[:n], input_ids, attention_mask)
        t = m.target_features(feats[n:])
        return torch.einsum("bd,bqd->bq", q, t).amax(-1)


def test_a_plugged_scorer_is_explained_through_the_same_hooks(
    encoder: Encoder, explainer: Explainer
) -> None:
    ref, cand = scene(REF_SIG, 1), scene(REF_SIG + "|8:green-cross-L", 2)
    own = explainer.explain(ref, CAPTION, cand)
    plugged = Explainer(encoder, scorer=ConcatScorer(encoder.model)).explain(ref, CAPTION, cand)
    assert plugged.score == pytest.approx(own.score, abs=1e-5)
    np.testing.assert_allclose(plugged.candidate_map, own.candidate_map, atol=1e-5)
    np.testing.assert_allclose(plugged.reference_map, own.reference_map, atol=1e-5)
    np.testing.assert_allclose(plugged.token_scores, own.token_scores, atol=1e-5)
    # the attention map still explains the first-stage MaxSim match
    np.testing.assert_allclose(plugged.attention_map, own.attention_map, atol=1e-6)  # type: ignore[arg-type]
    assert isinstance(MaxSimScorer(encoder.model), type(explainer.maxsim))


def test_a_scorer_that_skips_the_vit_is_refused(encoder: Encoder) -> None:
    class TextOnly:
        def score_pixels(self, ref: Any, ids: Any, mask: Any, cand: Any) -> Any:
            return encoder.model.text_features(ids, mask).sum(-1)

    ex = Explainer(encoder, scorer=TextOnly())
    with pytest.raises(RuntimeError, match="vision_model"):
        ex.explain(scene(REF_SIG, 1), CAPTION, scene(REF_SIG, 2))
    with pytest.raises(ValueError, match="empty"):
        ex.explain(scene(REF_SIG, 1), "  ", scene(REF_SIG, 2))
    with pytest.raises(ValueError, match="cam"):
        Explainer(encoder, cam="nope")


def test_overlay_png(explainer: Explainer) -> None:
    img = scene(REF_SIG, 1)
    values = np.zeros((4, 4), np.float32)
    values[0, 3] = 1.0  # top right hot
    out = Image.open(io.BytesIO(explainer.overlay_png(img, values)))
    assert out.format == "PNG" and out.size == (224, 224)
    cold = np.asarray(Image.open(io.BytesIO(explainer.overlay_png(img, np.zeros((4, 4))))))
    view = np.asarray(explainer.view(img).resize((224, 224), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(cold, view)  # an all-zero map leaves the image as it is
    hot = np.asarray(out).astype(int)
    assert np.abs(hot[20, 200] - view[20, 200]).sum() > 60  # the hot patch is tinted
    np.testing.assert_array_equal(hot[200, 20], view[200, 20])  # a cold patch is not
    with pytest.raises(ValueError, match="rows, cols"):
        overlay_png(img, np.zeros(16))


# ------------------------------------------------------------------------------ gRPC
@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Gallery:
    return build_shapes_gallery(tmp_path_factory.mktemp("explain-gallery"), n=8)


@pytest.fixture(scope="module")
def server(gallery: Gallery) -> Iterator[Any]:
    srv = start_server(gallery, api_keys=["k-explain"])
    yield srv
    srv.stop()


@pytest.fixture
def client(server: Any) -> Iterator[Any]:
    from server.client import CIRClient

    with CIRClient(server.target, api_key="k-explain", retries=0, timeout=60) as c:
        yield c


def test_explain_round_trip(client: Any, gallery: Gallery) -> None:
    ref_id, cand_id = gallery.ids[0], gallery.ids[5]
    res = client.explain("make it a green square", cand_id, reference_id=ref_id)
    for h in (res.candidate_map, res.reference_map):
        assert (h.rows, h.cols) == (4, 4) and h.values.shape == (4, 4)
        assert (h.values >= 0).all()
        assert Image.open(io.BytesIO(h.png)).size == (224, 224)
    assert [w.word for w in res.words] == ["make", "it", "a", "green", "square"]
    # the explained score is the score Search gave that candidate
    hits = client.search("make it a green square", reference_id=ref_id, top_k=8).results
    assert res.score == pytest.approx(next(h.score for h in hits if h.id == cand_id), abs=1e-4)
    # a reference sent as bytes gives the same explanation as its gallery id
    data = (gallery.image_dir / f"{gallery.user_ids[0]}.png").read_bytes()
    by_bytes = client.explain("make it a green square", cand_id, reference_image=data)
    assert by_bytes.score == pytest.approx(res.score, abs=1e-5)
    np.testing.assert_allclose(by_bytes.candidate_map.values, res.candidate_map.values, atol=1e-5)


def test_explain_errors(client: Any, server: Any, gallery: Gallery) -> None:
    from server._generated.cir.v1 import search_pb2 as pb
    from server.client import CIRClient, InvalidArgumentError, NotFoundError, UnauthenticatedError

    ref = gallery.ids[0]
    with pytest.raises(NotFoundError, match="candidate_id"):
        client.explain("make it red", "no-such-image", reference_id=ref)
    with pytest.raises(NotFoundError, match="reference_id"):
        client.explain("make it red", gallery.ids[1], reference_id="no-such-image")
    with pytest.raises(InvalidArgumentError, match="text is empty"):
        client.explain("   ", gallery.ids[1], reference_id=ref)
    with pytest.raises(InvalidArgumentError, match="text is"):
        client.explain("x" * 100_000, gallery.ids[1], reference_id=ref)
    with pytest.raises(InvalidArgumentError, match="candidate_id is empty"):
        client.explain("make it red", "", reference_id=ref)
    with pytest.raises(InvalidArgumentError, match="reference_image"):
        client.explain("make it red", gallery.ids[1], reference_image=b"not an image")
    with pytest.raises(InvalidArgumentError, match="reference"):  # refused before sending
        client.explain("make it red", gallery.ids[1])
    # ... and by the server too, for clients that send no reference
    with pytest.raises(grpc.RpcError) as info:
        client._stub.Explain(
            pb.ExplainRequest(text="make it red", candidate_id=gallery.ids[1]),
            metadata=(("x-api-key", "k-explain"),),
            timeout=30,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reference is required" in (info.value.details() or "")
    with (
        CIRClient(server.target, retries=0) as anonymous,
        pytest.raises(UnauthenticatedError),
    ):
        anonymous.explain("make it red", gallery.ids[1], reference_id=ref)


def test_cir_explain_cli(server: Any, gallery: Gallery, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cir.cli import app

    runner = CliRunner()
    base = ["explain", "--server", server.target, "--api-key", "k-explain"]
    out = tmp_path / "why"
    res = runner.invoke(
        app,
        [*base, "--id", gallery.ids[0], "--text", "make it green", "--candidate", gallery.ids[2]]
        + ["--out", str(out)],
    )
    assert res.exit_code == 0, res.output
    for name in ("candidate_map.png", "reference_map.png"):
        assert Image.open(out / name).format == "PNG"
    assert "green" in res.output and "score" in res.output
    ref_file = tmp_path / "ref.png"
    ref_file.write_bytes(png(Image.open(gallery.image_dir / f"{gallery.user_ids[0]}.png")))
    res = runner.invoke(
        app,
        [*base, "--image", str(ref_file), "--text", "make it green", "--candidate"]
        + [gallery.ids[2], "--out", str(out), "--json"],
    )
    assert res.exit_code == 0, res.output
    assert '"words"' in res.output
    # bad input: a clear one-line error, exit 2, nothing written
    empty = tmp_path / "empty"
    for args in (
        [*base, "--text", "x", "--candidate", gallery.ids[2]],  # no reference
        [*base, "--id", gallery.ids[0], "--text", "  ", "--candidate", gallery.ids[2]],
        [*base, "--image", str(tmp_path / "missing.png"), "--text", "x", "--candidate", "a"],
    ):
        res = runner.invoke(app, [*args, "--out", str(empty)])
        assert res.exit_code == 2, res.output
        assert not empty.exists()
    res = runner.invoke(
        app,
        [*base, "--id", gallery.ids[0], "--text", "x", "--candidate", "nope", "--out", str(empty)],
    )
    assert res.exit_code == 1 and "NOT_FOUND" in res.output


def test_explain_admission_and_deadline(server: Any, gallery: Gallery) -> None:
    from server.client import CIRClient, DeadlineExceededError, ResourceExhaustedError

    service = server.server.service
    with CIRClient(server.target, api_key="k-explain", retries=0, timeout=60) as c:
        # as Search: a full queue answers RESOURCE_EXHAUSTED with a retry-after hint
        service._explains_pending = service.settings.queue_size
        try:
            with pytest.raises(ResourceExhaustedError) as info:
                c.explain("make it red", gallery.ids[1], reference_id=gallery.ids[0])
            assert info.value.retry_after_ms is not None
        finally:
            service._explains_pending = 0
        with pytest.raises(DeadlineExceededError):
            c.explain("make it red", gallery.ids[1], reference_id=gallery.ids[0], timeout=1e-3)
        # and the server still answers afterwards
        assert c.explain("make it red", gallery.ids[1], reference_id=gallery.ids[0]).words


def test_faithfulness_benchmark_runs_and_reports_chance(tmp_path: Path) -> None:
    """benchmarks/explain.py end to end at toy size: a small shapes world, the tiny preset."""
    import json
    import subprocess
    import sys

    from retrieval.data.shapes import ShapesConfig, generate

    root = Path(__file__).resolve().parents[1]
    world = tmp_path / "world"
    generate(
        ShapesConfig(seed=3, train=0, val=0, test=40, test_unseen=0, gallery=0, workers=1), world
    )
    out = tmp_path / "explain.json"
    res = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "explain.py"), "--model", "tiny"]
        + ["--data", str(world), "--limit", "14", "--batch", "5", "--latency-reps", "2"]
        + ["--threads", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["triplets"] == 14
    assert set(doc["pointing"]) == {"gradcam", "hirescam", "contrast", "attention"}
    assert 0.0 <= doc["pointing"]["contrast"]["all"] <= 1.0
    assert doc["default_cam"] == "contrast" and doc["score"] == "MaxSim"  # a preset: no re-ranker
    assert set(doc["words_by_method"]) == set(WORD_METHODS)
    assert doc["default_words"] == "occlusion"
    assert doc["pointing_chance_cell"] == pytest.approx(1 / 9)
    assert 0.2 <= doc["pointing_chance_object"] <= 1.0
    assert sum(doc["deletion_n"].values()) > 0 and 0.0 <= doc["words_chance"] <= 1.0
    assert doc["latency_p50_ms"] > 0
    for needle in ("chance: pointing 1/9", "| hirescam |", "deletion", "words", "latency p50"):
        assert needle in res.stdout
