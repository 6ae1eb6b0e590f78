"""Store functions for users: check a store, repair it, read saved scores back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fasttrak.errors import StoreCorruptError, StoreError
from fasttrak.store.core import RUN, Store
from fasttrak.store.info import Progress, describe, progress
from fasttrak.store.saved import load_scores
from fasttrak.store.verify import Problem, Report, repair, verify


def verify_store(path: str | Path) -> Report:
    """Check every record, chunk and kernel of the store at ``path``, or saved scores; the
    report lists each problem with what ``repair_store`` does about it."""
    if _is_saved_scores(Path(path)):
        report = Report(str(path))
        report.count("saved score arrays")
        try:
            load_scores(path)
        except StoreCorruptError as error:
            report.problems.append(
                Problem(str(path), str(error), "save the same scores again (scores.save(path))")
            )
        return report
    return verify(Store.open_existing(path))


def repair_store(path: str | Path) -> Report:
    """Repair the store at ``path``: damaged chunks are un-finished (the next featurize with
    the same data and checkpoints recomputes only them), damaged kernels deleted (rebuilt on
    the next score), damaged records restored from their copies."""
    if _is_saved_scores(Path(path)):
        raise StoreError(
            f"{path} holds saved scores, which are repaired by saving them again: "
            "scores.save(path) (with overwrite=True if their metadata is damaged)"
        )
    return repair(Store.open_existing(path))


def store_info(path: str | Path) -> tuple[dict[str, Any], Progress]:
    """The settings of the store at ``path`` and, per model id, its featurized row chunks
    (``fasttrak info STORE``). Reads records only."""
    store = Store.open_existing(path)
    return describe(store), progress(store)


def _is_saved_scores(path: Path) -> bool:
    """A directory that looks like a saved scores array (and is not a store)."""
    if (path / RUN).exists() or (path / "records").exists():
        return False
    return (path / "zarr.json").exists() or (path / "c").is_dir()


__all__ = ["Report", "load_scores", "repair_store", "store_info", "verify_store"]
