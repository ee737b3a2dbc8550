"""Finishing a build, after the stages ran: delete what the version must no longer hold
(incremental: vanished or changed files; a resumed build's stale points), finalize, verify
(count + self-retrieval), calibrate fast mode, activate (never before it is verified, never a
shard, never past the shrink guard). Also the admin steps of ``cir index verify|calibrate``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.config import COUNT_KEY, VERIFY_OPTIONS, BuildConfig, IndexerError
from indexer.plan import Target, active_count, delete_refusal, shrink_refusal
from indexer.report import Report
from indexer.sources import parse_shard, shard_of
from indexer.stages import Ledger, Listing
from indexer.store import sample_ids, verify_view
from retrieval.index.policy import CALIBRATION_KEY

if TYPE_CHECKING:
    from retrieval.encoder import Encoder

logger = logging.getLogger(__name__)


def delete_stale(target: Target, ledger: Ledger, report: Report, stages: dict[str, float]) -> int:
    """Incremental (vanished / changed) and a resumed build's stale points; returns the points
    to delete that the shrink guard kept (they still count in the version)."""
    cfg, view = target.cfg, target.view
    assert view is not None
    shard_i, shard_n = parse_shard(cfg.shard)
    t0 = time.perf_counter()
    kept_stale = 0
    if cfg.limit is None:
        present_set = set(target.present_ids)
        in_scope = present_set - set(ledger.seen)
        if shard_n > 1:
            rel_of = {i: target.existing[i][0] for i in in_scope if i in target.existing}
            in_scope = {i for i in in_scope if shard_of(rel_of.get(i, ""), shard_n) == shard_i}
        refusal = None
        if in_scope and cfg.incremental and not cfg.allow_shrink:
            refusal = delete_refusal(
                len(present_set), len(in_scope), cfg.max_shrink, report.version
            )
        if refusal:
            report.refused = f"{refusal} Nothing was deleted; {report.indexed} added."
            kept_stale = len(in_scope)
        elif in_scope and (cfg.incremental or shard_n == 1):
            stale = sorted(in_scope)
            for s in range(0, len(stale), 1000):
                view.delete(stale[s : s + 1000])
            view.flush()
            report.deleted = len(stale)
    elif cfg.incremental:
        report.warnings.append("--limit: vanished images were not deleted")
    stages["delete"] = time.perf_counter() - t0
    return kept_stale


def finish(
    target: Target,
    enc: Encoder,
    listing: Listing,
    ledger: Ledger,
    report: Report,
    stages: dict[str, float],
    calib_q: np.ndarray | None,
    captions: list[str] | None,
) -> None:
    """Deletions, then finalize, verify, calibrate and activate (see the module doc)."""
    cfg, idx = target.cfg, target.idx
    shard_i, shard_n = parse_shard(cfg.shard)
    kept_stale = delete_stale(target, ledger, report, stages)
    # a count check needs the whole collection in this run (no other shards, no --limit
    # on top of earlier content)
    whole = shard_n == 1 and (cfg.limit is None or report.mode == "rebuild")
    expected = len(ledger.seen) + kept_stale if whole else None
    sample = sample_ids(sorted(ledger.written_ids) or sorted(ledger.seen), cfg.verify_sample)
    if cfg.incremental:
        t0 = time.perf_counter()
        report.count = idx.count()
        if cfg.verify:
            report.verification = verify_view(idx, sample, expected)
            report.verified = bool(report.verification["ok"])
        if report.version is not None:
            idx.update_version_meta(report.version, {COUNT_KEY: report.count})
        stages["verify"] = time.perf_counter() - t0
        return
    handle = target.handle
    assert handle is not None
    version = handle.version
    t0 = time.perf_counter()
    handle.close()  # Edge: builds the indexes, releases the lock
    target.handle = None
    stages["finalize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    check = idx.open_version(version)
    try:
        report.count = check.count()
        if cfg.verify:
            report.verification = verify_view(check, sample, expected)
            report.verified = bool(report.verification["ok"])
    finally:
        check.close()
    idx.update_version_meta(version, {COUNT_KEY: report.count})
    stages["verify"] = time.perf_counter() - t0
    if cfg.calibrate and whole and report.count >= cfg.calibrate_min_points:
        t0 = time.perf_counter()
        qv, source = calib_q, "queries"
        info: dict[str, Any] = {}
        if qv is None:  # the model's own composed queries on this gallery
            qv, info = composed_queries(enc, listing.items, cfg, captions)
            source = "composed"
        report.calibration = calibrate_version(
            idx, version, query_vectors=qv, source=source if qv is not None else None
        )
        report.calibration.update(info)
        idx.update_version_meta(version, {CALIBRATION_KEY: report.calibration})
        stages["calibrate"] = time.perf_counter() - t0
    if shard_n > 1:
        if cfg.activate:
            report.warnings.append(
                f"shard {shard_i}/{shard_n}: not activated (a shard is part of a build); "
                f"after every shard finished: cir index activate {version}"
            )
    elif cfg.activate and report.verified:
        activate_guarded(target, version, report, stages)
    elif cfg.activate and report.verified is False:
        report.warnings.append(
            f"version {version} failed verification and was NOT activated: "
            f"{_verify_summary(report.verification)}"
        )


def activate_guarded(
    target: Target, version: str, report: Report, stages: dict[str, float]
) -> None:
    """Activate ``version`` unless the shrink guard refuses (then ``report.refused``)."""
    cfg = target.cfg
    refusal = None
    if not cfg.allow_shrink:
        before, active = active_count(cfg.index, cfg.name)
        refusal = shrink_refusal(
            before, report.count or 0, cfg.max_shrink, f"version {version}", active
        )
    if refusal:
        report.refused = (
            f"{refusal} {version} is kept, not active (`cir index activate "
            f"{version} --allow-shrink` to activate it anyway)."
        )
        return
    t0 = time.perf_counter()
    target.idx.activate(version)
    report.activated = True
    stages["activate"] = time.perf_counter() - t0


def _verify_summary(v: dict[str, Any] | None) -> str:
    if not v:
        return "not run"
    return (
        f"count {v['count']} (expected {v['expected_count']}), "
        f"{v['found_rank1']}/{v['sampled']} sampled images found at rank 1, {v['missing']} missing"
    )


# --------------------------------------------------------------------------- admin helpers
def load_query_vectors(path: str | Path) -> np.ndarray:
    """Real query vectors [M, D] from a .npy file, or IndexerError saying what is wrong."""
    try:
        qv = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise IndexerError(f"cannot read query vectors {path}: {exc}") from exc
    if qv.ndim != 2 or qv.shape[0] == 0 or not np.issubdtype(qv.dtype, np.number):
        raise IndexerError(
            f"query vectors {path} must be a non-empty numeric [M, D] array, got "
            f"{qv.dtype} {qv.shape}"
        )
    qv = qv.astype(np.float32)
    if not np.all(np.isfinite(qv)) or np.any(np.linalg.norm(qv, axis=1) == 0):
        raise IndexerError(f"query vectors {path} must be finite and non-zero")
    return qv


#: Generic modification texts for composed calibration queries when neither an operator file
#: nor the model's training captions are at hand: edits of colour, size, position, count and
#: style, the kinds of change composed queries ask for.
CALIBRATION_TEXTS: tuple[str, ...] = (
    "make it red",
    "change the colour to blue",
    "the same but green",
    "make it yellow",
    "in black instead",
    "in white",
    "make it purple",
    "turn it orange",
    "make it bigger",
    "make it smaller",
    "the same but larger",
    "a smaller version",
    "move it to the left",
    "move it to the right",
    "put it at the top",
    "put it at the bottom",
    "move it to the middle",
    "add another one next to it",
    "add a small object on the left",
    "add a big object on the right",
    "remove the object in the middle",
    "remove one of them",
    "only keep the largest one",
    "two of them instead of one",
    "make it darker",
    "make it lighter",
    "brighter colours",
    "with a different shape",
    "make it round",
    "make it square",
    "the same with stripes",
    "without the pattern",
    "the same but plain",
    "swap the colours",
    "rotate it",
    "upside down",
    "closer to the camera",
    "further away",
    "on a plain background",
    "the same thing in a different colour",
)


def read_captions(path: str | Path) -> list[str]:
    """Calibration captions, one per line (blank lines skipped), or IndexerError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexerError(f"cannot read calibration captions {path}: {exc}") from exc
    caps = [line.strip() for line in text.splitlines() if line.strip()]
    if not caps:
        raise IndexerError(f"calibration captions {path} holds no caption (one per line)")
    return caps


def training_captions(model: str | Path, limit: int = 20_000) -> tuple[list[str], str] | None:
    """The captions of the triplets the model was trained on, when its folder names them
    (``card.json``: ``training.config.data``, a folder with ``train.jsonl``); None when the
    folder names none or the data is not on this machine (not an error)."""
    from retrieval.model_source import resolve_model

    folder = Path(resolve_model(model))
    try:
        card = json.loads((folder / "card.json").read_text())
        data = card["training"]["config"]["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(data, str) or not data:
        return None
    # relative to here, else to the folder holding `models/` (the repository's root)
    rel = Path(data)
    bases = [Path("/")] if rel.is_absolute() else [Path.cwd(), folder.parent.parent, folder.parent]
    train = next(
        (b / rel / "train.jsonl" for b in bases if (b / rel / "train.jsonl").is_file()), None
    )
    if train is None:
        logger.info("the model's training data %s is not here: generic calibration texts", data)
        return None
    caps: list[str] = []
    with open(train, encoding="utf-8") as f:
        for line in f:
            try:
                cap = json.loads(line).get("caption")
            except (ValueError, AttributeError):
                continue
            if isinstance(cap, str) and cap.strip():
                caps.append(cap.strip())
            if len(caps) >= limit:
                break
    return (caps, f"training triplets {train}") if caps else None


def composed_queries(
    enc: Any, items: list[Any], cfg: BuildConfig, captions: list[str] | None, seed: int = 0
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Composed queries the model makes for calibration: ``cfg.calibration_queries`` gallery
    images drawn reproducibly as references, each with a caption drawn from ``captions`` (an
    operator file), else the model's training captions, else :data:`CALIBRATION_TEXTS`;
    encoded with the build's encoder. ``(None, info)`` when no reference could be read."""
    from retrieval.imageio import ImageDecodeError, decode_image

    if captions is not None:
        what = f"file {cfg.calibration_captions}"
    else:
        found = training_captions(cfg.model)
        captions, what = found if found else (list(CALIBRATION_TEXTS), "built-in texts")
    rng = np.random.default_rng(seed)
    want = max(1, int(cfg.calibration_queries))
    refs: list[Any] = []
    for i in rng.permutation(len(items))[: 3 * want]:  # a few unreadable files are skipped
        item = items[int(i)]
        if item.problem:
            continue
        try:
            with open(item.location, "rb") as f:
                refs.append(decode_image(f.read()))
        except (OSError, ImageDecodeError):
            continue
        if len(refs) >= want:
            break
    info = {"captions": what, "references": len(refs)}
    if not refs:
        return None, info
    texts = [captions[int(j)] for j in rng.integers(0, len(captions), len(refs))]
    t0 = time.perf_counter()
    qv = enc.encode_queries(refs, texts, batch_size=max(1, cfg.batch_size))
    info["encode_seconds"] = round(time.perf_counter() - t0, 2)
    logger.info("calibration: %d composed queries (captions: %s)", len(refs), what)
    return np.asarray(qv, np.float32), info


def calibrate_version(
    idx: Any,
    version: str,
    recall_target: float = 0.99,
    query_vectors: np.ndarray | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Measure ``version``'s fast-mode L (on ``query_vectors`` [M, D] when given, named by
    ``source``: "composed" or "queries"; else on proxy queries, the last resort) and record it
    in its metadata (see retrieval.index.calibrate); later searches of that version use it."""
    from retrieval.index.calibrate import calibrate_fast

    kw: dict[str, Any] = {"query_vectors": query_vectors, "source": source}
    if version == idx.active_version:
        res = calibrate_fast(idx, recall_target, **kw)
    else:
        view = idx.open_version(version)
        try:
            res = calibrate_fast(view, recall_target, **kw)
        finally:
            view.close()
    idx.update_version_meta(version, {CALIBRATION_KEY: res})
    return res


def _version_or_active(idx: Any, version: str | None, uri: str, name: str) -> str:
    target = version or idx.active_version
    if target is None:
        raise IndexerError(f"index {name!r} at {uri} has no active version")
    return str(target)


def calibrate_index(
    uri: str,
    name: str,
    version: str | None = None,
    recall_target: float = 0.99,
    query_vectors: np.ndarray | None = None,
    queries_fingerprint: str | None = None,
) -> dict[str, Any]:
    """``calibrate_version`` by URI (default: the active version). ``queries_fingerprint``:
    the encoder that made ``query_vectors`` when known (a server's traffic reservoir names
    it); another encoder's queries are refused."""
    from retrieval.index import open_index

    idx = open_index(uri, name, options=VERIFY_OPTIONS)
    try:
        target = _version_or_active(idx, version, uri, name)
        if queries_fingerprint is not None:
            fp = next(
                (v.meta.encoder_fingerprint for v in idx.versions() if v.version == target), None
            )
            if fp is not None and fp != queries_fingerprint:
                raise IndexerError(
                    f"the query vectors were made by encoder {queries_fingerprint}, version "
                    f"{target} was built with {fp}: they are not comparable"
                )
        try:
            res = calibrate_version(idx, target, recall_target, query_vectors)
        except ValueError as exc:  # an empty version or unusable query vectors
            raise IndexerError(f"cannot calibrate {name} {target}: {exc}") from exc
        res["version"] = target
        return res
    finally:
        idx.close()


def verify_version(
    uri: str, name: str, version: str | None, sample: int = 32, expect: int | None = None
) -> dict[str, Any]:
    """Verify a version (default: the active one) by count and self-retrieval."""
    from retrieval.index import open_index

    idx = open_index(uri, name, options=VERIFY_OPTIONS)
    try:
        target = _version_or_active(idx, version, uri, name)
        if target == idx.active_version:
            view: Any = idx
            ids = [r.id for _, r in zip(range(sample * 50), idx.iter_records(), strict=False)]
            res = verify_view(idx, sample_ids(ids, sample), expect)
        else:
            view = idx.open_version(target)
            try:
                ids = [r.id for _, r in zip(range(sample * 50), view.iter_records(), strict=False)]
                res = verify_view(view, sample_ids(ids, sample), expect)
            finally:
                view.close()
        res["version"] = target
        return res
    finally:
        idx.close()
