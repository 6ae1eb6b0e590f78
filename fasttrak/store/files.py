"""The store's file layer: atomic writes, exclusive creation, atomic publishing, locks.

Every mutation of a store goes through one of these operations, each of which leaves the
store either as it was or with the whole change, whenever the process dies:

- ``write``: replace a file (written beside it under a temporary name, then renamed);
- ``create``: create a file only if it does not exist (temporary name, then a hard link,
  which fails if the name is taken): the primitive behind every write-once record;
- ``publish``: move a finished directory to its final name, only if that name is free;
- ``lock``: a POSIX ``flock`` on a lock file, shared or exclusive, released by the kernel
  when its process dies, so a killed worker never leaves a claim behind.

Keys are ``/``-separated paths relative to the store's root. :class:`DirectoryFiles` works
on a local disk or a shared POSIX filesystem (NFS); :class:`MemoryFiles` backs
``store=None``. Each physical step is its own method (``_stage``, ``_link``, ...), so the
fault-injection tests can stop the process after any one of them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any, Protocol

import zarr
import zarr.abc.store
from zarr.core.buffer import default_buffer_prototype

from fasttrak.errors import FastTrakError, ReadOnlyStoreError, StoreError

STAGING = "records/staging"
"""Where files and directories are prepared before they are linked or moved into place."""


class TargetExistsError(StoreError, FileExistsError):
    """A publish or exclusive rename found its target taken (caught inside the store)."""


class Lock(Protocol):
    def release(self) -> None: ...


class Files(Protocol):
    """What the store needs from storage; see the module docstring for the guarantees."""

    writable: bool

    def zarr_store(self, prefix: str) -> zarr.abc.store.Store: ...
    def read(self, key: str) -> bytes | None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def write(self, key: str, data: bytes) -> None: ...
    def create(self, key: str, data: bytes) -> bool: ...
    def delete(self, key: str) -> None: ...
    def delete_tree(self, prefix: str) -> None: ...
    def staging_dir(self) -> str: ...
    def publish(self, staged: str, key: str) -> bool: ...
    def lock(self, key: str, *, shared: bool = False, wait: bool = False) -> Lock | None: ...


# ---------------------------------------------------------------- a directory
class _FlockLock:
    """A held ``flock`` on an open lock file; the kernel drops it if the process dies."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __del__(self) -> None:
        self.release()


@contextlib.contextmanager
def os_errors(what: str) -> Iterator[None]:
    """Turn an OS error inside the block (e.g. zarr writing a chunk on a full disk) into a
    StoreError that says what was being written."""
    try:
        yield
    except FastTrakError:
        raise
    except OSError as error:
        raise StoreError(
            f"writing {what} failed: {error}; check the free space and permissions of that "
            "filesystem"
        ) from error


def _store_errors(method: Callable) -> Callable:
    """Turn an OS error of a store operation (disk full, permissions, ...) into a
    StoreError that names the file and the store."""

    @functools.wraps(method)
    def wrapper(self: DirectoryFiles, key: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, key, *args, **kwargs)
        except FastTrakError:
            raise
        except OSError as error:
            raise StoreError(
                f"{method.__name__} {key!r} in the store at {self.root} failed: {error}; "
                "check the free space and permissions of that filesystem"
            ) from error

    return wrapper


class DirectoryFiles:
    """A store directory on a POSIX filesystem (local disk or NFS)."""

    def __init__(self, root: Path, staging: str = STAGING) -> None:
        self.root = Path(root)
        self.staging = staging
        self.writable = os.access(self.root, os.W_OK)

    def path(self, key: str) -> Path:
        return self.root / key

    def zarr_store(self, prefix: str) -> zarr.abc.store.Store:
        """A zarr store rooted at ``prefix`` (an array lives at the root of its own store,
        so that zarr never writes group metadata above it)."""
        return zarr.storage.LocalStore(self.path(prefix), read_only=not self.writable)

    # -------------------------------------------------------------- reading
    def read(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except IsADirectoryError:
            return None

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def list(self, prefix: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(prefix)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    # -------------------------------------------------------------- writing
    @_store_errors
    def write(self, key: str, data: bytes) -> None:
        """Replace ``key`` atomically."""
        staged = self._stage(data)
        self._replace(staged, self.path(key))

    @_store_errors
    def create(self, key: str, data: bytes) -> bool:
        """Create ``key`` atomically unless it exists; False if it did (nothing written)."""
        staged = self._stage(data)
        try:
            return self._link(staged, self.path(key))
        finally:
            self._unlink(staged)

    @_store_errors
    def delete(self, key: str) -> None:
        self._check_writable()
        with contextlib.suppress(FileNotFoundError):
            self._unlink(self.path(key))

    @_store_errors
    def delete_tree(self, prefix: str) -> None:
        """Remove a directory: first renamed out of the way (one atomic step that takes it
        out of the store: into staging, or beside itself when staging lies inside it), then
        deleted."""
        source = self.path(prefix)
        if not source.exists():
            return
        self._check_writable()
        if not source.is_dir():
            self._unlink(source)
            return
        inside = prefix == self.staging or self.staging.startswith(prefix.rstrip("/") + "/")
        if inside:
            trash = source.with_name(
                f".{source.name}.deleting-{_process_tag()}-{uuid.uuid4().hex[:8]}"
            )
        else:
            trash = self.path(self.staging_dir())
        try:
            self._rename(source, trash)
        except FileNotFoundError:  # another process removed it first
            return
        self._rmtree(trash)

    def staging_dir(self) -> str:
        """A fresh, empty staging directory (its name identifies this process)."""
        self._check_writable()
        key = f"{self.staging}/{_process_tag()}-{uuid.uuid4().hex[:12]}"
        self._mkdir(self.path(key))
        return key

    @_store_errors
    def publish(self, staged: str, key: str) -> bool:
        """Move the staged directory to ``key`` if that name is free; False (and the staged
        directory removed) if another writer published there first."""
        target = self.path(key)
        self._mkdir(target.parent)
        try:
            self._rename(self.path(staged), target, exclusive=True)
            return True
        except FileExistsError:
            self._rmtree(self.path(staged))
            return False

    @_store_errors
    def lock(self, key: str, *, shared: bool = False, wait: bool = False) -> Lock | None:
        """Hold a flock on ``key`` (created if needed); None if another process holds a
        conflicting lock and ``wait`` is False. A read-only store has nothing to lock."""
        import fcntl  # POSIX only; imported here so the module imports everywhere

        self._check_writable()
        path = self.path(key)
        self._mkdir(path.parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise StoreError(
                    f"the filesystem of {self.root} does not support file locks ({error}); "
                    "fasttrak needs them for concurrent writers: use a local disk, or mount "
                    "the shared filesystem with locking enabled (e.g. Lustre's -o flock)"
                ) from error
            raise
        return _FlockLock(fd)

    # -------------------------------------------------------------- physical steps
    # One method per step that changes the disk, so that tests can stop after each.
    def _stage(self, data: bytes) -> Path:
        self._check_writable()
        path = self.path(f"{self.staging}/{_process_tag()}-{uuid.uuid4().hex[:12]}.tmp")
        self._mkdir(path.parent)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def _link(self, source: Path, target: Path) -> bool:
        self._mkdir(target.parent)
        try:
            os.link(source, target)
        except FileExistsError:
            return False
        return True

    def _replace(self, source: Path, target: Path) -> None:
        self._mkdir(target.parent)
        os.replace(source, target)

    def _rename(self, source: Path, target: Path, exclusive: bool = False) -> None:
        if exclusive and target.exists():
            raise TargetExistsError(target)
        try:
            os.rename(source, target)  # a non-empty directory at target is never replaced
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise TargetExistsError(target) from error
            raise

    def _unlink(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def _rmtree(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def _mkdir(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)

    def _check_writable(self) -> None:
        if not self.writable:
            raise ReadOnlyStoreError(
                f"the store at {self.root} is read-only for this process; scoring works on a "
                "read-only store, but featurizing, repairing or caching needs write access"
            )


# ---------------------------------------------------------------- memory
class _PrefixView(MutableMapping[str, Any]):
    """The entries of a dict under ``prefix/``, with the prefix taken off their keys."""

    def __init__(self, data: dict[str, Any], prefix: str) -> None:
        self._data, self._prefix = data, prefix.rstrip("/") + "/"

    def __getitem__(self, key: str) -> Any:
        return self._data[self._prefix + key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._data[self._prefix + key] = value

    def __delitem__(self, key: str) -> None:
        del self._data[self._prefix + key]

    def __iter__(self) -> Iterator[str]:
        n = len(self._prefix)
        return iter([key[n:] for key in self._data if key.startswith(self._prefix)])

    def __len__(self) -> int:
        return sum(1 for key in self._data if key.startswith(self._prefix))


class _NoLock:
    def release(self) -> None:
        pass


class MemoryFiles:
    """An in-memory store (``store=None``): one process, nothing survives it. Records and
    zarr arrays share one dict of zarr buffers."""

    writable = True

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}
        self._mutex = threading.Lock()
        self._counter = 0

    def zarr_store(self, prefix: str) -> zarr.abc.store.Store:
        return zarr.storage.MemoryStore(_PrefixView(self._data, prefix))

    def read(self, key: str) -> bytes | None:
        buffer = self._data.get(key)
        return None if buffer is None else buffer.to_bytes()

    def exists(self, key: str) -> bool:
        return key in self._data or bool(self.list(key))

    def list(self, prefix: str) -> list[str]:
        start = prefix.rstrip("/") + "/"
        return sorted({k[len(start) :].split("/", 1)[0] for k in self._data if k.startswith(start)})

    def write(self, key: str, data: bytes) -> None:
        self._data[key] = default_buffer_prototype().buffer.from_bytes(data)

    def create(self, key: str, data: bytes) -> bool:
        with self._mutex:
            if key in self._data:
                return False
            self.write(key, data)
            return True

    def delete(self, key: str) -> None:
        self._data.pop(key, None)

    def delete_tree(self, prefix: str) -> None:
        start = prefix.rstrip("/") + "/"
        for key in [k for k in self._data if k.startswith(start)]:
            del self._data[key]

    def staging_dir(self) -> str:
        with self._mutex:
            self._counter += 1
            return f"{STAGING}/memory-{self._counter}"

    def publish(self, staged: str, key: str) -> bool:
        with self._mutex:
            if self.list(key):
                self.delete_tree(staged)
                return False
            start = staged.rstrip("/") + "/"
            for old in [k for k in self._data if k.startswith(start)]:
                self._data[f"{key}/{old[len(start) :]}"] = self._data.pop(old)
            return True

    def lock(self, key: str, *, shared: bool = False, wait: bool = False) -> Lock | None:
        return _NoLock()


# ---------------------------------------------------------------- helpers
def _process_tag() -> str:
    """``host-pid``: names staging entries so that leftovers of dead processes can be told
    from those of live ones."""
    return f"{socket.gethostname()}-{os.getpid()}"


def stale_staging(files: Files) -> list[str]:
    """Staging entries left by processes of this host that are no longer running."""
    host = socket.gethostname()
    stale = []
    for name in files.list(STAGING):
        if not name.startswith(host + "-"):
            continue
        try:
            pid = int(name[len(host) + 1 :].split("-", 1)[0])
        except ValueError:
            continue
        if not _alive(pid):
            stale.append(f"{STAGING}/{name}")
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_files(location: str | Path | None) -> Files:
    """The file layer for a store location (a directory path), or memory for None."""
    if location is None:
        return MemoryFiles()
    return DirectoryFiles(Path(location))


@contextlib.contextmanager
def held(lock: Lock | None) -> Iterator[Lock | None]:
    """Release ``lock`` (if any) when the block ends."""
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
