"""Saturated models and the Gauss-Newton kernel: LDS and score scale of guards on R = p (1 - p).

The Gauss-Newton kernel Φᵀ R Φ + λ I weights training row i by R_i = p_i (1 - p_i) =
Q_i (1 - Q_i). A model trained to near-zero loss (or with huge logits) has R_i ≈ Q_i ≈ 0 on
most rows: the kernel is then built from the few rows that are not yet fitted, its relative
ridge shrinks with its trace, and the scores grow like 1 / mean(R). This script trains
models at increasing saturation on three problems, each case with a ground truth retrained
the same way (random halves, ``ft.evaluate.retrain``):

- ``digits_mlp``: the demo's MLP on sklearn digits (1,000 train rows, 100 targets, 5 models
  on random halves, default SRHT k = 1024 with 4 kernel blocks). Saturated by a temperature c
  (the last layer's weights and bias times c, in the attribution models and the ground truth
  alike), and by training without weight decay (200 steps; 600 steps on inputs x 4).
- ``breast_cancer_logreg``: scikit-learn's LogisticRegression on the breast-cancer data (400
  train rows, 100 targets; one model on all rows, no projection, k = p = 62) with C from 0.1
  (as in tests/test_quality.py) to 1e7, and temperatures 3 to 100 on C = 0.1.
- ``blobs3_logreg``: generated separable 3-class data (make_classification), 400 train rows,
  100 targets, multinomial LogisticRegression(C=1) on inputs scaled by 1 to 100, and a
  temperature 30.

For every case it prints one JSON line: the saturation (``saturated``: fraction of training
rows with Q < 1e-6 or 1 - Q < 1e-6; ``q_zero``: Q == 0 in float32; ``mean_r``; ``ess``: the
effective number of rows (Σ R)² / Σ R² of the Gauss-Newton weights), then per estimator the
LDS, its stderr, ``lds_minus_plain``, ``scale_vs_plain`` (root mean square of the scores over
the plain kernel's), ``slope`` (median over targets of the least-squares slope of the true
outputs on the predicted subset sums: 1 when the scores have the scale of the true effects)
and ``diff_vs_gauss_newton`` (largest relative difference of the scores to today's
Gauss-Newton kernel: 0 where a guard leaves the kernel alone), all from the same process.

The estimators: the plain kernel and today's Gauss-Newton kernel through
``ft.TRAK(..., kernel=...)``, and candidate guards on R computed here from the stored features
with :mod:`fasttrak.kernel` (``library_check``: the largest relative difference between this
script's plain / Gauss-Newton scores and ``trak.score``). ``library`` is the guard in
:func:`fasttrak.kernel.gauss_newton_weights` (the same as ``floor_ess_0.1``). Finally a table
and each estimator's worst case over all cases (its LDS minus the better of the plain and
Gauss-Newton kernels' in that case), to stderr.

Usage::

    python benchmarks/saturation.py > saturation.jsonl      # 2-3 min on 1 CPU core
    python benchmarks/saturation.py --problems breast_cancer_logreg   # ~10 s
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import fasttrak as ft
from fasttrak import demo, kernel
from fasttrak.tasks.classification import margin_from_logits

Weights = Callable[[np.ndarray, int], np.ndarray | None]
"""(Q (n,) of one model, k) -> kernel weights R' (n,) float64, or None for the plain kernel."""


def _r(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    return q * (1.0 - q)


def floor_mean(eps: float) -> Weights:
    """(a) R' = max(R, eps · mean R)."""
    return lambda q, k: np.maximum(_r(q), eps * _r(q).mean())


def floor_max(eps: float) -> Weights:
    """(a) R' = max(R, eps · max R)."""
    return lambda q, k: np.maximum(_r(q), eps * _r(q).max())


def floor_abs(value: float) -> Weights:
    """(b) R' = max(R, value)."""
    return lambda q, k: np.maximum(_r(q), value)


def fallback_plain(fraction: float) -> Weights:
    """(c) The plain kernel when more than ``fraction`` of the rows are saturated."""

    def weights(q: np.ndarray, k: int) -> np.ndarray:
        r = _r(q)
        return np.ones_like(r) if (r < kernel.SATURATED_Q).mean() > fraction else r

    return weights


def add_mean(eps: float) -> Weights:
    """(d) R' = R + eps · mean R."""
    return lambda q, k: _r(q) + eps * _r(q).mean()


def floor_ess(fraction: float) -> Weights:
    """(e) R' = max(R, f) with the smallest f such that the weights rest on at least
    fraction · min(n, k) effective rows; R itself when they already do."""

    def weights(q: np.ndarray, k: int) -> np.ndarray:
        r = _r(q)
        want = min(fraction * min(r.size, k), r.size)
        if kernel.effective_rows(r) >= want:
            return r
        lo, hi = 0.0, float(r.max()) if r.max() > 0 else 1.0
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if kernel.effective_rows(np.maximum(r, mid)) >= want else (mid, hi)
        return np.maximum(r, hi)

    return weights


def temper_ess(fraction: float) -> Weights:
    """(f) R' = R^α with the largest α in [0, 1] such that R' rests on at least
    fraction · min(n, k) effective rows (a lower temperature on log R)."""

    def weights(q: np.ndarray, k: int) -> np.ndarray:
        r = np.maximum(_r(q), 1e-45)  # Q is stored in float32: Q = 0 means Q < 1.4e-45
        want = min(fraction * min(r.size, k), r.size)
        if kernel.effective_rows(r) >= want:
            return r
        log_r = np.log(r) - np.log(r).max()
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            enough = kernel.effective_rows(np.exp(mid * log_r)) >= want
            lo, hi = (mid, hi) if enough else (lo, mid)
        return np.exp(lo * log_r)

    return weights


def library_guard(q: np.ndarray, k: int) -> np.ndarray:
    """The guard implemented in :func:`fasttrak.kernel.gauss_newton_weights`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kernel.SaturationWarning)
        return kernel.gauss_newton_weights(q, k)


ESTIMATORS: dict[str, Weights] = {
    "plain": lambda q, k: None,
    "gauss_newton": lambda q, k: _r(q),
    "floor_mean_1e-2": floor_mean(1e-2),
    "floor_mean_1e-1": floor_mean(1e-1),
    "floor_max_1e-3": floor_max(1e-3),
    "floor_max_1e-2": floor_max(1e-2),
    "floor_abs_1e-6": floor_abs(1e-6),
    "floor_abs_1e-4": floor_abs(1e-4),
    "floor_abs_1e-2": floor_abs(1e-2),
    "fallback_plain_0.5": fallback_plain(0.5),
    "add_mean_1e-1": add_mean(1e-1),
    "temper_ess_0.1": temper_ess(0.1),
    "floor_ess_0.03": floor_ess(0.03),
    "floor_ess_0.05": floor_ess(0.05),
    "floor_ess_0.1": floor_ess(0.1),
    "floor_ess_0.2": floor_ess(0.2),
    "floor_ess_0.3": floor_ess(0.3),
    "library": library_guard,
}


# ---------------------------------------------------------------------- cases


@dataclass
class Case:
    """One trained setting: attribution checkpoints, data and retrained ground truth."""

    problem: str
    name: str
    model: nn.Module
    states: list[dict[str, torch.Tensor]]
    train: tuple[torch.Tensor, torch.Tensor]
    targets: tuple[torch.Tensor, torch.Tensor]
    masks: np.ndarray
    outputs: np.ndarray
    options: dict[str, Any] = field(default_factory=dict)


def _scaled_state(state: dict[str, torch.Tensor], names: tuple[str, ...], c: float) -> dict:
    return {k: (v * c if k in names else v).clone() for k, v in state.items()}


def digits_mlp_cases(subsets: int, models: int) -> list[Case]:
    """Demo MLP: temperatures 1, 4, 16, 64 on the demo recipe (200 steps of Adam, weight decay
    1e-3); and trained without weight decay: 200 steps, and 600 steps on inputs x 4."""
    data = demo.load_data(num_targets=100, seed=0)
    last = ("2.weight", "2.bias")
    options = {"proj_dim": demo.DEFAULT_PROJ_DIM, "batch_size": 250, "vmap_chunk_size": None}
    cases = []

    config = demo.TrainConfig()
    states = demo.train_attribution_models(data, models, seed=0, config=config, progress=False)
    masks = ft.evaluate.sample_subsets(data.num_train, subsets, 0.5, seed=0)

    def logits(mask: np.ndarray, seed: int) -> np.ndarray:  # (targets * 10,) flattened
        model = demo.train(data, mask, seed, config)
        with torch.no_grad():
            return model(data.x_target).double().flatten()

    masks, flat = ft.evaluate.retrain(logits, masks, progress=False)
    target_logits = torch.from_numpy(flat).reshape(subsets, data.num_targets, 10)
    for c in (1.0, 4.0, 16.0, 64.0):
        outputs = np.stack(
            [margin_from_logits(c * lg, data.y_target).double().numpy() for lg in target_logits]
        )
        cases.append(
            Case(
                "digits_mlp",
                f"temperature {c:g}",
                demo.make_model(config),
                [_scaled_state(s, last, c) for s in states],
                (data.x_train, data.y_train),
                (data.x_target, data.y_target),
                masks,
                outputs,
                options,
            )
        )

    for name, recipe, scale in (
        ("200 steps, no decay", demo.TrainConfig(weight_decay=0.0), 1.0),
        ("600 steps, no decay, inputs x4", demo.TrainConfig(steps=600, weight_decay=0.0), 4.0),
    ):
        scaled = demo.DigitsData(
            data.x_train * scale, data.y_train, data.x_target * scale, data.y_target
        )
        states = demo.train_attribution_models(
            scaled, models, seed=0, config=recipe, progress=False
        )
        masks, outputs = demo.ground_truth(scaled, subsets, None, 0, config=recipe, progress=False)
        cases.append(
            Case(
                "digits_mlp",
                name,
                demo.make_model(recipe),
                states,
                (scaled.x_train, scaled.y_train),
                (scaled.x_target, scaled.y_target),
                masks,
                outputs,
                options,
            )
        )
    return cases


def _logreg_cases(
    problem: str,
    x: np.ndarray,
    y: np.ndarray,
    settings: list[tuple[str, float, float, float]],
    subsets: int,
) -> list[Case]:
    """sklearn LogisticRegression (binary or multinomial) as a torch Linear, one model on all
    400 training rows; 100 targets. ``settings``: (name, C, input scale, temperature)."""
    order = np.random.default_rng(0).permutation(len(x))
    rows = {"train": order[:400], "target": order[400:500]}
    masks = ft.evaluate.sample_subsets(400, subsets, 0.5, seed=1)
    return [
        _logreg_case(problem, name, x * scale, y, rows, masks, c, temperature)
        for name, c, scale, temperature in settings
    ]


def _logreg_case(
    problem: str,
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    rows: dict[str, np.ndarray],
    masks: np.ndarray,
    c: float,
    temperature: float,
) -> Case:
    from sklearn.linear_model import LogisticRegression

    train, target = rows["train"], rows["target"]
    classes = int(y.max()) + 1

    def fit(mask: np.ndarray) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=10_000, tol=1e-10).fit(
            x[train][mask], y[train][mask]
        )

    def weights(clf: LogisticRegression) -> tuple[np.ndarray, np.ndarray]:
        """(classes, d) and (classes,): binary logits (0, w·x + b), as sklearn's margin."""
        coef, bias = clf.coef_, clf.intercept_
        if classes == 2:
            coef = np.concatenate([np.zeros_like(coef), coef])
            bias = np.concatenate([np.zeros_like(bias), bias])
        return coef * temperature, bias * temperature

    def margins(mask: np.ndarray, seed: int) -> torch.Tensor:
        coef, bias = weights(fit(mask))
        logits = torch.from_numpy(x[target] @ coef.T + bias)
        return margin_from_logits(logits.double(), torch.from_numpy(y[target]))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs may stop early on separable data
        _, outputs = ft.evaluate.retrain(margins, masks, progress=False)
        coef, bias = weights(fit(np.ones(len(train), dtype=bool)))
    state = {
        "weight": torch.tensor(coef, dtype=torch.float32),
        "bias": torch.tensor(bias, dtype=torch.float32),
    }
    data = {
        part: (torch.tensor(x[r], dtype=torch.float32), torch.tensor(y[r]))
        for part, r in rows.items()
    }
    return Case(
        problem,
        name,
        nn.Linear(x.shape[1], classes),
        [state],
        data["train"],
        data["target"],
        masks,
        outputs,
        {"projector": "identity", "kernel_blocks": 1},
    )


def breast_cancer_cases(subsets: int) -> list[Case]:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    settings = [(f"C={c:g}", c, 1.0, 1.0) for c in (0.1, 10.0, 1e3, 1e5, 1e7)]
    settings += [(f"C=0.1, temperature {t:g}", 0.1, 1.0, t) for t in (3.0, 10.0, 30.0, 100.0)]
    return _logreg_cases("breast_cancer_logreg", x, y, settings, subsets)


def blobs_cases(subsets: int) -> list[Case]:
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=500,
        n_features=20,
        n_informative=8,
        n_redundant=0,
        n_classes=3,
        class_sep=3.0,
        flip_y=0.0,
        random_state=0,
    )
    x = (x - x.mean(0)) / x.std(0)
    settings = [(f"inputs x{s:g}", 1.0, s, 1.0) for s in (1.0, 3.0, 10.0, 30.0, 100.0)]
    settings.append(("inputs x1, temperature 30", 1.0, 1.0, 30.0))
    return _logreg_cases("blobs3_logreg", x, y, settings, subsets)


# ---------------------------------------------------------------------- scores


def stored(trak: ft.TRAK, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Features Φ_m (n, k) float32 and Q_m (n,) of model m from the TRAK store."""
    model = trak.store.model(m)
    return np.asarray(model.features(), dtype=np.float32), np.asarray(model.q())


def guarded_scores(
    train: list[tuple[np.ndarray, np.ndarray]],
    targets: list[np.ndarray],
    weights: Weights,
    ridge: float,
    blocks: int,
) -> np.ndarray:
    """mean_m(Q) · mean_m φ_m(t)ᵀ K_m⁻¹ φ_m(i), K_m = Φᵀ R' Φ + λ I: (targets, n) float64."""
    n = train[0][0].shape[0]
    total = np.zeros((targets[0].shape[0], n))
    q_mean = np.zeros(n)
    for (phi, q), phi_t in zip(train, targets, strict=True):
        r = weights(q, phi.shape[1])
        rows = phi if r is None else phi * np.sqrt(r).astype(np.float32)[:, None]
        gram = kernel.gram([rows], phi.shape[1])
        factor = kernel.block_diagonal_factor(gram, ridge, n, blocks)
        solved = kernel.solve(factor, torch.from_numpy(phi_t).T).numpy() / blocks
        total += (phi.astype(np.float64) @ solved).T
        q_mean += q
    return total * (q_mean / len(train))[None, :] / len(train)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def calibration_slope(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> float:
    """Median over targets of the least-squares slope of the true outputs on the predicted
    subset sums: about 1 when the scores have the scale of the true effects."""
    pred = masks.astype(np.float64) @ scores.T
    pred = pred - pred.mean(0)
    true = outputs - outputs.mean(0)
    var = (pred * pred).sum(0)
    ok = var > 0
    return float(np.median((pred * true).sum(0)[ok] / var[ok])) if ok.any() else float("nan")


def run_case(case: Case, estimators: dict[str, Weights]) -> dict[str, Any]:
    """Featurize, score with every estimator and evaluate one case: its JSON row."""
    start = time.perf_counter()
    ridge = kernel.DEFAULT_RIDGE
    with tempfile.TemporaryDirectory() as tmp:

        def make(kind: str, where: str) -> ft.TRAK:
            return ft.TRAK(
                case.model,
                store=Path(tmp) / where,
                kernel=kind,
                ridge=ridge,
                progress=False,
                **case.options,
            )

        plain, gauss_newton = make("plain", "train"), make("gauss_newton", "train")
        plain.featurize(case.train, checkpoints=case.states)
        tgt = make("plain", "targets")  # the targets' features, same seed and checkpoints
        tgt.featurize(case.targets, checkpoints=case.states)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            library = {
                "plain": np.asarray(plain.score(case.targets), dtype=np.float64),
                "gauss_newton": np.asarray(
                    gauss_newton.score(case.targets, checkpoints=case.states), dtype=np.float64
                ),
            }
        train = [stored(plain, m) for m in range(len(case.states))]
        targets = [stored(tgt, m)[0] for m in range(len(case.states))]
        blocks = plain.kernel_blocks
    guarded = any(issubclass(w.category, kernel.SaturationWarning) for w in caught)
    sat = [kernel.saturation(q) for _, q in train]
    n = train[0][0].shape[0]
    row: dict[str, Any] = {
        "problem": case.problem,
        "case": case.name,
        "n": n,
        "targets": int(case.outputs.shape[1]),
        "subsets": int(case.masks.shape[0]),
        "models": len(train),
        "k": int(train[0][0].shape[1]),
        "blocks": blocks,
        "saturated": round(sum(s.saturated for s in sat) / (n * len(train)), 4),
        "q_zero": round(sum(s.zero_q for s in sat) / (n * len(train)), 4),
        "mean_r": float(f"{np.mean([_r(q).mean() for _, q in train]):.4g}"),
        "ess": round(float(np.mean([s.effective_rows for s in sat])), 1),
        "library_warned": guarded,
        "lds": {},
        "stderr": {},
        "lds_minus_plain": {},
        "scale_vs_plain": {},
        "slope": {},
        "diff_vs_gauss_newton": {},
        "library_check": {},
    }
    scores = {}
    for name, weights in estimators.items():
        try:
            scores[name] = guarded_scores(train, targets, weights, ridge, blocks)
        except (FloatingPointError, ValueError) as error:
            row.setdefault("errors", {})[name] = f"{type(error).__name__}: {str(error)[:100]}"
    # ft.TRAK's Gauss-Newton kernel is the guarded one: compared where the guard did not act.
    for name in ("plain",) if guarded else ("plain", "gauss_newton"):
        ref = library[name]
        row["library_check"][name] = float(
            f"{np.abs(scores[name] - ref).max() / np.abs(ref).max():.3g}"
        )
    plain_lds = None
    for name, s in scores.items():
        diff = np.abs(s - scores["gauss_newton"]).max() / np.abs(scores["gauss_newton"]).max()
        row["diff_vs_gauss_newton"][name] = float(f"{diff:.3g}")
        try:
            result = ft.evaluate.lds(s, case.masks, case.outputs)
        except ValueError as error:  # constant or non-finite scores
            row.setdefault("errors", {})[name] = f"LDS: {str(error)[:100]}"
            continue
        plain_lds = result.mean if name == "plain" else plain_lds
        row["lds"][name] = round(result.mean, 4)
        row["stderr"][name] = round(result.stderr, 4)
        row["lds_minus_plain"][name] = round(result.mean - plain_lds, 4)
        row["scale_vs_plain"][name] = float(f"{rms(s) / rms(scores['plain']):.4g}")
        row["slope"][name] = float(f"{calibration_slope(s, case.masks, case.outputs):.4g}")
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def summary(rows: list[dict[str, Any]], names: list[str]) -> None:
    """LDS table and each estimator's worst cases over all cases, to stderr."""
    err = sys.stderr
    short = {n: n.replace("floor_", "f_").replace("gauss_newton", "GN") for n in names}
    print(f"\n{'case':<44}{'sat':>5}" + "".join(f"{short[n][:11]:>12}" for n in names), file=err)
    regrets: dict[str, list[tuple[float, str]]] = {n: [] for n in names}
    for row in rows:
        lds = row["lds"]
        best = max(lds.get("plain", -1.0), lds.get("gauss_newton", -1.0))
        label = f"{row['problem'].split('_')[0]}: {row['case']}"
        for n in names:
            regrets[n].append((lds[n] - best if n in lds else -1.0, label))
        cells = "".join(f"{lds[n]:>12.3f}" if n in lds else f"{'fail':>12}" for n in names)
        print(f"{label[:43]:<44}{row['saturated']:>5.2f}" + cells, file=err)
    print("\nLDS minus max(plain, Gauss-Newton): worst, second worst, mean over cases;", file=err)
    print("unchanged: cases where the scores equal today's Gauss-Newton kernel's", file=err)
    order = sorted(names, key=lambda n: -min(regrets[n])[0])
    for n in order:
        ranked = sorted(regrets[n])
        same = sum(row["diff_vs_gauss_newton"].get(n, 1.0) == 0 for row in rows)
        print(
            f"  {n:<20}{ranked[0][0]:>+7.3f} ({ranked[0][1]}) {ranked[1][0]:>+7.3f} "
            f"mean {statistics.fmean(r for r, _ in ranked):>+7.3f}  unchanged {same}/{len(rows)}",
            file=err,
        )


PROBLEMS = ("digits_mlp", "breast_cancer_logreg", "blobs3_logreg")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    parser.add_argument("--subsets", type=int, default=50, help="ground-truth retrainings")
    parser.add_argument("--models", type=int, default=5, help="attribution models (digits_mlp)")
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names = dict.fromkeys(["plain", "gauss_newton", *args.estimators])
    estimators = {n: ESTIMATORS[n] for n in names}
    rows = []
    for problem in args.problems:
        start = time.perf_counter()
        if problem == "digits_mlp":
            cases = digits_mlp_cases(args.subsets, args.models)
        elif problem == "breast_cancer_logreg":
            cases = breast_cancer_cases(args.subsets)
        else:
            cases = blobs_cases(args.subsets)
        print(f"# {problem}: cases trained in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        for case in cases:
            row = run_case(case, estimators)
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary(rows, list(estimators))


if __name__ == "__main__":
    main()
