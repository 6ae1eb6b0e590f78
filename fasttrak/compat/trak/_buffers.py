"""Rows filled in any order, on disk: what a TRAKer computes between its batches.

traker's ``featurize(batch, inds=...)`` writes rows at arbitrary indices, while fasttrak's
store takes whole row chunks (with their data fingerprint, checksums and a done mark). A
:class:`RowBuffer` bridges the two: one per (model, row chunk) for training rows, one per
(experiment, model) for targets; numpy memmaps in their own directory.

Crash consistency: a row's values are written and flushed before its done flag is set and
flushed, so a killed process leaves only rows that are either complete and flagged, or
unflagged (computed again). A buffer directory appears whole (made under a temporary name
and renamed into place) so two processes never see half of one. Once a chunk's rows are all
flagged, its buffer is published into the store and deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

from fasttrak.errors import StoreCorruptError

FILES = {"features": np.float32, "q": np.float32, "hashes": np.uint64, "done": np.uint8}


class RowBuffer:
    """``rows`` rows of features (rows, k) float32, Q (rows,), data hashes (rows,) uint64
    and done flags (rows,) uint8, as memmaps in ``path``."""

    def __init__(self, path: Path, rows: int, k: int) -> None:
        self.path, self.rows, self.k = path, rows, k
        arrays = {}
        for name, dtype in FILES.items():
            try:
                array = np.load(path / f"{name}.npy", mmap_mode="r+")
            except (OSError, ValueError) as error:
                raise StoreCorruptError(
                    f"the row buffer {path} is damaged ({name}: {error}); delete that directory "
                    "and featurize its rows again"
                ) from error
            shape = (rows, k) if name == "features" else (rows,)
            if array.shape != shape or array.dtype != dtype:
                raise StoreCorruptError(
                    f"the row buffer {path} holds {name} of shape {array.shape} {array.dtype}, "
                    f"expected {shape} {np.dtype(dtype)}: it was made by another run; delete "
                    "it (or use a new save_dir)"
                )
            arrays[name] = array
        self.features, self.q = arrays["features"], arrays["q"]
        self.hashes, self.done = arrays["hashes"], arrays["done"]

    @classmethod
    def open(cls, path: Path, rows: int, k: int, create: bool) -> RowBuffer | None:
        """The buffer at ``path``, made (atomically) when ``create`` and absent; None if
        absent and not ``create``."""
        if not path.exists():
            if not create:
                return None
            path.parent.mkdir(parents=True, exist_ok=True)
            staged = path.parent / f".{path.name}.{uuid.uuid4().hex}.staging"
            staged.mkdir()
            for name, dtype in FILES.items():
                shape = (rows, k) if name == "features" else (rows,)
                array = open_memmap(staged / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
                array.flush()
                del array
            (staged / "buffer.json").write_text(json.dumps({"rows": rows, "k": k}))
            try:
                os.rename(staged, path)
            except OSError:  # another process made it first
                shutil.rmtree(staged, ignore_errors=True)
        return cls(path, rows, k)

    def write(
        self, local: np.ndarray, features: np.ndarray, q: np.ndarray, hashes: np.ndarray
    ) -> None:
        """Write rows ``local`` (indices into this buffer), then flag them done."""
        self.features[local] = features
        self.q[local] = q
        self.hashes[local] = hashes
        self.features.flush()
        self.q.flush()
        self.hashes.flush()
        self.done[local] = 1
        self.done.flush()

    def missing(self) -> np.ndarray:
        """Indices of the rows not done yet."""
        return np.flatnonzero(np.asarray(self.done) == 0)

    def complete(self) -> bool:
        return bool(np.asarray(self.done).all())

    def close(self) -> None:
        for name in FILES:
            setattr(self, name, None)


def remove(path: Path) -> None:
    """Delete a buffer directory (renamed away first, so that nobody opens half of it)."""
    if not path.exists():
        return
    doomed = path.parent / f".{path.name}.{uuid.uuid4().hex}.deleting"
    try:
        os.rename(path, doomed)
    except OSError:
        return  # another process removed it
    shutil.rmtree(doomed, ignore_errors=True)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (created if absent) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_json_atomic(path: Path, value: object) -> None:
    staged = path.parent / f".{path.name}.{uuid.uuid4().hex}"
    staged.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(staged, path)
