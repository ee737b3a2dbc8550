"""A gallery index served from a child process, for servers that must not share the GIL with it.

Qdrant Edge runs in-process and holds the GIL for the whole of a query (measured: a Python
thread next to a searching thread keeps 15 % of its speed). In ``cir serve`` that stalls the
model's thread, the event loop and the decoders for every search. :class:`ProcessIndex` opens
the index in a child process (``spawn``: no forked torch threads) and forwards the serving calls
over a few pipes, so searches run on their own interpreter and the parent's GIL stays free:

    idx = ProcessIndex("edge:data/index", "gallery", encoder_fingerprint=fp, read_only=True)
    idx.search(query, top_k=10)          # same calls, results and exceptions as open_index(...)
    idx.close()

The child owns the shard (its pid is the one an ``IndexInUseError`` names) and exits when the
parent closes the index or dies (its pipes close); it ignores SIGINT and SIGTERM, which a
terminal or a service manager sends to the whole process group while the server still drains.

Every way the child can be lost raises :class:`IndexUnavailableError` (the server's
UNAVAILABLE): a call in flight when it dies, and a restart that fails (the replacement killed
while it opens the index, or refused by the backend). The next call starts a new child, which
reopens the active version. The active version, its meta and its declared fields are kept in
this process (they change only through :meth:`ProcessIndex.refresh` or a restart), so reading
them costs no round trip and cannot fail.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.index.api import Filter, Hit, PayloadSelector, Record, SearchMode, VersionMeta
from retrieval.index.errors import GalleryIndexError, IndexUnavailableError

logger = logging.getLogger(__name__)

#: Calls the child answers (anything else is refused: the proxy is not a general RPC).
_ALLOWED = frozenset(
    {
        "search",
        "search_batch",
        "get",
        "find_by_user_id",
        "count",
        "declared_fields",
        "iter_records",
        "scroll",
        "sample",
        "describe",
        "refresh",
        "active_version",
        "meta",
        "backend",
        "versions",
        "set_fast_calibration",
    }
)


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a GalleryIndexError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return GalleryIndexError(f"{type(exc).__name__}: {exc}")


def _serve(index: Any, conn: Connection) -> None:
    """One connection's loop in the child: (op, name, args, kwargs) -> (ok, value)."""
    while True:
        try:
            op, name, args, kwargs = conn.recv()
        except (EOFError, OSError):
            return  # the parent closed the index or died
        try:
            if name not in _ALLOWED:
                raise GalleryIndexError(f"{name!r} is not served by the search process")
            value = getattr(index, name)
            if op == "call":
                value = value(*args, **kwargs)
            elif op == "list":  # generators cannot cross the pipe
                value = list(value(*args, **kwargs))
            reply: tuple[bool, Any] = (True, value)
        except BaseException as exc:  # noqa: BLE001 -- every failure goes back to the caller
            reply = (False, _portable(exc))
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return
        except Exception as exc:  # an unpicklable result
            conn.send((False, GalleryIndexError(f"cannot send the result of {name}: {exc}")))


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The exit code, or None if ``proc`` still runs after ``timeout`` seconds."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def _child_main(fds: list[int]) -> None:
    """The search process: open the index named on the first connection, serve every one."""
    # A terminal's Ctrl-C and systemd's stop signal the whole process group; the server drains
    # in-flight requests on them and needs its searches until then. This process ends when
    # its parent closes the pipes (or dies).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conns = [Connection(fd) for fd in fds]
    try:
        uri, name, kwargs, log_level = conns[0].recv()
    except (EOFError, OSError):
        return
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from retrieval.index import open_index

    try:
        index = open_index(uri, name, **kwargs)
    except BaseException as exc:  # noqa: BLE001 -- reported to the parent, which raises it
        conns[0].send((False, _portable(exc)))
        return
    conns[0].send((True, None))
    threads = [
        threading.Thread(target=_serve, args=(index, c), name=f"cir-search-{i}", daemon=True)
        for i, c in enumerate(conns)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    index.close()


class ProcessIndex:
    """The serving part of a :class:`~retrieval.index.api.GalleryIndex`, run in a child process.

    ``uri``, ``name`` and ``open_kwargs`` are :func:`retrieval.index.open_index`'s; opening
    errors (``IndexNotFoundError``, ``ModelMismatchError``, ``IndexInUseError``...) are raised
    here as they would be in-process. ``connections``: calls that can run at once (the
    server's io pool size).
    """

    def __init__(
        self, uri: str, name: str = "gallery", *, connections: int = 4, **open_kwargs: Any
    ) -> None:
        self._uri = uri
        self._name = name
        self._kwargs = dict(open_kwargs)
        self._n = max(1, int(connections))
        self._lock = threading.Lock()  # guards (re)starts and close
        self._closed = False
        self._free: queue.SimpleQueue[Connection] = queue.SimpleQueue()
        self._conns: list[Connection] = []
        self._proc: Any = None
        self._generation = 0
        # the child's version facts (active_version, meta, declared_fields), kept until a
        # refresh switches versions or a new child starts (which replace the whole dict: a
        # value fetched across the change lands in the old one)
        self._facts: dict[str, Any] = {}
        self.restarts = 0
        self._start()

    # ------------------------------------------------------------------ child lifecycle
    def _start(self) -> None:
        # a plain subprocess over socket pairs, not multiprocessing: spawn would re-import the
        # caller's __main__ (scripts without a main guard break), fork would copy torch and
        # gRPC threads
        pairs = [socket.socketpair() for _ in range(self._n)]
        fds = [child.fileno() for _, child in pairs]
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the folder holding `retrieval`
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "retrieval.index.process", *map(str, fds)],
                pass_fds=fds,
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:  # out of processes / file descriptors
            for a, b in pairs:
                a.close()
                b.close()
            raise IndexUnavailableError(f"cannot start the search process: {exc}") from exc
        for _, child in pairs:
            child.close()  # the child's ends live in the child only: EOF when it dies
        conns = [Connection(parent.detach()) for parent, _ in pairs]
        version: Any = None
        try:
            conns[0].send(
                (self._uri, self._name, self._kwargs, logging.getLogger().getEffectiveLevel())
            )
            ok, value = conns[0].recv()
            if ok:  # what it opened (a restart may find a newer version than the last child's)
                conns[0].send(("attr", "active_version", (), {}))
                ok, version = conns[0].recv()
                if not ok:
                    ok, value = False, version
        except (EOFError, OSError):
            for c in conns:
                c.close()
            code = _wait(proc, 5)
            raise IndexUnavailableError(
                f"the search process for index {self._name!r} at {self._uri} exited while "
                f"opening it (exit code {code})"
            ) from None
        if not ok:
            for c in conns:
                c.close()
            _wait(proc, 10)
            raise value
        free: queue.SimpleQueue[Connection] = queue.SimpleQueue()
        for c in conns:
            free.put(c)
        self._proc, self._conns, self._free = proc, conns, free
        self._generation += 1
        self._set_facts({"active_version": version})
        logger.info("index %r served by search process pid %d", self._name, proc.pid)

    def _stop_child(self, wait: float = 30.0) -> None:
        for c in self._conns:
            c.close()  # EOF in every serving thread: the child closes the index and exits
        if self._proc is not None and _wait(self._proc, wait) is None:
            logger.warning("search process pid %d did not exit; killing it", self._proc.pid)
            self._proc.kill()
            _wait(self._proc, 5)
        self._conns = []

    @property
    def pid(self) -> int | None:
        """The child's process id (the shard's owner)."""
        return None if self._proc is None else int(self._proc.pid)

    def _set_facts(self, facts: dict[str, Any]) -> None:
        self._facts = dict(facts)

    def _fact(self, name: str) -> Any:
        """A version fact of the child, fetched once per version."""
        facts = self._facts
        if name in facts:
            return facts[name]
        value = self._call("attr" if name != "declared_fields" else "call", name)
        facts[name] = value
        return value

    def _ensure_child(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        with self._lock:
            if self._closed:
                raise GalleryIndexError("the index is closed")
            if self._proc is not None and self._proc.poll() is None:
                return
            code = None if self._proc is None else self._proc.returncode
            logger.error("search process exited (code %s); starting a new one", code)
            self._stop_child(wait=1.0)
            try:
                self._start()
            except IndexUnavailableError:
                raise
            except GalleryIndexError as exc:  # e.g. the dead child's shard not released yet
                raise IndexUnavailableError(
                    f"the search process of index {self._name!r} could not be restarted: {exc}"
                ) from exc
            self.restarts += 1

    # ------------------------------------------------------------------ calls
    def _call(self, op: str, name: str, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise GalleryIndexError("the index is closed")
        while True:
            self._ensure_child()
            generation, free = self._generation, self._free
            try:
                conn = free.get(timeout=1.0)
                break
            except queue.Empty:  # every connection busy, or a restart replaced them
                continue
        try:
            conn.send((op, name, args, kwargs))
            ok, value = conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            code = None if self._proc is None else _wait(self._proc, 0.5)
            raise IndexUnavailableError(
                f"the search process of index {self._name!r} died (exit code {code}); "
                "it is restarted on the next call"
            ) from None
        finally:
            if generation == self._generation:
                self._free.put(conn)
        if not ok:
            raise value
        return value

    def search(
        self,
        query: np.ndarray,
        top_k: int = 10,
        offset: int = 0,
        filter: Filter | None = None,
        mode: SearchMode = "auto",
    ) -> list[Hit]:
        hits: list[Hit] = self._call(
            "call", "search", np.asarray(query), top_k, offset, filter, mode
        )
        return hits

    def search_batch(
        self,
        queries: np.ndarray,
        top_k: int = 10,
        offset: int = 0,
        filter: Filter | None = None,
        mode: SearchMode = "auto",
    ) -> list[list[Hit]]:
        q = np.asarray(queries)
        hits: list[list[Hit]] = self._call("call", "search_batch", q, top_k, offset, filter, mode)
        return hits

    def get(
        self, ids: Sequence[str], with_vectors: bool = False, with_payload: PayloadSelector = True
    ) -> list[Record]:
        recs: list[Record] = self._call("call", "get", list(ids), with_vectors, with_payload)
        return recs

    def find_by_user_id(
        self, user_id: str, limit: int = 2, with_payload: PayloadSelector = True
    ) -> list[Record]:
        recs: list[Record] = self._call("call", "find_by_user_id", user_id, limit, with_payload)
        return recs

    def count(self, filter: Filter | None = None) -> int:
        return int(self._call("call", "count", filter))

    def declared_fields(self) -> dict[str, Any]:
        return dict(self._fact("declared_fields"))

    def iter_records(self, **kwargs: Any) -> list[Record]:
        """Every record, as one list (the child materialises the iterator)."""
        recs: list[Record] = self._call("list", "iter_records", **kwargs)
        return recs

    def scroll(self, *args: Any, **kwargs: Any) -> tuple[list[Record], str | None]:
        page: tuple[list[Record], str | None] = self._call("call", "scroll", *args, **kwargs)
        return page

    def sample(self, *args: Any, **kwargs: Any) -> list[Record]:
        recs: list[Record] = self._call("call", "sample", *args, **kwargs)
        return recs

    def describe(self) -> dict[str, Any]:
        return dict(self._call("call", "describe"))

    def versions(self) -> list[Any]:
        return list(self._call("call", "versions"))

    def refresh(self) -> bool:
        """Switch the child to a newly activated version (see ``GalleryIndex.refresh``)."""
        changed = bool(self._call("call", "refresh"))
        if changed:
            self._set_facts({"active_version": self._call("attr", "active_version")})
        elif "meta" in self._facts:  # the child may have re-read a changed calibration
            facts = self._facts
            meta = self._call("attr", "meta")
            if meta != facts.get("meta"):
                facts["meta"] = meta
        return changed

    def set_fast_calibration(self, version: str, calibration: Any) -> VersionMeta:
        """Forwarded (see ``EdgeGalleryIndex.set_fast_calibration``); the kept meta follows."""
        meta: VersionMeta = self._call("call", "set_fast_calibration", version, calibration)
        facts = self._facts
        if facts.get("active_version") == version:
            facts["meta"] = meta
        return meta

    @property
    def active_version(self) -> str | None:
        """The version the child serves (kept here: no round trip)."""
        version: str | None = self._fact("active_version")
        return version

    @property
    def meta(self) -> VersionMeta | None:
        meta: VersionMeta | None = self._fact("meta")
        return meta

    @property
    def name(self) -> str:
        return self._name

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def backend(self) -> str:
        return str(self._call("attr", "backend"))

    @property
    def read_only(self) -> bool:
        return bool(self._kwargs.get("read_only", False))

    def close(self) -> None:
        """Stop the child (it closes the index); idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop_child()

    def __enter__(self) -> ProcessIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ProcessIndex({self._uri!r}, {self._name!r}, pid={self.pid})"


__all__ = ["ProcessIndex"]

if __name__ == "__main__":
    _child_main([int(a) for a in sys.argv[1:]])
