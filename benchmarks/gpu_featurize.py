"""Featurize throughput on a GPU: a ResNet-18-sized CNN, fasttrak vs. traker 0.3.2 vs. backprop.

Model: ResNet-18 in its CIFAR form (3x3 stem, no max-pool; BasicBlocks [2, 2, 2, 2] of widths
64/128/256/512; 10 classes): 11,173,962 parameters, all attributed. Written out here, so that
torchvision is not needed. Data: ``--n`` random CIFAR-sized images (3, 32, 32), N(0, 1), with
random labels (seeded). Random weights (seeded), eval mode.

Per projection dimension k (default 2048 and 8192), in one process, each timed run going from
constructing the attribution object to the last feature of the last batch (CUDA synchronized
before the clock is read), ``--repeat`` runs interleaved after one warm-up batch each, median:

- ``fasttrak_default``: ``ft.TRAK(model, proj_dim=k, store=None, device=...)``, the default
  projector and engine, ``featurize`` of all n images;
- ``fasttrak_dense``: the same with ``projector="dense"``. Its (p, k) Rademacher matrix is
  generated on the CPU (so that features are identical on every device), p * k * 4 bytes:
  92 GB at k = 2048. Over ``cache_bytes`` (1 GiB) it is streamed, regenerated for every group
  of ``group_rows`` (1 GiB / 4p = 24 at this p) gradient rows: minutes per group. So when a
  whole run would take more than ``--dense-budget`` seconds (20), it is not run: instead one
  ``ft.projection.DenseProjector.project`` call on a probe of ``2**17 + 1024`` coordinates
  (streamed the same way) is timed, scaled to p, and ``ex_per_s`` is ``group_rows`` over that
  time (an upper bound: the gradients are not counted), with ``"estimated": true``;
- ``traker``: ``trak.TRAKer(model, "image_classification", device=..., proj_dim=k)`` with its
  defaults, i.e. float16 (``use_half_precision=True``) and its CUDA projector (``fast_jl``;
  ``ChunkedCudaProjector`` when traker splits the parameters) when ``fast_jl`` runs, else
  ``BasicProjector`` (Rademacher, regenerated in blocks of 100 columns per batch). The row's
  ``projector`` field names the class traker used. ``load_checkpoint`` + ``featurize`` per
  batch (batches moved to the device inside the timed run);
- ``fasttrak_grouped`` (off the CPU only): ``fasttrak_default`` with every convolution's
  per-example weight gradients by cuDNN's grouped convolution (the CPU's route for wide
  layers) instead of the patches matmul a GPU takes (``rules.DEVICE_PATCH_BYTES``);
- ``backprop`` (baseline): a plain training step without the optimizer: forward of the
  batch in train mode, cross-entropy (sum), ``backward`` to all parameters.

One ``"bench": "gpu_featurize"`` JSON line per (k, configuration) with ``ex_per_s``, and one
``"bench": "gpu_featurize_ratio"`` line per k: ``ratio`` = fasttrak_default / traker
(``baseline``: "traker"), ``ratio_dense_vs_trak``, ``ratio_vs_backprop`` = fasttrak_default /
backprop (0.25: featurizing an example costs as much as 4 training steps on it). A markdown
table on stderr. ``--profile`` adds a ``"bench": "gpu_featurize_profile"`` line: the operators
with the most device time in one fasttrak_default featurize of two batches (torch.profiler),
and fasttrak's own ranges (gradients, projection, store writes). See docs/gpu.md. The timing
helpers below are shared by the other benchmarks/gpu_*.py scripts.

Usage::

    python benchmarks/gpu_featurize.py                      # GPU: ~1-2 min on an H200
    python benchmarks/gpu_featurize.py --quick --device cpu # smoke run: tiny width, ~10 s
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import fasttrak as ft
from fasttrak.gradients import rules

try:  # the reference implementation: pip install traker==0.3.2 (scripts/gpu carries it)
    import trak as _trak

    TRAK_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - any import failure only disables the reference
    _trak = None
    TRAK_ERROR = f"{type(exc).__name__}: {exc}"

DENSE_PROBE_ROWS = 2**17 + 1024  # coordinates of the dense probe: just over one 1 GiB block
PROFILE_ROWS = 15  # operators listed by --profile


# ----------------------------------------------------------------------------- model & data
class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18; ``width`` 64 is the standard one (11,173,962 parameters)."""

    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, c_in = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            c_out = width * 2**i
            layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return ResNet18(width).eval()


def make_data(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)


# ----------------------------------------------------------------------------- timing
# Shared by the other benchmarks/gpu_*.py scripts (``from gpu_featurize import ...``).
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of ``fn()`` by the host clock, the device synchronized before and after (for
    whole pipelines, which do host work too)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def kernel_seconds(
    fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 2
) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn()`` after ``warmup`` calls: by CUDA events
    recorded around each call on CUDA (device time of what it enqueues), else the host
    clock."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type != "cuda":
        out = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
        return out
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(reps)
    ]
    for begin, end in events:
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [begin.elapsed_time(end) / 1e3 for begin, end in events]


def env_row(script: str, device: torch.device, quick: bool) -> dict[str, Any]:
    row: dict[str, Any] = {
        "bench": "env",
        "script": script,
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "quick": quick,
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    if device.type == "cuda":
        row["gpu"] = torch.cuda.get_device_name(device)
        row["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return row


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def fill_defaults(args: argparse.Namespace, quick: dict, full: dict) -> None:
    """Options left unset take the --quick or the full run's value."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


# ----------------------------------------------------------------------------- the runs
class Runs:
    """The timed configurations of one k; each ``run_*`` featurizes ``data`` once."""

    def __init__(self, args: argparse.Namespace, device: torch.device, k: int) -> None:
        self.args, self.device, self.k = args, device, k
        self.traker_projector: str | None = None

    def fasttrak(self, data: tuple[Tensor, Tensor], projector: str | None = None) -> None:
        model = make_model(self.args.width)
        extra = {} if projector is None else {"projector": projector}
        trak = ft.TRAK(
            model,
            task=ft.tasks.ImageClassification(),
            proj_dim=self.k,
            store=None,
            device=self.device,
            batch_size=self.args.batch,
            progress=False,
            **extra,
        )
        trak.featurize(data, checkpoints=[model.state_dict()])

    def dense(self, data: tuple[Tensor, Tensor]) -> None:
        self.fasttrak(data, projector="dense")

    def grouped(self, data: tuple[Tensor, Tensor]) -> None:
        """fasttrak_default with every convolution's per-example weight gradients by the
        grouped convolution (cuDNN), the CPU's route for wide layers, instead of the patches
        matmul that a GPU takes up to DEVICE_PATCH_BYTES per example."""
        saved = rules.DEVICE_PATCH_BYTES
        rules.DEVICE_PATCH_BYTES = 0
        try:
            self.fasttrak(data)
        finally:
            rules.DEVICE_PATCH_BYTES = saved

    def traker(self, data: tuple[Tensor, Tensor]) -> None:
        assert _trak is not None
        model = make_model(self.args.width).to(self.device)
        x, y = data
        with tempfile.TemporaryDirectory() as save_dir:
            traker = _trak.TRAKer(
                model=model,
                task="image_classification",
                train_set_size=len(x),
                save_dir=save_dir,
                device=str(self.device),
                proj_dim=self.k,
                logging_level=logging.ERROR,
            )
            self.traker_projector = type(traker.projector).__name__
            traker.load_checkpoint(model.state_dict(), model_id=0)
            for start in range(0, len(x), self.args.batch):
                stop = min(start + self.args.batch, len(x))
                batch = (x[start:stop].to(self.device), y[start:stop].to(self.device))
                traker.featurize(batch=batch, num_samples=stop - start)
            sync(self.device)

    def backprop(self, data: tuple[Tensor, Tensor]) -> None:
        model = make_model(self.args.width).to(self.device).train()
        x, y = data
        for start in range(0, len(x), self.args.batch):
            xb = x[start : start + self.args.batch].to(self.device)
            yb = y[start : start + self.args.batch].to(self.device)
            loss = nn.functional.cross_entropy(model(xb), yb, reduction="sum")
            loss.backward()
            model.zero_grad(set_to_none=True)


def dense_plan(args: argparse.Namespace, device: torch.device, k: int, p: int) -> dict | None:
    """None when a real dense run fits ``--dense-budget`` (its matrix cached, or streamed but
    fast enough); else the estimate from a probe (see the module docstring): projection-only
    seconds of one streamed group at this p, its rows, and the examples/s they give."""
    full = ft.projection.DenseProjector({"w": p}, k=k, device=device)  # generates nothing yet
    if full.cached:
        return None
    probe = ft.projection.DenseProjector({"probe": DENSE_PROBE_ROWS}, k=k, device=device)
    rows = min(full.group_rows, args.n)
    grads = torch.randn(rows, DENSE_PROBE_ROWS, device=device)
    ft.projection.DenseProjector({"w": 8}, k=k, device=device).project(grads[:, :8])  # warm
    seconds = wall(lambda: probe.project(grads), device) * p / DENSE_PROBE_ROWS
    if args.n / rows * seconds <= args.dense_budget:
        return None
    return {
        "ex_per_s": round(rows / seconds, 3),
        "estimated": True,
        "group_rows": rows,
        "group_s_est": round(seconds, 2),
        "probe_coordinates": DENSE_PROBE_ROWS,
    }


def bench_k(args: argparse.Namespace, device: torch.device, k: int) -> list[dict[str, Any]]:
    data = make_data(args.n)
    warm = (data[0][: args.batch], data[1][: args.batch])
    p = sum(t.numel() for t in make_model(args.width).parameters())
    runs = Runs(args, device, k)
    fns: dict[str, Callable[[tuple[Tensor, Tensor]], None]] = {
        "fasttrak_default": runs.fasttrak,
        "backprop": runs.backprop,
    }
    if device.type != "cpu":  # on the CPU both are the same run (the CPU's own routes)
        fns["fasttrak_grouped"] = runs.grouped
    rows: dict[str, dict[str, Any]] = {}
    if _trak is not None:
        fns["traker"] = runs.traker
    else:
        rows["traker"] = {"ex_per_s": None, "note": f"traker not importable: {TRAK_ERROR}"}
    # Dense: a real run only when it fits the budget (a streamed group costs minutes).
    estimate = dense_plan(args, device, k, p)
    if estimate is None:
        fns["fasttrak_dense"] = runs.dense
    else:
        rows["fasttrak_dense"] = estimate
    for fn in fns.values():
        fn(warm)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.repeat):
        for name, fn in fns.items():
            times[name].append(wall(lambda fn=fn: fn(data), device))
    for name, runs_s in times.items():
        median = statistics.median(runs_s)
        rows[name] = {
            "ex_per_s": round(args.n / median, 2),
            "runs_s": [round(t, 3) for t in runs_s],
        }
    if "traker" in fns:
        rows["traker"]["projector"] = runs.traker_projector
    out = []
    for name in ("fasttrak_default", "fasttrak_grouped", "fasttrak_dense", "traker", "backprop"):
        if name not in rows:
            continue
        row = {"bench": "gpu_featurize", "config": name, "k": k, "p": p, "n": args.n}
        row.update({"batch": args.batch, **rows[name]})
        out.append(row)
    rate = {name: rows[name]["ex_per_s"] for name in rows}

    def ratio(a: str, b: str) -> float | None:
        return None if not rate.get(a) or not rate.get(b) else round(rate[a] / rate[b], 3)

    out.append(
        {
            "bench": "gpu_featurize_ratio",
            "k": k,
            "p": p,
            "baseline": "traker",
            "traker_projector": rows["traker"].get("projector"),
            "ratio": ratio("fasttrak_default", "traker"),
            "ratio_dense_vs_trak": ratio("fasttrak_dense", "traker"),
            "dense_estimated": bool(rows["fasttrak_dense"].get("estimated")),
            "ratio_vs_backprop": ratio("fasttrak_default", "backprop"),
            "ratio_grouped_vs_trak": ratio("fasttrak_grouped", "traker"),
        }
    )
    return out


def profile(args: argparse.Namespace, device: torch.device, k: int) -> dict[str, Any]:
    """One ``fasttrak_default`` featurize of ``2 * batch`` images under ``torch.profiler``
    (after a warm-up): the ``PROFILE_ROWS`` operators with the most device time (on the CPU:
    CPU time), each with its self device and CPU milliseconds and its number of calls, as one
    JSON row; the profiler's own table on stderr. Says where featurize spends its time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    runs = Runs(args, device, k)
    data = make_data(2 * args.batch)
    runs.fasttrak(data)  # warm-up: the projector's caches, cuDNN's algorithm choice
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch_profile(activities=activities) as prof:
        seconds = wall(lambda: runs.fasttrak(data), device)
    events = prof.key_averages()

    def ms(event: Any, *names: str) -> float:
        for name in names:
            if hasattr(event, name):
                return round(float(getattr(event, name)) / 1000, 3)  # microseconds
        return 0.0

    device_keys = ("self_device_time_total", "self_cuda_time_total")
    on_device = device.type == "cuda"
    ranked = sorted(
        events,
        key=lambda e: ms(e, *device_keys) if on_device else ms(e, "self_cpu_time_total"),
        reverse=True,
    )
    top = [
        {
            "op": e.key[:80],
            "self_device_ms": ms(e, *device_keys),
            "self_cpu_ms": ms(e, "self_cpu_time_total"),
            "calls": int(e.count),
        }
        for e in ranked[:PROFILE_ROWS]
    ]
    sort_by = "self_cuda_time_total" if on_device else "self_cpu_time_total"
    try:
        print(events.table(sort_by=sort_by, row_limit=PROFILE_ROWS), file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - the table is a convenience; the JSON row stays
        print(f"profiler table unavailable: {exc}", file=sys.stderr)
    return {
        "bench": "gpu_featurize_profile",
        "config": "fasttrak_default",
        "k": k,
        "n": len(data[0]),
        "batch": args.batch,
        "seconds_profiled": round(seconds, 3),
        "device_ms_total": round(sum(ms(e, *device_keys) for e in events), 1),
        "cpu_ms_total": round(sum(ms(e, "self_cpu_time_total") for e in events), 1),
        "phases": {  # fasttrak's own ranges, children included (the CPU time is the wall
            # time spent launching and waiting inside the range)
            e.key: {
                "cpu_ms": ms(e, "cpu_time_total"),
                "device_ms": ms(e, "device_time_total", "cuda_time_total"),
                "calls": int(e.count),
            }
            for e in events
            if e.key.startswith("fasttrak.")
        },
        "top": top,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| k | config | ex/s | note |", "|---|---|---|---|"]
    for r in rows:
        if r["bench"] == "gpu_featurize":
            note = r.get("projector") or ("estimated" if r.get("estimated") else "")
            lines.append(f"| {r['k']} | {r['config']} | {r['ex_per_s']} | {note} |")
        else:
            lines.append(
                f"| {r['k']} | ratios | vs traker {r['ratio']}, dense vs traker "
                f"{r['ratio_dense_vs_trak']}, vs backprop {r['ratio_vs_backprop']} | |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model")
    parser.add_argument("--ks", type=int, nargs="+", help="projection dimensions")
    parser.add_argument("--n", type=int, help="training images")
    parser.add_argument("--batch", type=int, help="batch size (all configurations)")
    parser.add_argument("--width", type=int, help="ResNet base width (64: ResNet-18)")
    parser.add_argument("--repeat", type=int, help="timed runs per configuration")
    parser.add_argument(
        "--dense-budget", type=float, default=20.0, help="seconds a real dense run may take"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile one fasttrak_default featurize of two batches at the first k",
    )
    args = parser.parse_args(argv)
    quick = {"ks": [256], "n": 32, "batch": 16, "width": 8, "repeat": 1}
    full = {"ks": [2048, 8192], "n": 1024, "batch": 128, "width": 64, "repeat": 2}
    fill_defaults(args, quick, full)
    device = torch.device(args.device)
    env = env_row("gpu_featurize", device, args.quick)
    env["traker"] = None if _trak is None else getattr(_trak, "__version__", "installed")
    if TRAK_ERROR:
        env["traker_error"] = TRAK_ERROR
    emit(env)
    start, rows = time.perf_counter(), []
    for k in args.ks:
        for row in bench_k(args, device, k):
            emit(row)
            rows.append(row)
    if args.profile:
        emit(profile(args, device, args.ks[0]))
    emit(
        {
            "bench": "done",
            "script": "gpu_featurize",
            "seconds": round(time.perf_counter() - start, 1),
        }
    )
    print(table(rows), file=sys.stderr)


if __name__ == "__main__":
    main()
