"""`cir data ...`: generate the shapes world, convert CIRR / FashionIQ.

Also runnable on its own: ``python -m retrieval.data.cli shapes --out data/shapes``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import typer

logger = logging.getLogger(__name__)


def _summary(title: str, counts: dict[str, object], seconds: float) -> None:
    parts = ", ".join(f"{k}={v}" for k, v in counts.items())
    typer.echo(f"{title}: {parts} ({seconds:.1f}s)")


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code=2)


def register(app: typer.Typer) -> None:
    """Add the ``data`` command group to ``app``."""
    data = typer.Typer(help="Datasets: the synthetic shapes world and CIRR/FashionIQ converters.")
    app.add_typer(data, name="data")

    @data.command("shapes")
    def shapes(
        out: Path = typer.Option(..., "--out", help="output data directory"),
        seed: int = typer.Option(0, "--seed", help="everything is derived from it"),
        train: int = typer.Option(40_000, "--train", help="train triplets"),
        val: int = typer.Option(1_000, "--val", help="val triplets"),
        test: int = typer.Option(1_000, "--test", help="test triplets"),
        test_unseen: int = typer.Option(1_000, "--test-unseen", help="test_unseen triplets"),
        gallery: int = typer.Option(5_000, "--gallery", help="minimum gallery size"),
        image_size: int = typer.Option(64, "--image-size", help="image side in pixels"),
        max_per_ref: int = typer.Option(
            3, "--max-triplets-per-reference", help="triplets per reference scene: 1..this"
        ),
        distractors: int = typer.Option(
            1, "--distractors-per-target", help="hard distractors per eval target (at least)"
        ),
        workers: int = typer.Option(2, "--workers", help="rendering processes"),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="replace a world already in --out"
        ),
    ) -> None:
        """Generate the synthetic shapes world (images + JSONL), deterministic by seed."""
        from retrieval.data.shapes import ShapesConfig, generate

        cfg = ShapesConfig(
            seed=seed,
            train=train,
            val=val,
            test=test,
            test_unseen=test_unseen,
            gallery=gallery,
            image_size=image_size,
            max_triplets_per_reference=max_per_ref,
            distractors_per_target=distractors,
            workers=workers,
        )
        t0 = time.perf_counter()
        try:
            meta = generate(cfg, out, overwrite=overwrite)
        except (ValueError, RuntimeError, OSError) as exc:
            _fail(exc)
            return
        _summary(f"shapes world in {out}", meta["sizes_per_split"], time.perf_counter() - t0)
        typer.echo(f"held-out combos: {', '.join(meta['heldout_combos'])}")

    @data.command("cirr")
    def cirr(
        src: Path = typer.Argument(..., help="CIRR dir with captions/ and image_splits/"),
        out: Path = typer.Option(..., "--out", help="output data directory"),
        image_root: Path | None = typer.Option(
            None, "--image-root", help="root the split files' ./train/.. paths are relative to"
        ),
        gallery_split: str = typer.Option("val", "--gallery-split", help="val or test1"),
    ) -> None:
        """Convert CIRR annotations into the triplet JSONL format."""
        from retrieval.data.cirr import convert_cirr

        t0 = time.perf_counter()
        try:
            meta = convert_cirr(src, out, image_root=image_root, gallery_split=gallery_split)
        except (ValueError, OSError) as exc:
            _fail(exc)
            return
        _summary(f"cirr -> {out}", meta["counts"], time.perf_counter() - t0)

    @data.command("fashioniq")
    def fashioniq(
        src: Path = typer.Argument(
            ..., help="FashionIQ dir with captions/, image_splits/, images/"
        ),
        out: Path = typer.Option(..., "--out", help="output data directory"),
        categories: str = typer.Option("dress,shirt,toptee", "--categories", help="comma list"),
        gallery_split: str = typer.Option("val", "--gallery-split", help="val or test"),
        both_orders: bool = typer.Option(
            False, "--both-orders", help="train: also add the 'c2 and c1' caption order"
        ),
    ) -> None:
        """Convert FashionIQ annotations into the triplet JSONL format."""
        from retrieval.data.fashioniq import convert_fashioniq

        cats = tuple(c.strip() for c in categories.split(",") if c.strip())
        t0 = time.perf_counter()
        try:
            meta = convert_fashioniq(
                src, out, categories=cats, gallery_split=gallery_split, both_orders=both_orders
            )
        except (ValueError, OSError) as exc:
            _fail(exc)
            return
        _summary(f"fashioniq -> {out}", meta["counts"], time.perf_counter() - t0)


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    root = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
    register(root)
    # `python -m retrieval.data.cli shapes ...` == `cir data shapes ...`
    import sys

    root(args=["data", *sys.argv[1:]])


if __name__ == "__main__":
    main()
