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

``--factor-timing`` instead times the kernel factor and solve of a block-diagonal kernel
(``--blocks``, default 4) at each ``--proj-dims`` k on a random gram: the per-block layout
(:func:`fasttrak.kernel.block_diagonal_factor`, (B, k/B, k/B), B small solves) against the
previous layout (the same B Cholesky factors written into one (k, k) matrix, one full
``cholesky_solve``). Each stage (factor, write + read of the cached factor in a zarr store on
disk, solve of ``--solve-targets`` right-hand sides) is timed ``--timing-repeats`` times after
a warm-up; one JSON line per k with the medians, then a table on stderr.

Usage::

    python benchmarks/ridge.py                     # ~5 min on 2 CPU cores (ground truth cached)
    python benchmarks/ridge.py --repeats 1 --proj-dims 1024 --ridges 1e-2 1e-1   # quick
    python benchmarks/ridge.py --factor-timing --proj-dims 1024 2048 4096    # ~1 min
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

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


def full_layout_factor(gram: np.ndarray, ridge: float, n: int, blocks: int) -> np.ndarray:
    """The layout before per-block factors: B Cholesky factors in one (k, k) matrix."""
    factor = np.zeros_like(gram)
    for part in kernel.block_slices(gram.shape[0], blocks):
        factor[part, part] = kernel.cholesky_factor(gram[part, part], ridge, n)
    return factor


def time_factor_solve(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Median seconds of factor, cache round trip and solve: (k, k) vs per-block layout."""
    rows = []
    for k in args.proj_dims:
        gen = torch.Generator().manual_seed(k)
        phi = torch.randn(2 * k, k, generator=gen, dtype=torch.float64)  # n = 2k rows
        gram = (phi.T @ phi).numpy()
        rhs = torch.randn(k, args.solve_targets, generator=gen, dtype=torch.float64)
        del phi
        row: dict[str, Any] = {
            "bench": "factor_solve",
            "k": k,
            "blocks": args.blocks,
            "targets": args.solve_targets,
            "threads": torch.get_num_threads(),
        }
        results = {}
        for layout, make in (
            ("full", full_layout_factor),
            ("blocks", kernel.block_diagonal_factor),
        ):
            times: dict[str, list[float]] = defaultdict(list)
            for repeat in range(args.timing_repeats + 1):  # the first is a warm-up
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    factor = make(gram, kernel.DEFAULT_RIDGE, 2 * k, args.blocks)
                    t1 = time.perf_counter()
                    array = zarr.open_group(tmp, mode="w").create_array(
                        "factor", shape=factor.shape, dtype="float64", compressors=None
                    )
                    array[:] = factor
                    factor = array[:]
                    t2 = time.perf_counter()
                    solved = kernel.solve(factor, rhs)
                    t3 = time.perf_counter()
                if repeat == 0:
                    continue
                times["factor"].append(t1 - t0)
                times["cache"].append(t2 - t1)
                times["solve"].append(t3 - t2)
                times["total"].append(t3 - t0)
            results[layout] = solved
            for stage, values in times.items():
                row[f"{layout}_{stage}_s"] = round(statistics.median(values), 4)
            row[f"{layout}_factor_mib"] = round(factor.nbytes / 2**20, 1)
        row["max_rel_diff"] = float(
            (results["full"] - results["blocks"]).abs().max() / results["full"].abs().max()
        )
        row["speedup_total"] = round(row["full_total_s"] / row["blocks_total_s"], 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    err = sys.stderr
    print(
        "\n| k | B | factor s (k×k / per block) | cache write+read s | solve s "
        "| total s | speed-up | factor MiB |",
        file=err,
    )
    print("|---|---|---|---|---|---|---|---|", file=err)
    for r in rows:
        cells = [
            f"{r[f'full_{stage}_s']:.3f} / {r[f'blocks_{stage}_s']:.3f}"
            for stage in ("factor", "cache", "solve", "total")
        ]
        print(
            f"| {r['k']} | {r['blocks']} | "
            + " | ".join(cells)
            + f" | {r['speedup_total']:.1f}× | {r['full_factor_mib']:.0f} / "
            f"{r['blocks_factor_mib']:.0f} |",
            file=err,
        )
    return rows


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
    parser.add_argument(
        "--factor-timing", action="store_true", help="time factor + solve, (k, k) vs per block"
    )
    parser.add_argument("--blocks", type=int, default=4, help="kernel blocks (--factor-timing)")
    parser.add_argument("--solve-targets", type=int, default=1000, help="(--factor-timing)")
    parser.add_argument("--timing-repeats", type=int, default=5, help="(--factor-timing)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (--factor-timing)")
    args = parser.parse_args(argv)
    if args.factor_timing:
        if args.threads:
            torch.set_num_threads(args.threads)
        time_factor_solve(args)
        return
    print_table(run(args))


if __name__ == "__main__":
    main()
