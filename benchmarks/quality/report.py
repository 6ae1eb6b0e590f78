"""Tables of the quality suite from ``benchmarks/quality/results.jsonl``.

    python -m benchmarks.quality.report            # prints and writes benchmarks/quality/report.md
    python -m benchmarks.quality.report --models 1 # the tables for ensembles of one model

Runs in a second. Definitions (all at one number of models M, default 5, a user's choice):

* A configuration is (projector, k, kernel, ridge, blocks); identity has k = p.
* best(case): the highest LDS of any configuration evaluated on that case.
* regret(config, case) = best(case) - LDS(config, case); "at the same k": against the best
  configuration of the same k (identity counts at k = p only), the regret criterion (b) asks
  of the default at every k.
* The paper's estimator at k: dense projection, plain kernel, the smallest ridge that
  factors (0 where it works), 1 block. The library's default: ``ft.TRAK(model)``'s
  projector and proj_dim with ``ft.Estimator().for_rows(n, k)``, read from the library
  when the report runs (it may differ from the ``default`` flag the grid recorded).
* Candidates: configurations evaluated on every case; sorted by their worst-case regret;
  "vs paper" is the smallest, over cases, of LDS(candidate) - LDS(paper's estimator at the
  candidate's k).
* Estimator candidates: (kernel, ridge, blocks) with the projector and k left free: the
  regret is taken against the best estimator on the same (case, projector, k), and "vs
  paper" against the paper's kernel/ridge/blocks on the same features.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.quality.grid import DEFAULT, default_setting
from benchmarks.quality.ground_truth import ROOT

RESULTS = Path(__file__).with_name("results.jsonl")
REPORT = Path(__file__).with_name("report.md")

Row = dict[str, Any]


def load(path: Path) -> list[Row]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest: dict[tuple, Row] = {}
    for r in rows:  # a rerun's line replaces the earlier one
        latest[config(r) + (r["case"], r["M"])] = r
    return list(latest.values())


def config(r: Row) -> tuple:
    k = "p" if r["projector"] == "identity" else r["k_requested"]
    return (r["projector"], k, r["kernel"], str(r["ridge"]), r["blocks"])


def name(c: tuple) -> str:
    projector, k, kernel, ridge, blocks = c
    return f"{projector} k={k} {short(kernel)} ridge={ridge} B={blocks}"


def short(kernel: str) -> str:
    """GN (weight power 1), GN^γ, or plain."""
    return kernel.replace("gauss_newton", "GN")


def summaries() -> dict[str, Row]:
    out = {}
    for path in sorted(ROOT.glob("*/summary.json")):
        s = json.loads(path.read_text())
        out[s["case"]] = s
    return out


def paper_of(rows: dict[tuple, Row], k: Any) -> Row | None:
    return rows.get(("dense", k, "plain", "min", 1))


def default_of(rows: dict[tuple, Row], k: int) -> Row | None:
    """The library's current default estimator (``ft.Estimator().for_rows(n, k)``) on its
    default projector at dimension k, if it was evaluated."""
    first = next(iter(rows.values()))
    s = default_setting(k, first["n"], first["p"])
    return rows.get((DEFAULT["projector"], k, s.kernel, str(s.ridge), s.blocks))


def report(all_rows: list[Row], big_m: int, metric: str = "lds") -> str:
    rows = [r for r in all_rows if r["M"] == big_m]
    by_case: dict[str, dict[tuple, Row]] = defaultdict(dict)
    for r in rows:
        by_case[r["case"]][config(r)] = r
    cases = sorted(by_case, key=lambda c: (next(iter(by_case[c].values()))["n"], c))
    info = summaries()
    out = [f"## Ensembles of M = {big_m} models (metric: {metric})", ""]

    out += [
        f"| case | n | p | ceiling | best configuration | best | default (k={DEFAULT['k']}) "
        f"| regret | paper (k={DEFAULT['k']}) | regret | default - paper |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    best: dict[str, float] = {}
    for case in cases:
        configs = by_case[case]
        top = max(configs, key=lambda c: configs[c][metric])
        best[case] = configs[top][metric]
        default = default_of(configs, DEFAULT["k"])
        paper = paper_of(configs, DEFAULT["k"])
        s = info.get(case, {})
        ceiling = s.get("noise_ceiling", float("nan"))
        any_row = configs[top]

        def cell(r: Row | None) -> str:
            return "-" if r is None else f"{r[metric]:.3f} ± {r[metric + '_se']:.3f}"

        def regret(r: Row | None, top_lds: float = best[case]) -> str:
            return "-" if r is None else f"{top_lds - r[metric]:.3f}"

        diff = (
            "-" if default is None or paper is None else f"{default[metric] - paper[metric]:+.3f}"
        )
        out.append(
            f"| {case} | {any_row['n']} | {any_row['p']} | {ceiling:.3f} | {name(top)} "
            f"| {best[case]:.3f} | {cell(default)} | {regret(default)} | {cell(paper)} "
            f"| {regret(paper)} | {diff} |"
        )

    out += ["", "### Default estimator vs paper's estimator at every k (criterion a)", ""]
    ks = sorted({r["k_requested"] for r in rows if r["projector"] != "identity"})
    out += ["| case | " + " | ".join(f"k={k}: default / paper" for k in ks) + " |"]
    out += ["|---|" + "---|" * len(ks)]
    for case in cases:
        cells = []
        for k in ks:
            d = default_of(by_case[case], k)
            p = paper_of(by_case[case], k)
            if d is None or p is None:
                cells.append("-")
            else:
                mark = "" if d[metric] >= p[metric] else " **<**"
                cells.append(f"{d[metric]:.3f} / {p[metric]:.3f}{mark}")
        out.append(f"| {case} | " + " | ".join(cells) + " |")

    out += [
        "",
        "### Default's regret at every k against the best configuration at the same k "
        "(criterion b)",
        "",
    ]
    out += ["| case | " + " | ".join(f"k={k}" for k in ks) + " |"]
    out += ["|---|" + "---|" * len(ks)]
    worst_at: dict[int, float] = {}
    for case in cases:
        cells = []
        for k in ks:
            d = default_of(by_case[case], k)
            same_k = [r[metric] for c, r in by_case[case].items() if c[1] == k]
            if d is None or not same_k:
                cells.append("-")
                continue
            regret_k = max(same_k) - d[metric]
            worst_at[k] = max(worst_at.get(k, 0.0), regret_k)
            cells.append(f"{regret_k:.3f}" + (" **>**" if regret_k > 0.02 else ""))
        out.append(f"| {case} | " + " | ".join(cells) + " |")
    worst_cells = " | ".join(f"{worst_at.get(k, float('nan')):.3f}" for k in ks)
    out.append(f"| **worst** | {worst_cells} |")

    everywhere = set.intersection(*(set(by_case[c]) for c in cases)) if cases else set()
    table = []
    for c in everywhere:
        regrets = {case: best[case] - by_case[case][c][metric] for case in cases}
        margins = []
        for case in cases:
            paper = paper_of(by_case[case], c[1])
            if paper is not None:
                margins.append(by_case[case][c][metric] - paper[metric])
        worst_case = max(regrets, key=lambda x: regrets[x])
        table.append((max(regrets.values()), c, worst_case, min(margins) if margins else None))
    table.sort(key=lambda t: t[0])
    out += [
        "",
        f"### Candidates evaluated on all {len(cases)} cases, by worst-case regret",
        "",
        "| rank | configuration | worst regret | on case | min (LDS - paper at its k) "
        "| >= paper on every case |",
        "|---|---|---|---|---|---|",
    ]
    for i, (worst, c, case, margin) in enumerate(table[:25], 1):
        ok = "-" if margin is None else ("yes" if margin >= 0 else "no")
        m = "-" if margin is None else f"{margin:+.3f}"
        out.append(f"| {i} | {name(c)} | {worst:.3f} | {case} | {m} | {ok} |")

    out += estimator_table(by_case, cases, metric)
    out += stats_table(by_case, cases)
    return "\n".join(out) + "\n"


def estimator_table(
    by_case: dict[str, dict[tuple, Row]], cases: list[str], metric: str
) -> list[str]:
    """Worst-case regret of each (kernel, ridge, blocks) against the best estimator on the
    same (case, projector, k) features."""
    groups: dict[tuple, dict[tuple, Row]] = defaultdict(dict)
    for case in cases:
        for c, r in by_case[case].items():
            groups[(case, c[0], c[1])][c[2:]] = r
    # the k = 4096 stores were scored with a few estimators only: leave them out here
    groups = {g: rows for g, rows in groups.items() if len(rows) >= 10}
    estimators = set.intersection(*(set(g) for g in groups.values())) if groups else set()
    table = []
    for e in estimators:
        worst, where, margin = -1.0, None, 1.0
        for g, rows in groups.items():
            top = max(r[metric] for r in rows.values())
            regret = top - rows[e][metric]
            if regret > worst:
                worst, where = regret, g
            paper = rows.get(("plain", "min", 1))
            if paper is not None:
                margin = min(margin, rows[e][metric] - paper[metric])
        table.append((worst, e, where, margin))
    table.sort(key=lambda t: t[0])
    out = [
        "",
        f"### Estimators (kernel, ridge, blocks) on the same features: worst regret over "
        f"{len(groups)} (case, projector, k)",
        "",
        "| estimator | worst regret | at | min (LDS - paper's estimator) |",
        "|---|---|---|---|",
    ]
    for worst, e, where, margin in table:
        out.append(
            f"| {short(e[0])} ridge={e[1]} B={e[2]} | {worst:.3f} "
            f"| {where[0]} {where[1]} k={where[2]} | {margin:+.3f} |"
        )
    return out


def stats_table(by_case: dict[str, dict[tuple, Row]], cases: list[str]) -> list[str]:
    """Ground-truth-free statistics at srht k=2048 (or the first store of the case)."""
    out = [
        "",
        "### Ground-truth-free statistics (srht, k = 2048; model 0's kernels, Q over the models)",
        "",
        "| case | n | k | p | eff. rank plain | eff. rank GN | cond plain | cond GN "
        "| Q(1-Q)<0.01 | mean Q | eff. rows of R / n |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        rows = [r for c, r in by_case[case].items() if c[0] == "srht" and c[1] == 2048]
        if not rows:
            rows = list(by_case[case].values())
        r = rows[0]
        out.append(
            f"| {case} | {r['n']} | {r['k']} | {r['p']} | {r['plain_eff_rank']:.1f} "
            f"| {r['gn_eff_rank']:.1f} | {r['plain_cond']:.2g} | {r['gn_cond']:.2g} "
            f"| {r['q_saturated']:.2f} | {r['q_mean']:.3f} | {r['r_eff_rows_frac']:.2f} |"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, nargs="*", default=[5, 1])
    parser.add_argument("--metric", default="lds", choices=["lds", "lds_avg"])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args()
    rows = load(args.results)
    info = summaries()
    head = [
        "# Quality suite report (issue 11)",
        "",
        "Generated by `python -m benchmarks.quality.report` from `results.jsonl`.",
        "Regret = best LDS on the case (any configuration, same M) - the configuration's LDS.",
        "Noise ceiling = mean over targets of the Spearman correlation across subsets between "
        "two retrainings with different seeds (an ideal noise-free datamodel would score "
        "about its square root against one retraining).",
        "",
        "| case | family | n | p | targets | train s (half) | noise ceiling | description |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in sorted(info.values(), key=lambda s: s["n"]):
        head.append(
            f"| {s['case']} | {s['family']} | {s['n']} | {s['p']} | {s['targets']} "
            f"| {s['train_half_seconds']:.2f} | {s['noise_ceiling']:.3f} ± "
            f"{s['noise_ceiling_se']:.3f} | {s['description']} |"
        )
    text = "\n".join(head) + "\n\n"
    for big_m in args.models:
        if any(r["M"] == big_m for r in rows):
            text += report(rows, big_m, args.metric) + "\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
