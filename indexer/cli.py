"""`cir index ...`: build (rebuild / resume / incremental / shard), info, verify, versions,
activate, drop-version.

Also runnable on its own: ``python -m indexer build SOURCE --index edge:data/index ...``.
Exit codes: 0 ok; 1 verification failed (nothing activated); 2 bad arguments, index errors, or
a refused run (an empty version, one that shrinks the active one by more than --max-shrink, an
incremental run that would delete more than that, a random-weight preset without
--allow-untrained; nothing is activated or deleted then).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import typer

from retrieval.model_source import DEFAULT_MODEL

logger = logging.getLogger(__name__)

DEFAULT_INDEX = "edge:data/index"
_INDEX_OPT = typer.Option(DEFAULT_INDEX, "--index", envvar="CIR_INDEX", help="index URI")
_NAME_OPT = typer.Option("gallery", "--name", envvar="CIR_INDEX_NAME", help="index name")
_ALLOW_SHRINK_OPT = typer.Option(
    False,
    "--allow-shrink",
    help="activate a version that is empty or shrinks the active one by more than "
    "--max-shrink; let --incremental delete more than that fraction",
)
_MAX_SHRINK_OPT = typer.Option(
    0.5,
    "--max-shrink",
    min=0.0,
    max=1.0,
    help="largest fraction of the active version's points a run may drop without --allow-shrink",
)


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
        model: str = typer.Option(
            DEFAULT_MODEL,
            "--model",
            help="checkpoint folder (default: the committed demo model); a preset name means "
            "random weights and needs --allow-untrained",
        ),
        allow_untrained: bool = typer.Option(
            False, "--allow-untrained", help="accept a preset name (RANDOM weights): tests only"
        ),
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
        allow_shrink: bool = _ALLOW_SHRINK_OPT,
        max_shrink: float = _MAX_SHRINK_OPT,
        dry_run: bool = typer.Option(
            False,
            "--dry-run",
            help="print the plan (add / change / delete / skip counts) and write nothing",
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
        calibration_captions: Path | None = typer.Option(
            None,
            "--calibration-captions",
            help="captions (one per line) for the composed calibration queries: gallery images "
            "as references + these texts, encoded by the model (default: the model's training "
            "captions when its folder names them, else built-in generic edits)",
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
        progress: bool = typer.Option(
            True,
            "--progress/--no-progress",
            help="progress bar on a terminal, plain progress lines otherwise",
        ),
        progress_every: float = typer.Option(
            30.0,
            "--progress-every",
            min=0.01,
            help="seconds between progress lines when stderr is not a terminal",
        ),
        thumbnails: bool = typer.Option(True, "--thumbnails/--no-thumbnails", help="payload"),
    ) -> None:
        """Index a folder or manifest into a new version (or --incremental into the active one)."""
        from indexer.pipeline import BuildConfig, build
        from indexer.report import render_summary
        from indexer.sources import parse_field_specs

        tty = sys.stderr.isatty()
        try:
            cfg = BuildConfig(
                source=source,
                index=index,
                name=name,
                model=model,
                allow_untrained=allow_untrained,
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
                allow_shrink=allow_shrink,
                max_shrink=max_shrink,
                dry_run=dry_run,
                verify=verify,
                verify_sample=verify_sample,
                calibrate=calibrate,
                calibrate_queries=None if calibrate_queries is None else str(calibrate_queries),
                calibration_captions=(
                    None if calibration_captions is None else str(calibration_captions)
                ),
                limit=limit,
                fresh=fresh,
                build_id=build_id,
                into=into,
                progress=progress and tty,
                progress_every_s=progress_every if progress and not tty else 0.0,
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
        if report.plan is not None:
            typer.echo(_plan_line(report.plan))
        if report.refused:
            typer.echo(f"error: {report.refused}", err=True)
            raise typer.Exit(code=2)
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
            v = data.get(k)
            if k == "count" and data.get("count_source") == "recorded":
                v = f"{v} (recorded by its build; {data['in_use']})"
            elif k == "count" and v is None:
                v = f"unknown ({data.get('in_use') or 'not recorded'})"
            typer.echo(f"{k}: {v}")
        typer.echo(f"shape: {data.get('shape')}  fields: {data.get('fields')}")
        typer.echo(f"fast calibration: {_calibration_line(data.get('fast_calibration'))}")
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
            help="real query vectors [M, D] (.npy): the traffic a server keeps "
            "(INDEX_PATH/NAME/traffic_queries.npy, written by cir serve), EncodeQuery vectors or "
            "a query log; default: proxy queries drawn from the index (a last resort)",
        ),
    ) -> None:
        """Measure a version's fast-mode prefetch size L on its own vectors and record it in
        the version's metadata (a server reads it when it opens that version)."""

        from indexer.pipeline import calibrate_index, load_query_vectors

        try:
            qv = None if queries is None else load_query_vectors(queries)
            made_by = None
            side = None if queries is None else queries.with_suffix(".json")
            if side is not None and side.is_file():  # a server's traffic reservoir
                try:
                    made_by = json.loads(side.read_text()).get("encoder_fingerprint") or None
                except (OSError, ValueError):
                    made_by = None
            res = calibrate_index(index, name, version, recall, qv, made_by)
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
        allow_shrink: bool = _ALLOW_SHRINK_OPT,
        max_shrink: float = _MAX_SHRINK_OPT,
    ) -> None:
        """Verify a version and make it the active one (the last step of a sharded build).
        Refused (exit 2) when it is empty or shrinks the active one by more than --max-shrink."""
        from indexer.pipeline import active_count, shrink_refusal, verify_version
        from retrieval.index import open_index

        try:
            count: int | None = None
            if verify:
                res = verify_version(index, name, version, sample, expect_count)
                if not res["ok"]:
                    typer.echo(json.dumps(res, indent=1, default=str), err=True)
                    typer.echo(f"error: {version} failed verification; not activated", err=True)
                    raise typer.Exit(code=1)
                count = int(res["count"])
            if not allow_shrink:
                if count is None:
                    count = _version_count(index, name, version)
                before, active = active_count(index, name)
                refusal = None
                if count is not None and active != version:
                    refusal = shrink_refusal(before, count, max_shrink, version, active)
                if refusal:
                    typer.echo(f"error: {refusal}", err=True)
                    raise typer.Exit(code=2)
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


def _plan_line(plan: dict[str, Any]) -> str:
    def n(v: Any) -> str:
        return "?" if v is None else str(v)

    return (
        f"plan: add {n(plan['add'])}, change {n(plan['change'])}, delete {n(plan['delete'])}, "
        f"skip {n(plan['skip'])} (unchanged {n(plan['unchanged'])}, encode {n(plan['encode'])}); "
        f"points {n(plan['count_before'])} -> {n(plan['count_after'])}; nothing was written"
    )


def _version_count(index: str, name: str, version: str) -> int | None:
    """A version's point count: what its build recorded, else counted (its shard is free)."""
    from indexer.pipeline import COUNT_KEY
    from indexer.store import open_version
    from retrieval.index import IndexInUseError, open_index

    idx = open_index(index, name)
    try:
        for v in idx.versions():
            if v.version == version and v.count is not None:
                return int(v.count)
            if v.version == version and isinstance(v.meta.extra.get(COUNT_KEY), int):
                return int(v.meta.extra[COUNT_KEY])
        try:
            view = open_version(idx, version, read_only=True)
        except IndexInUseError:
            return None
        try:
            return view.count()
        finally:
            view.close()
    finally:
        idx.close()


def _calibration_line(cal: dict[str, Any] | None) -> str:
    """The active version's fast calibration in words (L, its queries, the held-out recall)."""
    if not cal:
        return "none (fast uses the fixed table; the server's recall guard still watches it)"
    k, target = cal.get("top_k", 10), cal.get("recall_target")
    src = f"{cal.get('source', 'proxy')} queries"
    if cal.get("captions"):
        src += f", captions: {cal['captions']}"
    if cal.get("L") is None:
        why = cal.get("reason") or "no L met the target"
        return f"no L for recall@{k} >= {target} ({why}; {src}): fast searches exactly"
    held = cal.get("heldout_recall")
    held_s = f", held-out recall@{k} {held:.3f} on {cal.get('heldout_queries')}" if held else ""
    return f"L = {cal['L']} for recall@{k} >= {target} ({src}{held_s})"


def _info(index: str, name: str) -> dict[str, Any]:
    """``info --json``: count, active version, encoder fingerprint, preset, shape, fields,
    versions. A server owning the active Edge shard: ``count`` is what the version's build
    recorded (``count_source`` "recorded"; null for versions built before counts were recorded).
    An index that does not exist: IndexerError."""
    from indexer.pipeline import COUNT_KEY, IndexerError
    from retrieval.index import IndexInUseError, open_index
    from retrieval.index.common import CALIBRATION_KEY

    idx = open_index(index, name)
    try:
        if idx.active_version is None and not idx.versions():
            raise IndexerError(
                f"there is no index {name!r} at {index} (no version was ever built: "
                "cir index build SOURCE --index URI --name NAME)"
            )
        versions: list[dict[str, Any]] = [
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
        source = "counted"
        if active is not None:
            try:
                count = idx.count()
            except IndexInUseError as exc:
                owner = str(exc)
        meta = idx.meta
        for v in versions:
            if v["active"] and v["count"] is None:
                v["count"] = count
            recorded = v["extra"].get(COUNT_KEY)
            if v["count"] is None and isinstance(recorded, int):
                v["count"] = recorded  # a shard this process cannot open: its build's count
        if active is not None and count is None:
            count = next((v["count"] for v in versions if v["active"]), None)
            source = "recorded" if count is not None else "unknown"
        return {
            "name": name,
            "index": index,
            "backend": idx.backend,
            "active_version": active,
            "count": count,
            "count_source": source,
            "encoder_fingerprint": meta.encoder_fingerprint if meta else None,
            "preset": meta.preset if meta else None,
            "shape": list(meta.shape) if meta else None,
            "fields": dict(meta.fields) if meta else {},
            "in_use": owner,
            "fast_calibration": (meta.extra.get(CALIBRATION_KEY) if meta else None),
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
