"""The live recall guard: a sample of real ``fast`` searches is also searched exactly, off the
request path, and a version whose ``fast`` loses recall gets a larger prefetch size L.

A version's L is calibrated once, at build time (retrieval/index/calibrate.py), on queries that
may not be like the live ones. The guard checks the promise on the live ones:

* :meth:`RecallGuard.observe` runs on the search path after the index answered: it keeps every
  query vector in the traffic reservoir (a ring of the last ``reservoir`` queries) and picks a
  rate-limited sample of the queries that ran ``fast`` (``rate``, default 1 %, at most
  ``max_per_s`` a second, a bounded queue: a full queue drops the sample, never waits). That is
  all it does there: a few microseconds, no index call.
* A background thread searches each sampled query exactly (same filter, top ``k`` = 10) and
  counts how many of the exact top-k the ``fast`` answer held: the running recall@k of the
  version over the last ``window`` sampled queries, with a one-sided Wilson lower confidence
  bound (``confidence``, over the window's top-k items).
* Once ``min_samples`` queries are in the window (and enough top-k items that a perfect
  result's bound would reach the target: 268 at 0.99 and 95 %) and the lower bound is below
  the target, the guard raises the version's L (x2, or x4 when the estimate is 0.05 or more below the target),
  records it in the version's metadata through the index API (``set_fast_calibration``:
  ``source`` kept, a ``guard`` entry with the evidence, a ``guard_history``), logs it at
  WARNING and starts a new window. When the next L would be at least ``exact_share`` (0.25)
  of the gallery, where ``fast`` stops paying, it records ``L: None`` instead: ``fast`` and
  ``auto`` then search that version exactly. If the metadata cannot be written, the version is
  searched exactly by this server (``forced_exact``) until it switches versions.
* The reservoir is written to ``reservoir_file`` (``.npy`` [M, D] float32, with a ``.json``
  sidecar naming the encoder fingerprint and the version) every ``save_every_s`` and on stop,
  atomically, so ``cir index calibrate --queries FILE`` calibrates on real traffic.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from retrieval.index.api import SearchView

logger = logging.getLogger(__name__)

#: File name of the traffic reservoir under an Edge/local index's folder (``PATH/<name>/``).
RESERVOIR_FILE = "traffic_queries.npy"
#: Pending exact checks beyond which a sample is dropped (the request path never waits).
QUEUE_SIZE = 64


def wilson_lower(hits: float, n: float, confidence: float = 0.95) -> float:
    """One-sided Wilson lower bound of a proportion ``hits / n`` (0 when ``n`` is 0)."""
    if n <= 0:
        return 0.0
    z = NormalDist().inv_cdf(confidence)
    p = hits / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (centre - margin) / (1 + z2 / n))


@dataclass
class _Check:
    version: str
    vector: np.ndarray
    k: int
    filter: dict[str, Any] | None
    fast_ids: list[str]


@dataclass
class VersionRecall:
    """The running recall@k of one version's ``fast`` searches (the current window)."""

    window: int
    checks: collections.deque[tuple[int, int]] = field(default_factory=collections.deque)
    hits: int = 0
    items: int = 0
    total_checks: int = 0  # since the guard started, across windows
    actions: list[dict[str, Any]] = field(default_factory=list)

    def add(self, hits: int, k: int) -> None:
        self.checks.append((hits, k))
        self.hits += hits
        self.items += k
        self.total_checks += 1
        while len(self.checks) > self.window:
            h, kk = self.checks.popleft()
            self.hits -= h
            self.items -= kk

    def reset(self) -> None:
        self.checks.clear()
        self.hits = self.items = 0

    @property
    def samples(self) -> int:
        return len(self.checks)

    @property
    def recall(self) -> float:
        return self.hits / self.items if self.items else 1.0


class RecallGuard:
    """See the module docstring. ``index``: the served index (a ProcessIndex or a GalleryIndex);
    ``metrics``: server.metrics.Metrics (or None); ``options``: the index's search options."""

    def __init__(
        self,
        index: SearchView,
        *,
        rate: float = 0.01,
        max_per_s: float = 5.0,
        min_samples: int = 100,
        window: int = 1000,
        confidence: float = 0.95,
        recall_target: float = 0.99,
        k: int = 10,
        exact_share: float = 0.25,
        reservoir: int = 2000,
        reservoir_file: Path | None = None,
        save_every_s: float = 60.0,
        fingerprint: str = "",
        metrics: Any = None,
        options: dict[str, Any] | None = None,
        seed: int | None = None,
    ) -> None:
        self.index = index
        self.rate = max(0.0, min(1.0, float(rate)))
        self.max_per_s = float(max_per_s)
        self.min_samples = max(1, int(min_samples))
        self.window = max(self.min_samples, int(window))
        self.confidence = float(confidence)
        self.recall_target = float(recall_target)
        self.k = int(k)
        self.exact_share = float(exact_share)
        self.options = dict(options or {})
        # items (checked top-k ids) a window needs before a perfect result's bound can reach
        # the target: n / (n + z^2) >= target
        z = NormalDist().inv_cdf(self.confidence)
        t = min(self.recall_target, 0.999999)
        self.min_items = int(math.ceil(z * z * t / (1.0 - t)))
        self.fingerprint = fingerprint
        self.metrics = metrics
        self.reservoir_file = reservoir_file
        self.save_every_s = float(save_every_s)
        self._rng = np.random.default_rng(seed)
        self._queue: queue.Queue[_Check | None] = queue.Queue(QUEUE_SIZE)
        self._lock = threading.Lock()
        self._stats: dict[str, VersionRecall] = {}
        self._tokens = max(1.0, self.max_per_s)  # token bucket of exact checks per second
        self._last_refill = time.monotonic()
        self.forced_exact: set[str] = set()  # versions searched exactly (metadata not written)
        self.generation = 0  # bumped on every change of L: the engine re-plans
        self.dropped = 0
        cap = max(0, int(reservoir))
        self._ring: np.ndarray | None = None
        self._ring_cap = cap
        self._ring_n = 0  # queries seen (the ring holds the last min(n, cap))
        self._ring_version = ""
        self._saved_n = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ lifecycle
    @property
    def sampling(self) -> bool:
        return self.rate > 0 and self.max_per_s > 0

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="cir-recall-guard", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the pending checks (up to ``timeout``), write the reservoir, stop."""
        self._stop.set()
        t = self._thread
        if t is not None:
            with contextlib.suppress(queue.Full):  # a full queue ends on the stop flag
                self._queue.put_nowait(None)
            t.join(timeout)
            self._thread = None
        self.save_reservoir()

    # ------------------------------------------------------------------ request path
    def observe(
        self,
        version: str,
        vectors: np.ndarray,
        queries: list[Any],
        results: list[Any],
        modes: list[str],
    ) -> None:
        """After a search batch: keep the vectors, pick the sampled ``fast`` ones. Cheap and
        never blocking (called on the search path). ``modes``: what each query really ran."""
        self._keep(version, vectors)
        if not self.sampling:
            return
        for i, q in enumerate(queries):
            if modes[i] != "fast" or q.offset != 0 or not isinstance(results[i], list):
                continue
            if self._rng.random() >= self.rate or not self._take_token():
                continue
            k = min(self.k, int(q.top_k) if not q.reranks else self.k)
            hits = results[i]
            searched = getattr(hits, "version", "") or version  # Hits name their version
            check = _Check(
                searched, np.array(vectors[i], np.float32), k, q.filter, [h.id for h in hits[:k]]
            )
            try:
                self._queue.put_nowait(check)
            except queue.Full:
                self.dropped += 1

    def _take_token(self) -> bool:
        now = time.monotonic()
        with self._lock:
            cap = max(1.0, self.max_per_s)
            self._tokens = min(cap, self._tokens + (now - self._last_refill) * self.max_per_s)
            self._last_refill = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
        self.dropped += 1
        return False

    def _keep(self, version: str, vectors: np.ndarray) -> None:
        if self._ring_cap <= 0 or len(vectors) == 0:
            return
        with self._lock:
            if self._ring is None or self._ring.shape[1] != vectors.shape[1]:
                self._ring = np.zeros((self._ring_cap, vectors.shape[1]), np.float32)
                self._ring_n = 0
            for v in vectors:
                self._ring[self._ring_n % self._ring_cap] = v
                self._ring_n += 1
            self._ring_version = version

    # ------------------------------------------------------------------ reservoir
    def reservoir(self) -> np.ndarray:
        """The last ``reservoir`` query vectors [M, D], oldest first."""
        with self._lock:
            if self._ring is None or self._ring_n == 0:
                return np.zeros((0, 0), np.float32)
            n, cap = self._ring_n, self._ring_cap
            if n <= cap:
                return self._ring[:n].copy()
            start = n % cap
            return np.concatenate([self._ring[start:], self._ring[:start]])

    def save_reservoir(self) -> Path | None:
        """Write the reservoir (atomically) when it holds queries not written yet."""
        path = self.reservoir_file
        if path is None or self._ring_n == self._saved_n:
            return None
        arr = self.reservoir()
        if len(arr) == 0:
            return None
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            with open(tmp, "wb") as f:
                np.save(f, arr)
            os.replace(tmp, path)
            side = {
                "encoder_fingerprint": self.fingerprint,
                "version": self._ring_version,
                "count": int(len(arr)),
                "seen": int(self._ring_n),
                "written_at": time.time(),
            }
            tmp_j = path.with_suffix(".json.tmp")
            tmp_j.write_text(json.dumps(side))
            os.replace(tmp_j, path.with_suffix(".json"))
        except OSError as exc:
            logger.warning("recall guard: cannot write the traffic reservoir %s: %s", path, exc)
            return None
        self._saved_n = self._ring_n
        logger.debug("recall guard: %d query vectors written to %s", len(arr), path)
        return path

    # ------------------------------------------------------------------ background checks
    def _run(self) -> None:
        last_save = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self._stop.is_set():
                    return
                item = None
            else:
                try:
                    if item is not None:
                        self._check(item)
                except Exception:  # a failed check (index restarting, ...) is only a lost sample
                    logger.warning("recall guard: exact check failed", exc_info=True)
                finally:
                    self._queue.task_done()
                if item is None and self._stop.is_set():
                    return
            if self.save_every_s > 0 and time.monotonic() - last_save >= self.save_every_s:
                self.save_reservoir()
                last_save = time.monotonic()

    def _check(self, c: _Check) -> None:
        if c.version != str(self.index.active_version or ""):
            return  # switched meanwhile: the answer compared would be another version's
        exact = self.index.search(c.vector, c.k, 0, c.filter, "exact")
        if exact.version != c.version:
            return  # switched between the check above and the search: another version's answer
        want = {h.id for h in exact[: c.k]}
        if not want:
            return
        hits = len(want & set(c.fast_ids))
        with self._lock:
            st = self._stats.setdefault(c.version, VersionRecall(self.window))
            st.add(hits, len(want))
            lower = wilson_lower(st.hits, st.items, self.confidence)
            # a window too small for even a perfect result to clear the target proves nothing
            act = (
                st.samples >= self.min_samples
                and st.items >= self.min_items
                and lower < self.recall_target
            )
            recall, samples = st.recall, st.samples
        self._export(c.version, recall, lower, samples)
        if act:
            self._raise_l(c.version, recall, lower, samples)

    def _export(self, version: str, recall: float, lower: float, samples: int) -> None:
        m = self.metrics
        if m is None:
            return
        m.guard_recall.labels(version).set(recall)
        m.guard_lower.labels(version).set(lower)
        m.guard_samples.labels(version).set(samples)

    # ------------------------------------------------------------------ acting
    def current_l(self) -> int | None:
        """The L a top-k ``fast`` search of the served version uses (None: it runs exactly)."""
        from retrieval.index.policy import CALIBRATION_KEY, fast_plan, uncalibrated_reason

        if str(self.index.active_version or "") in self.forced_exact:
            return None
        meta = self.index.meta
        cal = meta.extra.get(CALIBRATION_KEY) if meta is not None else None
        if uncalibrated_reason(self.options, cal):
            return None
        return int(fast_plan(self.k, 0, self.options, None, cal)[0])

    def _raise_l(self, version: str, recall: float, lower: float, samples: int) -> None:
        from retrieval.index.calibrate import LADDER
        from retrieval.index.policy import CALIBRATION_KEY

        meta = self.index.meta
        if meta is None or str(self.index.active_version or "") != version:
            return
        old = dict(meta.extra.get(CALIBRATION_KEY) or {})
        cur = self.current_l()
        if cur is None:
            return  # already exact
        n = int(self.index.count())
        factor = 4 if recall < self.recall_target - 0.05 else 2
        new_l: int | None = next((x for x in LADDER if x >= factor * cur), factor * cur)
        if new_l is not None and new_l >= self.exact_share * n:
            new_l = None
        evidence = {
            "previous_L": cur,
            "L": new_l,
            "recall": round(recall, 4),
            "lower_bound": round(lower, 4),
            "samples": samples,
            "confidence": self.confidence,
            "at": time.time(),
        }
        rec = dict(old)
        rec.update(
            L=new_l,
            recall_target=self.recall_target,
            top_k=self.k,
            source=old.get("source", "none"),
            guard=evidence,
            guard_history=[*old.get("guard_history", [])[-19:], evidence],
        )
        if new_l is None:
            rec["reason"] = (
                f"the recall guard measured recall@{self.k} {recall:.3f} (lower bound "
                f"{lower:.3f}, {samples} live queries) at L = {cur}, and a larger L would cost "
                "more than an exact search"
            )
            rec["heldout_recall"] = None
        else:
            rec.pop("reason", None)
            rec["heldout_recall"] = None  # measured at the old L
        what = "searching exactly" if new_l is None else f"L {cur} -> {new_l}"
        try:
            self.index.set_fast_calibration(version, rec)
        except Exception as exc:  # noqa: BLE001 -- whatever the backend says, stay safe
            logger.error(
                "recall guard: version %s fast recall@%d %.3f (lower bound %.3f < %.3f, %d "
                "queries); cannot record %s (%s): this server searches it exactly",
                version, self.k, recall, lower, self.recall_target, samples, what, exc,
            )  # fmt: skip
            self.forced_exact.add(version)
            action = "exact"
        else:
            logger.warning(
                "recall guard: version %s fast recall@%d %.3f (lower bound %.3f < %.3f over %d "
                "live queries): %s, recorded in its metadata",
                version, self.k, recall, lower, self.recall_target, samples, what,
            )  # fmt: skip
            action = "exact" if new_l is None else "raise-L"
        with self._lock:
            st = self._stats.setdefault(version, VersionRecall(self.window))
            st.reset()
            st.actions.append(dict(evidence, action=action))
            self.generation += 1
        if self.metrics is not None:
            self.metrics.guard_actions.labels(action).inc()
            self.metrics.guard_fast_l.labels(version).set(-1 if new_l is None else new_l)

    # ------------------------------------------------------------------ reporting
    def snapshot(self, version: str) -> dict[str, Any]:
        """What Info reports for ``version``."""
        with self._lock:
            st = self._stats.get(version)
            recall = st.recall if st and st.samples else None
            lower = wilson_lower(st.hits, st.items, self.confidence) if st else None
            samples = st.samples if st else 0
            total = st.total_checks if st else 0
            last = st.actions[-1] if st and st.actions else None
            ring = min(self._ring_n, self._ring_cap)
        return {
            "recall": recall,
            "lower_bound": lower if samples else None,
            "samples": samples,
            "total_checks": total,
            "last_action": last,
            "reservoir": ring,
            "dropped": self.dropped,
        }

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Tests: wait until every queued check ran."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False


__all__ = ["RESERVOIR_FILE", "RecallGuard", "VersionRecall", "wilson_lower"]
