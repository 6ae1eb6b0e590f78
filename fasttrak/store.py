"""The store: a zarr group holding features, out-to-loss weights, done marks and kernels.

Layout (one group per checkpoint index m)::

    /                        attrs["fasttrak"] = run metadata (format version, task,
                             projector, seed, k, parameter names and shapes, n, ...)
    /checkpoints/{m}/        attrs: checkpoint fingerprint
        features  (n, k)     float32 (or float16), chunked by ``chunk_rows`` rows
        q         (n,)       float32 out-to-loss weights
        done      (n_chunks,) uint8, one zarr chunk per mark, set after a chunk is written
        gram      (k, k)     float64 Φᵀ Φ, written by finalize (gram_gauss_newton: Φᵀ R Φ)
        factor    (B, m, m)  float64 Cholesky factors of the B diagonal blocks of Φᵀ Φ + λ I
                             (m ≈ k/B; B = 1: the full kernel); attrs: ridge settings and
                             layout (a factor without layout="blocks" is an old (k, k) one:
                             rebuilt from the gram, never used)

The store never holds models or pickles: arrays and JSON only. Reopening it with settings
that differ from the run that made it raises :class:`StoreMismatchError`; finished chunks
are never rewritten unless the caller deletes a checkpoint explicitly (``overwrite=True``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from fasttrak.errors import CheckpointMismatchError, StoreMismatchError

FORMAT_VERSION = 1
FEATURE_DTYPES = ("float32", "float16")
FACTOR_LAYOUT = "blocks"
"""Layout of the cached kernel factor: (B, m, m), one padded Cholesky factor per kernel block
(:func:`fasttrak.kernel.block_diagonal_factor`)."""


def open_group(location: str | Path | None) -> zarr.Group:
    """A zarr group on disk at ``location``, or in memory when ``location`` is None."""
    if location is None:
        return zarr.open_group(zarr.storage.MemoryStore(), mode="a")
    return zarr.open_group(str(location), mode="a")


@dataclass
class Store:
    """A run's store. ``meta`` is the run identity checked on every reopen."""

    root: zarr.Group
    location: str | None

    @classmethod
    def open(cls, location: str | Path | None, meta: dict[str, Any]) -> Store:
        """Open (or create) the store and check that it was made by the same kind of run."""
        root = open_group(location)
        stored = root.attrs.get("fasttrak")
        if stored is None:
            if any(True for _ in root.keys()):
                raise StoreMismatchError(
                    f"{location} holds data that is not a fasttrak store; choose an empty path"
                )
            root.attrs["fasttrak"] = {"format_version": FORMAT_VERSION, **meta}
        else:
            _check_meta(stored, {"format_version": FORMAT_VERSION, **meta}, location)
        return cls(root, None if location is None else str(location))

    @property
    def where(self) -> str:
        """How messages name this store."""
        return "the in-memory store" if self.location is None else f"the store at {self.location}"

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.root.attrs["fasttrak"])

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @property
    def chunk_rows(self) -> int:
        return int(self.meta["chunk_rows"])

    @property
    def num_train(self) -> int | None:
        n = self.meta.get("n")
        return None if n is None else int(n)

    def set_num_train(self, n: int) -> None:
        """Record the training-set size, or check it against the one recorded."""
        if n < 1:
            raise ValueError("the training set is empty; pass a dataset with at least one example")
        known = self.num_train
        if known is None:
            self.root.attrs["fasttrak"] = {**self.meta, "n": n}
        elif known != n:
            raise StoreMismatchError(
                f"{self.where} was built for a training set of {known} examples, "
                f"this one has {n}; use a new store path for another training set"
            )

    def checkpoint_ids(self) -> list[int]:
        if "checkpoints" not in self.root:
            return []
        return sorted(int(key) for key in self.root["checkpoints"].group_keys())

    def checkpoint(self, m: int) -> CheckpointStore | None:
        key = f"checkpoints/{m}"
        return CheckpointStore(self.root[key], self.chunk_rows) if key in self.root else None

    def create_checkpoint(self, m: int, fingerprint: str) -> CheckpointStore:
        n = self.num_train
        assert n is not None, "set_num_train first"
        group = self.root.require_group(f"checkpoints/{m}")
        group.attrs["fingerprint"] = fingerprint
        rows, k = self.chunk_rows, self.k
        dtype = self.meta["feature_dtype"]
        group.create_array(
            "features",
            shape=(n, k),
            chunks=(min(rows, n), k),
            dtype=dtype,
            fill_value=0,
            compressors=None,
        )
        group.create_array(
            "q", shape=(n,), chunks=(min(rows, n),), dtype="float32", fill_value=0, compressors=None
        )
        group.create_array(
            "done",
            shape=(math.ceil(n / rows),),
            chunks=(1,),
            dtype="uint8",
            fill_value=0,
            compressors=None,
        )
        return CheckpointStore(group, rows)

    def open_checkpoint(self, m: int, fingerprint: str, overwrite: bool) -> CheckpointStore:
        """The store of checkpoint m, created if new; refuses a different checkpoint at m."""
        existing = self.checkpoint(m)
        if existing is not None and existing.fingerprint != fingerprint:
            if not overwrite:
                raise CheckpointMismatchError(
                    f"checkpoint {m} in {self.where} was featurized from other "
                    "weights; pass overwrite=True to replace its features, or use a new store"
                )
            del self.root[f"checkpoints/{m}"]
            existing = None
        elif existing is not None and overwrite:
            del self.root[f"checkpoints/{m}"]
            existing = None
        return existing if existing is not None else self.create_checkpoint(m, fingerprint)


@dataclass
class CheckpointStore:
    """Features, Q, done marks and kernel of one checkpoint."""

    group: zarr.Group
    chunk_rows: int

    @property
    def fingerprint(self) -> str:
        return str(self.group.attrs["fingerprint"])

    @property
    def features(self) -> zarr.Array:
        return self.group["features"]

    @property
    def q(self) -> zarr.Array:
        return self.group["q"]

    @property
    def num_chunks(self) -> int:
        return int(self.group["done"].shape[0])

    def chunk_slice(self, c: int) -> slice:
        n = self.features.shape[0]
        return slice(c * self.chunk_rows, min((c + 1) * self.chunk_rows, n))

    def pending_chunks(self) -> list[int]:
        done = self.group["done"][:]
        return [int(c) for c in np.flatnonzero(done == 0)]

    def is_complete(self) -> bool:
        return not self.pending_chunks()

    def write_chunk(self, c: int, features: np.ndarray, q: np.ndarray) -> None:
        """Write one finished chunk, then its done mark (so a crash never marks half a chunk)."""
        rows = self.chunk_slice(c)
        if self.group["done"][c]:
            raise RuntimeError(f"chunk {c} is already finished; refusing to overwrite it")
        expected = rows.stop - rows.start
        if features.shape != (expected, self.features.shape[1]) or q.shape != (expected,):
            raise ValueError(f"chunk {c} needs {expected} rows, got {features.shape}, {q.shape}")
        stored = features.astype(self.features.dtype)
        if not np.isfinite(stored).all():
            raise FloatingPointError(
                f"features of chunk {c} overflow {self.features.dtype}; "
                "use feature_dtype='float32' (the default)"
            )
        self.features[rows] = stored
        self.q[rows] = q.astype(np.float32)
        self.group["done"][c] = 1

    def read_gram(self, name: str = "gram") -> np.ndarray | None:
        """A stored (k, k) kernel: ``gram`` (Φᵀ Φ) or ``gram_gauss_newton`` (Φᵀ R Φ)."""
        return self.group[name][:] if name in self.group else None

    def write_gram(self, gram: np.ndarray, name: str = "gram") -> None:
        array = self.group.create_array(
            name, shape=gram.shape, dtype="float64", compressors=None, overwrite=True
        )
        array[:] = gram

    def read_factor(self, ridge_key: dict[str, Any]) -> np.ndarray | None:
        """The cached per-block Cholesky factors (B, m, m) for these kernel settings, or None.

        None also for a factor in another layout: stores written before FACTOR_LAYOUT hold
        one (k, k) block-diagonal matrix (no ``layout`` attribute). The factor is derived
        data, so the caller rebuilds it from the stored gram and overwrites the old one.
        """
        if "factor" not in self.group:
            return None
        array = self.group["factor"]
        attrs = dict(array.attrs)
        if attrs.get("layout") != FACTOR_LAYOUT or attrs.get("ridge") != ridge_key:
            return None
        return array[:] if len(array.shape) == 3 else None

    def write_factor(self, factor: np.ndarray, ridge_key: dict[str, Any]) -> None:
        """Cache the per-block Cholesky factors (B, m, m); a factor for other settings (or in
        an older layout) is derived data and replaced."""
        if factor.ndim != 3:
            raise ValueError(f"expected per-block factors (B, m, m), got shape {factor.shape}")
        array = self.group.create_array(
            "factor", shape=factor.shape, dtype="float64", compressors=None, overwrite=True
        )
        array[:] = factor
        array.attrs.update({"ridge": ridge_key, "layout": FACTOR_LAYOUT})


def _check_meta(stored: dict[str, Any], wanted: dict[str, Any], location: Any) -> None:
    problems = [
        f"{key}: store has {stored.get(key)!r}, you asked for {value!r}"
        for key, value in wanted.items()
        if _jsonish(stored.get(key)) != _jsonish(value)
    ]
    if problems:
        raise StoreMismatchError(
            f"{'the in-memory store' if location is None else f'the store at {location}'} "
            "was made by a different run ("
            + "; ".join(problems)
            + "); use a new store path, or the same settings as the run that made it"
        )


def _jsonish(value: Any) -> Any:
    """Normalise tuples to lists so that JSON round trips compare equal."""
    if isinstance(value, dict):
        return {k: _jsonish(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonish(v) for v in value]
    return value
