"""Store functions for users: check a store, repair it, read saved scores back."""

from __future__ import annotations

from pathlib import Path

from fasttrak.store.core import Store
from fasttrak.store.saved import load_scores
from fasttrak.store.verify import Report, repair, verify


def verify_store(path: str | Path) -> Report:
    """Check every record, chunk and kernel of the store at ``path`` (or saved scores);
    the report lists each problem with what ``repair_store`` does about it."""
    return verify(Store.open_existing(path))


def repair_store(path: str | Path) -> Report:
    """Repair the store at ``path``: damaged chunks are un-finished (the next featurize with
    the same data and checkpoints recomputes only them), damaged kernels deleted (rebuilt on
    the next score), damaged records restored from their copies."""
    return repair(Store.open_existing(path))


__all__ = ["Report", "load_scores", "repair_store", "verify_store"]
