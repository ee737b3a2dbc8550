"""On-disk version catalog for Edge indexes: version directories, an atomically replaced pointer
and per-version owner locks.

Layout under ``ROOT/<name>/``::

    CURRENT                    {"active": "v000003", "history": ["v000002", "v000001"]}
    .catalog.lock              flock()ed around read-modify-writes of CURRENT / meta.json
    versions/v000003/meta.json VersionMeta + created (+ activated_at once first activated)
    versions/v000003/shard/    the Edge shard
    versions/v000003/owner.lock  flock()ed by the process that has the shard open; holds its pid

``CURRENT`` is written to a temp file, fsynced and ``os.replace``d, so readers see the old or the
new pointer, never a torn one. Read-modify-writes of ``CURRENT`` and ``meta.json`` (activate,
rollback history, ``activated_at``, ``update_version_meta``) hold ``.catalog.lock`` (a blocking
flock) so two processes cannot lose each other's update. The flock is released by the kernel when the owner dies, so a
crashed owner never blocks the next opener.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.index.api import VersionMeta
from retrieval.index.errors import GalleryIndexError, IndexInUseError, IndexNotFoundError

logger = logging.getLogger(__name__)

VERSION_RE = re.compile(r"^v\d{6}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise GalleryIndexError(
            f"bad index name {name!r}: use letters, digits, '_', '-', '.' (max 128)"
        )
    return name


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class OwnerLock:
    """An exclusive, non-blocking flock on ``owner.lock`` with the owner's pid written in it."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = read_lock_pid(self.path)
            os.close(fd)
            who = f"process {pid}" if pid is not None else "another process"
            mine = " (this process: close the other handle first)" if pid == os.getpid() else ""
            raise IndexInUseError(
                f"{self.what} is in use by {who}{mine}: an Edge shard has one opener at a time. "
                "Stop that process, or build a new version and activate it instead of writing "
                "into the one being served.",
                pid=pid,
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def read_lock_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def is_locked(path: Path) -> bool:
    """Whether some open file description holds the flock (probe without keeping it)."""
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


@dataclass
class Pointer:
    active: str | None
    history: list[str]  # previously active versions, most recent first


class Catalog:
    """Versions of one Edge index name under ``root/name``."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = check_name(name)
        self.dir = Path(root) / name
        self.versions_dir = self.dir / "versions"
        self.pointer_path = self.dir / "CURRENT"
        self._local = threading.RLock()
        self._depth = 0

    def exists(self) -> bool:
        return self.pointer_path.exists()

    def read_pointer(self) -> Pointer:
        try:
            data = json.loads(self.pointer_path.read_text())
        except FileNotFoundError:
            return Pointer(None, [])
        except (OSError, ValueError) as exc:
            raise GalleryIndexError(f"corrupt index pointer {self.pointer_path}: {exc}") from exc
        return Pointer(data.get("active"), list(data.get("history", [])))

    def write_pointer(self, ptr: Pointer) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.pointer_path, {"active": ptr.active, "history": ptr.history})

    def version_dir(self, version: str) -> Path:
        if not VERSION_RE.match(version):
            raise IndexNotFoundError(f"bad version id {version!r} (expected like 'v000001')")
        return self.versions_dir / version

    def list_versions(self) -> list[str]:
        if not self.versions_dir.exists():
            return []
        return sorted(
            p.name
            for p in self.versions_dir.iterdir()
            if VERSION_RE.match(p.name) and (p / "meta.json").exists()
        )

    @contextmanager
    def mutex(self) -> Iterator[None]:
        """Serialise read-modify-write of ``CURRENT`` and ``meta.json`` files between processes
        (a blocking flock on ``.catalog.lock``; held for milliseconds, never while building)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._local:  # flock is per open file: threads of one process need their own lock
            if self._depth:  # re-entered by the same thread: the flock is already held
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            fd = os.open(self.dir / ".catalog.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._depth = 1
                yield
            finally:
                self._depth = 0
                os.close(fd)  # drops the flock

    def _read_data(self, version: str) -> dict[str, Any]:
        path = self.version_dir(version) / "meta.json"
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            raise IndexNotFoundError(
                f"version {version} of index {self.name!r} does not exist under {self.dir}"
            ) from None
        return data

    def read_meta(self, version: str) -> tuple[VersionMeta, float]:
        data = self._read_data(version)
        return VersionMeta.from_json(data["meta"]), float(data.get("created", 0.0))

    def read_activated(self, version: str) -> float | None:
        """First activation time recorded in ``meta.json`` (None: never, or before it was kept)."""
        t = self._read_data(version).get("activated_at")
        return float(t) if t is not None else None

    def mark_activated(self, version: str) -> None:
        """Record the first activation time (kept on later activations). Caller holds mutex."""
        data = self._read_data(version)
        if data.get("activated_at") is None:
            data["activated_at"] = time.time()
            write_json_atomic(self.version_dir(version) / "meta.json", data)

    def write_meta(self, version: str, meta: VersionMeta) -> None:
        """Replace the version's metadata (the caller holds :meth:`mutex` around its
        read-modify-write; created / activated_at are kept)."""
        with self.mutex():
            data = self._read_data(version)
            data["meta"] = meta.to_json()
            write_json_atomic(self.version_dir(version) / "meta.json", data)

    def new_version(self, meta: VersionMeta) -> str:
        """Reserve the next version id (mkdir is atomic, so racing creators get distinct ids)."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        existing = [
            int(p.name[1:]) for p in self.versions_dir.iterdir() if VERSION_RE.match(p.name)
        ]
        n = max(existing, default=0) + 1
        while True:
            version = f"v{n:06d}"
            try:
                os.mkdir(self.versions_dir / version)
                break
            except FileExistsError:
                n += 1
        vdir = self.versions_dir / version
        # meta.json last: a directory without it is an unfinished create and is not listed
        write_json_atomic(vdir / "meta.json", {"meta": meta.to_json(), "created": time.time()})
        return version

    def lock(self, version: str) -> OwnerLock:
        return OwnerLock(
            self.version_dir(version) / "owner.lock", f"index {self.name!r} version {version}"
        )

    def remove(self, version: str) -> None:
        """Delete a version directory (caller holds its lock)."""
        vdir = self.version_dir(version)
        # rename first so a half-deleted directory is never listed as a version
        trash = self.dir / f".trash-{version}-{os.getpid()}-{time.time_ns()}"
        os.replace(vdir, trash)
        shutil.rmtree(trash, ignore_errors=True)
