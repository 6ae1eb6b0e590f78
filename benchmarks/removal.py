"""The counterfactual removal check on the digits MLP of ``fasttrak.demo``.

For 20 targets (drawn once from the demo's 300) and k in {10, 50}: retrain the demo MLP
(1000 training digits, full-batch Adam, 200 steps) without each target's top-k proponents,
and without k random training examples (5 draws), each with 3 training seeds, and compare
the change of the target's margin (paired by seed) with ``ft.evaluate.removal``. Attributions:

* ``trak``: the demo's TRAK scores (5 models trained on random halves, k = 1024, default
  estimator), what ``fasttrak demo`` computes;
* ``pixel``: a trivial baseline, the cosine similarity of the raw pixels signed by label
  agreement (``fasttrak.demo.pixel_baselines``): nearest same-class neighbours.

One JSON line per (attribution, k): mean change ± standard error over targets for the top-k
removal and the random removal, their difference, the fraction of targets whose margin fell
more than under random removal, the fraction of (seed, target) pairs whose prediction
flipped, and the models trained. The retrained outputs are cached in ``--cache``
(resumable; the full-data and random models are shared by both attributions).
Usage (about 3 minutes on one thread)::

    python benchmarks/removal.py [--cache /tmp/fasttrak-removal] [--targets 20] [--seeds 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import fasttrak as ft  # noqa: E402
from fasttrak import demo  # noqa: E402


def flipped(full: np.ndarray, removed: np.ndarray) -> float:
    """Fraction of the (seed, target) pairs with a positive margin on all the data (``full``,
    (S, T)) whose margin is negative in ``removed`` ((S, T), or (R, S, T): mean over R)."""
    if removed.ndim == 3:
        return float(np.mean([flipped(full, r) for r in removed]))
    right = full > 0
    return float(((removed < 0) & right).sum() / max(int(right.sum()), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default="/tmp/fasttrak-removal")
    parser.add_argument("--targets", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--random", type=int, default=5)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = demo.load_data(num_targets=300, seed=0)
    start = time.perf_counter()
    scores, _ = demo.attribute(data, num_models=5, store=None, progress=False)
    attributions = {
        "trak": scores,
        "pixel": demo.pixel_baselines(data)["pixel cosine x label sign"],
    }
    attributed = time.perf_counter() - start
    targets = np.sort(np.random.default_rng(0).choice(data.num_targets, args.targets, False))

    def margins(mask: np.ndarray, seed: int) -> torch.Tensor:
        return demo.target_margins(demo.train(data, mask, seed), data)

    key = json.dumps({"benchmark": "removal-digits-mlp", **asdict(demo.TrainConfig())})
    lines = []
    for k in args.ks:
        for name, attribution in attributions.items():
            begin = time.perf_counter()
            result = ft.evaluate.removal(
                margins,
                attribution,
                k=k,
                targets=targets.tolist(),
                num_random=args.random,
                seeds=args.seeds,
                cache_dir=args.cache,
                key=key,
                progress=False,
            )
            line = {
                "case": "digits-mlp",
                "attribution": name,
                "k": k,
                "targets": len(targets),
                "seeds": args.seeds,
                "random_draws": args.random,
                "top_delta": round(result.top_mean, 4),
                "top_se": round(result.top_se, 4),
                "random_delta": round(result.random_mean, 4),
                "random_se": round(result.random_se, 4),
                "difference": round(result.difference_mean, 4),
                "difference_se": round(result.difference_se, 4),
                # (target, seed) pairs predicted right on all the data and wrong without the
                # top-k (or, for random, without a random k-subset: mean over draws).
                "prediction_flipped": round(flipped(result.full, result.top), 3),
                "prediction_flipped_random": round(flipped(result.full, result.random), 3),
                "fraction_lower": round(result.fraction_lower, 3),
                "full_margin": round(float(result.full.mean()), 4),
                "models_trained": result.trained,
                "seconds": round(time.perf_counter() - begin, 1),
                "seconds_attribution": round(attributed, 1),
                "per_target_top_delta": [round(float(v), 3) for v in result.top_delta],
            }
            print(json.dumps(line), flush=True)
            lines.append(line)
    if args.out:
        with open(args.out, "a") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
