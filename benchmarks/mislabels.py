"""Finding flipped labels: TRAK's signals against a plain loss ranking, on memorised noise.

Four cases; the combination used by ``ft.cleaning`` was chosen on the two *development*
cases and only checked on the other two (nothing was chosen there):

* ``blobs`` (dev): a generated 10-class Gaussian mixture in 20 dimensions (class means drawn
  from N(0, I), within-class noise 1.2 I), 1000 training rows; MLP 20 -> 128 -> 10 with
  weight decay 7e-3.
* ``blobs_easy`` (dev): the same with within-class noise 0.9 and weight decay 5e-3 (the first
  case tried: every method had AUROC >= 0.98 there, so the harder ``blobs`` was added).
* ``digits`` (check): scikit-learn's 8x8 digits, 1000 training rows; MLP 64 -> 128 -> 10
  with weight decay 2e-3.
* ``digits_strong`` (check): the same with weight decay 1e-3: most of the noise memorised.

Per dataset and seed: 10% of the training labels are flipped to another class at random; the
MLP is trained full-batch with Adam (lr 1e-2, 1000 steps); the weight decay of each dataset
was set (by training alone, before ranking anything) so that the final model fits part of the
flipped rows to their wrong label ("memorised"; the rate is reported per case). Checkpoints
after 100, 250, 500 and 1000 steps are featurized (k = 1024, default estimator); the
targets are 300 held-out rows with their true labels. Every method ranks the 1000 training
rows; metrics against the flipped set (m = 100 rows):

* ``auroc``: area under the ROC curve of the ranking (flipped = positive);
* ``found@m``, ``found@2m``: fraction of flipped rows among the top m and 2m (at most 0.5);
* ``auroc_memorised`` / ``auroc_unfit``: AUROC of the memorised / not memorised flipped rows
  against the clean rows (what the loss cannot / can see).

Methods: ``loss_final`` (the final model's cross-entropy, the plain baseline), ``q`` (Q =
1 - p(label) averaged over the checkpoints), ``loss`` (-log p averaged over checkpoints),
``self_influence`` (default estimator, and ``self_influence_plain`` with the paper's
kernel), ``total_influence`` (minus the sum of the scores over the clean targets), the rank
averages ``rank(a+b+...)`` of every subset of {self_influence, total_influence, q}, and
``combined``: what ``ft.cleaning.suspected_mislabels`` returns by default. The rule that chose
it, fixed before the check cases were run: of the rank averages, the one with the highest
mean AUROC over the development cases' seeds.

One JSON line per (dataset, seed, method), then one summary line per (dataset, method) with
the means over seeds and the ratios to ``loss_final`` (``ratio_*``) and to ``q``
(``ratio_q_*``). Usage (about 10 s per dataset and seed on one thread, 2 minutes for all)::

    python benchmarks/mislabels.py [--datasets blobs digits ...] [--seeds 0 1 2] [--out FILE]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import rankdata  # noqa: E402
from torch import nn  # noqa: E402

import fasttrak as ft  # noqa: E402
from fasttrak import cleaning  # noqa: E402

NUM_TRAIN, NUM_TARGETS, CLASSES = 1000, 300, 10
FLIP_FRACTION = 0.1
STEPS, SNAPSHOTS, LR = 1000, (100, 250, 500, 1000), 1e-2
HIDDEN = 128
WEIGHT_DECAY = {"blobs": 7e-3, "blobs_easy": 5e-3, "digits": 2e-3, "digits_strong": 1e-3}
"""Set so that the final model memorises part of the flipped rows (measured on seed 0 by
training alone, before any ranking was computed)."""
BLOB_NOISE = {"blobs": 1.2, "blobs_easy": 0.9}
"""Within-class standard deviation of the Gaussian mixtures (class means ~ N(0, I))."""
PROJ_DIM = 1024
DEV, CHECK = ("blobs", "blobs_easy"), ("digits", "digits_strong")
COMPONENTS = ("self_influence", "total_influence", "q")


@dataclass
class Case:
    name: str
    x_train: torch.Tensor
    y_true: torch.Tensor
    y_noisy: torch.Tensor
    flipped: np.ndarray  # (n_train,) bool
    x_target: torch.Tensor
    y_target: torch.Tensor


def load(name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """NUM_TRAIN + NUM_TARGETS rows (x float32, y int64) of dataset ``name`` for ``seed``."""
    n = NUM_TRAIN + NUM_TARGETS
    if name in BLOB_NOISE:
        rng = np.random.default_rng(1000 + seed)
        centers = rng.normal(0.0, 1.0, (CLASSES, 20))
        y = rng.integers(0, CLASSES, n)
        x = centers[y] + BLOB_NOISE[name] * rng.normal(0.0, 1.0, (n, 20))
        return x.astype(np.float32), y.astype(np.int64)
    if name in ("digits", "digits_strong"):
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        order = np.random.default_rng(seed).permutation(len(x))[:n]
        return (x[order] / 16.0).astype(np.float32), y[order].astype(np.int64)
    raise SystemExit(f"unknown dataset {name!r}: use one of {sorted(WEIGHT_DECAY)}")


def make_case(name: str, seed: int) -> Case:
    x, y = load(name, seed)
    rng = np.random.default_rng(2000 + seed)
    flip = rng.choice(NUM_TRAIN, round(FLIP_FRACTION * NUM_TRAIN), replace=False)
    noisy = y[:NUM_TRAIN].copy()
    noisy[flip] = (noisy[flip] + rng.integers(1, CLASSES, flip.size)) % CLASSES
    flipped = np.zeros(NUM_TRAIN, dtype=bool)
    flipped[flip] = True
    t = torch.from_numpy
    return Case(
        name,
        t(x[:NUM_TRAIN]),
        t(y[:NUM_TRAIN]),
        t(noisy),
        flipped,
        t(x[NUM_TRAIN:]),
        t(y[NUM_TRAIN:]),
    )


def make_model(d_in: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def train(case: Case, seed: int) -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    """Full-batch Adam on the noisy labels; the state dicts after each of SNAPSHOTS steps."""
    torch.manual_seed(seed)
    model = make_model(case.x_train.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY[case.name])
    snaps = []
    for step in range(1, STEPS + 1):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(case.x_train), case.y_noisy).backward()
        opt.step()
        if step in SNAPSHOTS:
            snaps.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return model.eval(), snaps


def auroc(score: np.ndarray, positive: np.ndarray, negative: np.ndarray | None = None) -> float:
    """Mann-Whitney AUROC of ``score`` for rows ``positive`` against ``negative`` (default:
    every other row); ties count one half."""
    negative = ~positive if negative is None else negative
    pos, neg = score[positive], score[negative]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def metrics(score: np.ndarray, flipped: np.ndarray, memorised: np.ndarray) -> dict[str, float]:
    m = int(flipped.sum())
    order = np.argsort(-score, kind="stable")
    return {
        "auroc": auroc(score, flipped),
        "found@m": float(flipped[order[:m]].mean()),
        "found@2m": float(flipped[order[: 2 * m]].mean()),
        "auroc_memorised": auroc(score, flipped & memorised, ~flipped),
        "auroc_unfit": auroc(score, flipped & ~memorised, ~flipped),
    }


def run_case(name: str, seed: int) -> list[dict]:
    torch.set_num_threads(1)
    case = make_case(name, seed)
    start = time.perf_counter()
    model, snaps = train(case, seed)
    with torch.no_grad():
        logits = model(case.x_train)
        loss_final = nn.functional.cross_entropy(logits, case.y_noisy, reduction="none").numpy()
        memorised = (logits.argmax(1) == case.y_noisy).numpy() & case.flipped
        test_acc = float((model(case.x_target).argmax(1) == case.y_target).float().mean())
    trained = time.perf_counter() - start
    trak = ft.TRAK(make_model(case.x_train.shape[1]), proj_dim=PROJ_DIM, seed=seed, progress=False)
    trak.featurize((case.x_train, case.y_noisy), checkpoints=snaps)
    scores = trak.score((case.x_target, case.y_target))
    found = {
        method: cleaning.suspected_mislabels(trak, scores, method=method)
        for method in ("self_influence", "total_influence", "q", "loss", "combined")
    }
    raw = {method: r.components[method] for method, r in found.items() if method != "combined"}
    attributed = time.perf_counter() - start - trained
    suspicion = {
        "loss_final": loss_final.astype(np.float64),
        **{method: cleaning.SIGNS[method] * values for method, values in raw.items()},
        "self_influence_plain": trak.self_influence(estimator=ft.Estimator(kernel="plain")),
        "combined": found["combined"].score,
    }
    for size in (2, 3):
        for names in itertools.combinations(COMPONENTS, size):
            key = "rank(" + "+".join(names) + ")"
            suspicion[key] = cleaning.rank_average({c: raw[c] for c in names})
    info = {
        "dataset": name,
        "seed": seed,
        "role": "dev" if name in DEV else "check",
        "flipped": int(case.flipped.sum()),
        "memorised": int(memorised.sum()),
        "train_acc_flipped": round(float(memorised.sum() / case.flipped.sum()), 3),
        "test_acc": round(test_acc, 3),
        "combined_uses": list(found["combined"].combined),
        "seconds_train": round(trained, 1),
        "seconds_attribute": round(attributed, 1),
    }
    rows = []
    for method, score in suspicion.items():
        got = metrics(np.asarray(score, dtype=np.float64), case.flipped, memorised)
        rows.append({**info, "method": method, **{k: round(v, 4) for k, v in got.items()}})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    keys = ("auroc", "found@m", "found@2m", "auroc_memorised", "auroc_unfit")
    out = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        of = [r for r in rows if r["dataset"] == name]
        mean = {
            method: {
                k: float(np.nanmean([r[k] for r in of if r["method"] == method])) for k in keys
            }
            for method in dict.fromkeys(r["method"] for r in of)
        }
        for method, values in mean.items():
            line = {
                "summary": name,
                "role": of[0]["role"],
                "seeds": len({r["seed"] for r in of}),
                "method": method,
                **{k: round(v, 4) for k, v in values.items()},
            }
            for base, prefix in (("loss_final", "ratio_"), ("q", "ratio_q_")):
                for k in ("auroc", "found@m", "found@2m"):
                    line[prefix + k] = round(values[k] / mean[base][k], 3)
            line["train_acc_flipped"] = round(
                float(np.mean([r["train_acc_flipped"] for r in of])), 3
            )
            out.append(line)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=[*DEV, *CHECK])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args()
    rows: list[dict] = []
    lines = []
    for name in args.datasets:
        for seed in args.seeds:
            case_rows = run_case(name, seed)
            rows.extend(case_rows)
            for row in case_rows:
                print(json.dumps(row), flush=True)
                lines.append(row)
    for line in summarise(rows):
        print(json.dumps(line), flush=True)
        lines.append(line)
    if args.out:
        with open(args.out, "a") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
