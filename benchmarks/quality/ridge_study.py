"""Ridge study (issue 11 (b)): the LDS-best ridge per case, and ground-truth-free rules for it.

    python -m benchmarks.quality.ridge_study                 # prepare every case, grid, analysis
    python -m benchmarks.quality.ridge_study --cases text_bag
    python -m benchmarks.quality.ridge_study --analyse-only  # from the caches, in seconds

Needs the ground truth and the srht k=2048 stores of ``python -m benchmarks.quality.grid``
(a missing store is featurized as grid.py does). Everything is at the library's default
store (srht, k = 2048), the Gauss-Newton kernel (guarded weights, ``gauss_newton_weights``)
and M = 5 models; kernel blocks: ``ft.Estimator().for_rows(n, k)``'s default and 1.

How: per model m, G_m = Φ_mᵀ R_m Φ_m (float64) is eigendecomposed once (per diagonal block
with blocks), G = V diag(e) Vᵀ. Every ridge is then a diagonal reweighting: the LDS only
needs the predicted outputs of the subsets, pred[s, t] = Σ_m φ_m(t)ᵀ (G_m + λ_m)⁻¹
Φ_mᵀ diag(Q̄) mask_s / M, so A_m = Vᵀ φ_m(targets)ᵀ (k, T) and B_m = Vᵀ Φ_mᵀ diag(Q̄) masksᵀ
(k, S) are cached (``runs/quality/<case>/ridge_study_k2048.npz``, float32) and any λ — a
grid factor or an adaptive rule's — costs one (T, k) x (k, S) product. Per-block ridges
follow the library: λ_b = factor · trace(G_bb) / min(n, k/B, p), and the B block solves
are averaged.

Ground-truth-free criteria computed while preparing (the kernel ridge regression the
estimator implies: rows R^½ φ_i, responses R^½ y_i, y the model's own training margin
log((1 - Q) / Q)): GCV n · RSS / (n - df)² and the exact leave-one-out error, on the
``FACTORS`` grid.

Output: ``benchmarks/quality/ridge_study.jsonl``, one line per (case, blocks, factor) of the
LDS grid (lds: first retraining, as grid.py; lds_avg: both) and one per (case, blocks) with
the GCV / LOO / degrees-of-freedom curves; then every candidate rule of ``RULES`` (λ per
kernel block from its eigenvalues, n, s = k/B, p and one constant c) is scanned over c for
each ``BLOCK_SETTINGS`` (one line per (case, rule, blocks setting), kind "rule") and
summarised: the c with the smallest worst regret over the cases (regret = best LDS of any
estimator on the case's srht k=2048 store at M = 5, grid.py's lines included, minus the
rule's), and the leave-one-case-out worst regret (c fitted on 7 cases, judged on the 8th).
Preparing takes ~4 minutes for the 8 cases on one core, the rule scans ~15 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

import fasttrak as ft
from benchmarks.quality import grid
from benchmarks.quality import ground_truth as gt
from benchmarks.quality.cases import Case, select
from fasttrak import kernel as kernel_ops

OUT = Path(__file__).with_name("ridge_study.jsonl")
PROJECTOR = "srht"
K = 2048
M = 5
FACTORS = tuple(float(f"{x:.3g}") for x in np.exp(np.linspace(np.log(0.01), np.log(10.0), 31)))
"""The ridge grid: 31 factors log-spaced from 0.01 to 10 (ratio 1.26)."""

# ---------------------------------------------------------------------- preparation


def cache_path(case: Case) -> Path:
    return gt.case_dir(case) / f"ridge_study_k{K}.npz"


def block_rule(n: int) -> int:
    """``ft.Estimator()``'s default number of kernel blocks for n rows at k = K."""
    return ft.Estimator().for_rows(n, K).blocks


def eig_blocks(g: np.ndarray, blocks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigenvalues (k,), block-diagonal eigenvectors (k, k) and block id per coordinate
    (k,) of the B diagonal blocks of G (each block's eigenvalues in ascending order)."""
    k = g.shape[0]
    e, v, which = np.zeros(k), np.zeros((k, k)), np.zeros(k, dtype=np.int64)
    for b, part in enumerate(kernel_ops.block_slices(k, blocks)):
        eb, vb = np.linalg.eigh(g[part, part])
        e[part], v[part, part], which[part] = np.clip(eb, 0.0, None), vb, b
    return e, v, which


def prepare(case: Case) -> dict[str, np.ndarray]:
    """Per model and blocks setting: eigenvalues, A, B and the GCV / LOO curves (cached)."""
    path = cache_path(case)
    if path.exists():
        return dict(np.load(path))
    data = case.data()
    n, p = data.n, case.p
    masks, _ = gt.ground_truth(case)
    ckpts = gt.checkpoints(case, M)
    store = gt.case_dir(case) / "stores" / f"{PROJECTOR}_k{K}"
    trak = ft.TRAK(
        case.model(),
        proj_dim=K,
        projector=grid.projector_config(PROJECTOR, p, K),
        store=store,
        batch_size=grid.BATCH_SIZE,
        progress=False,
    )
    for m in range(M):  # skips what is stored
        trak.featurize(data.train_set(), checkpoints=[ckpts[m]], model_ids=[m])
    qs = [trak.store.model(m).q().astype(np.float64) for m in range(M)]
    q_mean = np.mean(qs, axis=0)
    weighted_masks = (masks.astype(np.float64) * q_mean[None, :]).T  # (n, S)
    out: dict[str, np.ndarray] = {"n": np.array(n), "p": np.array(p), "q_mean": q_mean}
    for b_count in sorted({1, block_rule(n)}):
        out[f"blocks_{b_count}"] = np.array(1)
    for m in range(M):
        phi = trak.store.model(m).features().astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ft.SaturationWarning)
            r = kernel_ops.gauss_newton_weights(qs[m], k=K)
            target = trak.features(data.target_set(), checkpoint=ckpts[m], model_id=m)
        x = phi * np.sqrt(r)[:, None]
        g = x.T @ x
        q = np.clip(qs[m], 1e-12, 1 - 1e-12)
        y = np.log1p(-q) - np.log(q)  # the training margin, from Q = 1 - sigmoid(margin)
        ytil = np.sqrt(r) * y
        out[f"r_{m}"] = r
        out[f"margin_{m}"] = y
        phi_t = target.phi.astype(np.float64)
        for b_count in sorted({1, block_rule(n)}):
            e, v, which = eig_blocks(g, b_count)
            tag = f"{m}_b{b_count}"
            out[f"e_{tag}"] = e
            out[f"which_{tag}"] = which
            out[f"A_{tag}"] = (v.T @ phi_t.T).astype(np.float32)
            out[f"B_{tag}"] = (v.T @ (phi.T @ weighted_masks)).astype(np.float32)
            z = x @ v  # (n, k): rows in the eigenbasis
            zy = z.T @ ytil
            z2 = z * z
            gcv, loo, df = [], [], []
            for f in FACTORS:
                w = 1.0 / (e + block_lambdas(e, which, f, n, p)) / b_count
                fitted = z @ (w * zy)
                hii = z2 @ w
                resid = ytil - fitted
                dof = float((e * w).sum())
                gcv.append(n * float(resid @ resid) / (n - dof) ** 2)
                loo.append(float(np.mean((resid / (1 - hii)) ** 2)))
                df.append(dof)
            out[f"gcv_{tag}"] = np.array(gcv)
            out[f"loo_{tag}"] = np.array(loo)
            out[f"df_{tag}"] = np.array(df)
        print(f"  {case.name}: model {m} prepared", flush=True)
    np.savez(path, **out)
    return out


def block_lambdas(e: np.ndarray, which: np.ndarray, factor: float, n: int, p: int) -> np.ndarray:
    """The library's relative ridge per coordinate: factor · trace(G_bb) / min(n, s_b, p)."""
    lam = np.zeros_like(e)
    for b in np.unique(which):
        sel = which == b
        lam[sel] = factor * e[sel].sum() / min(n, int(sel.sum()), p)
    return lam


# ---------------------------------------------------------------------- LDS


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per column, the Spearman correlation of a and b (S, T) over rows; NaN if constant."""
    ra, rb = rankdata(a, axis=0), rankdata(b, axis=0)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    den = np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(0) / den, np.nan)


def predicted(prep: dict[str, np.ndarray], blocks: int, lams: list[np.ndarray], models=None):
    """Predicted subset outputs (S, T) of the ensemble of ``models`` (default all), with the
    per-coordinate ridge ``lams[m]`` of each model."""
    models = range(M) if models is None else models
    total = 0.0
    for m in models:
        tag = f"{m}_b{blocks}"
        w = 1.0 / (prep[f"e_{tag}"] + lams[m]) / blocks
        total = total + prep[f"B_{tag}"].T.astype(np.float64) @ (
            w[:, None] * prep[f"A_{tag}"].astype(np.float64)
        )
    return total / len(models)


def lds(pred: np.ndarray, outputs: np.ndarray) -> float:
    return float(np.nanmean(spearman_columns(pred, outputs)))


def factor_lambdas(prep: dict[str, np.ndarray], blocks: int, factor: float) -> list[np.ndarray]:
    n, p = int(prep["n"]), int(prep["p"])
    return [
        block_lambdas(prep[f"e_{m}_b{blocks}"], prep[f"which_{m}_b{blocks}"], factor, n, p)
        for m in range(M)
    ]


# ---------------------------------------------------------------------- the grid


def done(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        r = json.loads(line)
        keys.add((r["case"], r["kind"], r["blocks"], r.get("factor")))
    return keys


def run_case(case: Case, out: Path) -> None:
    finished = done(out)
    prep = prepare(case)
    n = int(prep["n"])
    _, outputs = gt.ground_truth(case)
    _, outputs_b = gt.ground_truth(case, second=True)
    lines = []
    for blocks in sorted({1, block_rule(n)}):
        for f in FACTORS:
            if (case.name, "lds", blocks, f) in finished:
                continue
            pred = predicted(prep, blocks, factor_lambdas(prep, blocks, f))
            lines.append(
                {
                    "case": case.name,
                    "kind": "lds",
                    "blocks": blocks,
                    "factor": f,
                    "default_blocks": blocks == block_rule(n),
                    "lds": lds(pred, outputs),
                    "lds_avg": lds(pred, (outputs + outputs_b) / 2),
                }
            )
        if (case.name, "criteria", blocks, None) not in finished:
            lines.append(
                {
                    "case": case.name,
                    "kind": "criteria",
                    "blocks": blocks,
                    "factors": list(FACTORS),
                    **{
                        f"{name}_{m}": prep[f"{name}_{m}_b{blocks}"].tolist()
                        for name in ("gcv", "loo", "df")
                        for m in range(M)
                    },
                }
            )
    with out.open("a") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")


# ---------------------------------------------------------------------- candidate rules
#
# A rule maps one diagonal block's eigenvalues (descending, s of them), n, s, p and its
# constant c to that block's λ. Its constant is scanned on a log grid; per case, the LDS at
# M = 5 of the rule at each c is cached in the jsonl (kind "rule").


def solve_df(e: np.ndarray, target: float) -> float:
    """λ with Σ e / (e + λ) = target (degrees of freedom of the ridge fit), by bisection on
    log λ; 0 when the target is at least the number of nonzero eigenvalues."""
    pos = e[e > e[0] * 1e-12]
    if target >= len(pos):
        return float(pos[-1] * 1e-6)
    lo, hi = math.log(pos[-1] * 1e-6), math.log(pos[0] * 1e6)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float((pos / (pos + math.exp(mid))).sum()) > target:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def eff_rank(e: np.ndarray) -> float:
    return float(e.sum() ** 2 / (e * e).sum())


def at_index(e: np.ndarray, x: float) -> float:
    return float(e[min(len(e) - 1, max(0, int(round(x)) - 1))])


RULES: dict[str, Any] = {
    "trace/min(n,s,p) [current]": lambda e, n, s, p, c: c * e.sum() / min(n, s, p),
    "trace/s": lambda e, n, s, p, c: c * e.sum() / s,
    "trace/n": lambda e, n, s, p, c: c * e.sum() / n,
    "trace/sqrt(n s)": lambda e, n, s, p, c: c * e.sum() / math.sqrt(n * s),
    "e_max": lambda e, n, s, p, c: c * e[0],
    "trace/eff_rank": lambda e, n, s, p, c: c * float((e * e).sum() / e.sum()),
    "e[eff_rank]": lambda e, n, s, p, c: c * at_index(e, eff_rank(e)),
    "e[0.05 r]": lambda e, n, s, p, c: c * at_index(e, 0.05 * min(n, s, p)),
    "e[0.03 r]": lambda e, n, s, p, c: c * at_index(e, 0.03 * min(n, s, p)),
    "e[0.07 r]": lambda e, n, s, p, c: c * at_index(e, 0.07 * min(n, s, p)),
    "e[0.1 r]": lambda e, n, s, p, c: c * at_index(e, 0.1 * min(n, s, p)),
    "e[0.2 r]": lambda e, n, s, p, c: c * at_index(e, 0.2 * min(n, s, p)),
    "df = c r": lambda e, n, s, p, c: solve_df(e, c * min(n, s, p)),
    "df = c min(n,p)": lambda e, n, s, p, c: solve_df(e, c * min(n, p)),
    "df = c eff_rank": lambda e, n, s, p, c: solve_df(e, c * eff_rank(e)),
    "df = c sqrt(r eff_rank)": lambda e, n, s, p, c: solve_df(
        e, c * math.sqrt(min(n, s, p) * eff_rank(e))
    ),
}
DF_RULES = {name for name in RULES if name.startswith("df")}


def rule_lambdas(prep: dict[str, np.ndarray], blocks: int, rule: str, c: float) -> list:
    """Per model, the per-coordinate λ of ``rule`` at constant c."""
    n, p, fn = int(prep["n"]), int(prep["p"]), RULES[rule]
    lams = []
    for m in range(M):
        e, which = prep[f"e_{m}_b{blocks}"], prep[f"which_{m}_b{blocks}"]
        lam = np.zeros_like(e)
        for b in range(blocks):
            sel = which == b
            eb = np.sort(e[sel])[::-1]
            lam[sel] = fn(eb, n, int(sel.sum()), p, c)
        lams.append(lam)
    return lams


def rule_grid(rule: str, preps: dict[str, dict[str, np.ndarray]], blocks_of: dict) -> np.ndarray:
    """The constants scanned for ``rule``: fractions for df rules, else a log grid around
    the constants that give the current rule's λ at factors 0.01 to 10 on every case."""
    if rule in DF_RULES:
        return np.exp(np.linspace(math.log(0.003), math.log(1.0), 45))
    lo, hi = math.inf, 0.0
    for name, prep in preps.items():
        unit = np.mean(rule_lambdas(prep, blocks_of[name], rule, 1.0)[0])
        cur = np.mean(rule_lambdas(prep, blocks_of[name], "trace/min(n,s,p) [current]", 1.0)[0])
        lo, hi = min(lo, 0.01 * cur / unit), max(hi, 10 * cur / unit)
    count = int(min(60, max(31, math.log(hi / lo) / math.log(1.2))))
    return np.exp(np.linspace(math.log(lo), math.log(hi), count))


BLOCK_SETTINGS = ("default", "1", "1 if p < k")
"""The library's blocks rule; always 1; the library's rule but 1 block where p < k (with
k > p every block of the SRHT is a projection of the same p coordinates)."""


def blocks_for(prep: dict[str, np.ndarray], setting: str) -> int:
    n, p = int(prep["n"]), int(prep["p"])
    if setting == "1" or (setting == "1 if p < k" and p < K):
        return 1
    return block_rule(n)


def scan_rules(cases: list[Case], out: Path, block_setting: str) -> dict[str, dict]:
    """LDS per (rule, case, c) at M = 5, cached in ``out``. ``block_setting``: "default"
    (the library's blocks rule) or "1"."""
    cached: dict[tuple, dict] = {}
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            if r["kind"] == "rule":
                cached[r["case"], r["rule"], r["block_setting"]] = r
    preps = {case.name: prepare(case) for case in cases}
    blocks_of = {name: blocks_for(prep, block_setting) for name, prep in preps.items()}
    outputs = {case.name: gt.ground_truth(case)[1] for case in cases}
    result: dict[str, dict] = {}
    for rule in RULES:
        cs = rule_grid(rule, preps, blocks_of)
        result[rule] = {}
        for name, prep in preps.items():
            key = (name, rule, block_setting)
            if key not in cached:
                ldss = [
                    lds(
                        predicted(
                            prep, blocks_of[name], rule_lambdas(prep, blocks_of[name], rule, c)
                        ),
                        outputs[name],
                    )
                    for c in cs
                ]
                cached[key] = {
                    "case": name,
                    "kind": "rule",
                    "rule": rule,
                    "block_setting": block_setting,
                    "blocks": blocks_of[name],
                    "cs": cs.tolist(),
                    "lds": ldss,
                }
                with out.open("a") as fh:
                    fh.write(json.dumps(cached[key]) + "\n")
            result[rule][name] = cached[key]
    return result


def best_lds(cases: list[Case], out: Path) -> dict[str, float]:
    """Best LDS at M = 5 of any estimator on the case's srht k=2048 store: grid.py's lines
    and this study's factor grid (both block settings)."""
    best = {case.name: -math.inf for case in cases}
    for path, want in ((grid.RESULTS, "grid"), (out, "lds")):
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r["case"] not in best:
                continue
            if want == "grid" and not (
                r["M"] == M and r["projector"] == PROJECTOR and r["k_requested"] == K
            ):
                continue
            if want == "lds" and r["kind"] != "lds":
                continue
            best[r["case"]] = max(best[r["case"]], r["lds"])
    return best


def fit_constant(curves: dict[str, np.ndarray], best: dict[str, float], names: list[str]) -> int:
    """Index of the constant with the smallest worst regret over ``names`` (ties: mean)."""
    regrets = np.array([best[name] - curves[name] for name in names])  # (cases, cs)
    score = regrets.max(0) + 1e-6 * regrets.mean(0)
    return int(np.argmin(score))


def summarise(scans: dict[str, dict], best: dict[str, float]) -> list[tuple]:
    """Per rule: (worst regret at its best constant, that constant, leave-one-case-out worst
    regret, the case where it is worst, per-case regrets at the fitted constant)."""
    rows = []
    for rule, per_case in scans.items():
        names = list(per_case)
        curves = {  # NaN: a λ of 0 where the rule asks for all the degrees of freedom
            name: np.nan_to_num(np.array(per_case[name]["lds"], dtype=float), nan=-1.0)
            for name in names
        }
        cs = np.array(per_case[names[0]]["cs"])
        i = fit_constant(curves, best, names)
        regrets = {name: best[name] - curves[name][i] for name in names}
        held = {}
        for name in names:
            j = fit_constant(curves, best, [x for x in names if x != name])
            held[name] = best[name] - curves[name][j]
        worst_held = max(held, key=held.get)
        rows.append((max(regrets.values()), cs[i], held[worst_held], worst_held, regrets, held))
        print(
            f"{rule:28s} worst {max(regrets.values()):.3f} at c={cs[i]:.3g} | LOO worst "
            f"{held[worst_held]:.3f} ({worst_held}) | "
            + " ".join(f"{regrets[n]:.3f}" for n in names),
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--analyse-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.analyse_only:
        for case in select(args.cases):
            run_case(case, args.out)
            print(f"{case.name} done", flush=True)
    cases = select(args.cases)
    best = best_lds(cases, args.out)
    for setting in BLOCK_SETTINGS:
        print(f"\nblocks {setting}: regret per case " + " ".join(c.name for c in cases))
        summarise(scan_rules(cases, args.out, setting), best)


if __name__ == "__main__":
    main()
