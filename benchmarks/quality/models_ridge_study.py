"""Auto-ridge scale against the number of models M (issue 11 (b) at M = 1).

    python -m benchmarks.quality.models_ridge_study                       # every case, k, seed 0
    python -m benchmarks.quality.models_ridge_study --ks 1024 --cases text_bag --seeds 1,2,3
    python -m benchmarks.quality.models_ridge_study --analyse-only        # tables, in seconds

Question: does an ``"auto"`` ridge scale that depends on M (a single model's kernel is
noisier, so it may want a larger ridge) bring the default's M = 1 regret within 0.02 on
every case and k without hurting M = 5?

What is measured, per (case, k, seed) on the srht store ``runs/quality/<case>/stores/
srht_k<k>[_s<seed>]`` (grid.py's stores; a missing one is featurized as grid.py does): per
model m = 0..4 and kernel (gauss_newton with the library's guarded weights
``gauss_newton_weights(q, k)``, and plain), G_m = Φ_mᵀ R_m Φ_m (float64) is eigendecomposed
once per kernel-blocks setting (1 and ``ft.Estimator().for_rows(n, k, p)``'s default) as in
``ridge_study.py``: every ridge is then a diagonal reweighting, and the predicted subset
outputs of an ensemble E are Σ_{m∈E} Bᵀ_{m,E} diag(1 / (e_m + λ_m)) A_m / |E| with
A_m = Vᵀ φ_m(targets)ᵀ and B_{m,E} = Vᵀ Φ_mᵀ diag(Q̄_E) masksᵀ (Q̄_E: Q averaged over the
ensemble's models, as ``ft.Scores.combine``). Nothing of A or B is cached on disk; the LDS of
every ridge is written instead.

Ridges: ``auto`` at every scale c of SCALES (λ_b = max(c · e_j(G_bb), AUTO_RIDGE_MIN ·
trace(G_bb) / min(n, s, p)), j = round(AUTO_RIDGE_QUANTILE · min(n, p)) within [1, min(n, s,
p)], exactly ``fasttrak.kernel.auto_ridge`` per block with its scale replaced by c), and the
relative ridges of RELATIVE (λ_b = f · trace(G_bb) / min(n, s, p)), for reference.
Ensembles: each model alone ((0,) is grid.py's M = 1), (0, 1), (0, 1, 2), (0, 1, 2, 3) and
(0, ..., 4) (grid.py's M = 5).

Output: ``benchmarks/quality/models_ridge_study.jsonl.gz``, one line per (case, k, seed, kernel,
blocks, ridge, ensemble): lds (first retraining, as grid.py) and lds_avg (both). The analysis
takes the regret of a line against the best LDS at the same (case, k, M, seed) of
results.jsonl (seed 0; report.md's "same k" definition: any projector but identity) or
seeds.jsonl (seed >= 1), and of this study's lines of the ensemble (0, ..., M-1), and prints
the markdown tables of ``models_ridge_report.md``.

Runtime on one core: 3-10 s per (case, k) at k <= 1024, 20-37 s at k = 2048, 130-170 s at
k = 4096: ~25 minutes for the 32 (case, k) of seed 0 (stores cached). A seed != 0 store is
featurized first (text_bag k = 1024: ~1 s; mlp_heldout k = 2048: ~5 s); ``--store-root
/tmp/x`` keeps those stores out of runs/ (~40 and ~160 MB each).
"""

from __future__ import annotations

import argparse
import gzip
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
from benchmarks.quality.cases import Case, select
from benchmarks.quality.ridge_study import block_lambdas, eig_blocks, lds
from fasttrak import kernel as kernel_ops

OUT = Path(__file__).with_name("models_ridge_study.jsonl.gz")  # 28k lines: 0.5 MB gzipped
SEEDS_JSONL = Path(__file__).with_name("seeds.jsonl")
PROJECTOR = "srht"
KS = (1024, 2048, 256, 4096)
MODELS = 5
SCALES = (
    0.05,
    0.06,
    0.07,
    0.085,
    0.1,
    0.12,
    0.14,
    0.17,
    0.2,
    0.25,
    0.3,
    0.35,
    0.4,
    0.5,
    0.6,
    0.7,
    0.85,
    1.0,
    1.2,
    1.5,
    1.75,
    2.0,
    2.5,
    3.0,
    4.0,
    5.0,
)
"""Scales c of the auto ridge λ = c · e_j (the library's AUTO_RIDGE_SCALE is 0.14)."""
RELATIVE = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
"""Relative ridges f · trace / min(n, s, p), for reference (grid.py's "ridge" numbers)."""
ENSEMBLES = ((0,), (1,), (2,), (3,), (4,), (0, 1), (0, 1, 2), (0, 1, 2, 3), (0, 1, 2, 3, 4))
KERNELS = ("gauss_newton", "plain")
NAMED = (0.12, 0.14, 0.17, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)
"""The scales shown in the tables (the scan has all of SCALES)."""


# ---------------------------------------------------------------------- measurement


def default_blocks(n: int, k: int, p: int) -> int:
    return ft.Estimator().for_rows(n, k, p).blocks


def auto_lambdas(e: np.ndarray, which: np.ndarray, scale: float, n: int, p: int) -> np.ndarray:
    """Per coordinate, ``kernel.auto_ridge`` of its block with AUTO_RIDGE_SCALE -> scale."""
    lam = np.zeros_like(e)
    for b in np.unique(which):
        sel = which == b
        eb = np.sort(e[sel])[::-1]
        rank = kernel_ops.rank_bound(int(sel.sum()), n, p)
        j = kernel_ops._auto_ridge_rank(rank, n, p)
        lam[sel] = max(scale * eb[j - 1], kernel_ops.AUTO_RIDGE_MIN * eb.sum() / rank)
    return lam


def ridges() -> list[tuple[str, float]]:
    return [("auto", c) for c in SCALES] + [("relative", f) for f in RELATIVE]


STORE_ROOT: Path | None = None
"""``--store-root``: where stores of seeds != 0 go (default: grid.py's place, under runs/)."""


def store_path(case: Case, k: int, seed: int) -> Path:
    name = f"{PROJECTOR}_k{k}" + (f"_s{seed}" if seed else "")
    if seed and STORE_ROOT is not None:
        return STORE_ROOT / case.name / name
    return gt.case_dir(case) / "stores" / name


def measure(case: Case, k: int, seed: int) -> list[dict[str, Any]]:
    """Every (kernel, blocks, ridge, ensemble) LDS of one (case, k, seed) store."""
    data = case.data()
    n, p = data.n, case.p
    masks, outputs = gt.ground_truth(case)
    _, outputs_b = gt.ground_truth(case, second=True)
    outputs_avg = (outputs + outputs_b) / 2
    ckpts = gt.checkpoints(case, MODELS)
    trak = ft.TRAK(
        case.model(),
        proj_dim=k,
        projector=grid.projector_config(PROJECTOR, p, k),
        store=store_path(case, k, seed),
        seed=seed,
        batch_size=grid.BATCH_SIZE,
        progress=False,
    )
    for m in range(MODELS):  # skips what is stored
        trak.featurize(data.train_set(), checkpoints=[ckpts[m]], model_ids=[m])
    qs = [trak.store.model(m).q().astype(np.float64) for m in range(MODELS)]
    q_of = {ens: np.mean([qs[m] for m in ens], axis=0) for ens in ENSEMBLES}
    masks_t = masks.astype(np.float64).T  # (n, S)
    rule = default_blocks(n, k, p)
    block_settings = sorted({1, rule})
    grid_ridges = ridges()
    acc: dict[tuple, np.ndarray] = {}
    for m in range(MODELS):
        phi = trak.store.model(m).features().astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ft.SaturationWarning)
            target = trak.features(data.target_set(), checkpoint=ckpts[m], model_id=m)
            r_gn = kernel_ops.gauss_newton_weights(qs[m], k=k)
        phi_t = target.phi.astype(np.float64)
        mine = [ens for ens in ENSEMBLES if m in ens]
        c_of = {ens: phi.T @ (q_of[ens][:, None] * masks_t) for ens in mine}  # (k, S)
        for kernel in KERNELS:
            x = phi * np.sqrt(r_gn)[:, None] if kernel == "gauss_newton" else phi
            g = x.T @ x
            for blocks in block_settings:
                e, v, which = eig_blocks(g, blocks)
                a = v.T @ phi_t.T  # (k, T)
                b_of = {ens: v.T @ c_of[ens] for ens in mine}  # (k, S)
                for kind, c in grid_ridges:
                    lam = (
                        auto_lambdas(e, which, c, n, p)
                        if kind == "auto"
                        else block_lambdas(e, which, c, n, p)
                    )
                    wa = (1.0 / (e + lam))[:, None] * a
                    for ens in mine:
                        key = (kernel, blocks, kind, c, ens)
                        part = (b_of[ens].T @ wa).astype(np.float32)
                        if key in acc:
                            acc[key] += part
                        else:
                            acc[key] = part
        print(f"  {case.name} k={k} seed={seed}: model {m} done", flush=True)
    lines = []
    for (kernel, blocks, kind, c, ens), total in acc.items():
        pred = total.astype(np.float64) / len(ens)
        lines.append(
            {
                "case": case.name,
                "n": n,
                "p": p,
                "k": k,
                "seed": seed,
                "projector": PROJECTOR,
                "kernel": kernel,
                "blocks": blocks,
                "default_blocks": blocks == rule,
                "ridge_kind": kind,
                "scale": c,
                "models": list(ens),
                "M": len(ens),
                "lds": lds(pred, outputs),
                "lds_avg": lds(pred, outputs_avg),
                "auto_quantile": kernel_ops.AUTO_RIDGE_QUANTILE,
                "auto_min": kernel_ops.AUTO_RIDGE_MIN,
            }
        )
    return lines


def open_text(path: Path, mode: str = "rt") -> Any:
    """The lines file, gzip-compressed when its name ends in .gz (appending to one adds a
    gzip member, which gzip readers concatenate)."""
    return gzip.open(path, mode) if path.suffix == ".gz" else path.open(mode)


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open_text(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def done(path: Path) -> set[tuple]:
    return {(r["case"], r["k"], r["seed"]) for r in read_lines(path)}


# ---------------------------------------------------------------------- analysis


def load(path: Path) -> list[dict[str, Any]]:
    return read_lines(path)


def references(mine: list[dict[str, Any]], srht_only: bool = False) -> dict[tuple, float]:
    """Best LDS per (case, k, M, seed): grid lines (results.jsonl for seed 0, seeds.jsonl for
    the others; identity excluded; ``srht_only``: only srht lines, i.e. the best estimator on
    the same features) and this study's lines of the ensemble (0, ..., M-1)."""
    best: dict[tuple, float] = defaultdict(lambda: -math.inf)
    for path, seed_zero in ((grid.RESULTS, True), (SEEDS_JSONL, False)):
        for r in load(path):
            seed = r.get("seed", 0)
            if (seed == 0) != seed_zero or r["projector"] == "identity":
                continue
            if srht_only and r["projector"] != PROJECTOR:
                continue
            key = (r["case"], r["k_requested"], r["M"], seed)
            best[key] = max(best[key], r["lds"])
    for r in mine:
        if r["models"] == list(range(r["M"])):
            key = (r["case"], r["k"], r["M"], r["seed"])
            best[key] = max(best[key], r["lds"])
    return best


def index(mine: list[dict[str, Any]]) -> dict[tuple, float]:
    """LDS by (case, k, seed, kernel, blocks setting, kind, scale, models)."""
    out = {}
    for r in mine:
        setting = "default" if r["default_blocks"] else "1"
        keys = [setting] + (["1"] if r["default_blocks"] and r["blocks"] == 1 else [])
        for s in keys:
            out[
                r["case"],
                r["k"],
                r["seed"],
                r["kernel"],
                s,
                r["ridge_kind"],
                r["scale"],
                tuple(r["models"]),
            ] = r["lds"]
    return out


def fmt(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3f}"


def analyse(path: Path) -> str:
    mine = load(path)
    best = references(mine)
    same_store = references(mine, srht_only=True)
    lds_of = index(mine)
    seed0 = [r for r in mine if r["seed"] == 0]
    cases = sorted(
        {r["case"] for r in seed0}, key=lambda c: (next(r["n"] for r in seed0 if r["case"] == c), c)
    )
    ks = sorted({r["k"] for r in seed0})
    cells = [
        (c, k)
        for c in cases
        for k in ks
        if (c, k, 0) in {(r["case"], r["k"], r["seed"]) for r in seed0}
    ]
    out: list[str] = []

    def regret(
        case, k, seed, big_m, scale, blocks="default", kernel="gauss_newton", kind="auto", ref=best
    ):
        ens = tuple(range(big_m))
        v = lds_of.get((case, k, seed, kernel, blocks, kind, scale, ens))
        return None if v is None else ref[case, k, big_m, seed] - v

    def worst_table(blocks: str) -> None:
        out.append("| M | scale | " + " | ".join(f"k={k}" for k in ks) + " | all k | worst at |")
        out.append("|---|---|" + "---|" * len(ks) + "---|---|")
        for big_m in (1, 2, 3, 4, 5):
            for c in NAMED:
                row, overall, where = [], -math.inf, ""
                for k in ks:
                    rs = {
                        case: regret(case, k, 0, big_m, c, blocks) for case, kk in cells if kk == k
                    }
                    rs = {a: b for a, b in rs.items() if b is not None}
                    if not rs:
                        row.append("-")
                        continue
                    w = max(rs, key=rs.get)
                    row.append(fmt(rs[w]) + (" **>**" if rs[w] > 0.02 else ""))
                    if rs[w] > overall:
                        overall, where = rs[w], f"{w} k={k}"
                out.append(
                    f"| {big_m} | {c} | " + " | ".join(row) + f" | {fmt(overall)} | {where} |"
                )

    def worst_over(big_m, c, blocks="default", subset=None):
        rs = [regret(case, k, 0, big_m, c, blocks) for case, k in (subset or cells)]
        rs = [x for x in rs if x is not None]
        return max(rs) if rs else math.nan

    out += [
        "## Worst regret over the 8 cases, GN kernel, auto ridge at scale c, default blocks",
        "",
    ]
    out += [
        "Regret against the best LDS at the same (case, k, M) of results.jsonl and this "
        "study (M = 2-4: this study only). **>**: above 0.02.",
        "",
    ]
    worst_table("default")
    out += ["", "## The same with 1 kernel block everywhere", ""]
    worst_table("1")

    out += ["", "## Best single scale per M (default blocks; all k, all cases; full scan)", ""]
    out += ["| M | best scale | its worst regret | worst at 0.14 |", "|---|---|---|---|"]
    best_scale = {}
    for big_m in (1, 2, 3, 4, 5):
        ws = {c: worst_over(big_m, c) for c in SCALES}
        c_best = min(ws, key=ws.get)
        best_scale[big_m] = c_best
        out.append(f"| {big_m} | {c_best} | {fmt(ws[c_best])} | {fmt(ws[0.14])} |")
    out += ["", "Full curve, worst regret over cases and k per scale:", ""]
    out += [
        "| scale | " + " | ".join(f"M={m}" for m in (1, 2, 3, 4, 5)) + " |",
        "|---|" + "---|" * 5,
    ]
    for c in SCALES:
        out.append(f"| {c} | " + " | ".join(fmt(worst_over(m, c)) for m in (1, 2, 3, 4, 5)) + " |")

    out += ["", "## Oracle floor: the best scale chosen per (case, k), default blocks", ""]
    out += [
        "min over scales of the regret, per cell; a cell above 0.02 here cannot be fixed "
        "by any auto-ridge scale of the GN kernel at this M.",
        "",
    ]
    out += ["| M | worst floor | cells with floor > 0.02 (floor, best scale) |", "|---|---|---|"]
    for big_m in (1, 2, 3, 4, 5):
        floors = {}
        for case, k in cells:
            rs = {c: regret(case, k, 0, big_m, c) for c in SCALES}
            c_min = min(rs, key=rs.get)
            floors[case, k] = (rs[c_min], c_min)
        bad = [f"{case} k={k} ({v:.3f}, {c})" for (case, k), (v, c) in floors.items() if v > 0.02]
        out.append(
            f"| {big_m} | {fmt(max(v for v, _ in floors.values()))} | "
            + ("; ".join(bad) or "none")
            + " |"
        )
    out += [
        "",
        "Worst regret over the cells whose floor is <= 0.02 (the fixable ones), per M and scale:",
        "",
    ]
    out += [
        "| scale | " + " | ".join(f"M={m}" for m in (1, 2, 3, 4, 5)) + " |",
        "|---|" + "---|" * 5,
    ]
    fixable = {}
    for big_m in (1, 2, 3, 4, 5):
        fixable[big_m] = [
            (case, k)
            for case, k in cells
            if min(regret(case, k, 0, big_m, c) for c in SCALES) <= 0.02
        ]
    for c in SCALES:
        out.append(
            f"| {c} | "
            + " | ".join(fmt(worst_over(m, c, subset=fixable[m])) for m in (1, 2, 3, 4, 5))
            + " |"
        )

    out += ["", "## LDS-best scale per case and k (GN, default blocks; model 0 alone vs 5)", ""]
    out += [
        "| case | " + " | ".join(f"k={k} M=1 / M=5" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for case in cases:
        row = []
        for k in ks:
            if (case, k) not in cells:
                row.append("-")
                continue
            pair = []
            for big_m in (1, 5):
                v = {
                    c: lds_of[case, k, 0, "gauss_newton", "default", "auto", c, tuple(range(big_m))]
                    for c in SCALES
                }
                pair.append(str(max(v, key=v.get)))
            row.append(" / ".join(pair))
        out.append(f"| {case} | " + " | ".join(row) + " |")

    out += [
        "",
        "## Same features only: regret against the best srht estimator (no dense lines)",
        "",
    ]
    out += [
        "At k = 256 several M = 1 references are dense-projection lines (one draw's luck, "
        "seeds_report.md); this is the estimator's regret on its own store.",
        "",
    ]
    out += [
        "| M | scale | " + " | ".join(f"k={k}" for k in ks) + " | all k | worst at |",
        "|---|---|" + "---|" * len(ks) + "---|---|",
    ]
    for big_m in (1, 5):
        for c in (0.1, 0.12, 0.14, 0.17, 0.2, 0.3):
            row, overall, where = [], -math.inf, ""
            for k in ks:
                rs = {
                    case: regret(case, k, 0, big_m, c, ref=same_store)
                    for case, kk in cells
                    if kk == k
                }
                w = max(rs, key=rs.get)
                row.append(fmt(rs[w]) + (" **>**" if rs[w] > 0.02 else ""))
                if rs[w] > overall:
                    overall, where = rs[w], f"{w} k={k}"
            out.append(f"| {big_m} | {c} | " + " | ".join(row) + f" | {fmt(overall)} | {where} |")

    out += ["", "## Rules scale(M) = 0.14 · (5 / M)^α (snapped to the nearest scanned scale)", ""]
    out += [
        "| α | " + " | ".join(f"M={m}" for m in (1, 2, 3, 4, 5)) + " | scales |",
        "|---|" + "---|" * 6,
    ]
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0):
        snapped = {m: snap(0.14 * (5 / m) ** alpha) for m in (1, 2, 3, 4, 5)}
        out.append(
            f"| {alpha} | "
            + " | ".join(fmt(worst_over(m, snapped[m])) for m in (1, 2, 3, 4, 5))
            + " | "
            + ", ".join(str(snapped[m]) for m in (1, 2, 3, 4, 5))
            + " |"
        )

    out += ["", "## Step rules scale(M): worst regret per k, and the cells above 0.02", ""]
    out += [
        "| rule | M | " + " | ".join(f"k={k}" for k in ks) + " | cells > 0.02 (regret; "
        "same-store regret) |",
        "|---|---|" + "---|" * len(ks) + "---|",
    ]
    for label, rule in STEP_RULES.items():
        for big_m in (1, 2, 3, 4, 5):
            c = rule(big_m)
            row = []
            for k in ks:
                rs = [regret(case, k, 0, big_m, c) for case, kk in cells if kk == k]
                row.append(fmt(max(rs)))
            bad = [
                f"{case} k={k} ({regret(case, k, 0, big_m, c):.3f}; "
                f"{regret(case, k, 0, big_m, c, ref=same_store):.3f})"
                for case, k in cells
                if regret(case, k, 0, big_m, c) > 0.02
            ]
            out.append(
                f"| {label} | {big_m} (c={c}) | "
                + " | ".join(row)
                + " | "
                + ("; ".join(bad) or "none")
                + " |"
            )

    out += ["", "## M = 1: regret per case and k at selected scales (default blocks)", ""]
    show = (0.14, 0.17, 0.2, 0.3, 0.5, 1.0, best_scale[1])
    show = tuple(dict.fromkeys(show))
    out += [
        "| case | k | " + " | ".join(f"c={c}" for c in show) + " | best GN auto (scale) | "
        "best plain auto | best of grid/study |",
        "|---|---|" + "---|" * (len(show) + 3),
    ]
    for case, k in cells:
        ens = (0,)
        row = [fmt(regret(case, k, 0, 1, c)) for c in show]
        gn = {
            c: lds_of.get((case, k, 0, "gauss_newton", "default", "auto", c, ens)) for c in SCALES
        }
        gn = {c: v for c, v in gn.items() if v is not None}
        pl = {c: lds_of.get((case, k, 0, "plain", "1", "auto", c, ens)) for c in SCALES}
        pl = {c: v for c, v in pl.items() if v is not None}
        cg, cp = max(gn, key=gn.get), max(pl, key=pl.get)
        out.append(
            f"| {case} | {k} | "
            + " | ".join(row)
            + f" | {gn[cg]:.3f} ({cg}) | {pl[cp]:.3f} ({cp}) | {best[case, k, 1, 0]:.3f} |"
        )

    out += ["", "## The two failing cells: LDS at M = 1 (model 0) by scale", ""]
    for case, k in (("text_bag", 1024), ("mlp_heldout", 2048)):
        if (case, k) not in cells:
            continue
        out += [f"### {case}, k = {k} (best at M = 1: {best[case, k, 1, 0]:.4f})", ""]
        out += [
            "| scale | GN default blocks | GN 1 block | plain 1 block | GN mean of 5 "
            "single models | GN M=5 regret |",
            "|---|---|---|---|---|---|",
        ]
        for c in SCALES:
            g = lds_of.get((case, k, 0, "gauss_newton", "default", "auto", c, (0,)))
            g1 = lds_of.get((case, k, 0, "gauss_newton", "1", "auto", c, (0,)))
            pl = lds_of.get((case, k, 0, "plain", "1", "auto", c, (0,)))
            singles = [
                lds_of.get((case, k, 0, "gauss_newton", "default", "auto", c, (m,)))
                for m in range(MODELS)
            ]
            out.append(
                f"| {c} | {fmt(g)} | {fmt(g1)} | {fmt(pl)} | {fmt(float(np.mean(singles)))} "
                f"| {fmt(regret(case, k, 0, 5, c))} |"
            )
        out.append("")

    out += ["## Mean over the 5 single models (each model alone), GN, default blocks", ""]
    out += [
        "Regret against the best mean-of-5-singles LDS of any (kernel, blocks, ridge) of "
        "this study (no grid lines exist for models 1-4 alone).",
        "",
    ]
    out += [
        "| scale | " + " | ".join(f"k={k}" for k in ks) + " | all k |",
        "|---|" + "---|" * (len(ks) + 1),
    ]
    mean_single: dict[tuple, float] = {}
    for case, k in cells:
        for kernel in KERNELS:
            for blocks in ("default", "1"):
                for kind, c in ridges():
                    vals = [
                        lds_of.get((case, k, 0, kernel, blocks, kind, c, (m,)))
                        for m in range(MODELS)
                    ]
                    if all(v is not None for v in vals):
                        mean_single[case, k, kernel, blocks, kind, c] = float(np.mean(vals))
    ref1 = defaultdict(lambda: -math.inf)
    for (case, k, *_), v in mean_single.items():
        ref1[case, k] = max(ref1[case, k], v)
    for c in NAMED:
        row, overall = [], -math.inf
        for k in ks:
            rs = [
                ref1[case, k] - mean_single[case, k, "gauss_newton", "default", "auto", c]
                for case, kk in cells
                if kk == k
            ]
            row.append(fmt(max(rs)))
            overall = max(overall, max(rs))
        out.append(f"| {c} | " + " | ".join(row) + f" | {fmt(overall)} |")

    seeds = sorted({r["seed"] for r in mine if r["seed"] != 0})
    if seeds:
        out += [
            "",
            "## Other projection seeds (regret vs the best of seeds.jsonl and this study)",
            "",
        ]
        seed_cells = sorted({(r["case"], r["k"]) for r in mine if r["seed"] != 0})
        for case, k in seed_cells:
            ss = [0] + sorted(
                {r["seed"] for r in mine if r["seed"] != 0 and r["case"] == case and r["k"] == k}
            )
            for big_m in (1, 5):
                out += [f"### {case}, k = {k}, M = {big_m}: regret per seed", ""]
                out += [
                    "| scale | " + " | ".join(f"s{s}" for s in ss) + " | mean |",
                    "|---|" + "---|" * (len(ss) + 1),
                ]
                for c in NAMED:
                    rs = [regret(case, k, s, big_m, c) for s in ss]
                    out.append(
                        f"| {c} | "
                        + " | ".join(fmt(x) for x in rs)
                        + " | "
                        + fmt(float(np.mean([x for x in rs if x is not None])))
                        + " |"
                    )
                gnb = [
                    max(
                        lds_of.get(
                            (case, k, s, "gauss_newton", b, kind, c, tuple(range(big_m))), -1
                        )
                        for b in ("default", "1")
                        for kind, c in ridges()
                    )
                    for s in ss
                ]
                gaps = [best[case, k, big_m, s] - x for s, x in zip(ss, gnb, strict=True)]
                out.append(
                    "| best GN (any ridge) | "
                    + " | ".join(fmt(x) for x in gaps)
                    + f" | {fmt(float(np.mean(gaps)))} |"
                )
                out.append("")
    return "\n".join(out)


STEP_RULES = {
    "0.14 (today)": lambda m: 0.14,
    "0.17 if M <= 2 else 0.14": lambda m: 0.17 if m <= 2 else 0.14,
    "0.2 / 0.17 / 0.14 (M = 1 / 2 / >= 3)": lambda m: 0.2 if m == 1 else 0.17 if m == 2 else 0.14,
}


def snap(c: float) -> float:
    return min(SCALES, key=lambda s: abs(math.log(s / c)))


# ---------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--ks", default=",".join(map(str, KS)))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--analyse-only", action="store_true")
    parser.add_argument(
        "--store-root", type=Path, help="featurize seed != 0 stores here (e.g. /tmp/...)"
    )
    args = parser.parse_args()
    global STORE_ROOT
    STORE_ROOT = args.store_root
    torch.set_num_threads(1)
    if not args.analyse_only:
        finished = done(args.out)
        for seed in [int(s) for s in args.seeds.split(",")]:
            for k in [int(x) for x in args.ks.split(",")]:
                for case in select(args.cases):
                    if (case.name, k, seed) in finished:
                        continue
                    start = time.perf_counter()
                    lines = measure(case, k, seed)
                    with open_text(args.out, "at") as fh:
                        for line in lines:
                            fh.write(json.dumps(line) + "\n")
                    print(
                        f"{case.name} k={k} seed={seed}: {len(lines)} lines in "
                        f"{time.perf_counter() - start:.1f}s",
                        flush=True,
                    )
    print(analyse(args.out))


if __name__ == "__main__":
    main()
