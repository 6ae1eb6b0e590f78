"""Summarize a GPU run (scripts/gpu/run.sh) as markdown: the stages, the tests, CPU/CUDA
agreement and every benchmark's ratios, from the files in OUT; writes OUT/summary.md and
prints it (the end of the output is what the device tool returns).

Usage: python scripts/gpu/summarize.py OUT_DIR
Robust to partial results: a missing or truncated file is reported, not fatal.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def bench_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def junit(path: Path, title: str, list_skipped: bool) -> list[str]:
    if not path.exists():
        return [f"- {title}: no junit file (stage not run, or killed before pytest wrote it)"]
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return [f"- {title}: unreadable junit file ({exc})"]
    cases = root.iter("testcase")
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failed, skipped = [], []
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            failed.append(name)
        elif case.find("error") is not None:
            counts["error"] += 1
            failed.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            reason = case.find("skipped").get("message", "")  # type: ignore[union-attr]
            skipped.append(f"{name} ({reason[:80]})")
        else:
            counts["passed"] += 1
    seconds = sum(float(s.get("time", 0)) for s in root.iter("testsuite"))
    out = [f"- {title}: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + f"; {seconds:.0f} s"]
    out += [f"  - FAILED {name}" for name in failed[:40]]
    if list_skipped:
        out += [f"  - skipped {name}" for name in skipped[:40]]
    return out


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("-" if v is None else str(v) for v in row) + " |" for row in rows]
    return lines


def main(out_dir: str) -> int:
    out = Path(out_dir)
    lines = ["# GPU run summary", ""]
    env = out / "env.txt"
    if env.exists():
        text = env.read_text(errors="replace").splitlines()
        lines += ["## Machine and stages", "", "```"]
        keep = ("gpu ", "driver", "torch ", "cuda ", "stage ", "fast_jl", "python ")
        lines += [line for line in text if line.startswith(keep)][:60]
        lines += ["```", ""]
    lines += ["## Tests", ""]
    lines += junit(out / "tests_cuda.xml", "CUDA-marked tests (-m cuda)", list_skipped=True)
    lines += junit(out / "tests_all.xml", "whole suite (-m 'not slow')", list_skipped=False)
    rows = bench_rows(out / "bench.jsonl")
    by = lambda name: [r for r in rows if r.get("bench") == name]  # noqa: E731
    agree = by("gpu_agreement")
    if agree:
        bad = [r for r in agree if r.get("ok") is False]
        lines += ["", "## CPU vs CUDA agreement", ""]
        lines.append(f"{len(agree) - len(bad)} of {len(agree)} cases within tolerance.")
        lines += table(
            ["model", "projector", "engine", "rel features", "rel Q", "rel scores", "error"],
            [
                [r["model"], r.get("projector"), r.get("engine")]
                + [_g(r.get("rel_features")), _g(r.get("rel_q")), _g(r.get("rel_scores"))]
                + [r.get("error", "")[:60]]
                for r in agree
            ],
        )
    feat = by("gpu_featurize_ratio")
    if feat:
        lines += ["", "## Featurize, ResNet-18 (examples/s)", ""]
        rate = {(r["k"], r["config"]): r for r in by("gpu_featurize")}
        lines += table(
            ["k", "fasttrak default", "fasttrak grouped conv", "fasttrak dense", "traker"]
            + ["traker projector", "backprop", "fasttrak/traker", "dense/traker"]
            + ["fasttrak/backprop"],
            [
                [r["k"]]
                + [
                    rate.get((r["k"], c), {}).get("ex_per_s")
                    for c in ("fasttrak_default", "fasttrak_grouped")
                ]
                + [_dense(rate.get((r["k"], "fasttrak_dense"), {}))]
                + [rate.get((r["k"], "traker"), {}).get("ex_per_s"), r.get("traker_projector")]
                + [rate.get((r["k"], "backprop"), {}).get("ex_per_s")]
                + [r.get("ratio"), r.get("ratio_dense_vs_trak"), r.get("ratio_vs_backprop")]
                for r in feat
            ],
        )
    for r in by("gpu_featurize_profile"):
        lines += ["", f"## Where featurize spends its time (k = {r['k']}, {r['n']} images)", ""]
        lines.append(
            f"{r['seconds_profiled']} s profiled; device {r['device_ms_total']} ms, "
            f"CPU {r['cpu_ms_total']} ms (self times summed)."
        )
        lines += table(
            ["fasttrak range", "CPU ms", "device ms", "calls"],
            [[name, v["cpu_ms"], v["device_ms"], v["calls"]] for name, v in r["phases"].items()],
        )
        lines += [""] + table(
            ["operator", "self device ms", "self CPU ms", "calls"],
            [[t["op"], t["self_device_ms"], t["self_cpu_ms"], t["calls"]] for t in r["top"]],
        )
    proj = by("gpu_projection")
    if proj:
        lines += ["", "## Projection (GFLOP/s, dense-equivalent)", ""]
        lines += table(
            ["layout", "p", "k", "projector", "GFLOP/s", "matmul GFLOP/s", "ratio"],
            [
                [r["layout"], r["p"], r["k"], r["projector"], r.get("gflops")]
                + [r.get("matmul_gflops"), r.get("ratio")]
                for r in proj
            ],
        )
    lm = by("gpu_lm")
    if lm:
        lines += ["", "## LM featurize, GPT-2 small (tokens/s)", ""]
        lines += table(
            ["config", "k", "tokens/s", "peak GiB (1 batch)"],
            [[r["config"], r.get("k"), r["tokens_per_s"], r.get("peak_gib_one_batch")] for r in lm],
        )
        for r in by("gpu_lm_ratio"):
            lines.append(
                f"\nfactored / train_step: {r['ratio']}; srht / train_step: {r['ratio_srht']}"
            )
    score = by("gpu_scoring")
    if score:
        lines += ["", "## Scoring", ""]
        lines += table(
            ["n", "k", "phase", "seconds", "baseline", "baseline s", "ratio"],
            [
                [r["n"], r["k"], r["phase"], r["seconds"], r.get("baseline")]
                + [r.get("baseline_s"), r.get("ratio")]
                for r in score
            ],
        )
    done = by("done")
    lines += [
        "",
        "Benchmarks finished: " + ", ".join(f"{r['script']} ({r['seconds']} s)" for r in done),
    ]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    return 0


def _g(value: Any) -> str:
    return "-" if value is None else f"{value:.2e}"


def _dense(row: dict[str, Any]) -> Any:
    if not row:
        return None
    return f"~{row['ex_per_s']} (est.)" if row.get("estimated") else row.get("ex_per_s")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
