"""Criterion (a) over projection draws: the library default against the paper's estimator.

    python -m benchmarks.quality.default_vs_paper            # prints the markdown table

Reads ``results.jsonl`` (seed 0) and ``seeds.jsonl`` (seeds 1-9, from ``grid.py --seed s
--out benchmarks/quality/seeds.jsonl``). Per (case, k, M): the default's LDS minus the paper's
estimator's (dense projection, plain kernel, ridge "min", 1 block), paired by projection seed,
as mean ± sd over the seeds with both lines, and the number of negative draws. The default
is srht with ``DEFAULT_KERNEL`` and the "auto" ridge (1 block: at k <= 1024 the library uses
no blocks); the previous default (untempered Gauss-Newton, the scale 0.14 for every M: "auto"
at M = 5, "auto c=0.14" at M = 1 in results.jsonl, "auto" in seeds.jsonl, measured before the
single-model scale) is shown next to it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent
DEFAULT_KERNEL = "gauss_newton^0.75"
KS = (256, 1024)


def load() -> dict[tuple, float]:
    lds = {}
    for name in ("results.jsonl", "seeds.jsonl"):
        for line in (HERE / name).read_text().splitlines():
            r = json.loads(line)
            key = (r["case"], r["k_requested"], r["M"], r.get("seed", 0), r["projector"])
            lds[(*key, r["kernel"], str(r["ridge"]), r["blocks"])] = r["lds"]
    return lds


def previous_ridge(big_m: int, seed: int) -> str:
    """The label of the previous default's ridge in the two files."""
    return "auto c=0.14" if big_m == 1 and seed == 0 else "auto"


def table(lds: dict[tuple, float]) -> list[str]:
    cases = sorted({key[0] for key in lds})
    out = [
        "| case | k | M | default − paper: mean ± sd (negative draws / draws) "
        "| previous default − paper | default − previous |",
        "|---|---|---|---|---|---|",
    ]
    for big_m in (5, 1):
        for k in KS:
            for case in cases:
                new, old = [], []
                for seed in range(10):
                    cell = (case, k, big_m, seed)
                    paper = lds.get((*cell, "dense", "plain", "min", 1))
                    default = lds.get((*cell, "srht", DEFAULT_KERNEL, "auto", 1))
                    before = lds.get(
                        (*cell, "srht", "gauss_newton", previous_ridge(big_m, seed), 1)
                    )
                    if paper is None or default is None:
                        continue
                    new.append(default - paper)
                    if before is not None:
                        old.append((before - paper, default - before))
                if len(new) < 2:
                    continue
                negative = sum(d < 0 for d in new)
                was = f"{statistics.mean(o for o, _ in old):+.4f}" if old else "-"
                gain = f"{statistics.mean(g for _, g in old):+.4f}" if old else "-"
                out.append(
                    f"| {case} | {k} | {big_m} | {statistics.mean(new):+.4f} ± "
                    f"{statistics.stdev(new):.4f} ({negative}/{len(new)}) | {was} | {gain} |"
                )
    return out


def main() -> None:
    print("\n".join(table(load())))


if __name__ == "__main__":
    main()
