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
from typing import Annotated, Any

import typer

from retrieval.index.api import DEFAULT_URI
from retrieval.model_source import DEFAULT_MODEL

logger = logging.getLogger(__name__)

DEFAULT_INDEX = DEFAULT_URI

# ---- options shared by several commands (one definition each)
IndexOpt = Annotated[str, typer.Option("--index", envvar="CIR_INDEX", help="index URI")]
NameOpt = Annotated[str, typer.Option("--name", envvar="CIR_INDEX_NAME", help="index name")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable")]
AllowShrinkOpt = Annotated[
    bool,
    typer.Option(
        "--allow-shrink",
        help="activate a version that is empty or shrinks the active one by more than "
        "--max-shrink; let --incremental delete more than that fraction",
    ),
]
MaxShrinkOpt = Annotated[
    float,
    typer.Option(
        "--max-shrink",
        min=0.0,
        max=1.0,
        help="largest fraction of the active version's points a run may drop without "
        "--allow-shrink",
    ),
]
VersionOpt = Annotated[str | None, typer.Option("--version", help="default: the active one")]
SampleOpt = Annotated[int, typer.Option("--sample", min=1, help="images queried by own tokens")]
ExpectCountOpt = Annotated[int | None, typer.Option("--expect-count", help="required count")]


def _fail(exc: BaseException, code: int = 2) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code=code)


def _known_errors() -> tuple[type[BaseException], ...]:
    from indexer.pipeline import IndexerError
    from indexer.sources import SourceError
    from retrieval.index import GalleryIndexError

    return (IndexerError, SourceError, GalleryIndexError, FileNotFoundError)


# ---- `cir index build` options
SourceArg = Annotated[
    Path, typer.Argument(help="folder of images, or a jsonl/csv/parquet manifest")
]
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        help="checkpoint folder (default: the committed demo model); a preset name means "
        "random weights and needs --allow-untrained",
    ),
]
AllowUntrainedOpt = Annotated[
    bool,
    typer.Option("--allow-untrained", help="accept a preset name (RANDOM weights): tests only"),
]
ManifestFormatOpt = Annotated[
    str, typer.Option("--manifest-format", help="auto, jsonl, csv, parquet")
]
PathColumnOpt = Annotated[str, typer.Option("--path-column", help="manifest path column")]
IdColumnOpt = Annotated[
    str | None,
    typer.Option(
        "--id-column",
        help="manifest column of the images' own ids (unique; default: `id` when the "
        "manifest has one, else the path); a folder's ids are the relative paths",
    ),
]
FieldOpt = Annotated[
    list[str],
    typer.Option("--field", help="filterable field NAME:TYPE (keyword, integer, float, bool)"),
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="images per batch")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="decode worker processes")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, auto")]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="auto | fp32 | bf16 | fp16 (retrieval.precision; float32 | bfloat16 | float16 also accepted)",
    ),
]
NumThreadsOpt = Annotated[int | None, typer.Option("--num-threads", help="torch threads")]
ShardOpt = Annotated[str, typer.Option("--shard", help="i/n: this run's partition")]
IncrementalOpt = Annotated[
    bool,
    typer.Option("--incremental", help="add new/changed, delete vanished, in the active version"),
]
ActivateOpt = Annotated[
    bool, typer.Option("--activate/--no-activate", help="activate the version once verified")
]
DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="print the plan (add / change / delete / skip counts) and write nothing",
    ),
]
VerifyOpt = Annotated[bool, typer.Option("--verify/--no-verify", help="verify before activating")]
VerifySampleOpt = Annotated[int, typer.Option("--verify-sample", min=0, help="self-query sample")]
CalibrateOpt = Annotated[
    bool,
    typer.Option(
        "--calibrate/--no-calibrate",
        help="measure the version's fast-mode prefetch size L (galleries of 5,000+ images)",
    ),
]
CalibrateQueriesOpt = Annotated[
    Path | None,
    typer.Option(
        "--calibrate-queries",
        help="real query vectors [M, D] (.npy) to calibrate on instead of proxy queries "
        "(which can be pessimistic); read before anything is encoded",
    ),
]
CalibrationCaptionsOpt = Annotated[
    Path | None,
    typer.Option(
        "--calibration-captions",
        help="captions (one per line) for the composed calibration queries: gallery images "
        "as references + these texts, encoded by the model (default: the model's training "
        "captions when its folder names them, else built-in generic edits)",
    ),
]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=0, help="first N items only")]
FreshOpt = Annotated[bool, typer.Option("--fresh", help="never resume an unfinished version")]
BuildIdOpt = Annotated[
    str | None,
    typer.Option("--build-id", help="resume key (same value on every machine of a sharded build)"),
]
IntoOpt = Annotated[str | None, typer.Option("--into", help="write into this existing version")]
ReportOpt = Annotated[Path | None, typer.Option("--report", help="write the report JSON")]
ProgressFileOpt = Annotated[
    Path | None,
    typer.Option("--progress-file", help="JSON progress, rewritten after each written batch"),
]
ProgressOpt = Annotated[
    bool,
    typer.Option(
        "--progress/--no-progress",
        help="progress bar on a terminal, plain progress lines otherwise",
    ),
]
ProgressEveryOpt = Annotated[
    float,
    typer.Option(
        "--progress-every",
        min=0.01,
        help="seconds between progress lines when stderr is not a terminal",
    ),
]
ThumbnailsOpt = Annotated[bool, typer.Option("--thumbnails/--no-thumbnails", help="payload")]
ExecutorOpt = Annotated[
    str,
    typer.Option(
        "--executor",
        help="inprocess (DataLoader workers + this process) or ray (Ray Data on a cluster: "
        "decode in CPU tasks, encode in an actor pool)",
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        envvar="RAY_ADDRESS",
        help="--executor ray: auto (the running cluster) or ray://HOST:10001; default: start a "
        "local cluster",
    ),
]
EncodersOpt = Annotated[
    int, typer.Option("--encoders", min=1, help="--executor ray: encoder actors (one model each)")
]
GpusPerEncoderOpt = Annotated[
    float,
    typer.Option(
        "--gpus-per-encoder",
        min=0.0,
        help="--executor ray: GPUs per encoder actor when the cluster has GPUs (else CPU)",
    ),
]
CpusPerEncoderOpt = Annotated[
    float,
    typer.Option(
        "--cpus-per-encoder",
        min=0.0,
        help="--executor ray: CPUs per encoder actor (on CPU also its torch threads, unless "
        "--num-threads)",
    ),
]
CpusPerDecoderOpt = Annotated[
    float,
    typer.Option(
        "--cpus-per-decoder",
        min=0.05,
        help="--executor ray: CPUs per decode/preprocess task (0.5: two tasks per CPU)",
    ),
]


def register(app: typer.Typer) -> None:
    """Add the ``index`` command group to ``app``."""
    grp = typer.Typer(
        help="The gallery index: batch build (rebuild/resume/incremental/shards) and versions.",
        no_args_is_help=True,
    )
    app.add_typer(grp, name="index")
    grp.command("build")(build_cmd)
    grp.command("info")(info_cmd)
    grp.command("versions")(versions_cmd)
    grp.command("verify")(verify_cmd)
    grp.command("calibrate")(calibrate_cmd)
    grp.command("activate")(activate_cmd)
    grp.command("drop-version")(drop_cmd)


# --------------------------------------------------------------------------- build
def build_cmd(
    source: SourceArg,
    index: IndexOpt = DEFAULT_INDEX,
    name: NameOpt = "gallery",
    model: ModelOpt = DEFAULT_MODEL,
    allow_untrained: AllowUntrainedOpt = False,
    manifest_format: ManifestFormatOpt = "auto",
    path_column: PathColumnOpt = "path",
    id_column: IdColumnOpt = None,
    field: FieldOpt = [],  # noqa: B006 (typer copies the default)
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    num_threads: NumThreadsOpt = None,
    shard: ShardOpt = "0/1",
    incremental: IncrementalOpt = False,
    activate: ActivateOpt = True,
    allow_shrink: AllowShrinkOpt = False,
    max_shrink: MaxShrinkOpt = 0.5,
    dry_run: DryRunOpt = False,
    verify: VerifyOpt = True,
    verify_sample: VerifySampleOpt = 32,
    calibrate: CalibrateOpt = True,
    calibrate_queries: CalibrateQueriesOpt = None,
    calibration_captions: CalibrationCaptionsOpt = None,
    limit: LimitOpt = None,
    fresh: FreshOpt = False,
    build_id: BuildIdOpt = None,
    into: IntoOpt = None,
    report_path: ReportOpt = None,
    progress_file: ProgressFileOpt = None,
    progress: ProgressOpt = True,
    progress_every: ProgressEveryOpt = 30.0,
    thumbnails: ThumbnailsOpt = True,
    executor: ExecutorOpt = "inprocess",
    ray_address: RayAddressOpt = None,
    encoders: EncodersOpt = 1,
    gpus_per_encoder: GpusPerEncoderOpt = 1.0,
    cpus_per_encoder: CpusPerEncoderOpt = 1.0,
    cpus_per_decoder: CpusPerDecoderOpt = 1.0,
) -> None:
    """Index a folder or manifest into a new version (or --incremental into the active one)."""
    from indexer.pipeline import build
    from indexer.sources import parse_field_specs

    opts = dict(locals())
    try:
        cfg = _build_config(opts, parse_field_specs(field))
        report = build(cfg)
    except _known_errors() as exc:
        _fail(exc)
        return
    _build_outcome(report, report_path)


def _build_config(opts: dict[str, Any], fields: dict[str, str]) -> Any:
    """``BuildConfig`` of ``build_cmd``'s arguments (the names of BuildConfig's fields, except
    the ones the command line spells otherwise)."""
    from dataclasses import fields as dc_fields

    from indexer.pipeline import BuildConfig

    tty = sys.stderr.isatty()
    progress = bool(opts["progress"])
    spelled = {
        "fields": fields,
        "calibrate_queries": _str_or_none(opts["calibrate_queries"]),
        "calibration_captions": _str_or_none(opts["calibration_captions"]),
        "progress": progress and tty,
        "progress_every_s": opts["progress_every"] if progress and not tty else 0.0,
    }
    same = {f.name: opts[f.name] for f in dc_fields(BuildConfig) if f.name in opts}
    return BuildConfig(**{**same, **spelled})


def _str_or_none(p: Path | None) -> str | None:
    return None if p is None else str(p)


def _build_outcome(report: Any, report_path: Path | None) -> None:
    """Report file, summary, warnings, plan line and exit code of a finished build."""
    from indexer.report import render_summary

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


# --------------------------------------------------------------------------- inspect
def info_cmd(
    index: IndexOpt = DEFAULT_INDEX, name: NameOpt = "gallery", as_json: JsonOpt = False
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


def versions_cmd(
    index: IndexOpt = DEFAULT_INDEX, name: NameOpt = "gallery", as_json: JsonOpt = False
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


def verify_cmd(
    index: IndexOpt = DEFAULT_INDEX,
    name: NameOpt = "gallery",
    version: VersionOpt = None,
    sample: SampleOpt = 32,
    expect_count: ExpectCountOpt = None,
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


# --------------------------------------------------------------------------- change
RecallOpt = Annotated[
    float, typer.Option("--recall", min=0.5, max=0.9999, help="recall@10 target of `fast`")
]
QueriesOpt = Annotated[
    Path | None,
    typer.Option(
        "--queries",
        help="real query vectors [M, D] (.npy): the traffic a server keeps "
        "(INDEX_PATH/NAME/traffic_queries.npy, written by cir serve), EncodeQuery vectors or "
        "a query log; default: proxy queries drawn from the index (a last resort)",
    ),
]


def calibrate_cmd(
    index: IndexOpt = DEFAULT_INDEX,
    name: NameOpt = "gallery",
    version: VersionOpt = None,
    recall: RecallOpt = 0.99,
    queries: QueriesOpt = None,
) -> None:
    """Measure a version's fast-mode prefetch size L on its own vectors and record it in
    the version's metadata (a server reads it when it opens that version)."""

    from indexer.pipeline import calibrate_index, load_query_vectors

    try:
        qv = None if queries is None else load_query_vectors(queries)
        res = calibrate_index(index, name, version, recall, qv, _queries_encoder(queries))
    except _known_errors() as exc:
        _fail(exc)
        return
    typer.echo(json.dumps(res, indent=1, default=str))


def _queries_encoder(queries: Path | None) -> str | None:
    """The encoder that made a server's traffic reservoir (its JSON sidecar names it)."""
    side = None if queries is None else queries.with_suffix(".json")
    if side is None or not side.is_file():
        return None
    try:
        return json.loads(side.read_text()).get("encoder_fingerprint") or None
    except (OSError, ValueError):
        return None


def activate_cmd(
    version: Annotated[str, typer.Argument(help="e.g. v000004")],
    index: IndexOpt = DEFAULT_INDEX,
    name: NameOpt = "gallery",
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="verify first")] = True,
    sample: SampleOpt = 32,
    expect_count: ExpectCountOpt = None,
    allow_shrink: AllowShrinkOpt = False,
    max_shrink: MaxShrinkOpt = 0.5,
) -> None:
    """Verify a version and make it the active one (the last step of a sharded build).
    Refused (exit 2) when it is empty or shrinks the active one by more than --max-shrink."""
    from retrieval.index import open_index

    try:
        count: int | None = None
        if verify:
            count = _verified_count(index, name, version, sample, expect_count)
        if not allow_shrink:
            _shrink_guard(index, name, version, count, max_shrink)
        idx = open_index(index, name)
        try:
            idx.activate(version)
        finally:
            idx.close()
    except _known_errors() as exc:
        _fail(exc)
        return
    typer.echo(f"activated {name} {version}")


def _verified_count(
    index: str, name: str, version: str, sample: int, expect_count: int | None
) -> int:
    """``activate``'s verification: the version's count, or exit 1 with the result."""
    from indexer.pipeline import verify_version

    res = verify_version(index, name, version, sample, expect_count)
    if not res["ok"]:
        typer.echo(json.dumps(res, indent=1, default=str), err=True)
        typer.echo(f"error: {version} failed verification; not activated", err=True)
        raise typer.Exit(code=1)
    return int(res["count"])


def _shrink_guard(
    index: str, name: str, version: str, count: int | None, max_shrink: float
) -> None:
    """``activate``'s shrink guard: exit 2 when the version would empty or gut the active one."""
    from indexer.pipeline import active_count, shrink_refusal

    if count is None:
        count = _version_count(index, name, version)
    before, active = active_count(index, name)
    refusal = None
    if count is not None and active != version:
        refusal = shrink_refusal(before, count, max_shrink, version, active)
    if refusal:
        typer.echo(f"error: {refusal}", err=True)
        raise typer.Exit(code=2)


def drop_cmd(
    version: Annotated[str, typer.Argument(help="e.g. v000002")],
    index: IndexOpt = DEFAULT_INDEX,
    name: NameOpt = "gallery",
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
    from retrieval.index import IndexInUseError, open_index

    idx = open_index(index, name)
    try:
        for v in idx.versions():
            if v.version == version and v.count is not None:
                return int(v.count)
            if v.version == version and isinstance(v.meta.extra.get(COUNT_KEY), int):
                return int(v.meta.extra[COUNT_KEY])
        try:
            view = idx.open_version(version, read_only=True)
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
    from retrieval.index.policy import CALIBRATION_KEY

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
