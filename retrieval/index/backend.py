"""The narrow protocol between :class:`~retrieval.index.gallery.GalleryIndex` and an engine.

GalleryIndex owns everything that is the same on every engine: input validation, the model
guard, version numbering rules, activation / rollback / pruning, the meta merge, auto-create on
first upsert, search planning (:mod:`retrieval.index.policy`), reference-counted version
switches and ``refresh``. A backend is just the engine calls:

* :class:`Backend` -- one index name at one location: its versions' metadata, the
  pointer / alias naming the active version (and the rollback history), creating and dropping a
  version's storage, and opening a :class:`VersionStore` on one version.
* :class:`VersionStore` -- data calls on one opened version: upsert, delete, count, query,
  retrieve, scroll, sample.

Implementations: :mod:`retrieval.index.edge` (Qdrant Edge, in-process, one shard directory per
version) and :mod:`retrieval.index.qdrant_server` (qdrant-client: a server/cluster, or its
local mode).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from retrieval.index.api import Hit, Record, VersionMeta
from retrieval.index.filters import Condition
from retrieval.index.validate import PayloadSpec

if TYPE_CHECKING:
    import numpy as np

    from retrieval.index.policy import SearchPlan


class VersionStore(Protocol):
    """Engine calls on one opened version. Inputs are already validated and normalised."""

    version: str
    meta: VersionMeta  # kept up to date by GalleryIndex (meta merges, calibration reloads)

    def upsert(
        self, ids: list[str], tokens: np.ndarray, pooled: np.ndarray, payloads: list[dict[str, Any]]
    ) -> int: ...

    def delete(self, ids: list[str]) -> None: ...

    def flush(self) -> None: ...

    def count(self, conds: list[Condition] | None = None) -> int: ...

    def query(self, queries: np.ndarray, plan: SearchPlan) -> list[list[Hit]]: ...

    def retrieve(self, ids: list[str], with_vectors: bool, payload: PayloadSpec) -> list[Record]:
        """Records of the ids that exist, in the order given."""
        ...

    def scroll(
        self,
        limit: int,
        offset: str | None,
        payload: PayloadSpec,
        with_vectors: bool,
        conds: list[Condition],
    ) -> tuple[list[Record], str | None]: ...

    def sample(self, n: int, payload: PayloadSpec) -> list[Record]: ...

    def finish(self) -> None:
        """Build the indexes of what was written (a no-op where the engine does it itself)."""
        ...

    def close(self, finish: bool = False) -> None:
        """Release the version (``finish``: a writer's close, build its indexes first)."""
        ...


class Backend(Protocol):
    """One index name at one location, as engine calls."""

    kind: str  # "edge" | "qdrant" | "local"
    #: One opener per version (Edge): writable handles are closed before activation, the
    #: active version is opened on first use by a writer and re-opened lazily after a switch.
    exclusive: bool
    where: str  # "under PATH" / "at URI", for messages

    # ---- pointer / alias ------------------------------------------------------------------
    def active(self) -> str | None:
        """The version the name points at (None: no version yet)."""
        ...

    def history(self) -> list[str]:
        """Previously active versions, most recent first."""
        ...

    def point(self, version: str, history: list[str]) -> None:
        """Point the name at ``version`` atomically and record the rollback ``history``."""
        ...

    def set_history(self, history: list[str]) -> None: ...

    def mark_activated(self, version: str) -> None:
        """Record the first activation time of ``version`` (kept on later activations)."""
        ...

    def mutex(self) -> AbstractContextManager[Any]:
        """Serialises read-modify-writes of the pointer and the metadata (between processes
        where the engine allows it)."""
        ...

    # ---- versions -------------------------------------------------------------------------
    def list_versions(self) -> list[str]:
        """Complete versions, oldest first."""
        ...

    def read_meta(self, version: str) -> tuple[VersionMeta, float]:
        """``(meta, created)``; IndexNotFoundError when the version does not exist."""
        ...

    def records(self) -> dict[str, tuple[VersionMeta, float, float | None]]:
        """Every version's ``(meta, created, activated_at)``."""
        ...

    def write_meta(self, version: str, meta: VersionMeta) -> None: ...

    def create(self, meta: VersionMeta) -> str:
        """Claim the next version number and create its (empty) storage with payload indexes
        for ``meta.fields``; listed only once complete. Returns the version."""
        ...

    def exists(self, version: str) -> bool:
        """Whether a listed version's storage is there."""
        ...

    def open(self, version: str, meta: VersionMeta) -> VersionStore:
        """Open a version (IndexInUseError when another opener holds an exclusive one)."""
        ...

    def finish(self, version: str, store: VersionStore | None) -> None:
        """Make sure ``version``'s indexes are built before it is activated (``store``: this
        object's open store of it, if any), or refuse with GalleryIndexError."""
        ...

    def in_use(self, version: str, history: list[str]) -> bool:
        """Whether pruning must keep ``version`` (another process holds or may still read it)."""
        ...

    def drop(self, version: str) -> None:
        """Delete a version's storage and metadata (IndexInUseError while it is held)."""
        ...

    def count_version(self, version: str) -> int | None:
        """Points of a version not opened here (None when not cheaply known)."""
        ...

    def describe(self, version: str | None) -> dict[str, Any]:
        """Backend specifics for ``describe()`` (path / collection, shards...)."""
        ...

    def close(self) -> None: ...


def merged_meta(backend: Backend, version: str, extra: Mapping[str, Any]) -> VersionMeta:
    """Read-modify-write of a version's ``extra`` under the backend's mutex (the one meta
    merge: :meth:`VersionMeta.with_extra`)."""
    with backend.mutex():
        meta, _ = backend.read_meta(version)
        new = meta.with_extra(extra)
        backend.write_meta(version, new)
    return new


def iter_chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of the batches of ``n`` items ``size`` at a time."""
    for s in range(0, n, size):
        yield s, min(n, s + size)
