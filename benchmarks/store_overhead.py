"""What the store's guarantees cost: checksums, row fingerprints and chunk claims.

Runs featurize and score on an on-disk store twice in one process, interleaved:

* ``with``: fasttrak as it is (CRC32C of every chunk written and read, a fingerprint of
  every training row, an flock claim per chunk and a shared one per model);
* ``without``: the same run with those three parts replaced by no-ops: CRC32C returns 0,
  row hashes are zeros, locks are granted without a system call. This counterfactual
  exists only in this script, to measure the difference; the library has no switch to turn
  its integrity off.

and also times the three parts inside the ``with`` runs (wrapping the real functions), as a
second estimate that does not depend on the noise between runs. Two workloads:

* ``demo``: the digits MLP of ``fasttrak demo`` (1000 rows, 5 models, k = 1024, 300 targets);
* ``tiny``: a 1M-row tiny MLP (16 -> 16 -> 4, p = 340) at k = 256 (chunks of 4096 rows,
  batches of 4096), one model, 1000 targets, features 1 GB on disk.

Prints one JSON line per workload: seconds with and without (best of ``--repeat``),
``overhead`` = with / without - 1 for featurize and for score, and the parts' seconds.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/store_overhead.py                 # ~10 min
    OMP_NUM_THREADS=1 python benchmarks/store_overhead.py --rows 100000   # quicker
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fasttrak as ft
from fasttrak import data as data_module
from fasttrak import demo, scoring
from fasttrak.store import arrays, core, records
from fasttrak.store import files as store_files


class Parts:
    """Seconds spent in the integrity parts, by wrapping the real functions."""

    def __init__(self) -> None:
        self.seconds = {"checksums": 0.0, "row hashes": 0.0, "claims": 0.0}

    def wrap(self, part: str, function: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start

        return timed


CHECKSUM_USERS = (records, core, arrays, scoring)


@contextlib.contextmanager
def patched(mode: str, parts: Parts | None = None) -> Iterator[None]:
    """``"with"``: the real parts, timed into ``parts``; ``"without"``: no-ops."""
    saved: list[tuple[Any, str, Any]] = []

    def swap(owner: Any, name: str, value: Any) -> None:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    real_checksum = records.checksum
    real_fast, real_items = data_module._tensor_content, data_module._content_hashes
    real_lock = store_files.DirectoryFiles.lock
    if mode == "without":

        def checksum(array: np.ndarray) -> int:
            return 0

        def fast(tensors: tuple) -> np.ndarray:
            return np.zeros(tensors[0].shape[0], dtype=np.uint64)

        def items(batch: list) -> np.ndarray:
            return np.zeros(len(batch), dtype=np.uint64)

        def lock(self: Any, key: str, **kwargs: Any) -> Any:
            return store_files._NoLock()

    else:
        assert parts is not None
        checksum = parts.wrap("checksums", real_checksum)
        fast = parts.wrap("row hashes", real_fast)
        items = parts.wrap("row hashes", real_items)
        lock = parts.wrap("claims", real_lock)
    for module in CHECKSUM_USERS:
        if hasattr(module, "checksum"):
            swap(module, "checksum", checksum)
    swap(data_module, "_tensor_content", fast)
    swap(data_module, "_content_hashes", items)
    swap(store_files.DirectoryFiles, "lock", lock)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def run_once(workload: dict, mode: str, parts: Parts | None) -> tuple[float, float]:
    """Seconds of featurize and of score (dense scores) on a fresh on-disk store."""
    root = Path(tempfile.mkdtemp(prefix="fasttrak-overhead-"))
    try:
        with patched(mode, parts):
            trak = workload["make"](root / "store")
            start = time.perf_counter()
            trak.featurize(workload["train"], checkpoints=workload["checkpoints"])
            featurize = time.perf_counter() - start
            start = time.perf_counter()
            np.asarray(trak.score(workload["targets"]))
            score = time.perf_counter() - start
        return featurize, score
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
    best = {"with": [np.inf, np.inf], "without": [np.inf, np.inf]}
    parts = Parts()
    for _ in range(repeat):
        for mode in ("without", "with"):  # interleaved: drifts of a shared machine cancel
            times = run_once(workload, mode, parts if mode == "with" else None)
            best[mode] = [min(a, b) for a, b in zip(best[mode], times, strict=True)]
    with_f, with_s = best["with"]
    without_f, without_s = best["without"]
    return {
        "benchmark": "store_overhead",
        "workload": workload["name"],
        "featurize_s": {"with": round(with_f, 3), "without": round(without_f, 3)},
        "score_s": {"with": round(with_s, 3), "without": round(without_s, 3)},
        "featurize_overhead": round(with_f / without_f - 1, 4),
        "score_overhead": round(with_s / without_s - 1, 4),
        "parts_s_per_run": {k: round(v / repeat, 3) for k, v in parts.seconds.items()},
        "parts_over_total": round(sum(parts.seconds.values()) / repeat / (with_f + with_s), 4),
        "repeat": repeat,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the tiny workload")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=["demo", "tiny"], default=None)
    args = parser.parse_args()
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
