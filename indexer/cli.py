"""`cir index ...`: build (rebuild / resume / incremental / shard), info, verify, versions,
activate, drop-version.

Also runnable on its own: ``python -m indexer build SOURCE --index edge:data/index ...``.
Exit codes: 0 ok; 1 verification failed (nothing activated); 2 bad arguments or index errors.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import typer

logger = logging.getLogger(__name__)

DEFAULT_INDEX = "edge:data/index"
_INDEX_OPT = typer.Option(DEFAULT_INDEX, "--index", envvar="CIR_INDEX", help="index URI")
_NAME_OPT = typer.Option("gallery", "--name", envvar="CIR_INDEX_NAME", help="index name")


def _fail(exc: BaseException, code: int = 2) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code=code)


def _known_errors() -> tuple[type[BaseException], ...]:
    from indexer.pipeline import IndexerError
    from indexer.sources import SourceError
    from retrieval.index import GalleryIndexError

    return (IndexerError, SourceError, GalleryIndexError, FileNotFoundError)


def register(app: typer.Typer) -> None:
    """Add the ``index`` command group to ``app``."""
    grp = typer.Typer(
        help="The gallery index: batch build (rebuild/resume/incremental/shards) and versions.",
        no_args_is_help=True,
    )
    app.add_typer(grp, name="index")

    @grp.command("build")
    def build_cmd(
        source: Path = typer.Argument(
            ..., help="folder of images, or a jsonl/csv/parquet manifest"
        ),
        index: str = _INDEX_OPT,
        name: str = _NAME_OPT,
        model: str = typer.Option("sprc-small", "--model", help="checkpoint folder or preset"),
        manifest_format: str = typer.Option(
            "auto", "--manifest-format", help="auto, jsonl, csv, parquet"
        ),
        path_column: str = typer.Option("path", "--path-column", help="manifest path column"),
        id_column: str | None = typer.Option(
            None,
            "--id-column",
            help="manifest column of the images' own ids (unique; default: `id` when the "
            "manifest has one, else the path); a folder's ids are the relative paths",
        ),
        field: list[str] = typer.Option(
            [], "--field", help="filterable field NAME:TYPE (keyword, integer, float, bool)"
        ),
        batch_size: int = typer.Option(64, "--batch-size", min=1, help="images per batch"),
        workers: int = typer.Option(2, "--workers", min=0, help="decode worker processes"),
        device: str = typer.Option("auto", "--device", help="cpu, cuda, auto"),
        dtype: str = typer.Option("auto", "--dtype", help="float32, bfloat16, auto"),
        num_threads: int | None = typer.Option(None, "--num-threads", help="torch threads"),
        shard: str = typer.Option("0/1", "--shard", help="i/n: this run's partition"),
        incremental: bool = typer.Option(
            False, "--incremental", help="add new/changed, delete vanished, in the active version"
        ),
        activate: bool = typer.Option(
            True, "--activate/--no-activate", help="activate the version once verified"
        ),
        verify: bool = typer.Option(True, "--verify/--no-verify", help="verify before activating"),
        verify_sample: int = typer.Option(32, "--verify-sample", min=0, help="self-query sample"),
        calibrate: bool = typer.Option(
            True,
            "--calibrate/--no-calibrate",
            help="measure the version's fast-mode prefetch size L (galleries of 5,000+ images)",
        ),
        calibrate_queries: Path | None = typer.Option(
            None,
            "--calibrate-queries",
            help="real query vectors [M, D] (.npy) to calibrate on instead of proxy queries "
            "(which can be pessimistic); read before anything is encoded",
        ),
        limit: int | None = typer.Option(None, "--limit", min=0, help="first N items only"),
        fresh: bool = typer.Option(False, "--fresh", help="never resume an unfinished version"),
        build_id: str | None = typer.Option(
            None, "--build-id", help="resume key (same value on every machine of a sharded build)"
        ),
        into: str | None = typer.Option(None, "--into", help="write into this existing version"),
        report_path: Path | None = typer.Option(None, "--report", help="write the report JSON"),
        progress_file: Path | None = typer.Option(
            None, "--progress-file", help="JSON progress, rewritten after each written batch"
        ),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bar"),
        thumbnails: bool = typer.Option(True, "--thumbnails/--no-thumbnails", help="payload"),
    ) -> None:
        """Index a folder or manifest into a new version (or --incremental into the active one)."""
        from indexer.pipeline import BuildConfig, build
        from indexer.report import render_summary
        from indexer.sources import parse_field_specs

        try:
            cfg = BuildConfig(
                source=source,
                index=index,
                name=name,
                model=model,
                manifest_format=manifest_format,
                path_column=path_column,
                id_column=id_column,
                fields=parse_field_specs(field),
                batch_size=batch_size,
                workers=workers,
                device=device,
                dtype=dtype,
                num_threads=num_threads,
                shard=shard,
                incremental=incremental,
                activate=activate,
                verify=verify,
                verify_sample=verify_sample,
                calibrate=calibrate,
                calibrate_queries=None if calibrate_queries is None else str(calibrate_queries),
                limit=limit,
                fresh=fresh,
                build_id=build_id,
                into=into,
                progress=progress and sys.stderr.isatty(),
                progress_file=progress_file,
                thumbnails=thumbnails,
            )
            report = build(cfg)
        except _known_errors() as exc:
            _fail(exc)
            return
        if report_path is not None:
            report.write(report_path)
        render_summary(report)
        for w in report.warnings[:20]:
            typer.echo(f"warning: {w}", err=True)
        if report.verified is False:
            typer.echo(f"error: version {report.version} failed verification", err=True)
            raise typer.Exit(code=1)

    @grp.command("info")
    def info_cmd(
        index: str = _INDEX_OPT,
        name: str = _NAME_OPT,
        as_json: bool = typer.Option(False, "--json", help="machine-readable"),
    ) -> None:
        """Count, active version, encoder fingerprint, fields."""
        try:
            data = _info(index, name)
        except _known_errors() as exc:
            _fail(exc)
            return
        if as_json:
            typer.echo(json.dumps(data, indent=1, default=str))
            return
        for k in ("name", "backend", "active_version", "count", "preset", "encoder_fingerprint"):
            typer.echo(f"{k}: {data.get(k)}")
        typer.echo(f"shape: {data.get('shape')}  fields: {data.get('fields')}")
        typer.echo(f"versions: {', '.join(v['version'] for v in data['versions'])}")

    @grp.command("versions")
    def versions_cmd(
        index: str = _INDEX_OPT,
        name: str = _NAME_OPT,
        as_json: bool = typer.Option(False, "--json", help="machine-readable"),
    ) -> None:
        """Every version, oldest first (* = active)."""
        try:
            rows = _info(index, name)["versions"]
        except _known_errors() as exc:
            _fail(exc)
            return
        if as_json:
            typer.echo(json.dumps(rows, indent=1, default=str))
            return
        from rich.console import Console
        from rich.table import Table

        t = Table("version", "active", "created", "count", "preset", "fingerprint", "build")
        for r in rows:
            t.add_row(
                r["version"],
                "*" if r["active"] else "",
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"])),
                "?" if r["count"] is None else str(r["count"]),
                r["preset"],
                r["encoder_fingerprint"],
                str(r["extra"].get("build_key", "")),
            )
        Console().print(t)

    @grp.command("verify")
    def verify_cmd(
        index: str = _INDEX_OPT,
        name: str = _NAME_OPT,
        version: str | None = typer.Option(None, "--version", help="default: the active one"),
        sample: int = typer.Option(32, "--sample", min=1, help="images queried by own tokens"),
        expect_count: int | None = typer.Option(None, "--expect-count", help="required count"),
    ) -> None:
        """Self-retrieval check (and count, with --expect-count); exit 1 on failure."""
        from indexer.pipeline import verify_version

        try:
            res = verify_version(index, name, version, sample, expect_count)
        except _known_errors() as exc:
            _fail(exc)
            return
        typer.echo(json.dumps(res, indent=1, default=str))
        if not res["ok"]:
            raise typer.Exit(code=1)

    @grp.command("calibrate")
    def calibrate_cmd(
        index: str = _INDEX_OPT,
        name: str = _NAME_OPT,
        version: str | None = typer.Option(None, "--version", help="default: the active one"),
        recall: float = typer.Option(
            0.99, "--recall", min=0.5, max=0.9999, help="recall@10 target of `fast`"
        ),
        queries: Path | None = typer.Option(
            None,
            "--queries",
            help="real query vectors [M, D] (.npy, e.g. saved from the EncodeQuery RPC or a "
            "query log); default: proxy queries drawn from the index, which can be pessimistic",
        ),
    ) -> None:
        """Measure a version's fast-mode prefetch size L on its own vectors and record it in
        the version's metadata (a server reads it when it opens that version)."""

        from indexer.pipeline import calibrate_index, load_query_vectors

        try:
            qv = None if queries is None else load_query_vectors(queries)
            res = calibrate_index(index, name, version, recall, qv)
        except _known_errors() as exc:
            _fail(exc)
            return
        typer.echo(json.dumps(res, indent=1, default=str))

    @grp.command("activate")
    def activate_cmd(
        version: str = typer.Argument(..., help="e.g. v000004"),
        index: str = _INDEX_OPT,
        name: str = _NAME_OPT,
        verify: bool = typer.Option(True, "--verify/--no-verify", help="verify first"),
        sample: int = typer.Option(32, "--sample", min=1, help="images queried by own tokens"),
        expect_count: int | None = typer.Option(None, "--expect-count", help="required count"),
    ) -> None:
        """Verify a version and make it the active one (the last step of a sharded build)."""
        from indexer.pipeline import verify_version
        from retrieval.index import open_index

        try:
            if verify:
                res = verify_version(index, name, version, sample, expect_count)
                if not res["ok"]:
                    typer.echo(json.dumps(res, indent=1, default=str), err=True)
                    typer.echo(f"error: {version} failed verification; not activated", err=True)
                    raise typer.Exit(code=1)
            idx = open_index(index, name)
            try:
                idx.activate(version)
            finally:
                idx.close()
        except _known_errors() as exc:
            _fail(exc)
            return
        typer.echo(f"activated {name} {version}")

    @grp.command("drop-version")
    def drop_cmd(
        version: str = typer.Argument(..., help="e.g. v000002"),
        index: str = _INDEX_OPT,
        name: str = _NAME_OPT,
    ) -> None:
        """Delete an inactive version."""
        from retrieval.index import open_index

        try:
            idx = open_index(index, name)
            try:
                idx.drop_version(version)
            finally:
                idx.close()
        except _known_errors() as exc:
            _fail(exc)
            return
        typer.echo(f"dropped {name} {version}")


def _info(index: str, name: str) -> dict[str, Any]:
    """``info --json``: count, active version, encoder fingerprint, preset, shape, fields,
    versions (a server owning the active Edge shard leaves ``count`` null)."""
    from retrieval.index import IndexInUseError, open_index

    idx = open_index(index, name)
    try:
        versions = [
            {
                "version": v.version,
                "active": v.active,
                "created": v.created,
                "count": v.count,
                "preset": v.meta.preset,
                "encoder_fingerprint": v.meta.encoder_fingerprint,
                "shape": list(v.meta.shape),
                "fields": dict(v.meta.fields),
                "extra": dict(v.meta.extra),
            }
            for v in idx.versions()
        ]
        active = idx.active_version
        count: int | None = None
        owner: str | None = None
        if active is not None:
            try:
                count = idx.count()
            except IndexInUseError as exc:
                owner = str(exc)
        meta = idx.meta
        for v in versions:
            if v["active"] and v["count"] is None:
                v["count"] = count
        return {
            "name": name,
            "index": index,
            "backend": idx.backend,
            "active_version": active,
            "count": count,
            "encoder_fingerprint": meta.encoder_fingerprint if meta else None,
            "preset": meta.preset if meta else None,
            "shape": list(meta.shape) if meta else None,
            "fields": dict(meta.fields) if meta else {},
            "in_use": owner,
            "versions": versions,
        }
    finally:
        idx.close()


def main() -> None:
    """``python -m indexer``: the ``index`` group on its own."""
    import os

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.callback()
    def _root() -> None:
        logging.basicConfig(
            level=os.environ.get("CIR_LOG_LEVEL", "INFO").upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )

    register(app)
    app(args=["index", *sys.argv[1:]], prog_name="python -m indexer")
