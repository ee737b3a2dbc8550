"""SPRC model configuration with named presets (open_clip style).

A preset fixes every dimension of the architecture. ``blip2-vitg`` has exactly the dimensions of
``Salesforce/blip2-itm-vit-g`` (EVA ViT-g/14 at 224 px, BERT-base Q-Former with cross-attention
every 2nd layer, 32 queries, 256-d projections). ``sprc-small`` trains from scratch on a 2-core
CPU; ``tiny`` exists for fast tests.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# CLIP normalisation, as SPRC/LAVIS use for BLIP-2.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class SPRCConfig:
    name: str = "custom"  # preset name, recorded in checkpoints and index versions
    # --- vision tower (EVA ViT in LAVIS; transformers' Blip2VisionModel) ---
    image_size: int = 224  # input resolution after preprocessing (square)
    patch_size: int = 14  # ViT patch size
    vision_hidden_size: int = 1408  # ViT width
    vision_num_layers: int = 39  # ViT depth (LAVIS drops EVA-g's last block: 40 -> 39)
    vision_num_heads: int = 16  # ViT attention heads
    vision_intermediate_size: int = 6144  # ViT MLP width
    vision_layer_norm_eps: float = 1e-6  # EVA blocks' eps (LAVIS)
    ln_vision_eps: float = 1e-5  # LAVIS's ln_vision is a plain nn.LayerNorm (eps 1e-5), not 1e-6
    # --- Q-Former (BERT-base with cross-attention) ---
    qformer_hidden_size: int = 768  # Q-Former width
    qformer_num_layers: int = 12  # Q-Former depth
    qformer_num_heads: int = 12  # Q-Former attention heads
    qformer_intermediate_size: int = 3072  # Q-Former feed-forward width (query and text FFNs)
    cross_attention_frequency: int = 2  # cross-attention to the image in layers 0, 2, 4, ...
    vocab_size: int = 30523  # bert-base-uncased 30522 + [DEC]
    max_position_embeddings: int = 512  # BERT positions
    qformer_layer_norm_eps: float = 1e-12  # BERT eps
    hidden_dropout_prob: float = 0.1  # BERT dropout (training only)
    attention_dropout_prob: float = 0.1  # BERT attention dropout (training only)
    # --- SPRC heads ---
    num_query_tokens: int = 32  # learned queries (and sentence-level prompt length)
    embed_dim: int = 256  # vision/text projection size: the retrieval space
    max_text_len: int = 32  # caption tokens incl. [CLS]/[SEP] (SPRC pads to 32)
    temp_init: float = 0.07  # learned temperature init (training only; ranking ignores it)
    init_std: float = 0.02  # LAVIS-style init for from-scratch weights
    init_scheme: str = (
        "lavis"  # "lavis": N(0, init_std); "fan_in": linear std max(init_std, fan_in^-0.5)
    )
    # --- preprocessing (part of the fingerprint) ---
    target_pad_ratio: float = 1.25  # SPRC "TargetPad": pad to square when aspect ratio > this
    image_mean: tuple[float, float, float] = CLIP_MEAN  # per-channel mean
    image_std: tuple[float, float, float] = CLIP_STD  # per-channel std
    # --- tokenizer ---
    tokenizer: str = (
        "builtin"  # "builtin": the project's WordPiece vocab; "folder": vocab.txt in checkpoint
    )
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance (converter, source)

    # ---- derived ----
    @property
    def num_image_tokens(self) -> int:
        """ViT tokens per image: patches + [CLS]."""
        return (self.image_size // self.patch_size) ** 2 + 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SPRCConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SPRC config keys: {unknown}")
        d = dict(d)
        for k in ("image_mean", "image_std"):
            if k in d:
                d[k] = tuple(float(x) for x in d[k])
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SPRCConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes: Any) -> SPRCConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if self.vision_hidden_size % self.vision_num_heads:
            raise ValueError("vision_hidden_size must be divisible by vision_num_heads")
        if self.qformer_hidden_size % self.qformer_num_heads:
            raise ValueError("qformer_hidden_size must be divisible by qformer_num_heads")
        if self.max_text_len + self.num_query_tokens + 1 > self.max_position_embeddings:
            raise ValueError("max_position_embeddings too small for prompt + caption")


PRESETS: dict[str, SPRCConfig] = {
    # Exactly Salesforce/blip2-itm-vit-g (transformers Blip2ForImageTextRetrieval).
    "blip2-vitg": SPRCConfig(name="blip2-vitg", tokenizer="builtin"),
    # Trains from scratch on a 2-core CPU on the synthetic shapes world (64 px renders of a
    # 3x3 grid). 63 px / 21 px patches: one ViT patch per grid cell, so a patch token sees one
    # whole object (10 ViT tokens instead of 65 at 64/8: the ViT is ~6x cheaper and learns
    # objects, not fragments). 16 queries instead of 32: half the Q-Former and MaxSim cost.
    "sprc-small": SPRCConfig(
        name="sprc-small",
        image_size=63,
        patch_size=21,
        num_query_tokens=16,
        vision_hidden_size=192,
        vision_num_layers=6,
        vision_num_heads=3,
        vision_intermediate_size=768,
        qformer_hidden_size=192,
        qformer_num_layers=4,
        qformer_num_heads=3,
        qformer_intermediate_size=768,
        vocab_size=2048,
        max_position_embeddings=96,
        hidden_dropout_prob=0.0,  # ~2 epochs of fresh synthetic data: dropout only slows learning
        attention_dropout_prob=0.0,
        init_scheme="fan_in",  # see SPRCModel.init_weights: N(0, 0.02) stalls a narrow model
    ),
    # The smallest model with every part of the real architecture; for unit tests.
    "tiny": SPRCConfig(
        name="tiny",
        image_size=32,
        patch_size=8,
        vision_hidden_size=64,
        vision_num_layers=2,
        vision_num_heads=2,
        vision_intermediate_size=128,
        qformer_hidden_size=64,
        qformer_num_layers=2,
        qformer_num_heads=2,
        qformer_intermediate_size=128,
        vocab_size=2048,
        max_position_embeddings=96,
        hidden_dropout_prob=0.0,
        attention_dropout_prob=0.0,
        init_scheme="fan_in",
    ),
}


# ------------------------------------------------ "preset name or folder": the one rule
# (retrieval.model_source re-exports it; docs/architecture.md states it)
#: The committed demo model (trained): the default of ``cir index build`` and ``cir serve``.
DEFAULT_MODEL = "models/sprc-shapes"
_REPO_ROOT = Path(__file__).resolve().parents[1]  # this checkout (editable install)


PRESET_SCHEME = "preset:"  # an explicit preset name (random weights)
FOLDER_SCHEME = "local-dir:"  # an explicit checkpoint folder / config file


class UnknownModelError(FileNotFoundError, ValueError):
    """Neither an existing folder/file nor a preset name. Both a FileNotFoundError (what the
    Encoder raised for a missing folder) and a ValueError (what ``get_config`` raised)."""


@dataclass(frozen=True)
class ModelSource:
    """What a model string means (``parse_model_source``)."""

    kind: str  # "preset" (random weights of PRESETS[ref]) | "path" (a folder or config file)
    ref: str  # the preset name, or the path (scheme stripped, default model resolved)

    @property
    def is_preset(self) -> bool:
        return self.kind == "preset"


def _unknown(key: str) -> UnknownModelError:
    return UnknownModelError(
        f"unknown preset or model folder {key!r}: no folder or file of that name here; "
        f"presets: {', '.join(PRESETS)} (explicit forms: {PRESET_SCHEME}NAME, {FOLDER_SCHEME}PATH)"
    )


def parse_model_source(name_or_path: str | Path) -> ModelSource:
    """The one "preset name or folder" rule (see the module docstring); UnknownModelError."""
    key = str(name_or_path)
    if key.startswith(PRESET_SCHEME):
        name = key[len(PRESET_SCHEME) :]
        if name not in PRESETS:
            raise _unknown(key)
        return ModelSource("preset", name)
    explicit = key.startswith(FOLDER_SCHEME)
    path = resolve_model(key[len(FOLDER_SCHEME) :] if explicit else key)
    if Path(path).exists():
        return ModelSource("path", path)
    if not explicit and key in PRESETS:
        return ModelSource("preset", key)
    raise _unknown(key)


def resolve_model(name_or_path: str | Path) -> str:
    """``name_or_path`` as given (a ``local-dir:`` scheme stripped), except the default
    ``models/sprc-shapes``, which is also found in the repository of this checkout when the
    command runs from another directory."""
    key = str(name_or_path)
    if key.startswith(FOLDER_SCHEME):
        key = key[len(FOLDER_SCHEME) :]
    if key == DEFAULT_MODEL and not Path(key).is_dir() and (_REPO_ROOT / key).is_dir():
        return str(_REPO_ROOT / key)
    return key


def get_config(name_or_path: str | Path) -> SPRCConfig:
    """A preset by name, or a JSON config file / checkpoint folder (``parse_model_source``'s
    rule: an existing path wins over a preset of the same name; ``preset:``/``local-dir:``)."""
    src = parse_model_source(name_or_path)
    if src.is_preset:
        return PRESETS[src.ref].replace(extra={})
    p = Path(src.ref)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        return SPRCConfig.load(p)
    raise UnknownModelError(f"{src.ref} holds no config.json (not a checkpoint folder)")
