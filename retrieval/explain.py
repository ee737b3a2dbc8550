"""Why this result: maps on the candidate and the reference, and per-word attributions.

For one (reference, caption, candidate) triple, :class:`Explainer` explains the score that
ordered the results: MaxSim by default, or any :class:`PixelScorer` (e.g. a re-ranker) passed in.

    ex = Explainer(encoder)                       # or Explainer(encoder, scorer=reranker)
    e = ex.explain(reference_image, "make the circle red", candidate_image)
    e.score            # float: the explained score
    e.candidate_map    # [rows, cols] float32 >= 0: Grad-CAM on the candidate's ViT patch tokens,
                       #   against the reference's (``contrast``, the default)
    e.reference_map    # [rows, cols] float32 >= 0: the same on the reference's, against the candidate's
    e.attention_map    # [rows, cols] float32 >= 0: winning target query's cross-attention
    e.words            # [WordScore(word, score)]: signed; by default the score's margin over the
                       #   reference lost when the word is masked (``occlusion``), WordPieces summed
    png = ex.overlay_png(candidate_image, e.candidate_map)   # the map over the model's view

Shapes (S image side, P = (S / patch)^2 patch tokens as a rows x cols grid, T = P + 1 ViT
tokens with [CLS] first, C ViT width, L caption tokens incl. [CLS]/[SEP], Q target queries):

* Grad-CAM on the ViT's output tokens A [T, C] (after ln_vision, what the Q-Former reads) with
  G = d score / d A [T, C], [CLS] dropped (it has no place). Default ``contrast``: the
  activations taken against the other image of the pair, B (the reference's tokens for the
  candidate map, the candidate's for the reference map), map = |sum_c (A - B) * G| [P] ->
  [rows, cols]: the first-order change of the score if the patch were the other image's, so a
  patch both images share scores ~0 and the cells the edit changed stand out (on the shapes
  world the candidate map of the true target peaks on the edited cell for 83 % of single edits
  with the re-ranker's score, against 22 % for ``hirescam``: docs/benchmarks.md). ``hirescam``
  (Draelos & Carin): each patch token's activations weighted by its own gradient, map =
  ReLU(sum_c A * G). ``gradcam`` (Selvaraju et al.) shares one channel weight vector, the
  gradient averaged over the patches: ReLU(A @ mean_t G). ViT tokens are not a CNN's spatial
  map with shared channel meanings: the shared weights often give an all-zero map (always with
  random weights), and benchmarks/explain.py finds the per-token form as good or better.
* The attention map needs no gradient: the target query q* = argmax_q <query, t_q> that wins
  MaxSim, and its cross-attention to the candidate's P patch tokens, averaged over heads and
  over the Q-Former's cross-attention layers (the [CLS] column dropped). It always explains
  the first-stage MaxSim match, also when a re-ranker's score is explained.
* Word attribution (``words``, :data:`WORD_METHODS`), per word of the cleaned caption (BERT
  pre-tokenisation; WordPieces summed; words cut off by the token limit get 0). Positive: the
  word raised the score. Gradient x input (``input``): for each WordPiece, sum over H of
  (d score / d e) * e, with e [L, H] the word embeddings (before position embeddings) of every
  pass that reads the caption; ``mask`` uses e - e_[MASK]; ``contrast`` explains the margin
  S(ref, text, cand) - S(ref, text, ref) instead of the score. ``occlusion`` (the default)
  is gradient-free: the margin minus the margin with the word's WordPieces replaced by
  [MASK], all variants in one batched pass (the ViT runs once per image). On the shapes world
  the new value's word ranks in the top two for 83 % of single edits with occlusion, against
  41-42 % for gradient x input (64 % for its margin form): a first-order view of the text
  pass is mostly noise here (docs/benchmarks.md).

Any scorer is explained through hooks on the model's ViT and word embeddings, so a scorer only
has to run ``encoder.model`` on the pixels and ids it is given (in batches of its choosing):
the explainer finds the rows whose input equals the reference / candidate pixels / caption ids.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from retrieval.imageio import to_rgb
from retrieval.modeling_sprc import SPRCModel
from retrieval.tokenization import clean_caption

logger = logging.getLogger(__name__)

#: Default side of a rendered overlay, pixels (the model's view is upscaled to at least this).
OVERLAY_SIZE = 224
#: Overlay opacity at the map's maximum.
OVERLAY_ALPHA = 0.6


@runtime_checkable
class PixelScorer(Protocol):
    """A differentiable score of (reference, caption, candidate); higher = better match."""

    def score_pixels(
        self,
        ref_pixels: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cand_pixels: torch.Tensor,
    ) -> torch.Tensor:
        """``ref_pixels``/``cand_pixels`` [B, 3, S, S] preprocessed (model dtype and device),
        ``input_ids``/``attention_mask`` [B, L] -> scores [B]. Must be differentiable and run
        the images through ``model.vision_model`` and the caption through
        ``model.embeddings.word_embeddings`` (Grad-CAM and word attribution hook there)."""
        ...


class MaxSimScorer:
    """The first-stage score: MaxSim of the composed query over the candidate's Q vectors."""

    def __init__(self, model: SPRCModel) -> None:
        self.model = model

    def query_sims(
        self,
        ref_pixels: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cand_pixels: torch.Tensor,
    ) -> torch.Tensor:
        """Per target query dot products [B, Q] (float32); MaxSim is their max."""
        m = self.model
        return self._sims(m.image_features(ref_pixels), input_ids, attention_mask,
                          m.image_features(cand_pixels))  # fmt: skip

    def _sims(
        self, img_r: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, img_c: torch.Tensor
    ) -> torch.Tensor:
        m = self.model
        query = m.composed_query(img_r, ids, mask)
        targets = m.target_features(img_c)  # [B, Q, D]
        return torch.einsum("bd,bqd->bq", query.float(), targets.float())

    def score_images(
        self, img_r: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, img_c: torch.Tensor
    ) -> torch.Tensor:
        """``score_pixels`` from the ViT outputs [B, T, C] of both images (no ViT pass)."""
        return self._sims(img_r, ids, mask, img_c).amax(dim=-1)

    def score_pixels(
        self,
        ref_pixels: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cand_pixels: torch.Tensor,
    ) -> torch.Tensor:
        return self.query_sims(ref_pixels, input_ids, attention_mask, cand_pixels).amax(dim=-1)


@dataclass(frozen=True)
class WordScore:
    word: str  # a word of the cleaned (lower-cased) caption
    score: float  # signed attribution of the Explainer's word method (see WORD_METHODS)


@dataclass(frozen=True)
class Explanation:
    """One explained (reference, caption, candidate) score. Maps are [rows, cols] float32,
    row-major over the patch grid, >= 0, larger = more important."""

    score: float
    candidate_map: np.ndarray  # Grad-CAM on the candidate's patch tokens
    reference_map: np.ndarray  # Grad-CAM on the reference's patch tokens
    attention_map: np.ndarray | None  # winning target query's cross-attention (None: skipped)
    words: list[WordScore]
    tokens: list[str] = field(default_factory=list)  # caption WordPieces read by the model
    token_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # [n]
    winning_query: int = -1  # q* of the attention map (-1: skipped)
    #: every CAM method's maps, keyed "candidate/<method>" and "reference/<method>", and
    #: "<which>/contrast_signed" (the contrast map before its absolute value)
    variants: dict[str, np.ndarray] = field(default_factory=dict)
    #: every word attribution baseline's words, keyed by :data:`WORD_METHODS`
    word_variants: dict[str, list[WordScore]] = field(default_factory=dict)


#: CAM variants: each weights the patch tokens' activations by the score's gradient.
#: ``gradcam`` and ``hirescam`` keep what raises the score (ReLU); ``contrast`` takes the
#: activations relative to a baseline, the other image of the pair: |sum_c (A - B) * G|, the
#: first-order change of the score if the patch became the other image's, either way.
CAM_METHODS = ("gradcam", "hirescam", "contrast")
#: Word attribution baselines: ``input`` = gradient x input (a zero baseline, which is also the
#: [PAD] embedding: BERT's padding row is zero); ``mask`` = gradient x (input - the [MASK]
#: embedding); ``contrast`` = gradient x input of the score's margin over the reference itself
#: as the candidate, S(ref, text, cand) - S(ref, text, ref): what in the caption makes this
#: result win over simply returning the reference (one more pass, with the reference as the
#: candidate). Words the two share (the edited object's name) cancel; the new value remains.
#: ``occlusion`` (gradient-free): how much that margin falls when the word's WordPieces are
#: replaced by [MASK] (one scorer pass per word, no linearisation).
WORD_METHODS = ("input", "mask", "contrast", "occlusion")


def grad_cam(
    tokens: torch.Tensor,
    grads: torch.Tensor,
    rows: int,
    cols: int,
    method: str = "gradcam",
    baseline: torch.Tensor | None = None,
    signed: bool = False,
) -> np.ndarray:
    """A CAM over ViT tokens: ``tokens``/``grads`` [T, C] (prefix tokens such as [CLS] first)
    -> [rows, cols] float32 >= 0. ``gradcam`` (Selvaraju et al.): ReLU(A @ w), w = the gradient
    averaged over the patch tokens [C]; ``hirescam`` (Draelos & Carin): ReLU(sum_c A * G), each
    token weighted by its own gradient; ``contrast``: |sum_c (A - B) * G| with ``baseline``
    B [T, C] the other image's tokens: where this image differs from the other in a way the
    score is sensitive to (a patch the edit changed, added or emptied scores high, a patch
    both images share scores ~0). ``signed``: the values before the ReLU / absolute value."""
    p = rows * cols
    a, g = tokens[-p:].float(), grads[-p:].float()
    if method == "gradcam":
        cam = a @ g.mean(dim=0)
    elif method == "hirescam":
        cam = (a * g).sum(dim=-1)
    elif method == "contrast":
        if baseline is None:
            raise ValueError("the contrast CAM needs a baseline (the other image's tokens)")
        cam = ((a - baseline[-p:].float()) * g).sum(dim=-1)
    else:
        raise ValueError(f"cam method must be one of {CAM_METHODS}, got {method!r}")
    if not signed:
        cam = cam.abs() if method == "contrast" else torch.relu(cam)
    return cam.reshape(rows, cols).detach().cpu().numpy().astype(np.float32)


def word_spans(tokenizer: Any, text: str) -> tuple[list[str], list[int | None], list[str]]:
    """(words, word index of each token of the encoded caption incl. [CLS]/[SEP] (None for
    those), token strings), with the tokenizer's own normalisation, pre-tokenisation and
    truncation, so that token i of ``tokenizer([text]).input_ids`` belongs to word
    ``word_ids[i]``."""
    tok = tokenizer._tok  # the `tokenizers.Tokenizer` inside QFormerTokenizer
    cleaned = clean_caption(text)
    normalized = tok.normalizer.normalize_str(cleaned) if tok.normalizer else cleaned
    words = [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(normalized)]
    enc = tok.encode(cleaned)
    return words, list(enc.word_ids), list(enc.tokens)


class _Taps:
    """Forward hooks that record, for the calling thread only, every ViT output, every word
    embedding lookup (replaced by a leaf so its gradient can be taken) and every Q-Former
    cross-attention's probabilities."""

    def __init__(self, model: SPRCModel, attention: bool) -> None:
        self.model = model
        self.thread = threading.get_ident()
        self.vit: list[tuple[torch.Tensor, torch.Tensor]] = []  # (pixels, tokens [B, T, C])
        self.words: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ids, leaf [B, L, H])
        self.cross: list[tuple[int, torch.Tensor]] = []  # (data_ptr of keys, probs [B,h,Q,T])
        self.attention = attention

    def _mine(self) -> bool:
        return threading.get_ident() == self.thread

    def _on_vit(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        if self._mine():
            pixels = kwargs.get("pixel_values", args[0] if args else None)
            self.vit.append((pixels.detach(), output[0]))

    def _on_words(self, module: Any, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not self._mine():
            return None
        leaf = output.detach().requires_grad_(True)
        self.words.append((args[0].detach(), leaf))
        # a copy: Blip2TextEmbeddings adds the positions in place, which a leaf cannot take
        return leaf.clone()

    def _on_cross(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        if not self._mine():
            return
        keys = kwargs.get("encoder_hidden_states")
        if keys is None:
            return
        probs = output[1]
        if probs is None:  # SDPA/flash kernels return no weights: recompute them (same maths)
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            b, n = hidden.shape[:2]
            h, d = module.num_attention_heads, module.attention_head_size
            q = module.query(hidden).view(b, n, h, d).transpose(1, 2)
            k = module.key(keys).view(b, keys.shape[1], h, d).transpose(1, 2)
            probs = torch.softmax((q @ k.transpose(-1, -2)).float() * module.scaling, dim=-1)
        self.cross.append((keys.data_ptr(), probs.detach().float()))

    @contextmanager
    def installed(self) -> Iterator[_Taps]:
        m = self.model
        handles = [
            m.vision_model.register_forward_hook(self._on_vit, with_kwargs=True),
            m.embeddings.word_embeddings.register_forward_hook(self._on_words),
        ]
        if self.attention:
            for layer in m.qformer.encoder.layer:
                cross = getattr(layer, "crossattention", None)
                if cross is not None:
                    handles.append(
                        cross.attention.register_forward_hook(self._on_cross, with_kwargs=True)
                    )
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _find(
        records: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor
    ) -> list[tuple[torch.Tensor, int]]:
        """(recorded output, offset) of every call whose input rows offset..offset+N equal
        ``x`` [N, ...] (a scorer may batch several inputs, e.g. [ref; cand], into one call).
        Gradients must be taken w.r.t. the recorded output: a row sliced after the forward
        pass is not part of the graph."""
        n = x.shape[0]
        found = []
        for inp, out in records:
            if inp.shape[1:] != x.shape[1:]:
                continue
            for off in range(0, inp.shape[0] - n + 1, n):
                if torch.equal(inp[off : off + n].to(x.dtype), x):
                    found.append((out, off))
        return found

    def image_calls(self, pixels: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """ViT outputs [B, T, C] (with the row offset) of every call on ``pixels``."""
        return self._find(self.vit, pixels)

    def word_calls(self, ids: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """Word-embedding leaves [B, L, H] (with the row offset) of every lookup of ``ids``."""
        return self._find(self.words, ids)


class Explainer:
    """Explanations for an :class:`~retrieval.encoder.Encoder`'s model (or ``scorer``).

    Thread-safe: the hooks only record the thread that is explaining. Runs in float32 or in
    the encoder's dtype (gradients in that dtype)."""

    def __init__(
        self,
        encoder: Any,
        scorer: PixelScorer | None = None,
        cam: str = "contrast",
        words: str = "occlusion",
        all_words: bool = False,
    ) -> None:
        if cam not in CAM_METHODS:
            raise ValueError(f"cam must be one of {CAM_METHODS}, got {cam!r}")
        if words not in WORD_METHODS:
            raise ValueError(f"words must be one of {WORD_METHODS}, got {words!r}")
        self.cam = cam
        self.words_method = words
        #: compute every word method (benchmarks), not only ``words`` ("contrast" costs a pass)
        self.word_methods = WORD_METHODS if all_words else (words,)
        self.encoder = encoder
        self.model: SPRCModel = encoder.model
        self.maxsim = MaxSimScorer(self.model)
        self.scorer: PixelScorer = scorer if scorer is not None else self.maxsim
        cfg = self.model.config
        self.rows = self.cols = cfg.image_size // cfg.patch_size

    # ------------------------------------------------------------------ inputs
    def view(self, image: Image.Image) -> Image.Image:
        """The square crop the model sees (TargetPad, resize, centre crop), as RGB."""
        pre = self.encoder.preprocessor
        return pre.resize_crop(pre.target_pad(to_rgb(image)))  # type: ignore[no-any-return]

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """list[PIL] -> [N, 3, S, S] on the model's device and dtype."""
        return self.encoder.preprocess(images).to(self.encoder.device, self.encoder.dtype)

    def _tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.encoder.tokenizer(texts, device=self.encoder.device)
        return tok.input_ids, tok.attention_mask

    # ------------------------------------------------------------------ scoring
    def score(
        self, ref_pixels: torch.Tensor, texts: list[str], cand_pixels: torch.Tensor
    ) -> np.ndarray:
        """Scores [N] of N triples without gradients (e.g. for deletion tests)."""
        ids, mask = self._tokens(texts)
        with torch.inference_mode():
            s = self.scorer.score_pixels(ref_pixels, ids, mask, cand_pixels)
        return s.float().cpu().numpy()

    # ------------------------------------------------------------------ explain
    def explain(
        self,
        reference: Image.Image,
        text: str,
        candidate: Image.Image,
        *,
        attention: bool = True,
    ) -> Explanation:
        """Explain the score of (``reference``, ``text``, ``candidate``) (PIL images)."""
        px = self.pixels([reference, candidate])
        return self.explain_pixels(px[:1], text, px[1:], attention=attention)

    def explain_pixels(
        self,
        ref_pixels: torch.Tensor,
        text: str,
        cand_pixels: torch.Tensor,
        *,
        attention: bool = True,
    ) -> Explanation:
        """Explain one triple from preprocessed pixels [1, 3, S, S] (or [3, S, S])."""
        ref = ref_pixels.reshape(1, *ref_pixels.shape[-3:])
        cand = cand_pixels.reshape(1, *cand_pixels.shape[-3:])
        return self.explain_batch(ref, [text], cand, attention=attention)[0]

    def explain_batch(
        self,
        ref_pixels: torch.Tensor,
        texts: list[str],
        cand_pixels: torch.Tensor,
        *,
        attention: bool = True,
    ) -> list[Explanation]:
        """Explain N triples at once: pixels [N, 3, S, S], N texts. The rows of a batch do not
        interact, so the gradient of the summed scores gives each row its own.
        ``attention=False`` skips the attention map (one pass fewer with a re-ranker)."""
        n = len(texts)
        if ref_pixels.shape[0] != n or cand_pixels.shape[0] != n:
            raise ValueError("explain_batch needs one reference and one candidate per text")
        for i, t in enumerate(texts):
            if not t or not t.strip():
                raise ValueError(f"text {i} is empty")
        dev, dt = self.encoder.device, self.encoder.dtype
        ref_pixels, cand_pixels = ref_pixels.to(dev, dt), cand_pixels.to(dev, dt)
        ids, mask = self._tokens(texts)
        own = self.scorer is self.maxsim
        taps = _Taps(self.model, attention=attention and own)
        with torch.inference_mode(False), torch.enable_grad(), taps.installed():
            if own:
                sims = self.maxsim.query_sims(ref_pixels, ids, mask, cand_pixels)  # [N, Q]
                scores = sims.amax(dim=-1)
            else:
                scores = self.scorer.score_pixels(ref_pixels, ids, mask, cand_pixels).reshape(n)
            ref_calls = taps.image_calls(ref_pixels)
            cand_calls = taps.image_calls(cand_pixels)
            word_calls = taps.word_calls(ids)
            if not ref_calls or not cand_calls:
                raise RuntimeError(
                    "the scorer never ran model.vision_model on the "
                    + ("reference" if not ref_calls else "candidate")
                    + " pixels; Grad-CAM needs that pass"
                )
            if not word_calls:
                raise RuntimeError(
                    "the scorer never looked up the caption in model.embeddings.word_embeddings"
                )
            # Identical images: the first ViT pass is the reference's, the last the candidate's.
            (ref_all, ro), (cand_all, co) = ref_calls[0], cand_calls[-1]
            leaves = list({id(t): t for t, _ in word_calls}.values())
            grads = torch.autograd.grad(
                scores.sum(),
                [ref_all, cand_all, *leaves],
                allow_unused=True,
                materialize_grads=True,
            )
        leaf_grad = {id(t): g for t, g in zip(leaves, grads[2:], strict=True)}
        table = self.model.embeddings.word_embeddings.weight.detach().float()
        tok = self.encoder.tokenizer
        bases = {"input": None, "mask": table[tok.mask_token_id]}
        token_attr = {m: torch.zeros(ids.shape, device=ids.device) for m in bases}
        for leaf, off in word_calls:  # gradient x input of every pass that read the caption
            g = leaf_grad[id(leaf)][off : off + n].float()
            x = leaf[off : off + n].detach().float()
            for m, b in bases.items():
                token_attr[m] += (g * (x if b is None else x - b)).sum(-1)
        if "contrast" in self.word_methods:
            token_attr["contrast"] = token_attr["input"] - self._self_match_attr(
                ref_pixels, ids, mask, own
            )
        occluded = (
            self._occlusion(ref_pixels, texts, ids, mask, cand_pixels)
            if "occlusion" in self.word_methods
            else None
        )

        winners: list[int] = [-1] * n
        att_taps, att_all, att_off = taps, cand_all, co
        if attention:
            if not own:  # explain the first-stage match with MaxSim's own pass
                att_taps = _Taps(self.model, attention=True)
                with torch.inference_mode(), att_taps.installed():
                    sims = self.maxsim.query_sims(ref_pixels, ids, mask, cand_pixels)
                att_all, att_off = att_taps.image_calls(cand_pixels)[-1]
            winners = [int(w) for w in sims.detach().argmax(dim=-1)]
        out = []
        for i in range(n):
            variants = {}
            a_ref, a_cand = ref_all[ro + i].detach(), cand_all[co + i].detach()
            for method in CAM_METHODS:
                variants[f"reference/{method}"] = grad_cam(
                    a_ref, grads[0][ro + i], self.rows, self.cols, method, baseline=a_cand
                )
                variants[f"candidate/{method}"] = grad_cam(
                    a_cand, grads[1][co + i], self.rows, self.cols, method, baseline=a_ref
                )
            # the contrast maps before their absolute value: which way each difference pushes
            variants["reference/contrast_signed"] = grad_cam(
                a_ref, grads[0][ro + i], self.rows, self.cols, "contrast", a_cand, signed=True
            )
            variants["candidate/contrast_signed"] = grad_cam(
                a_cand, grads[1][co + i], self.rows, self.cols, "contrast", a_ref, signed=True
            )
            word_variants = {
                m: self._words(texts[i], ids[i], mask[i], token_attr[m][i])
                for m in self.word_methods
                if m in token_attr
            }
            if occluded is not None:
                word_variants["occlusion"] = occluded[i]
            words, token_scores, tokens = word_variants[self.words_method]
            out.append(
                Explanation(
                    score=float(scores[i].detach()),
                    candidate_map=variants[f"candidate/{self.cam}"],
                    reference_map=variants[f"reference/{self.cam}"],
                    attention_map=(
                        self._attention_map(att_taps, att_all, att_off + i, winners[i])
                        if attention
                        else None
                    ),
                    words=words,
                    tokens=tokens,
                    token_scores=token_scores,
                    winning_query=winners[i],
                    variants=variants,
                    word_variants={m: w[0] for m, w in word_variants.items()},
                )
            )
        return out

    def _occlusion(
        self,
        ref_pixels: torch.Tensor,
        texts: list[str],
        ids: torch.Tensor,
        mask: torch.Tensor,
        cand_pixels: torch.Tensor,
    ) -> list[tuple[list[WordScore], np.ndarray, list[str]]]:
        """Per word of each caption: margin(caption) - margin(caption with the word's
        WordPieces as [MASK]), margin = S(ref, text, cand) - S(ref, text, ref); one batched
        scorer pass over every (caption variant, candidate or reference) row."""
        tok = self.encoder.tokenizer
        rows_ids, rows_mask, owner, spans = [], [], [], []
        for i, text in enumerate(texts):
            words, word_ids, tokens = word_spans(tok, text)
            spans.append((words, word_ids, tokens))
            for w in range(-1, len(words)):  # -1: the caption as it is
                v = ids[i].clone()
                if w >= 0:
                    for t, wid in enumerate(word_ids):
                        if wid == w:
                            v[t] = tok.mask_token_id
                rows_ids.append(v)
                rows_mask.append(mask[i])
                owner.append(i)
        v_ids, v_mask = torch.stack(rows_ids), torch.stack(rows_mask)
        sel = torch.tensor(owner, device=ref_pixels.device)
        with torch.inference_mode():
            by_images = getattr(self.scorer, "score_images", None)
            if by_images is not None:  # each image through the ViT once, not once per variant
                img_r = self.model.image_features(ref_pixels)[sel]
                img_c = self.model.image_features(cand_pixels)[sel]
                score, r_in, c_in = by_images, img_r, img_c
            else:
                score, r_in, c_in = self.scorer.score_pixels, ref_pixels[sel], cand_pixels[sel]
            both = score(
                torch.cat([r_in, r_in]),
                torch.cat([v_ids, v_ids]),
                torch.cat([v_mask, v_mask]),
                torch.cat([c_in, r_in]),
            ).float()
        m = len(owner)
        margin = (both[:m] - both[m:]).cpu().numpy()
        out, row = [], 0
        for words, word_ids, tokens in spans:
            full, per_word = margin[row], margin[row + 1 : row + 1 + len(words)]
            row += 1 + len(words)
            scores = full - per_word
            keep = [(t, w) for t, w in enumerate(word_ids) if w is not None]
            pieces = np.bincount([w for _, w in keep], minlength=len(words))
            # a word's score split evenly over its pieces: a word is the sum of its pieces
            token_scores = np.asarray([scores[w] / pieces[w] for _, w in keep], np.float32)
            out.append(
                (
                    [WordScore(w, float(x)) for w, x in zip(words, scores, strict=True)],
                    token_scores,
                    [tokens[t] for t, _ in keep],
                )
            )
        return out

    def _self_match_attr(
        self, ref_pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, own: bool
    ) -> torch.Tensor:
        """Per-token gradient x input [N, L] of the score the query gives its own reference
        as the candidate (the ``contrast`` word baseline)."""
        n = ids.shape[0]
        taps = _Taps(self.model, attention=False)
        with torch.inference_mode(False), torch.enable_grad(), taps.installed():
            if own:
                base = self.maxsim.query_sims(ref_pixels, ids, mask, ref_pixels).amax(dim=-1)
            else:
                base = self.scorer.score_pixels(ref_pixels, ids, mask, ref_pixels).reshape(n)
            calls = taps.word_calls(ids)
            leaves = list({id(t): t for t, _ in calls}.values())
            grads = torch.autograd.grad(
                base.sum(), leaves, allow_unused=True, materialize_grads=True
            )
        by_leaf = {id(t): g for t, g in zip(leaves, grads, strict=True)}
        attr = torch.zeros(ids.shape, device=ids.device)
        for leaf, off in calls:
            g = by_leaf[id(leaf)][off : off + n].float()
            attr += (g * leaf[off : off + n].detach().float()).sum(-1)
        return attr

    def _attention_map(
        self, taps: _Taps, cand_all: torch.Tensor, row: int, query: int
    ) -> np.ndarray:
        """Mean over heads and cross-attention layers of query ``query``'s attention to the
        candidate's patch tokens (row ``row`` of the ViT output ``cand_all``) -> [rows, cols]."""
        ptr = cand_all.data_ptr()  # the Q-Former reads the ViT output as is
        layers = [p[row] for key_ptr, p in taps.cross if key_ptr == ptr and p.shape[2] > query]
        if not layers:
            raise RuntimeError("no cross-attention to the candidate was recorded")
        p = self.rows * self.cols
        att = torch.stack([probs[:, query, -p:] for probs in layers]).mean(dim=(0, 1))
        return att.reshape(self.rows, self.cols).cpu().numpy().astype(np.float32)

    def _words(
        self, text: str, ids: torch.Tensor, mask: torch.Tensor, token_attr: torch.Tensor
    ) -> tuple[list[WordScore], np.ndarray, list[str]]:
        words, word_ids, tokens = word_spans(self.encoder.tokenizer, text)
        if len(word_ids) != int(mask.sum()):
            raise RuntimeError("caption tokens do not align with the tokenizer's encoding")
        totals = np.zeros(len(words), np.float64)
        keep = [i for i, w in enumerate(word_ids) if w is not None]
        attr = token_attr.detach().cpu().numpy()
        for i in keep:
            totals[word_ids[i]] += float(attr[i])  # type: ignore[index]
        return (
            [WordScore(w, float(s)) for w, s in zip(words, totals, strict=True)],
            attr[keep].astype(np.float32),
            [tokens[i] for i in keep],
        )

    # ------------------------------------------------------------------ display
    def overlay_png(
        self, image: Image.Image, values: np.ndarray, size: int = OVERLAY_SIZE
    ) -> bytes:
        """PNG of ``values`` [rows, cols] over the model's view of ``image``."""
        return overlay_png(self.view(image), values, size=size)


def _heat_colors(t: np.ndarray) -> np.ndarray:
    """[..] in [0, 1] -> [.., 3] uint8 on a blue -> cyan -> yellow -> red ramp."""
    stops = np.array([0.0, 0.35, 0.7, 1.0])
    rgb = np.array([[40, 60, 200], [40, 200, 220], [250, 220, 40], [220, 30, 30]], np.float64)
    out = np.stack([np.interp(t, stops, rgb[:, c]) for c in range(3)], axis=-1)
    return out.astype(np.uint8)


def overlay_png(view: Image.Image, values: np.ndarray, size: int = OVERLAY_SIZE) -> bytes:
    """PNG of ``values`` [rows, cols] (>= 0) bilinearly upsampled over ``view`` (the square
    image the map is about), ``max(size, view side)`` pixels square. Opacity follows the value
    (0 leaves the image as is); an all-zero map leaves the whole image as is."""
    side = max(int(size), view.width)
    base = view.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    v = np.asarray(values, dtype=np.float32)
    if v.ndim != 2:
        raise ValueError(f"values must be [rows, cols], got shape {v.shape}")
    top = float(v.max()) if v.size else 0.0
    norm = np.clip(v / top, 0.0, 1.0) if top > 0 else np.zeros_like(v)
    heat = np.asarray(
        Image.fromarray(norm.astype(np.float32), mode="F").resize(
            (side, side), Image.Resampling.BILINEAR
        ),
        dtype=np.float32,
    ).clip(0.0, 1.0)
    alpha = (OVERLAY_ALPHA * heat)[..., None]
    mixed = (1.0 - alpha) * np.asarray(base, np.float32) + alpha * _heat_colors(heat)
    buf = io.BytesIO()
    Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()
