"""The store: a zarr group of features, out-to-loss weights, done marks and kernels, with
crash consistency, checksums, data identity and claims for many writers (docs/store.md)."""

from fasttrak.store.core import (
    DEFAULT_CHUNK_ROWS,
    FEATURE_DTYPES,
    FORMAT_VERSION,
    ChunkRecord,
    ModelStore,
    Store,
    complete_records,
)

CheckpointStore = ModelStore
"""Deprecated name of :class:`ModelStore`."""

__all__ = [
    "CheckpointStore",
    "DEFAULT_CHUNK_ROWS",
    "FEATURE_DTYPES",
    "FORMAT_VERSION",
    "ModelStore",
    "ChunkRecord",
    "Store",
    "complete_records",
]
