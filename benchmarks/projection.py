"""Speed of the projections: dense vs. sparse JL (SJLT) vs. block SRHT, on CPU.

Prints one JSON line per (p, k) to stdout and a markdown table to stderr.

For each model size p (the parameters of a 2-layer MLP, ~25k, ~100k and ~1M) and projection
dimension k, at batch B = 64: seconds per ``project()`` call (best of several calls after a
warm-up; other processes on a shared machine only ever slow a call down) of

* ``dense``: ``DenseProjector`` with its (p, k) matrix cached (built before timing), when
  the matrix fits in 2 GiB; skipped (null) otherwise;
* ``matmul``: ``torch.matmul`` of a (B, p) by the same cached (p, k) matrix (the floor for
  any dense projection);
* ``sjlt``: ``SJLT()`` (s = 1), and ``sjlt_s4``: ``SJLT(s=4)``;
* ``srht``: ``SRHT()`` (Hadamard blocks of the smallest power of two >= k, at most 2**16).

Gradients are passed as the per-parameter blocks ``(B, p_i)``, as ``fasttrak.TRAK`` does.
``*_gflops`` is the dense-equivalent rate ``2 * B * p * k / seconds / 1e9``: for dense and
matmul the real GFLOP/s, for sjlt and srht the GFLOP/s a dense projection would need to be as
fast. ``dense_over_sjlt`` and ``dense_over_srht`` are speed-ups over the cached dense
projection; where dense is skipped, ``est_dense_over_*`` use ``est_dense_s``, the time
of the same matmul at the measured matmul GFLOP/s of the largest k that fitted for this p.
``build_s`` is the one-off cost of building each projector (generating its randomness).

Usage::

    python benchmarks/projection.py            # full run (< 3 min on 2 CPU cores)
    python benchmarks/projection.py --quick    # smoke test (~20 s)
    python benchmarks/projection.py --sizes 1M --ks 512 1024   # a part of the full run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from fasttrak.projection import SJLT, SRHT, Dense

BATCH = 64
DENSE_LIMIT = 2 * 2**30  # bytes of the cached (p, k) matrix
# (d_in, hidden, classes) of a 2-layer MLP: p = d_in*h + h + h*c + c.
LAYOUTS = {"25k": (64, 320, 10), "100k": (256, 384, 10), "1M": (1024, 960, 10)}


def mlp_numels(d_in: int, hidden: int, classes: int) -> dict[str, int]:
    return {
        "fc1.weight": d_in * hidden,
        "fc1.bias": hidden,
        "fc2.weight": hidden * classes,
        "fc2.bias": classes,
    }


def best_time(fn: Callable[[], Any], min_total: float, max_calls: int) -> float:
    """Best wall time of ``fn()`` over calls after one warm-up: at least 2 calls, then until
    ``min_total`` seconds are spent or ``max_calls`` calls are made."""
    fn()
    times: list[float] = []
    while len(times) < 2 or (sum(times) < min_total and len(times) < max_calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def timed_build(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(label: str, numels: dict[str, int], k: int, args: argparse.Namespace) -> dict:
    p = sum(numels.values())
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    blocks = [torch.randn(BATCH, n, generator=gen) for n in numels.values()]
    flops = 2 * BATCH * p * k
    row: dict[str, Any] = {"bench": "projection", "model": label, "p": p, "k": k, "batch": BATCH}
    build: dict[str, float] = {}
    timings: dict[str, float | None] = {}

    def run(name: str, fn: Callable[[], Any]) -> None:
        timings[name] = best_time(fn, args.min_total, args.max_calls)

    dense_bytes = p * k * 4
    if dense_bytes <= DENSE_LIMIT:
        dense, build["dense"] = timed_build(
            lambda: Dense(cache_bytes=DENSE_LIMIT).build(numels, k, 0, 0, cpu)
        )
        matrix, seconds = timed_build(dense.matrix)
        build["dense"] += seconds
        run("dense", lambda: dense.project(blocks))
        whole = torch.cat(blocks, dim=1)
        run("matmul", lambda: torch.matmul(whole, matrix))
        del dense, matrix, whole
    else:
        timings["dense"] = timings["matmul"] = None
        row["dense_skipped"] = f"(p, k) matrix is {dense_bytes / 2**30:.1f} GiB > 2 GiB"
    for name, config in (("sjlt", SJLT()), ("sjlt_s4", SJLT(s=4)), ("srht", SRHT())):
        proj, build[name] = timed_build(lambda c=config: c.build(numels, k, 0, 0, cpu))
        run(name, lambda pr=proj: pr.project(blocks))
        del proj
    for name, seconds in timings.items():
        row[f"{name}_s"] = None if seconds is None else round(seconds, 5)
        row[f"{name}_gflops"] = None if seconds is None else round(flops / seconds / 1e9, 1)
    for name in ("sjlt", "srht"):
        dense_s = timings["dense"]
        row[f"dense_over_{name}"] = None if dense_s is None else round(dense_s / timings[name], 2)
    row["build_s"] = {name: round(s, 3) for name, s in build.items()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~20 s smoke run")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--sizes", nargs="+", choices=list(LAYOUTS), help="model sizes to run")
    parser.add_argument("--ks", type=int, nargs="+", help="projection dimensions to run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        sizes, ks = ["25k", "100k"], [512, 2048]
        args.min_total, args.max_calls = 0.0, 2
    else:
        sizes, ks = list(LAYOUTS), [512, 1024, 2048, 8192]
        args.min_total, args.max_calls = 1.0, 5
    sizes, ks = args.sizes or sizes, args.ks or ks
    env = {
        "bench": "env",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "quick": args.quick,
        "loadavg_1min": round(os.getloadavg()[0], 2),  # other jobs on a shared machine
    }
    print(json.dumps(env), flush=True)
    start = time.perf_counter()
    rows = []
    for label in sizes:
        numels = mlp_numels(*LAYOUTS[label])
        matmul_rate = None  # GFLOP/s of the largest k whose dense matrix fitted, for this p
        for k in ks:
            row = measure(label, numels, k, args)
            if row["matmul_gflops"] is not None:
                matmul_rate = row["matmul_gflops"]
            elif matmul_rate is not None:
                est = 2 * BATCH * row["p"] * k / (matmul_rate * 1e9)
                row["est_dense_s"] = round(est, 3)
                for name in ("sjlt", "srht"):
                    row[f"est_dense_over_{name}"] = round(est / row[f"{name}_s"], 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    total = time.perf_counter() - start
    done = {"bench": "done", "seconds": round(total, 1), "loadavg_1min": os.getloadavg()[0]}
    print(json.dumps(done), flush=True)
    print(table(rows), file=sys.stderr)


def table(rows: list[dict]) -> str:
    def fmt(value: float | None, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    lines = [
        "| p | k | dense s | matmul s | sjlt s | sjlt s=4 s | srht s "
        "| dense/sjlt | dense/srht | dense GFLOP/s | sjlt, srht GFLOP/s-equiv. |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        over_sjlt = fmt(r["dense_over_sjlt"], ".1f")
        over_srht = fmt(r["dense_over_srht"], ".1f")
        if r["dense_s"] is None and "est_dense_over_sjlt" in r:
            over_sjlt = f"(~{r['est_dense_over_sjlt']:.0f})"
            over_srht = f"(~{r['est_dense_over_srht']:.0f})"
        lines.append(
            f"| {r['p']:,} | {r['k']} | {fmt(r['dense_s'], '.4f')} | {fmt(r['matmul_s'], '.4f')} "
            f"| {r['sjlt_s']:.4f} | {r['sjlt_s4_s']:.4f} | {r['srht_s']:.4f} "
            f"| {over_sjlt} | {over_srht} | {fmt(r['dense_gflops'], '.0f')} "
            f"| {r['sjlt_gflops']:.0f}, {r['srht_gflops']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
