"""Shards of the training rows, for job arrays: ``featurize(..., rows=ft.shard(i, n))``.

The unit of work is the store's row chunk (``chunk_rows`` rows). A shard is a contiguous
run of chunks: shard i of n holds chunks ``[i·C // n, (i+1)·C // n)`` of the C chunks, so
n jobs with i = 0..n-1 cover every chunk exactly once, whatever C is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fasttrak.errors import ConfigError, ConfigTypeError
from fasttrak.validation import is_int


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` equal runs of row chunks."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not (is_int(self.index) and is_int(self.count)):
            raise ConfigTypeError(
                f"shard(i, n) takes integers, got ({self.index!r}, {self.count!r})"
            )
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(
                f"shard(i, n) needs n >= 1 and 0 <= i < n, got ({self.index}, {self.count}); "
                "a SLURM array passes i = $SLURM_ARRAY_TASK_ID and n = the array's size"
            )

    def chunks(self, num_chunks: int) -> list[int]:
        """The row chunks of this shard, out of ``num_chunks``."""
        start = self.index * num_chunks // self.count
        stop = (self.index + 1) * num_chunks // self.count
        return list(range(start, stop))


def shard(index: int, count: int) -> Shard:
    """Shard ``index`` of ``count`` (0-based): ``rows=ft.shard(i, n)`` in a job array of n."""
    return Shard(index, count)


RowChunks = Shard | slice | range | Iterable[int] | None
"""Which row chunks to featurize: None (all), a :class:`Shard`, or chunk indices (a slice,
range or list)."""


def select_chunks(rows: RowChunks, num_chunks: int) -> list[int]:
    """The sorted, distinct row chunks that ``rows`` selects out of ``num_chunks``."""
    if rows is None:
        return list(range(num_chunks))
    if isinstance(rows, Shard):
        return rows.chunks(num_chunks)
    if isinstance(rows, slice):
        return list(range(num_chunks))[rows]
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Iterable):
        raise ConfigTypeError(
            "rows= takes ft.shard(i, n), a slice or a list of row-chunk indices, "
            f"got {type(rows).__name__}"
        )
    chunks = list(rows)
    if not chunks:
        raise ConfigError(
            "rows= lists no row chunk; pass None for all of them, ft.shard(i, n), or chunk "
            f"indices in 0 to {num_chunks - 1}"
        )
    if not all(is_int(c) for c in chunks):
        raise ConfigTypeError(f"rows= must list integer row-chunk indices, got {chunks[:10]}")
    bad = [int(c) for c in chunks if not 0 <= c < num_chunks]
    if bad:
        raise ConfigError(
            f"rows= names row chunks {bad[:10]} outside the store's {num_chunks} chunks "
            f"(0 to {num_chunks - 1})"
        )
    return sorted({int(c) for c in chunks})


def runs(chunks: Iterable[int]) -> list[list[int]]:
    """Chunk indices in runs of adjacent ones: ``[0, 1, 2, 5]`` -> ``[[0, 1, 2], [5]]``."""
    grouped: list[list[int]] = []
    for c in sorted(chunks):
        if grouped and grouped[-1][-1] == c - 1:
            grouped[-1].append(c)
        else:
            grouped.append([c])
    return grouped


def ranges(chunks: Iterable[int]) -> str:
    """Chunk indices as compact ranges: ``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs(chunks))
