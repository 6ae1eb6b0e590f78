"""Scoring throughput on a GPU: ``trak.finalize`` and ``trak.score`` against ``torch.matmul``.

Features: ``--n`` training rows of an MLP (64 -> 1024 -> 10, p = 76,810 > k), random inputs
and labels, featurized by ``ft.TRAK(..., proj_dim=k, store=None, device=...)`` with the
default projector and estimator (the row's ``kernel_blocks`` and ``precision`` say what the
defaults chose). Targets: ``--targets``
more random inputs. Then, each timed once by the host clock (CUDA synchronized), for each
(n, k) of the grid (default (65536, 2048) and (16384, 8192), 1024 targets), after one small
warm-up round (1024 rows, k = 256):

- ``featurize``: examples/s of the training featurize (for context);
- ``finalize``: building the kernel and its factor from the stored features; baseline
  ``torch.matmul(phi.T, phi)`` of a random (n, k) float32 matrix on the device (CUDA
  events, median), the whole kernel: ``ratio`` = baseline seconds / finalize seconds;
- ``score``: ``trak.score(targets)`` (the targets' features and the solve) plus
  ``np.asarray(scores)`` (the (targets, n) product, chunk by chunk from the store),
  ``score_s`` and ``dense_s`` separately; throughput in train rows x targets x k per second;
  baseline ``torch.matmul`` of (n, k) by (k, targets) on the device: ``ratio`` = fasttrak
  throughput / matmul throughput.

One ``"bench": "gpu_scoring"`` JSON line per (n, k, phase) with ``ratio`` and ``baseline``;
a markdown table on stderr. See docs/gpu.md.

Usage::

    python benchmarks/gpu_scoring.py                        # GPU: ~1 min on an H200
    python benchmarks/gpu_scoring.py --quick --device cpu   # smoke run, ~5 s
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
from gpu_featurize import emit, env_row, fill_defaults, kernel_seconds, wall
from torch import nn

import fasttrak as ft


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 10)).eval()


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def matmul_seconds(a: tuple[int, int], b: tuple[int, int], args: Any, transpose: bool) -> float:
    gen = torch.Generator(device=args.device).manual_seed(1)
    left = torch.randn(*a, device=args.device, generator=gen)
    right = left if transpose else torch.randn(*b, device=args.device, generator=gen)
    fn = (lambda: torch.matmul(left.T, left)) if transpose else lambda: torch.matmul(left, right)
    return statistics.median(kernel_seconds(fn, args.device, args.reps))


def bench(n: int, k: int, args: Any) -> list[dict[str, Any]]:
    model = make_model()
    train, targets = make_data(n, 0), make_data(args.targets, 1)
    trak = ft.TRAK(
        model,
        task=ft.tasks.ImageClassification(),
        proj_dim=k,
        store=None,
        device=args.device,
        batch_size=args.batch,
        progress=False,
    )
    featurize_s = wall(lambda: trak.featurize(train, checkpoints=[model.state_dict()]), args.device)
    finalize_s = wall(trak.finalize, args.device)
    out: dict[str, Any] = {}
    score_s = wall(lambda: out.setdefault("scores", trak.score(targets)), args.device)
    dense_s = wall(lambda: out.setdefault("dense", np.asarray(out["scores"])), args.device)
    assert out["dense"].shape == (args.targets, n) and np.isfinite(out["dense"]).all()
    gram_s = matmul_seconds((n, k), (n, k), args, transpose=True)
    product_s = matmul_seconds((n, k), (k, args.targets), args, transpose=False)
    base = {"bench": "gpu_scoring", "n": n, "k": k, "targets": args.targets, "p": 76810}
    chosen = trak.estimator.for_rows(n, k)
    base["kernel_blocks"], base["precision"] = chosen.kernel_blocks, chosen.precision
    work = n * args.targets * k
    return [
        {**base, "phase": "featurize", "seconds": round(featurize_s, 3)}
        | {"ex_per_s": round(n / featurize_s, 1), "ratio": None, "baseline": None},
        {**base, "phase": "finalize", "seconds": round(finalize_s, 3)}
        | {"baseline": "torch.matmul(phi.T, phi)", "baseline_s": round(gram_s, 5)}
        | {"ratio": round(gram_s / finalize_s, 4)},
        {**base, "phase": "score", "seconds": round(score_s + dense_s, 3)}
        | {"score_s": round(score_s, 3), "dense_s": round(dense_s, 3)}
        | {"rows_targets_k_per_s": round(work / (score_s + dense_s), 1)}
        | {"baseline": "torch.matmul(phi, x)", "baseline_s": round(product_s, 5)}
        | {"baseline_rows_targets_k_per_s": round(work / product_s, 1)}
        | {"ratio": round(product_s / (score_s + dense_s), 5)},
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: small sizes")
    parser.add_argument("--grid", nargs="+", help="n:k pairs, e.g. 65536:2048 16384:8192")
    parser.add_argument("--targets", type=int, help="target examples")
    parser.add_argument("--batch", type=int, help="featurize batch size")
    parser.add_argument("--reps", type=int, help="timed matmul calls (median)")
    args = parser.parse_args(argv)
    quick = {"grid": ["2048:256"], "targets": 64, "batch": 256, "reps": 3}
    full = {"grid": ["65536:2048", "16384:8192"], "targets": 1024, "batch": 1024, "reps": 10}
    fill_defaults(args, quick, full)
    args.device = torch.device(args.device)
    emit(env_row("gpu_scoring", args.device, args.quick))
    start, rows = time.perf_counter(), []
    bench(1024, 256, argparse.Namespace(**{**vars(args), "targets": 16, "reps": 1}))  # warm-up
    for pair in args.grid:
        n, k = (int(v) for v in pair.split(":"))
        for row in bench(n, k, args):
            emit(row)
            rows.append(row)
    emit(
        {"bench": "done", "script": "gpu_scoring", "seconds": round(time.perf_counter() - start, 1)}
    )
    lines = ["| n | k | phase | seconds | baseline s | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['k']} | {r['phase']} | {r['seconds']} "
            f"| {r.get('baseline_s', '-')} | {r['ratio']} |"
        )
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
