"""Recall@K over a gallery, with image-only and text-only baselines, in one run.

For each triplet the whole gallery is ranked by MaxSim (max over an image's Q target vectors of
the dot product with the query); the reference itself is excluded, as CIRR does. Baselines:
``image_only`` queries with the reference alone (its normalised mean target vector) and
``text_only`` with the caption alone (SPRC's text-only prompt path).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from retrieval.data.triplets import GalleryItem, Triplet, load_gallery, load_triplets, resolve_path
from retrieval.encoder import Encoder
from retrieval.imageio import decode_image
from retrieval.rerank import Reranker, candidate_patches, query_features

logger = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10, 50)


def maxsim_scores(queries: np.ndarray, gallery: torch.Tensor) -> torch.Tensor:
    """[B, D] x [G, Q, D] -> [B, G] MaxSim scores."""
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    g, nq, d = gallery.shape
    return (gallery.reshape(g * nq, d) @ q.T).reshape(g, nq, -1).amax(dim=1).T


def target_ranks(
    scores: torch.Tensor, target_idx: Sequence[int], exclude_idx: Sequence[int]
) -> np.ndarray:
    """0-based rank of each row's target after masking its excluded (reference) item."""
    scores = scores.clone()
    rows = torch.arange(scores.shape[0])
    excl = torch.tensor(exclude_idx)
    has_excl = excl >= 0
    scores[rows[has_excl], excl[has_excl]] = float("-inf")
    tgt = scores[rows, torch.tensor(target_idx)]
    return (scores > tgt[:, None]).sum(dim=1).numpy()


def recall_at(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    if len(ranks) == 0:
        return {str(k): 0.0 for k in ks}
    return {str(k): float((ranks < k).mean()) for k in ks}


@dataclass
class GalleryFeatures:
    ids: list[str]
    index: dict[str, int]
    tokens: torch.Tensor  # [G, Q, D] float32
    patches: torch.Tensor | None = None  # [G, T, C] ViT tokens (a "patches" re-ranker's input)


def load_images(data_dir: Path, paths: Sequence[str]) -> list[Any]:
    return [decode_image(resolve_path(data_dir, p)) for p in paths]


def encode_gallery(
    encoder: Encoder,
    data_dir: Path,
    items: Sequence[GalleryItem],
    batch_size: int = 64,
    progress: bool = True,
    patches: bool = False,
) -> GalleryFeatures:
    feats = []
    vit: list[torch.Tensor] = []
    it = range(0, len(items), batch_size)
    for i in tqdm(it, desc="gallery", disable=not progress, unit="batch"):
        chunk = items[i : i + batch_size]
        px = encoder.preprocess(load_images(data_dir, [g.path for g in chunk]))
        feats.append(encoder.encode_target_pixels(px))
        if patches:
            vit.append(candidate_patches(encoder, px).cpu())
    tokens = (
        torch.from_numpy(np.concatenate(feats))
        if feats
        else torch.zeros(0, encoder.num_queries, encoder.dim)
    )
    ids = [g.id for g in items]
    return GalleryFeatures(
        ids, {g: i for i, g in enumerate(ids)}, tokens, torch.cat(vit) if vit else None
    )


def evaluate(
    encoder: Encoder,
    data_dir: str | Path,
    split: str = "test",
    *,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 64,
    limit: int | None = None,
    gallery: GalleryFeatures | None = None,
    gallery_limit: int | None = None,
    baselines: bool = True,
    progress: bool = True,
    seed: int = 0,
    reranker: Reranker | None = None,
    rerank_k: int = 0,
) -> dict[str, Any]:
    """Recall@K of ``encoder`` on ``split``; see module docstring. ``gallery_limit`` restricts the
    gallery to the split's references/targets plus a seeded sample of the rest (for fast
    validation during training); the full gallery is the default. With a ``reranker`` and
    ``rerank_k`` > 0 each query's first-stage top-``rerank_k`` (reference excluded) is re-ranked
    too, and ``result["rerank"]`` holds that ranking's recall and by-type recall beside the
    first stage's (the same queries, gallery and baselines)."""
    rerank = reranker is not None and rerank_k > 0
    if rerank:
        assert reranker is not None
        reranker.check_encoder(encoder)
    source = reranker.config.features if reranker is not None else "targets"
    t0 = time.perf_counter()
    data_dir = Path(data_dir)
    triplets: list[Triplet] = [t for t in load_triplets(data_dir, split) if t.target_id]
    if limit:
        triplets = triplets[:limit]
    if not triplets:
        raise ValueError(f"{data_dir}/{split}.jsonl has no triplet with a target_id to evaluate")
    if gallery is None:
        items = load_gallery(data_dir)
        if gallery_limit and gallery_limit < len(items):
            needed = {t.target_id for t in triplets} | {t.reference_id for t in triplets}
            rest = [g for g in items if g.id not in needed]
            rng = np.random.default_rng(seed)
            n_keep = min(len(rest), max(0, gallery_limit - len(needed)))
            keep: list[int] = rng.choice(len(rest), size=n_keep, replace=False).tolist()
            items = [g for g in items if g.id in needed] + [rest[i] for i in sorted(keep)]
        gallery = encode_gallery(
            encoder, data_dir, items, batch_size, progress, patches=rerank and source == "patches"
        )
    missing = [t.target_id for t in triplets if t.target_id not in gallery.index]
    if missing:
        raise ValueError(
            f"{len(missing)} target ids of {split} are not in the gallery, e.g. {missing[:3]}"
        )

    ranks: dict[str, list[int]] = {"sprc": [], "image_only": [], "text_only": [], "rerank": []}
    for i in tqdm(
        range(0, len(triplets), batch_size), desc=split, disable=not progress, unit="batch"
    ):
        chunk = triplets[i : i + batch_size]
        tgt = [gallery.index[t.target_id] for t in chunk]  # type: ignore[index]
        excl = [gallery.index.get(t.reference_id, -1) for t in chunk]
        refs = load_images(data_dir, [t.reference for t in chunk])
        texts = [t.caption for t in chunk]
        feats = encoder.reference_features(refs)
        if rerank:
            assert reranker is not None
            qf = query_features(encoder, feats, texts, source)
            q = qf.query.cpu().numpy()
            scores = maxsim_scores(q, gallery.tokens)
            ranks["sprc"] += target_ranks(scores, tgt, excl).tolist()
            ranks["rerank"] += rerank_ranks(
                reranker, qf, scores, gallery, tgt, excl, rerank_k
            ).tolist()
        else:
            q = encoder.encode_queries(None, texts, ref_features=feats, batch_size=batch_size)
            ranks["sprc"] += target_ranks(maxsim_scores(q, gallery.tokens), tgt, excl).tolist()
        if baselines:
            with torch.inference_mode():
                ref_tokens = encoder.model.target_features(feats.to(encoder.dtype)).float().cpu()
            img_q = torch.nn.functional.normalize(ref_tokens.mean(dim=1), dim=-1).numpy()
            ranks["image_only"] += target_ranks(
                maxsim_scores(img_q, gallery.tokens), tgt, excl
            ).tolist()
            txt_q = encoder.encode_texts(texts)
            ranks["text_only"] += target_ranks(
                maxsim_scores(txt_q, gallery.tokens), tgt, excl
            ).tolist()

    main = np.asarray(ranks["sprc"])
    by_type_idx: dict[str, list[int]] = defaultdict(list)
    for j, t in enumerate(triplets):
        by_type_idx[t.type].append(j)
    result: dict[str, Any] = {
        "split": split,
        "n": len(triplets),
        "gallery_size": len(gallery.ids),
        "model": encoder.fingerprint,
        "recall": recall_at(main, ks),
        "by_type": {
            typ: {"n": len(idx), "recall": recall_at(main[idx], ks)}
            for typ, idx in sorted(by_type_idx.items())
        },
        "mean_rank": float(main.mean() + 1),
    }
    if baselines:
        result["baselines"] = {
            name: {"recall": recall_at(np.asarray(ranks[name]), ks)}
            for name in ("image_only", "text_only")
        }
        for typ, idx in by_type_idx.items():
            for name in ("image_only", "text_only"):
                result["by_type"][typ][name] = recall_at(np.asarray(ranks[name])[idx], ks)
    if rerank:
        assert reranker is not None
        rr = np.asarray(ranks["rerank"])
        result["rerank"] = {
            "k": rerank_k,
            "reranker": reranker.fingerprint,
            "recall": recall_at(rr, ks),
            "by_type": {
                typ: {"n": len(idx), "recall": recall_at(rr[idx], ks)}
                for typ, idx in sorted(by_type_idx.items())
            },
            "mean_rank": float(rr.mean() + 1),
        }
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


@dataclass
class RerankLists:
    """Each query's first-stage top-K with the re-ranker's head scores (its score without the
    ``alpha * first`` term), so any alpha re-orders them without another model pass.

    Shapes (N queries, K candidates):
      first  [N, K]  first-stage MaxSim of the top-K, descending (reference excluded)
      head   [N, K]  the re-ranker's score without its first-stage term
      hit    [N, K]  True where the candidate is the query's target
      first_rank [N] 0-based first-stage rank of the target (used when it is not in the top-K)
    """

    first: torch.Tensor
    head: torch.Tensor
    hit: torch.Tensor
    first_rank: torch.Tensor

    def ranks(self, alpha: float) -> np.ndarray:
        """0-based rank of each target after re-ranking with ``alpha``; a target outside the
        top-K keeps its first-stage rank (>= K)."""
        s = self.head + alpha * self.first
        inside = self.hit.any(dim=1)
        target = s.masked_fill(~self.hit, float("-inf")).amax(dim=1)
        rr = (s > target[:, None]).sum(dim=1)
        return torch.where(inside, rr, self.first_rank).numpy()

    def prefix(self, k: int) -> RerankLists:
        """The same lists cut to their first ``k`` candidates (a smaller K's top-K)."""
        return RerankLists(self.first[:, :k], self.head[:, :k], self.hit[:, :k], self.first_rank)

    @staticmethod
    def cat(parts: Sequence[RerankLists]) -> RerankLists:
        return RerankLists(
            *(
                torch.cat([getattr(p, f) for p in parts])
                for f in ("first", "head", "hit", "first_rank")
            )
        )


def rerank_lists(
    reranker: Reranker,
    qf: Any,
    scores: torch.Tensor,
    gallery: GalleryFeatures,
    target_idx: Sequence[int],
    exclude_idx: Sequence[int],
    k: int,
) -> RerankLists:
    """Each row's first-stage top-k (reference excluded) scored by the re-ranker's head."""
    scores = scores.clone()
    rows = torch.arange(scores.shape[0])
    excl = torch.tensor(exclude_idx)
    scores[rows[excl >= 0], excl[excl >= 0]] = float("-inf")
    first, top = scores.topk(min(k, scores.shape[1]), dim=1)  # [B, k]
    source = gallery.tokens if reranker.config.features == "targets" else gallery.patches
    assert source is not None, "a patches re-ranker needs the gallery's ViT tokens"
    # alpha * first is added in ranks(): the same float32 sum the model's forward makes
    head = reranker.score(qf, source[top], torch.zeros_like(first))  # [B, k]
    first_rank = torch.from_numpy(target_ranks(scores, target_idx, [-1] * len(target_idx)))
    return RerankLists(first, head, top == torch.tensor(target_idx)[:, None], first_rank)


def rerank_ranks(
    reranker: Reranker,
    qf: Any,
    scores: torch.Tensor,
    gallery: GalleryFeatures,
    target_idx: Sequence[int],
    exclude_idx: Sequence[int],
    k: int,
) -> np.ndarray:
    """0-based rank of each row's target after re-ranking its first-stage top-k (reference
    excluded); a target outside the top-k keeps its first-stage rank (>= k)."""
    lists = rerank_lists(reranker, qf, scores, gallery, target_idx, exclude_idx, k)
    return lists.ranks(float(reranker.model.alpha.detach()))


def format_table(result: dict[str, Any]) -> str:
    """A readable Recall@K table (model vs baselines, then per modification type)."""
    ks = list(result["recall"])
    head = f"{'':<22}" + "".join(f"{'R@' + k:>9}" for k in ks)
    lines = [
        f"Recall@K (%)  split={result['split']}  n={result['n']}  gallery={result['gallery_size']}"
        f"  model={result['model']}",
        head,
        f"{'SPRC (image+text)':<22}" + "".join(f"{100 * result['recall'][k]:>9.2f}" for k in ks),
    ]
    if "rerank" in result:
        rr = result["rerank"]
        lines.append(
            f"{'SPRC + re-rank@' + str(rr['k']):<22}"
            + "".join(f"{100 * rr['recall'][k]:>9.2f}" for k in ks)
        )
    for name, res in result.get("baselines", {}).items():
        lines.append(
            f"{name.replace('_', '-') + ' baseline':<22}"
            + "".join(f"{100 * res['recall'][k]:>9.2f}" for k in ks)
        )
    lines.append("")
    lines.append(f"{'by type (SPRC)':<16}{'n':>6}" + "".join(f"{'R@' + k:>9}" for k in ks))
    for typ, res in result["by_type"].items():
        lines.append(
            f"{typ:<16}{res['n']:>6}" + "".join(f"{100 * res['recall'][k]:>9.2f}" for k in ks)
        )
    if "rerank" in result:
        lines.append("")
        lines.append(f"{'by type (re-rank)':<16}{'n':>6}" + "".join(f"{'R@' + k:>9}" for k in ks))
        for typ, res in result["rerank"]["by_type"].items():
            lines.append(
                f"{typ:<16}{res['n']:>6}" + "".join(f"{100 * res['recall'][k]:>9.2f}" for k in ks)
            )
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
