"""Speed of the projections: dense vs. sparse JL (SJLT) vs. block SRHT, on CPU.

Prints one JSON line per (p, k) to stdout and a markdown table to stderr.

For each model size p (the parameters of a 2-layer MLP, ~25k, ~100k and ~1M) and projection
dimension k, at batch B = 64: seconds per ``project()`` call (best of several calls after a
warm-up, all projectors timed in interleaved rounds; other processes on a shared machine only
ever slow a call down, and interleaving spreads that load over all of them) of

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

    python benchmarks/projection.py            # full run (~3 min on 2 CPU cores)
    python benchmarks/projection.py --quick    # smoke test (~20 s)
    python benchmarks/projection.py --sizes 1M --ks 512 1024   # a part of the full run
    python benchmarks/projection.py --quality  # inner-product errors instead of speed (~1 min)

``--quality`` measures the per-pair relative inner-product error
|<φ(x), φ(y)> - <x, y>| / (|x| |y|) of 40 vectors of p = 3000 coordinates (parameters of
2500 and 500) over their 820 pairs (norms included), for 10 seeds: the mean over seeds of the
RMS error times sqrt(k) (1 for a dense Gaussian map) and of the max error, and the worst
seed's max. "spread" vectors are the tests' (heavy-tailed, mass over >= 200 coordinates);
"concentrated" ones have 4 large coordinates (|value| about 2-3) on a dense background of
standard deviation 0.02, where the buckets of a sparse map show.
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


def best_times(
    fns: dict[str, Callable[[], Any]], min_total: float, max_calls: int
) -> dict[str, float]:
    """Best wall time of each ``fn()`` after one warm-up call each, timed in interleaved
    rounds (one call of every fn per round), so that load from other processes on a shared
    machine falls on all of them alike: at least 2 rounds, then until every fn has spent
    ``min_total`` seconds or ``max_calls`` rounds are done."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    rounds = 0
    while rounds < 2 or (min(sum(t) for t in times.values()) < min_total and rounds < max_calls):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        rounds += 1
    return {name: min(t) for name, t in times.items()}


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
    fns: dict[str, Callable[[], Any]] = {}
    dense_bytes = p * k * 4
    if dense_bytes <= DENSE_LIMIT:
        dense, build["dense"] = timed_build(
            lambda: Dense(cache_bytes=DENSE_LIMIT).build(numels, k, 0, 0, cpu)
        )
        matrix, seconds = timed_build(dense.matrix)  # cached by the projector: one copy
        build["dense"] += seconds
        whole = torch.cat(blocks, dim=1)
        fns["dense"] = lambda: dense.project(blocks)
        fns["matmul"] = lambda: torch.matmul(whole, matrix)
    else:
        timings["dense"] = timings["matmul"] = None
        row["dense_skipped"] = f"(p, k) matrix is {dense_bytes / 2**30:.1f} GiB > 2 GiB"
    for name, config in (("sjlt", SJLT()), ("sjlt_s4", SJLT(s=4)), ("srht", SRHT())):
        proj, build[name] = timed_build(lambda c=config: c.build(numels, k, 0, 0, cpu))
        fns[name] = lambda pr=proj: pr.project(blocks)
    timings.update(best_times(fns, args.min_total, args.max_calls))
    del fns
    for name, seconds in timings.items():
        row[f"{name}_s"] = None if seconds is None else round(seconds, 5)
        row[f"{name}_gflops"] = None if seconds is None else round(flops / seconds / 1e9, 1)
    for name in ("sjlt", "srht"):
        dense_s = timings["dense"]
        row[f"dense_over_{name}"] = None if dense_s is None else round(dense_s / timings[name], 2)
    row["build_s"] = {name: round(s, 3) for name, s in build.items()}
    return row


def quality_vectors(kind: str, seed: int, p: int = 3000) -> torch.Tensor:
    """40 test vectors: "spread" (as in the tests) or "concentrated" (4 large coordinates)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "spread":
        base = torch.randn(40, p, generator=gen) * torch.rand(p, generator=gen) ** 3
        return base + 0.5 * base[:1]
    x = 0.02 * torch.randn(40, p, generator=gen)
    where = torch.randint(0, p, (40, 4), generator=gen)
    big = torch.randn(40, 4, generator=gen) + 2 * torch.sign(torch.randn(40, 4, generator=gen))
    return x.scatter_(1, where, big)


def quality(seeds: int = 10) -> None:
    """Inner-product errors of every projector (see the module docstring), JSON + table."""
    shapes = {"a.weight": 2500, "a.bias": 500}
    configs = {"dense": Dense(), "sjlt": SJLT(), "sjlt s=4": SJLT(s=4), "srht": SRHT()}
    cpu = torch.device("cpu")
    lines = [
        "| vectors | k | projector | RMS·√k | max error (mean of 10) | max error (worst seed) |",
        "|---|---|---|---|---|---|",
    ]
    for kind in ("spread", "concentrated"):
        for k in (256, 1024):
            for name, config in configs.items():
                rms, worst = [], []
                for seed in range(seeds):
                    x = quality_vectors(kind, 100 + seed).double()
                    px = config.build(shapes, k, seed, 0, cpu).project(x.float()).double()
                    norms = x.norm(dim=1)
                    err = (px @ px.T - x @ x.T) / (norms[:, None] * norms[None, :])
                    i, j = torch.triu_indices(40, 40, 0)
                    pairs = err[i, j].abs()
                    rms.append(pairs.pow(2).mean().sqrt().item() * k**0.5)
                    worst.append(pairs.max().item())
                row = {
                    "bench": "projection_quality",
                    "vectors": kind,
                    "k": k,
                    "projector": name,
                    "rms_sqrt_k": round(sum(rms) / seeds, 2),
                    "max_error_mean": round(sum(worst) / seeds, 3),
                    "max_error_worst": round(max(worst), 3),
                }
                print(json.dumps(row), flush=True)
                lines.append(
                    f"| {kind} | {k} | {name} | {row['rms_sqrt_k']:.2f} "
                    f"| {row['max_error_mean']:.3f} | {row['max_error_worst']:.3f} |"
                )
    print("\n".join(lines), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~20 s smoke run")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--sizes", nargs="+", choices=list(LAYOUTS), help="model sizes to run")
    parser.add_argument("--ks", type=int, nargs="+", help="projection dimensions to run")
    parser.add_argument("--quality", action="store_true", help="inner-product errors, no timing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quality:
        quality()
        return
    if args.quick:
        sizes, ks = ["25k", "100k"], [512, 2048]
        args.min_total, args.max_calls = 0.0, 2
    else:
        sizes, ks = list(LAYOUTS), [512, 1024, 2048, 8192]
        args.min_total, args.max_calls = 1.0, 10
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
