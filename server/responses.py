"""The RPCs' replies: engine results -> protobuf messages (no validation, no I/O)."""

from __future__ import annotations

import time
from typing import Any

from server import __version__
from server._generated.cir.v1 import search_pb2 as pb
from server.engine import Engine, Query, RankedHit, public_payload, user_id_of
from server.protoconv import MODE_NAMES, dict_to_struct

MODE_VALUES = {name: value for value, name in MODE_NAMES.items() if value}


def timings(tm: dict[str, float], **extra: float) -> Any:
    """A Timings message from a query's stage times (ms)."""
    return pb.Timings(
        queue_ms=tm.get("queue_ms", 0.0),
        decode_ms=tm.get("decode_ms", 0.0),
        encode_ms=tm.get("encode_ms", 0.0),
        batch_size=int(tm.get("batch_size", 0)),
        reference_cached=bool(tm.get("reference_cached", 0.0)),
        **extra,
    )


def search_response(
    engine: Engine, q: Query, hits: list[Any], version: str, rid: str, t0: float
) -> Any:
    """One SearchResponse: the hits of ``q`` on ``version`` (``t0``: the call's start)."""
    tm = q.timings
    resp = pb.SearchResponse(
        index_version=version,
        encoder_fingerprint=engine.encoder.fingerprint,
        request_id=rid,
        timings=timings(
            tm,
            reference_ms=tm.get("reference_ms", 0.0) if not tm.get("reference_cached") else 0.0,
            search_ms=tm.get("search_ms", 0.0),
            total_ms=(time.perf_counter() - t0) * 1000.0,
            rerank_ms=tm.get("rerank_ms", 0.0),
        ),
    )
    if q.searched_mode:
        resp.searched_mode = MODE_VALUES[q.searched_mode]  # type: ignore[assignment]
        resp.mode_note = q.mode_note
    reranked = bool(hits) and isinstance(hits[0], RankedHit)
    if q.reranks and engine.reranker is not None:
        resp.rerank_k = q.rerank_k
        resp.reranker_fingerprint = engine.reranker.fingerprint
    for i, h in enumerate(hits):
        hit = resp.results.add(
            id=h.id,
            score=float(h.score),
            rank=q.offset + i + 1,
            user_id=user_id_of(h.payload),
            first_stage_score=float(h.first_stage_score if reranked else h.score),
            reranked=bool(h.reranked) if reranked else False,
        )
        if q.include_payload and h.payload:
            dict_to_struct(public_payload(h.payload), hit.payload)
    return resp


def encode_response(engine: Engine, q: Query, vec: Any) -> Any:
    return pb.EncodeQueryResponse(
        vector=[float(x) for x in vec],
        dim=len(vec),
        encoder_fingerprint=engine.encoder.fingerprint,
        timings=timings(q.timings, reference_ms=q.timings.get("reference_ms", 0.0)),
    )


def list_response(
    hits: list[Any], nxt: int | None, total: int, version: str, with_payload: bool
) -> Any:
    resp = pb.ListImagesResponse(total=total, index_version=version)
    for h in hits:
        item = resp.items.add(id=h.id)
        if with_payload and h.payload:
            dict_to_struct(public_payload(h.payload), item.payload)
    if nxt is not None:
        resp.next_offset = nxt
    return resp


def info_response(engine: Engine, settings: Any, count: int) -> Any:
    s = settings
    enc = engine.encoder
    idx = engine.index
    meta = idx.meta
    return pb.InfoResponse(
        model=pb.ModelInfo(
            preset=str(enc.preset),
            fingerprint=str(enc.fingerprint),
            dim=int(enc.dim),
            num_queries=int(enc.num_queries),
            image_size=int(enc.image_size),
            max_text_tokens=int(enc.max_text_tokens),
            device=str(enc.device),
            dtype=str(enc.dtype).replace("torch.", ""),
        ),
        index=pb.IndexInfo(
            name=str(idx.name),
            backend=str(idx.backend),
            version=engine.version,
            count=int(count),
            filterable_fields=engine.fields(),
            encoder_fingerprint=str(meta.encoder_fingerprint) if meta else "",
        ),
        limits=pb.Limits(
            max_top_k=s.max_top_k,
            max_offset=s.max_offset,
            max_text_chars=s.max_text_chars,
            max_image_bytes=s.max_image_bytes,
            max_image_pixels=s.max_image_pixels,
            max_batch_queries=s.max_batch_queries,
            max_message_bytes=s.max_message_bytes,
            max_page_size=s.max_page_size,
            max_rerank_k=s.max_rerank_k,
        ),
        server_version=__version__,
        max_batch=s.max_batch,
        max_wait_ms=s.max_wait_ms,
        reranker=pb.RerankerInfo(
            loaded=engine.reranker is not None,
            fingerprint=engine.reranker.fingerprint if engine.reranker is not None else "",
            features=engine.reranker.config.features if engine.reranker is not None else "",
            default_rerank_k=engine.default_rerank_k,
        ),
        recall_guard=recall_guard_info(engine, meta),
    )


def explain_response(explainer: Any, e: Any, reference: Any, candidate: Any) -> Any:
    """An ExplainResponse from ``Explainer.explain``'s result (heatmaps drawn by ``explainer``)."""

    def heatmap(image: Any, values: Any) -> Any:
        return pb.Heatmap(
            rows=int(values.shape[0]),
            cols=int(values.shape[1]),
            values=[float(v) for v in values.reshape(-1)],
            png=explainer.overlay_png(image, values),
        )

    return pb.ExplainResponse(
        score=e.score,
        candidate_map=heatmap(candidate, e.candidate_map),
        reference_map=heatmap(reference, e.reference_map),
        words=[pb.WordScore(word=w.word, score=w.score) for w in e.words],
    )


def recall_guard_info(engine: Engine, meta: Any) -> Any:
    """Info.recall_guard: the guard's running estimate for the served version and its L."""
    from retrieval.index.policy import CALIBRATION_KEY

    guard = engine.guard
    if guard is None:
        return pb.RecallGuardInfo()
    snap = guard.snapshot(engine.version)
    cal = (meta.extra.get(CALIBRATION_KEY) if meta is not None else None) or {}
    try:
        fast_l = guard.current_l()
    except Exception:  # informative only
        fast_l = None
    last = snap["last_action"]
    words = ""
    if last:
        to = "exact search" if last.get("L") is None else f"L = {last['L']}"
        words = (
            f"{last['action']}: L {last['previous_L']} -> {to} at recall@10 {last['recall']} "
            f"(lower bound {last['lower_bound']}, {last['samples']} queries)"
        )
    return pb.RecallGuardInfo(
        enabled=guard.sampling,
        sample_rate=guard.rate,
        recall_target=guard.recall_target,
        recall=snap["recall"] or 0.0,
        recall_lower_bound=snap["lower_bound"] or 0.0,
        samples=snap["samples"],
        min_samples=guard.min_samples,
        fast_l=fast_l or 0,
        fast_l_source=("guard" if cal.get("guard") else str(cal.get("source", "proxy")))
        if cal
        else "table",
        heldout_recall=float(cal.get("heldout_recall") or 0.0),
        last_action=words,
        reservoir_size=snap["reservoir"],
        reservoir_file=str(guard.reservoir_file or ""),
    )
