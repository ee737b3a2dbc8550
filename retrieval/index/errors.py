"""Exceptions raised by the gallery index (the server maps them to gRPC status codes).

Mapping the server is expected to use:

=========================  ======================
exception                  gRPC code
=========================  ======================
``IndexNotFoundError``     NOT_FOUND
``IndexInUseError``        FAILED_PRECONDITION
``ModelMismatchError``     FAILED_PRECONDITION
``IndexUnavailableError``  UNAVAILABLE
``InvalidFilterError``     INVALID_ARGUMENT
``InvalidQueryError``      INVALID_ARGUMENT
``GalleryIndexError``      INTERNAL (anything else)
=========================  ======================
"""

from __future__ import annotations


class GalleryIndexError(Exception):
    """Base class of every error raised by :mod:`retrieval.index`."""


class IndexNotFoundError(GalleryIndexError):
    """The index name (or a version of it) does not exist at the URI."""


class IndexInUseError(GalleryIndexError):
    """An Edge shard is already opened by another process (Edge allows one opener per shard).

    ``pid`` is the owner's process id (``None`` when it could not be read).
    """

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid

    def __reduce__(self) -> tuple[type, tuple[str, int | None]]:  # keep pid across processes
        return (type(self), (str(self), self.pid))


class ModelMismatchError(GalleryIndexError):
    """The index was built by another encoder (fingerprint / preset / vector shape differ)."""


class IndexUnavailableError(GalleryIndexError):
    """The Qdrant server or cluster cannot be reached (or answered with a server-side failure)."""


class InvalidFilterError(GalleryIndexError, ValueError):
    """A malformed filter, or a filter on a field that was not declared filterable."""


class InvalidQueryError(GalleryIndexError, ValueError):
    """A malformed query or write: wrong vector shape/dtype, non-finite values, bad top_k/offset,
    unknown mode, mismatched ids/tokens/payloads lengths."""


__all__ = [
    "GalleryIndexError",
    "IndexInUseError",
    "IndexNotFoundError",
    "IndexUnavailableError",
    "InvalidFilterError",
    "InvalidQueryError",
    "ModelMismatchError",
]
