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
this process (they change only through :meth:`ProcessIndex.refresh` or a restart, which fetch
them in the same round trip), so reading them costs no round trip and cannot fail.

A search is one round trip, and its :class:`~retrieval.index.api.Hits` carry the version the
child searched (and the mode it ran): a refresh swapping versions meanwhile cannot make the
reported version another one's. ProcessIndex implements
:class:`~retrieval.index.api.SearchView` (what the server types its index as); the reads are
forwarded as they are (:func:`_forward`), the version facts are kept here.
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
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from retrieval.index.api import Hits, Record, SearchView, VersionInfo, VersionMeta
from retrieval.index.errors import GalleryIndexError, IndexUnavailableError

logger = logging.getLogger(__name__)

#: Calls the child answers (anything else is refused: the proxy is not a general RPC).
#: ``facts`` is the child's own: the version facts kept by the parent, in one round trip.
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
        "facts",
    }
)


def _facts(index: Any) -> dict[str, Any]:
    """What the parent keeps of the served version (read in the child, one round trip)."""
    return {
        "active_version": index.active_version,
        "meta": index.meta,
        "declared_fields": dict(index.declared_fields()),
        "backend": index.backend,
    }


def _refresh(index: Any) -> tuple[bool, dict[str, Any]]:
    """``refresh()`` and the facts it leaves, in one round trip."""
    changed = bool(index.refresh())
    return changed, _facts(index)


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
            value: Any
            if op == "facts":
                value = _facts(index)
            elif op == "refresh":
                value = _refresh(index)
            else:
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


def _forward(name: str, op: str = "call") -> Any:
    """A method that runs ``index.<name>(*args, **kwargs)`` in the child (one round trip)."""

    def method(self: ProcessIndex, *args: Any, **kwargs: Any) -> Any:
        return self._call(op, name, *args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"``GalleryIndex.{name}``, run in the search process."
    return method


class ProcessIndex:
    """The serving part of a :class:`~retrieval.index.gallery.GalleryIndex`, run in a child process.

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
        facts: Any = None
        try:
            conns[0].send(
                (self._uri, self._name, self._kwargs, logging.getLogger().getEffectiveLevel())
            )
            ok, value = conns[0].recv()
            if ok:  # what it opened (a restart may find a newer version than the last child's)
                conns[0].send(("facts", "facts", (), {}))
                ok, facts = conns[0].recv()
                if not ok:
                    ok, value = False, facts
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
        self._set_facts(facts)
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
        """A version fact of the child (fetched with the version: no round trip)."""
        return self._facts[name]

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

    # the reads, forwarded as they are (same arguments, results and exceptions as in-process)
    search: Callable[..., Hits] = _forward("search")
    search_batch: Callable[..., list[Hits]] = _forward("search_batch")
    get: Callable[..., list[Record]] = _forward("get")
    find_by_user_id: Callable[..., list[Record]] = _forward("find_by_user_id")
    count: Callable[..., int] = _forward("count")
    scroll: Callable[..., tuple[list[Record], str | None]] = _forward("scroll")
    sample: Callable[..., list[Record]] = _forward("sample")
    describe: Callable[..., dict[str, Any]] = _forward("describe")
    versions: Callable[..., list[VersionInfo]] = _forward("versions")
    #: Every record, as one list (generators cannot cross the pipe: the child materialises it).
    iter_records: Callable[..., list[Record]] = _forward("iter_records", "list")

    def declared_fields(self) -> dict[str, Any]:
        return dict(self._fact("declared_fields"))

    def refresh(self) -> bool:
        """Switch the child to a newly activated version (see ``GalleryIndex.refresh``); the
        facts it leaves (a new version, or a calibration the child re-read) come back with it."""
        changed, facts = self._call("refresh", "refresh")
        self._set_facts(facts)
        return bool(changed)

    def set_fast_calibration(
        self, version: str, calibration: Mapping[str, Any] | None
    ) -> VersionMeta:
        """Forwarded (see ``GalleryIndex.set_fast_calibration``); the kept meta follows."""
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
    def options(self) -> dict[str, Any]:
        """The search options the child's index was opened with."""
        return dict(self._kwargs.get("options") or {})

    @property
    def name(self) -> str:
        return self._name

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def backend(self) -> str:
        return str(self._fact("backend"))

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


def _implements_search_view(index: ProcessIndex) -> SearchView:  # checked by mypy
    return index


__all__ = ["ProcessIndex"]

if __name__ == "__main__":
    _child_main([int(a) for a in sys.argv[1:]])
