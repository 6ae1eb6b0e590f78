"""CPU smoke runs of the GPU scripts (docs/gpu.md): benchmarks/gpu_*.py --quick --device cpu,
scripts/gpu/agreement.py and summarize.py, and the shell scripts' syntax. The GPU itself is
only used on the device machine (scripts/gpu/run.sh); these keep its scripts working here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# One thread per process: the smoke runs are tiny, and a shared machine is not oversubscribed.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_json(*args: str, timeout: int = 240) -> list[dict]:
    """Run a script with this interpreter from the repository root; its stdout JSON lines."""
    done = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert rows[0]["bench"] == "env" and rows[0]["device"] == "cpu"
    assert rows[-1]["bench"] == "done"
    return rows


def of(rows: list[dict], bench: str) -> list[dict]:
    found = [r for r in rows if r["bench"] == bench]
    assert found, f"no {bench!r} rows in {rows}"
    return found


def is_ratio(value: object) -> bool:
    return isinstance(value, float) and value > 0


@pytest.mark.parametrize("script", ["run.sh", "build_fast_jl.sh", "fetch_wheels.sh"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu" / script)], check=True)


def test_run_sh_writes_few_flat_files():
    """The device tool returns at most 8 files from $OUT, at most 2 folders down."""
    text = (ROOT / "scripts" / "gpu" / "run.sh").read_text()
    outputs = {line.split("/")[-1].strip('"') for line in text.split() if "$OUT/" in line}
    outputs |= {"env.txt", "bench.jsonl", "bench.log", "tests.log", "summary.md"}
    assert len(outputs) <= 8, outputs


def test_featurize_quick():
    rows = run_json("benchmarks/gpu_featurize.py", "--quick", "--device", "cpu")
    configs = {r["config"]: r for r in of(rows, "gpu_featurize")}
    assert set(configs) == {"fasttrak_default", "fasttrak_dense", "traker", "backprop"}
    for name in ("fasttrak_default", "fasttrak_dense", "backprop"):
        assert configs[name]["ex_per_s"] > 0
    (ratio,) = of(rows, "gpu_featurize_ratio")
    assert ratio["baseline"] == "traker" and "ratio" in ratio
    assert is_ratio(ratio["ratio_vs_backprop"])
    if configs["traker"]["ex_per_s"] is not None:  # traker installed
        assert is_ratio(ratio["ratio"]) and configs["traker"]["projector"]


@pytest.mark.slow  # ~4-9 s each on 2 cores; the quick runs cover the scripts
def test_featurize_dense_estimate_when_streaming_is_too_slow():
    """A dense matrix over its cache is streamed: past the budget, a probe estimates it."""
    rows = run_json(
        "benchmarks/gpu_featurize.py",
        *("--quick", "--device", "cpu", "--ks", "2048", "--width", "16", "--n", "16"),
        "--dense-budget",
        "0",
    )
    (dense,) = [r for r in of(rows, "gpu_featurize") if r["config"] == "fasttrak_dense"]
    assert dense["estimated"] is True and dense["ex_per_s"] > 0 and dense["group_rows"] >= 1
    assert of(rows, "gpu_featurize_ratio")[0]["dense_estimated"] is True


def test_projection_quick():
    rows = of(
        run_json("benchmarks/gpu_projection.py", "--quick", "--device", "cpu"), "gpu_projection"
    )
    names = {"dense", "sjlt", "srht", "srht_radix2", "srht_radix16", "factored"}
    assert {r["projector"] for r in rows} == names
    for r in rows:
        assert r["baseline"] == "torch.matmul" and is_ratio(r["ratio"]), r
        assert r["gflops"] > 0 and r["matmul_gflops"] > 0
    (factored,) = [r for r in rows if r["projector"] == "factored"]
    assert is_ratio(factored["ratio_vs_fwd_bwd"])


@pytest.mark.slow  # ~4-9 s each on 2 cores; the quick runs cover the scripts
def test_projection_skips_a_dense_matrix_over_the_limit():
    args = ("--quick", "--device", "cpu", "--dense-max", str(2**16 * 256))
    rows = of(run_json("benchmarks/gpu_projection.py", *args), "gpu_projection")
    skipped = [r for r in rows if r.get("skipped")]
    assert [r["projector"] for r in skipped] == ["dense"]
    assert skipped[0]["ratio"] is None and skipped[0]["dense_stream_s_est"] > 0


def test_lm_quick():
    pytest.importorskip("transformers")
    rows = run_json("benchmarks/gpu_lm.py", "--quick", "--device", "cpu")
    configs = {r["config"]: r for r in of(rows, "gpu_lm")}
    assert set(configs) == {"factored", "hooks_srht", "train_step"}
    assert all(r["tokens_per_s"] > 0 for r in configs.values())
    assert configs["factored"]["k"] > 0
    (ratio,) = of(rows, "gpu_lm_ratio")
    assert ratio["baseline"] == "train_step" and is_ratio(ratio["ratio"])
    assert is_ratio(ratio["ratio_srht"])


def test_scoring_quick():
    rows = of(run_json("benchmarks/gpu_scoring.py", "--quick", "--device", "cpu"), "gpu_scoring")
    phases = {r["phase"]: r for r in rows}
    assert set(phases) == {"featurize", "finalize", "score"}
    for name in ("finalize", "score"):
        assert phases[name]["baseline"].startswith("torch.matmul")
        assert is_ratio(phases[name]["ratio"])
    assert phases["score"]["rows_targets_k_per_s"] > 0


def test_agreement_quick_on_cpu_is_exact():
    rows = of(run_json("scripts/gpu/agreement.py", "--quick", "--device", "cpu"), "gpu_agreement")
    assert {r["engine"] for r in rows} == {"hooks", "vmap"}
    assert all(r["ok"] and r["rel_features"] == 0.0 for r in rows), rows


def test_summarize_reads_partial_results(tmp_path):
    (tmp_path / "env.txt").write_text("gpu NVIDIA H200\nstage tests: rc=0, 3s\n")
    (tmp_path / "tests_cuda.xml").write_text(
        '<testsuites><testsuite time="1.5">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_a" name="test_skip"><skipped message="needs CUDA"/>'
        "</testcase></testsuite></testsuites>"
    )
    rows = [
        {"bench": "gpu_lm", "config": "factored", "k": 3888, "tokens_per_s": 1.0},
        {"bench": "gpu_lm_ratio", "ratio": 0.5, "ratio_srht": 0.25},
        {"bench": "done", "script": "gpu_lm", "seconds": 1.0},
    ]
    lines = [json.dumps(r) for r in rows] + ['{"bench": "gpu_proj']  # a line cut off
    (tmp_path / "bench.jsonl").write_text("\n".join(lines))
    done = subprocess.run(
        [sys.executable, "scripts/gpu/summarize.py", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    summary = (tmp_path / "summary.md").read_text()
    assert summary.strip() in done.stdout
    assert "1 passed, 1 failed, 0 error, 1 skipped" in summary
    assert (
        "FAILED tests.test_a::test_bad" in summary and "skipped tests.test_a::test_skip" in summary
    )
    assert "whole suite" in summary and "no junit file" in summary
    assert "factored / train_step: 0.5" in summary


@pytest.mark.slow
def test_run_sh_dry_run_on_cpu(tmp_path):
    """The whole device script, minus install (it would install into this environment) and the
    test stages, on the CPU with --quick: every stage finishes and the summary has each part."""
    env = {**ENV, "OUT": str(tmp_path), "GPU_DEVICE": "cpu", "GPU_QUICK": "1"}
    env["PYTHON"] = sys.executable
    stages = ["env", "agree", "projection", "lm", "featurize", "scoring"]
    subprocess.run(
        ["bash", "scripts/gpu/run.sh", *stages], cwd=ROOT, env=env, check=True, timeout=600
    )
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["bench.jsonl", "bench.log", "env.txt", "summary.md"], files
    env_txt = (tmp_path / "env.txt").read_text()
    assert env_txt.count(": rc=0,") == 5, env_txt
    summary = (tmp_path / "summary.md").read_text()
    parts = ("agreement", "Featurize", "Where featurize spends", "Projection", "LM featurize")
    for part in (*parts, "Scoring"):
        assert part in summary
