"""SPRCModel: losses, gradients, the fusion/compose passes against a hand-written reference,
seed determinism, save/load and the fingerprint. Tiny configs, no downloads."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from retrieval.config import get_config
from retrieval.encoder import Encoder, build_model, load_model_weights
from retrieval.modeling_sprc import SPRCModel
from retrieval.tokenization import QFormerTokenizer

CAPTIONS = ["make the circle red", "add a blue star to the left", "remove it", "bigger"]


def _batch(
    cfg_name: str, b: int = 4, seed: int = 0
) -> tuple[SPRCModel, torch.Tensor, torch.Tensor, object]:
    cfg = get_config(cfg_name)
    model = build_model(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    ref = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
    tgt = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
    tok = QFormerTokenizer.builtin(max_length=cfg.max_text_len)(CAPTIONS[:b])
    return model, ref, tgt, tok


def _freeze_vit(model: SPRCModel) -> None:
    """As SPRC: the ViT is frozen, ln_vision (post_layernorm) is trained."""
    for name, p in model.vision_model.named_parameters():
        p.requires_grad = name.startswith("post_layernorm")


# ---------------------------------------------------------------- forward / backward
@pytest.mark.parametrize("preset", ["tiny", "sprc-small"])
def test_forward_backward_losses_and_gradients(preset: str) -> None:
    model, ref, tgt, tok = _batch(preset)
    _freeze_vit(model)
    model.train()
    out = model(ref, tgt, tok.input_ids, tok.attention_mask)
    b = ref.shape[0]
    assert out.logits.shape == (b, b)
    for loss in (out.loss, out.loss_itc, out.loss_rtc, out.loss_align):
        assert loss.shape == () and torch.isfinite(loss)
    expected = out.loss_itc + 0.4 * out.loss_rtc + 0.4 * out.loss_align
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()

    params = dict(model.named_parameters())
    frozen = [n for n in params if n.startswith("vision_model.") and "post_layernorm" not in n]
    assert frozen and all(params[n].grad is None for n in frozen)
    must_train = [
        "vision_model.post_layernorm.weight",  # ln_vision
        "query_tokens",
        "prompt_tokens",
        "temp",
        "vision_projection.weight",
        "text_projection.weight",
        "embeddings.word_embeddings.weight",
        "qformer.layernorm.weight",
        "qformer.encoder.layer.0.attention.attention.query.weight",
        "qformer.encoder.layer.0.crossattention.attention.key.weight",
        "qformer.encoder.layer.0.intermediate_query.dense.weight",  # query FFN
        "qformer.encoder.layer.0.intermediate.dense.weight",  # text FFN
        "qformer.encoder.layer.1.output.dense.weight",
    ]
    for n in must_train:
        grad = params[n].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0, n


def test_shapes_of_every_path() -> None:
    model, ref, tgt, tok = _batch("tiny")
    model.eval()
    cfg = model.config
    with torch.no_grad():
        img = model.image_features(ref)
        assert img.shape == (4, cfg.num_image_tokens, cfg.vision_hidden_size)
        t = model.target_features(img)
        assert t.shape == (4, cfg.num_query_tokens, cfg.embed_dim)
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(4, cfg.num_query_tokens))
        p = model.sentence_prompt(img, tok.input_ids, tok.attention_mask)
        assert p.shape == (4, cfg.num_query_tokens, cfg.qformer_hidden_size)
        for q in (
            model.compose(p, tok.input_ids, tok.attention_mask),
            model.text_features(tok.input_ids, tok.attention_mask),
            model.prompt_text_features(tok.input_ids, tok.attention_mask),
        ):
            assert q.shape == (4, cfg.embed_dim)
            torch.testing.assert_close(q.norm(dim=-1), torch.ones(4))
        sim = model.max_sim(model.compose(p, tok.input_ids, tok.attention_mask), t)
        assert sim.shape == (4, 4)


# ------------------------------------------------------------ hand-written reference
def _mha(
    att: torch.nn.Module, x: torch.Tensor, kv: torch.Tensor, add_mask: torch.Tensor | None
) -> torch.Tensor:
    """BERT attention block from the raw Linear/LayerNorm weights (no transformers code)."""
    a = att.attention
    b, lq, _ = x.shape
    nh, hd = a.num_attention_heads, a.attention_head_size

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, -1, nh, hd).transpose(1, 2)

    q, k, v = heads(a.query(x)), heads(a.key(kv)), heads(a.value(kv))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if add_mask is not None:
        scores = scores + add_mask
    o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, lq, nh * hd)
    return att.output.LayerNorm(att.output.dense(o) + x)


def _ffn(inter: torch.nn.Module, out: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return out.LayerNorm(out.dense(F.gelu(inter.dense(x))) + x)


def _ref_qformer(
    model: SPRCModel,
    embeds: torch.Tensor,
    mask: torch.Tensor | None,
    query_length: int,
    image: torch.Tensor | None,
) -> torch.Tensor:
    """LAVIS/SPRC Q-Former semantics: the first ``query_length`` positions use the query FFN
    and cross-attend to the image (every 2nd layer); the rest use the text FFN."""
    qf = model.qformer
    h = qf.layernorm(embeds)
    add = (
        None if mask is None else (1.0 - mask[:, None, None, :].float()) * torch.finfo(h.dtype).min
    )
    for layer in qf.encoder.layer:
        att = _mha(layer.attention, h, h, add)
        q, t = att[:, :query_length], att[:, query_length:]
        parts = []
        if query_length:
            if layer.has_cross_attention:
                assert image is not None
                q = _mha(layer.crossattention, q, image, None)
            parts.append(_ffn(layer.intermediate_query, layer.output_query, q))
        if t.shape[1]:
            parts.append(_ffn(layer.intermediate, layer.output, t))
        h = torch.cat(parts, dim=1)
    return h


def _ref_embed(model: SPRCModel, ids: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    e = model.embeddings
    x = e.word_embeddings(ids) + e.position_embeddings(torch.arange(ids.shape[1]))[None]
    return x if prefix is None else torch.cat([prefix, x], dim=1)


@torch.no_grad()
def _strong_random(model: SPRCModel, seed: int) -> SPRCModel:
    """Larger random Q-Former weights than LAVIS' std 0.02 init, so that using the wrong FFN
    or a missing cross-attention changes outputs by far more than float noise."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.startswith("vision_model."):
            continue
        if p.ndim == 1 and "LayerNorm" in name or "layernorm" in name:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model.eval()


def _ones(b: int, n: int) -> torch.Tensor:
    return torch.ones(b, n, dtype=torch.long)


@torch.no_grad()
def test_passes_match_reference_computation() -> None:
    model, ref_px, _, tok = _batch("tiny", seed=5)
    _strong_random(model, 5)
    ids, mask = tok.input_ids, tok.attention_mask
    b, q = ids.shape[0], model.config.num_query_tokens
    img = model.image_features(ref_px)
    queries = model.query_tokens.expand(b, -1, -1)

    # target: query-only pass with cross-attention
    ref_t = F.normalize(model.vision_projection(_ref_qformer(model, queries, None, q, img)), dim=-1)
    torch.testing.assert_close(model.target_features(img), ref_t, atol=1e-5, rtol=0)

    # fusion pass: [queries; caption], query part cross-attends, query_length = 32
    fmask = torch.cat([_ones(b, q), mask], 1)
    ref_fusion = _ref_qformer(model, _ref_embed(model, ids, queries), fmask, q, img)[:, :q]
    prompt = model.sentence_prompt(img, ids, mask)
    torch.testing.assert_close(prompt, ref_fusion, atol=1e-5, rtol=0)

    # compose: [prompt; caption], text FFN everywhere, caption [CLS] at position q
    ref_c = _ref_qformer(model, _ref_embed(model, ids, ref_fusion), fmask, 0, None)[:, q]
    ref_c = F.normalize(model.text_projection(ref_c), dim=-1)
    torch.testing.assert_close(model.composed_query(img, ids, mask), ref_c, atol=1e-5, rtol=0)

    # text-only and rtc ([CLS, prompt_tokens, caption...]) paths
    ref_txt = _ref_qformer(model, _ref_embed(model, ids, None), mask, 0, None)[:, 0]
    torch.testing.assert_close(
        model.text_features(ids, mask),
        F.normalize(model.text_projection(ref_txt), dim=-1),
        atol=1e-5,
        rtol=0,
    )
    # SPRC's no_img layout: word embeddings of [CLS] and the caption, the raw prompt tokens in
    # between, then position embeddings 0 .. Q+L-1 over the WHOLE sequence (plain indexing of
    # the model's own weight tables, no embeddings module).
    w = model.embeddings.word_embeddings.weight[ids]  # [B, L, H]
    rtc_in = torch.cat([w[:, :1], model.prompt_tokens.expand(b, -1, -1), w[:, 1:]], 1)
    rtc_in = rtc_in + model.embeddings.position_embeddings.weight[: rtc_in.shape[1]][None]
    rtc_mask = torch.cat([mask[:, :1], _ones(b, q), mask[:, 1:]], 1)
    ref_rtc = _ref_qformer(model, rtc_in, rtc_mask, 0, None)[:, 0]
    rtc = model.prompt_text_features(ids, mask)
    torch.testing.assert_close(
        rtc, F.normalize(model.text_projection(ref_rtc), dim=-1), atol=1e-5, rtol=0
    )
    # The layout that was here before (positions on the caption alone, none on the prompt
    # tokens) is a different model: the test must be able to tell the two apart.
    e = _ref_embed(model, ids, None)
    wrong_in = torch.cat([e[:, :1], model.prompt_tokens.expand(b, -1, -1), e[:, 1:]], 1)
    wrong = F.normalize(
        model.text_projection(_ref_qformer(model, wrong_in, rtc_mask, 0, None)[:, 0]), dim=-1
    )
    assert (rtc - wrong).abs().max() > 1e-2


def test_ln_vision_eps_is_lavis_plain_layernorm() -> None:
    """LAVIS's ln_vision is nn.LayerNorm (eps 1e-5); the EVA blocks keep 1e-6."""
    model = build_model(get_config("tiny"), seed=0)
    assert model.vision_model.post_layernorm.eps == 1e-5
    assert {layer.layer_norm1.eps for layer in model.vision_model.encoder.layers} == {1e-6}
    assert get_config("blip2-vitg").ln_vision_eps == 1e-5


@torch.no_grad()
def test_fusion_pass_depends_on_query_length() -> None:
    """If ``query_length`` were dropped from the fusion pass, transformers would infer it from
    the input length (32 + caption): the caption would go through the query FFN and
    cross-attention. The composed query would change; this pins it down."""
    model, ref_px, _, tok = _batch("tiny", seed=6)
    _strong_random(model, 6)
    ids, mask = tok.input_ids, tok.attention_mask
    b, q = ids.shape[0], model.config.num_query_tokens
    img = model.image_features(ref_px)
    queries = model.query_tokens.expand(b, -1, -1)
    fmask = torch.cat([_ones(b, q), mask], 1)
    image_mask = torch.ones(img.shape[:-1], dtype=torch.long)
    without = model.qformer(
        query_embeds=model.embeddings(input_ids=ids, query_embeds=queries),
        attention_mask=fmask,
        encoder_hidden_states=img,
        encoder_attention_mask=image_mask,
    ).last_hidden_state[:, :q]
    real = model.sentence_prompt(img, ids, mask)
    assert (without - real).abs().max() > 0.1
    cq_without = model.compose(without, ids, mask)
    cq_real = model.composed_query(img, ids, mask)
    assert (cq_without - cq_real).abs().max() > 1e-3  # float noise is ~1e-7
    # and the reference computation with query_length = 32 + L reproduces the wrong variant,
    # so the reference can tell the two apart
    wrong_ref = _ref_qformer(model, _ref_embed(model, ids, queries), fmask, fmask.shape[1], img)[
        :, :q
    ]
    torch.testing.assert_close(without, wrong_ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_padding_does_not_change_queries() -> None:
    """'longest' and SPRC's 'max_length' padding give the same features (padding is masked)."""
    model, ref_px, _, _ = _batch("tiny", seed=7)
    model.eval()
    tk = QFormerTokenizer.builtin(max_length=model.config.max_text_len)
    a, b = tk(CAPTIONS), tk(CAPTIONS, padding="max_length")
    assert b.input_ids.shape[1] == model.config.max_text_len
    img = model.image_features(ref_px)
    torch.testing.assert_close(
        model.composed_query(img, a.input_ids, a.attention_mask),
        model.composed_query(img, b.input_ids, b.attention_mask),
        atol=1e-5,
        rtol=0,
    )


# ----------------------------------------------------------- determinism, save/load
def _images(n: int, size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (size, size + 7 * i, 3), dtype=np.uint8))
        for i in range(n)
    ]


def test_same_seed_same_features() -> None:
    a, b, c = (build_model(get_config("tiny"), seed=s) for s in (0, 0, 1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    e0, e0b, e1 = (Encoder.from_pretrained("tiny", seed=s) for s in (0, 0, 1))
    imgs = _images(3)
    np.testing.assert_array_equal(e0.encode_targets(imgs), e0b.encode_targets(imgs))
    np.testing.assert_array_equal(
        e0.encode_queries(imgs, CAPTIONS[:3]), e0b.encode_queries(imgs, CAPTIONS[:3])
    )
    assert e0.fingerprint == e0b.fingerprint != e1.fingerprint
    assert not np.allclose(e0.encode_targets(imgs), e1.encode_targets(imgs))


def test_save_load_keeps_features_and_fingerprint(tmp_path: Path) -> None:
    enc = Encoder.from_pretrained("tiny", seed=2)
    enc.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {
        "config.json",
        "model.safetensors",
        "vocab.txt",
    }
    loaded = Encoder.from_pretrained(tmp_path / "ckpt")
    assert loaded.fingerprint == enc.fingerprint
    imgs = _images(3)
    np.testing.assert_array_equal(loaded.encode_targets(imgs), enc.encode_targets(imgs))
    np.testing.assert_array_equal(
        loaded.encode_queries(imgs, CAPTIONS[:3]), enc.encode_queries(imgs, CAPTIONS[:3])
    )
    for mode in ("prompt", "plain"):
        np.testing.assert_array_equal(
            loaded.encode_texts(CAPTIONS, mode=mode), enc.encode_texts(CAPTIONS, mode=mode)
        )
    # cached reference features give the same queries
    feats = enc.reference_features(imgs)
    np.testing.assert_allclose(
        enc.encode_queries(None, CAPTIONS[:3], ref_features=feats),
        enc.encode_queries(imgs, CAPTIONS[:3]),
        atol=1e-6,
    )
    # a second save of the loaded model stores identical tensors
    loaded.save_pretrained(tmp_path / "again")
    first, second = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("ckpt", "again"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert Encoder.from_pretrained(tmp_path / "again").fingerprint == enc.fingerprint

    # float16 storage: close features, a different fingerprint (the weights changed)
    enc.save_pretrained(tmp_path / "half", weights_dtype="float16")
    half = Encoder.from_pretrained(tmp_path / "half")
    assert half.fingerprint != enc.fingerprint
    np.testing.assert_allclose(half.encode_targets(imgs), enc.encode_targets(imgs), atol=2e-2)


def test_fingerprint_tracks_weights_config_preprocessing_and_vocab() -> None:
    model = build_model(get_config("tiny"), seed=0)
    tok = QFormerTokenizer.builtin()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base = Encoder(copy.deepcopy(model), tok).fingerprint
    assert Encoder(copy.deepcopy(model), tok).fingerprint == base

    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.qformer.encoder.layer[1].output.dense.weight[0, 0] += 1e-3
    assert Encoder(changed, tok).fingerprint != base

    def with_config(**kw: object) -> str:
        cfg = model.config.replace(**kw)
        return Encoder(
            load_model_weights(cfg, {k: v.clone() for k, v in state.items()}), tok
        ).fingerprint

    assert with_config() == base
    assert with_config(extra={"note": "provenance only"}) == base
    assert with_config(max_text_len=16) != base  # config
    assert with_config(target_pad_ratio=1.5) != base  # preprocessing
    assert with_config(image_mean=(0.5, 0.5, 0.5)) != base  # preprocessing
    other_vocab = QFormerTokenizer({**tok.vocab, "zebra": len(tok.vocab)})
    assert Encoder(copy.deepcopy(model), other_vocab).fingerprint != base


def test_preset_or_folder_is_one_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One rule for Encoder, get_config and the trainer (retrieval.config.parse_model_source):
    explicit schemes first, then an existing folder wins over a preset name, else a preset, else
    a clear error."""
    from retrieval.config import UnknownModelError, parse_model_source
    from retrieval.encoder import Encoder
    from retrieval.model_source import is_untrained_preset

    monkeypatch.chdir(tmp_path)
    assert parse_model_source("tiny").is_preset and parse_model_source("preset:tiny").is_preset
    assert get_config("tiny") == get_config("preset:tiny")
    # a folder named like a preset wins, for every caller; preset: still reaches the preset
    enc = Encoder.from_pretrained("tiny", seed=3)
    assert enc.untrained
    enc.save_pretrained(tmp_path / "tiny")
    src = parse_model_source("tiny")
    assert not src.is_preset and src.ref == "tiny"
    assert not is_untrained_preset("tiny") and is_untrained_preset("preset:tiny")
    loaded = Encoder.from_pretrained("tiny")
    assert not loaded.untrained and loaded.fingerprint == enc.fingerprint
    assert Encoder.from_pretrained("local-dir:tiny").fingerprint == enc.fingerprint
    assert Encoder.from_pretrained("preset:tiny").untrained
    assert get_config("tiny") == get_config("local-dir:tiny") == enc.config
    # neither a path nor a preset: one error type, both a FileNotFoundError and a ValueError
    for bad in ("no-such-model", "preset:no-such-preset", "local-dir:tiny-missing"):
        with pytest.raises(UnknownModelError, match="unknown preset or model folder"):
            parse_model_source(bad)
        assert not is_untrained_preset(bad)
    with pytest.raises(FileNotFoundError):
        Encoder.from_pretrained("no-such-model")
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("no-such-model")


def test_one_precision_vocabulary(tmp_path: Path) -> None:
    """retrieval.precision: one set of names (old spellings as aliases) and one function for
    the Encoder, training and storage; under bf16 the Q-Former side stays float32."""
    from retrieval.precision import canonical_precision, resolve_precision, storage_dtype

    for alias, name in (("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16")):
        assert canonical_precision(alias) == canonical_precision(name) == name
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).dtype == torch.float32
    assert resolve_precision("auto", "cuda").dtype == torch.bfloat16
    # inference: no autocast (weights decide); training: fp32 weights under bf16 autocast
    assert not resolve_precision("bf16", cpu).autocast
    train_bf16 = resolve_precision("bfloat16", cpu, training=True)
    assert train_bf16.autocast and train_bf16.dtype == torch.bfloat16
    assert not resolve_precision("fp32", cpu, training=True).autocast
    with pytest.raises(ValueError, match="training"):
        resolve_precision("fp16", cpu, training=True)
    with pytest.raises(ValueError, match="precision"):
        canonical_precision("fp8")
    assert storage_dtype("fp16") == storage_dtype("float16") == torch.float16
    with pytest.raises(ValueError, match="explicit"):
        storage_dtype("auto")

    fp32 = Encoder.from_pretrained("tiny", dtype="float32")
    bf16 = Encoder.from_pretrained("tiny", dtype="bf16")
    assert fp32.fingerprint == bf16.fingerprint  # same weights, another compute dtype
    m = bf16.model
    assert m.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    for name in SPRCModel._keep_in_fp32_modules:
        part = getattr(m, name)
        tensors = [part] if isinstance(part, torch.nn.Parameter) else list(part.parameters())
        assert tensors and all(t.dtype == torch.float32 for t in tensors), name
    # the kept parts are not rounded through bf16 on the way: the text path is exact
    np.testing.assert_array_equal(
        bf16.encode_texts(["a red circle"]), fp32.encode_texts(["a red circle"])
    )
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    q32 = fp32.encode_queries(imgs, ["a red circle"] * 3)
    q16 = bf16.encode_queries(imgs, ["a red circle"] * 3)
    assert q16.dtype == np.float32 and np.abs(q16 - q32).max() < 0.05
    t16 = bf16.encode_targets(imgs)
    assert t16.shape == fp32.encode_targets(imgs).shape
