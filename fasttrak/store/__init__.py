"""The store: a zarr group of features, out-to-loss weights, done marks and kernels, with
crash consistency, checksums, data identity and claims for many writers (docs/store.md)."""

from fasttrak.store.core import (
    DEFAULT_CHUNK_ROWS,
    FEATURE_DTYPES,
    FORMAT_VERSION,
    CheckpointStore,
    ChunkRecord,
    Store,
    complete_records,
)

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "FEATURE_DTYPES",
    "FORMAT_VERSION",
    "CheckpointStore",
    "ChunkRecord",
    "Store",
    "complete_records",
]
