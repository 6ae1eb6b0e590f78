"""Speed of the row fingerprints (``fasttrak.data``) on CPU. Prints one JSON line.

Data: ``--rows`` rows (1M) of 64 float32 inputs and an int64 label. Every time is the best of
``--repeat`` runs (other processes on a shared machine only ever slow a run down).

* ``fast_rows_per_s``: ``Rows.hashes`` of all rows of a ``TensorDataset`` (the fast path);
  ``copy_rows_per_s``: copying the same bytes (``clone`` of blocks of 16384 rows), a baseline;
  ``fast_over_copy``: the time of hashing over the time of copying.
* ``batches_rows_per_s`` / ``batches_hashed_rows_per_s``: iterating ``Rows.batches`` at
  ``--batch-size`` without and with hashes; ``hashed_over_plain``: the time ratio.
* ``item_us``: µs per item of hashing dataset items ``(x[i], int(y[i]))`` (``HashingCollate``
  on lists of items already built, batches of ``--batch-size``: the hashing alone);
  ``item_loader_us`` / ``item_loader_hashed_us``: µs per item of iterating a DataLoader over a
  Dataset returning those items (its ``__getitem__`` included) without and with hashes;
  ``item_hashed_over_plain``: their ratio. ``token_item_us``: µs per item of hashing dicts of
  two 128-long lists of Python ints (token ids and an attention mask).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/data_fingerprint.py            # ~1 min
    OMP_NUM_THREADS=1 python benchmarks/data_fingerprint.py --rows 100000 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from torch.utils.data import Dataset, TensorDataset

from fasttrak.data import HashingCollate, Rows


class Pairs(Dataset):
    """(x[i], int(y[i])): the items of a typical map-style dataset, already in memory."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    n, b = args.rows, args.batch_size
    x, y = torch.randn(n, 64), torch.randint(0, 1000, (n,))
    rows = Rows(TensorDataset(x, y), b)
    whole = slice(0, n)
    block = 1 << 14

    def copy() -> None:
        for a in range(0, n, block):
            x[a : a + block].clone(), y[a : a + block].clone()

    def plain() -> None:
        for _ in rows.batches(whole):
            pass

    def hashed() -> None:
        for _ in rows.batches(whole, with_hashes=True):
            pass

    fast_s = best(lambda: rows.hashes(whole), args.repeat)
    copy_s = best(copy, args.repeat)
    plain_s = best(plain, args.repeat)
    hashed_s = best(hashed, args.repeat)

    m = min(args.items, n)
    items = [(x[i], int(y[i])) for i in range(m)]
    hash_only = HashingCollate(None)
    item_s = best(lambda: [hash_only(items[a : a + b]) for a in range(0, m, b)], args.repeat)
    tokens = [{"input_ids": list(range(i, i + 128)), "attention_mask": [1] * 128} for i in range(m)]
    token_s = best(lambda: [hash_only(tokens[a : a + b]) for a in range(0, m, b)], args.repeat)
    pairs = Rows(Pairs(x[:m], y[:m]), b)
    loader_s = best(lambda: list(pairs.batches(slice(0, m))), args.repeat)
    loader_hashed_s = best(lambda: list(pairs.batches(slice(0, m), with_hashes=True)), args.repeat)

    print(
        json.dumps(
            {
                "rows": n,
                "row_bytes": 64 * 4 + 8,
                "batch_size": b,
                "threads": torch.get_num_threads(),
                "fast_rows_per_s": round(n / fast_s),
                "copy_rows_per_s": round(n / copy_s),
                "fast_over_copy": round(fast_s / copy_s, 3),
                "batches_rows_per_s": round(n / plain_s),
                "batches_hashed_rows_per_s": round(n / hashed_s),
                "hashed_over_plain": round(hashed_s / plain_s, 3),
                "items": m,
                "item_us": round(item_s / m * 1e6, 3),
                "token_item_us": round(token_s / m * 1e6, 3),
                "item_loader_us": round(loader_s / m * 1e6, 3),
                "item_loader_hashed_us": round(loader_hashed_s / m * 1e6, 3),
                "item_hashed_over_plain": round(loader_hashed_s / loader_s, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
