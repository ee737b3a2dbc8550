"""Faithfulness and cost of ``retrieval/explain.py`` on a shapes world, where every object's
cell is known from the generator and the demo model's 3x3 patches are the grid's cells.

    cir data shapes --out /tmp/shapes-explain --seed 21 --train 0 --val 0 --test 700 \\
        --test-unseen 0 --gallery 0
    python benchmarks/explain.py --model models/sprc-shapes --data /tmp/shapes-explain

Over the single-edit test triplets (combos have two edited objects, so they are left out):

* pointing game: the map of the true target peaks on the edited object's cell (add, colour,
  size, shape: the object's cell; move: its new cell); for remove, the reference map peaks on
  the removed object's cell. Chance: 1/9 per cell, mean 1/objects per object. Every CAM method
  and the gradient-free attention map are reported.
* deletion: painting the candidate map's top cell with the background lowers the score more
  than painting a random other occupied cell (triplets whose target has another occupied cell).
  Chance: the same test with a random occupied cell in place of the top one.
* words: the word naming the new value (colour: the new colour; shape: the new shape; size:
  bigger/larger/enlarge/increase/up/smaller/shrink/reduce/down; move: the destination's place
  words; add: the added object's size, colour, shape and place words) ranks 1st or 2nd by
  signed attribution. Remove names no new value and is left out. Chance: the probability that
  a random order puts one of those words in the top 2, averaged over the captions.
* latency: p50 of ``Explainer.explain`` (PIL in, maps and words out) per triple.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.data.shapes import (  # noqa: E402
    CELL_WORDS,
    COLOR_WORDS,
    GRID,
    SHAPE_WORDS,
    SIZE_WORDS,
    parse_signature,
    render_scene,
)

SIZE_CHANGE_WORDS = frozenset(
    ("bigger", "larger", "enlarge", "increase", "up", "smaller", "shrink", "reduce", "down")
)
#: Words of a place phrase that do not say which cell ("top left corner": top, left).
PLACE_FILLER = frozenset(("corner",))
SINGLE = ("add", "remove", "color", "size", "shape", "move")


def place_words(cell: int) -> set[str]:
    return {w for phrase in CELL_WORDS[cell] for w in phrase.split()} - PLACE_FILLER


def new_value_words(op: dict[str, Any]) -> set[str]:
    """Words that name what the edit makes new (empty for remove)."""
    kind = op["op"]
    if kind == "color":
        return set(COLOR_WORDS[op["color"]])
    if kind == "shape":
        return set(SHAPE_WORDS[op["shape"]])
    if kind == "size":
        return set(SIZE_CHANGE_WORDS)
    if kind == "move":
        return place_words(int(op["to"]))
    if kind == "add":
        return (
            set(SIZE_WORDS[op["size"]])
            | set(COLOR_WORDS[op["color"]])
            | set(SHAPE_WORDS[op["shape"]])
            | place_words(int(op["cell"]))
        )
    return set()


def top2_chance(n_words: int, n_hits: int) -> float:
    """P(a random order of n words puts one of n_hits given words in the first two)."""
    if n_words <= 2:
        return 1.0 if n_hits else 0.0
    return 1.0 - math.comb(n_words - n_hits, 2) / math.comb(n_words, 2)


def cell_box(cell: int, side: int) -> tuple[int, int, int, int]:
    """Pixel box (left, top, right, bottom) of a grid cell in a ``side``-pixel image."""
    row, col = divmod(cell, GRID)
    return (
        round(col * side / GRID),
        round(row * side / GRID),
        round((col + 1) * side / GRID),
        round((row + 1) * side / GRID),
    )


def paint_cell(image: Any, cell: int, rng: random.Random) -> Any:
    """A copy of ``image`` with ``cell`` painted in the background: the image's per-channel
    median (objects cover well under half of it) plus the renderer's kind of pixel noise."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    bg = np.median(arr.reshape(-1, 3), axis=0)
    x0, y0, x1, y1 = cell_box(cell, arr.shape[0])
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0.0, 5.0, (y1 - y0, x1 - x0, 3))
    arr[y0:y1, x0:x1] = bg + noise
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def peak(values: Any) -> int | None:
    """Row-major index of the map's maximum; None for an all-zero map (no peak)."""
    import numpy as np

    flat = np.asarray(values).reshape(-1)
    return int(flat.argmax()) if float(flat.max()) > 0 else None


def pct(hits: int, n: int) -> str:
    return f"{100.0 * hits / n:5.1f} %" if n else "  n/a"


def main() -> None:
    import numpy as np
    import torch
    from PIL import Image

    from retrieval.data.triplets import load_triplets, resolve_path
    from retrieval.encoder import Encoder
    from retrieval.explain import CAM_METHODS, WORD_METHODS, Explainer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/sprc-shapes", help="checkpoint folder or preset")
    ap.add_argument("--data", type=Path, default=None, help="a shapes world (cir data shapes)")
    ap.add_argument(
        "--latency-only",
        action="store_true",
        help="only time --latency-reps Explains on rendered scenes (e.g. --model blip2-vitg)",
    )
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 (the model's dtype)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=0, help="first N single-edit triplets (0: all)")
    ap.add_argument("--seed", type=int, default=0, help="random cells of the deletion test")
    ap.add_argument("--batch", type=int, default=32, help="triples explained per batch")
    ap.add_argument("--latency-reps", type=int, default=30, help="single Explains timed")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument(
        "--scorer",
        choices=("auto", "maxsim", "rerank"),
        default="auto",
        help="the score explained: auto = the re-ranker's when the model folder has one (what "
        "the server explains when it re-ranks), else MaxSim",
    )
    ap.add_argument(
        "--words",
        default="occlusion",
        choices=WORD_METHODS,
        help="the word attribution whose figure is the headline (and whose latency is timed)",
    )
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.data is None and not args.latency_only:
        ap.error("--data is required (or --latency-only)")
    t_load = time.perf_counter()
    enc = Encoder.from_pretrained(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - t_load
    if args.latency_only:
        ex = Explainer(enc)
        ref = render_scene(parse_signature("0:red-circle-L|4:blue-square-S"), 64, (21, 0, 1))
        cand = render_scene(parse_signature("0:red-circle-L|8:green-cross-L"), 64, (21, 0, 2))
        times = []
        for _ in range(args.latency_reps):
            t0 = time.perf_counter()
            ex.explain(ref, "add a big green cross in the bottom right", cand)
            times.append(time.perf_counter() - t0)
        p50 = 1000.0 * statistics.median(times)
        print(
            f"{args.model} ({enc.preset}, {args.dtype}, {torch.get_num_threads()} threads): "
            f"Explain p50 {p50:.1f} ms over {len(times)} (each: "
            + ", ".join(f"{1000 * t:.0f}" for t in times)
            + f" ms); model built in {load_s:.1f} s"
        )
        if args.json:
            args.json.write_text(
                json.dumps({"model": args.model, "dtype": args.dtype, "latency_ms": times}) + "\n"
            )
        return
    scorer = None
    if args.scorer != "maxsim":
        from retrieval.rerank import RerankPixelScorer, load_reranker_for

        rr = load_reranker_for(args.model, None, enc) if Path(args.model).is_dir() else None
        if rr is None and args.scorer == "rerank":
            ap.error(f"{args.model} has no re-ranker")
        if rr is not None:
            scorer = RerankPixelScorer(enc.model, rr)
    # the figures of every word method; the latency of what a request runs (the default)
    ex = Explainer(enc, scorer=scorer, words=args.words, all_words=True)
    served = Explainer(enc, scorer=scorer, words=args.words)
    explained_score = "re-ranker" if scorer is not None else "MaxSim"
    if ex.rows != GRID:
        print(
            f"note: the model has a {ex.rows}x{ex.cols} patch grid, not the world's {GRID}x{GRID}:"
            " cell figures compare patches to cells by position only",
            file=sys.stderr,
        )
    rng = random.Random(args.seed)
    triplets = [t for t in load_triplets(args.data, args.split) if t.type in SINGLE]
    if args.limit:
        triplets = triplets[: args.limit]
    methods = [*CAM_METHODS, "attention"]
    point: dict[str, collections.Counter[str]] = {m: collections.Counter() for m in methods}
    point_n: collections.Counter[str] = collections.Counter()
    cell_chance: list[float] = []
    on_object: collections.Counter[str] = collections.Counter()
    occupied_chance: list[float] = []
    object_chance: list[float] = []
    deletion = {m: [0, 0] for m in CAM_METHODS}  # [wins, n]
    deletion_chance = [0, 0]
    words_hit: collections.Counter[str] = collections.Counter()
    words_by_method: collections.Counter[str] = collections.Counter()
    words_n: collections.Counter[str] = collections.Counter()
    words_chance: list[float] = []
    latency: list[float] = []
    t_start = time.perf_counter()

    def grid_index(cell: int) -> int:
        # the demo model: patch index == cell index; other grids: the patch at the cell centre
        row, col = divmod(cell, GRID)
        return int((row + 0.5) * ex.rows / GRID) * ex.cols + int((col + 0.5) * ex.cols / GRID)

    def load(path: str | None) -> Any:
        return Image.open(resolve_path(args.data, path)).convert("RGB")  # type: ignore[arg-type]

    explained: list[tuple[Any, Any, Any, Any]] = []  # (triplet, ref, target, explanation)
    for i in range(0, len(triplets), args.batch):
        chunk = triplets[i : i + args.batch]
        refs = [load(t.reference) for t in chunk]
        tgts = [load(t.target) for t in chunk]
        exps = ex.explain_batch(ex.pixels(refs), [t.caption for t in chunk], ex.pixels(tgts))
        explained += list(zip(chunk, refs, tgts, exps, strict=True))
    for t, ref_img, tgt_img, _ in explained[: args.latency_reps]:
        t0 = time.perf_counter()
        # one request's work: PIL in, maps and words out (the server skips the attention map
        # when it explains the re-ranker: one MaxSim pass fewer)
        served.explain(ref_img, t.caption, tgt_img, attention=scorer is None)
        latency.append(time.perf_counter() - t0)

    for t, ref_img, tgt_img, e in explained:
        op = t.extra["ops"][0]
        # pointing game
        if op["op"] == "remove":
            cell, scene = int(op["cell"]), parse_signature(t.extra["reference_signature"])
            maps = {m: e.variants[f"reference/{m}"] for m in CAM_METHODS}
        else:
            cell = int(op["to"] if op["op"] == "move" else op["cell"])
            scene = parse_signature(t.extra["target_signature"])
            maps = {m: e.variants[f"candidate/{m}"] for m in CAM_METHODS}
            maps["attention"] = e.attention_map  # type: ignore[assignment]
        point_n[op["op"]] += 1
        cell_chance.append(1.0 / 9.0)
        object_chance.append(1.0 / len(scene))
        for m, values in maps.items():
            point[m][op["op"]] += int(peak(values) == grid_index(cell))
            # any object of the scene: does the map find objects at all (vs the edited one)?
            on_object[m] += int(peak(values) in {grid_index(o.cell) for o in scene})
        occupied_chance.append(len(scene) / 9.0)

        # deletion on the candidate (the true target)
        occupied = [o.cell for o in parse_signature(t.extra["target_signature"])]
        for m in CAM_METHODS:
            values = e.variants[f"candidate/{m}"]
            flat = np.asarray(values).reshape(-1)
            top_patch = int(flat.argmax())
            r, c = divmod(top_patch, ex.cols)  # the cell the top patch lies in
            top_cell = int(r * GRID / ex.rows) * GRID + int(c * GRID / ex.cols)
            others = [c for c in occupied if c != top_cell]
            if not others:
                continue
            other = rng.choice(others)
            painted = [paint_cell(tgt_img, top_cell, rng), paint_cell(tgt_img, other, rng)]
            scores = ex.score(ex.pixels([ref_img, ref_img]), [t.caption] * 2, ex.pixels(painted))
            deletion[m][0] += int(scores[0] < scores[1])
            deletion[m][1] += 1
        if len(occupied) >= 3:  # chance: a random occupied cell against another one
            a, b = rng.sample(occupied, 2)
            painted = [paint_cell(tgt_img, a, rng), paint_cell(tgt_img, b, rng)]
            scores = ex.score(ex.pixels([ref_img, ref_img]), [t.caption] * 2, ex.pixels(painted))
            deletion_chance[0] += int(scores[0] < scores[1])
            deletion_chance[1] += 1

        # words
        wanted = new_value_words(op)
        if wanted:
            ranked = sorted(e.words, key=lambda w: -w.score)
            words_n[op["op"]] += 1
            words_hit[op["op"]] += int(any(w.word in wanted for w in ranked[:2]))
            for m, ws in e.word_variants.items():
                top2 = sorted(ws, key=lambda w: -w.score)[:2]
                words_by_method[m] += int(any(w.word in wanted for w in top2))
            n_hits = sum(1 for w in e.words if w.word in wanted)
            words_chance.append(top2_chance(len(e.words), n_hits))

    elapsed = time.perf_counter() - t_start
    n = len(triplets)
    lat_ms = 1000.0 * statistics.median(latency) if latency else 0.0
    result: dict[str, Any] = {
        "model": args.model,
        "fingerprint": enc.fingerprint,
        "data": str(args.data),
        "split": args.split,
        "triplets": n,
        "threads": torch.get_num_threads(),
        "default_cam": ex.cam,
        "score": explained_score,
        "pointing": {
            m: {
                "all": sum(point[m].values()) / max(1, sum(point_n.values())),
                **{k: point[m][k] / point_n[k] for k in point_n},
            }
            for m in methods
        },
        "pointing_n": dict(point_n),
        "pointing_chance_cell": statistics.mean(cell_chance) if cell_chance else 0.0,
        "pointing_chance_object": statistics.mean(object_chance) if object_chance else 0.0,
        "peak_on_any_object": {
            m: on_object[m] / max(1, n if m != "attention" else n - point_n["remove"])
            for m in methods
        },
        "peak_on_any_object_chance": statistics.mean(occupied_chance) if occupied_chance else 0.0,
        "deletion": {m: w / max(1, k) for m, (w, k) in deletion.items()},
        "deletion_n": {m: k for m, (_, k) in deletion.items()},
        "deletion_chance": deletion_chance[0] / max(1, deletion_chance[1]),
        "words": sum(words_hit.values()) / max(1, sum(words_n.values())),
        "words_by_type": {k: words_hit[k] / words_n[k] for k in words_n},
        "words_by_method": {
            m: words_by_method[m] / max(1, sum(words_n.values())) for m in WORD_METHODS
        },
        "default_words": ex.words_method,
        "words_n": sum(words_n.values()),
        "words_chance": statistics.mean(words_chance) if words_chance else 0.0,
        "latency_p50_ms": lat_ms,
        "seconds": elapsed,
    }
    # pointing without remove (the candidate map alone; remove is judged on the reference)
    cand_n = sum(v for k, v in point_n.items() if k != "remove")
    for m in methods:
        hits = sum(v for k, v in point[m].items() if k != "remove")
        result["pointing"][m]["candidate_edits"] = hits / max(1, cand_n)

    types = [k for k in SINGLE if point_n[k]]
    print(
        f"{n} single-edit triplets of {args.data} ({args.split}), model {enc.fingerprint}, "
        f"explaining the {explained_score} score"
    )
    print(
        f"chance: pointing 1/9 = {100 * result['pointing_chance_cell']:.1f} % per cell, "
        f"{100 * result['pointing_chance_object']:.1f} % per object"
    )
    print("\npointing game (map peaks on the edited object's cell; remove: reference map)")
    print("| map | all | " + " | ".join(f"{k} (n={point_n[k]})" for k in types) + " |")
    print("|---|---|" + "---|" * len(types))
    for m in methods:
        r = result["pointing"][m]
        allv = r["all"] if m != "attention" else r["candidate_edits"]
        label = m + (" (no remove)" if m == "attention" else "")
        cells = " | ".join(
            ("—" if m == "attention" and k == "remove" else f"{100 * r[k]:.1f} %") for k in types
        )
        print(f"| {label} | {100 * allv:.1f} % | {cells} |")
    print(
        "peaks on any object of the scene (not only the edited one): "
        + ", ".join(f"{m} {100 * result['peak_on_any_object'][m]:.1f} %" for m in methods)
        + f"; chance {100 * result['peak_on_any_object_chance']:.1f} %"
    )
    print(
        f"\ndeletion (top cell painted lowers the score more than a random other occupied cell)"
        f"; chance {100 * result['deletion_chance']:.1f} % (n={deletion_chance[1]})"
    )
    for m in CAM_METHODS:
        print(f"  {m}: {100 * result['deletion'][m]:.1f} % (n={deletion[m][1]})")
    print(
        f"\nwords (new value ranks 1st or 2nd): {100 * result['words']:.1f} % "
        f"(n={result['words_n']}), chance {100 * result['words_chance']:.1f} %; by type "
        + ", ".join(f"{k} {100 * v:.1f} %" for k, v in result["words_by_type"].items())
    )
    print(
        "  by baseline: "
        + ", ".join(f"{m} {100 * v:.1f} %" for m, v in result["words_by_method"].items())
    )
    print(
        f"\nExplain latency p50 {lat_ms:.1f} ms ({torch.get_num_threads()} threads); "
        f"{elapsed:.0f} s in all"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
