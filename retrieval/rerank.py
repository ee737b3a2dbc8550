"""Second stage: a re-ranker that scores (reference, caption, candidate) jointly.

SPRC's first stage compresses the query into one 256-d vector and scores a candidate by one
dot product (MaxSim). Its misses are near misses: the right scene with one object moved or one
attribute off ranks second. The re-ranker looks at the query and each of the first stage's
top-K candidates together: the candidate's features are paired row by row with the
reference's (the same query slot, or the same ViT patch = the same place in the image), and
these pair tokens cross-attend to the query side (the sentence-level prompt and the caption as
read in the fusion pass). Its score is ``head(CLS) + alpha * first_stage_score``, so an
untrained head leaves the first stage's order.

Two feature sources (``RerankerConfig.features``), measured side by side (model card):
  "targets"  the candidate's Q x D target vectors, already stored in the index: no new storage,
             nothing recomputed at query time (design b of the issue).
  "patches"  the candidate's ViT tokens (ln_vision output, T x C), recomputed from its image
             (design a: what BLIP-2's ITM head sees).

Shapes (B queries, K candidates, Q queries/prompt rows, L caption tokens, T pair rows, F pair
feature width, H Q-Former width, W re-ranker width):
  QueryFeatures.prompt      [B, Q, H]  fusion-pass query outputs (the sentence-level prompt)
  QueryFeatures.text        [B, L, H]  fusion-pass caption rows; text_mask [B, L]
  QueryFeatures.reference   [B, T, F]  the reference's features of the configured source
  candidates                [B, K, T, F]
  first_scores              [B, K]     first-stage MaxSim
  RerankerModel.forward     -> [B, K]  scores (higher = better)
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from retrieval.encoder import Encoder, state_dict_digest
from retrieval.index.api import PATCHES_KEY

logger = logging.getLogger(__name__)

RERANKER_DIR = "reranker"  # sub-folder of an encoder folder that holds its re-ranker
FEATURE_SOURCES = ("targets", "patches")
# Candidates re-ranked per query when a re-ranker is loaded. 25 for the demo's (its first-stage
# weight calibrated on val, retrieval/rerank_calibrate.py): test R@5 >= 97 on seed 0 and three
# fresh worlds, where K = 20 left it at 96.8-96.9; K = 30 adds ~0.3 of R@5 at ~10 % less QPS
# at concurrency 32 (docs/rerank.md)
DEFAULT_RERANK_K = 25
# Smallest call (queries x candidates) that a CPU scores under bf16 autocast: below it the
# casts cost more than the bf16 matmuls save (1 query x 25-50: fp32 1.1-1.4x faster; from
# 8 x 25 on, bf16 1.2-1.7x faster, on AMX; 2026-12-07, docs/rerank.md)
CPU_BF16_MIN_CANDIDATES = 150


def encode_patches(tokens: np.ndarray) -> str:
    """[T, C] float -> the payload text (float16, base64)."""
    return base64.b64encode(np.ascontiguousarray(tokens, dtype=np.float16).tobytes()).decode()


def decode_patches(text: str, rows: int, dim: int) -> np.ndarray:
    """The payload text -> [T, C] float32; ValueError when it is not T x C float16."""
    raw = base64.b64decode(text, validate=True)
    if len(raw) != rows * dim * 2:
        raise ValueError(f"{PATCHES_KEY} holds {len(raw)} bytes, expected {rows}x{dim} float16")
    return np.frombuffer(raw, dtype=np.float16).reshape(rows, dim).astype(np.float32)


def stores_patches(model_folder: str | Path, encoder_fingerprint: str) -> bool:
    """True when the folder's re-ranker reads candidates' ViT tokens (the "patches" source) and
    was trained on this encoder: the index must then store them with every point."""
    folder = find_reranker(model_folder) if Path(model_folder).is_dir() else None
    if folder is None:
        return False
    cfg = json.loads((folder / "config.json").read_text())
    return cfg.get("features") == "patches" and cfg.get("encoder") == encoder_fingerprint


@dataclass
class RerankerConfig:
    features: str = "targets"  # "targets" (stored Q x D vectors) | "patches" (ViT tokens)
    width: int = 128  # W: re-ranker hidden size
    layers: int = 2  # blocks of (self-attention over pair tokens, cross-attention, FFN)
    heads: int = 4  # attention heads
    ffn_mult: int = 4  # FFN width = ffn_mult * width
    dropout: float = 0.0  # attention/FFN dropout (training only)
    pair_rows: int = 16  # T: rows per image (Q for targets, ViT tokens for patches)
    pair_dim: int = 256  # F: width of one row (D for targets, C for patches)
    query_dim: int = 192  # H: Q-Former width (prompt and caption rows)
    alpha_init: float = 14.0  # weight of the first-stage score at init (~1 / SPRC temp)
    encoder: str = ""  # fingerprint of the first-stage encoder it was trained on (guard)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RerankerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown re-ranker config keys: {unknown}")
        return cls(**d)

    def validate(self) -> None:
        if self.features not in FEATURE_SOURCES:
            raise ValueError(f"features must be one of {FEATURE_SOURCES}, got {self.features!r}")
        if self.width % self.heads:
            raise ValueError("width must be divisible by heads")

    @classmethod
    def for_encoder(cls, encoder: Encoder, features: str = "targets", **kw: Any) -> RerankerConfig:
        c = encoder.model.config
        if features == "targets":
            rows, dim = c.num_query_tokens, c.embed_dim
        else:
            rows, dim = c.num_image_tokens, c.vision_hidden_size
        cfg = cls(
            features=features,
            pair_rows=rows,
            pair_dim=dim,
            query_dim=c.qformer_hidden_size,
            encoder=encoder.fingerprint,
            **kw,
        )
        cfg.validate()
        return cfg


@dataclass
class QueryFeatures:
    """The query side, computed once per query (see the module's shape table)."""

    prompt: torch.Tensor  # [B, Q, H]
    text: torch.Tensor  # [B, L, H]
    text_mask: torch.Tensor  # [B, L] bool, True = a real token
    reference: torch.Tensor  # [B, T, F]
    query: torch.Tensor  # [B, D] the composed query (first stage)

    def astuple(self) -> tuple[torch.Tensor, ...]:
        return (self.prompt, self.text, self.text_mask, self.reference, self.query)

    def select(self, rows: torch.Tensor | list[int]) -> QueryFeatures:
        return QueryFeatures(*(t[rows] for t in self.astuple()))

    @classmethod
    def cat(cls, parts: list[QueryFeatures]) -> QueryFeatures:
        """Rows of several queries in one batch; caption rows padded to the longest."""
        longest = max(p.text.shape[1] for p in parts)

        def pad(p: QueryFeatures) -> QueryFeatures:
            extra = longest - p.text.shape[1]
            if not extra:
                return p
            return QueryFeatures(
                p.prompt,
                F.pad(p.text, (0, 0, 0, extra)),
                F.pad(p.text_mask, (0, extra)),
                p.reference,
                p.query,
            )

        padded = [pad(p) for p in parts]
        return cls(*(torch.cat(ts) for ts in zip(*(p.astuple() for p in padded), strict=True)))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> QueryFeatures:
        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)

        return QueryFeatures(*(move(t) for t in self.astuple()))


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v over [..., S, d] x [..., M, d]. The softmax is written
    out: torch's CPU kernel (and SDPA's) costs ~6x more on rows this short (M = 11-30)."""
    # float32 elementwise: bf16 ones are slower on CPU (and less exact) than the conversion
    att = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if bias is not None:
        att = att + bias
    att = (att - att.amax(-1, keepdim=True)).exp()
    att = att / att.sum(-1, keepdim=True)
    if dropout > 0:
        att = F.dropout(att, dropout)
    return torch.matmul(att.to(v.dtype), v)


class _Block(nn.Module):
    """Pre-norm: self-attention over one candidate's tokens, cross-attention to the query
    side (its keys/values computed once per query, not once per candidate), FFN."""

    def __init__(self, cfg: RerankerConfig) -> None:
        super().__init__()
        w = cfg.width
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(w)
        self.self_attn = nn.MultiheadAttention(w, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(w)
        self.q = nn.Linear(w, w)
        self.kv = nn.Linear(w, 2 * w)
        self.o = nn.Linear(w, w)
        self.norm3 = nn.LayerNorm(w)
        self.ffn = nn.Sequential(
            nn.Linear(w, cfg.ffn_mult * w),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.ffn_mult * w, w),
        )
        self.drop = nn.Dropout(cfg.dropout)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, M, W] -> keys, values [B, heads, M, W/heads]."""
        b, m, w = memory.shape
        k, v = self.kv(memory).view(b, m, 2, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mem_bias: torch.Tensor
    ) -> torch.Tensor:
        """x [B, K, S, W]; kv from memory_kv; mem_bias [B, 1, 1, M] (0 or -inf)."""
        b, k, s, w = x.shape
        hd = w // self.heads
        # self-attention within each candidate, with nn.MultiheadAttention's weights (and its
        # attention dropout) but written out: its native path is slow at these short lengths
        sa = self.self_attn
        qkv = F.linear(self.norm1(x).view(b * k, s, w), sa.in_proj_weight, sa.in_proj_bias)
        q, kk, v = qkv.view(b * k, s, 3, self.heads, hd).permute(2, 0, 3, 1, 4)  # [BK,h,S,d]
        att = _attend(q, kk, v, dropout=sa.dropout if self.training else 0.0)
        att = att.transpose(1, 2).reshape(b, k, s, w)
        x = x + self.drop(F.linear(att, sa.out_proj.weight, sa.out_proj.bias))
        # cross-attention to the query side: the K candidates' S tokens of a query attend to
        # the same memory, so they are one [K*S]-long query sequence per (query, head)
        q = self.q(self.norm2(x)).view(b, k * s, self.heads, hd).transpose(1, 2)  # [B,h,KS,d]
        keys, values = kv  # [B, h, M, d]
        out = _attend(q, keys, values, mem_bias)
        x = x + self.drop(self.o(out.transpose(1, 2).reshape(b, k, s, w)))
        return x + self.drop(self.ffn(self.norm3(x)))


class RerankerModel(nn.Module):
    """Scores [B, K] candidates for B queries; see the module docstring."""

    def __init__(self, config: RerankerConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        w = config.width
        self.query_in = nn.Linear(config.query_dim, w)
        self.query_type = nn.Parameter(torch.zeros(2, w))  # 0: prompt row, 1: caption row
        # A candidate row x next to the reference's row r of the same slot / patch: W(x - r),
        # W(x * r) per candidate, W(r) once per query (x itself is their linear combination).
        # Inputs are normalised first: target vectors are unit-norm (components ~ D^-0.5), so
        # their differences and products would otherwise reach the model ~16x too small.
        self.pair_norm = nn.LayerNorm(2 * config.pair_dim)
        self.pair_in = nn.Linear(2 * config.pair_dim, w)
        self.ref_norm = nn.LayerNorm(config.pair_dim)
        self.ref_in = nn.Linear(config.pair_dim, w)
        self.pair_pos = nn.Parameter(torch.zeros(config.pair_rows, w))  # slot / patch index
        self.cls = nn.Parameter(torch.zeros(1, w))
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, 1)
        self.alpha = nn.Parameter(torch.tensor(float(config.alpha_init)))
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        for p in (self.query_type, self.pair_pos, self.cls):
            nn.init.trunc_normal_(p, std=0.02)
        self.head.weight.zero_()  # at init the score is alpha * first-stage score
        self.alpha.fill_(self.config.alpha_init)

    def encode_query(
        self, feats: QueryFeatures
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Once per query: per-block keys/values of [prompt; caption] and their mask bias."""
        mem = torch.cat(
            [
                self.query_in(feats.prompt) + self.query_type[0],
                self.query_in(feats.text) + self.query_type[1],
            ],
            dim=1,
        )  # [B, Q+L, W]
        keep = torch.cat(
            [
                torch.ones(feats.prompt.shape[:2], dtype=torch.bool, device=mem.device),
                feats.text_mask.bool(),
            ],
            dim=1,
        )
        bias = torch.zeros(keep.shape, dtype=mem.dtype, device=mem.device)
        bias = bias.masked_fill(~keep, float("-inf"))[:, None, None, :]  # [B, 1, 1, M]
        blocks: list[_Block] = list(self.blocks)  # type: ignore[arg-type]
        return [blk.memory_kv(mem) for blk in blocks], bias

    def forward(
        self, feats: QueryFeatures, candidates: torch.Tensor, first_scores: torch.Tensor
    ) -> torch.Tensor:
        """feats (B queries), candidates [B, K, T, F], first_scores [B, K] -> [B, K]."""
        kvs, bias = self.encode_query(feats)
        b, k = candidates.shape[:2]
        r = feats.reference[:, None]  # [B, 1, T, F]
        pairs = torch.cat(torch.broadcast_tensors(candidates - r, candidates * r), dim=-1)
        ref = self.ref_in(self.ref_norm(feats.reference)) + self.pair_pos  # once per query
        x = self.pair_in(self.pair_norm(pairs)) + ref[:, None]  # [B, K, T, W]
        x = torch.cat([self.cls.expand(b, k, 1, -1), x], dim=2)
        for blk, kv in zip(self.blocks, kvs, strict=True):
            x = blk(x, kv, bias)
        out = self.head(self.norm(x[:, :, 0])).squeeze(-1)  # [B, K]
        # float32 sum: under bf16 autocast the head's output is bf16, the first-stage term not
        return out.float() + self.alpha * first_scores.float()


# ------------------------------------------------------------------ features from the encoder
@torch.inference_mode()
def query_features(
    encoder: Encoder, ref_features: torch.Tensor, texts: list[str], source: str
) -> QueryFeatures:
    """Reference ViT features [B, T, C] (``Encoder.reference_features``) + captions -> the
    query side, float32 on the encoder's device."""
    model = encoder.model
    tok = encoder.tokenizer(texts, device=encoder.device)
    img = ref_features.to(device=encoder.device, dtype=encoder.dtype)
    states = model.fusion_states(img, tok.input_ids, tok.attention_mask)  # [B, Q+L, H]
    q = model.query_len
    prompt, text = states[:, :q], states[:, q:]
    query = model.compose(prompt, tok.input_ids, tok.attention_mask)
    reference = model.target_features(img) if source == "targets" else img
    return QueryFeatures(
        prompt.float(),
        text.float(),
        tok.attention_mask.bool(),
        reference.float(),
        query.float(),
    )


@torch.inference_mode()
def candidate_patches(encoder: Encoder, pixel_values: torch.Tensor) -> torch.Tensor:
    """Preprocessed pixels [N, 3, S, S] -> ViT tokens [N, T, C] float32 ("patches" source)."""
    px = pixel_values.to(device=encoder.device, dtype=encoder.dtype)
    return encoder.model.image_features(px).float()


# ------------------------------------------------------------------ the loaded re-ranker
class RerankerError(ValueError):
    """A re-ranker folder that cannot be used (missing, corrupt, or for another encoder)."""


class Reranker:
    """A trained re-ranker with its config; device and dtype fixed at load."""

    def __init__(
        self, model: RerankerModel, device: str | torch.device = "cpu", bf16: bool | None = None
    ) -> None:
        self.model = model.to(device).eval()
        self.config = model.config
        self.device = torch.device(device)
        # bf16 autocast where the hardware has it (CUDA; CPUs with AVX512-BF16/AMX; on a CPU
        # only for calls of CPU_BF16_MIN_CANDIDATES+): faster batches at the same ranking
        # (docs/rerank.md); weights stay fp32
        self.bf16 = native_bf16(self.device) if bf16 is None else bf16
        digest = state_dict_digest(model.state_dict())
        blob = json.dumps(self.config.to_dict(), sort_keys=True) + digest
        self.fingerprint = (
            f"rerank-{self.config.features}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
        )

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device = "cpu", bf16: bool | None = None
    ) -> Reranker:
        folder = Path(folder)
        cfg_path, w_path = folder / "config.json", folder / "model.safetensors"
        if not cfg_path.is_file() or not w_path.is_file():
            raise RerankerError(
                f"{folder} is not a re-ranker folder (config.json + model.safetensors)"
            )
        try:
            config = RerankerConfig.from_dict(json.loads(cfg_path.read_text()))
            model = RerankerModel(config)
            state = {k: v.float() for k, v in load_file(str(w_path)).items()}
            model.load_state_dict(state, strict=True)
        except Exception as exc:  # safetensors raises its own error type for a corrupt file
            raise RerankerError(f"cannot load the re-ranker in {folder}: {exc}") from exc
        return cls(model, device, bf16)

    def save_pretrained(
        self, folder: str | Path, weights_dtype: torch.dtype = torch.float16
    ) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            k: v.detach().to("cpu", weights_dtype).contiguous()
            for k, v in self.model.state_dict().items()
        }
        save_file(state, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        return folder

    def check_encoder(self, encoder: Encoder) -> None:
        """The model guard: a re-ranker reads one encoder's features and no other's."""
        if self.config.encoder and self.config.encoder != encoder.fingerprint:
            raise RerankerError(
                f"the re-ranker was trained on encoder {self.config.encoder}, "
                f"not on {encoder.fingerprint}: retrain it (cir train-reranker)"
            )

    def uses_bf16(self, n_candidates: int) -> bool:
        """bf16 autocast for a call over ``n_candidates`` (B x K) candidates: on CUDA always
        (with ``bf16``); on a CPU only from :data:`CPU_BF16_MIN_CANDIDATES` on."""
        if not self.bf16:
            return False
        return self.device.type != "cpu" or n_candidates >= CPU_BF16_MIN_CANDIDATES

    @torch.inference_mode()
    def score(
        self, feats: QueryFeatures, candidates: torch.Tensor, first_scores: torch.Tensor
    ) -> torch.Tensor:
        """[B, K] re-ranked scores (float32, on the CPU)."""
        bf16 = self.uses_bf16(candidates.shape[0] * candidates.shape[1])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = self.model(
                feats.to(self.device, torch.float32),
                candidates.to(self.device, torch.float32),
                first_scores.to(self.device, torch.float32),
            )
        return out.float().cpu()


def native_bf16(device: torch.device) -> bool:
    """bfloat16 matmuls in hardware: CUDA, or a CPU with AVX512-BF16 / AMX."""
    if device.type == "cuda":
        return True
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def find_reranker(encoder_folder: str | Path) -> Path | None:
    """The re-ranker folder inside an encoder folder, when it has one."""
    p = Path(encoder_folder) / RERANKER_DIR
    return p if (p / "config.json").is_file() else None


def load_reranker_for(
    model: str | Path,
    reranker_dir: str | Path | None,
    encoder: Encoder,
    device: str | torch.device = "cpu",
) -> Reranker | None:
    """The explicit ``reranker_dir``, else MODEL/reranker when the model folder has one, else
    None; checked against the encoder it will re-rank for (RerankerError otherwise)."""
    folder = Path(reranker_dir) if reranker_dir is not None else find_reranker(model)
    if folder is None:
        return None
    rr = Reranker.from_pretrained(folder, device=device)
    rr.check_encoder(encoder)
    return rr


def listwise_loss(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy with the positive in column 0; invalid columns masked. [B, K]."""
    scores = scores.masked_fill(~valid, float("-inf"))
    return F.cross_entropy(
        scores, torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    )


class RerankPixelScorer:
    """The re-ranker's score as a differentiable function of pixels and caption ids (the
    ``retrieval.explain.PixelScorer`` protocol): what ``Explain`` explains when the server
    re-ranks. Runs the images through ``model.vision_model`` and the caption through its word
    embeddings, as the serving path does (first stage + re-ranker, float32, no autocast)."""

    def __init__(self, model: Any, reranker: Reranker) -> None:
        self.model = model  # the encoder's SPRCModel
        self.reranker = reranker

    def score_pixels(
        self,
        ref_pixels: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cand_pixels: torch.Tensor,
    ) -> torch.Tensor:
        """[B, 3, S, S] x2 + [B, L] -> [B] re-ranked scores."""
        m = self.model
        return self.score_images(
            m.image_features(ref_pixels), input_ids, attention_mask, m.image_features(cand_pixels)
        )

    def score_images(
        self,
        img_r: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        img_c: torch.Tensor,
    ) -> torch.Tensor:
        """``score_pixels`` from the ViT outputs [B, T, C] of both images (no ViT pass)."""
        m = self.model
        states = m.fusion_states(img_r, input_ids, attention_mask)
        q = m.query_len
        prompt, text = states[:, :q], states[:, q:]
        query = m.compose(prompt, input_ids, attention_mask)
        targets = m.target_features(img_c)  # [B, Q, D]
        first = torch.einsum("bd,bqd->bq", query.float(), targets.float()).amax(-1)
        patches = self.reranker.config.features == "patches"
        feats = QueryFeatures(
            prompt.float(),
            text.float(),
            attention_mask.bool(),
            (img_r if patches else m.target_features(img_r)).float(),
            query.float(),
        )
        cand = (img_c if patches else targets).float()[:, None]  # one candidate per row
        return self.reranker.model(feats, cand, first[:, None])[:, 0]
