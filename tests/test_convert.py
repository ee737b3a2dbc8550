"""Converters: transformers BLIP-2 parity, LAVIS/SPRC round trip, strict key errors, CLI.

Everything is built here from tiny configs; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from retrieval import convert
from retrieval.config import PRESETS, get_config
from retrieval.convert import (
    HF_DROPPED_KEYS,
    LAVIS_DROPPED_KEYS,
    ConversionError,
    convert_blip2_hf,
    convert_sprc_lavis,
    lavis_key_to_ours,
    lavis_to_ours,
    ours_key_to_lavis,
    ours_to_lavis,
    read_hf_vocab,
)
from retrieval.encoder import Encoder, build_model
from retrieval.modeling_sprc import SPRCModel
from retrieval.tokenization import QFormerTokenizer

# A small BERT-like vocabulary (no [DEC]: the converter must append it as bos, as LAVIS does).
BASE_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [
    "a",
    "the",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "star",
    "left",
    "right",
    "make",
    "it",
    "bigger",
    "smaller",
    "add",
    "remove",
    "and",
    "with",
    "dog",
    "cat",
    "##s",
    "move",
    "to",
    "of",
    "change",
    "color",
]
VOCAB_SIZE = len(BASE_VOCAB) + 1  # + [DEC]
CAPTIONS = ["make the circle red", "add a blue star to the left and remove the squares"]


def _hf_config(**qformer: object) -> object:
    from transformers import Blip2Config

    q = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=96,
        use_qformer_text_input=True,
    )
    q.update(qformer)
    return Blip2Config(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        qformer_config=q,
        num_query_tokens=32,
        image_text_hidden_size=256,
    )


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: transformers leaves query_tokens at zero and the ViT at std
    1e-10, which would make all 32 query outputs equal and hide mapping bugs."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1 and ("norm" in name.lower()) and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.02 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Blip2ForImageTextRetrieval

    src = tmp_path_factory.mktemp("hf_src")
    torch.manual_seed(0)
    model = Blip2ForImageTextRetrieval(_hf_config()).eval()
    _randomize(model, seed=0)
    model.save_pretrained(src)
    (src / "vocab.txt").write_text("".join(t + "\n" for t in BASE_VOCAB))
    # as the real repo: [DEC] added as bos after the BERT vocabulary
    (src / "added_tokens.json").write_text(json.dumps({"[DEC]": len(BASE_VOCAB)}))
    return src


@pytest.fixture(scope="module")
def hf_model(hf_dir: Path) -> torch.nn.Module:
    from transformers import Blip2ForImageTextRetrieval

    return Blip2ForImageTextRetrieval.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def converted(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Encoder]:
    out = tmp_path_factory.mktemp("hf_out") / "ckpt"
    enc = convert_blip2_hf(hf_dir, out)
    return out, enc


# -------------------------------------------------------------------- blip2-hf parity
def test_blip2_hf_parity_with_transformers(
    converted: tuple[Path, Encoder], hf_model: torch.nn.Module
) -> None:
    out, _ = converted
    enc = Encoder.from_pretrained(out)  # from disk, as users load it
    assert enc.config.name == "blip2-custom"
    assert len(enc.tokenizer) == VOCAB_SIZE and enc.tokenizer.bos_token_id == len(BASE_VOCAB)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tok = enc.tokenizer(CAPTIONS)
    assert (tok.input_ids != enc.tokenizer.unk_token_id).all()
    assert (tok.attention_mask == 0).any()  # padding exercised

    with torch.no_grad():
        ref = hf_model(
            pixel_values=pixels,
            input_ids=tok.input_ids,
            attention_mask=tok.attention_mask,
            use_image_text_matching_head=False,
        )
        ours_img = torch.from_numpy(enc.encode_target_pixels(pixels))
        ours_txt = enc.model.text_features(tok.input_ids, tok.attention_mask)
    assert ours_img.shape == ref.image_embeds.shape == (2, 32, 256)
    torch.testing.assert_close(ours_img, ref.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_txt, ref.text_embeds, atol=1e-5, rtol=0)
    # the 32 query outputs differ (random query_tokens): a permuted mapping would show
    assert (ours_img[:, 0] - ours_img[:, 1]).abs().max() > 1e-3


def test_blip2_hf_fusion_pass_matches_transformers_itm_path(
    converted: tuple[Path, Encoder], hf_model: torch.nn.Module
) -> None:
    """Our fusion pass (queries + text, cross-attention, query_length=32) is transformers' ITM
    pass: itm_head over our sentence prompt reproduces its logits."""
    _, enc = converted
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tok = enc.tokenizer(CAPTIONS)
    with torch.no_grad():
        ref = hf_model(
            pixel_values=pixels,
            input_ids=tok.input_ids,
            attention_mask=tok.attention_mask,
            use_image_text_matching_head=True,
        )
        img = enc.model.image_features(pixels)
        prompt = enc.model.sentence_prompt(img, tok.input_ids, tok.attention_mask)
        logits = hf_model.itm_head(prompt).mean(dim=1)
    torch.testing.assert_close(logits, ref.logits_per_image, atol=1e-5, rtol=0)


def test_blip2_hf_extras_and_fingerprint(converted: tuple[Path, Encoder]) -> None:
    out, enc = converted
    loaded = Encoder.from_pretrained(out)
    assert loaded.fingerprint == enc.fingerprint
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["extra"]["converter"] == "blip2-hf"
    assert cfg["extra"]["dropped"] == ["itm_head.bias", "itm_head.weight"]
    assert float(loaded.model.temp.detach()) == pytest.approx(0.07)
    prompt = loaded.model.prompt_tokens
    assert prompt.shape == (1, 32, 64) and 0.01 < float(prompt.detach().std()) < 0.03
    assert (out / "vocab.txt").read_text().splitlines()[-1] == "[DEC]"


def test_blip2_hf_prompt_tokens_follow_seed(hf_dir: Path, tmp_path: Path) -> None:
    a = convert_blip2_hf(hf_dir, tmp_path / "a", seed=0)
    b = convert_blip2_hf(hf_dir, tmp_path / "b", seed=1)
    c = convert_blip2_hf(hf_dir, tmp_path / "c", seed=0)
    assert torch.equal(a.model.prompt_tokens, c.model.prompt_tokens)
    assert not torch.equal(a.model.prompt_tokens, b.model.prompt_tokens)
    assert a.fingerprint == c.fingerprint != b.fingerprint


def test_blip2_hf_sharded_and_float16(hf_dir: Path, tmp_path: Path) -> None:
    from transformers import Blip2ForImageTextRetrieval

    sharded = tmp_path / "sharded"
    Blip2ForImageTextRetrieval.from_pretrained(hf_dir).save_pretrained(
        sharded, max_shard_size="100KB"
    )
    assert (sharded / "model.safetensors.index.json").is_file()
    for name in ("vocab.txt", "added_tokens.json"):
        (sharded / name).write_text((hf_dir / name).read_text())
    a = convert_blip2_hf(hf_dir, tmp_path / "a")
    b = convert_blip2_hf(sharded, tmp_path / "b")
    assert a.fingerprint == b.fingerprint

    binary = _copy_src(hf_dir, tmp_path / "bin")
    torch.save(load_file(str(binary / "model.safetensors")), binary / "pytorch_model.bin")
    (binary / "model.safetensors").unlink()
    assert convert_blip2_hf(binary, tmp_path / "c").fingerprint == a.fingerprint

    half = convert_blip2_hf(hf_dir, tmp_path / "half", dtype="float16")
    stored = load_file(str(tmp_path / "half" / "model.safetensors"))
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.float16}
    assert half.fingerprint != a.fingerprint
    enc = Encoder.from_pretrained(tmp_path / "half", dtype="float32")
    assert enc.model.vision_projection.weight.dtype == torch.float32


def test_blip2_hf_vitg_config_is_named_after_the_preset() -> None:
    from transformers import Blip2Config

    hf = Blip2Config(
        qformer_config=dict(vocab_size=30523, use_qformer_text_input=True),
        num_query_tokens=32,
        image_text_hidden_size=256,
    ).to_dict()
    hf["architectures"] = ["Blip2ForImageTextRetrieval"]
    cfg = convert.config_from_hf(hf)
    preset = PRESETS["blip2-vitg"]
    assert cfg.name == "blip2-vitg"
    for field in ("vision_num_layers", "vision_hidden_size", "qformer_hidden_size", "vocab_size"):
        assert getattr(cfg, field) == getattr(preset, field)
    # a BLIP-2 captioning checkpoint has no text feed-forward: refused with a reason
    hf["qformer_config"]["use_qformer_text_input"] = False
    with pytest.raises(ConversionError, match="use_qformer_text_input"):
        convert.config_from_hf(hf)
    hf["architectures"] = ["Blip2ForConditionalGeneration"]
    with pytest.raises(ConversionError, match="Blip2ForImageTextRetrieval"):
        convert.config_from_hf(hf)


def _copy_src(hf_dir: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in hf_dir.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_blip2_hf_unexpected_and_missing_keys_are_named(hf_dir: Path, tmp_path: Path) -> None:
    src = _copy_src(hf_dir, tmp_path / "extra")
    state = load_file(str(src / "model.safetensors"))
    state["qformer.encoder.layer.0.attention.attention.rotary.weight"] = torch.zeros(2)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        ConversionError, match=r"qformer\.encoder\.layer\.0\.attention\.attention\.rotary"
    ):
        convert_blip2_hf(src, tmp_path / "out1")
    assert not (tmp_path / "out1" / "model.safetensors").exists()

    src = _copy_src(hf_dir, tmp_path / "missing")
    state = load_file(str(src / "model.safetensors"))
    del state["qformer.encoder.layer.1.output_query.dense.weight"]
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        ConversionError, match=r"missing.*qformer\.encoder\.layer\.1\.output_query\.dense\.weight"
    ):
        convert_blip2_hf(src, tmp_path / "out2")

    src = _copy_src(hf_dir, tmp_path / "shape")
    state = load_file(str(src / "model.safetensors"))
    state["text_projection.weight"] = torch.zeros(128, 64)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        ConversionError, match=r"text_projection\.weight \(128, 64\) != \(256, 64\)"
    ):
        convert_blip2_hf(src, tmp_path / "out3")


def test_blip2_hf_tokenizer_json_and_vocab_checks(hf_dir: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece

    src = _copy_src(hf_dir, tmp_path / "tj")
    (src / "vocab.txt").unlink()
    (src / "added_tokens.json").unlink()
    tk = Tokenizer(WordPiece({t: i for i, t in enumerate(BASE_VOCAB)}, unk_token="[UNK]"))
    tk.add_special_tokens(["[DEC]"])
    tk.save(str(src / "tokenizer.json"))
    vocab = read_hf_vocab(src)
    assert list(vocab) == [*BASE_VOCAB, "[DEC]"] and vocab["[DEC]"] == len(BASE_VOCAB)
    a = convert_blip2_hf(src, tmp_path / "a")
    b = convert_blip2_hf(hf_dir, tmp_path / "b")
    assert a.fingerprint == b.fingerprint

    (src / "tokenizer.json").unlink()
    with pytest.raises(ConversionError, match="no tokenizer files"):
        convert_blip2_hf(src, tmp_path / "c")
    # more tokens than the model's embedding rows
    (src / "vocab.txt").write_text("".join(t + "\n" for t in [*BASE_VOCAB, "extra1", "extra2"]))
    with pytest.raises(ConversionError, match="vocab_size"):
        convert_blip2_hf(src, tmp_path / "d")


def test_convert_refuses_to_overwrite(hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    first = convert_blip2_hf(hf_dir, out)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ConversionError, match="--overwrite"):
        convert_blip2_hf(hf_dir, out, seed=5)
    assert (out / "model.safetensors").read_bytes() == before
    again = convert_blip2_hf(hf_dir, out, seed=5, overwrite=True)
    assert again.fingerprint != first.fingerprint


# ------------------------------------------------------------------- LAVIS round trip
def _tiny_model(seed: int = 3) -> SPRCModel:
    """Tiny SPRC model with every parameter random, ViT exactly representable in fp16 and the
    ViT key bias zero (EVA has none), as a released SPRC file would hold."""
    model = build_model(get_config("tiny"), seed=seed)
    _randomize(model, seed)
    with torch.no_grad():
        for name, p in model.vision_model.named_parameters():
            if name.endswith("self_attn.qkv.bias"):
                d = p.shape[0] // 3
                p[d : 2 * d] = 0
            if name.startswith("post_layernorm"):
                continue  # ln_vision is trained in fp32 by SPRC
            p.copy_(p.half().float())
    return model.eval()


def _lavis_file(
    model: SPRCModel, path: Path, drop: str | None = None, add: dict | None = None
) -> Path:
    lavis = ours_to_lavis({k: v.clone() for k, v in model.state_dict().items()})
    for k in list(lavis):
        if k.startswith("visual_encoder."):
            lavis[k] = lavis[k].half()  # SPRC keeps the frozen ViT in fp16
    # what real files also carry (documented drop list)
    cfg = model.config
    h, v = cfg.qformer_hidden_size, cfg.vocab_size
    lavis["Qformer.bert.embeddings.position_ids"] = torch.arange(cfg.max_position_embeddings)[None]
    lavis["itm_head.weight"], lavis["itm_head.bias"] = torch.randn(2, h), torch.randn(2)
    lavis["Qformer.cls.predictions.bias"] = torch.zeros(v)
    lavis["Qformer.cls.predictions.transform.dense.weight"] = torch.randn(h, h)
    lavis["Qformer.cls.predictions.transform.dense.bias"] = torch.zeros(h)
    lavis["Qformer.cls.predictions.transform.LayerNorm.weight"] = torch.ones(h)
    lavis["Qformer.cls.predictions.transform.LayerNorm.bias"] = torch.zeros(h)
    lavis["Qformer.cls.predictions.decoder.weight"] = lavis[
        "Qformer.bert.embeddings.word_embeddings.weight"
    ]
    lavis["Qformer.cls.predictions.decoder.bias"] = lavis["Qformer.cls.predictions.bias"]
    if drop:
        del lavis[drop]
    lavis.update(add or {})
    torch.save({"epoch": 7, "Blip2QformerCirAlignPrompt": lavis}, path)
    return path


def test_lavis_key_maps_are_inverse_for_every_preset() -> None:
    for name in PRESETS:
        with torch.device("meta"):
            model = SPRCModel(get_config(name))
        for key in model.state_dict():
            lavis = ours_key_to_lavis(key)
            assert lavis is not None, key
            if "q_bias+v_bias" in lavis:
                for part in ("q_bias", "v_bias"):
                    assert lavis_key_to_ours(lavis.replace("q_bias+v_bias", part)) == key
            else:
                assert lavis_key_to_ours(lavis) == key, (key, lavis)


def test_lavis_known_names() -> None:
    """Spot checks against the table in /work/shared/sprc-facts.md."""
    assert (
        lavis_key_to_ours("visual_encoder.cls_token") == "vision_model.embeddings.class_embedding"
    )
    assert lavis_key_to_ours("visual_encoder.blocks.38.attn.proj.weight") == (
        "vision_model.encoder.layers.38.self_attn.projection.weight"
    )
    assert lavis_key_to_ours("ln_vision.bias") == "vision_model.post_layernorm.bias"
    assert (
        lavis_key_to_ours("Qformer.bert.embeddings.LayerNorm.weight") == "qformer.layernorm.weight"
    )
    assert lavis_key_to_ours("Qformer.bert.encoder.layer.4.crossattention.self.key.weight") == (
        "qformer.encoder.layer.4.crossattention.attention.key.weight"
    )
    assert lavis_key_to_ours("Qformer.bert.encoder.layer.3.output_query.LayerNorm.bias") == (
        "qformer.encoder.layer.3.output_query.LayerNorm.bias"
    )
    assert lavis_key_to_ours("vision_proj.weight") == "vision_projection.weight"
    assert lavis_key_to_ours("Qformer.cls.predictions.bias") is None


def test_lavis_state_round_trip_is_exact() -> None:
    model = _tiny_model()
    state = model.state_dict()
    back, dropped = lavis_to_ours(ours_to_lavis(state))
    assert dropped == []
    assert set(back) == set(state)
    for k, v in state.items():
        assert torch.equal(back[k], v), k
    qkv = "vision_model.encoder.layers.0.self_attn.qkv.bias"
    bad = dict(state)
    bad[qkv] = state[qkv] + 1
    with pytest.raises(ConversionError, match="key bias is not zero"):
        ours_to_lavis(bad)


def test_sprc_lavis_converts_to_identical_outputs(tmp_path: Path) -> None:
    model = _tiny_model()
    src = _lavis_file(model, tmp_path / "sprc_tiny.pt")
    enc = convert_sprc_lavis(src, tmp_path / "out", config="tiny", vocab="builtin")
    loaded = Encoder.from_pretrained(tmp_path / "out")
    assert loaded.fingerprint == enc.fingerprint
    ref = Encoder(model, QFormerTokenizer.builtin(), dtype="float32")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    assert ref.fingerprint == loaded.fingerprint  # same weights, config, vocab, preprocessing

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    tok = ref.tokenizer(CAPTIONS)
    with torch.no_grad():
        assert torch.equal(
            torch.from_numpy(loaded.encode_target_pixels(pixels)),
            torch.from_numpy(ref.encode_target_pixels(pixels)),
        )
        img = ref.model.image_features(pixels)
        a = ref.model.composed_query(img, tok.input_ids, tok.attention_mask)
        b = loaded.model.composed_query(img, tok.input_ids, tok.attention_mask)
    assert torch.equal(a, b)
    extra = json.loads((tmp_path / "out" / "config.json").read_text())["extra"]
    assert extra["epoch"] == 7 and extra["converter"] == "sprc-lavis"
    assert sorted(extra["dropped"]) == sorted(LAVIS_DROPPED_KEYS)


def test_sprc_lavis_accepts_model_key_and_bare_state(tmp_path: Path) -> None:
    model = _tiny_model()
    lavis = ours_to_lavis(model.state_dict())
    torch.save({"model": lavis}, tmp_path / "a.pt")
    torch.save(lavis, tmp_path / "b.pt")
    a = convert_sprc_lavis(tmp_path / "a.pt", tmp_path / "oa", config="tiny", vocab="builtin")
    b = convert_sprc_lavis(tmp_path / "b.pt", tmp_path / "ob", config="tiny", vocab="builtin")
    assert a.fingerprint == b.fingerprint
    torch.save({"epoch": 1, "optimizer": {"lr": torch.tensor(1.0)}}, tmp_path / "c.pt")
    with pytest.raises(ConversionError, match="Blip2QformerCirAlignPrompt"):
        convert_sprc_lavis(tmp_path / "c.pt", tmp_path / "oc", config="tiny", vocab="builtin")


@pytest.mark.parametrize(
    ("drop", "add", "pattern"),
    [
        # missing Q-Former key, named in LAVIS terms
        (
            "Qformer.bert.encoder.layer.1.output_query.dense.weight",
            None,
            r"missing.*Qformer\.bert\.encoder\.layer\.1\.output_query\.dense\.weight",
        ),
        # one half of the EVA q/v bias pair
        ("visual_encoder.blocks.0.attn.v_bias", None, r"visual_encoder\.blocks\.0\.attn\.v_bias"),
        # extra parameter from another SPRC variant
        (None, {"target_proj.weight": torch.zeros(256, 64)}, r"unexpected.*target_proj\.weight"),
        # a ViT block the architecture does not have
        (
            None,
            {"visual_encoder.blocks.2.norm1.weight": torch.zeros(64)},
            r"unexpected.*visual_encoder\.blocks\.2\.norm1\.weight",
        ),
        # a Qformer.cls key outside the documented list
        (
            None,
            {"Qformer.cls.seq_relationship.weight": torch.zeros(2, 64)},
            r"Qformer\.cls\.seq_relationship",
        ),
        (
            None,
            {"prompt_tokens": torch.zeros(1, 16, 64)},
            r"prompt_tokens \(1, 16, 64\) != \(1, 32, 64\)",
        ),
    ],
)
def test_sprc_lavis_key_errors_name_the_key(
    tmp_path: Path, drop: str | None, add: dict | None, pattern: str
) -> None:
    src = _lavis_file(_tiny_model(), tmp_path / "bad.pt", drop=drop, add=add)
    with pytest.raises(ConversionError, match=pattern):
        convert_sprc_lavis(src, tmp_path / "out", config="tiny", vocab="builtin")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_sprc_lavis_vocab_is_required_and_checked(tmp_path: Path) -> None:
    src = _lavis_file(_tiny_model(), tmp_path / "m.pt")
    with pytest.raises(ConversionError, match="--vocab is required"):
        convert_sprc_lavis(src, tmp_path / "o1", config="tiny", vocab=None)
    with pytest.raises(ConversionError, match="no such file"):
        convert_sprc_lavis(src, tmp_path / "o2", config="tiny", vocab=tmp_path / "nope.txt")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("".join(t + "\n" for t in BASE_VOCAB))
    enc = convert_sprc_lavis(src, tmp_path / "o3", config="tiny", vocab=vocab, name="sprc-tiny")
    assert enc.config.name == "sprc-tiny" and enc.config.tokenizer == "folder"
    lines = (tmp_path / "o3" / "vocab.txt").read_text().splitlines()
    assert lines == [*BASE_VOCAB, "[DEC]"]
    # a folder holding vocab.txt (the blip2-itm-vit-g download) gives the same tokenizer
    same = convert_sprc_lavis(src, tmp_path / "o5", config="tiny", vocab=tmp_path, name="sprc-tiny")
    assert same.fingerprint == enc.fingerprint
    with pytest.raises(ConversionError, match="unknown preset"):
        convert_sprc_lavis(src, tmp_path / "o4", config="no-such-preset", vocab="builtin")


def test_sprc_lavis_float16_output(tmp_path: Path) -> None:
    src = _lavis_file(_tiny_model(), tmp_path / "m.pt")
    convert_sprc_lavis(src, tmp_path / "o", config="tiny", vocab="builtin", dtype="bfloat16")
    stored = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.bfloat16}
    with pytest.raises(ConversionError, match="--dtype"):
        convert_sprc_lavis(src, tmp_path / "p", config="tiny", vocab="builtin", dtype="int8")


# ------------------------------------------------------------------------------- CLI
def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:  # a group, as the real `cir` root
        pass

    convert.register(app)
    return app


def test_cli_convert_commands(hf_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    app = _app()
    res = runner.invoke(app, ["convert", "blip2-hf", str(hf_dir), str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    assert "blip2-custom-" in res.output
    res = runner.invoke(app, ["convert", "blip2-hf", str(hf_dir), str(tmp_path / "hf")])
    assert res.exit_code == 2 and "--overwrite" in res.output

    src = _lavis_file(_tiny_model(), tmp_path / "m.pt")
    args = ["convert", "sprc-lavis", str(src), str(tmp_path / "lv"), "--config", "tiny"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "--vocab is required" in res.output
    res = runner.invoke(app, [*args, "--vocab", "builtin", "--dtype", "float16"])
    assert res.exit_code == 0, res.output
    assert Encoder.from_pretrained(tmp_path / "lv").config.name == "tiny"


def test_drop_lists_are_documented() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "checkpoints.md").read_text()
    for key in [*HF_DROPPED_KEYS, *LAVIS_DROPPED_KEYS]:
        assert f"`{key}`" in doc, key
