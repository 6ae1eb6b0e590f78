"""Kernels between plain and Gauss-Newton (issue 11, "defaults that never lose").

    python -m benchmarks.quality.kernel_power_study --ks 1024,2048         # seed 0, all cases
    python -m benchmarks.quality.kernel_power_study --ks 4096 --variants g0.75
    python -m benchmarks.quality.kernel_power_study --cases text_bag --ks 1024 --seeds 1,2 \
        --variants g0.5,g0.75 --store-root /tmp/kps_stores               # other projections
    python -m benchmarks.quality.kernel_power_study --analyse-only         # tables, in seconds

Question: the Gauss-Newton (GN) kernel Φᵀ R Φ, R = diag(w) with the library's guarded
weights w = ``kernel.gauss_newton_weights(q, k)``, loses ~0.03 LDS to the plain kernel
(R = I) on text_bag at k = 1024 with one model and wins elsewhere (by far on cnn_digits). Is
there a kernel between the two that is never far from the better one?

Variants (``VARIANTS``), each "the library's kernel with modified weights": the rows of Φ are
scaled by R^½ as ``estimator.kernel_rows`` does with ``estimator.kernel_weights``, with

* ``g<γ>``: R = w^γ (γ = 0: the plain kernel, bit for bit R = 1; γ = 1: the library's GN);
* ``mix<β>``: R = (1 - β) · mean(w) + β · w (a convex mix of the plain kernel, scaled to
  GN's mean weight, and GN).

The guard is applied first (w is what the library's GN kernel uses), then the power or mix.

Only the kernel changes: the scores keep their factor Q̄ (Q averaged over the ensemble's
models, as ``ft.Scores.combine``), and the ridge is the library's ``"auto"`` rule
(``kernel.auto_ridge`` per kernel block) on the variant's gram, with its scale c swept over
``models_ridge_study.SCALES`` (0.14 is the library's; an overall multiple of R changes
nothing, since every ridge here is relative to G). Kernel blocks: the library's default
(``ft.Estimator().for_rows(n, k, p)``). Stores, ground truth, checkpoints and the
eigendecomposition machinery are models_ridge_study.py's (G = Φᵀ R Φ in float64,
eigendecomposed once per model and variant, then each ridge costs one product); γ = 0 and
γ = 1 reproduce its plain and GN lines (checked by ``--analyse-only``).

Ensembles: each model alone ((0,) is grid.py's M = 1) and (0, ..., 4) (grid.py's M = 5).
Where this study did not run g0 or g1 at a (case, k, seed), the analysis takes them from
models_ridge_study.jsonl.gz (same computation; max |ΔLDS| 5e-7 where both ran).

Output: ``benchmarks/quality/kernel_power_study.jsonl.gz``, one line per (case, k, seed,
variant, scale, ensemble): lds (first retraining, as grid.py) and lds_avg (both). Regret is
taken against the best LDS at the same (case, k, M, seed) of results.jsonl (any projector but
identity, report.md's definition), models_ridge_study.jsonl.gz and this study
(``models_ridge_study.references``).

Runtime on one core (the gram and its eigendecomposition dominate, per variant and model):
~2-4 s per (case, variant) at k <= 1024, 4-12 s at k = 2048, 60-120 s at k = 4096. A seed
!= 0 store is featurized first; ``--store-root /tmp/x`` keeps it out of runs/.
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
import torch

import fasttrak as ft
from benchmarks.quality import grid
from benchmarks.quality import ground_truth as gt
from benchmarks.quality import models_ridge_study as mrs
from benchmarks.quality.cases import Case, select
from benchmarks.quality.ridge_study import eig_blocks, lds
from fasttrak import kernel as kernel_ops

OUT = Path(__file__).with_name("kernel_power_study.jsonl.gz")
KS = (1024, 2048, 256, 4096)
MODELS = 5
ENSEMBLES = ((0,), (1,), (2,), (3,), (4,), (0, 1, 2, 3, 4))
SCALES = mrs.SCALES
DEFAULT_SCALE = kernel_ops.AUTO_RIDGE_SCALE
VARIANTS: dict[str, tuple[float, float]] = {
    "g0": (0.0, 1.0),
    "g0.25": (0.25, 1.0),
    "g0.5": (0.5, 1.0),
    "g0.6": (0.6, 1.0),
    "g0.75": (0.75, 1.0),
    "g1": (1.0, 1.0),
    "mix0.25": (1.0, 0.25),
    "mix0.5": (1.0, 0.5),
    "mix0.75": (1.0, 0.75),
}
"""name -> (γ, β): R = (1 - β) · mean(w^γ) + β · w^γ, w the library's guarded GN weights."""
MRS_KERNEL = {"g0": "plain", "g1": "gauss_newton"}
"""The variants that models_ridge_study.py also ran (its kernel names)."""


# ---------------------------------------------------------------------- measurement


def variant_weights(w: np.ndarray, gamma: float, beta: float) -> np.ndarray:
    """R of a variant from the guarded GN weights w (n,): w^γ mixed with its mean."""
    r = np.power(w, gamma)  # 0 ** 0 = 1: γ = 0 is the plain kernel exactly
    return r if beta == 1.0 else (1.0 - beta) * r.mean() + beta * r


def measure(case: Case, k: int, seed: int, variants: list[str]) -> list[dict[str, Any]]:
    """Every (variant, scale, ensemble) LDS of one (case, k, seed) srht store."""
    data = case.data()
    n, p = data.n, case.p
    masks, outputs = gt.ground_truth(case)
    _, outputs_b = gt.ground_truth(case, second=True)
    outputs_avg = (outputs + outputs_b) / 2
    ckpts = gt.checkpoints(case, MODELS)
    trak = ft.TRAK(
        case.model(),
        proj_dim=k,
        projector=grid.projector_config(mrs.PROJECTOR, p, k),
        store=mrs.store_path(case, k, seed),
        seed=seed,
        batch_size=grid.BATCH_SIZE,
        progress=False,
    )
    for m in range(MODELS):  # skips what is stored
        trak.featurize(data.train_set(), checkpoints=[ckpts[m]], model_ids=[m])
    qs = [trak.store.model(m).q().astype(np.float64) for m in range(MODELS)]
    q_of = {ens: np.mean([qs[m] for m in ens], axis=0) for ens in ENSEMBLES}
    masks_t = masks.astype(np.float64).T  # (n, S)
    blocks = mrs.default_blocks(n, k, p)
    acc: dict[tuple, np.ndarray] = {}
    for m in range(MODELS):
        phi = trak.store.model(m).features().astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ft.SaturationWarning)
            target = trak.features(data.target_set(), checkpoint=ckpts[m], model_id=m)
            w = kernel_ops.gauss_newton_weights(qs[m], k=k)
        phi_t = target.phi.astype(np.float64)
        mine = [ens for ens in ENSEMBLES if m in ens]
        c_of = {ens: phi.T @ (q_of[ens][:, None] * masks_t) for ens in mine}  # (k, S)
        for name in variants:
            gamma, beta = VARIANTS[name]
            x = phi * np.sqrt(variant_weights(w, gamma, beta))[:, None]
            g = x.T @ x
            e, v, which = eig_blocks(g, blocks)
            a = v.T @ phi_t.T  # (k, T)
            b_of = {ens: v.T @ c_of[ens] for ens in mine}  # (k, S)
            for c in SCALES:
                lam = mrs.auto_lambdas(e, which, c, n, p)
                wa = (1.0 / (e + lam))[:, None] * a
                for ens in mine:
                    key = (name, c, ens)
                    part = (b_of[ens].T @ wa).astype(np.float32)
                    if key in acc:
                        acc[key] += part
                    else:
                        acc[key] = part
        print(f"  {case.name} k={k} seed={seed}: model {m} done", flush=True)
    lines = []
    for (name, c, ens), total in acc.items():
        pred = total.astype(np.float64) / len(ens)
        gamma, beta = VARIANTS[name]
        lines.append(
            {
                "case": case.name,
                "n": n,
                "p": p,
                "k": k,
                "seed": seed,
                "projector": mrs.PROJECTOR,
                "variant": name,
                "gamma": gamma,
                "beta": beta,
                "blocks": blocks,
                "scale": c,
                "models": list(ens),
                "M": len(ens),
                "lds": round(lds(pred, outputs), 6),
                "lds_avg": round(lds(pred, outputs_avg), 6),
            }
        )
    return lines


# ---------------------------------------------------------------------- analysis


def fmt(x: float | None) -> str:
    return mrs.fmt(x)


def borrowed(
    study: list[dict[str, Any]], measured: list[dict[str, Any]], seed: int = 0
) -> list[dict[str, Any]]:
    """g0 / g1 lines of one seed taken from models_ridge_study (its plain / gauss_newton
    kernels at the default blocks and auto ridge) for the (case, k) this study did not run
    them at: the same computation (reproduced to 5e-7 LDS where both ran)."""
    ran = {(r["case"], r["k"], r["variant"]) for r in measured if r["seed"] == seed}
    out = []
    for name, kernel in MRS_KERNEL.items():
        for r in study:
            if (
                r["seed"] == seed
                and r["kernel"] == kernel
                and r["default_blocks"]
                and r["ridge_kind"] == "auto"
                and tuple(r["models"]) in ENSEMBLES
                and (r["case"], r["k"], name) not in ran
            ):
                gamma, beta = VARIANTS[name]
                out.append({**r, "variant": name, "gamma": gamma, "beta": beta, "borrowed": True})
    return out


def seeds_section(measured_all: list[dict[str, Any]], study_all: list[dict[str, Any]]) -> list[str]:
    """Regret at 0.14 per projection seed, for the (case, k) run at seeds >= 1 (reference:
    seeds.jsonl and both studies at that seed; seed 0: results.jsonl and both studies)."""
    # per-seed tables only where more than the end kernels and g0.75 were run at seeds >= 1
    # (the other cells are in the summary below)
    seed_cells = sorted(
        {
            (r["case"], r["k"])
            for r in measured_all
            if r["seed"] != 0 and r["variant"] not in SUMMARY_VARIANTS
        }
    )
    if not seed_cells:
        return []
    best = mrs.references(study_all + measured_all)
    lines = seed_lines(measured_all, study_all)
    lds_of = {
        (r["case"], r["k"], r["seed"], r["variant"], r["scale"], tuple(r["models"])): r["lds"]
        for r in lines
    }
    out = [
        "",
        "## Other projection seeds: regret at scale 0.14 per seed",
        "",
        "Reference per seed: seeds.jsonl (seed 0: results.jsonl), models_ridge_study and this "
        "study at that seed. 'short': shortfall from the better of g0 and g1 at 0.14.",
    ]
    for case, k in seed_cells:
        seeds = sorted({r["seed"] for r in measured_all if (r["case"], r["k"]) == (case, k)})
        for big_m in (1, 5):
            ens = tuple(range(big_m))
            out += [
                "",
                f"### {case}, k = {k}, M = {big_m}",
                "",
                "| variant | " + " | ".join(f"s{s}" for s in seeds) + " | mean | mean short |",
                "|---|" + "---|" * (len(seeds) + 2),
            ]
            for name in VARIANTS:
                vals = [lds_of.get((case, k, s, name, DEFAULT_SCALE, ens)) for s in seeds]
                if any(v is None for v in vals):
                    continue
                regrets = [best[case, k, big_m, s] - v for s, v in zip(seeds, vals, strict=True)]
                # shortfall from the better end that was measured at that seed (a run with
                # --variants may have left out g0 or g1)
                shorts = []
                for s, v in zip(seeds, vals, strict=True):
                    ends = [lds_of.get((case, k, s, e, DEFAULT_SCALE, ens)) for e in ("g0", "g1")]
                    measured_ends = [e for e in ends if e is not None]
                    if measured_ends:
                        shorts.append(max(measured_ends) - v)
                short = fmt(float(np.mean(shorts))) if shorts else "–"
                out.append(
                    f"| {name} | "
                    + " | ".join(fmt(x) for x in regrets)
                    + f" | {fmt(float(np.mean(regrets)))} | {short} |"
                )
    return out


SUMMARY_VARIANTS = ("g0.75", "g1", "g0")
"""The variants of the seed summary: the candidate, today's default and the plain kernel."""
RIDGE_CASE = "mlp_heldout"
"""The case whose M = 1 regret is its ridge size, not its kernel (models_ridge_report.md)."""


def seed_lines(
    measured_all: list[dict[str, Any]], study_all: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """This study's lines at every seed plus, per seed, the g0 / g1 lines borrowed from
    models_ridge_study where this study did not measure them at that seed."""
    return measured_all + [
        r for s in {r["seed"] for r in study_all} for r in borrowed(study_all, measured_all, s)
    ]


def seeds_summary(measured_all: list[dict[str, Any]], study_all: list[dict[str, Any]]) -> list[str]:
    """Regret at 0.14 of g0.75, g1 and g0 over the projection seeds >= 1 that every case of
    a k has (mean and range per case, then the worst seed-mean over the cases), against two
    references: the full one (seeds.jsonl, both studies at that seed) and the three-variant
    one (this study's g0, g0.75 and g1 lines at that seed, all 26 scales: the same lines for
    every case, k and seed)."""
    lines = seed_lines(measured_all, study_all)
    full = mrs.references(study_all + measured_all)
    three: dict[tuple, float] = defaultdict(lambda: -math.inf)
    lds_of: dict[tuple, float] = {}
    for r in lines:
        ens = tuple(r["models"])
        lds_of[r["case"], r["k"], r["seed"], r["variant"], r["scale"], ens] = r["lds"]
        if r["variant"] in SUMMARY_VARIANTS and ens == tuple(range(r["M"])):
            key = (r["case"], r["k"], r["M"], r["seed"])
            three[key] = max(three[key], r["lds"])
    have = {
        (r["case"], r["k"], r["seed"], r["variant"])
        for r in lines
        if r["seed"] != 0 and r["variant"] in SUMMARY_VARIANTS
    }
    # cases and seeds >= 1 with all three variants, per k
    cells: dict[int, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for case, k, seed, _ in have:
        if all((case, k, seed, v) in have for v in SUMMARY_VARIANTS):
            cells[k][case].add(seed)
    n_of = {r["case"]: r["n"] for r in measured_all}
    all_cases = sorted(n_of, key=lambda c: (n_of[c], c))
    cases_of = {k: sorted(cells[k], key=all_cases.index) for k in cells}
    seeds_of = {k: sorted(set.intersection(*cells[k].values())) for k in cells}
    ks = [k for k in sorted(cells) if seeds_of[k]]
    if not ks:
        return []

    def at(case, k, seed, name, big_m):
        return lds_of.get((case, k, seed, name, DEFAULT_SCALE, tuple(range(big_m))))

    def regrets(case, k, name, big_m, ref):
        return [ref[case, k, big_m, s] - at(case, k, s, name, big_m) for s in seeds_of[k]]

    def mean_range(xs):
        return f"{fmt(float(np.mean(xs)))} [{fmt(min(xs))}, {fmt(max(xs))}]"

    out = [
        "",
        "## Seeds >= 1: g0.75, g1 and g0 at 0.14 (mean over draws)",
        "",
        "Regret of each draw against the best LDS at the same (case, k, M, seed). **Full "
        "reference**: seeds.jsonl (srht and dense, plain and GN, every grid ridge), "
        "models_ridge_study and this study (every variant run at that seed, all 26 scales). "
        "It is not the same set of lines everywhere: seeds.jsonl has k = 256 and 1024 for "
        "every case but k = 2048 / 4096 only for text_bag and mlp_heldout; "
        "models_ridge_study has seeds >= 1 only for text_bag k = 1024 and mlp_heldout "
        "k = 2048; this study ran every variant at seeds >= 1 only on text_bag, cnn_digits "
        "and lr_cancer at k = 1024. **Three-variant reference**: the best of this study's "
        "g0, g0.75 and g1 lines at that seed (all 26 scales), the same lines everywhere. "
        "Seeds: those >= 1 that every case at that k has. 'Δ LDS': LDS of g0.75 minus LDS "
        "of g1. 's0': seed 0's regret (full reference of the tables above) for comparison.",
    ]
    for k in ks:
        for big_m in (1, 5):
            seeds = seeds_of[k]
            out += [
                "",
                f"### k = {k}, M = {big_m}, seeds {','.join(map(str, seeds))} (full reference)",
                "",
                "| case | "
                + " | ".join(SUMMARY_VARIANTS)
                + " | Δ LDS g0.75 - g1 | s0: "
                + " / ".join(SUMMARY_VARIANTS)
                + " |",
                "|---|" + "---|" * (len(SUMMARY_VARIANTS) + 2),
            ]
            means: dict[str, dict[str, float]] = defaultdict(dict)
            for case in cases_of[k]:
                row = []
                for name in SUMMARY_VARIANTS:
                    rs = regrets(case, k, name, big_m, full)
                    means[name][case] = float(np.mean(rs))
                    row.append(mean_range(rs))
                diff = [at(case, k, s, "g0.75", big_m) - at(case, k, s, "g1", big_m) for s in seeds]
                s0 = [at(case, k, 0, name, big_m) for name in SUMMARY_VARIANTS]
                s0_txt = (
                    " / ".join(fmt(full[case, k, big_m, 0] - v) for v in s0)
                    if None not in s0
                    else "-"
                )
                out.append(f"| {case} | " + " | ".join(row) + f" | {mean_range(diff)} | {s0_txt} |")
            complete = len(cases_of[k]) == len(all_cases)
            worst = []
            for name in SUMMARY_VARIANTS:
                w = max(means[name], key=means[name].get)
                worst.append(f"**{fmt(means[name][w])}** ({w})")
            label = "worst seed-mean" + ("" if complete else f" ({len(cases_of[k])} cases)")
            out.append(f"| {label} | " + " | ".join(worst) + " | | |")

    # "all k": over the k with every case and the most seeds (the same draws everywhere)
    most = max(len(seeds_of[k]) for k in ks)
    ks_all = [k for k in ks if len(seeds_of[k]) == most and len(cases_of[k]) == len(all_cases)]
    out += [
        "",
        "### Worst over the cases of the seed-mean regret at 0.14",
        "",
        "Full reference / three-variant reference. '(n cases)': not every case has seeds "
        f">= 1 at that k. 'all k': over k = {', '.join(map(str, ks_all))} (every case, "
        f"{most} seeds); 'w/o {RIDGE_CASE}': the same without {RIDGE_CASE}, whose M = 1 "
        "regret is its ridge size (models_ridge_report.md).",
        "",
        "| variant | M | "
        + " | ".join(f"k={k} (seeds {len(seeds_of[k])})" for k in ks)
        + f" | all k | all k w/o {RIDGE_CASE} |",
        "|---|---|" + "---|" * (len(ks) + 2),
    ]
    for name in SUMMARY_VARIANTS:
        for big_m in (1, 5):
            row = []
            overall: dict[tuple[str, bool], tuple[float, str]] = {}
            for k in ks:
                parts = []
                for label, ref in (("full", full), ("three", three)):
                    m = {c: float(np.mean(regrets(c, k, name, big_m, ref))) for c in cases_of[k]}
                    w = max(m, key=m.get)
                    parts.append(f"{fmt(m[w])} ({w})")
                    if k not in ks_all:
                        continue
                    for skip in (False, True):
                        for c, v in m.items():
                            if skip and c == RIDGE_CASE:
                                continue
                            if v > overall.get((label, skip), (-math.inf, ""))[0]:
                                overall[label, skip] = (v, f"{c} k={k}")
                n_cases = len(cases_of[k])
                row.append(
                    " / ".join(parts) + ("" if n_cases == len(all_cases) else f" ({n_cases} cases)")
                )
            for skip in (False, True):
                row.append(
                    " / ".join(
                        f"{fmt(v)} ({where})" for (_, s), (v, where) in overall.items() if s == skip
                    )
                    or "-"
                )
            out.append(f"| {name} | {big_m} | " + " | ".join(row) + " |")
    return out


def analyse(path: Path) -> str:
    measured_all = mrs.read_lines(path)
    study_all = mrs.read_lines(mrs.OUT)
    measured = [r for r in measured_all if r["seed"] == 0]
    study = [r for r in study_all if r["seed"] == 0]
    best = mrs.references(study + measured)
    before = mrs.references(study)  # the reference without this study's lines
    mine = measured + borrowed(study, measured)
    lds_of = {
        (r["case"], r["k"], r["variant"], r["scale"], tuple(r["models"])): r["lds"] for r in mine
    }
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in mine)]
    cases = sorted(
        {r["case"] for r in mine}, key=lambda c: (next(r["n"] for r in mine if r["case"] == c), c)
    )
    ks = sorted({r["k"] for r in mine})
    have = {(r["case"], r["k"], r["variant"]) for r in mine}
    out: list[str] = []

    def value(case, k, name, c, big_m):
        return lds_of.get((case, k, name, c, tuple(range(big_m))))

    def regret(case, k, name, c, big_m, ref=best):
        v = value(case, k, name, c, big_m)
        return None if v is None else ref[case, k, big_m, 0] - v

    def oracle(case, k, name, big_m):
        """Regret at the variant's LDS-best scale for this cell."""
        rs = [regret(case, k, name, c, big_m) for c in SCALES]
        rs = [x for x in rs if x is not None]
        return min(rs) if rs else None

    def worst(fn, name, big_m, k):
        rs = {case: fn(case, k, name, big_m) for case in cases if (case, k, name) in have}
        rs = {a: b for a, b in rs.items() if b is not None}
        if len(rs) < len(cases):
            return None, ""
        w = max(rs, key=rs.get)
        return rs[w], w

    def at_default(case, k, name, big_m):
        return regret(case, k, name, DEFAULT_SCALE, big_m)

    def at_default_before(case, k, name, big_m):
        return regret(case, k, name, DEFAULT_SCALE, big_m, ref=before)

    def vs_better(case, k, name, big_m):
        """Shortfall from the better of the plain (g0) and GN (g1) kernels, both at 0.14."""
        ends = [value(case, k, end, DEFAULT_SCALE, big_m) for end in ("g0", "g1")]
        v = value(case, k, name, DEFAULT_SCALE, big_m)
        return None if v is None or None in ends else max(ends) - v

    def worst_table(fn, label) -> None:
        out.append(
            "| variant | M | "
            + " | ".join(f"k={k}" for k in ks)
            + " | all k | worst at | "
            + label
            + " |"
        )
        out.append("|---|---|" + "---|" * len(ks) + "---|---|---|")
        for name in variants:
            for big_m in (1, 5):
                row, overall, where = [], -math.inf, ""
                for k in ks:
                    r, w = worst(fn, name, big_m, k)
                    row.append("-" if r is None else fmt(r) + (" **>**" if r > 0.02 else ""))
                    if r is not None and r > overall:
                        overall, where = r, f"{w} k={k}"
                gamma, beta = VARIANTS[name]
                out.append(
                    f"| {name} | {big_m} | "
                    + " | ".join(row)
                    + f" | {fmt(overall)} | {where} | γ={gamma}, β={beta} |"
                )

    out += [
        "## Worst regret over the 8 cases per variant, auto ridge at 0.14, default blocks",
        "",
        "Regret against the best LDS at the same (case, k, M) of results.jsonl (non-identity), "
        "models_ridge_study.jsonl.gz and this study. **>**: above 0.02. '-': not every case "
        "run at that k.",
        "",
    ]
    worst_table(at_default, "R")
    out += [
        "",
        "## The same with each variant's LDS-best scale per cell (oracle ridge)",
        "",
        "A lower bound for any ridge rule on that kernel.",
        "",
    ]
    worst_table(oracle, "R")
    out += [
        "",
        "## Shortfall from the better of plain and GN, all at 0.14",
        "",
        "max(LDS of g0, LDS of g1) - LDS of the variant, at the same (case, k, M) and scale "
        "0.14: the brief's question, never far from the better end kernel? (negative: "
        "better than both).",
        "",
    ]
    worst_table(vs_better, "R")
    out += [
        "",
        "## Scale 0.14 against the reference without this study's lines",
        "",
        "Best LDS of results.jsonl and models_ridge_study.jsonl.gz only (plain and GN kernels): "
        "how far each variant is from what was known before.",
        "",
    ]
    worst_table(at_default_before, "R")

    # the best single scale per variant, judged over every (case, k) at M = 1 and M = 5

    def ks_of(name):
        return [k for k in ks if all((c, k, name) in have for c in cases)]

    out += [
        "",
        "## Summary at 0.14 over every case and every k the variant ran",
        "",
        "Worst regret (and where); 'w/o mlp_heldout': the same without mlp_heldout, whose "
        "M = 1 regret is a ridge-size problem that no kernel here changes (models_ridge_"
        "report.md); 'short': the worst shortfall from the better of g0 and g1; 'pre-study "
        "ref': against results.jsonl and models_ridge_study only.",
        "",
        "| variant | ks | M=1 | M=1 w/o mlp_heldout | M=5 | M=5 w/o mlp_heldout | short M=1 | "
        "short M=5 | pre-study ref: M=1 w/o mlp_heldout | pre-study ref: M=5 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in variants:

        def worst_of(fn, big_m, skip=(), name=name):
            rs = {
                (case, k): fn(case, k, name, big_m)
                for case in cases
                for k in ks_of(name)
                if case not in skip
            }
            where = max(rs, key=rs.get)
            return f"{fmt(rs[where])} ({where[0]} {where[1]})"

        out.append(
            f"| {name} | {','.join(map(str, ks_of(name)))} | {worst_of(at_default, 1)} | "
            f"{worst_of(at_default, 1, ('mlp_heldout',))} | {worst_of(at_default, 5)} | "
            f"{worst_of(at_default, 5, ('mlp_heldout',))} | {worst_of(vs_better, 1)} | "
            f"{worst_of(vs_better, 5)} | {worst_of(at_default_before, 1, ('mlp_heldout',))} | "
            f"{worst_of(at_default_before, 5)} |"
        )
    out += [
        "",
        "## Best single auto scale per variant",
        "",
        "Worst regret over every case and k the variant ran, with the scale minimising "
        "max(worst M=1, worst M=5).",
        "",
        "| variant | ks | best scale (M=1 and 5 jointly) | worst M=1 | worst M=5 | "
        "worst M=1 at 0.14 | worst M=5 at 0.14 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in variants:
        cells = [(case, k) for case in cases for k in ks_of(name)]

        def worst_all(c, big_m, cells=cells, name=name):
            rs = [regret(case, k, name, c, big_m) for case, k in cells]
            return max(x for x in rs if x is not None)

        joint = {c: max(worst_all(c, 1), worst_all(c, 5)) for c in SCALES}
        cb = min(joint, key=joint.get)
        out.append(
            f"| {name} | {','.join(map(str, ks_of(name)))} | {cb} | {fmt(worst_all(cb, 1))} | "
            f"{fmt(worst_all(cb, 5))} | "
            f"{fmt(worst_all(DEFAULT_SCALE, 1))} | {fmt(worst_all(DEFAULT_SCALE, 5))} |"
        )

    for big_m in (1, 5):
        out += [
            "",
            f"## M = {big_m}: regret per case and k at scale 0.14 (default blocks)",
            "",
            "| case | k | " + " | ".join(variants) + " | best LDS (reference) | g1 LDS |",
            "|---|---|" + "---|" * (len(variants) + 2),
        ]
        for case in cases:
            for k in ks:
                if (case, k, "g1") not in have and (case, k, "g0.5") not in have:
                    continue
                row = [fmt(at_default(case, k, name, big_m)) for name in variants]
                out.append(
                    f"| {case} | {k} | "
                    + " | ".join(row)
                    + f" | {best[case, k, big_m, 0]:.4f} | "
                    + f"{fmt(value(case, k, 'g1', DEFAULT_SCALE, big_m))} |"
                )

    # mean over the 5 single models: M = 1 judged on five models, not only model 0
    out += [
        "",
        "## Mean over the 5 single models at 0.14: regret against the best mean-of-singles",
        "",
        "Reference: the best mean over models 0-4 alone of any variant and scale here, or "
        "any (kernel, blocks, ridge) of models_ridge_study (no grid lines exist for models "
        "1-4 alone).",
        "",
    ]
    singles: dict[tuple, list] = defaultdict(list)
    for r in study:
        if r["M"] == 1:
            key = (r["case"], r["k"], r["kernel"], r["blocks"], r["ridge_kind"], r["scale"])
            singles[key].append(r["lds"])
    for r in mine:
        if r["M"] == 1:
            singles[r["case"], r["k"], r["variant"], r["scale"]].append(r["lds"])
    ref1: dict[tuple, float] = defaultdict(lambda: -math.inf)
    for key, vals in singles.items():
        if len(vals) == MODELS:
            ref1[key[0], key[1]] = max(ref1[key[0], key[1]], float(np.mean(vals)))
    out += [
        "| variant | " + " | ".join(f"k={k}" for k in ks) + " | all k | worst at |",
        "|---|" + "---|" * (len(ks) + 2),
    ]
    for name in variants:
        row, overall, where = [], -math.inf, ""
        for k in ks:
            rs = {}
            for case in cases:
                vals = singles.get((case, k, name, DEFAULT_SCALE), [])
                if len(vals) == MODELS:
                    rs[case] = ref1[case, k] - float(np.mean(vals))
            if len(rs) < len(cases):
                row.append("-")
                continue
            w = max(rs, key=rs.get)
            row.append(fmt(rs[w]) + (" **>**" if rs[w] > 0.02 else ""))
            if rs[w] > overall:
                overall, where = rs[w], f"{w} k={k}"
        out.append(f"| {name} | " + " | ".join(row) + f" | {fmt(overall)} | {where} |")

    # the two cells named in the brief, by scale
    for case, k in (("text_bag", 1024), ("cnn_digits", 1024), ("cnn_digits", 2048)):
        if not any((case, k, name) in have for name in variants):
            continue
        for big_m in (1, 5):
            out += [
                "",
                f"### {case}, k = {k}, M = {big_m}: LDS by scale "
                f"(best of grid/studies: {best[case, k, big_m, 0]:.4f})",
                "",
                "| scale | " + " | ".join(variants) + " |",
                "|---|" + "---|" * len(variants),
            ]
            for c in (0.05, 0.07, 0.1, 0.14, 0.2, 0.3, 0.5, 1.0):
                out.append(
                    f"| {c} | "
                    + " | ".join(fmt(value(case, k, name, c, big_m)) for name in variants)
                    + " |"
                )

    out += seeds_section(measured_all, study_all)
    out += seeds_summary(measured_all, study_all)

    # reproduction of models_ridge_study's plain and GN lines (seed 0, then seeds >= 1)
    ref_lines = {
        (r["case"], r["k"], r["seed"], r["kernel"], r["scale"], tuple(r["models"])): r["lds"]
        for r in study_all
        if r["default_blocks"] and r["ridge_kind"] == "auto"
    }
    diffs: dict[bool, list[float]] = {False: [], True: []}
    for r in measured_all:
        kernel = MRS_KERNEL.get(r["variant"])
        key = (r["case"], r["k"], r["seed"], kernel, r["scale"], tuple(r["models"]))
        if kernel and key in ref_lines:
            diffs[r["seed"] != 0].append(abs(r["lds"] - ref_lines[key]))

    def check(ds: list[float]) -> str:
        return f"{len(ds)} shared lines, max |ΔLDS| = " + (f"{max(ds):.2g}" if ds else "-")

    out += [
        "",
        "Check: g0 / g1 against models_ridge_study's plain / gauss_newton lines (default "
        f"blocks, auto): seed 0 {check(diffs[False])}; seeds >= 1 {check(diffs[True])}.",
    ]
    return "\n".join(out)


# ---------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--ks", default=",".join(map(str, KS)))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--analyse-only", action="store_true")
    parser.add_argument(
        "--store-root", type=Path, help="featurize seed != 0 stores here (e.g. /tmp/...)"
    )
    args = parser.parse_args()
    mrs.STORE_ROOT = args.store_root
    torch.set_num_threads(1)
    if not args.analyse_only:
        variants = args.variants.split(",")
        unknown = set(variants) - set(VARIANTS)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
        finished = {(r["case"], r["k"], r["seed"], r["variant"]) for r in mrs.read_lines(args.out)}
        for seed in [int(s) for s in args.seeds.split(",")]:
            for k in [int(x) for x in args.ks.split(",")]:
                for case in select(args.cases):
                    todo = [v for v in variants if (case.name, k, seed, v) not in finished]
                    if not todo:
                        continue
                    start = time.perf_counter()
                    lines = measure(case, k, seed, todo)
                    with mrs.open_text(args.out, "at") as fh:
                        for line in lines:
                            fh.write(json.dumps(line) + "\n")
                    print(
                        f"{case.name} k={k} seed={seed} {','.join(todo)}: {len(lines)} lines "
                        f"in {time.perf_counter() - start:.1f}s",
                        flush=True,
                    )
    print(analyse(args.out))


if __name__ == "__main__":
    main()
