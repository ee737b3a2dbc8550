"""Convert released weights into this project's checkpoint folders.

Two sources:

* ``cir convert blip2-hf SRC_DIR OUT_DIR``: a downloaded transformers ``Blip2ForImageTextRetrieval``
  folder (e.g. ``Salesforce/blip2-itm-vit-g``: config.json, model.safetensors or shards or
  pytorch_model.bin, vocab.txt and/or tokenizer.json). Parameter names are already ours except
  that BLIP-2 has no ``prompt_tokens`` (SPRC only: initialised N(0, init_std) from ``--seed``)
  and no ``temp`` (transformers drops it: initialised to 0.07).
* ``cir convert sprc-lavis SRC.pt OUT_DIR --config PRESET_OR_JSON --vocab VOCAB``: a released
  SPRC file (``{'epoch', 'Blip2QformerCirAlignPrompt': state_dict}``, LAVIS names, fp16 ViT).

Both are strict: every key of the source must map onto the model or be in the explicit,
documented drop lists below (``HF_DROPPED_KEYS``, ``LAVIS_DROPPED_KEYS``; docs/checkpoints.md
says why); anything else, and any missing key or wrong shape, is an error naming the keys.
Nothing is fetched: the tokenizer comes from files next to the weights (or ``--vocab``).

``ours_to_lavis`` is the inverse map (tests use it; it also exports to LAVIS/SPRC code).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import typer

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- drop lists
# Keys a Blip2ForImageTextRetrieval checkpoint may hold that SPRC does not use.
HF_DROPPED_KEYS: dict[str, str] = {
    "itm_head.weight": "BLIP-2 image-text matching classifier; SPRC retrieval never uses it",
    "itm_head.bias": "BLIP-2 image-text matching classifier; SPRC retrieval never uses it",
    "embeddings.position_ids": "constant arange buffer (only in files from old transformers); rebuilt",
}

# Keys a released SPRC/LAVIS file holds that this model does not use.
LAVIS_DROPPED_KEYS: dict[str, str] = {
    "itm_head.weight": "ITM classifier inherited from BLIP-2; SPRC's losses and retrieval never use it",
    "itm_head.bias": "ITM classifier inherited from BLIP-2; SPRC's losses and retrieval never use it",
    "Qformer.bert.embeddings.position_ids": "constant arange buffer; rebuilt at load",
    # LAVIS builds the Q-Former as BertLMHeadModel: its masked-LM head (BLIP-2 captioning loss)
    # is saved but SPRC never calls it. decoder.weight is a copy of the word embeddings and
    # decoder.bias a copy of predictions.bias (tied in BERT).
    "Qformer.cls.predictions.bias": "Q-Former LM head (unused by SPRC)",
    "Qformer.cls.predictions.transform.dense.weight": "Q-Former LM head (unused by SPRC)",
    "Qformer.cls.predictions.transform.dense.bias": "Q-Former LM head (unused by SPRC)",
    "Qformer.cls.predictions.transform.LayerNorm.weight": "Q-Former LM head (unused by SPRC)",
    "Qformer.cls.predictions.transform.LayerNorm.bias": "Q-Former LM head (unused by SPRC)",
    "Qformer.cls.predictions.decoder.weight": "Q-Former LM head (tied to word embeddings)",
    "Qformer.cls.predictions.decoder.bias": "Q-Former LM head (tied to predictions.bias)",
}

# Top-level key under which SPRC's training script saves the model.
SPRC_STATE_KEY = "Blip2QformerCirAlignPrompt"

_DTYPE_NAMES = ("float32", "float16", "bfloat16")  # help text; fp32|fp16|bf16 accepted too


class ConversionError(ValueError):
    """The source does not match the architecture (message names the offending keys)."""


def _names(keys: list[str], limit: int = 40) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# ------------------------------------------------------------------------------- key maps
_V = r"^visual_encoder\.blocks\.(\d+)\."
_Q = r"^Qformer\.bert\.encoder\.layer\.(\d+)\."
_OV = "vision_model.encoder.layers.\\1."
_OQ = "qformer.encoder.layer.\\1."

# LAVIS -> ours (the ViT's q_bias/v_bias pair is handled separately: two keys make one).
_LAVIS_TO_OURS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
        (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
        (
            r"^visual_encoder\.patch_embed\.proj\.(weight|bias)$",
            r"vision_model.embeddings.patch_embedding.\1",
        ),
        (_V + r"norm([12])\.(weight|bias)$", _OV + r"layer_norm\2.\3"),
        (_V + r"attn\.qkv\.weight$", _OV + "self_attn.qkv.weight"),
        (_V + r"attn\.proj\.(weight|bias)$", _OV + r"self_attn.projection.\2"),
        (_V + r"mlp\.(fc[12])\.(weight|bias)$", _OV + r"mlp.\2.\3"),
        (r"^ln_vision\.(weight|bias)$", r"vision_model.post_layernorm.\1"),
        (r"^Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)$", r"qformer.layernorm.\1"),
        (
            r"^Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.weight$",
            r"embeddings.\1.weight",
        ),
        (
            _Q + r"(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)$",
            _OQ + r"\2.attention.\3.\4",
        ),
        (
            _Q + r"(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)$",
            _OQ + r"\2.output.\3.\4",
        ),
        (_Q + r"(intermediate|intermediate_query)\.dense\.(weight|bias)$", _OQ + r"\2.dense.\3"),
        (
            _Q + r"(output|output_query)\.(dense|LayerNorm)\.(weight|bias)$",
            _OQ + r"\2.\3.\4",
        ),
        (r"^(query_tokens|prompt_tokens|temp)$", r"\1"),
        (r"^vision_proj\.(weight|bias)$", r"vision_projection.\1"),
        (r"^text_proj\.(weight|bias)$", r"text_projection.\1"),
    ]
]
_LAVIS_QV_BIAS = re.compile(_V + r"attn\.([qv])_bias$")

_VO = r"^vision_model\.encoder\.layers\.(\d+)\."
_QO = r"^qformer\.encoder\.layer\.(\d+)\."
_LV = "visual_encoder.blocks.\\1."
_LQ = "Qformer.bert.encoder.layer.\\1."

# ours -> LAVIS (qkv.bias is split into q_bias/v_bias separately).
_OURS_TO_LAVIS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
        (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
        (
            r"^vision_model\.embeddings\.patch_embedding\.(weight|bias)$",
            r"visual_encoder.patch_embed.proj.\1",
        ),
        (_VO + r"layer_norm([12])\.(weight|bias)$", _LV + r"norm\2.\3"),
        (_VO + r"self_attn\.qkv\.weight$", _LV + "attn.qkv.weight"),
        (_VO + r"self_attn\.projection\.(weight|bias)$", _LV + r"attn.proj.\2"),
        (_VO + r"mlp\.(fc[12])\.(weight|bias)$", _LV + r"mlp.\2.\3"),
        (r"^vision_model\.post_layernorm\.(weight|bias)$", r"ln_vision.\1"),
        (r"^qformer\.layernorm\.(weight|bias)$", r"Qformer.bert.embeddings.LayerNorm.\1"),
        (
            r"^embeddings\.(word_embeddings|position_embeddings)\.weight$",
            r"Qformer.bert.embeddings.\1.weight",
        ),
        (
            _QO + r"(attention|crossattention)\.attention\.(query|key|value)\.(weight|bias)$",
            _LQ + r"\2.self.\3.\4",
        ),
        (
            _QO + r"(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)$",
            _LQ + r"\2.output.\3.\4",
        ),
        (_QO + r"(intermediate|intermediate_query)\.dense\.(weight|bias)$", _LQ + r"\2.dense.\3"),
        (_QO + r"(output|output_query)\.(dense|LayerNorm)\.(weight|bias)$", _LQ + r"\2.\3.\4"),
        (r"^(query_tokens|prompt_tokens|temp)$", r"\1"),
        (r"^vision_projection\.(weight|bias)$", r"vision_proj.\1"),
        (r"^text_projection\.(weight|bias)$", r"text_proj.\1"),
    ]
]
_OURS_QKV_BIAS = re.compile(_VO + r"self_attn\.qkv\.bias$")


def _apply(rules: list[tuple[re.Pattern[str], str]], key: str) -> str | None:
    for pattern, repl in rules:
        if pattern.match(key):
            return pattern.sub(repl, key)
    return None


def lavis_key_to_ours(key: str) -> str | None:
    """One LAVIS/SPRC parameter name -> ours, or None when no rule covers it (q_bias/v_bias
    map onto ``self_attn.qkv.bias`` together and are reported as that key)."""
    m = _LAVIS_QV_BIAS.match(key)
    if m:
        return f"vision_model.encoder.layers.{m.group(1)}.self_attn.qkv.bias"
    return _apply(_LAVIS_TO_OURS, key)


def lavis_to_ours(state: Mapping[str, Any], dtype: Any = None) -> tuple[dict[str, Any], list[str]]:
    """Rename a LAVIS/SPRC state dict to our names; cast floating tensors to ``dtype``.

    Returns (state, dropped keys). Raises ConversionError naming every key that is neither
    mapped nor in ``LAVIS_DROPPED_KEYS``, and incomplete q_bias/v_bias pairs.
    """
    import torch

    out: dict[str, Any] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    qv: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key in LAVIS_DROPPED_KEYS:
            dropped.append(key)
            continue
        m = _LAVIS_QV_BIAS.match(key)
        if m:
            qv.setdefault(m.group(1), {})[m.group(2)] = tensor
            continue
        new = _apply(_LAVIS_TO_OURS, key)
        if new is None:
            unknown.append(key)
            continue
        out[new] = _cast(tensor, dtype)
    if unknown:
        raise ConversionError(
            f"{len(unknown)} unexpected key(s) in the LAVIS/SPRC state dict (not mapped and not in "
            f"the documented drop list): {_names(unknown)}"
        )
    incomplete = [
        f"visual_encoder.blocks.{i}.attn.{'v' if 'q' in pair else 'q'}_bias"
        for i, pair in qv.items()
        if len(pair) != 2
    ]
    if incomplete:
        raise ConversionError(f"missing key(s) in the LAVIS/SPRC state dict: {_names(incomplete)}")
    for i, pair in qv.items():
        q, v = pair["q"].float(), pair["v"].float()
        # EVA attention: qkv bias = [q_bias, 0 (keys have no bias), v_bias]
        bias = torch.cat([q, torch.zeros_like(q), v])
        out[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"] = _cast(
            bias, dtype if dtype is not None else pair["q"].dtype
        )
    return out, dropped


def ours_to_lavis(state: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of ``lavis_to_ours``: our names -> LAVIS/SPRC names (same tensors; the ViT's
    qkv.bias splits into q_bias/v_bias, which needs its key third to be zero)."""
    out: dict[str, Any] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        m = _OURS_QKV_BIAS.match(key)
        if m:
            d = tensor.shape[0] // 3
            if tensor[d : 2 * d].abs().max().item() != 0:
                raise ConversionError(f"{key}: key bias is not zero, LAVIS/EVA cannot represent it")
            out[f"visual_encoder.blocks.{m.group(1)}.attn.q_bias"] = tensor[:d].clone()
            out[f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"] = tensor[2 * d :].clone()
            continue
        new = _apply(_OURS_TO_LAVIS, key)
        if new is None:
            unknown.append(key)
            continue
        out[new] = tensor
    if unknown:
        raise ConversionError(f"no LAVIS name for: {_names(unknown)}")
    return out


def ours_key_to_lavis(key: str) -> str | None:
    """One of our parameter names -> the LAVIS/SPRC name (None when there is none)."""
    m = _OURS_QKV_BIAS.match(key)
    if m:
        return f"visual_encoder.blocks.{m.group(1)}.attn.q_bias+v_bias"
    return _apply(_OURS_TO_LAVIS, key)


def _cast(tensor: Any, dtype: Any) -> Any:
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def _torch_dtype(name: str) -> Any:
    """A stored dtype by its retrieval.precision name (fp32|bf16|fp16 or float32|...)."""
    from retrieval.precision import storage_dtype

    try:
        return storage_dtype(name)
    except ValueError as exc:
        raise ConversionError(f"--dtype must be one of {', '.join(_DTYPE_NAMES)}: {exc}") from None


# ------------------------------------------------------------------------------ checking
def expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Our model's state-dict keys and shapes for ``config`` (built on the meta device)."""
    import torch

    from retrieval.modeling_sprc import SPRCModel

    with torch.device("meta"):
        model = SPRCModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state(
    config: Any,
    state: Mapping[str, Any],
    source: str,
    ignore_missing: tuple[str, ...] = (),
    source_name: Callable[[str], str | None] | None = None,
) -> None:
    """Raise ConversionError naming missing keys, unexpected keys and shape mismatches.
    ``source_name`` maps our key to the source file's name for the message."""
    shapes = expected_shapes(config)

    def show(key: str) -> str:
        orig = source_name(key) if source_name else None
        return f"{orig} (ours: {key})" if orig and orig != key else key

    missing = [show(k) for k in sorted(set(shapes) - set(state) - set(ignore_missing))]
    unexpected = [show(k) for k in sorted(set(state) - set(shapes))]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_names(unexpected)}")
    wrong = [
        f"{show(k)} {tuple(state[k].shape)} != {shapes[k]}"
        for k in sorted(set(shapes) & set(state))
        if tuple(state[k].shape) != shapes[k]
    ]
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {'; '.join(wrong[:20])}")
    if problems:
        raise ConversionError(
            f"{source} does not match the architecture {config.name!r}: " + " | ".join(problems)
        )


# ----------------------------------------------------------------------- blip2-hf source
def _hf_weight_files(src: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [src / f for f in sorted(set(weight_map.values()))]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise ConversionError(f"{index} lists shards that are not there: {absent}")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (src / name).is_file():
            return [src / name]
    raise ConversionError(
        f"{src}: no weights (model.safetensors, sharded model-*.safetensors + index json, "
        "or pytorch_model.bin)"
    )


def iter_hf_tensors(src: Path) -> Iterator[tuple[str, Any]]:
    """(name, tensor) over every weight file, one tensor at a time: the 4.6 GB fp32 ViT-g
    model is never held twice (safetensors: safe_open; .bin: memory-mapped torch.load)."""
    import torch
    from safetensors import safe_open

    for path in _hf_weight_files(src):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    yield key, fh.get_tensor(key)
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
            for key in list(state):
                yield key, state.pop(key)


def config_from_hf(hf: dict[str, Any], name: str | None = None) -> Any:
    """Our SPRCConfig from a transformers Blip2Config dict (config.json). Fields absent from the
    file take transformers' defaults. Named "blip2-vitg" when it equals that preset exactly."""
    from transformers import Blip2QFormerConfig, Blip2VisionConfig

    from retrieval.config import PRESETS, SPRCConfig

    archs = hf.get("architectures") or []
    if archs and "Blip2ForImageTextRetrieval" not in archs:
        raise ConversionError(
            f"config.json architectures={archs}: expected Blip2ForImageTextRetrieval "
            "(e.g. Salesforce/blip2-itm-vit-g); captioning/LLM BLIP-2 checkpoints have no text FFN"
        )
    vdef, qdef = Blip2VisionConfig(), Blip2QFormerConfig()
    vis, qf = hf.get("vision_config") or {}, hf.get("qformer_config") or {}

    def v(key: str) -> Any:
        return vis.get(key, getattr(vdef, key, None))

    def q(key: str) -> Any:
        return qf.get(key, getattr(qdef, key, None))

    if not q("use_qformer_text_input"):
        raise ConversionError(
            "qformer_config.use_qformer_text_input is false: the checkpoint has no text "
            "feed-forward, which SPRC's text passes need (use a Blip2ForImageTextRetrieval folder)"
        )
    if not v("qkv_bias"):
        raise ConversionError("vision_config.qkv_bias is false: EVA/BLIP-2 ViTs have q/v biases")
    for where, act in (("vision_config", v("hidden_act")), ("qformer_config", q("hidden_act"))):
        if act != "gelu":
            raise ConversionError(f"{where}.hidden_act={act!r}: only 'gelu' is supported")
    if q("position_embedding_type") not in (None, "absolute"):
        raise ConversionError("qformer_config.position_embedding_type must be 'absolute'")
    image_size, patch_size = v("image_size"), v("patch_size")
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0]
    if isinstance(patch_size, (list, tuple)):
        patch_size = patch_size[0]
    enc_hidden = qf.get("encoder_hidden_size", v("hidden_size"))
    if enc_hidden != v("hidden_size"):
        raise ConversionError(
            f"qformer_config.encoder_hidden_size={enc_hidden} != vision hidden_size {v('hidden_size')}"
        )
    arch = dict(
        image_size=int(image_size),
        patch_size=int(patch_size),
        vision_hidden_size=int(v("hidden_size")),
        vision_num_layers=int(v("num_hidden_layers")),
        vision_num_heads=int(v("num_attention_heads")),
        vision_intermediate_size=int(v("intermediate_size")),
        vision_layer_norm_eps=float(v("layer_norm_eps")),
        qformer_hidden_size=int(q("hidden_size")),
        qformer_num_layers=int(q("num_hidden_layers")),
        qformer_num_heads=int(q("num_attention_heads")),
        qformer_intermediate_size=int(q("intermediate_size")),
        cross_attention_frequency=int(q("cross_attention_frequency")),
        vocab_size=int(q("vocab_size")),
        max_position_embeddings=int(q("max_position_embeddings")),
        qformer_layer_norm_eps=float(q("layer_norm_eps")),
        hidden_dropout_prob=float(q("hidden_dropout_prob")),
        attention_dropout_prob=float(q("attention_probs_dropout_prob")),
        num_query_tokens=int(hf.get("num_query_tokens", 32)),
        embed_dim=int(hf.get("image_text_hidden_size", 256)),
    )
    preset = PRESETS["blip2-vitg"]
    if name is None:
        same = all(getattr(preset, k) == val for k, val in arch.items())
        name = "blip2-vitg" if same else "blip2-custom"
    cfg = SPRCConfig(
        name=name,
        init_std=float(q("initializer_range")),
        tokenizer="folder",
        **arch,  # type: ignore[arg-type]
    )
    cfg.validate()
    return cfg


def read_hf_vocab(src: Path) -> dict[str, int]:
    """WordPiece vocabulary of a transformers folder, ids as in the checkpoint.

    vocab.txt (plus added_tokens.json, e.g. [DEC]) when present, else tokenizer.json's
    WordPiece ``model.vocab`` plus its ``added_tokens``. Ids must be 0..n-1 without gaps.
    """
    from retrieval.tokenization import SPECIAL_TOKENS, read_vocab

    vocab: dict[str, int]
    if (src / "vocab.txt").is_file():
        vocab = read_vocab(src / "vocab.txt")
        added_file = src / "added_tokens.json"
        added = json.loads(added_file.read_text()) if added_file.is_file() else {}
    elif (src / "tokenizer.json").is_file():
        tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
        model = tj.get("model") or {}
        if model.get("type") != "WordPiece" or not isinstance(model.get("vocab"), dict):
            raise ConversionError(
                f"{src / 'tokenizer.json'}: expected a WordPiece model with a vocab, "
                f"got type {model.get('type')!r}"
            )
        vocab = {str(t): int(i) for t, i in model["vocab"].items()}
        added = {str(a["content"]): int(a["id"]) for a in tj.get("added_tokens") or []}
    else:
        raise ConversionError(
            f"{src}: no tokenizer files (vocab.txt or tokenizer.json); nothing is downloaded"
        )
    for token, idx in sorted(added.items(), key=lambda kv: kv[1]):
        if token in vocab:
            if vocab[token] != idx:
                raise ConversionError(f"added token {token!r} id {idx} != vocab id {vocab[token]}")
            continue
        vocab[token] = idx
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise ConversionError(f"{src}: token ids are not 0..{len(ids) - 1} without gaps")
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ConversionError(f"{src}: vocabulary lacks special tokens {missing}")
    return dict(sorted(vocab.items(), key=lambda kv: kv[1]))


def _read_preprocessor(src: Path, cfg: Any) -> Any:
    """image_mean/std from preprocessor_config.json when present (BLIP-2 uses CLIP's)."""
    path = src / "preprocessor_config.json"
    if not path.is_file():
        return cfg
    pp = json.loads(path.read_text())
    changes: dict[str, Any] = {}
    for key in ("image_mean", "image_std"):
        if isinstance(pp.get(key), list) and len(pp[key]) == 3:
            changes[key] = tuple(float(x) for x in pp[key])
    size = pp.get("size")
    side = size.get("height") if isinstance(size, dict) else size
    if side and int(side) != cfg.image_size:
        logger.warning("preprocessor size %s != vision image_size %s", side, cfg.image_size)
    return cfg.replace(**changes) if changes else cfg


def _prepare_out(out_dir: Path, overwrite: bool) -> None:
    from retrieval.encoder import WEIGHTS_NAME

    if (out_dir / WEIGHTS_NAME).exists() and not overwrite:
        raise ConversionError(
            f"{out_dir} already holds a checkpoint; pass --overwrite to replace it"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"{out_dir} exists and is not a folder")


def _tokenizer_for(vocab: dict[str, int], cfg: Any) -> Any:
    from retrieval.tokenization import QFormerTokenizer

    tok = QFormerTokenizer(vocab, max_length=cfg.max_text_len)  # appends [DEC] when absent
    if len(tok) > cfg.vocab_size:
        raise ConversionError(
            f"tokenizer has {len(tok)} tokens (with [DEC]) > the model's vocab_size {cfg.vocab_size}"
        )
    if len(tok) < cfg.vocab_size:
        logger.warning("tokenizer has %d tokens < vocab_size %d", len(tok), cfg.vocab_size)
    return tok


def _write(model: Any, tok: Any, out_dir: Path, dtype: Any) -> Any:
    from retrieval.encoder import Encoder

    enc = Encoder(model, tok, device="cpu", dtype=dtype)
    enc.save_pretrained(out_dir)
    logger.info("wrote %s (%s)", out_dir, enc.fingerprint)
    return enc


def convert_blip2_hf(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    seed: int = 0,
    name: str | None = None,
    max_text_len: int = 32,
    overwrite: bool = False,
) -> Any:
    """transformers Blip2ForImageTextRetrieval folder -> our checkpoint folder. Returns the
    Encoder that was saved (weights in ``dtype``)."""
    import torch

    from retrieval.encoder import load_model_weights

    src, out = Path(src_dir), Path(out_dir)
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src}: no config.json (expected a transformers BLIP-2 folder)")
    _prepare_out(out, overwrite)
    tdtype = _torch_dtype(dtype)
    hf = json.loads((src / "config.json").read_text())
    cfg = config_from_hf(hf, name=name).replace(max_text_len=max_text_len)
    cfg = _read_preprocessor(src, cfg)
    cfg.validate()
    tok = _tokenizer_for(read_hf_vocab(src), cfg)

    shapes = expected_shapes(cfg)
    state: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unexpected: list[str] = []
    for key, tensor in iter_hf_tensors(src):
        if key in HF_DROPPED_KEYS:
            dropped.append(key)
        elif key in shapes and key not in ("prompt_tokens", "temp"):
            state[key] = _cast(tensor, tdtype)
        else:
            unexpected.append(key)
    if unexpected:
        raise ConversionError(
            f"{src}: {len(unexpected)} unexpected key(s) (not part of the model and not in the "
            f"documented drop list): {_names(unexpected)}"
        )
    check_state(cfg, state, str(src), ignore_missing=("prompt_tokens", "temp"))
    # BLIP-2 has no SPRC prompt and transformers drops temp: fresh, documented values.
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.empty(shapes["prompt_tokens"]).normal_(0.0, cfg.init_std, generator=gen)
    state["prompt_tokens"] = prompt.to(tdtype)
    state["temp"] = torch.tensor(cfg.temp_init, dtype=tdtype)
    cfg = cfg.replace(
        extra={
            "converter": "blip2-hf",
            "source": src.name,
            "dropped": sorted(dropped),
            "prompt_tokens": f"N(0, {cfg.init_std}) seed {seed} (not in BLIP-2)",
            "temp": f"{cfg.temp_init} (not in transformers' BLIP-2)",
        }
    )
    model = load_model_weights(cfg, state)
    del state
    logger.info("blip2-hf: %s -> %s (dropped %s)", src, out, sorted(dropped))
    return _write(model, tok, out, tdtype)


# --------------------------------------------------------------------- sprc-lavis source
def extract_lavis_state(obj: Any, source: str = "checkpoint") -> tuple[dict[str, Any], Any]:
    """(state dict, epoch) from what torch.load returned: SPRC's
    ``{'epoch', 'Blip2QformerCirAlignPrompt': sd}``, a LAVIS ``{'model': sd}``, or a bare sd."""
    import torch

    if not isinstance(obj, dict):
        raise ConversionError(f"{source}: expected a dict, got {type(obj).__name__}")
    for key in (SPRC_STATE_KEY, "model", "state_dict"):
        if isinstance(obj.get(key), dict):
            return obj[key], obj.get("epoch")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    raise ConversionError(
        f"{source}: no state dict under {SPRC_STATE_KEY!r} or 'model', and not a bare state "
        f"dict (top-level keys: {_names([str(k) for k in obj], 10)})"
    )


def convert_sprc_lavis(
    src: str | Path,
    out_dir: str | Path,
    *,
    config: str | Path,
    vocab: str | Path | None,
    dtype: str = "float32",
    name: str | None = None,
    overwrite: bool = False,
) -> Any:
    """Released SPRC/LAVIS ``.pt`` -> our checkpoint folder (strict key check). ``vocab`` is a
    bert-base-uncased vocab.txt ([DEC] appended), a transformers folder with vocab.txt or
    tokenizer.json (e.g. blip2-itm-vit-g), or "builtin" (tests/toy models only)."""
    import torch

    from retrieval.config import get_config
    from retrieval.encoder import load_model_weights
    from retrieval.tokenization import QFormerTokenizer, read_vocab

    path, out = Path(src), Path(out_dir)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if vocab is None:
        raise ConversionError(
            "--vocab is required: SPRC files carry no tokenizer; pass bert-base-uncased's "
            "vocab.txt (30522 lines; [DEC] is appended) or the blip2-itm-vit-g folder, or "
            "'builtin' for toy models"
        )
    _prepare_out(out, overwrite)
    tdtype = _torch_dtype(dtype)
    try:
        cfg = get_config(config)
    except ValueError as exc:
        raise ConversionError(str(exc)) from exc
    if name:
        cfg = cfg.replace(name=name)
    if str(vocab) == "builtin":
        tok = QFormerTokenizer.builtin(max_length=cfg.max_text_len)
        cfg = cfg.replace(tokenizer="builtin")
        tok = _tokenizer_for(tok.vocab, cfg)
    else:
        vpath = Path(vocab)
        if vpath.is_dir():  # e.g. the blip2-itm-vit-g folder: vocab.txt or tokenizer.json
            words = read_hf_vocab(vpath)
        elif vpath.is_file():
            try:
                words = read_vocab(vpath)
            except ValueError as exc:
                raise ConversionError(str(exc)) from exc
        else:
            raise ConversionError(f"--vocab {vocab}: no such file or folder")
        tok = _tokenizer_for(words, cfg)
        cfg = cfg.replace(tokenizer="folder")

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) torch.save format cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    raw, epoch = extract_lavis_state(obj, str(path))
    state, dropped = lavis_to_ours(raw, tdtype)
    del obj, raw
    check_state(cfg, state, str(path), source_name=ours_key_to_lavis)
    cfg = cfg.replace(
        extra={
            "converter": "sprc-lavis",
            "source": path.name,
            "epoch": epoch if isinstance(epoch, (int, float, str)) else None,
            "dropped": sorted(dropped),
        }
    )
    model = load_model_weights(cfg, state)
    del state
    logger.info("sprc-lavis: %s (epoch %s) -> %s (dropped %d keys)", path, epoch, out, len(dropped))
    return _write(model, tok, out, tdtype)


# ------------------------------------------------------------------------------------ CLI
def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code=2)


def register(app: typer.Typer) -> None:
    """Add the ``convert`` command group (blip2-hf, sprc-lavis) to ``app``."""
    group = typer.Typer(
        help="Convert released BLIP-2 / SPRC weights into checkpoint folders (offline).",
        no_args_is_help=True,
    )
    app.add_typer(group, name="convert")

    @group.command("blip2-hf")
    def blip2_hf(
        src_dir: Path = typer.Argument(..., help="transformers Blip2ForImageTextRetrieval folder"),
        out_dir: Path = typer.Argument(..., help="output checkpoint folder"),
        dtype: str = typer.Option(
            "float32", "--dtype", help="stored weights: " + "|".join(_DTYPE_NAMES)
        ),
        seed: int = typer.Option(0, "--seed", help="seed for prompt_tokens (BLIP-2 has none)"),
        name: str | None = typer.Option(None, "--name", help="config name (default: derived)"),
        max_text_len: int = typer.Option(32, "--max-text-len", help="caption tokens (SPRC: 32)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT_DIR's checkpoint"),
    ) -> None:
        """A downloaded Blip2ForImageTextRetrieval folder (e.g. Salesforce/blip2-itm-vit-g)."""
        t0 = time.perf_counter()
        try:
            enc = convert_blip2_hf(
                src_dir,
                out_dir,
                dtype=dtype,
                seed=seed,
                name=name,
                max_text_len=max_text_len,
                overwrite=overwrite,
            )
        except (ConversionError, FileNotFoundError, ValueError, KeyError) as exc:
            _fail(exc)
        typer.echo(f"{out_dir}: {enc.fingerprint} ({time.perf_counter() - t0:.1f}s)")

    @group.command("sprc-lavis")
    def sprc_lavis(
        src: Path = typer.Argument(..., help="released SPRC .pt (e.g. sprc_cirr.pt)"),
        out_dir: Path = typer.Argument(..., help="output checkpoint folder"),
        config: str = typer.Option(..., "--config", help="preset name or config JSON (blip2-vitg)"),
        vocab: str | None = typer.Option(
            None,
            "--vocab",
            help="bert-base-uncased vocab.txt ([DEC] appended), a blip2-itm-vit-g folder, or 'builtin'",
        ),
        dtype: str = typer.Option(
            "float32", "--dtype", help="stored weights: " + "|".join(_DTYPE_NAMES)
        ),
        name: str | None = typer.Option(None, "--name", help="config name (default: the preset's)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT_DIR's checkpoint"),
    ) -> None:
        """A released SPRC/LAVIS checkpoint ({'epoch', 'Blip2QformerCirAlignPrompt': sd})."""
        t0 = time.perf_counter()
        try:
            enc = convert_sprc_lavis(
                src,
                out_dir,
                config=config,
                vocab=vocab,
                dtype=dtype,
                name=name,
                overwrite=overwrite,
            )
        except (ConversionError, FileNotFoundError, ValueError, KeyError) as exc:
            _fail(exc)
        typer.echo(f"{out_dir}: {enc.fingerprint} ({time.perf_counter() - t0:.1f}s)")
