"""LDS of the demo (MLP on sklearn digits) as a function of the relative ridge and of k.

Reuses the pieces of :mod:`fasttrak.demo` and its ground truth (``OUT/ground_truth``,
shared with ``fasttrak demo --out OUT``; trained here if missing). For every projection
dimension k and every ensemble of attribution models (``--repeats`` ensembles, different
random halves and seeds, same data and ground truth) the training set is featurized once;
every ridge then reuses that store (the gram ΦᵀΦ is stored, only its Cholesky factor is
recomputed) and is scored and evaluated.

Prints one JSON line per (k, ridge, repeat) to stdout with the LDS, its stderr over targets,
the paired difference to the library default ridge (mean and stderr of the per-target LDS
difference: the same targets and ground truth, so much tighter than the LDS stderrs), and
seconds; then a summary table (mean over repeats) to stderr.

Usage::

    python benchmarks/ridge.py                     # ~5 min on 2 CPU cores (ground truth cached)
    python benchmarks/ridge.py --repeats 1 --proj-dims 1024 --ridges 1e-2 1e-1   # quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fasttrak import kernel
from fasttrak.demo import (
    DigitsData,
    ground_truth,
    load_data,
    make_trak,
    torch_threads,
    train_attribution_models,
)
from fasttrak.evaluate import LDSResult, lds

REFERENCE = {"projector": "dense", "kernel": "plain", "kernel_blocks": 1}
"""The sweep in docs/estimator.md measures the paper's estimator (dense projection, plain
kernel); the library's defaults differ since the LDS-vs-cost study."""

RIDGES = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 1e4)
PROJ_DIMS = (512, 1024, 2048)


def paired_delta(a: LDSResult, b: LDSResult) -> tuple[float, float]:
    """Mean and stderr of the per-target LDS difference a - b over targets valid in both."""
    diff = a.per_target - b.per_target
    diff = diff[np.isfinite(diff)]
    if diff.size < 2:
        return float("nan"), float("nan")
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(diff.size))


def sweep_ridges(
    data: DigitsData,
    states: list[dict[str, Any]],
    store: Path,
    k: int,
    ridges: tuple[float, ...],
    masks: np.ndarray,
    outputs: np.ndarray,
) -> dict[float, tuple[LDSResult, float]]:
    """LDS and seconds (factor + score) of every ridge on one featurized store."""
    results = {}
    for ridge in ridges:
        start = time.perf_counter()
        trak = make_trak(store, k, ridge=ridge, progress=False, **REFERENCE)
        scores = np.asarray(trak.score((data.x_target, data.y_target), checkpoints=states))
        seconds = time.perf_counter() - start
        results[ridge] = (lds(scores, masks, outputs), seconds)
    return results


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the sweep and print one JSON line per configuration; returns the rows."""
    out = Path(args.out)
    data = load_data(args.targets, args.seed)
    start = time.perf_counter()
    masks, outputs = ground_truth(
        data, args.subsets, out / "ground_truth", args.seed, progress=not args.quiet
    )
    print(f"# ground truth: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    ridges = tuple(sorted(set(args.ridges) | {kernel.DEFAULT_RIDGE}))
    rows = []
    with torch_threads(1):
        for rep in range(args.repeats):
            model_seed = args.seed + rep
            states = train_attribution_models(data, args.models, model_seed, progress=False)
            for k in args.proj_dims:
                store = out / "ridge-bench" / f"k{k}-models{args.models}-rep{rep}"
                start = time.perf_counter()
                make_trak(store, k, progress=not args.quiet, **REFERENCE).featurize(
                    (data.x_train, data.y_train), checkpoints=states
                )
                featurize_s = time.perf_counter() - start
                results = sweep_ridges(data, states, store, k, ridges, masks, outputs)
                default = results[kernel.DEFAULT_RIDGE][0]
                for ridge, (result, seconds) in results.items():
                    delta, delta_se = paired_delta(result, default)
                    row = {
                        "proj_dim": k,
                        "ridge": ridge,
                        "repeat": rep,
                        "models": args.models,
                        "lds": round(result.mean, 4),
                        "stderr": round(result.stderr, 4),
                        "delta_vs_default": round(delta, 4),
                        "delta_stderr": round(delta_se, 4),
                        "featurize_s": round(featurize_s, 2),
                        "score_s": round(seconds, 2),
                    }
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """Mean LDS (and mean paired delta vs the default ridge) over repeats, to stderr."""
    groups: dict[tuple[int, float], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["proj_dim"], row["ridge"])].append(row)
    err = sys.stderr
    print(f"\n{'k':>6} {'ridge':>8} {'LDS':>7} {'stderr':>7} {'Δ default':>10}", file=err)
    for (k, ridge), group in sorted(groups.items()):
        mean = statistics.fmean(r["lds"] for r in group)
        se = statistics.fmean(r["stderr"] for r in group)
        delta = statistics.fmean(r["delta_vs_default"] for r in group)
        print(f"{k:>6} {ridge:>8.0e} {mean:>7.3f} {se:>7.3f} {delta:>+10.3f}", file=err)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="fasttrak-demo", help="demo directory (ground truth)")
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--targets", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="ensembles of attribution models")
    parser.add_argument("--ridges", type=float, nargs="+", default=list(RIDGES))
    parser.add_argument("--proj-dims", type=int, nargs="+", default=list(PROJ_DIMS))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    print_table(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
