"""The gallery index: one point per image with a ``tokens`` multivector (MaxSim) and ``pooled``.

Backends (picked by the URI given to :func:`open_index`):

* ``edge:PATH`` (default) -- Qdrant Edge, the Qdrant engine embedded in-process, on disk under
  ``PATH/<name>/``; one process owns a version's shard at a time (lock file with the pid).
* ``qdrant:URL`` -- a Qdrant server or cluster through qdrant-client (``api_key``,
  ``shard_number``, ``replication_factor``); versions are collections behind an alias.
* ``local:PATH`` / ``local::memory:`` -- qdrant-client's local mode (a pure-Python scan; tests).

Usage::

    from retrieval.index import open_index, VersionMeta
    idx = open_index("edge:data/index", name="gallery", encoder_fingerprint=fp)
    idx.upsert(ids, tokens, payloads)        # ids: list[str]; tokens: np.ndarray [N, Q, D]
    hits = idx.search(query, top_k=10, offset=0, filter={"category": "bag"}, mode="auto")
    hits[0].id, hits[0].score, hits[0].payload
    hits.version, hits.mode, hits.note      # the version searched, the mode that ran, why
    idx.count(); idx.get(ids, with_vectors=True); idx.delete(ids)
    recs, nxt = idx.scroll(limit=256, offset=None, with_payload={"exclude": ["thumbnail"]})
    idx.iter_records(batch=1000); idx.sample(20, seed=7)

    # zero-downtime rebuild (the server keeps serving the active version meanwhile)
    with idx.create_version(VersionMeta(fp, "sprc-demo", (32, 256), {"category": "keyword"})) as v:
        v.upsert(ids, tokens, payloads)
    idx.activate(v.version)                  # atomic; the server picks it up with idx.refresh()
    idx.rollback()
    h = idx.open_version("v000005", read_only=True)   # resume / verify a version (its lock)
    idx.update_version_meta("v000005", {"verified": True})
    [(i.version, i.active, i.ever_active, i.activated_at) for i in idx.versions()]

Filters: ``{"category": "bag", "price": {"gte": 10, "lt": 50}, "color": ["red", "blue"]}``
(equality, range, any-of; all must hold) on fields declared in ``VersionMeta.fields``.
Errors: see :mod:`retrieval.index.errors`.

Layout: :mod:`~retrieval.index.api` (types, constants, the ``SearchView`` / ``ReadView``
protocols), :mod:`~retrieval.index.gallery` (the one ``GalleryIndex``), the backends behind
:mod:`~retrieval.index.backend` (:mod:`~retrieval.index.edge`,
:mod:`~retrieval.index.qdrant_server`), :mod:`~retrieval.index.validate` (inputs),
:mod:`~retrieval.index.filters` (the filter dialect), :mod:`~retrieval.index.policy` (modes,
fast-L and oversampling), :mod:`~retrieval.index.process` (the search child process).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from retrieval.index.api import (
    AUTO_FAST_MIN_POINTS,
    CALIBRATION_KEY,
    DEFAULT_URI,
    FIELD_TYPES,
    ID_KEY,
    MAX_TOP_K,
    SEARCH_MODES,
    USER_ID_KEY,
    FieldType,
    Filter,
    Hit,
    Hits,
    PayloadSelector,
    ReadView,
    Record,
    SearchMode,
    SearchView,
    VersionInfo,
    VersionMeta,
)
from retrieval.index.errors import (
    GalleryIndexError,
    IndexInUseError,
    IndexNotFoundError,
    IndexUnavailableError,
    InvalidFilterError,
    InvalidQueryError,
    ModelMismatchError,
)
from retrieval.index.gallery import GalleryIndex, IndexView, VersionHandle
from retrieval.index.policy import tokens_dtype

if TYPE_CHECKING:
    from retrieval.index.backend import Backend

logger = logging.getLogger(__name__)


def parse_uri(uri: str) -> tuple[str, str]:
    """Split an index URI into ``(backend, location)``.

    ``edge:PATH`` -> ("edge", PATH); ``qdrant:URL`` -> ("qdrant", URL);
    ``local:PATH`` -> ("local", PATH); ``local::memory:`` -> ("local", ":memory:").
    A bare path (no scheme) means Edge. Raises ``GalleryIndexError`` on an unknown scheme.
    """
    scheme, sep, rest = uri.partition(":")
    if not sep or len(scheme) == 1:  # bare path (or a Windows drive letter)
        return "edge", uri
    if scheme in ("edge", "local", "qdrant"):
        if not rest:
            raise GalleryIndexError(f"index URI {uri!r} has no location after '{scheme}:'")
        return scheme, rest
    if scheme in ("http", "https"):
        return "qdrant", uri
    raise GalleryIndexError(
        f"unknown index URI scheme {scheme!r} in {uri!r}: use edge:PATH, qdrant:URL, "
        "local:PATH or local::memory:"
    )


def validate_filter(flt: Filter | None, fields: Mapping[str, FieldType]) -> None:
    """Check a filter against declared fields without touching an index (e.g. to answer
    INVALID_ARGUMENT early); raises ``InvalidFilterError`` exactly as ``search`` would."""
    from retrieval.index.filters import parse_filter

    parse_filter(flt, fields)


def open_index(
    uri: str = DEFAULT_URI,
    name: str = "gallery",
    *,
    encoder_fingerprint: str | None = None,
    preset: str | None = None,
    fields: Mapping[str, FieldType] | None = None,
    force: bool = False,
    read_only: bool = False,
    keep_versions: int = 3,
    api_key: str | None = None,
    shard_number: int | None = None,
    replication_factor: int | None = None,
    timeout: float = 30.0,
    options: Mapping[str, Any] | None = None,
) -> GalleryIndex:
    """Open the index ``name`` at ``uri``.

    ``encoder_fingerprint``: when given and the active version was built with another one,
    raise ``ModelMismatchError`` (unless ``force``); also recorded in versions auto-created by
    the first ``upsert`` (with ``preset`` and the declared ``fields``).
    ``read_only``: the server's mode; the name must have an active version
    (``IndexNotFoundError`` otherwise) and, on Edge, its shard is opened (and locked) at once,
    so a shard owned by another process raises ``IndexInUseError`` here. Otherwise the active
    shard is opened on first data call, so an indexer can build a new version while a server
    owns the active one.
    ``keep_versions``: old (inactive) versions kept after ``activate``.
    ``api_key``/``shard_number``/``replication_factor``/``timeout``: Qdrant server backend;
    when not given they come from ``CIR_INDEX_API_KEY``, ``CIR_INDEX_SHARD_NUMBER`` and
    ``CIR_INDEX_REPLICATION_FACTOR`` (so every command -- indexer, server, demo -- reaches a
    secured cluster the same way), else no key and 1 shard, 1 replica.
    ``options``: backend tuning (see docs/index.md), e.g. ``{"fast_recall": 0.99}``;
    ``tokens_dtype`` (``"float32"`` | ``"float16"``, else ``CIR_INDEX_TOKENS_DTYPE``): how new
    versions store the token originals.
    """
    backend, location = parse_uri(uri)
    options = dict(options or {})
    if "tokens_dtype" not in options and os.environ.get("CIR_INDEX_TOKENS_DTYPE"):
        options["tokens_dtype"] = os.environ["CIR_INDEX_TOKENS_DTYPE"]  # new versions' storage
    tokens_dtype(options)  # a wrong value fails here, not at the first build
    b: Backend
    if backend == "edge":
        from retrieval.index.edge import EdgeBackend

        b = EdgeBackend(location, name, options)
    else:
        from retrieval.index.qdrant_server import QdrantBackend

        env = os.environ
        b = QdrantBackend(
            location,
            name,
            uri=uri,
            local=backend == "local",
            api_key=api_key if api_key is not None else env.get("CIR_INDEX_API_KEY") or None,
            shard_number=shard_number or int(env.get("CIR_INDEX_SHARD_NUMBER", "1")),
            replication_factor=replication_factor
            or int(env.get("CIR_INDEX_REPLICATION_FACTOR", "1")),
            timeout=timeout,
            options=options,
        )
    return GalleryIndex(
        b,
        uri=uri,
        name=name,
        encoder_fingerprint=encoder_fingerprint,
        preset=preset,
        fields=dict(fields or {}),
        force=force,
        read_only=read_only,
        keep_versions=keep_versions,
        options=options,
    )


__all__ = [
    "AUTO_FAST_MIN_POINTS",
    "CALIBRATION_KEY",
    "DEFAULT_URI",
    "FIELD_TYPES",
    "ID_KEY",
    "USER_ID_KEY",
    "MAX_TOP_K",
    "SEARCH_MODES",
    "FieldType",
    "Filter",
    "GalleryIndex",
    "GalleryIndexError",
    "Hit",
    "Hits",
    "IndexInUseError",
    "IndexNotFoundError",
    "IndexUnavailableError",
    "IndexView",
    "InvalidFilterError",
    "InvalidQueryError",
    "ModelMismatchError",
    "PayloadSelector",
    "ReadView",
    "Record",
    "SearchMode",
    "SearchView",
    "VersionHandle",
    "VersionInfo",
    "VersionMeta",
    "open_index",
    "parse_uri",
    "validate_filter",
]
