"""SPRC training: the three SPRC losses, AdamW + warmup/cosine, checkpoints with exact resume.

Run directory layout::

    OUT/metrics.jsonl          one JSON line per logged step / validation
    OUT/checkpoints/last/      model + optimizer + scheduler + RNG + position (exact resume)
    OUT/model/                 the final Encoder checkpoint folder (config + safetensors + vocab)
    OUT/train_config.json      the TrainConfig used
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from retrieval.config import get_config, parse_model_source
from retrieval.data.recipes import HardNegatives, get_recipe
from retrieval.data.triplets import load_triplets, resolve_path
from retrieval.encoder import Encoder, build_model, resolve_device, set_threads
from retrieval.imageio import decode_image
from retrieval.precision import resolve_precision
from retrieval.preprocess import BatchNormaliser, ImagePreprocessor
from retrieval.tokenization import QFormerTokenizer

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str  # data dir with train.jsonl (+ val.jsonl and gallery.jsonl for validation)
    out: str  # run directory
    init: str = "sprc-small"  # preset (from scratch) or an Encoder checkpoint folder
    epochs: int = 10  # passes over train.jsonl (ignored when max_steps > 0)
    max_steps: int = 0  # total optimizer steps; 0 = epochs * steps_per_epoch
    batch_size: int = 64  # triplets per step; in-batch targets are the negatives
    lr: float = 1e-5  # peak learning rate (SPRC CIRR: 1e-5 for fine-tuning BLIP-2)
    weight_decay: float = 0.05  # SPRC AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.98)  # SPRC AdamW betas
    eps: float = 1e-7  # SPRC AdamW eps
    warmup: float = 0.05  # fraction of steps with linear warmup, then cosine decay to 0
    loss_weights: tuple[float, float, float] = (1.0, 0.4, 0.4)  # itc, rtc, align (CIRR)
    train_vit: bool = False  # SPRC freezes the ViT; a from-scratch small model must train it
    group_by_reference: bool = False  # batches keep a reference's triplets together: its other
    # edits become in-batch hard negatives (same scene, different caption); SPRC shuffles
    reference_negatives: bool = False  # references (encoded as targets) as extra negatives
    recipe: str = "shapes"  # the world recipe (retrieval/data/recipes.py) that caption_loss
    # and hard_negatives ask for scene captions and rendered distractors
    caption_loss: float = 0.0  # weight of BLIP-2 stage-1 image-caption ITC on whole-scene
    # captions (shapes worlds: from the scene signatures); 0 = SPRC losses only
    hard_negatives: int = 0  # shapes worlds: render this many one-attribute distractors of
    # each train target (the gallery's near misses, from train scenes only) as extra negatives
    hard_negative_kinds: str = "any"  # what each of those distractors changes, per slot and
    # comma-separated ("cell,any": the first moves an object, the second changes anything);
    # "any" or "+"-joined kinds of color/size/shape/cell; the last entry covers the rest
    grad_clip: float = 1.0  # max global grad norm (0 disables)
    save_every: int = 200  # checkpoint every N steps (and at the end / on the time budget)
    log_every: int = 10  # metrics.jsonl every N steps
    val_limit: int = 500  # val triplets per validation (0 = all)
    val_gallery: int = 1500  # gallery size for validation (0 = full gallery)
    validate: bool = True  # Recall@K on val at the end of each epoch
    seed: int = 0  # model init, data order, dropout
    time_budget_min: float = 0.0  # stop (and save) after this many minutes; 0 = none
    limit: int = 0  # use only the first N train triplets (0 = all)
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 0  # torch CPU threads (0 = default)
    weights_dtype: str = "float32"  # stored dtype of the final model (retrieval.precision names:
    # fp32|bf16|fp16, or float32|bfloat16|float16)
    precision: str = "auto"  # retrieval.precision: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    # (float32/bfloat16 accepted): float32 master weights, bf16 autocast;
    # bf16 + eager attention on a CPU with native bf16 (AVX512-BF16/AMX): a sprc-small step
    # ~2.7x faster than sdpa + fp32 (benchmarks/attn_precision.py)
    attn_implementation: str = "auto"  # auto (eager on CPU, sdpa on CUDA) | eager | sdpa

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ImageBank:
    """Every train image decoded once into uint8 [M, 3, S, S] (TargetPad + resize + crop);
    normalisation happens per batch. 64 px renders: ~12 KB each."""

    def __init__(self, data_dir: Path, paths: list[str], encoder_pre: ImagePreprocessor) -> None:
        self.index = {p: i for i, p in enumerate(paths)}
        s = encoder_pre.size
        self.data = torch.empty((len(paths), 3, s, s), dtype=torch.uint8)
        for i, p in enumerate(tqdm(paths, desc="loading images", unit="img", mininterval=2)):
            self.data[i] = encoder_pre.to_uint8(decode_image(resolve_path(data_dir, p)))
        self.normalise = BatchNormaliser(encoder_pre)

    def batch(self, paths: list[str]) -> torch.Tensor:
        idx = torch.tensor([self.index[p] for p in paths])
        return self.normalise(self.data[idx])


def lr_lambda(step: int, total: int, warmup: float) -> float:
    """Linear warmup then cosine decay to zero (SPRC uses a one-cycle schedule)."""
    w = max(1, int(total * warmup))
    if step < w:
        return (step + 1) / w
    progress = min(1.0, (step - w) / max(1, total - w))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(
    ckpt_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    config: dict[str, Any],
) -> None:
    """model + optimizer + scheduler + RNG + step into ``ckpt_dir/state.pt``, atomically (a
    killed save leaves the previous checkpoint): exact resume for every trainer here."""
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "rng": _rng_state(),
            "config": config,
        },
        tmp / "state.pt",
    )
    old = ckpt_dir.with_name(ckpt_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if ckpt_dir.exists():
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_training_state(
    ckpt_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    device: torch.device,
) -> int | None:
    """Restore what :func:`save_training_state` wrote (RNG included); the step, or None."""
    path = ckpt_dir / "state.pt"
    if not path.is_file():
        return None
    state = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    logger.info("resumed from %s at step %d", path, int(state["step"]))
    return int(state["step"])


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = self.out / "checkpoints" / "last"
        set_threads(cfg.num_threads or None)
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)

        init = parse_model_source(cfg.init)  # the one rule: an existing folder wins
        if not init.is_preset and Path(init.ref).is_dir():
            base = Encoder.from_pretrained(f"local-dir:{init.ref}")
            self.model, self.tokenizer = base.model, base.tokenizer
        else:  # a preset or a config.json file: from scratch
            config = get_config(cfg.init)
            self.model = build_model(config, seed=cfg.seed)
            self.tokenizer = QFormerTokenizer.builtin(max_length=config.max_text_len)
        self.model.to(self.device).float()
        self.config = self.model.config
        attn = cfg.attn_implementation
        if attn == "auto":
            attn = "sdpa" if self.device.type == "cuda" else "eager"
        self.model.set_attn_implementation(attn)
        # retrieval.precision: float32 master weights, bf16 autocast for "bf16" (CPU too)
        self.precision = resolve_precision(cfg.precision, self.device, training=True)
        self.autocast_bf16 = self.precision.autocast
        for p in self.model.vision_model.parameters():
            p.requires_grad_(cfg.train_vit)
        for p in self.model.vision_model.post_layernorm.parameters():  # ln_vision is trained
            p.requires_grad_(True)

        data_dir = Path(cfg.data)
        self.data_dir = data_dir
        triplets = [t for t in load_triplets(data_dir, "train") if t.target]
        if cfg.limit:
            triplets = triplets[: cfg.limit]
        if len(triplets) < cfg.batch_size:
            raise ValueError(f"{len(triplets)} train triplets < batch size {cfg.batch_size}")
        self.triplets = triplets
        self._pos = {id(t): i for i, t in enumerate(triplets)}  # triplet -> index (hard negs)
        # Reference groups in first-appearance order (deterministic; used by batch_at).
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(triplets):
            groups.setdefault(t.reference, []).append(i)
        self.groups = list(groups.values())
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, triplet order) cache
        self.scene_captions: dict[str, str] = {}
        if cfg.caption_loss > 0:
            self.scene_captions = get_recipe(cfg.recipe).scene_captions(triplets)
        pre = ImagePreprocessor.from_config(self.config)
        self.bank_pre = pre
        paths = sorted({t.reference for t in triplets} | {t.target for t in triplets if t.target})
        self.bank = ImageBank(data_dir, paths, pre)
        self.hard_bank: HardNegatives | None = None
        if cfg.hard_negatives > 0:
            self.hard_bank = get_recipe(cfg.recipe).hard_negatives(
                data_dir, triplets, cfg.hard_negatives, pre, cfg.seed, cfg.hard_negative_kinds
            )
        self.steps_per_epoch = len(triplets) // cfg.batch_size
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch

        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, self.total_steps, cfg.warmup)
        )
        self.step = 0
        (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    # ---------------------------------------------------------------- state
    def save_checkpoint(self) -> None:
        save_training_state(
            self.ckpt_dir,
            self.model,
            self.optimizer,
            self.scheduler,
            self.step,
            self.config.to_dict(),
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
    def batch_at(self, step: int) -> list[Any]:
        """Deterministic batch for a global step: epoch permutation seeded by (seed, epoch)."""
        epoch, b = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:
            rng = np.random.default_rng([self.cfg.seed, epoch])
            if self.cfg.group_by_reference:
                perm = rng.permutation(len(self.groups))
                self._order = (epoch, [i for g in perm for i in self.groups[g]])
            else:
                self._order = (epoch, rng.permutation(len(self.triplets)).tolist())
        order = self._order[1]
        bs = self.cfg.batch_size
        return [self.triplets[i] for i in order[b * bs : (b + 1) * bs]]

    def train_step(self, batch: list[Any]) -> dict[str, float]:
        self.model.train()
        if not self.cfg.train_vit:
            self.model.vision_model.eval()
        ref = self.bank.batch([t.reference for t in batch]).to(self.device)
        tgt = self.bank.batch([t.target for t in batch]).to(self.device)
        tok = self.tokenizer([t.caption for t in batch], device=self.device)
        captions = None
        if self.cfg.caption_loss > 0:
            paths = [t.target for t in batch] + [t.reference for t in batch]
            ctok = self.tokenizer([self.scene_captions[p] for p in paths], device=self.device)
            img = torch.tensor([self.bank.index[p] for p in paths], device=self.device)
            pos = img[:, None] == img[None, :]  # [2B, 2B]: same image (a repeated reference)
            captions = (ctok.input_ids, ctok.attention_mask, pos)
        hard = None
        if self.hard_bank is not None:
            px, valid = self.hard_bank.batch([self._pos[id(t)] for t in batch])
            hard = (px.to(self.device), valid.to(self.device))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            out = self.model(
                ref,
                tgt,
                tok.input_ids,
                tok.attention_mask,
                weights=self.cfg.loss_weights,
                reference_negatives=self.cfg.reference_negatives,
                captions=captions,
                caption_weight=self.cfg.caption_loss,
                hard_negatives=hard,
            )
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.cfg.grad_clip
            )
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self.model.temp.clamp_(0.001, 0.5)
        extra = {} if out.loss_caption is None else {"loss_caption": out.loss_caption.item()}
        return {
            **extra,
            "loss": out.loss.item(),
            "loss_itc": out.loss_itc.item(),
            "loss_rtc": out.loss_rtc.item(),
            "loss_align": out.loss_align.item(),
        }

    def encoder(self) -> Encoder:
        return Encoder(self.model, self.tokenizer, device=self.device, dtype="float32")

    def validate(self) -> dict[str, Any] | None:
        if (
            not (self.data_dir / "val.jsonl").is_file()
            or not (self.data_dir / "gallery.jsonl").is_file()
        ):
            return None
        from retrieval.evaluate import evaluate

        was_training = self.model.training
        res = evaluate(
            self.encoder(),
            self.data_dir,
            "val",
            limit=self.cfg.val_limit or None,
            gallery_limit=self.cfg.val_gallery or None,
            baselines=False,
            progress=False,
        )
        self.model.train(was_training)
        return res

    def fit(self, resume: bool = True, until: int | None = None) -> dict[str, Any]:
        """Train to ``total_steps`` (or stop after global step ``until``, checkpointing, as an
        interrupted run would)."""
        if resume:
            self.load_checkpoint()
        cfg = self.cfg
        t0 = time.perf_counter()
        deadline = t0 + cfg.time_budget_min * 60 if cfg.time_budget_min > 0 else None
        bar = tqdm(
            total=self.total_steps, initial=self.step, desc="train", unit="step", mininterval=2
        )
        stopped = "completed"
        window: list[float] = []
        last_log = time.perf_counter()
        while self.step < self.total_steps:
            losses = self.train_step(self.batch_at(self.step))
            self.step += 1
            window.append(losses["loss"])
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                now = time.perf_counter()
                sps = cfg.log_every / max(now - last_log, 1e-9)
                last_log = now
                bar.set_postfix(loss=f"{np.mean(window):.3f}", sps=f"{sps:.2f}")
                window.clear()
                self._log(
                    {
                        "step": self.step,
                        **losses,
                        "lr": self.scheduler.get_last_lr()[0],
                        "temp": float(self.model.temp.detach()),
                        "elapsed_s": round(now - t0, 1),
                    }
                )
            if cfg.validate and self.step % self.steps_per_epoch == 0:
                res = self.validate()
                if res:
                    logger.info(
                        "epoch %d val R@1/5/10 %s", self.step // self.steps_per_epoch, res["recall"]
                    )
                    self._log(
                        {
                            "step": self.step,
                            "epoch": self.step // self.steps_per_epoch,
                            "val": res["recall"],
                        }
                    )
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
        self.encoder().save_pretrained(final, weights_dtype=cfg.weights_dtype)
        summary = {
            "steps": self.step,
            "total_steps": self.total_steps,
            "stopped": stopped,
            "seconds": round(time.perf_counter() - t0, 1),
            "model_dir": str(final),
            "train_triplets": len(self.triplets),
        }
        (self.out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def train(cfg: TrainConfig, resume: bool = True) -> dict[str, Any]:
    return Trainer(cfg).fit(resume=resume)


__all__ = ["TrainConfig", "Trainer", "train", "lr_lambda"]
