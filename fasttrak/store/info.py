"""What a store holds and how far its work is: ``trak.progress()``, ``fasttrak info STORE``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fasttrak.errors import StoreCorruptError
from fasttrak.shards import ranges
from fasttrak.store.core import Store


@dataclass(frozen=True)
class ModelProgress:
    """One model id: its finished row chunks out of ``total``, and the missing ones."""

    model_id: int
    done: int
    total: int
    missing: list[int]
    damaged: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.damaged

    def __str__(self) -> str:
        state = "complete" if self.complete else f"missing chunks {ranges(self.missing)}"
        if self.damaged:
            state += f"; {len(self.damaged)} damaged done mark(s): run fasttrak repair"
        return f"model {self.model_id}: {self.done}/{self.total} chunks ({state})"


@dataclass(frozen=True)
class Progress:
    """Per model id, how much of the training set is featurized."""

    where: str
    num_train: int | None
    chunk_rows: int
    models: list[ModelProgress]

    @property
    def complete(self) -> bool:
        return bool(self.models) and all(m.complete for m in self.models)

    def __str__(self) -> str:
        head = (
            f"{self.where}: {self.num_train if self.num_train is not None else '?'} training "
            f"rows in chunks of {self.chunk_rows}"
        )
        if not self.models:
            return head + "; no model featurized yet"
        return "\n".join([head, *(f"  {m}" for m in self.models)])


def progress(store: Store) -> Progress:
    """The featurized row chunks of every model id in ``store`` (done marks only: a chunk
    counts once its done mark is written; ``verify`` checks the data behind them)."""
    models = []
    for m in store.model_ids():
        try:
            model = store.model(m)
        except StoreCorruptError as error:
            models.append(ModelProgress(m, 0, store.num_chunks, [], [str(error)]))
            continue
        damaged: list[str] = []
        records = model.records(damaged)
        missing = [c for c in range(store.num_chunks) if c not in records]
        models.append(ModelProgress(m, len(records), store.num_chunks, missing, damaged))
    return Progress(store.where, store.num_train, store.chunk_rows, models)


def describe(store: Store) -> dict[str, Any]:
    """The store's settings (task, projector, k, parameters, dtypes), as recorded."""
    meta = store.meta
    params = meta.get("params", {})
    numel = 0
    for shape in params.values():
        size = 1
        for dim in shape:
            size *= int(dim)
        numel += size
    return {
        "store": store.where,
        "format_version": store.format_version,
        "task": meta.get("task"),
        "projector": meta.get("projector", {}).get("kind"),
        "k": meta.get("k"),
        "seed": meta.get("seed"),
        "parameters": f"{len(params)} tensors, p = {numel}",
        "feature_dtype": meta.get("feature_dtype"),
        "chunk_rows": meta.get("chunk_rows"),
        "num_train": store.num_train,
    }
