"""Package a training run as a committed model: weights + tokenizer + card with metrics.

    python -m retrieval.model_card --run runs/sprc-shapes --data data/shapes --out models/sprc-shapes

Evaluates the run's final model on ``test`` and ``test_unseen`` (with both baselines), copies the
checkpoint folder to ``--out`` and writes ``card.json`` (machine-readable; the test suite
reproduces its metrics with ``cir eval``) and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
from pathlib import Path
from typing import Any

from retrieval.data.triplets import load_gallery, load_meta
from retrieval.encoder import CONFIG_NAME, VOCAB_NAME, WEIGHTS_NAME, Encoder
from retrieval.evaluate import encode_gallery, evaluate, format_table

logger = logging.getLogger(__name__)

CARD_JSON = "card.json"
CARD_MD = "MODEL_CARD.md"
TRAIN_COMMAND = "make demo-model"


def _pct(r: dict[str, float]) -> str:
    return " | ".join(f"{100 * r[k]:.1f}" for k in ("1", "5", "10", "50"))


def _recipe(cfg: dict[str, Any]) -> str:
    parts = ["in-batch targets (SPRC)"]
    if cfg.get("reference_negatives"):
        parts.append("every reference image as an extra negative")
    if cfg.get("group_by_reference"):
        parts.append("batches that keep a reference's edits together")
    k = int(cfg.get("hard_negatives", 0) or 0)
    if k > 0:
        kinds = str(cfg.get("hard_negative_kinds", "any") or "any")
        what = "" if kinds == "any" else f", changing {kinds} (`--hard-negative-kinds`)"
        parts.append(
            f"{k} rendered one-attribute distractor{'s' if k > 1 else ''} of every target "
            f"(`--hard-negatives`{what})"
        )
    text = ", ".join(parts)
    w = float(cfg.get("caption_loss", 0.0) or 0.0)
    if w > 0:
        text += (
            f"; BLIP-2 stage-1 image-caption ITC on whole-scene captions (weight {w:g}, "
            "`--caption-loss`)"
        )
    else:
        text += "; no auxiliary loss"
    return text


def render_markdown(card: dict[str, Any]) -> str:
    ev = card["eval"]
    rows = []
    for split in ("test", "test_unseen"):
        if split not in ev:
            continue
        res = ev[split]
        rows.append(f"| {split} | SPRC (image + text) | {_pct(res['recall'])} |")
        rows.append(
            f"| {split} | image-only baseline | {_pct(res['baselines']['image_only']['recall'])} |"
        )
        rows.append(
            f"| {split} | text-only baseline | {_pct(res['baselines']['text_only']['recall'])} |"
        )
    types = []
    for typ, res in ev["test"]["by_type"].items():
        types.append(f"| {typ} | {res['n']} | {_pct(res['recall'])} |")
    tr = card["training"]
    data = card["data"]
    return f"""# sprc-shapes: the demo model

SPRC (sentence-level prompts on BLIP-2's Q-Former) with the `{card["preset"]}` architecture
({card["parameters"] / 1e6:.1f} M parameters), trained **from scratch** by this project on its own
synthetic composed-retrieval world. Fingerprint `{card["fingerprint"]}`.

## How it was made

```bash
{card["command"]}
```

which runs:

```bash
{chr(10).join(card["commands"])}
```

- Data: `cir data shapes --seed {data["seed"]}` (generator `{data["generator"]}`): {data["sizes"]["train"]} train
  triplets ({data["sizes"]["train_images"]} train images), {data["sizes"]["val"]} val, {data["sizes"]["test"]} test,
  {data["sizes"]["test_unseen"]} test_unseen triplets; gallery of {data["sizes"]["gallery"]} images at
  {data["image_size"]} px. Held-out shape-colour pairs (never in training): {", ".join(data["heldout_combos"])}.
- Training: {tr["steps"]} steps of batch {tr["config"]["batch_size"]} ({tr["steps"] * tr["config"]["batch_size"]} triplets,
  {tr["steps"] * tr["config"]["batch_size"] / max(1, data["sizes"]["train"]):.2f} epochs), AdamW (betas {tr["config"]["betas"]},
  eps {tr["config"]["eps"]}, weight decay {tr["config"]["weight_decay"]}), peak lr {tr["config"]["lr"]}, warmup
  {tr["config"]["warmup"]} then cosine, loss weights itc/rtc/align {tr["config"]["loss_weights"]}, ViT trained
  ({tr["config"]["train_vit"]}), seed {tr["config"]["seed"]}; stopped: {tr["stopped"]}; {tr["seconds"] / 60:.1f} minutes on
  {card["machine"]}.
- Negatives and auxiliary loss: {_recipe(tr["config"])}.
- Architecture: {card.get("architecture", "")}.

## Recall@K (%) over the whole gallery, reference excluded

| split | query | R@1 | R@5 | R@10 | R@50 |
|---|---|---|---|---|---|
{chr(10).join(rows)}

By modification type (test):

| type | n | R@1 | R@5 | R@10 | R@50 |
|---|---|---|---|---|---|
{chr(10).join(types)}

Reproduce: `cir data shapes --out data/shapes --seed {data["seed"]}` then
`cir eval --model models/sprc-shapes --data data/shapes --split test` (the test suite does this).
{render_reranker(card)}
{card.get("notes", "")}

## Limits

Trained on 64 px synthetic 2D scenes only: it knows 4 shapes, 8 colours, 2 sizes, 9 cells and
the caption templates of `retrieval/data/shapes.py`; it is not a general-purpose CIR model (for
that, convert the released BLIP-2 / SPRC weights: README).
"""


def render_reranker(card: dict[str, Any]) -> str:
    """The card's second-stage section (empty without a re-ranker)."""
    rr = card.get("reranker")
    if not rr:
        return ""
    rows = []
    for split, res in rr["eval"].items():
        k = res["rerank"]["k"]
        rows.append(f"| {split} | first stage alone | {_pct(res['recall'])} |")
        rows.append(f"| {split} | re-ranked top-{k} | {_pct(res['rerank']['recall'])} |")
    types = []
    test = rr["eval"]["test"]
    for typ, res in test["by_type"].items():
        after = test["rerank"]["by_type"][typ]["recall"]
        types.append(
            f"| {typ} | {res['n']} | {100 * res['recall']['1']:.1f} | {100 * after['1']:.1f} "
            f"| {100 * after['5']:.1f} |"
        )
    tr, c = rr["training"], rr["training"]["config"]
    cal = rr.get("calibration") or tr.get("calibration")
    calibration = ""
    if cal:
        before, after = cal["recall_trained"], cal["recall"]
        calibration = (
            f"\n- First-stage weight fitted on held-out triplets (`retrieval/rerank_calibrate.py`):"
            f"\n  alpha {cal['alpha_trained']:.2f} as trained -> {cal['alpha']:.2f} "
            f"(x{cal['scale']:g}), chosen on the {cal['split']} split ({cal['n']} triplets, "
            f"K = {cal['k']})\n  by R@1 + R@5: {100 * before['1']:.1f} / {100 * before['5']:.1f} -> "
            f"{100 * after['1']:.1f} / {100 * after['5']:.1f}."
        )
    return f"""
## Second stage: the re-ranker (`reranker/`)

A cross-attention re-ranker (`retrieval/rerank.py`, {rr["parameters"] / 1e6:.2f} M parameters,
{rr["bytes"] / 1e6:.2f} MB) that scores reference, caption and each of the first stage's top-K
candidates jointly, reading the candidate's `{c["features"]}`. Fingerprint `{rr["fingerprint"]}`;
trained on this folder's first stage (`{rr["encoder"]}`), which it refuses to serve beside any other.
`cir eval`, `cir serve` and `cir demo` use it by default (`--rerank 0` turns it off).

```bash
{chr(10).join(rr["commands"])}
```

- Training: {tr["steps"]} steps of {c["batch_size"]} triplets, each scored against its target,
  {c["negatives"]} hard negatives sampled from its first-stage top-{c["mine_k"]} over the
  {tr.get("train_images", "train")} train images and {c["in_batch"]} in-batch targets (softmax
  cross-entropy); lr {c["lr"]}, seed {c["seed"]}; stopped: {tr["stopped"]};
  {tr["seconds"] / 60:.1f} minutes of training (plus {tr.get("feature_seconds", 0) / 60:.1f} to
  compute the frozen first stage's features and mine) on {rr["machine"]}.{calibration}

| split | ranking | R@1 | R@5 | R@10 | R@50 |
|---|---|---|---|---|---|
{chr(10).join(rows)}

R@1 by type (test), first stage -> re-ranked (and re-ranked R@5):

| type | n | R@1 first | R@1 re-ranked | R@5 re-ranked |
|---|---|---|---|---|
{chr(10).join(types)}
"""


def _evaluate_reranker(
    enc: Encoder, rr: Any, data: Path, splits: list[str], k: int
) -> dict[str, Any]:
    """``evaluate`` of each split, first stage alone and re-ranked at ``k``, on one encoded
    gallery (the re-ranker checked against the encoder first)."""
    rr.check_encoder(enc)
    gallery = encode_gallery(enc, data, load_gallery(data), patches=rr.config.features == "patches")
    evals = {}
    for split in splits:
        res = evaluate(enc, data, split, gallery=gallery, reranker=rr, rerank_k=k)
        print(format_table(res))
        evals[split] = res
    return evals


def add_reranker(
    out: Path, run: Path, data: Path, commands: list[str], k: int | None = None
) -> dict[str, Any]:
    """Put the re-ranker of training run ``run`` into model folder ``out`` (as ``reranker/``),
    evaluate the first stage alone and re-ranked in one run, and add both to the card."""
    from retrieval.rerank import DEFAULT_RERANK_K, RERANKER_DIR, Reranker

    enc = Encoder.from_pretrained(out)
    rr = Reranker.from_pretrained(run / "model")
    splits = [
        s
        for s in ("test", "test_unseen")
        if (f := data / f"{s}.jsonl").is_file() and f.stat().st_size
    ]
    evals = _evaluate_reranker(enc, rr, data, splits, DEFAULT_RERANK_K if k is None else k)
    dest = out / RERANKER_DIR
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(run / "model", dest)
    train_cfg = json.loads((run / "train_config.json").read_text())
    summary = json.loads((run / "train_summary.json").read_text())
    card = json.loads((out / CARD_JSON).read_text())
    card["reranker"] = {
        "fingerprint": Reranker.from_pretrained(dest).fingerprint,
        "encoder": enc.fingerprint,
        "parameters": sum(p.numel() for p in rr.model.parameters()),
        "bytes": sum(f.stat().st_size for f in dest.iterdir()),
        "commands": commands,
        "machine": f"{platform.machine()} CPU, {__import__('os').cpu_count()} cores, "
        f"torch threads {train_cfg.get('num_threads') or 'default'}",
        "training": {**summary, "config": train_cfg},
        "eval": evals,
    }
    (out / CARD_JSON).write_text(json.dumps(card, indent=2) + "\n")
    (out / CARD_MD).write_text(render_markdown(card))
    return card


def refresh_reranker(
    out: Path, data: Path, commands: list[str], k: int | None = None
) -> dict[str, Any]:
    """Re-evaluate the re-ranker already in ``out`` (e.g. after ``cir calibrate-reranker``)
    and update its card entry: fingerprint, figures, calibration, and ``commands`` appended."""
    from retrieval.rerank import DEFAULT_RERANK_K, RERANKER_DIR, Reranker
    from retrieval.rerank_calibrate import CALIBRATION_JSON

    enc = Encoder.from_pretrained(out)
    dest = out / RERANKER_DIR
    rr = Reranker.from_pretrained(dest)
    card = json.loads((out / CARD_JSON).read_text())
    entry = card["reranker"]
    k = DEFAULT_RERANK_K if k is None else k
    entry["eval"] = _evaluate_reranker(enc, rr, data, list(entry["eval"]), k)
    entry["fingerprint"] = rr.fingerprint
    entry["bytes"] = sum(f.stat().st_size for f in dest.iterdir())
    entry["commands"] = [*entry["commands"], *(c for c in commands if c not in entry["commands"])]
    if (dest / CALIBRATION_JSON).is_file():
        entry["calibration"] = json.loads((dest / CALIBRATION_JSON).read_text())
    (out / CARD_JSON).write_text(json.dumps(card, indent=2) + "\n")
    (out / CARD_MD).write_text(render_markdown(card))
    return card


def build_card(
    run: Path, data: Path, out: Path, command: str, commands: list[str], notes: str = ""
) -> dict[str, Any]:
    model_dir = run / "model"
    enc = Encoder.from_pretrained(model_dir)
    evals = {}
    gallery = encode_gallery(enc, data, load_gallery(data))  # shared by both splits
    for split in ("test", "test_unseen"):
        if (data / f"{split}.jsonl").is_file() and (data / f"{split}.jsonl").stat().st_size:
            res = evaluate(enc, data, split, gallery=gallery)
            print(format_table(res))
            evals[split] = res
    meta = load_meta(data)
    train_cfg = json.loads((run / "train_config.json").read_text())
    summary = json.loads((run / "train_summary.json").read_text())
    c = enc.model.config
    out.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME, VOCAB_NAME):
        shutil.copy2(model_dir / name, out / name)
    card = {
        "name": out.name,
        "preset": enc.preset,
        "fingerprint": Encoder.from_pretrained(out).fingerprint,
        "parameters": sum(p.numel() for p in enc.model.parameters()),
        "command": command,
        "commands": commands,
        "machine": f"{platform.machine()} CPU, {__import__('os').cpu_count()} cores, "
        f"torch threads {train_cfg.get('num_threads') or 'default'}, "
        f"autocast {train_cfg.get('precision', 'auto')}, "
        f"attention {train_cfg.get('attn_implementation', 'auto')}",
        "architecture": (
            f"{c.image_size} px input, {c.patch_size} px patches ({c.num_image_tokens - 1} "
            f"patches + [CLS]), ViT {c.vision_hidden_size}x{c.vision_num_layers}, Q-Former "
            f"{c.qformer_hidden_size}x{c.qformer_num_layers}, {c.num_query_tokens} queries x "
            f"{c.embed_dim}-d"
        ),
        "data": {
            "seed": meta.get("seed"),
            "generator": meta.get("generator"),
            "image_size": meta.get("image_size"),
            "sizes": meta.get("sizes_per_split"),
            "heldout_combos": meta.get("heldout_combos"),
        },
        "training": {**summary, "config": train_cfg},
        "eval": evals,
        "notes": notes,
    }
    (out / CARD_JSON).write_text(json.dumps(card, indent=2) + "\n")
    (out / CARD_MD).write_text(render_markdown(card))
    return card


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", type=Path, help="training run folder (required unless --rerender)")
    ap.add_argument("--data", type=Path, help="data folder (required unless --rerender)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--rerender",
        action="store_true",
        help="only rewrite OUT/MODEL_CARD.md from OUT/card.json with new --notes-file (no eval)",
    )
    ap.add_argument("--command", default=TRAIN_COMMAND)
    ap.add_argument(
        "--commands-file", type=Path, help="the commands the make target ran, one per line"
    )
    ap.add_argument("--notes-file", type=Path, help="Markdown for the card: status, what was tried")
    ap.add_argument(
        "--reranker-run",
        type=Path,
        help="a `cir train-reranker` run: add its re-ranker to OUT and its metrics to the card",
    )
    ap.add_argument(
        "--reranker-only",
        action="store_true",
        help="keep OUT's first stage and card; only add --reranker-run (no first-stage eval)",
    )
    ap.add_argument(
        "--reranker-commands-file", type=Path, help="the re-ranker's commands, one per line"
    )
    ap.add_argument(
        "--reranker-refresh",
        action="store_true",
        help="re-evaluate OUT's re-ranker as it is now (e.g. after cir calibrate-reranker) and "
        "update its card entry; --reranker-commands-file lines are appended",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    commands = args.commands_file.read_text().splitlines() if args.commands_file else []
    notes = args.notes_file.read_text() if args.notes_file else ""
    if args.rerender:
        card = json.loads((args.out / CARD_JSON).read_text())
        card["notes"] = notes
        (args.out / CARD_JSON).write_text(json.dumps(card, indent=2) + "\n")
        (args.out / CARD_MD).write_text(render_markdown(card))
        return
    rr_commands = (
        args.reranker_commands_file.read_text().splitlines() if args.reranker_commands_file else []
    )
    if args.reranker_refresh:
        if args.data is None:
            ap.error("--reranker-refresh needs --data")
        refresh_reranker(args.out, args.data, rr_commands)
        return
    if args.reranker_only:
        if args.reranker_run is None or args.data is None:
            ap.error("--reranker-only needs --reranker-run and --data")
        add_reranker(args.out, args.reranker_run, args.data, rr_commands)
        return
    if args.run is None or args.data is None:
        ap.error("--run and --data are required (unless --rerender)")
    build_card(args.run, args.data, args.out, args.command, commands, notes)
    if args.reranker_run is not None:
        add_reranker(args.out, args.reranker_run, args.data, rr_commands)


if __name__ == "__main__":
    main()
