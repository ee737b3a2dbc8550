"""retrieval's own subcommands: data, convert, train, eval, train-reranker,
calibrate-reranker."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    from retrieval.data import cli as data_cli

    data_cli.register(app)
    from retrieval import convert

    convert.register(app)
    app.command("train")(train_cmd)
    app.command("eval")(eval_cmd)
    app.command("train-reranker")(train_reranker_cmd)
    app.command("calibrate-reranker")(calibrate_reranker_cmd)


def train_cmd(
    data: Path = typer.Option(
        ..., "--data", help="Data dir with train.jsonl (+ val.jsonl, gallery.jsonl)."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Run directory (checkpoints, metrics, final model)."
    ),
    init: str = typer.Option(
        "sprc-small", "--init", help="Preset (from scratch) or checkpoint folder."
    ),
    epochs: int = typer.Option(10, help="Epochs (ignored when --max-steps > 0)."),
    max_steps: int = typer.Option(0, help="Total optimizer steps (0: epochs x steps/epoch)."),
    batch_size: int = typer.Option(64, help="Triplets per step."),
    lr: float = typer.Option(1e-5, help="Peak learning rate (SPRC default 1e-5)."),
    weight_decay: float = typer.Option(0.05, help="AdamW weight decay (SPRC 0.05)."),
    warmup: float = typer.Option(0.05, help="Warmup fraction of total steps."),
    loss_weights: str = typer.Option(
        "1,0.4,0.4", help="itc,rtc,align weights (CIRR 1,0.4,0.4; FashionIQ 1,1,1)."
    ),
    train_vit: bool = typer.Option(
        False, "--train-vit/--freeze-vit", help="Train the ViT (SPRC freezes it)."
    ),
    group_by_reference: bool = typer.Option(
        False,
        "--group-by-reference/--no-group-by-reference",
        help="Keep a reference's triplets in one batch (its other edits are hard negatives).",
    ),
    reference_negatives: bool = typer.Option(
        False,
        "--reference-negatives/--no-reference-negatives",
        help="Use the reference images as extra negatives (the unedited scene).",
    ),
    recipe: str = typer.Option(
        "shapes",
        help="World recipe that --caption-loss and --hard-negatives use "
        "(retrieval/data/recipes.py).",
    ),
    caption_loss: float = typer.Option(
        0.0,
        help="Weight of the BLIP-2 stage-1 image-caption ITC on whole-scene captions "
        "(shapes worlds only; 0 = SPRC losses only).",
    ),
    hard_negatives: int = typer.Option(
        0,
        help="Shapes worlds: render N one-attribute distractors of each train target as extra "
        "negatives (0 = none).",
    ),
    hard_negative_kinds: str = typer.Option(
        "any",
        help="What each rendered distractor changes, per slot, comma-separated: 'any' or "
        "'+'-joined color/size/shape/cell (e.g. 'cell,any': the first moves an object).",
    ),
    grad_clip: float = typer.Option(1.0, help="Max grad norm (0 disables)."),
    save_every: int = typer.Option(200, help="Checkpoint every N steps."),
    val_limit: int = typer.Option(500, help="Val triplets per epoch validation (0 = all)."),
    val_gallery: int = typer.Option(1500, help="Gallery size for validation (0 = full)."),
    no_validate: bool = typer.Option(False, "--no-validate", help="Skip per-epoch validation."),
    seed: int = typer.Option(0, help="Seed for init, data order and dropout."),
    time_budget_min: float = typer.Option(
        0.0, help="Stop and save after this many minutes (0 = none)."
    ),
    limit: int = typer.Option(0, help="Use only the first N train triplets."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    num_threads: int = typer.Option(0, help="Torch CPU threads (0 = default)."),
    weights_dtype: str = typer.Option(
        "float32",
        help="Stored dtype of the final model: fp32|fp16|bf16 (float32|float16|bfloat16).",
    ),
    precision: str = typer.Option(
        "auto",
        help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32: float32 weights, bf16 autocast. "
        "bf16 pays off on CPUs with AVX512-BF16 or AMX.",
    ),
    attn: str = typer.Option(
        "auto", help="Attention kernel: auto (eager on CPU, sdpa on CUDA) | eager | sdpa."
    ),
    resume: bool = typer.Option(
        True, "--resume/--no-resume", help="Continue from OUT/checkpoints/last."
    ),
) -> None:
    """Train SPRC on a triplet dataset (the SPRC losses, AdamW, warmup + cosine)."""
    from retrieval.train import TrainConfig, train

    w = tuple(float(x) for x in loss_weights.split(","))
    if len(w) != 3:
        raise typer.BadParameter("--loss-weights needs three numbers: itc,rtc,align")
    from retrieval.data.recipes import get_recipe

    try:
        world = get_recipe(recipe)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--recipe") from None
    try:
        world.parse_hard_negative_kinds(hard_negative_kinds, 1)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--hard-negative-kinds") from None
    cfg = TrainConfig(
        data=str(data),
        out=str(out),
        init=init,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup=warmup,
        loss_weights=w,
        train_vit=train_vit,  # type: ignore[arg-type]
        group_by_reference=group_by_reference,
        reference_negatives=reference_negatives,
        recipe=recipe,
        caption_loss=caption_loss,
        hard_negatives=hard_negatives,
        hard_negative_kinds=hard_negative_kinds,
        grad_clip=grad_clip,
        save_every=save_every,
        val_limit=val_limit,
        val_gallery=val_gallery,
        validate=not no_validate,
        seed=seed,
        time_budget_min=time_budget_min,
        limit=limit,
        device=device,
        num_threads=num_threads,
        weights_dtype=weights_dtype,
        precision=precision,
        attn_implementation=attn,
    )
    try:
        summary = train(cfg, resume=resume)
    except (ValueError, FileNotFoundError) as exc:  # bad data or options: say so, no traceback
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(json.dumps(summary, indent=2))


def eval_cmd(
    model: str = typer.Option(
        ..., "--model", help="Checkpoint folder (or preset for random weights)."
    ),
    data: Path = typer.Option(..., "--data", help="Data dir with SPLIT.jsonl and gallery.jsonl."),
    split: str = typer.Option("test", help="Split to evaluate."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the results JSON here."),
    limit: int = typer.Option(0, help="Evaluate only the first N triplets (0 = all)."),
    batch_size: int = typer.Option(64, help="Encoding batch size."),
    no_baselines: bool = typer.Option(
        False, "--no-baselines", help="Skip image-only/text-only baselines."
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    dtype: str = typer.Option(
        "float32",
        help="fp32 | bf16 | fp16 | auto (float32/bfloat16/float16 too): the ViT's dtype; the "
        "Q-Former stays float32.",
    ),
    num_threads: int = typer.Option(0, help="Torch CPU threads (0 = default)."),
    rerank: int | None = typer.Option(
        None,
        "--rerank",
        help="Re-rank each query's first-stage top-K with the re-ranker (0 = off; default "
        "retrieval.rerank.DEFAULT_RERANK_K when the model folder has a re-ranker).",
    ),
    reranker_dir: Path | None = typer.Option(
        None, "--reranker", help="Re-ranker folder (default: MODEL/reranker when present)."
    ),
) -> None:
    """Recall@1/5/10/50 over the gallery, with image-only and text-only baselines; with a
    re-ranker, the first stage alone and re-ranked, in one run."""
    from retrieval.encoder import Encoder
    from retrieval.evaluate import evaluate, format_table, write_json
    from retrieval.rerank import DEFAULT_RERANK_K, RerankerError, load_reranker_for

    if rerank is not None and rerank < 0:
        typer.echo("error: --rerank must be >= 0", err=True)
        raise typer.Exit(code=2)
    enc = Encoder.from_pretrained(
        model, device=device, dtype=dtype, num_threads=num_threads or None
    )
    try:
        reranker = load_reranker_for(model, reranker_dir, enc) if rerank != 0 else None
    except RerankerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    if rerank and reranker is None:
        typer.echo(f"error: --rerank {rerank} needs a re-ranker (--reranker DIR)", err=True)
        raise typer.Exit(code=2)
    k = (rerank if rerank is not None else DEFAULT_RERANK_K) if reranker is not None else 0
    res = evaluate(
        enc,
        data,
        split,
        limit=limit or None,
        batch_size=batch_size,
        baselines=not no_baselines,
        reranker=reranker,
        rerank_k=k,
    )
    typer.echo(format_table(res))
    if json_out:
        write_json(res, json_out)
        typer.echo(f"wrote {json_out}")


def train_reranker_cmd(
    data: Path = typer.Option(
        ..., "--data", help="Data dir with train.jsonl (+ val.jsonl, gallery.jsonl)."
    ),
    encoder: Path = typer.Option(
        ..., "--encoder", help="The trained first-stage model folder (frozen)."
    ),
    out: Path = typer.Option(..., "--out", help="Run directory (features, checkpoints, model)."),
    features: str = typer.Option(
        "targets", help="Candidate features: targets (stored Q x D vectors) | patches (ViT)."
    ),
    width: int = typer.Option(128, help="Re-ranker hidden size."),
    layers: int = typer.Option(2, help="Re-ranker blocks."),
    heads: int = typer.Option(4, help="Attention heads."),
    mine_k: int = typer.Option(50, help="Mined first-stage candidates per triplet."),
    negatives: int = typer.Option(15, help="Hard negatives per triplet per step (of the mined)."),
    in_batch: int = typer.Option(8, help="In-batch negatives per triplet per step."),
    batch_size: int = typer.Option(32, help="Triplets per step."),
    max_steps: int = typer.Option(3000, help="Total optimizer steps."),
    lr: float = typer.Option(5e-4, help="Peak learning rate."),
    warmup: float = typer.Option(0.05, help="Warmup fraction of total steps."),
    seed: int = typer.Option(0, help="Seed for init, batch order and negative sampling."),
    save_every: int = typer.Option(200, help="Checkpoint every N steps."),
    val_every: int = typer.Option(1000, help="Validate every N steps (0 = at the end only)."),
    val_limit: int = typer.Option(300, help="Val triplets per validation (0 = all)."),
    val_gallery: int = typer.Option(1000, help="Gallery size for validation (0 = full)."),
    time_budget_min: float = typer.Option(
        0.0, help="Stop and save after this many minutes (0 = none)."
    ),
    limit: int = typer.Option(0, help="Use only the first N train triplets."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    num_threads: int = typer.Option(0, help="Torch CPU threads (0 = default)."),
    precision: str = typer.Option(
        "auto", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32: bf16 autocast."
    ),
    resume: bool = typer.Option(
        True, "--resume/--no-resume", help="Continue from OUT/checkpoints/last."
    ),
) -> None:
    """Train the second-stage re-ranker on the first stage's mined hard negatives."""
    from retrieval.rerank_train import RerankTrainConfig, train_reranker

    cfg = RerankTrainConfig(
        data=str(data),
        encoder=str(encoder),
        out=str(out),
        features=features,
        width=width,
        layers=layers,
        heads=heads,
        mine_k=mine_k,
        negatives=negatives,
        in_batch=in_batch,
        batch_size=batch_size,
        max_steps=max_steps,
        lr=lr,
        warmup=warmup,
        seed=seed,
        save_every=save_every,
        val_every=val_every,
        val_limit=val_limit,
        val_gallery=val_gallery,
        time_budget_min=time_budget_min,
        limit=limit,
        device=device,
        num_threads=num_threads,
        precision=precision,
    )
    try:
        summary = train_reranker(cfg, resume=resume)
    except (ValueError, FileNotFoundError) as exc:  # bad data or options: one line, exit 2
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(json.dumps(summary, indent=2))


def calibrate_reranker_cmd(
    model: str = typer.Option(..., "--model", help="The first-stage model folder."),
    data: Path = typer.Option(..., "--data", help="Data dir with SPLIT.jsonl and gallery.jsonl."),
    reranker_dir: Path | None = typer.Option(
        None, "--reranker", help="Re-ranker folder to calibrate (default: MODEL/reranker)."
    ),
    split: str = typer.Option(
        "val", help="Held-out split to fit on (never a test split you report)."
    ),
    k: int = typer.Option(0, "--k", help="Candidates re-ranked (0 = the serving default)."),
    limit: int = typer.Option(0, help="Use only the first N triplets (0 = all)."),
    num_threads: int = typer.Option(0, help="Torch CPU threads (0 = default)."),
) -> None:
    """Fit the re-ranker's first-stage weight (alpha) on a held-out split and write it back
    (the re-ranker's fingerprint changes; calibration.json records the grid)."""
    from retrieval.encoder import Encoder
    from retrieval.rerank import DEFAULT_RERANK_K, RerankerError, find_reranker
    from retrieval.rerank_calibrate import calibrate_folder

    folder = reranker_dir if reranker_dir is not None else find_reranker(model)
    if folder is None:  # before the encoder is loaded
        typer.echo(f"error: {model} has no re-ranker (--reranker DIR)", err=True)
        raise typer.Exit(code=2)
    enc = Encoder.from_pretrained(model, num_threads=num_threads or None)
    try:
        report = calibrate_folder(enc, folder, data, split, k or DEFAULT_RERANK_K, limit=limit)
    except (RerankerError, ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(
        "| alpha | x trained | R@1 | R@5 | R@10 |\n|---|---|---|---|---|\n"
        + "\n".join(
            f"| {r['alpha']:.2f} | {r['scale']:g} | "
            + " | ".join(f"{100 * r['recall'][x]:.1f}" for x in ("1", "5", "10"))
            + " |"
            for r in report["grid"]
        )
    )
    typer.echo(
        f"alpha {report['alpha_trained']:.3f} -> {report['alpha']:.3f} on {split} "
        f"(n={report['n']}, K={report['k']}); fingerprint {report['fingerprint']}"
    )
