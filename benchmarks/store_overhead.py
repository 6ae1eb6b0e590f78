"""What the store's guarantees cost: checksums, row fingerprints and chunk claims.

Runs the real featurize and score (dense scores) on a fresh on-disk store, timing each call
(``with``: what users pay), then times, in the same process on the same data and store,
each guarantee's work as the library does it, through public API only (nothing is patched):

* checksums: ``fasttrak.store.records.checksum`` (CRC32C) of every chunk's features and Q
  as stored, read back per chunk with ``ModelStore.read``. Featurize checksums each chunk's
  features and Q once (``ModelStore.write_chunk``, as it writes the done mark); score
  reads, and so checksums, each twice (the kernel's pass over Φ and Q in
  ``estimator.kernel_rows``, then Q for ``Scores`` and Φ for the scores themselves), and
  checksums every chunk of the gram and factor arrays it publishes in the store (read
  back here with zarr). The CRC32Cs of the small JSON records are not counted;
* row fingerprints: ``Rows.hashes`` of each chunk's rows plus ``chunk_fingerprint``, once
  per chunk and model, as featurize takes them while it reads each chunk (score takes none);
* claims: ``DirectoryFiles.lock`` and release in a fresh directory of the same filesystem,
  as featurize takes them: a shared writers lock per model, around an exclusive claim per
  chunk (score takes none).

Reports ``overhead = parts / (with - parts)`` for featurize and for score: how much slower
the call is than it would be without those parts. Two workloads:

* ``demo``: the digits MLP of ``fasttrak demo`` (1000 rows, 5 models, k = 1024, 300 targets);
* ``tiny``: a 1M-row tiny MLP (16 -> 16 -> 4, p = 340) at k = 256 (chunks of 4096 rows,
  batches of 4096), one model, 1000 targets, features 1 GB on disk.

Prints one JSON line per workload: each call's seconds and its parts' seconds (best of
``--repeat``, each taken separately) and the overheads.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/store_overhead.py                 # ~2 min
    OMP_NUM_THREADS=1 python benchmarks/store_overhead.py --rows 100000   # quicker
    OMP_NUM_THREADS=1 python benchmarks/store_overhead.py --quick         # --rows 20000 --repeat 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

import fasttrak as ft
from fasttrak import demo
from fasttrak.data import as_rows, chunk_fingerprint
from fasttrak.store.files import DirectoryFiles, held
from fasttrak.store.records import checksum

PARTS = ("checksums", "row hashes", "claims")


def timed(function: Callable[..., object], *args: Any, **kwargs: Any) -> float:
    start = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - start


def kernel_arrays(store_dir: Path, model_id: int) -> list[zarr.Array]:
    """The kernel arrays (gram, factor) score published for one model (docs/store.md)."""
    base = store_dir / "checkpoints" / str(model_id) / "kernels"
    return [zarr.open_array(path, mode="r") for path in sorted(base.iterdir())]


def checksum_chunks(array: np.ndarray, chunks: tuple[int, ...]) -> float:
    """Seconds to checksum every chunk of ``array``, as the store does when it publishes it."""
    counts = [math.ceil(s / c) for s, c in zip(array.shape, chunks, strict=True)]
    seconds = 0.0
    for index in itertools.product(*(range(n) for n in counts)):
        where = tuple(
            slice(i * c, min((i + 1) * c, s))
            for i, c, s in zip(index, chunks, array.shape, strict=True)
        )
        seconds += timed(checksum, array[where])
    return seconds


def part_seconds(trak: ft.TRAK, store_dir: Path, train: tuple, scratch: Path) -> dict:
    """Seconds of each guarantee's work in one featurize and one score of this store."""
    store = trak.store
    feat = dict.fromkeys(PARTS, 0.0)
    score = dict.fromkeys(PARTS, 0.0)
    rows = as_rows(train, trak.batch_size)
    locks = DirectoryFiles(scratch)
    for m in store.model_ids():
        model = store.model(m)
        records = model.records()
        # claims: a shared writers lock around an exclusive claim of every chunk
        start = time.perf_counter()
        with held(locks.lock(f"records/locks/{m}/writers.lock", shared=True, wait=True)):
            for c in range(model.num_chunks):
                with held(locks.lock(f"records/locks/{m}/{c}.lock", wait=False)):
                    pass
        feat["claims"] += time.perf_counter() - start
        for c in range(model.num_chunks):
            phi, q = model.read("features", records[c]), model.read("q", records[c])
            for array in (phi, q):  # once as written, twice as read by score
                feat["checksums"] += timed(checksum, array)
                score["checksums"] += timed(checksum, array) + timed(checksum, array)
            start = time.perf_counter()
            chunk_fingerprint(rows.hashes(model.chunk_slice(c)))
            feat["row hashes"] += time.perf_counter() - start
        for kernel in kernel_arrays(store_dir, m):
            score["checksums"] += checksum_chunks(np.asarray(kernel[...]), tuple(kernel.chunks))
    return {"featurize": feat, "score": score}


def run_once(workload: dict) -> dict:
    """Seconds of featurize and score on a fresh on-disk store, and of their parts."""
    root = Path(tempfile.mkdtemp(prefix="fasttrak-overhead-"))
    try:
        trak = workload["make"](root / "store")
        seconds = {
            "featurize": timed(
                trak.featurize, workload["train"], checkpoints=workload["checkpoints"]
            ),
            "score": timed(lambda: np.asarray(trak.score(workload["targets"]))),
        }
        (root / "scratch").mkdir()
        parts = part_seconds(trak, root / "store", workload["train"], root / "scratch")
        return {call: {"with": seconds[call], **parts[call]} for call in seconds}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def demo_workload() -> dict:
    data = demo.load_data()
    states = demo.train_attribution_models(data, 5, progress=False)
    return {
        "name": "demo",
        "make": lambda store: demo.make_trak(store, progress=False),
        "train": (data.x_train, data.y_train),
        "targets": (data.x_target, data.y_target),
        "checkpoints": states,
    }


def tiny_workload(rows: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 16, generator=gen)
    y = torch.randint(0, 4, (rows,), generator=gen)

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))

    def make(store: Path) -> ft.TRAK:
        return ft.TRAK(
            model(),
            proj_dim=256,
            projector="dense",
            store=store,
            chunk_rows=4096,
            batch_size=4096,
            progress=False,
        )

    return {
        "name": f"tiny-{rows}",
        "make": make,
        "train": (x, y),
        "targets": (x[:1000], y[:1000]),
        "checkpoints": [model().state_dict()],
    }


def measure(workload: dict, repeat: int) -> dict:
    best = {call: dict.fromkeys(("with", *PARTS), np.inf) for call in ("featurize", "score")}
    for _ in range(repeat):
        for call, seconds in run_once(workload).items():
            best[call] = {key: min(best[call][key], value) for key, value in seconds.items()}
    line: dict = {"benchmark": "store_overhead", "workload": workload["name"]}
    for call, seconds in best.items():
        parts = sum(seconds[part] for part in PARTS)
        line[f"{call}_s"] = round(seconds["with"], 3)
        line[f"{call}_parts_s"] = {part: round(seconds[part], 4) for part in PARTS}
        line[f"{call}_overhead"] = round(parts / (seconds["with"] - parts), 4)
    line["repeat"] = repeat
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the tiny workload")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=["demo", "tiny"], default=None)
    parser.add_argument("--quick", action="store_true", help="--rows 20000 --repeat 1")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.repeat = 20_000, 1
    torch.set_num_threads(1)
    workloads = []
    if args.only in (None, "demo"):
        workloads.append(demo_workload())
    if args.only in (None, "tiny"):
        workloads.append(tiny_workload(args.rows))
    for workload in workloads:
        print(json.dumps(measure(workload, args.repeat)), flush=True)


if __name__ == "__main__":
    main()
