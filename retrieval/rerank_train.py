"""Training the re-ranker (``cir train-reranker``): listwise loss over mined hard negatives.

The first stage stays frozen, so its features of the train split are computed once (and cached
in the run directory): every train image's target vectors (and ViT tokens for the "patches"
source), every triplet's query side, and each triplet's top-``mine_k`` candidates by
first-stage MaxSim over all train images (the hard negatives, reference excluded). A step takes
``batch_size`` triplets; each scores its target (column 0), ``negatives`` sampled from its mined
candidates, and ``in_batch`` other triplets' targets, with softmax cross-entropy.

Run directory layout (as ``cir train``)::

    OUT/features.pt            cached first-stage features + mined candidates (by encoder)
    OUT/metrics.jsonl          one JSON line per logged step / validation
    OUT/checkpoints/last/      model + optimizer + scheduler + RNG + step (exact resume)
    OUT/model/                 the final re-ranker folder (config.json + model.safetensors)
    OUT/train_config.json      the RerankTrainConfig used
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from retrieval.data.triplets import load_triplets
from retrieval.encoder import Encoder, resolve_device, set_threads
from retrieval.precision import resolve_precision
from retrieval.preprocess import BatchNormaliser
from retrieval.rerank import (
    DEFAULT_RERANK_K,
    FEATURE_SOURCES,
    QueryFeatures,
    Reranker,
    RerankerConfig,
    RerankerModel,
    candidate_patches,
    listwise_loss,
    query_features,
)
from retrieval.rerank_calibrate import CALIBRATION_JSON, calibrate_alpha
from retrieval.train import (
    ImageBank,
    load_training_state,
    lr_lambda,
    save_training_state,
)

logger = logging.getLogger(__name__)


@dataclass
class RerankTrainConfig:
    data: str  # data dir with train.jsonl (+ val.jsonl and gallery.jsonl for validation)
    encoder: str  # the trained first-stage Encoder folder (frozen; its features are the input)
    out: str  # run directory
    features: str = "targets"  # candidate features: "targets" (stored) | "patches" (ViT)
    width: int = 128  # re-ranker hidden size
    layers: int = 2  # re-ranker blocks
    heads: int = 4  # attention heads
    mine_k: int = 50  # mined candidates per triplet (first-stage top-K over train images)
    negatives: int = 15  # hard negatives per triplet per step, sampled from the mined top-K
    in_batch: int = 8  # other triplets' targets per triplet per step (in-batch negatives)
    batch_size: int = 32  # triplets per step
    max_steps: int = 3000  # total optimizer steps
    lr: float = 5e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.05  # AdamW weight decay (matrices only)
    warmup: float = 0.05  # fraction of steps with linear warmup, then cosine decay to 0
    grad_clip: float = 1.0  # max global grad norm (0 disables)
    dropout: float = 0.0  # re-ranker dropout
    seed: int = 0  # init, batch order, negative sampling
    save_every: int = 200  # checkpoint every N steps (and at the end / on the time budget)
    log_every: int = 20  # metrics.jsonl every N steps
    val_every: int = 1000  # validation every N steps (0 = only at the end)
    val_limit: int = 300  # val triplets per validation (0 = all)
    val_gallery: int = 1000  # gallery size for validation (0 = full gallery)
    val_rerank_k: int = 50  # K re-ranked in validation
    # After training, fit alpha (the first-stage score's weight) on the whole val split at
    # this K (retrieval.rerank_calibrate); 0 = keep the trained alpha, -1 = DEFAULT_RERANK_K
    calibrate_k: int = -1
    time_budget_min: float = 0.0  # stop (and save) after this many minutes; 0 = none
    limit: int = 0  # use only the first N train triplets (0 = all)
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 0  # torch CPU threads (0 = default)
    precision: str = "auto"  # retrieval.precision: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainFeatures:
    """Frozen first-stage features of the train split (see the module docstring)."""

    encoder: str  # fingerprint they were computed with
    features: str  # source of ``pool``
    paths: list[str]  # train image paths, the rows of pool / pool_targets
    pool_targets: torch.Tensor  # [N, Q, D] float16: first-stage target vectors
    pool: torch.Tensor  # [N, T, F] float16: candidate features (== pool_targets for targets)
    query: torch.Tensor  # [M, D] float32 composed queries
    prompt: torch.Tensor  # [M, Q, H] float16
    text: torch.Tensor  # [M, L, H] float16
    text_mask: torch.Tensor  # [M, L] bool
    ref_idx: torch.Tensor  # [M] pool row of each triplet's reference
    tgt_idx: torch.Tensor  # [M] pool row of each triplet's target
    mined: torch.Tensor  # [M, K] pool rows, first-stage order, reference excluded


def maxsim(query: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B, D] x [B, K, Q, D] -> [B, K] (row-wise first-stage scores)."""
    return torch.einsum("bd,bkqd->bkq", query.float(), targets.float()).amax(-1)


@torch.inference_mode()
def compute_features(
    encoder: Encoder,
    data_dir: Path,
    triplets: list[Any],
    source: str,
    mine_k: int,
    batch_size: int = 256,
) -> TrainFeatures:
    pre = encoder.preprocessor
    paths = sorted({t.reference for t in triplets} | {t.target for t in triplets})
    bank = ImageBank(data_dir, paths, pre)
    norm = BatchNormaliser(pre)
    n = len(paths)
    q, d = encoder.num_queries, encoder.dim
    pool_targets = torch.empty((n, q, d), dtype=torch.float16)
    pool = pool_targets
    for i in tqdm(range(0, n, batch_size), desc="train images", unit="batch", mininterval=5):
        px = norm(bank.data[i : i + batch_size])
        pool_targets[i : i + batch_size] = torch.from_numpy(encoder.encode_target_pixels(px))
    if source == "patches":
        cfg = encoder.model.config
        pool = torch.empty((n, cfg.num_image_tokens, cfg.vision_hidden_size), dtype=torch.float16)
        for i in tqdm(range(0, n, batch_size), desc="train patches", unit="batch", mininterval=5):
            pool[i : i + batch_size] = candidate_patches(
                encoder, norm(bank.data[i : i + batch_size])
            ).half()
    m = len(triplets)
    ref_idx = torch.tensor([bank.index[t.reference] for t in triplets])
    tgt_idx = torch.tensor([bank.index[t.target] for t in triplets])
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("query", "prompt", "text", "mask")}
    max_len = encoder.max_text_tokens
    for i in tqdm(range(0, m, batch_size), desc="train queries", unit="batch", mininterval=5):
        chunk = triplets[i : i + batch_size]
        img = encoder.model.image_features(
            norm(bank.data[ref_idx[i : i + batch_size]]).to(encoder.device, encoder.dtype)
        )
        f = query_features(encoder, img, [t.caption for t in chunk], "targets")
        pad = max_len - f.text.shape[1]  # the tokenizer pads to the batch's longest caption
        parts["query"].append(f.query.cpu())
        parts["prompt"].append(f.prompt.half().cpu())
        parts["text"].append(torch.nn.functional.pad(f.text, (0, 0, 0, pad)).half().cpu())
        parts["mask"].append(torch.nn.functional.pad(f.text_mask, (0, pad)).cpu())
    query = torch.cat(parts["query"])
    # Mining: first-stage MaxSim of every query over every train image (bf16 matmul in chunks).
    flat = pool_targets.reshape(n * q, d).to(torch.bfloat16)
    mined = torch.empty((m, mine_k), dtype=torch.int32)
    for i in tqdm(range(0, m, 512), desc="mining", unit="chunk", mininterval=5):
        qs = query[i : i + 512].to(torch.bfloat16)
        scores = (flat @ qs.T).float().view(n, q, -1).amax(1).T  # [b, N]
        scores[torch.arange(len(qs)), ref_idx[i : i + 512]] = float("-inf")
        mined[i : i + 512] = scores.topk(mine_k, dim=1).indices.int()
    return TrainFeatures(
        encoder=encoder.fingerprint,
        features=source,
        paths=paths,
        pool_targets=pool_targets,
        pool=pool,
        query=query,
        prompt=torch.cat(parts["prompt"]),
        text=torch.cat(parts["text"]),
        text_mask=torch.cat(parts["mask"]),
        ref_idx=ref_idx,
        tgt_idx=tgt_idx,
        mined=mined,
    )


class RerankTrainer:
    def __init__(self, cfg: RerankTrainConfig) -> None:
        if cfg.features not in FEATURE_SOURCES:
            raise ValueError(f"--features must be one of {FEATURE_SOURCES}, got {cfg.features!r}")
        resolve_precision(cfg.precision, "cpu", training=True)  # a bad name fails before work
        for name in ("batch_size", "max_steps", "mine_k"):
            if getattr(cfg, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if cfg.negatives >= cfg.mine_k:
            raise ValueError(f"negatives ({cfg.negatives}) must be < mine_k ({cfg.mine_k})")
        if cfg.in_batch >= cfg.batch_size:
            raise ValueError(f"in_batch ({cfg.in_batch}) must be < batch_size ({cfg.batch_size})")
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = self.out / "checkpoints" / "last"
        set_threads(cfg.num_threads or None)
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.encoder = Encoder.from_pretrained(cfg.encoder, device=self.device, dtype="float32")
        self.data_dir = Path(cfg.data)
        triplets = [t for t in load_triplets(self.data_dir, "train") if t.target]
        if cfg.limit:
            triplets = triplets[: cfg.limit]
        if len(triplets) < cfg.batch_size:
            raise ValueError(f"{len(triplets)} train triplets < batch size {cfg.batch_size}")
        self.triplets = triplets
        t0 = time.perf_counter()
        self.feats = self._features()
        self.feature_seconds = time.perf_counter() - t0
        rcfg = RerankerConfig.for_encoder(
            self.encoder,
            cfg.features,
            width=cfg.width,
            layers=cfg.layers,
            heads=cfg.heads,
            dropout=cfg.dropout,
        )
        self.model = RerankerModel(rcfg).to(self.device)
        self.precision = resolve_precision(cfg.precision, self.device, training=True)
        self.autocast_bf16 = self.precision.autocast  # bf16 is the one training autocast
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=(0.9, 0.98),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, cfg.max_steps, cfg.warmup)
        )
        self.steps_per_epoch = len(triplets) // cfg.batch_size
        self.step = 0
        (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    def _features(self) -> TrainFeatures:
        """Cached per (encoder, source, mine_k, triplet count): a rerun or resume reuses them."""
        cfg = self.cfg
        path = self.out / "features.pt"
        key = (self.encoder.fingerprint, cfg.features, cfg.mine_k, len(self.triplets))
        if path.is_file():
            cached = torch.load(path, weights_only=False)
            if cached.get("key") == key:
                logger.info("re-using cached first-stage features in %s", path)
                return TrainFeatures(**cached["features"])
        t0 = time.perf_counter()
        feats = compute_features(
            self.encoder, self.data_dir, self.triplets, cfg.features, cfg.mine_k
        )
        logger.info("first-stage features + mining: %.0f s", time.perf_counter() - t0)
        tmp = path.with_suffix(".tmp")
        torch.save({"key": key, "features": dataclasses.asdict(feats)}, tmp)
        os.replace(tmp, path)
        return feats

    # ---------------------------------------------------------------- state
    def save_checkpoint(self) -> None:
        save_training_state(
            self.ckpt_dir,
            self.model,
            self.optimizer,
            self.scheduler,
            self.step,
            self.model.config.to_dict(),
        )

    def load_checkpoint(self) -> bool:
        step = load_training_state(
            self.ckpt_dir, self.model, self.optimizer, self.scheduler, self.device
        )
        if step is None:
            return False
        self.step = step
        return True

    def _log(self, row: dict[str, Any]) -> None:
        with (self.out / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    # ----------------------------------------------------------------- loop
    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Deterministic for a global step: (triplet rows [B], candidate pool rows [B, C],
        valid [B, C]); column 0 is each row's target."""
        cfg = self.cfg
        epoch, b = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(self.triplets))
        rows = torch.from_numpy(order[b * cfg.batch_size : (b + 1) * cfg.batch_size].copy())
        rng = np.random.default_rng([cfg.seed, 1_000_003, step])
        f = self.feats
        tgt = f.tgt_idx[rows]  # [B]
        mined = f.mined[rows].long()  # [B, K]
        pick = torch.from_numpy(
            np.argsort(rng.random((len(rows), cfg.mine_k)), axis=1)[:, : cfg.negatives]
        )
        hard = mined.gather(1, pick)  # [B, M], a random subset of each row's top-K
        others = torch.stack(
            [tgt[(torch.arange(len(rows)) + 1 + s) % len(rows)] for s in range(cfg.in_batch)], 1
        )  # [B, E]: the next E rows' targets
        cands = torch.cat([tgt[:, None], hard, others], dim=1)  # [B, C]
        valid = torch.ones(cands.shape, dtype=torch.bool)
        # A negative that is the target itself, or an identical image, is not a negative.
        same = (f.pool_targets[cands[:, 1:]] == f.pool_targets[tgt][:, None]).flatten(2).all(-1)
        valid[:, 1:] = ~((cands[:, 1:] == tgt[:, None]) | same)
        return rows, cands, valid

    def query_side(self, rows: torch.Tensor) -> QueryFeatures:
        f = self.feats
        ref = f.pool[f.ref_idx[rows]]
        return QueryFeatures(
            f.prompt[rows], f.text[rows], f.text_mask[rows], ref, f.query[rows]
        ).to(self.device, torch.float32)

    def train_step(self, step: int) -> dict[str, float]:
        self.model.train()
        rows, cands, valid = self.batch_at(step)
        f = self.feats
        qf = self.query_side(rows)
        first = maxsim(qf.query, f.pool_targets[cands].to(self.device))
        cand = f.pool[cands].to(self.device, torch.float32)
        valid = valid.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            scores = self.model(qf, cand, first)
        loss = listwise_loss(scores.float(), valid)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            s = scores.float().masked_fill(~valid, float("-inf"))
            acc = float((s.argmax(1) == 0).float().mean())
            first_acc = float(
                (first.masked_fill(~valid, float("-inf")).argmax(1) == 0).float().mean()
            )
        return {"loss": float(loss.detach()), "acc": acc, "first_acc": first_acc}

    def reranker(self) -> Reranker:
        return Reranker(self.model, self.device)

    def validate(self) -> dict[str, Any] | None:
        if (
            not (self.data_dir / "val.jsonl").is_file()
            or not (self.data_dir / "gallery.jsonl").is_file()
        ):
            return None
        from retrieval.evaluate import evaluate

        res = evaluate(
            self.encoder,
            self.data_dir,
            "val",
            limit=self.cfg.val_limit or None,
            gallery_limit=self.cfg.val_gallery or None,
            baselines=False,
            progress=False,
            reranker=self.reranker(),
            rerank_k=self.cfg.val_rerank_k,
        )
        self.model.train()
        return {"first": res["recall"], "rerank": res["rerank"]["recall"]}

    def calibrate(self) -> dict[str, Any] | None:
        """Fit alpha on the full val split (retrieval.rerank_calibrate); None when off or the
        data has no val split."""
        k = DEFAULT_RERANK_K if self.cfg.calibrate_k < 0 else self.cfg.calibrate_k
        if not k or not (self.data_dir / "val.jsonl").is_file():
            return None
        report = calibrate_alpha(self.encoder, self.reranker(), self.data_dir, "val", k)
        self.model.train()
        self._log({"step": self.step, "calibration": {x: report[x] for x in ("alpha", "scale")}})
        return report

    def fit(self, resume: bool = True, until: int | None = None) -> dict[str, Any]:
        """Train to ``max_steps`` (or stop after global step ``until``, checkpointing, as an
        interrupted run would)."""
        if resume:
            self.load_checkpoint()
        cfg = self.cfg
        t0 = time.perf_counter()
        deadline = t0 + cfg.time_budget_min * 60 if cfg.time_budget_min > 0 else None
        bar = tqdm(
            total=cfg.max_steps, initial=self.step, desc="rerank", unit="step", mininterval=2
        )
        stopped = "completed"
        window: list[dict[str, float]] = []
        while self.step < cfg.max_steps:
            window.append(self.train_step(self.step))
            self.step += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                window.clear()
                bar.set_postfix(loss=f"{mean['loss']:.3f}", acc=f"{mean['acc']:.2f}")
                self._log(
                    {
                        "step": self.step,
                        **mean,
                        "lr": self.scheduler.get_last_lr()[0],
                        "alpha": float(self.model.alpha.detach()),
                        "elapsed_s": round(time.perf_counter() - t0, 1),
                    }
                )
            if cfg.val_every and self.step % cfg.val_every == 0 and self.step < cfg.max_steps:
                res = self.validate()
                if res:
                    logger.info(
                        "step %d val first %s rerank %s", self.step, res["first"], res["rerank"]
                    )
                    self._log({"step": self.step, "val": res})
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save_checkpoint()
            if deadline is not None and time.perf_counter() > deadline:
                stopped = "time-budget"
                break
            if until is not None and self.step >= until:
                stopped = "interrupted"
                break
        bar.close()
        self.save_checkpoint()
        if stopped == "interrupted":
            return {"steps": self.step, "stopped": stopped}
        final = self.out / "model"
        calibration = self.calibrate()
        self.reranker().save_pretrained(final)
        if calibration is not None:
            (final / CALIBRATION_JSON).write_text(json.dumps(calibration, indent=2) + "\n")
        val = self.validate()
        if val:
            self._log({"step": self.step, "val": val})
        summary = {
            "steps": self.step,
            "total_steps": cfg.max_steps,
            "stopped": stopped,
            "seconds": round(time.perf_counter() - t0, 1),
            "model_dir": str(final),
            "train_triplets": len(self.triplets),
            "train_images": len(self.feats.paths),
            "feature_seconds": round(self.feature_seconds, 1),
            "features": cfg.features,
            "val": val,
            "calibration": calibration,
        }
        (self.out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def train_reranker(cfg: RerankTrainConfig, resume: bool = True) -> dict[str, Any]:
    return RerankTrainer(cfg).fit(resume=resume)
