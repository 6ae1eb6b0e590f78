"""A million training rows end to end: time and peak memory of every stage, on CPU.

An MLP 32 -> 64 -> 10 (Tanh; p = 2,762 parameters), trained for a few hundred steps on
generated data (labels from a random linear teacher with noise), featurized on n = 1,000,000
generated rows to k = 2048 with the default projector (SRHT), features stored as float16
on disk (n · k · 2 B = 4.1 GB), then:

* ``featurize``: ``trak.featurize(train, checkpoints=...)`` (with ``--shards S`` > 1, S
  consecutive processes each featurize ``rows=ft.shard(i, S)``, as a job array would);
* ``finalize``: ``trak.finalize()``: the gram Φᵀ R Φ streamed over row chunks, its factor;
* ``self_influence``: ``trak.self_influence()``, the diagonal of the train-vs-train scores,
  streamed over row chunks (:func:`fasttrak.influence.self_influence`);
* ``score_topk``: ``trak.score(targets)`` for 1,000 targets, then ``scores.topk(100)``,
  streamed over row chunks;
* ``score_rate``: one pass of ``scores.chunks()`` (read and verify each float16 chunk,
  Φ_c @ solved in float32, summed in float64, times Q) against ``torch.matmul`` of the same
  float32 shapes ((rows_c, k) @ (k, T) for every chunk c), in the same process: the rate
  2 n k T / seconds of each and their ratio (target >= 0.5). Also the seconds of reading
  the features alone (``ModelStore.read`` of every chunk), to tell I/O from arithmetic.

Every stage runs in a fresh subprocess on the store the previous ones left, so that its
peak resident memory (VmHWM from /proc/self/status, the process's high-water mark) is its
own: ``peak_rss_gb`` is that peak, ``base_rss_gb`` the resident memory when the stage
starts (Python, torch, the generated data and the model: what every stage pays),
``stage_rss_gb`` their difference. Target: peak <= 4 GB at every stage.

Prints one JSON line per stage, then a summary line. Usage::

    OMP_NUM_THREADS=1 python benchmarks/million.py --quick      # 50,000 rows, ~2 min
    OMP_NUM_THREADS=1 python benchmarks/million.py              # 1,000,000 rows, ~20-40 min
    python benchmarks/million.py --rows 200000 --out /tmp/m --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import fasttrak as ft

D_IN, HIDDEN, CLASSES = 32, 64, 10
STAGES = ("featurize", "finalize", "self_influence", "score_topk", "score_rate")
GB = 1024**3


def rss() -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process, in GB."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024 / GB
    return fields


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated rows: x ~ N(0, I), y = argmax of a fixed random teacher plus noise."""
    teacher = torch.randn(D_IN, CLASSES, generator=torch.Generator().manual_seed(1234))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=gen)
    y = torch.empty(n, dtype=torch.int64)
    for start in range(0, n, 1 << 18):  # bounded temporaries
        part = slice(start, start + (1 << 18))
        logits = x[part] @ teacher + torch.randn(x[part].shape[0], CLASSES, generator=gen)
        y[part] = logits.argmax(1)
    return x, y


def checkpoints(models: int) -> list[dict[str, torch.Tensor]]:
    """``models`` briefly trained MLPs (300 Adam steps on 20,000 rows, seeds 0, 1, ...)."""
    x, y = make_data(20_000, seed=99)
    states = []
    for m in range(models):
        torch.manual_seed(m)
        model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(m)
        for _ in range(300):
            batch = torch.randint(0, x.shape[0], (256,), generator=gen)
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


def make_trak(args: argparse.Namespace) -> ft.TRAK:
    return ft.TRAK(
        make_model(),
        proj_dim=args.k,
        store=Path(args.out) / "store",
        feature_dtype="float16",
        chunk_rows=args.chunk_rows,
        batch_size=args.batch_size,
        progress=False,
    )


def run_stage(args: argparse.Namespace) -> dict[str, Any]:
    """One stage, in this (fresh) process."""
    torch.set_num_threads(args.threads)
    train = make_data(args.rows, seed=0)
    states = checkpoints(args.models)
    targets = make_data(args.targets, seed=1)
    trak = make_trak(args)
    base = rss()["VmRSS"]
    out: dict[str, Any] = {"stage": args.stage}
    start = time.perf_counter()
    if args.stage == "featurize":
        if args.shard is not None:
            trak.featurize(train, checkpoints=states, rows=ft.shard(args.shard, args.shards))
            out["shard"] = f"{args.shard}/{args.shards}"
        else:
            trak.featurize(train, checkpoints=states)
    elif args.stage == "finalize":
        trak.finalize()
    elif args.stage == "self_influence":
        values = trak.self_influence()
        out["self_influence"] = {
            "mean": float(values.mean()),
            "max": float(values.max()),
            "argmax": int(values.argmax()),
        }
    elif args.stage == "score_topk":
        scores = trak.score(targets, checkpoints=states)
        out["score_setup_s"] = time.perf_counter() - start
        top = scores.topk(100)
        out["topk_shape"] = list(top.proponents.shape)
    elif args.stage == "score_rate":
        out.update(score_rate(trak, targets, states, args))
    out["seconds"] = time.perf_counter() - start
    memory = rss()
    out.update(
        base_rss_gb=round(base, 3),
        peak_rss_gb=round(memory["VmHWM"], 3),
        stage_rss_gb=round(memory["VmHWM"] - base, 3),
    )
    return out


def score_rate(trak: ft.TRAK, targets: Any, states: list, args: argparse.Namespace) -> dict:
    """Seconds of one scores.chunks() pass, of reading the features alone, and of
    torch.matmul over the same float32 shapes; rates in GFLOP/s (2 n k T flops)."""
    from fasttrak.store import complete_records

    scores = trak.score(targets, checkpoints=states)
    n_targets, n = scores.shape
    flops = 2.0 * n * trak.k * n_targets * len(scores.model_ids)
    start = time.perf_counter()
    for _ in scores.chunks():
        pass
    chunks_s = time.perf_counter() - start
    stored = trak.store.model(scores.model_ids[0])
    records = complete_records(stored)
    start = time.perf_counter()
    for m in scores.model_ids:
        model = trak.store.model(m)
        for c in range(model.num_chunks):
            np.asarray(model.read("features", records[c]), np.float32)
    read_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(0)
    block = torch.randn(trak.store.chunk_rows, trak.k, generator=gen)
    solved = torch.randn(trak.k, n_targets, generator=gen)
    start = time.perf_counter()
    for _ in scores.model_ids:
        for c in range(stored.num_chunks):
            rows = stored.chunk_slice(c)
            torch.matmul(block[: rows.stop - rows.start], solved)
    matmul_s = time.perf_counter() - start
    return {
        "chunks_s": chunks_s,
        "read_features_s": read_s,
        "matmul_s": matmul_s,
        "score_gflops": flops / chunks_s / 1e9,
        "matmul_gflops": flops / matmul_s / 1e9,
        "ratio_vs_matmul": matmul_s / chunks_s,
    }


def stage_command(args: argparse.Namespace, stage: str, shard: int | None = None) -> list[str]:
    command = [sys.executable, __file__, "--stage", stage, "--out", str(args.out)]
    for name in ("rows", "k", "models", "targets", "chunk_rows", "batch_size", "threads"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if shard is not None:
        command += ["--shard", str(shard), "--shards", str(args.shards)]
    return command


def run_in_subprocess(command: list[str]) -> dict[str, Any]:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"stage failed: {' '.join(command)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="50,000 rows")
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--models", type=int, default=1)
    parser.add_argument("--targets", type=int, default=1000)
    parser.add_argument("--chunk-rows", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shards", type=int, default=1, help="featurize in S processes")
    parser.add_argument("--out", default=None, help="a directory for the store (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--shard", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rows = 50_000
    if args.stage is not None:
        print(json.dumps(run_stage(args)), flush=True)
        return
    temporary = args.out is None
    if temporary:
        args.out = tempfile.mkdtemp(prefix="fasttrak-million-", dir=os.environ.get("TMPDIR"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    setup = {
        "rows": args.rows,
        "k": args.k,
        "models": args.models,
        "targets": args.targets,
        "chunk_rows": args.chunk_rows,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    print(json.dumps({"setup": setup}), flush=True)
    results = []
    try:
        for stage in STAGES:
            if stage == "featurize" and args.shards > 1:
                parts = [
                    run_in_subprocess(stage_command(args, stage, shard=i))
                    for i in range(args.shards)
                ]
                for part in parts:
                    print(json.dumps(part), flush=True)
                result = {
                    "stage": stage,
                    "seconds": sum(p["seconds"] for p in parts),
                    "peak_rss_gb": max(p["peak_rss_gb"] for p in parts),
                    "base_rss_gb": max(p["base_rss_gb"] for p in parts),
                    "stage_rss_gb": max(p["stage_rss_gb"] for p in parts),
                    "shards": args.shards,
                }
            else:
                result = run_in_subprocess(stage_command(args, stage))
            results.append(result)
            print(json.dumps(result), flush=True)
        store = Path(args.out) / "store"
        disk = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        rate = results[-1]
        summary = {
            "summary": True,
            **setup,
            "store_gb": round(disk / GB, 3),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in results),
            "seconds": {r["stage"]: round(r["seconds"], 1) for r in results},
            "score_gflops": round(rate["score_gflops"], 1),
            "matmul_gflops": round(rate["matmul_gflops"], 1),
            "ratio_vs_matmul": round(rate["ratio_vs_matmul"], 3),
        }
        print(json.dumps(summary), flush=True)
    finally:
        if temporary and not args.keep:
            shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
