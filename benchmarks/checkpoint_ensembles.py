"""Checkpoints of one run as extra ensemble members: LDS at 5 trained models, same process.

The LDS-vs-cost study (docs/lds_vs_cost.md) found that on the digits CNN the default
estimator needs ~8 trained models to reach the LDS of the paper's estimator with 20. Model
training dominates the cost there, and checkpoints saved along each run cost no training.
This measures, on the study's CNN and MLP (same data, same cached ground truth: 100 halves x
2 seeds), the default estimator with

* ``final``: the 5 final models (the study's M = 5 point),
* ``thirds``: each run's checkpoints after a third, two thirds and all of its training steps
  (15 members; 20/40/60 Adam steps for the CNN, 67/133/200 for the MLP),
* ``final8``: 8 final models (what the CNN needed in the study),

and prints one JSON line per configuration with LDS ± standard error, CPU seconds
(training + featurize + score, one thread) and the LDS gain over ``final`` (paired over
targets). Usage (reuses the study's cache; builds the ground truth if it is missing)::

    python benchmarks/checkpoint_ensembles.py [--out /tmp/lds_vs_cost] [--kinds cnn mlp]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lds_vs_cost as study  # noqa: E402

import fasttrak as ft  # noqa: E402
from fasttrak import demo  # noqa: E402

SNAPSHOTS = {"cnn": (20, 40, 60), "mlp": (67, 133, 200)}  # a third, two thirds, the end


def train_with_snapshots(kind: str, data, mask, seed: int, steps: tuple[int, ...]):
    """The study's trainer (same seed, same full-batch Adam trajectory), keeping the weights
    after each step count in ``steps`` (the last equals the study's trained model)."""
    config = study.CNNConfig() if kind == "cnn" else demo.TrainConfig()
    mask_t = torch.as_tensor(np.asarray(mask, dtype=bool))
    x, y = data.x_train[mask_t], data.y_train[mask_t]
    with demo.torch_threads(1):
        torch.manual_seed(seed)
        model = study.make_cnn(config) if kind == "cnn" else demo.make_model(config)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        snaps = []
        for step in range(1, max(steps) + 1):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if step in steps:
                snaps.append({n: t.detach().clone() for n, t in model.state_dict().items()})
    return snaps


def evaluate(kind: str, data, checkpoints, truth) -> tuple[ft.evaluate.LDSResult, float]:
    model = study.make_cnn() if kind == "cnn" else demo.make_model()
    trak = ft.TRAK(model, proj_dim=1024, progress=False)  # the library's defaults
    start = time.process_time()
    trak.featurize((data.x_train, data.y_train), checkpoints=checkpoints)
    scores = np.asarray(trak.score((data.x_target, data.y_target)))
    seconds = time.process_time() - start
    masks, outputs = truth
    return ft.evaluate.lds(scores, masks, outputs), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/lds_vs_cost", help="the study's cache")
    parser.add_argument("--kinds", nargs="+", default=["cnn", "mlp"], choices=["cnn", "mlp"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = demo.load_data()
    for kind in args.kinds:
        masks, outputs, _ = study.ground_truth(
            study.KINDS[kind], data, 100, 2, Path(args.out), progress=False
        )
        halves = demo.half_masks(data.num_train, 8, 0)
        runs, train_s = [], []
        for m in range(8):
            start = time.process_time()
            runs.append(train_with_snapshots(kind, data, halves[m], 10_000 + m, SNAPSHOTS[kind]))
            train_s.append(time.process_time() - start)
        configs = {
            "final": ([run[-1] for run in runs[:5]], sum(train_s[:5])),
            "thirds": ([snap for run in runs[:5] for snap in run], sum(train_s[:5])),
            "final8": ([run[-1] for run in runs], sum(train_s)),
        }
        base = None
        for name, (checkpoints, seconds) in configs.items():
            result, attribution_s = evaluate(kind, data, checkpoints, (masks, outputs))
            if base is None:
                base = result
            gain = result.per_target - base.per_target
            ok = np.isfinite(gain)
            print(
                json.dumps(
                    {
                        "benchmark": "checkpoint_ensembles",
                        "model": kind,
                        "config": name,
                        "members": len(checkpoints),
                        "trained_models": 8 if name == "final8" else 5,
                        "lds": round(result.mean, 4),
                        "stderr": round(result.stderr, 4),
                        "gain_over_final": round(float(gain[ok].mean()), 4),
                        "gain_stderr": round(float(gain[ok].std(ddof=1) / np.sqrt(ok.sum())), 4),
                        "cpu_s": round(seconds + attribution_s, 2),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
