"""SPRC ("Sentence-level Prompts Benefit Composed Image Retrieval", ICLR 2024) on BLIP-2.

One readable file for the forward pass, built on transformers' BLIP-2 modules so that real
``Salesforce/blip2-itm-vit-g`` and LAVIS/SPRC weights load by key mapping (see convert.py).

Shapes (B batch, T ViT tokens, C ViT width, Q queries, H Q-Former width, D embed dim, L text):
  image_features(pixels [B,3,S,S])               -> [B, T, C]   ViT + ln_vision
  target_features(image_embeds [B,T,C])          -> [B, Q, D]   normalised, one row per query
  sentence_prompt(image_embeds, ids, mask)        -> [B, Q, H]   fusion pass query outputs
  fusion_states(image_embeds, ids, mask)          -> [B, Q+L, H] whole fusion pass (re-ranker)
  compose(prompt [B,Q,H], ids, mask)              -> [B, D]      normalised composed query
  text_features(ids, mask)                        -> [B, D]      text-only ([CLS]) path
  prompt_text_features(ids, mask)                 -> [B, D]      rtc path with prompt_tokens
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig, Blip2VisionConfig
from transformers.models.blip_2.modeling_blip_2 import (
    Blip2QFormerModel,
    Blip2TextEmbeddings,
    Blip2VisionModel,
)

from retrieval.config import SPRCConfig


def vision_config(cfg: SPRCConfig) -> Blip2VisionConfig:
    return Blip2VisionConfig(
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=cfg.vision_intermediate_size,
        num_hidden_layers=cfg.vision_num_layers,
        num_attention_heads=cfg.vision_num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        layer_norm_eps=cfg.vision_layer_norm_eps,
        qkv_bias=True,
        initializer_range=cfg.init_std,
    )


def qformer_config(cfg: SPRCConfig) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.qformer_hidden_size,
        num_hidden_layers=cfg.qformer_num_layers,
        num_attention_heads=cfg.qformer_num_heads,
        intermediate_size=cfg.qformer_intermediate_size,
        hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_dropout_prob,
        max_position_embeddings=cfg.max_position_embeddings,
        layer_norm_eps=cfg.qformer_layer_norm_eps,
        cross_attention_frequency=cfg.cross_attention_frequency,
        encoder_hidden_size=cfg.vision_hidden_size,
        # Without this the layers have no text feed-forward and text silently runs through the
        # query FFN: SPRC's second pass needs the text FFN.
        use_qformer_text_input=True,
        initializer_range=cfg.init_std,
    )


@dataclass
class SPRCLosses:
    loss: torch.Tensor  # weighted sum, scalar
    loss_itc: torch.Tensor  # composed query -> target contrastive
    loss_rtc: torch.Tensor  # prompt_tokens text-only -> target contrastive
    loss_align: torch.Tensor  # MSE(mean fusion prompt, mean prompt_tokens.detach())
    logits: torch.Tensor  # [B, B] max-sim / temp of composed queries vs in-batch targets
    loss_caption: torch.Tensor | None = None  # image-caption ITC (BLIP-2 stage 1), if asked


class SPRCModel(nn.Module):
    """BLIP-2 ViT + Q-Former with SPRC's sentence-level prompt."""

    #: Kept in float32 when the model runs in bf16/fp16 (``to_inference_dtype``), as
    #: transformers keeps BLIP-2's ``["query_tokens", "qformer"]``: the ViT is the cost, the
    #: Q-Former side is cheap and decides the ranking. Here that side also holds the Q-Former's
    #: text embeddings, SPRC's prompt tokens, both projections and the temperature.
    _keep_in_fp32_modules = [
        "query_tokens",
        "prompt_tokens",
        "embeddings",
        "qformer",
        "vision_projection",
        "text_projection",
        "temp",
    ]

    def __init__(self, config: SPRCConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        q, h = config.num_query_tokens, config.qformer_hidden_size
        self.vision_model = Blip2VisionModel(vision_config(config))
        # transformers' port gives post_layernorm (= LAVIS ln_vision) the blocks' eps; LAVIS
        # builds ln_vision as a plain nn.LayerNorm, eps 1e-5.
        self.vision_model.post_layernorm.eps = config.ln_vision_eps
        self.query_tokens = nn.Parameter(torch.zeros(1, q, h))
        self.prompt_tokens = nn.Parameter(torch.zeros(1, q, h))  # SPRC only (loss_rtc/align)
        self.embeddings = Blip2TextEmbeddings(qformer_config(config))
        self.qformer = Blip2QFormerModel(qformer_config(config))
        self.vision_projection = nn.Linear(h, config.embed_dim)
        self.text_projection = nn.Linear(h, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor(config.temp_init))

    def set_attn_implementation(self, impl: str) -> None:
        """Pick the attention kernel of the ViT and the Q-Former at run time ("eager" or "sdpa").

        Same maths either way. On CPU with this project's short sequences (10-40 tokens) and
        bf16 autocast, the eager matmul + softmax trains about 1.65x faster than SDPA's fused
        kernel, whose backward dominates a step; in float32 the two are about even
        (benchmarks/attn_precision.py measures all four)."""
        if impl not in ("eager", "sdpa"):
            raise ValueError(f"attention implementation must be 'eager' or 'sdpa', got {impl!r}")
        for module in (self.vision_model, self.qformer):
            module.set_attn_implementation(impl)  # transformers' public API (PreTrainedModel)

    def to_inference_dtype(self, dtype: torch.dtype) -> SPRCModel:
        """Weights in ``dtype`` except ``_keep_in_fp32_modules`` (float32). Blip2QFormerModel
        casts its inputs (queries and the ViT's ``encoder_hidden_states``) to its own dtype, so a
        bf16 ViT feeds a float32 Q-Former without autocast."""
        keep = set(self._keep_in_fp32_modules)
        # cast each part once (never float32 -> bf16 -> float32: that would round the kept ones)
        for name, module in self.named_children():
            module.to(torch.float32 if name in keep else dtype)
        for name, param in self.named_parameters(recurse=False):
            param.data = param.data.to(torch.float32 if name in keep else dtype)
        return self

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """LAVIS-style init for from-scratch models: N(0, 0.02) weights, zero biases, unit
        LayerNorms, N(0, 0.02) query/prompt tokens. transformers would leave ``query_tokens`` at
        zero (all 32 outputs identical) and the ViT at std 1e-10."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                w_std = std
                if self.config.init_scheme == "fan_in":
                    # Narrow from-scratch models: N(0, 0.02) shrinks every projection's output by
                    # ~0.02*sqrt(fan_in), so the image barely reaches the Q-Former outputs (cosine
                    # 0.99999 between different images) and training stalls at chance. At BERT-base
                    # width the two schemes nearly agree; converted checkpoints never init.
                    w_std = max(std, module.weight[0].numel() ** -0.5)
                module.weight.normal_(0.0, w_std, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        emb = self.vision_model.embeddings
        for p in (
            emb.class_embedding,
            emb.position_embedding,
            self.query_tokens,
            self.prompt_tokens,
        ):
            p.normal_(0.0, std, generator=generator)
        self.temp.fill_(self.config.temp_init)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Non-persistent buffers (not in checkpoints): recreate after meta-device loading."""
        pos = self.embeddings.position_ids
        pos.copy_(torch.arange(pos.shape[-1], device=pos.device).expand_as(pos))

    # --------------------------------------------------------------- encoders
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ViT -> ln_vision (transformers: post_layernorm on every token). [B, T, C]."""
        return self.vision_model(pixel_values=pixel_values).last_hidden_state

    def _image_mask(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)

    def target_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Query-only Q-Former pass with cross-attention. [B, Q, D], L2-normalised."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = self.qformer(
            query_embeds=queries,
            query_length=queries.shape[1],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=self._image_mask(image_embeds),
        ).last_hidden_state
        return F.normalize(self.vision_projection(out), dim=-1)

    def sentence_prompt(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Fusion pass: [queries; caption] attend to each other, queries cross-attend to the
        reference image. Returns the Q query outputs (the sentence-level prompt). [B, Q, H]."""
        return self.fusion_states(image_embeds, input_ids, attention_mask)[:, : self.query_len]

    @property
    def query_len(self) -> int:
        return self.query_tokens.shape[1]

    def fusion_states(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The whole fusion pass output: Q prompt rows, then the L caption rows (the caption
        read in the light of the reference; the re-ranker uses both). [B, Q+L, H]."""
        b = image_embeds.shape[0]
        queries = self.query_tokens.expand(b, -1, -1)
        q = queries.shape[1]
        embeds = self.embeddings(input_ids=input_ids, query_embeds=queries)
        mask = torch.cat(
            [
                torch.ones(b, q, dtype=attention_mask.dtype, device=attention_mask.device),
                attention_mask,
            ],
            1,
        )
        out = self.qformer(
            query_embeds=embeds,
            query_length=q,  # explicit: queries use the query FFN + cross-attention, text does not
            attention_mask=mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=self._image_mask(image_embeds),
        ).last_hidden_state
        return out

    def compose(
        self, prompt: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Second pass, no image: [prompt; caption] through the TEXT feed-forward everywhere
        (query_length=0, as SPRC's no-image branch). Caption [CLS] at position Q -> text_proj.
        [B, D], L2-normalised."""
        b, q = prompt.shape[0], prompt.shape[1]
        embeds = self.embeddings(input_ids=input_ids, query_embeds=prompt)
        mask = torch.cat(
            [
                torch.ones(b, q, dtype=attention_mask.dtype, device=attention_mask.device),
                attention_mask,
            ],
            1,
        )
        out = self.qformer(
            query_embeds=embeds, query_length=0, attention_mask=mask
        ).last_hidden_state
        return F.normalize(self.text_projection(out[:, q]), dim=-1)

    def composed_query(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Reference ViT features + caption -> composed query. [B, D]."""
        return self.compose(
            self.sentence_prompt(image_embeds, input_ids, attention_mask), input_ids, attention_mask
        )

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """BLIP-2's text path ([CLS] of a text-only pass). [B, D], L2-normalised."""
        out = self.qformer(
            query_embeds=self.embeddings(input_ids=input_ids),
            query_length=0,
            attention_mask=attention_mask,
        ).last_hidden_state
        return F.normalize(self.text_projection(out[:, 0]), dim=-1)

    def prompt_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """loss_rtc path (SPRC's ``no_img`` embeddings): layout [CLS, prompt_tokens x Q,
        caption tokens...] with position embeddings added to the WHOLE sequence ([CLS] at 0,
        the prompt tokens at 1..Q, the caption's tokens shifted by Q), text FFN only, text_proj
        of position 0. [B, D], L2-normalised."""
        b = input_ids.shape[0]
        emb = self.embeddings
        words = emb.word_embeddings(input_ids)  # [B, L, H], no positions yet
        prompt = self.prompt_tokens.expand(b, -1, -1).to(words.dtype)  # [B, Q, H]
        seq = torch.cat([words[:, :1], prompt, words[:, 1:]], dim=1)  # [B, 1+Q+L-1, H]
        seq = seq + emb.position_embeddings(emb.position_ids[:, : seq.shape[1]])
        ones = torch.ones(
            b, prompt.shape[1], dtype=attention_mask.dtype, device=attention_mask.device
        )
        mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
        # qformer applies the embeddings' LayerNorm + dropout to query_embeds.
        out = self.qformer(query_embeds=seq, query_length=0, attention_mask=mask).last_hidden_state
        return F.normalize(self.text_projection(out[:, 0]), dim=-1)

    # ---------------------------------------------------------------- training
    @staticmethod
    def max_sim(queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[B, D] x [N, Q, D] -> [B, N]: max over each target's Q vectors of the dot product.

        Always float32, also under bf16 autocast: logits / temp reach ~14, where bf16 steps are
        0.06, too coarse for the near-ties between a target and its hard negatives."""
        with torch.autocast(queries.device.type, enabled=False):
            return torch.einsum("bd,nqd->bnq", queries.float(), targets.float()).amax(dim=-1)

    def forward(
        self,
        reference_pixels: torch.Tensor,
        target_pixels: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        weights: tuple[float, float, float] = (1.0, 0.4, 0.4),
        reference_negatives: bool = False,
        captions: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        caption_weight: float = 0.0,
        hard_negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SPRCLosses:
        """SPRC training losses for a batch of triplets (in-batch targets are the negatives).

        ``weights`` = (itc, rtc, align): CIRR uses (1, 0.4, 0.4), FashionIQ (1, 1, 1).
        ``reference_negatives`` adds every reference image, encoded as a target, to the
        negatives: the unedited scene is the hardest wrong answer, and ranking it below the
        target is what forces the caption to be applied. ``logits`` is then [B, 2B].
        ``hard_negatives`` = (pixels [M, 3, H, W], valid [M] bool): more images appended as
        negative columns of the query->target, text->target and caption->image losses
        (invalid ones masked out), e.g. the target with one attribute changed.
        """
        ref = self.image_features(reference_pixels)
        tgt = self.target_features(self.image_features(target_pixels))  # [B, Q, D]
        if reference_negatives or captions is not None:
            both = torch.cat([tgt, self.target_features(ref)], dim=0)  # [2B, Q, D]
            if reference_negatives:
                tgt = both
        hard = hard_valid = None
        if hard_negatives is not None:
            pixels, hard_valid = hard_negatives
            hard = self.target_features(self.image_features(pixels))  # [M, Q, D]
            tgt = torch.cat([tgt, hard], dim=0)
        labels = torch.arange(ref.shape[0], device=ref.device)

        def masked(logits: torch.Tensor) -> torch.Tensor:
            if hard_valid is None:
                return logits
            keep = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
            keep[logits.shape[1] - hard_valid.shape[0] :] = hard_valid
            return logits.masked_fill(~keep, float("-inf"))

        prompt = self.sentence_prompt(ref, input_ids, attention_mask)
        query = self.compose(prompt, input_ids, attention_mask)
        logits = masked(self.max_sim(query, tgt) / self.temp)
        loss_itc = F.cross_entropy(logits, labels)

        rtc_query = self.prompt_text_features(input_ids, attention_mask)
        loss_rtc = F.cross_entropy(masked(self.max_sim(rtc_query, tgt) / self.temp), labels)

        loss_align = F.mse_loss(
            prompt.mean(dim=1), self.prompt_tokens.detach().mean(dim=1).expand(prompt.shape[0], -1)
        )

        w_itc, w_rtc, w_align = weights
        loss = w_itc * loss_itc + w_rtc * loss_rtc + w_align * loss_align
        loss_caption = None
        if captions is not None:
            cap_ids, cap_mask, positives = captions
            cap = self.text_features(cap_ids, cap_mask)
            sim = self.max_sim(cap, both) / self.temp
            t2i, t2i_pos = sim, positives
            if hard is not None:  # a caption must also beat its scene's one-attribute variants
                t2i = masked(torch.cat([sim, self.max_sim(cap, hard) / self.temp], dim=1))
                t2i_pos = torch.cat(
                    [positives, positives.new_zeros(sim.shape[0], hard.shape[0])], 1
                )
            loss_caption = 0.5 * (
                _multi_positive_ce(t2i, t2i_pos) + _multi_positive_ce(sim.t(), positives.t())
            )
            loss = loss + caption_weight * loss_caption
        return SPRCLosses(loss, loss_itc, loss_rtc, loss_align, logits, loss_caption)


def _multi_positive_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy where row i may have several correct columns (``positives[i]``)."""
    pos = logits.masked_fill(~positives, float("-inf")).logsumexp(dim=1)
    return (logits.logsumexp(dim=1) - pos).mean()
