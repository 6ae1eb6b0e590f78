"""Featurize throughput of fasttrak vs. the reference ``traker`` (MadryLab TRAK 0.3.2) on CPU.

Prints one JSON line per measurement to stdout and a human-readable table to stderr.

Measurements
------------
``featurize``
    Examples/second of featurizing ``n`` training examples for one checkpoint, for fasttrak
    (``ft.TRAK(..., projector="dense").featurize``) and traker
    (``TRAKer.load_checkpoint`` + ``TRAKer.featurize`` per batch, with an explicit float32
    Rademacher ``BasicProjector``), same model, data, batch size and projection dimension
    ``k``, in the same process. ``trak_cached_ex_per_s`` is traker again with
    ``BasicProjector(block_size=k)``: one ``(p, k)`` block generated once and reused, instead
    of the default ``block_size=100`` (``ceil(k/100)`` blocks regenerated for every batch);
    its one matrix generation happens in ``TRAKer.__init__`` and so counts as "other".
    Each package is warmed up once on one batch (a separate
    instance), then timed ``--repeat`` times, interleaved, and the best run is kept (other
    processes on a shared machine only ever slow a run down; all runs are in ``*_runs``).
    A timed run covers everything from constructing the ``TRAK``/``TRAKer`` object to the
    last feature written, in particular generating the projection matrix for that
    checkpoint. The ``*_breakdown`` fields say where the time went (per-example gradients,
    ``project()``, and for traker, within it, generating the random matrix) during the timed
    run: for fasttrak from ``torch.profiler`` (CPU activity) totals of the library's
    ``record_function`` labels ``fasttrak.gradients`` and ``fasttrak.project`` (no label
    separates its matrix generation, shown as "?"), for traker by wrapping its methods with
    timers; traker's ``project()`` also flattens the per-parameter gradient dict into a
    ``(B, p)`` matrix.
``projection``
    GFLOP/s (``2 * B * p * k / seconds``, median of several repetitions) of fasttrak's
    ``DenseProjector.project`` on a random ``(B, p)`` float32 gradient block (matrix already
    built by a warm-up call) and of ``torch.matmul`` of the same shapes with a pre-generated
    ``(p, k)`` matrix. ``trak_gflops`` is traker's ``BasicProjector.project`` (which
    regenerates its matrix block by block on every call when ``k > block_size``).

Usage::

    python benchmarks/featurize.py            # full run (~3-4 min on 2 CPU cores)
    python benchmarks/featurize.py --quick    # smoke test (~20 s)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import Subset, TensorDataset

try:  # the reference implementation (pip install traker==0.3.2)
    import trak as _trak
    from trak.projectors import BasicProjector, ProjectionType

    TRAK_IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - any import failure just disables the reference
    _trak = None
    TRAK_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

try:
    import fasttrak as ft
    from fasttrak.projection import DenseProjector

    FT_IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001
    ft = None
    FT_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------- models & data


class MLP(nn.Sequential):
    """64 -> 256 -> 256 -> 10 with ReLU, on flattened 8x8 digits."""

    def __init__(self) -> None:
        super().__init__(
            nn.Flatten(),
            nn.Linear(64, 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )


class CNN(nn.Sequential):
    """conv(3->16) -> conv(16->32) -> maxpool 2 -> linear(2048 -> 10), on 3x16x16 digits."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 8 * 8, 10),
        )


def digits(n: int, model: str) -> TensorDataset:
    """The first ``n`` scikit-learn digits (1797 bundled, tiled if more are asked for),
    scaled to [0, 1]: (n, 64) for the MLP, (n, 3, 16, 16) (2x nearest upsampling,
    replicated over 3 channels) for the CNN. Labels are int64."""
    from sklearn.datasets import load_digits

    data = load_digits()
    reps = -(-n // len(data.target))
    x = torch.from_numpy(np.tile(data.images, (reps, 1, 1))[:n]).float() / 16.0
    y = torch.from_numpy(np.tile(data.target, reps)[:n]).long()
    if model == "mlp":
        x = x.reshape(n, 64)
    else:
        x = x.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
        x = x.unsqueeze(1).expand(n, 3, 16, 16).contiguous()
    return TensorDataset(x, y)


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return {"mlp": MLP, "cnn": CNN}[name]().eval()


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- timing helpers


class Timers:
    """Accumulated wall time per label, filled by wrapped methods."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t0

        return timed


def median_seconds(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def breakdown(timers: Timers, total: float) -> dict[str, float]:
    out = {f"{k}_s": round(v, 4) for k, v in sorted(timers.seconds.items())}
    # everything else: forward for Q, checks, copies, writing features, constructing the object
    rest = total - timers.seconds.get("grads", 0.0) - timers.seconds.get("project", 0.0)
    out["other_s"] = round(rest, 4)
    out["total_s"] = round(total, 4)
    return out


# ----------------------------------------------------------------------------- fasttrak


def fasttrak_featurize(
    model: nn.Module, data: TensorDataset, k: int, batch_size: int, timers: Timers | None
) -> None:
    trak = ft.TRAK(
        model,
        task=ft.tasks.ImageClassification(),
        proj_dim=k,
        projector="dense",
        store=None,
        device="cpu",
        seed=0,
        progress=False,
    )
    # a new TRAK object has no projector yet: the matrix is built inside the timed region
    checkpoint = copy.deepcopy(model.state_dict())
    if timers is None:
        trak.featurize(data, checkpoints=[checkpoint], batch_size=batch_size)
        return
    # The library labels its stages with record_function; the profiler sums them. (It
    # has no label for generating the dense matrix, part of "fasttrak.project".)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trak.featurize(data, checkpoints=[checkpoint], batch_size=batch_size)
    totals = {event.key: event.cpu_time_total / 1e6 for event in prof.key_averages()}
    timers.seconds["grads"] += totals.get("fasttrak.gradients", 0.0)
    timers.seconds["project"] += totals.get("fasttrak.project", 0.0)


def warm_fasttrak(model_name: str, data: TensorDataset, k: int, batch_size: int) -> None:
    warm = Subset(data, range(min(batch_size, len(data))))
    # with timers: the profiler's one-off start-up (~1 s) happens here, not in a timed run
    fasttrak_featurize(make_model(model_name), warm, k, batch_size, Timers())


def time_fasttrak(
    model_name: str, data: TensorDataset, k: int, batch_size: int
) -> tuple[float, dict[str, float]]:
    model = make_model(model_name)
    timers = Timers()
    t0 = time.perf_counter()
    fasttrak_featurize(model, data, k, batch_size, timers)
    total = time.perf_counter() - t0
    return len(data) / total, breakdown(timers, total)


# ----------------------------------------------------------------------------- traker


def trak_projector(p: int, k: int, block_size: int = 100) -> Any:
    # Passed explicitly: with projector=None on device="cpu", TRAKer builds a BasicProjector
    # with dtype float16 (use_half_precision=True) and *normal* entries, ~7x slower on CPU
    # (float16 matmul) and not the Rademacher projection of the paper.
    # block_size=100 is BasicProjector's default: ceil(k/100) blocks of P regenerated for
    # every batch. block_size=k keeps one (p, k) block, generated once in __init__.
    return BasicProjector(
        grad_dim=p,
        proj_dim=k,
        seed=0,
        proj_type=ProjectionType.rademacher,
        device="cpu",
        block_size=block_size,
    )


def trak_featurize(
    model: nn.Module,
    data: TensorDataset,
    k: int,
    batch_size: int,
    save_dir: str,
    timers: Timers | None,
    block_size: int = 100,
) -> None:
    n = len(data)
    traker = _trak.TRAKer(
        model=model,
        task="image_classification",
        train_set_size=n,
        save_dir=save_dir,
        device="cpu",
        proj_dim=k,
        projector=trak_projector(num_params(model), k, block_size),
        logging_level=logging.WARNING,
    )
    if timers is not None:
        gc, pr, sv = traker.gradient_computer, traker.projector, traker.saver
        gc.compute_per_sample_grad = timers.wrap("grads", gc.compute_per_sample_grad)
        pr.project = timers.wrap("project", pr.project)
        pr.generate_sketch_matrix = timers.wrap("matrix_gen", pr.generate_sketch_matrix)
        sv.serialize_current_model_id_metadata = timers.wrap(
            "metadata_io", sv.serialize_current_model_id_metadata
        )
    x, y = data.tensors
    traker.load_checkpoint(copy.deepcopy(model.state_dict()), model_id=0)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        traker.featurize(batch=(x[start:stop], y[start:stop]), num_samples=stop - start)


def warm_trak(
    model_name: str, data: TensorDataset, k: int, batch_size: int, block_size: int = 100
) -> None:
    x, y = data.tensors
    warm = TensorDataset(x[:batch_size], y[:batch_size])
    with tempfile.TemporaryDirectory() as d:
        trak_featurize(make_model(model_name), warm, k, batch_size, d, None, block_size)


def time_trak(
    model_name: str, data: TensorDataset, k: int, batch_size: int, block_size: int = 100
) -> tuple[float, dict[str, float]]:
    with tempfile.TemporaryDirectory() as d:
        model = make_model(model_name)
        timers = Timers()
        t0 = time.perf_counter()
        trak_featurize(model, data, k, batch_size, d, timers, block_size)
        total = time.perf_counter() - t0
    return len(data) / total, breakdown(timers, total)


# ----------------------------------------------------------------------------- projection


def _seconds_fasttrak(grads: Tensor, p: int, k: int, reps: int) -> tuple[float, float]:
    """(seconds of the first call, which builds and caches the matrix; median seconds after)."""
    proj = DenseProjector({"w": p}, k=k, seed=0, model_id=0, kind="rademacher", device="cpu")
    t0 = time.perf_counter()
    proj.project(grads)
    first = time.perf_counter() - t0
    return first, median_seconds(lambda: proj.project(grads), reps)


def _seconds_matmul(grads: Tensor, p: int, k: int, reps: int) -> float:
    matrix = torch.randn((p, k), generator=torch.Generator().manual_seed(1))
    out = torch.empty((grads.shape[0], k))
    torch.matmul(grads, matrix, out=out)
    return median_seconds(lambda: torch.matmul(grads, matrix, out=out), reps)


def _seconds_trak(grads: Tensor, p: int, k: int, reps: int) -> float:
    # no warm-up call: BasicProjector caches nothing, every call regenerates the matrix
    # blocks; at most 3 repetitions because each call is slow
    proj = trak_projector(p, k)
    return median_seconds(lambda: proj.project(grads, model_id=0), min(reps, 3))


def bench_projection(p: int, k: int, batch: int, reps: int, use_trak: bool) -> dict[str, Any]:
    gflop = 2.0 * batch * p * k / 1e9
    grads = torch.randn((batch, p), generator=torch.Generator().manual_seed(0))
    row: dict[str, Any] = {
        "bench": "projection",
        "p": p,
        "k": k,
        "batch": batch,
        "fasttrak_gflops": None,
        "matmul_gflops": None,
        "ratio": None,
        "trak_gflops": None,
    }
    if ft is not None:
        first, sec = _seconds_fasttrak(grads, p, k, reps)
        row["fasttrak_gflops"] = round(gflop / sec, 3)
        row["fasttrak_first_call_s"] = round(first, 4)
    else:
        row["note"] = f"fasttrak not importable: {FT_IMPORT_ERROR}"
    row["matmul_gflops"] = round(gflop / _seconds_matmul(grads, p, k, reps), 3)
    if use_trak:
        row["trak_gflops"] = round(gflop / _seconds_trak(grads, p, k, reps), 3)
    if row["fasttrak_gflops"] is not None:
        row["ratio"] = round(row["fasttrak_gflops"] / row["matmul_gflops"], 3)
    return row


# ----------------------------------------------------------------------------- main


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def split(bd: dict[str, float] | None) -> str:
    """'grads/project(matrix gen)/other' as % of the featurize time."""
    if not bd or not bd.get("total_s"):
        return "-"

    def pct(key: str) -> str:
        if key not in bd:
            return "?"  # not measured (fasttrak's matrix generation)
        return f"{100 * bd[key] / bd['total_s']:.0f}"

    return f"{pct('grads_s')}/{pct('project_s')}({pct('matrix_gen_s')})/{pct('other_s')}"


def print_tables(feat_rows: list[dict[str, Any]], proj_rows: list[dict[str, Any]]) -> None:
    """Markdown tables on stderr."""

    def out(*cells: Any) -> None:
        print("| " + " | ".join(str(c) for c in cells) + " |", file=sys.stderr)

    if feat_rows:
        print("\nFeaturize, examples/s (higher is better)\n", file=sys.stderr)
        out(
            "model",
            "p",
            "k",
            "n",
            "batch",
            "fasttrak ex/s",
            "traker ex/s",
            "speedup",
            "traker block_size=k ex/s",
            "fasttrak % grad/proj(gen)/other",
            "traker % grad/proj(gen)/other",
        )
        out(*["---"] * 11)
        for r in feat_rows:
            out(
                r["model"],
                r["p"],
                r["k"],
                r["n"],
                r["batch_size"],
                fmt(r["fasttrak_ex_per_s"], ".0f"),
                fmt(r["trak_ex_per_s"], ".0f"),
                fmt(r["speedup"], ".1f") + ("x" if r["speedup"] else ""),
                fmt(r["trak_cached_ex_per_s"], ".0f"),
                split(r.get("fasttrak_breakdown")),
                split(r.get("trak_breakdown")),
            )
        print(
            "\ngrad/proj(gen)/other: % of featurize time in per-example gradients, in project()"
            " (in parentheses: generating the random matrix, part of project()), and the rest",
            file=sys.stderr,
        )
    if proj_rows:
        print("\nProjection, GFLOP/s = 2*B*p*k/s (median)\n", file=sys.stderr)
        out("p", "k", "batch", "fasttrak project", "torch.matmul", "ratio", "traker project")
        out(*["---"] * 7)
        for r in proj_rows:
            out(
                r["p"],
                r["k"],
                r["batch"],
                fmt(r["fasttrak_gflops"], ".1f"),
                fmt(r["matmul_gflops"], ".1f"),
                fmt(r["ratio"], ".2f"),
                fmt(r["trak_gflops"], ".2f"),
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--n", type=int, default=None, help="training examples (1024)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (128)")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="proj dims (512 2048)")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--reps", type=int, default=None, help="projection repetitions (5)")
    parser.add_argument(
        "--repeat", type=int, default=None, help="timed featurize runs per package, best kept (2)"
    )
    parser.add_argument(
        "--only", choices=["featurize", "projection"], default=None, help="run one part only"
    )
    parser.add_argument("--no-trak", action="store_true", help="skip the traker reference")
    args = parser.parse_args(argv)

    n = args.n or (256 if args.quick else 1024)
    batch_size = args.batch_size or (64 if args.quick else 128)
    ks = args.ks or ([512] if args.quick else [512, 2048])
    reps = args.reps or (2 if args.quick else 5)
    repeat = args.repeat or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    use_trak = _trak is not None and not args.no_trak
    trak_note = None
    if _trak is None:
        trak_note = f"traker not importable: {TRAK_IMPORT_ERROR}"
    elif args.no_trak:
        trak_note = "traker skipped (--no-trak)"

    print(
        f"# torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}, "
        f"traker {getattr(_trak, '__version__', None) if _trak else None}",
        file=sys.stderr,
    )

    feat_rows: list[dict[str, Any]] = []
    shapes: list[tuple[int, int]] = []
    for model_name in args.models:
        data = digits(n, model_name)
        p = num_params(make_model(model_name))
        for k in ks:
            shapes.append((p, k))
            if args.only == "projection":
                continue
            row: dict[str, Any] = {
                "bench": "featurize",
                "model": model_name,
                "p": p,
                "k": k,
                "n": n,
                "batch_size": batch_size,
                "fasttrak_ex_per_s": None,
                "trak_ex_per_s": None,
                "speedup": None,
                "trak_cached_ex_per_s": None,
                "speedup_vs_trak_cached": None,
                "threads": torch.get_num_threads(),
            }
            notes = []
            have_ft = ft is not None and hasattr(ft, "TRAK")
            if not have_ft:
                notes.append(f"fasttrak.TRAK not available: {FT_IMPORT_ERROR}")
            if not use_trak:
                notes.append(trak_note)
            runs: dict[str, list[tuple[float, dict[str, float]]]] = {
                "fasttrak": [],
                "trak": [],
                "trak_cached": [],
            }
            if have_ft:
                warm_fasttrak(model_name, data, k, batch_size)
            if use_trak:
                warm_trak(model_name, data, k, batch_size)
                warm_trak(model_name, data, k, batch_size, block_size=k)
            row["loadavg_1min"] = round(os.getloadavg()[0], 2)
            for _ in range(repeat):  # interleaved, so that background load hits both alike
                if have_ft:
                    runs["fasttrak"].append(time_fasttrak(model_name, data, k, batch_size))
                if use_trak:
                    runs["trak"].append(time_trak(model_name, data, k, batch_size))
                    runs["trak_cached"].append(
                        time_trak(model_name, data, k, batch_size, block_size=k)
                    )
            for pkg, results in runs.items():
                if results:
                    rate, bd = max(results, key=lambda r: r[0])
                    row[f"{pkg}_ex_per_s"] = round(rate, 1)
                    row[f"{pkg}_runs_ex_per_s"] = [round(r[0], 1) for r in results]
                    row[f"{pkg}_breakdown"] = bd
            row["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
            if row["fasttrak_ex_per_s"] and row["trak_ex_per_s"]:
                row["speedup"] = round(row["fasttrak_ex_per_s"] / row["trak_ex_per_s"], 2)
                row["speedup_vs_trak_cached"] = round(
                    row["fasttrak_ex_per_s"] / row["trak_cached_ex_per_s"], 2
                )
            if notes:
                row["note"] = "; ".join(notes)
            emit(row)
            feat_rows.append(row)

    proj_rows = []
    for p, k in shapes if args.only != "featurize" else []:
        row = bench_projection(p, k, batch_size, reps, use_trak)
        row["threads"] = torch.get_num_threads()
        emit(row)
        proj_rows.append(row)

    print_tables(feat_rows, proj_rows)


if __name__ == "__main__":
    main()
