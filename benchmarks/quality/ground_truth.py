"""Retrained ground truth, noise ceiling and attribution checkpoints of every case.

    python -m benchmarks.quality.ground_truth                    # all cases (~20 min, 1 core)
    python -m benchmarks.quality.ground_truth --cases lr_cancer,text_bag

Per case, under ``runs/quality/<case>/`` (resumable: a rerun trains only what is missing):

* ``ground_truth/``: ``fasttrak.evaluate.retrain`` cache of NUM_SUBSETS random halves
  (``sample_subsets(n, NUM_SUBSETS, alpha=0.5, seed=0)``), subset s trained with seed s;
  the outputs are the target margins (what fasttrak attributes).
* ``ground_truth_b/``: the same subsets retrained with seeds s + SECOND_SEED_OFFSET.
* ``checkpoints/model_<m>.pt``: the attribution checkpoints, state dicts of models trained
  on ALL training rows with seed 1000 + m, m < case.num_models.
* ``summary.json``: n, p, targets, seconds per training, the noise ceiling.

Noise ceiling: for each target t, the Spearman correlation over the subsets s between the
margins of the two retrainings, A[s, t] and B[s, t]; averaged over targets (with its
standard error over targets). It is the LDS that retraining once more with other seeds
would score as an "attribution" of retraining A, so no linear datamodel that must also
predict the seed noise can be expected to score much above it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

import fasttrak as ft
from benchmarks.quality.cases import Case, select

ROOT = Path("runs/quality")
NUM_SUBSETS = 100
SUBSET_SEED = 0
SECOND_SEED_OFFSET = 100_000
CHECKPOINT_SEED = 1000


def case_dir(case: Case) -> Path:
    return ROOT / case.name


def masks_of(case: Case) -> np.ndarray:
    return ft.evaluate.sample_subsets(case.data().n, NUM_SUBSETS, 0.5, seed=SUBSET_SEED)


def ground_truth(case: Case, second: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(masks (S, n), margins (S, n_targets)) of the first (or second) retraining;
    trains whatever is not cached yet."""
    offset = SECOND_SEED_OFFSET if second else 0
    return ft.evaluate.retrain(
        case.train_fn(offset),
        masks_of(case),
        cache_dir=case_dir(case) / ("ground_truth_b" if second else "ground_truth"),
        key=json.dumps({"case": case.name, "seed_offset": offset}),
        progress=False,
    )


def checkpoint_path(case: Case, m: int) -> Path:
    return case_dir(case) / "checkpoints" / f"model_{m}.pt"


def checkpoints(case: Case, count: int | None = None) -> list[dict[str, torch.Tensor]]:
    """State dicts of the first ``count`` (default all) attribution checkpoints, trained on
    every training row with seed CHECKPOINT_SEED + m (cached)."""
    states = []
    n = case.data().n
    for m in range(case.num_models if count is None else count):
        path = checkpoint_path(case, m)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            model = case.train(np.ones(n, dtype=bool), CHECKPOINT_SEED + m)
            tmp = path.with_suffix(".tmp")
            torch.save(model.state_dict(), tmp)
            tmp.replace(path)
        states.append(torch.load(path, weights_only=True))
    return states


def noise_ceiling(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean over targets of the Spearman correlation over subsets between two retrainings'
    outputs (S, T), and its standard error over targets."""
    ra, rb = rankdata(a, axis=0), rankdata(b, axis=0)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    rho = (ra * rb).sum(0) / np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))
    rho = rho[np.isfinite(rho)]
    return float(rho.mean()), float(rho.std(ddof=1) / math.sqrt(len(rho)))


def summary(case: Case) -> dict:
    """Build (or load) everything for one case and write its summary.json."""
    path = case_dir(case) / "summary.json"
    data = case.data()
    start = time.perf_counter()
    _, first = ground_truth(case)
    _, second = ground_truth(case, second=True)
    gt_seconds = time.perf_counter() - start
    start = time.perf_counter()
    checkpoints(case)
    ckpt_seconds = time.perf_counter() - start
    old = json.loads(path.read_text()) if path.exists() else {}
    half = np.zeros(data.n, dtype=bool)
    half[: data.n // 2] = True
    start = time.perf_counter()
    case.train(half, 0)
    train_seconds = time.perf_counter() - start
    ceiling, ceiling_se = noise_ceiling(first, second)
    result = {
        "case": case.name,
        "family": case.family,
        "description": case.description,
        "n": data.n,
        "p": case.p,
        "targets": data.num_targets,
        "subsets": NUM_SUBSETS,
        "num_models": case.num_models,
        "train_half_seconds": train_seconds,
        "noise_ceiling": ceiling,
        "noise_ceiling_se": ceiling_se,
        # the first build's seconds are kept (a rerun only loads the cache)
        "ground_truth_seconds": max(gt_seconds, old.get("ground_truth_seconds", 0.0)),
        "checkpoint_seconds": max(ckpt_seconds, old.get("checkpoint_seconds", 0.0)),
    }
    path.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for case in select(args.cases):
        r = summary(case)
        print(
            f"{r['case']:18s} n={r['n']:5d} p={r['p']:6d} train {r['train_half_seconds']:.2f}s "
            f"ground truth {r['ground_truth_seconds']:.0f}s noise ceiling "
            f"{r['noise_ceiling']:.3f} ± {r['noise_ceiling_se']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
