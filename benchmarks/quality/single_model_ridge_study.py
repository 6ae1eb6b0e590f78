"""A single-model (M = 1) auto-ridge scale from a ground-truth-free case statistic.

    OMP_NUM_THREADS=1 python -m benchmarks.quality.single_model_ridge_study        # stats + tables
    OMP_NUM_THREADS=1 python -m benchmarks.quality.single_model_ridge_study --analyse-only
    ... --analyse-only --write-report   # the tables into single_model_ridge_report.md

Question (issue 11 (b) at M = 1): the library's ``"auto"`` ridge, λ = c · e_j(G) with
c = AUTO_RIDGE_SCALE = 0.14, meets a regret of 0.02 at M = 5 but not at M = 1, where
mlp_heldout and mlp_large_n want c ≈ 0.2-4 and lr_cancer and mlp_wide_digits want c ≤ 0.14
(models_ridge_report.md). No M-dependent constant works. Does a rule c = f(M, s), s a statistic
of the case that needs no ground truth, do it?

Statistics (``--analyse-only`` skips this step and reads ``STATS``): per (case, k) on the
seed-0 srht store of grid.py, read only (``Store.open_existing``; nothing is featurized or
written there), from model 0's features Φ and Q: for each kernel R (``g1``: the library's
guarded Gauss-Newton weights w; ``g0.75``: w^0.75, kernel_power_study.py's candidate default)
the full gram G = Φᵀ R Φ (float64, one block) and its eigenvalues: effective ranks
trace² / ‖G‖_F² and trace / λ_max, e_j (j = round(0.03 · min(n, p)), as ``auto_ridge``),
e_j relative to the mean eigenvalue, ratios of the eigenvalues around j, the degrees of
freedom of the default ridge; n / k, p / k; from Q: the fraction of rows with Q (1 - Q) <
0.01, mean Q, the effective rows of R over n; and from the 5 models' Q (a statistic only an
ensemble has): the mean over rows of the std of Q over models, its ratio to mean Q, and the
mean pairwise correlation of the models' Q.

Regret of a scale c at (case, k, M): the reference minus the LDS at c, the LDS interpolated
linearly in log c between the 26 scales of models_ridge_study.SCALES (clipped to [0.05, 5]).
Lines and references:

* ``g1``: models_ridge_study.jsonl.gz (gauss_newton, default blocks, auto, models 0..M-1,
  seed 0); reference ``models_ridge_study.references`` of that study (results.jsonl
  non-identity lines and its lines), as its analysis;
* ``g0.75``: kernel_power_study.jsonl.gz (variant g0.75, M = 1 and 5); reference that study's
  (results.jsonl, models_ridge_study and kernel_power_study lines).

Rules (``FAMILIES``), each with at most 2 fitted constants; M = 5 keeps 0.14 (and is also
shown with the M = 1 rule applied to it, model 0's statistic): step (c = c1 where s is past a
threshold, else 0.14), power (c = 0.14 · max(1, s / s0)^a), and the same with s inverted.
Fitted by grid search on the worst regret over the 32 (case, k) cells at M = 1, net of each
cell's floor beyond 0.02 (ties: the mean), per kernel and on both kernels' 64 cells at once
(the report's answer); honest number: leave-one-case-out (constants fitted on 7 cases,
judged on the 8th).
Runtime: statistics ~10 minutes on one core (the k = 4096 grams), analysis ~1 minute.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.quality import ground_truth as gt
from benchmarks.quality import kernel_power_study as kps
from benchmarks.quality import models_ridge_study as mrs
from benchmarks.quality.cases import select
from fasttrak import kernel as kernel_ops
from fasttrak.store.core import Store

STATS = Path(__file__).with_name("single_model_ridge_stats.jsonl")
KS = (256, 1024, 2048, 4096)
MODELS = 5
GAMMAS = {"g1": 1.0, "g0.75": 0.75}
DEFAULT = 0.14
BLOCK_STATS = ("erank_fro_rel", "erank_max_rel", "e_j_rel", "dof_default_rel")
"""Spectral statistics also taken per kernel block of the library's default (mean over blocks)."""
SCALES = np.array(mrs.SCALES)
LIMIT = 0.02

# ---------------------------------------------------------------------- statistics


def store_of(case_name: str, k: int) -> Path:
    return gt.ROOT / case_name / "stores" / f"{mrs.PROJECTOR}_k{k}"


def spectrum_stats(e: np.ndarray, n: int, p: int, k: int) -> dict[str, float]:
    """Ground-truth-free statistics of a gram's eigenvalues e (descending, clipped at 0)."""
    rank = kernel_ops.rank_bound(k, n, p)
    e = e[:rank]
    j = kernel_ops._auto_ridge_rank(rank, n, p)
    tr = float(e.sum())
    lam = max(DEFAULT * e[j - 1], kernel_ops.AUTO_RIDGE_MIN * tr / rank)

    def at(i: int) -> float:
        return float(e[min(max(i, 1), rank) - 1])

    return {
        "rank": rank,
        "j": j,
        "erank_fro": tr**2 / float(np.dot(e, e)),
        "erank_max": tr / float(e[0]),
        "erank_fro_rel": tr**2 / float(np.dot(e, e)) / rank,
        "erank_max_rel": tr / float(e[0]) / rank,
        "e_j": at(j),
        "e_j_rel": at(j) / (tr / rank),
        "e_j_over_top": at(j) / float(e[0]),
        "ratio_half_j": at((j + 1) // 2) / at(j),
        "ratio_j_2j": at(j) / at(2 * j),
        "ratio_j_4j": at(j) / at(4 * j),
        "slope_j": math.log(at((j + 1) // 2) / at(2 * j)) / math.log(4.0) if at(2 * j) > 0 else 0,
        "dof_default": float((e / (e + lam)).sum()),
        "dof_default_rel": float((e / (e + lam)).sum()) / rank,
        "mass_above_j": float(e[:j].sum()) / tr,
    }


def case_stats(case_name: str, k: int, p: int) -> list[dict[str, Any]]:
    store = Store.open_existing(store_of(case_name, k))
    qs = np.stack([store.model(m).q().astype(np.float64) for m in range(MODELS)])
    phi = store.model(0).features().astype(np.float64)
    n = phi.shape[0]
    q0 = qs[0]
    r0 = q0 * (1 - q0)
    corr = np.corrcoef(qs)
    common = {
        "case": case_name,
        "k": k,
        "n": n,
        "p": p,
        "n_over_k": n / k,
        "p_over_k": p / k,
        "n_over_p": n / p,
        "frac_sat": float(np.mean(r0 < 0.01)),
        "mean_q": float(q0.mean()),
        "median_q": float(np.median(q0)),
        "eff_rows_raw_rel": kernel_ops.effective_rows(r0) / n,
        # the 5 models' Q (M >= 2 only)
        "q_std5": float(qs.std(axis=0, ddof=1).mean()),
        "q_std5_rel": float(qs.std(axis=0, ddof=1).mean() / qs.mean()),
        "q_corr5": float(corr[np.triu_indices(MODELS, 1)].mean()),
        "q_std2": float(qs[:2].std(axis=0, ddof=1).mean()),
        "q_corr2": float(corr[0, 1]),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = kernel_ops.gauss_newton_weights(q0, k=k)
    lines = []
    for name, gamma in GAMMAS.items():
        r = np.power(w, gamma)
        x = phi * np.sqrt(r)[:, None]
        g = x.T @ x
        e = np.clip(np.linalg.eigvalsh(g)[::-1], 0.0, None)
        blocks = mrs.default_blocks(n, k, p)
        # the same statistics per kernel block of the default (what auto_ridge sees), averaged
        parts = [
            spectrum_stats(
                np.clip(np.linalg.eigvalsh(g[part, part])[::-1], 0.0, None),
                n,
                p,
                part.stop - part.start,
            )
            for part in kernel_ops.block_slices(k, blocks)
        ]
        line = {
            **common,
            "kernel": name,
            "eff_rows_rel": kernel_ops.effective_rows(r) / n,
            "blocks": blocks,
            **spectrum_stats(e, n, p, k),
            **{
                f"{key}_blocks": float(np.mean([part[key] for part in parts]))
                for key in BLOCK_STATS
            },
        }
        lines.append(line)
    return lines


def compute_stats(path: Path) -> None:
    have = set()
    if path.exists():
        have = {(r["case"], r["k"]) for r in map(json.loads, path.read_text().splitlines())}
    for case in select(None):
        for k in KS:
            if (case.name, k) in have:
                continue
            if not store_of(case.name, k).exists():
                print(f"{case.name} k={k}: no store, skipped", flush=True)
                continue
            start = time.perf_counter()
            lines = case_stats(case.name, k, case.p)
            with path.open("a") as fh:
                for line in lines:
                    fh.write(json.dumps(line) + "\n")
            print(f"{case.name} k={k}: {time.perf_counter() - start:.1f}s", flush=True)


# ---------------------------------------------------------------------- regret curves

FINE = np.exp(np.linspace(math.log(SCALES[0]), math.log(SCALES[-1]), 301))
"""The scales a rule may pick: 301 log-spaced from 0.05 to 5 (ratio 1.016); the LDS between
two scanned scales is interpolated linearly in log c."""
I_DEFAULT = int(np.argmin(np.abs(np.log(FINE / DEFAULT))))
FINE[I_DEFAULT] = DEFAULT


def load_curves() -> tuple[dict[tuple, np.ndarray], list[str], list[int]]:
    """Regret on FINE per (kernel, case, k, M): the reference minus the interpolated LDS."""
    study = [r for r in mrs.read_lines(mrs.OUT) if r["seed"] == 0]
    measured = [r for r in mrs.read_lines(kps.OUT) if r["seed"] == 0]
    refs = {"g1": mrs.references(study), "g0.75": mrs.references(study + measured)}
    raw: dict[tuple, dict[float, float]] = defaultdict(dict)
    for r in study:
        if (
            r["kernel"] == "gauss_newton"
            and r["default_blocks"]
            and r["ridge_kind"] == "auto"
            and r["models"] == list(range(r["M"]))
        ):
            raw["g1", r["case"], r["k"], r["M"]][r["scale"]] = r["lds"]
    for r in measured:
        if r["variant"] == "g0.75" and r["models"] == list(range(r["M"])):
            raw["g0.75", r["case"], r["k"], r["M"]][r["scale"]] = r["lds"]
    curves = {}
    for (kern, case, k, big_m), by_scale in raw.items():
        if len(by_scale) != len(SCALES):
            continue
        lds_scan = np.array([by_scale[c] for c in SCALES])
        lds_fine = np.interp(np.log(FINE), np.log(SCALES), lds_scan)
        curves[kern, case, k, big_m] = refs[kern][case, k, big_m, 0] - lds_fine
    n_of = {r["case"]: r["n"] for r in study}
    cases = sorted(n_of, key=lambda c: (n_of[c], c))
    ks = sorted({r["k"] for r in study})
    return curves, cases, ks


def load_stats(path: Path) -> dict[tuple, dict[str, Any]]:
    return {
        (r["kernel"], r["case"], r["k"]): r for r in map(json.loads, path.read_text().splitlines())
    }


SINGLE = (
    "n_over_k",
    "p_over_k",
    "n_over_p",
    "frac_sat",
    "mean_q",
    "median_q",
    "eff_rows_rel",
    "eff_rows_raw_rel",
    "erank_fro",
    "erank_max",
    "erank_fro_rel",
    "erank_max_rel",
    "e_j_rel",
    "e_j_over_top",
    "ratio_half_j",
    "ratio_j_2j",
    "ratio_j_4j",
    "slope_j",
    "dof_default",
    "dof_default_rel",
    "mass_above_j",
    "erank_fro_rel_blocks",
    "erank_max_rel_blocks",
    "e_j_rel_blocks",
    "dof_default_rel_blocks",
)
"""Statistics of one model (usable at M = 1)."""
ENSEMBLE = ("q_std5", "q_std5_rel", "q_corr5", "q_std2", "q_corr2")
"""Statistics of several models' Q (M >= 2 only: shown, not usable at M = 1)."""
STAT_NOTE = {
    "n_over_k": "n / k",
    "p_over_k": "p / k",
    "n_over_p": "n / p",
    "frac_sat": "fraction of rows with Q(1-Q) < 0.01",
    "mean_q": "mean Q (model 0)",
    "median_q": "median Q",
    "eff_rows_rel": "effective rows of R (the kernel's, guarded) / n",
    "eff_rows_raw_rel": "effective rows of Q(1-Q) / n",
    "erank_fro": "trace² / ‖G‖_F²",
    "erank_max": "trace / λ_max",
    "erank_fro_rel": "trace² / ‖G‖_F² / rank",
    "erank_max_rel": "trace / λ_max / rank",
    "e_j_rel": "e_j / mean eigenvalue",
    "e_j_over_top": "e_j / λ_max",
    "ratio_half_j": "e_(j/2) / e_j",
    "ratio_j_2j": "e_j / e_2j",
    "ratio_j_4j": "e_j / e_4j",
    "slope_j": "-d log e / d log i over [j/2, 2j]",
    "dof_default": "Σ e / (e + λ) at c = 0.14",
    "dof_default_rel": "the same / rank",
    "mass_above_j": "Σ_{i<j} e_i / trace",
    "erank_fro_rel_blocks": "erank_fro_rel per default kernel block, mean",
    "erank_max_rel_blocks": "erank_max_rel per default kernel block, mean",
    "e_j_rel_blocks": "e_j_rel per default kernel block, mean",
    "dof_default_rel_blocks": "dof_default_rel per default kernel block, mean",
    "q_std5": "mean over rows of the std of Q over 5 models",
    "q_std5_rel": "q_std5 / mean Q",
    "q_corr5": "mean pairwise correlation of the 5 models' Q",
    "q_std2": "the std over models 0 and 1",
    "q_corr2": "correlation of models 0 and 1's Q",
}


# ---------------------------------------------------------------------- rules


FAMILIES = ("step", "power")
"""step: c = c1 where s > t (or s < t), else 0.14 (constants t, c1); power: c = 0.14 ·
max(1, s / s0)^a (or with s0 / s; constants s0, a)."""
C1_GRID = FINE[::4]
SENS_S0 = (0.07, 0.085, 0.1, 0.12, 0.15)
SENS_A = (1.0, 1.25, 1.5, 1.75, 2.0)
A_GRID = np.round(np.arange(0.05, 4.001, 0.05), 3)


def rule_index(family: str, sign: int, t: float, v: float, s: np.ndarray) -> np.ndarray:
    """Index into FINE of the rule's scale for statistic values s (cells,)."""
    if family == "step":
        past = s > t if sign > 0 else s < t
        c = np.where(past, v, DEFAULT)
    else:
        ratio = s / t if sign > 0 else t / s
        c = DEFAULT * np.maximum(1.0, ratio) ** v
    c = np.clip(c, FINE[0], FINE[-1])
    return np.clip(np.searchsorted(FINE, c * 1.008) - 1, 0, len(FINE) - 1)


def thresholds(s: np.ndarray) -> np.ndarray:
    """Candidate thresholds: geometric midpoints of consecutive distinct values, and the values
    themselves (power rules start at s0)."""
    u = np.unique(s)
    mids = np.sqrt(u[1:] * u[:-1]) if (u > 0).all() else (u[1:] + u[:-1]) / 2
    return np.concatenate([mids, u])


def fit(family: str, s: np.ndarray, reg: np.ndarray) -> tuple[int, float, float]:
    """(sign, t, v) minimising the worst regret over the cells (rows of reg: cells × FINE),
    ties broken by the mean regret."""
    best, arg = (math.inf, math.inf), (1, math.inf, DEFAULT)
    rows = np.arange(len(s))[None, :]
    values = C1_GRID if family == "step" else A_GRID
    for sign in (1, -1):
        for t in thresholds(s):
            r = reg[rows, rule_index(family, sign, t, values[:, None], s[None, :])]
            worst, mean = np.round(r.max(axis=1), 6), r.mean(axis=1)
            i = int(np.lexsort((mean, worst))[0])
            if (worst[i], mean[i]) < best:
                best, arg = (float(worst[i]), float(mean[i])), (sign, float(t), float(values[i]))
    return arg


def describe(family: str, stat: str, sign: int, t: float, v: float) -> str:
    if family == "step":
        return f"c = {v:.3g} if {stat} {'>' if sign > 0 else '<'} {t:.3g}, else 0.14"
    ratio = f"{stat} / {t:.3g}" if sign > 0 else f"{t:.3g} / {stat}"
    return f"c = 0.14 · max(1, {ratio})^{v:g}"


# ---------------------------------------------------------------------- analysis


def fmt(x: float | None) -> str:
    return mrs.fmt(x)


class Cells:
    """The (case, k) cells of one kernel and M: regret curves, floors and statistics."""

    def __init__(self, curves, stats, kern: str, big_m: int, cases, ks) -> None:
        self.keys = [(c, k) for c in cases for k in ks if (kern, c, k, big_m) in curves]
        self.reg = np.stack([curves[kern, c, k, big_m] for c, k in self.keys])
        self.floor = self.reg.min(axis=1)
        # the regret net of what no scale can remove: a cell whose best scale still has a
        # regret above LIMIT is judged as if that best were LIMIT
        self.shifted = self.reg - np.maximum(0.0, self.floor - LIMIT)[:, None]
        self.fixable = self.floor <= LIMIT
        self.stat = {
            name: np.array([stats[kern, c, k][name] for c, k in self.keys])
            for name in SINGLE + ENSEMBLE
        }
        self.case = np.array([c for c, _ in self.keys])
        self.k = np.array([k for _, k in self.keys])

    def regret(self, idx: np.ndarray) -> np.ndarray:
        return self.reg[np.arange(len(self.keys)), idx]

    @classmethod
    def joint(cls, parts: list[Cells]) -> Cells:
        """Several kernels' cells as one set (a rule fitted on both)."""
        out = cls.__new__(cls)
        out.keys = [key for part in parts for key in part.keys]
        for name in ("reg", "floor", "shifted", "fixable", "case", "k"):
            setattr(out, name, np.concatenate([getattr(part, name) for part in parts]))
        out.stat = {st: np.concatenate([part.stat[st] for part in parts]) for st in parts[0].stat}
        return out


def evaluate(cells: Cells, family: str, stat: str, loco: bool = True) -> dict[str, Any]:
    """Fit on every case (and, with loco, on 7 of 8), judge at M = 1."""
    s = cells.stat[stat]
    sign, t, v = fit(family, s, cells.shifted)
    idx = rule_index(family, sign, t, v, s)
    reg = cells.regret(idx)
    out = {
        "family": family,
        "stat": stat,
        "sign": sign,
        "t": t,
        "v": v,
        "rule": describe(family, stat, sign, t, v),
        "idx": idx,
        "reg": reg,
        "worst": float(reg.max()),
        "worst_fix": float(reg[cells.fixable].max()),
        "worst_shift": float(cells.shifted[np.arange(len(s)), idx].max()),
        "case_of": cells.case,
        "active": sorted({c for c, i in zip(cells.case, idx, strict=True) if i != I_DEFAULT}),
    }
    if loco:
        held = np.zeros(len(s))
        fits = {}
        for case in np.unique(cells.case):
            train = cells.case != case
            f = fit(family, s[train], cells.shifted[train])
            fits[case] = f
            test = ~train
            i = rule_index(family, *f, s[test])
            held[test] = cells.reg[np.flatnonzero(test), i]
        out["loco_reg"] = held
        out["loco_worst"] = float(held.max())
        out["loco_worst_fix"] = float(held[cells.fixable].max())
        out["loco_fits"] = fits
    return out


def apply(cells: Cells, res: dict[str, Any]) -> np.ndarray:
    """The regret of a fitted rule on other cells (another M or kernel)."""
    i = rule_index(res["family"], res["sign"], res["t"], res["v"], cells.stat[res["stat"]])
    return cells.regret(i)


def per_k(cells: Cells, reg: np.ndarray, ks) -> str:
    return " / ".join(fmt(float(reg[cells.k == k].max())) for k in ks)


def analyse(stats_path: Path) -> str:
    curves, cases, ks = load_curves()
    stats = load_stats(stats_path)
    have = {(c, k) for _, c, k in stats}
    missing = [f"{c} k={k}" for c in cases for k in ks if (c, k) not in have]
    out: list[str] = []
    if missing:
        out += [f"Stores missing (skipped): {', '.join(missing)}", ""]
    cases = [c for c in cases if all((c, k) in have for k in ks)]
    cell = {(kern, m): Cells(curves, stats, kern, m, cases, ks) for kern in GAMMAS for m in (1, 5)}
    results: dict[str, list[dict[str, Any]]] = {}
    for kern in GAMMAS:
        c1 = cell[kern, 1]
        results[kern] = [evaluate(c1, f, st) for f in FAMILIES for st in SINGLE]
        results[kern].sort(key=lambda r: (r["loco_worst_fix"], r["worst_fix"], r["worst"]))

    # the statistics and the scale each cell wants
    out += ["## The scale each cell wants at M = 1, and the statistics", ""]
    out += [
        "best c: the LDS-best scale (on the 301-point grid; interpolated between the 26 "
        "scanned); floor: the regret there (what no scale removes); at 0.14: today's regret. "
        "g1 kernel's gram for the spectral statistics; Q statistics of model 0 "
        "(q_std5, q_corr5: all 5 models).",
        "",
    ]
    show = (
        "mean_q",
        "frac_sat",
        "eff_rows_rel",
        "n_over_k",
        "erank_fro_rel",
        "e_j_rel",
        "ratio_j_2j",
        "dof_default_rel",
        "q_std5",
        "q_corr5",
    )
    out += [
        "| case | k | g1 best c | g1 floor | g1 at 0.14 | g0.75 best c | g0.75 floor | "
        "g0.75 at 0.14 | " + " | ".join(show) + " |",
        "|---|---|" + "---|" * (6 + len(show)),
    ]
    g1, g75 = cell["g1", 1], cell["g0.75", 1]
    for i, (case, k) in enumerate(g1.keys):
        j = g75.keys.index((case, k))
        b1, b75 = int(np.argmin(g1.reg[i])), int(np.argmin(g75.reg[j]))
        out.append(
            f"| {case} | {k} | {FINE[b1]:.2f} | {fmt(g1.floor[i])} | "
            f"{fmt(g1.reg[i, I_DEFAULT])} | {FINE[b75]:.2f} | {fmt(g75.floor[j])} | "
            f"{fmt(g75.reg[j, I_DEFAULT])} | "
            + " | ".join(f"{g1.stat[st][i]:.3g}" for st in show)
            + " |"
        )

    # rank correlation of each statistic with the wanted scale
    out += [
        "",
        "## Which statistic follows the wanted scale (M = 1)",
        "",
        "Spearman correlation over the 32 cells between the statistic and log(best c); "
        "'misplaced': the number of cells on the wrong side of the best single threshold "
        "between the cells whose best c is >= 0.3 and those whose best c is <= 0.14 (g1).",
        "",
        "| statistic | meaning | ρ g1 | ρ g0.75 | misplaced g1 (of big / small) |",
        "|---|---|---|---|---|",
    ]
    from scipy.stats import spearmanr

    def misplaced(cells: Cells, st: str) -> str:
        want = FINE[np.argmin(cells.reg, axis=1)]
        big, small = want >= 0.3, want <= DEFAULT
        s = cells.stat[st]
        best = (math.inf, "")
        for t in thresholds(s):
            for sign in (1, -1):
                hi = s > t if sign > 0 else s < t
                wrong = int((big & ~hi).sum() + (small & hi).sum())
                if wrong < best[0]:
                    best = (wrong, f"{wrong} ({int(big.sum())} / {int(small.sum())})")
        return best[1]

    ranked = []
    for st in SINGLE + ENSEMBLE:
        r1 = spearmanr(g1.stat[st], np.log(FINE[np.argmin(g1.reg, axis=1)])).statistic
        r75 = spearmanr(g75.stat[st], np.log(FINE[np.argmin(g75.reg, axis=1)])).statistic
        ranked.append((-abs(r1), st, r1, r75))
    for _, st, r1, r75 in sorted(ranked):
        out.append(f"| {st} | {STAT_NOTE[st]} | {r1:+.2f} | {r75:+.2f} | {misplaced(g1, st)} |")

    # the rules
    for kern in GAMMAS:
        c1, c5 = cell[kern, 1], cell[kern, 5]
        base1 = c1.reg[:, I_DEFAULT]
        base5 = c5.reg[:, I_DEFAULT]
        out += [
            "",
            f"## Rules at M = 1, kernel {kern}: every statistic, both families",
            "",
            "Fitted on the regret net of the floor (a cell whose floor exceeds 0.02 counts as "
            "if it were 0.02), ties by the mean regret. worst: over the 32 cells; fixable: "
            "over the cells with floor <= 0.02; LOCO: each case judged with constants fitted "
            "on the other 7. M = 5 rule: the same rule applied at M = 5 (model 0's statistic) "
            "instead of 0.14. active: the cases where the rule leaves 0.14.",
            "",
            f"Today (0.14): M = 1 worst {fmt(base1.max())}, fixable "
            f"{fmt(base1[c1.fixable].max())}; M = 5 worst {fmt(base5.max())}. "
            f"Oracle (best scale per cell): M = 1 {fmt(c1.floor.max())}, "
            f"M = 5 {fmt(c5.floor.max())}. Cells with floor > 0.02 at M = 1: "
            + (
                ", ".join(
                    f"{c} k={k} ({f:.3f})"
                    for (c, k), f in zip(c1.keys, c1.floor, strict=True)
                    if f > LIMIT
                )
                or "none"
            )
            + ".",
            "",
            "| rule (fitted on all 8) | M=1 worst | fixable | LOCO worst | LOCO fixable | "
            "M=5 with rule | active cases |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in results[kern]:
            out.append(
                f"| {r['rule']} | {fmt(r['worst'])} | {fmt(r['worst_fix'])} | "
                f"{fmt(r['loco_worst'])} | {fmt(r['loco_worst_fix'])} | "
                f"{fmt(apply(c5, r).max())} | {', '.join(r['active']) or 'none'} |"
            )

    # a single rule for both kernels
    joint = Cells.joint([cell["g1", 1], cell["g0.75", 1]])
    both = [evaluate(joint, f, st) for f in FAMILIES for st in SINGLE]
    both.sort(key=lambda r: (r["loco_worst_fix"], r["worst_fix"], r["worst"]))
    out += [
        "",
        "## One rule for both kernels (fitted on the 64 cells of g1 and g0.75 at M = 1)",
        "",
        "Each kernel's statistic from its own gram; LOCO holds a case out of both kernels. "
        "M = 5 columns: 0.14 (the rule is used at M = 1 only) / the rule applied at M = 5.",
        "",
        "| rule | worst g1 / g0.75 | fixable g1 / g0.75 | LOCO worst | LOCO fixable | "
        "M=5 at 0.14 g1 / g0.75 | M=5 with rule g1 / g0.75 | active cases |",
        "|---|---|---|---|---|---|---|---|",
    ]
    n1 = len(cell["g1", 1].keys)
    for r in both[:12]:
        reg, fix = r["reg"], joint.fixable
        out.append(
            f"| {r['rule']} | {fmt(reg[:n1].max())} / {fmt(reg[n1:].max())} | "
            f"{fmt(reg[:n1][fix[:n1]].max())} / {fmt(reg[n1:][fix[n1:]].max())} | "
            f"{fmt(r['loco_worst'])} | {fmt(r['loco_worst_fix'])} | "
            f"{fmt(cell['g1', 5].reg[:, I_DEFAULT].max())} / "
            f"{fmt(cell['g0.75', 5].reg[:, I_DEFAULT].max())} | "
            f"{fmt(apply(cell['g1', 5], r).max())} / {fmt(apply(cell['g0.75', 5], r).max())} | "
            f"{', '.join(r['active'])} |"
        )
    chosen = both[0]
    out += details(chosen, cell, curves, stats, cases, ks)
    return "\n".join(out)


def details(res, cell, curves, stats, cases, ks) -> list[str]:
    """Per-cell and per-k tables of one rule fitted on both kernels (res from the joint fit)."""
    st = res["stat"]
    out = [
        "",
        f"## The chosen rule: {res['rule']}",
        "",
        "Constants fitted on both kernels at M = 1 (LOCO: refitted without the case). Per "
        "cell: the statistic, the rule's scale, the regret at 0.14, with the rule, with the "
        "LOCO rule; floor and best c: the oracle scale's.",
        "",
    ]
    n1 = len(cell["g1", 1].keys)
    for kern, sl in (("g1", slice(0, n1)), ("g0.75", slice(n1, None))):
        c1 = cell[kern, 1]
        idx = res["idx"][sl]
        loco = res["loco_reg"][sl]
        out += [
            f"### {kern}, M = 1",
            "",
            f"| case | k | {st} | rule c | at 0.14 | rule | LOCO | floor | best c |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for i, (case, k) in enumerate(c1.keys):
            out.append(
                f"| {case} | {k} | {c1.stat[st][i]:.3g} | {FINE[idx[i]]:.2f} | "
                f"{fmt(c1.reg[i, I_DEFAULT])} | {fmt(c1.reg[i, idx[i]])} | {fmt(loco[i])} | "
                f"{fmt(c1.floor[i])} | {FINE[np.argmin(c1.reg[i])]:.2f} |"
            )
        out.append("")
    out += [
        "### Worst regret per k",
        "",
        "M = 5 keeps 0.14 ('M=5 rule': the rule applied at M = 5 instead, for information). "
        "In parentheses: the worst without text_bag k = 1024, the cell no scale fixes.",
        "",
        "| kernel | setting | " + " | ".join(f"k={k}" for k in ks) + " | all |",
        "|---|---|" + "---|" * (len(ks) + 1),
    ]
    for kern, sl in (("g1", slice(0, n1)), ("g0.75", slice(n1, None))):
        c1, c5 = cell[kern, 1], cell[kern, 5]
        keep = np.array([key != ("text_bag", 1024) for key in c1.keys])
        rows = {
            "M=1 at 0.14": c1.reg[:, I_DEFAULT],
            "M=1 rule": res["reg"][sl],
            "M=1 LOCO": res["loco_reg"][sl],
            "M=1 oracle": c1.floor,
            "M=5 at 0.14": c5.reg[:, I_DEFAULT],
            "M=5 rule": apply(c5, res),
        }
        for label, reg in rows.items():
            kk = c1.k if label.startswith("M=1") else c5.k
            cells_ks = []
            for k in ks:
                sel = kk == k
                txt = fmt(float(reg[sel].max()))
                if label.startswith("M=1") and (sel & ~keep).any():
                    txt += f" ({fmt(float(reg[sel & keep].max()))})"
                cells_ks.append(txt)
            out.append(
                f"| {kern} | {label} | " + " | ".join(cells_ks) + f" | {fmt(float(reg.max()))} |"
            )
    # M = 2-4 (g1 only: the kernel_power study ran M = 1 and 5)
    out += [
        "",
        "### Every M: the rule at M = 1 only, with exponent a / M, or the same at every M",
        "",
        "Worst regret over the 32 cells (g0.75: only M = 1 and 5 were run). Per k at M = 5 "
        "in brackets.",
        "",
        "| kernel | variant | M=1 | M=2 | M=3 | M=4 | M=5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for kern in GAMMAS:
        for label in ("M = 1 only (0.14 above)", "exponent a / M", "same rule at every M"):
            row = []
            for big_m in (1, 2, 3, 4, 5):
                if (kern, 1, big_m) not in {(key[0], 1, key[3]) for key in curves}:
                    row.append("-")
                    continue
                cm = Cells(curves, stats, kern, big_m, cases, ks)
                if big_m > 1 and label.startswith("M = 1"):
                    reg = cm.reg[:, I_DEFAULT]
                else:
                    v = res["v"] / big_m if label.startswith("exponent") else res["v"]
                    if res["family"] == "step" and label.startswith("exponent"):
                        v = DEFAULT * (res["v"] / DEFAULT) ** (1 / big_m)
                    i = rule_index(res["family"], res["sign"], res["t"], v, cm.stat[st])
                    reg = cm.regret(i)
                txt = fmt(float(reg.max()))
                if big_m == 5:
                    txt += " [" + per_k(cm, reg, ks) + "]"
                row.append(txt)
            out.append(f"| {kern} | {label} | " + " | ".join(row) + " |")
    # how flat the fit is, and round constants
    if res["family"] == "power":
        joint = Cells.joint([cell["g1", 1], cell["g0.75", 1]])
        keep = np.array([key != ("text_bag", 1024) for key in joint.keys])
        no256 = keep & ~((joint.case == "mlp_heldout") & (joint.k == 256))
        out += [
            "",
            "### Sensitivity to the constants (both kernels, M = 1)",
            "",
            "Worst regret over the 64 cells without text_bag k = 1024 (no scale fixes it) / "
            "also without mlp_heldout k = 256 (floor 0.020, judged against a dense-projection "
            "line), for c = 0.14 · max(1, s / s0)^a, s = " + st + ".",
            "",
            "| s0 \\ a | " + " | ".join(str(a) for a in SENS_A) + " |",
            "|---|" + "---|" * len(SENS_A),
        ]
        for s0 in SENS_S0:
            row = []
            for a in SENS_A:
                reg = joint.regret(rule_index("power", res["sign"], s0, a, joint.stat[st]))
                row.append(f"{fmt(float(reg[keep].max()))} / {fmt(float(reg[no256].max()))}")
            out.append(f"| {s0} | " + " | ".join(row) + " |")
    # who drives the constants
    out += [
        "",
        "### Leave-one-case-out fits",
        "",
        "The constants refitted without each case (both kernels) and that case's worst "
        "regret under them (g1 / g0.75).",
        "",
        "| held out | constants | its worst g1 / g0.75 |",
        "|---|---|---|",
    ]
    for case, f in res["loco_fits"].items():
        sel = res["case_of"] == case
        reg = res["loco_reg"]
        out.append(
            f"| {case} | {describe(res['family'], st, *f)} | "
            f"{fmt(float(reg[:n1][sel[:n1]].max()))} / {fmt(float(reg[n1:][sel[n1:]].max()))} |"
        )
    return out


# ---------------------------------------------------------------------- main

REPORT = Path(__file__).with_name("single_model_ridge_report.md")
MARKER = "# Generated tables (`--analyse-only`)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--analyse-only", action="store_true", help="use the cached statistics")
    parser.add_argument(
        "--write-report",
        action="store_true",
        help=f"replace what follows '{MARKER}' in {REPORT.name} with the tables",
    )
    args = parser.parse_args()
    if not args.analyse_only:
        compute_stats(STATS)
    tables = analyse(STATS)
    if args.write_report:
        head = REPORT.read_text().split(MARKER)[0] if REPORT.exists() else ""
        REPORT.write_text(head + MARKER + "\n\n" + tables + "\n")
    print(tables)


if __name__ == "__main__":
    main()
