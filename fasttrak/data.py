"""Turning what users pass as data (datasets, loaders, tensors) into row-addressable batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    SequentialSampler,
    Subset,
    TensorDataset,
    default_collate,
)


@dataclass
class Rows:
    """A map-style dataset and how to batch it; batches can start at any row."""

    dataset: Dataset
    batch_size: int
    collate_fn: Callable[[list[Any]], Any] = default_collate
    num_workers: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def batches(self, rows: slice) -> Iterator[tuple[slice, Any]]:
        """Yield (row slice, collated batch) covering ``rows`` in order."""
        if isinstance(self.dataset, TensorDataset) and self.collate_fn is default_collate:
            # Slicing gives exactly what default_collate would stack, without a Python loop.
            for start in range(rows.start, rows.stop, self.batch_size):
                where = slice(start, min(start + self.batch_size, rows.stop))
                yield where, tuple(t[where] for t in self.dataset.tensors)
            return
        loader = DataLoader(
            Subset(self.dataset, range(rows.start, rows.stop)),
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
        )
        start = rows.start
        for batch in loader:
            if isinstance(batch, Mapping) and not isinstance(batch, dict):
                batch = dict(batch)  # BatchEncoding: pytree sees a plain dict's tensors only
            size = _leading_size(batch)
            yield slice(start, start + size), batch
            start += size


def as_rows(data: Any, batch_size: int) -> Rows:
    """A Dataset, a non-shuffling DataLoader, or a tuple of equally long tensors."""
    if isinstance(data, DataLoader):
        if not isinstance(data.sampler, SequentialSampler) or isinstance(
            data.dataset, IterableDataset
        ):
            raise ValueError(
                "the DataLoader shuffles or samples; fasttrak needs rows in a fixed order to "
                "resume and to match scores to examples: pass the dataset itself, or a "
                "DataLoader with shuffle=False"
            )
        return Rows(data.dataset, data.batch_size or batch_size, data.collate_fn, data.num_workers)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, Tensor) for t in data):
        if len({t.shape[0] for t in data}) != 1:
            raise ValueError("tensors passed as data must all have the same first dimension")
        return Rows(TensorDataset(*data), batch_size)
    if isinstance(data, IterableDataset) or not (
        hasattr(data, "__len__") and hasattr(data, "__getitem__")
    ):
        raise TypeError(
            f"data must be a map-style Dataset (with __len__ and __getitem__), a DataLoader "
            f"with shuffle=False, or a tuple of tensors; got {type(data).__name__}"
        )
    return Rows(data, batch_size)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a batch to ``device``. Mapping batches that are not dicts (a
    tokenizer's ``BatchEncoding``, which pytree treats as one leaf) become plain dicts."""
    if isinstance(batch, Mapping) and not isinstance(batch, dict):
        batch = dict(batch)
    return tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, batch)


def _leading_size(batch: Any) -> int:
    sizes: list[int] = []
    tree_map(
        lambda t: sizes.append(t.shape[0]) if isinstance(t, Tensor) and t.ndim else None, batch
    )
    if not sizes:
        raise TypeError("a batch holds no tensors; make your dataset return tensors (or numbers)")
    return sizes[0]
