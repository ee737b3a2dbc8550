"""``cir serve`` (the gRPC server), ``cir search`` (a query from the shell) and ``cir explain``
(why a result scored as it did)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import typer

logger = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
    app.command("search")(search_cmd)
    app.command("explain")(explain_cmd)


def serve_cmd(
    config: Path | None = typer.Option(
        None, "--config", help="TOML or YAML file with settings (flags > CIR_* env > file)."
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        help="Checkpoint folder (default: the committed demo model models/sprc-shapes); a "
        "preset name means random weights and needs --allow-untrained.",
    ),
    allow_untrained: bool = typer.Option(
        False,
        "--allow-untrained",
        envvar="CIR_ALLOW_UNTRAINED",
        help="Serve a preset name (RANDOM weights): tests and benchmarks only.",
    ),
    index: str | None = typer.Option(
        None, "--index", help="Index URI: edge:PATH | qdrant:URL | local:PATH."
    ),
    name: str | None = typer.Option(None, "--name", help="Index name at the URI."),
    host: str | None = typer.Option(None, "--host", help="Bind address (default 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="gRPC port (default 50051; 0: any)."),
    metrics_port: int | None = typer.Option(
        None, "--metrics-port", help="Prometheus port (default 9095; 0: off)."
    ),
    device: str | None = typer.Option(None, "--device", help="cpu | cuda | auto"),
    dtype: str | None = typer.Option(
        None,
        "--dtype",
        help="auto | fp32 | bf16 | fp16 (retrieval.precision; float32 | bfloat16 | float16 also accepted)",
    ),
    num_threads: int | None = typer.Option(None, "--num-threads", help="Torch CPU threads."),
    batch_threads: int | None = typer.Option(
        None, "--batch-threads", help="Torch threads for batches of 4+ queries (default: same)."
    ),
    rerank_threads: int | None = typer.Option(
        None, "--rerank-threads", help="Torch threads for the re-ranker's batch (default: same)."
    ),
    rerank_cache_mb: float | None = typer.Option(
        None,
        "--rerank-cache-mb",
        help="MB of re-ranker candidate features kept by point id (0: read them every time).",
    ),
    max_batch: int | None = typer.Option(None, "--max-batch", help="Largest micro-batch."),
    max_wait_ms: float | None = typer.Option(
        None, "--max-wait-ms", help="Longest wait for a batch to fill after its first query."
    ),
    adaptive_wait: bool | None = typer.Option(
        None,
        "--adaptive-wait/--no-adaptive-wait",
        help="Send a lone query at once while recent batches held one query (idle server).",
    ),
    no_batching: bool = typer.Option(
        False, "--no-batching", help="One query per model call (same as --max-batch 1)."
    ),
    queue_size: int | None = typer.Option(
        None, "--queue-size", help="Queued queries before RESOURCE_EXHAUSTED."
    ),
    max_queue_ms: float | None = typer.Option(
        None,
        "--max-queue-ms",
        help="Admission bound on the estimated queue wait (default 250) before RESOURCE_EXHAUSTED.",
    ),
    maximum_concurrent_rpcs: int | None = typer.Option(
        None,
        "--maximum-concurrent-rpcs",
        help="RPCs handled at once (default 1024); gRPC answers the excess RESOURCE_EXHAUSTED.",
    ),
    api_key: str | None = typer.Option(
        None, "--api-key", help="Require this API key (prefer CIR_API_KEY in the environment)."
    ),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="PEM certificate chain."),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="PEM private key."),
    refresh_interval_s: float | None = typer.Option(
        None, "--refresh-interval-s", help="Poll for a newly activated index version (0: off)."
    ),
    force: bool | None = typer.Option(
        None, "--force/--no-force", help="Serve even if the index was built by another model."
    ),
    log_format: str | None = typer.Option(None, "--log-format", help="json | text"),
    search_process: bool | None = typer.Option(
        None,
        "--search-process/--no-search-process",
        help="Search an edge:/local: index in a child process (default on: its engine holds "
        "the GIL while it searches).",
    ),
    reranker: str | None = typer.Option(
        None, "--reranker", help="Re-ranker folder (default: MODEL/reranker when present)."
    ),
    rerank: int | None = typer.Option(
        None,
        "--rerank",
        help="Default rerank_k of requests that set none (default 25 with a re-ranker; 0: "
        "re-ranking off, no re-ranker loaded).",
    ),
    recall_guard_rate: float | None = typer.Option(
        None,
        "--recall-guard-rate",
        help="Share of live fast searches also searched exactly to watch their recall@10 "
        "(default 0.01; 0: off).",
    ),
    recall_target: float | None = typer.Option(
        None, "--recall-target", help="recall@10 fast promises (default 0.99)."
    ),
    query_reservoir_file: Path | None = typer.Option(
        None,
        "--query-reservoir-file",
        help="Where recent query vectors are written for `cir index calibrate --queries` "
        "(default: INDEX_PATH/NAME/traffic_queries.npy for edge:/local: indexes).",
    ),
) -> None:
    """Serve composed search over a gallery index with gRPC (grpc.aio)."""
    import asyncio

    from pydantic import ValidationError

    from server import logs
    from server.app import serve
    from server.config import load_settings

    flags: dict[str, Any] = dict(
        model=model,
        index=index,
        name=name,
        host=host,
        port=port,
        metrics_port=metrics_port,
        device=device,
        dtype=dtype,
        num_threads=num_threads,
        batch_threads=batch_threads,
        rerank_threads=rerank_threads,
        rerank_cache_mb=rerank_cache_mb,
        max_batch=1 if no_batching else max_batch,
        max_wait_ms=max_wait_ms,
        adaptive_wait=adaptive_wait,
        queue_size=queue_size,
        max_queue_ms=max_queue_ms,
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
        api_key=api_key,
        tls_cert=tls_cert,
        tls_key=tls_key,
        refresh_interval_s=refresh_interval_s,
        force=force,
        log_format=log_format,
        search_process=search_process,
        reranker=reranker,
        rerank_k=rerank,
        recall_guard_rate=recall_guard_rate,
        recall_target=recall_target,
        query_reservoir_file=query_reservoir_file,
    )
    try:
        settings = load_settings(config, **flags)
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"cir serve: invalid configuration: {exc}", err=True)
        raise typer.Exit(2) from None
    from retrieval.model_source import UntrainedModelError, check_trained

    try:  # the model may come from a flag, CIR_MODEL or the config file: check what was chosen
        check_trained(settings.model, allow_untrained, "cir serve")
    except UntrainedModelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    logs.configure(settings.log_format, logging.getLogger().level or logging.INFO)
    code = asyncio.run(serve(settings))
    raise typer.Exit(code)


def search_cmd(
    server: str = typer.Option("127.0.0.1:50051", "--server", help="host:port of `cir serve`."),
    image: Path | None = typer.Option(None, "--image", help="Reference image file."),
    id: str | None = typer.Option(
        None,
        "--id",
        help="Reference gallery image: its own id (manifest id column or relative path) or its "
        "point id. Without --image and --id: a text-only search.",
    ),
    text: str = typer.Option(..., "--text", help="Modification text."),
    top_k: int = typer.Option(10, "--top-k", min=1, help="Number of results (at least 1)."),
    offset: int = typer.Option(0, "--offset", min=0, help="Results to skip."),
    mode: str = typer.Option("auto", "--mode", help="auto | exact | fast"),
    filter: str | None = typer.Option(
        None, "--filter", help='Payload filter as JSON, e.g. \'{"category": "bag"}\'.'
    ),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="CIR_API_KEY", help="API key (or CIR_API_KEY)."
    ),
    tls_ca: Path | None = typer.Option(None, "--tls-ca", help="CA/certificate PEM to trust."),
    timeout: float = typer.Option(10.0, "--timeout", help="Deadline in seconds."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    rerank: int | None = typer.Option(
        None,
        "--rerank",
        min=0,
        help="Re-rank the first stage's top K (default: the server's; 0: first stage only).",
    ),
) -> None:
    """Send one composed query (or a text-only one) to a running server and print the hits."""
    from server.client import CIRClient, CIRError, parse_filter

    if image is not None and id is not None:
        typer.echo("cir search: give at most one of --image PATH or --id ID", err=True)
        raise typer.Exit(2)
    if image is not None and not image.is_file():
        typer.echo(f"cir search: {image} is not a file", err=True)
        raise typer.Exit(2)
    try:
        flt = parse_filter(filter)
        with CIRClient(server, api_key=api_key, tls_ca=tls_ca, timeout=timeout) as client:
            res = client.search(
                text,
                reference_image=image.read_bytes() if image is not None else None,
                reference_id=id,
                top_k=top_k,
                offset=offset,
                filter=flt,
                mode=mode,  # type: ignore[arg-type]
                rerank_k=rerank,
            )
    except CIRError as exc:
        typer.echo(f"cir search: {exc.code.name}: {exc.details}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        out = {
            "results": [
                {
                    "rank": h.rank,
                    "user_id": h.user_id,  # the user's own id
                    "id": h.id,  # the point id
                    "score": h.score,
                    "first_stage_score": h.first_stage_score,
                    "reranked": h.reranked,
                    "payload": h.payload,
                }
                for h in res.results
            ],
            "index_version": res.index_version,
            "encoder_fingerprint": res.encoder_fingerprint,
            "timings": res.timings,
            "request_id": res.request_id,
            "rerank_k": res.rerank_k,
            "reranker_fingerprint": res.reranker_fingerprint,
            "searched_mode": res.searched_mode,
            "mode_note": res.mode_note,
        }
        json.dump(out, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return
    typer.echo(
        f"{len(res.results)} results from index {res.index_version} "
        f"({res.timings.get('total_ms', 0.0):.1f} ms on the server)"
    )
    for h in res.results:
        extra = {
            k: v for k, v in h.payload.items() if k not in ("path", "relpath", "sha256", "user_id")
        }
        summary = json.dumps(extra, default=str)[:80] if extra else ""
        typer.echo(f"{h.rank:>4}  {h.score:8.4f}  {h.user_id or h.id}  {summary}")


def explain_cmd(
    server: str = typer.Option("127.0.0.1:50051", "--server", help="host:port of `cir serve`."),
    image: Path | None = typer.Option(None, "--image", help="Reference image file."),
    id: str | None = typer.Option(None, "--id", help="Reference gallery id."),
    text: str = typer.Option(..., "--text", help="Modification text."),
    candidate: str = typer.Option(..., "--candidate", help="Gallery id of the result to explain."),
    out: Path = typer.Option(
        Path("."), "--out", help="Folder for candidate_map.png and reference_map.png."
    ),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="CIR_API_KEY", help="API key (or CIR_API_KEY)."
    ),
    tls_ca: Path | None = typer.Option(None, "--tls-ca", help="CA/certificate PEM to trust."),
    timeout: float = typer.Option(30.0, "--timeout", help="Deadline in seconds."),
    as_json: bool = typer.Option(False, "--json", help="Print score, maps and words as JSON."),
) -> None:
    """Explain why a gallery item scored as it did: save the candidate and reference heatmap
    overlays as PNGs and print each caption word's attribution."""
    from server.client import CIRClient, CIRError

    if (image is None) == (id is None):
        typer.echo("cir explain: give exactly one of --image PATH or --id ID", err=True)
        raise typer.Exit(2)
    if image is not None and not image.is_file():
        typer.echo(f"cir explain: {image} is not a file", err=True)
        raise typer.Exit(2)
    if out.exists() and not out.is_dir():
        typer.echo(f"cir explain: --out {out} is not a folder", err=True)
        raise typer.Exit(2)
    try:
        with CIRClient(server, api_key=api_key, tls_ca=tls_ca, timeout=timeout) as client:
            res = client.explain(
                text,
                candidate,
                reference_image=image.read_bytes() if image is not None else None,
                reference_id=id,
            )
    except CIRError as exc:
        typer.echo(f"cir explain: {exc.code.name}: {exc.details}", err=True)
        raise typer.Exit(2 if exc.code.name == "INVALID_ARGUMENT" else 1) from None
    out.mkdir(parents=True, exist_ok=True)
    paths = {"candidate_map": out / "candidate_map.png", "reference_map": out / "reference_map.png"}
    paths["candidate_map"].write_bytes(res.candidate_map.png)
    paths["reference_map"].write_bytes(res.reference_map.png)
    if as_json:
        doc = {
            "score": res.score,
            "candidate_map": {
                "rows": res.candidate_map.rows,
                "cols": res.candidate_map.cols,
                "values": res.candidate_map.values.reshape(-1).tolist(),
                "png": str(paths["candidate_map"]),
            },
            "reference_map": {
                "rows": res.reference_map.rows,
                "cols": res.reference_map.cols,
                "values": res.reference_map.values.reshape(-1).tolist(),
                "png": str(paths["reference_map"]),
            },
            "words": [{"word": w.word, "score": w.score} for w in res.words],
        }
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    typer.echo(f"score {res.score:.4f} for {candidate}")
    typer.echo(f"candidate map: {paths['candidate_map']}")
    typer.echo(f"reference map: {paths['reference_map']}")
    for w in res.words:
        typer.echo(f"{w.score:+10.5f}  {w.word}")
