"""Featurize throughput and peak memory of ``ft.TRAK`` on a small GPT-2-style causal LM.

Model: ``GPT2LMHeadModel(GPT2Config(n_embd=256, n_layer=4, n_head=4, vocab_size=8000,
n_positions=128))`` with random weights (``torch.manual_seed(0)``): 5,240,320 parameters, of
which the 16 ``Conv1D`` layers (attention ``c_attn``/``c_proj``, MLP ``c_fc``/``c_proj``,
weights and biases: 32 tensors) hold p = 3,154,944. Only those are differentiated
(``params=[Conv1D]``): the tied ``wte``/``lm_head`` matrix, the position embedding and the
LayerNorms are excluded, so every configuration attributes through the same p parameters.

Data: ``n`` procedurally generated token sequences (Zipf-distributed token ids, lengths
uniform in [T/2, T], right-padded to T with ``attention_mask`` 0), task
``ft.tasks.LanguageModeling()`` (every real token after the first is a target).

Configurations, all at the same k (default 1024 = 16 layers x 8 x 8 for the factored one):

- ``hooks_factored`` (a): ``engine="hooks"``, ``projector=ft.projection.Factored()``
  (per-layer Kronecker projection from layer hooks; ``others="error"``, so no selected
  parameter is silently dropped), default sdpa attention;
- ``vmap_dense`` (b): ``engine="vmap"``, ``projector="dense"`` (the reference TRAK's
  approach: per-example gradients by ``torch.func`` and a dense Rademacher matrix), with
  ``attn_implementation="eager"``: GPT-2's sdpa mask construction does not run under vmap
  with an attention mask (see tests/test_tasks_hf.py). At this p and k the (p, k) matrix is
  12.9 GB, over the dense projector's 1 GiB ``cache_bytes``, so it is regenerated for every
  group of ``group_rows`` gradient rows (85 here; see docs/memory.md);
- ``hooks_srht`` (c): ``engine="hooks"``, ``projector="srht"`` (the defaults), sdpa;
- ``vmap_srht`` (d, extra): ``engine="vmap"``, ``projector="srht"``, eager: the same
  projector as (c) with the other engine, to separate the engine's share from the
  projector's;
- ``backprop`` (ref, baseline): no TRAK at all, one plain batched forward and backward of
  Σ_i f_i per batch w.r.t. the same parameters (what a training step costs without the
  optimizer), sdpa.

Throughput (main process): every configuration is warmed up on 4 examples (a separate
``TRAK``), then timed ``--repeat`` times, interleaved, and the median kept. A timed run goes
from constructing ``ft.TRAK`` to the last feature (in memory, ``store=None``), so it includes
building the projection. ``tokens_per_s`` counts real (non-padding) tokens. The timed runs
are not instrumented. ``breakdown`` comes from one more run per TRAK configuration under
``torch.profiler`` (CPU activity; CUDA too on a GPU), summing the library's
``record_function`` labels: ``fasttrak.gradients`` (per-example gradients and Q, which
the hook engine takes from the same forward), ``fasttrak.project`` (the projection; for the
factored projector, its layer-hook features and Q), ``fasttrak.featurizer`` (building the
projection) and ``fasttrak.write`` (storing features); ``profiled_s`` over the median
timed seconds (``profiler_overhead``) says what profiling added. ``--no-breakdown`` skips
that run.
``--dense-rows N`` times (b) on the first N rows only (whole projection groups) and
extrapolates its rate to all n; every row says whether it was extrapolated.

Peak memory: one fresh subprocess per (configuration, batch size), without warm-up, that
featurizes the first rows up to one whole projection group (the dense projector gathers
``group_rows`` gradient rows before projecting; the others project every batch). On CPU it
runs with ``MALLOC_MMAP_THRESHOLD_=65536``, so that every allocation of 64 KiB or more (all
of torch's tensor storage that matters) is its own mmap, returned to the OS when freed; the
resident set then follows torch's live CPU allocations (torch has no caching allocator on
CPU). Just before ``featurize`` it records the current RSS and resets the kernel's peak-RSS
mark (``/proc/self/clear_refs``); after, ``peak_mib`` is the peak RSS (``VmHWM``) minus that
RSS: what featurize added at its worst moment (weights copy, activations, gradients,
projection, features). Python's ``tracemalloc`` would not see torch's allocations. On CUDA
it is ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before, after
``reset_peak_memory_stats()`` (device memory only).

Usage::

    nice .venv/bin/python benchmarks/lm_featurize.py            # full run (~40 min on a
                                                                # loaded 2-core CPU)
    nice .venv/bin/python benchmarks/lm_featurize.py --quick    # smoke run, ~1 min: a
                                                                # tiny model, numbers mean little
    python benchmarks/lm_featurize.py --device cuda             # on a GPU (untested)

One JSON line per configuration on stdout (``"bench": "lm_featurize"``), one per memory
measurement (``"bench": "lm_memory"``), a feature sanity line (finite, nonzero rows; the
correlation of the pairwise cosine similarities of (b) and (c), and of (a) and (c); the
largest difference between (c) and (d), which use the same projection) and a final line
with the ratios (a)/(b), (a)/(c) and (a)/backprop (``"bench": "lm_ratio"``); markdown tables
on stderr. docs/benchmarks.md ("Language models") and docs/memory.md hold the results.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import default_collate

import fasttrak as ft

try:
    import transformers
    from transformers.pytorch_utils import Conv1D
except ImportError as error:  # pragma: no cover - the hf extra is needed
    raise SystemExit(
        f"this benchmark needs transformers (pip install fasttrak[hf]): {error}"
    ) from error


# ----------------------------------------------------------------------------- model and data
@dataclass(frozen=True)
class Shape:
    n_embd: int
    n_layer: int
    n_head: int
    vocab: int
    seq_len: int


FULL = Shape(n_embd=256, n_layer=4, n_head=4, vocab=8000, seq_len=128)
QUICK = Shape(n_embd=64, n_layer=2, n_head=2, vocab=1000, seq_len=32)


def make_model(shape: Shape, attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        vocab_size=shape.vocab,
        n_positions=shape.seq_len,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attn,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def make_data(shape: Shape, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """n sequences: Zipf(1.1)-distributed token ids in [1, vocab), lengths uniform in
    [T/2, T], right-padded to T with id 0 and attention_mask 0."""
    rng = np.random.default_rng(seed)
    t = shape.seq_len
    rows = []
    for _ in range(n):
        length = int(rng.integers(t // 2, t + 1))
        ids = np.zeros(t, dtype=np.int64)
        ids[:length] = (rng.zipf(1.1, size=length) - 1) % (shape.vocab - 1) + 1
        mask = np.zeros(t, dtype=np.int64)
        mask[:length] = 1
        rows.append({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)})
    return rows


def real_tokens(data: list[dict[str, torch.Tensor]]) -> int:
    return int(sum(int(row["attention_mask"].sum()) for row in data))


# ----------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Config:
    name: str
    label: str
    engine: str
    projector: str  # "factored" | "dense" | "srht"
    attn: str

    def projector_arg(self) -> Any:
        if self.projector == "factored":
            return ft.projection.Factored()  # others="error": nothing selected is dropped
        return self.projector


CONFIGS = {
    c.name: c
    for c in (
        Config("hooks_factored", "a", "hooks", "factored", "sdpa"),
        Config("vmap_dense", "b", "vmap", "dense", "eager"),
        Config("hooks_srht", "c", "hooks", "srht", "sdpa"),
        Config("vmap_srht", "d", "vmap", "srht", "eager"),
        Config("backprop", "ref", "-", "-", "sdpa"),
    )
}
"""``backprop`` is the baseline: one plain batched forward and backward of Σ f per batch
w.r.t. the same parameters (what a training step costs), no per-example gradient."""


def backprop(model: torch.nn.Module, data: list, batch_size: int, device: str) -> None:
    """Σ_i f_i and its gradient w.r.t. the Conv1D parameters, batch by batch."""
    task = ft.tasks.LanguageModeling()
    model.to(device)
    params = []
    for module in model.modules():
        for param in module.parameters(recurse=False):
            param.requires_grad_(isinstance(module, Conv1D))
            if isinstance(module, Conv1D):
                params.append(param)
    for start in range(0, len(data), batch_size):
        batch = default_collate(data[start : start + batch_size])
        batch = {key: value.to(device) for key, value in batch.items()}
        f = task.output(model, batch)
        torch.autograd.grad(f.sum(), params)


def make_trak(
    model: torch.nn.Module, cfg: Config, k: int, batch_size: int, device: str, projector: Any = None
) -> ft.TRAK:
    return ft.TRAK(
        model,
        task=ft.tasks.LanguageModeling(),
        proj_dim=k,
        projector=cfg.projector_arg() if projector is None else projector,
        engine=cfg.engine,
        params=[Conv1D],
        store=None,
        device=device,
        batch_size=batch_size,
        progress=False,
    )


def group_rows(trak: ft.TRAK, batch_size: int) -> int:
    """Rows per projection call: whole batches up to the projector's group_rows (the
    factored projection, which has no gradient projector, projects every batch)."""
    projector = getattr(trak.featurizer(0), "projector", None)
    rows = 1 if projector is None else projector.group_rows
    return batch_size * max(1, math.ceil(rows / batch_size))


def features(trak: ft.TRAK) -> np.ndarray:
    return np.asarray(trak.store.model(0).features(), dtype=np.float64)


def attributed(model: torch.nn.Module, trak: ft.TRAK) -> int:
    """p: the number of parameters TRAK attributes (differentiates)."""
    named = dict(model.named_parameters())
    return sum(named[name].numel() for name in trak.params)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- breakdown
STAGES = {
    "gradients": "fasttrak.gradients",
    "project": "fasttrak.project",
    "featurizer": "fasttrak.featurizer",
    "write": "fasttrak.write",
}
"""The library's record_function labels of featurize's stages."""


def profiled_run(
    shape: Shape, cfg: Config, data: list, k: int, batch_size: int, device: str
) -> dict[str, float]:
    """One more (untimed) featurize under torch.profiler: seconds per stage label (host
    time; on CUDA also device time) and the run's seconds under the profiler."""
    model = make_model(shape, cfg.attn)
    gc.collect()
    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        sync(device)
        t0 = time.perf_counter()
        make_trak(model, cfg, k, batch_size, device).featurize(data)
        sync(device)
        total = time.perf_counter() - t0
    events = {event.key: event for event in prof.key_averages()}
    out: dict[str, float] = {}
    for name, label in STAGES.items():
        event = events.get(label)
        out[f"{name}_s"] = round(event.cpu_time_total / 1e6, 3) if event else 0.0
        if event is not None and device.startswith("cuda"):
            device_us = getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0))
            out[f"{name}_device_s"] = round(device_us / 1e6, 3)
    out["profiled_s"] = round(total, 3)
    return out


# ----------------------------------------------------------------------------- throughput
def timed_run(
    shape: Shape, cfg: Config, data: list, k: int, batch_size: int, device: str
) -> tuple[float, ft.TRAK | None, int]:
    """Seconds from constructing ft.TRAK to the last feature (or of the backprop baseline),
    the TRAK, and p."""
    model = make_model(shape, cfg.attn)
    gc.collect()
    trak = None
    sync(device)
    t0 = time.perf_counter()
    if cfg.name == "backprop":
        backprop(model, data, batch_size, device)
    else:
        trak = make_trak(model, cfg, k, batch_size, device)
        trak.featurize(data)
    sync(device)
    total = time.perf_counter() - t0
    return total, trak, 0 if trak is None else attributed(model, trak)


def warm(shape: Shape, cfg: Config, data: list, k: int, device: str) -> None:
    """One small featurize with the same engine and attention (srht instead of a dense
    matrix, whose generation would cost as much as a timed run)."""
    if cfg.name == "backprop":
        backprop(make_model(shape, cfg.attn), data[:4], 2, device)
        return
    projector = ft.projection.Factored() if cfg.projector == "factored" else "srht"
    trak = make_trak(make_model(shape, cfg.attn), cfg, k, 2, device, projector=projector)
    trak.featurize(data[:4])


# ----------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(args: argparse.Namespace) -> None:
    """Featurize one projection group in this (fresh) process and print its peak memory."""
    torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else FULL
    cfg = CONFIGS[args.memory_child]
    model = make_model(shape, cfg.attn)
    if cfg.name == "backprop":
        model.to(args.device)
        rows = min(args.n, args.batch_size)

        def run() -> None:
            backprop(model, data, args.batch_size, args.device)

    else:
        # group_rows from a throwaway TRAK (released before measuring): the measured one
        # builds its projection inside featurize, so that it counts
        probe = make_trak(model, cfg, args.k, args.batch_size, args.device)
        rows = min(args.n, group_rows(probe, args.batch_size))
        del probe
        trak = make_trak(model, cfg, args.k, args.batch_size, args.device)

        def run() -> None:
            trak.featurize(data)

    data = make_data(shape, rows)
    gc.collect()
    row: dict[str, Any] = {
        "config": cfg.name,
        "batch_size": args.batch_size,
        "rows": rows,
        "device": args.device,
    }
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        row["seconds"] = round(time.perf_counter() - t0, 2)
        row["peak_mib"] = round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)
        row["method"] = "torch.cuda.max_memory_allocated - memory_allocated before"
    else:
        before_kb = _status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            reset = True
        except OSError:
            reset = False  # then VmHWM is the process's peak so far (ru_maxrss)
        t0 = time.perf_counter()
        run()
        row["seconds"] = round(time.perf_counter() - t0, 2)
        peak_kb = _status_kb("VmHWM")
        row["peak_mib"] = round((peak_kb - before_kb) / 1024, 1)
        row["rss_before_mib"] = round(before_kb / 1024, 1)
        row["method"] = "VmHWM - VmRSS before, MALLOC_MMAP_THRESHOLD_=65536" + (
            ", peak reset by clear_refs" if reset else ", no peak reset (upper bound)"
        )
    print(json.dumps(row), flush=True)


def measure_memory(args: argparse.Namespace, cfg: Config, batch_size: int) -> dict[str, Any]:
    env = dict(os.environ)
    if not args.device.startswith("cuda"):
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-child",
        cfg.name,
        "--batch-size",
        str(batch_size),
        "--k",
        str(args.k),
        "--n",
        str(args.n),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ] + (["--quick"] if args.quick else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        return {
            "config": cfg.name,
            "batch_size": batch_size,
            "peak_mib": None,
            "error": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"],
        }
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- sanity
def offdiag_cosines(phi: np.ndarray) -> np.ndarray:
    unit = phi / np.linalg.norm(phi, axis=1, keepdims=True)
    cos = unit @ unit.T
    return cos[np.triu_indices(len(phi), 1)]


def sanity(feats: dict[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {"bench": "lm_sanity"}
    for name, phi in feats.items():
        norms = np.linalg.norm(phi, axis=1)
        out[f"{name}_finite"] = bool(np.isfinite(phi).all())
        out[f"{name}_zero_rows"] = int((norms == 0).sum())
        out[f"{name}_median_norm"] = float(np.median(norms))
    rows = min(len(phi) for phi in feats.values())

    def corr(a: str, b: str) -> None:
        if a in feats and b in feats:
            x, y = feats[a][:rows], feats[b][:rows]
            out[f"cosine_corr_{a}_vs_{b}"] = round(
                float(np.corrcoef(offdiag_cosines(x), offdiag_cosines(y))[0, 1]), 4
            )
            out[f"norm_corr_{a}_vs_{b}"] = round(
                float(np.corrcoef(np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1))[0, 1]), 4
            )

    corr("vmap_dense", "hooks_srht")
    corr("hooks_factored", "hooks_srht")
    if "hooks_srht" in feats and "vmap_srht" in feats:  # same projector, other engine
        x, y = feats["hooks_srht"][:rows], feats["vmap_srht"][:rows]
        out["max_rel_diff_hooks_srht_vs_vmap_srht"] = float(np.abs(x - y).max() / np.abs(x).max())
    return out


# ----------------------------------------------------------------------------- main
def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def table(header: list[str], rows: list[list[Any]]) -> None:
    print("| " + " | ".join(header) + " |", file=sys.stderr)
    print("|" + " --- |" * len(header), file=sys.stderr)
    for r in rows:
        print("| " + " | ".join("-" if c is None else str(c) for c in r) + " |", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model smoke run (~1 min)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--n", type=int, default=None, help="sequences (128; quick 16)")
    parser.add_argument("--k", type=int, default=None, help="projection dim (1024; quick 128)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch (64; quick 8)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs each (3; quick 1)")
    parser.add_argument(
        "--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="which rows"
    )
    parser.add_argument(
        "--dense-rows",
        type=int,
        default=None,
        help="time vmap_dense on the first N rows only and extrapolate (default: all n); "
        "use whole projection groups (85 rows at the default size, rounded up to batches)",
    )
    parser.add_argument(
        "--memory-batches",
        type=int,
        nargs="*",
        default=None,
        help="batch sizes of the memory sweep of hooks_factored, vmap_dense and backprop "
        "(8 16 32 64; quick: none)",
    )
    parser.add_argument(
        "--no-breakdown",
        dest="breakdown",
        action="store_false",
        help="skip the extra profiled run per configuration (the time breakdown)",
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.n = args.n or (16 if args.quick else 128)
    args.k = args.k or (128 if args.quick else 1024)
    args.batch_size = args.batch_size or (8 if args.quick else 64)
    if args.memory_child:
        memory_child(args)
        return
    repeat = args.repeat or (1 if args.quick else 3)
    sweep = args.memory_batches
    if sweep is None:
        sweep = [] if args.quick else [8, 16, 32, 64]
    torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else FULL
    configs = [CONFIGS[name] for name in args.configs]

    probe = make_model(shape, "sdpa")
    n_params = sum(t.numel() for t in probe.parameters())
    print(
        f"# torch {torch.__version__}, transformers {transformers.__version__}, threads "
        f"{torch.get_num_threads()}, {platform.processor() or platform.machine()}, device "
        f"{args.device}; model {shape} with {n_params:,} parameters",
        file=sys.stderr,
    )
    p_conv1d = sum(
        t.numel() for m in probe.modules() if isinstance(m, Conv1D) for t in m.parameters()
    )
    data = make_data(shape, args.n)
    tokens = real_tokens(data)
    padded = args.n * shape.seq_len

    # Throughput: warm every configuration, then interleave the timed runs.
    for cfg in configs:
        warm(shape, cfg, data, args.k, args.device)
    runs: dict[str, list[float]] = {c.name: [] for c in configs}  # seconds of timed rows
    feats: dict[str, np.ndarray] = {}
    meta: dict[str, tuple[int, int, int]] = {}
    load_start = round(os.getloadavg()[0], 2)
    for _ in range(repeat):
        for cfg in configs:
            rows = args.n
            if cfg.name == "vmap_dense" and args.dense_rows:
                rows = min(args.n, args.dense_rows)
            seconds, trak, p = timed_run(
                shape, cfg, data[:rows], args.k, args.batch_size, args.device
            )
            runs[cfg.name].append(seconds)
            if trak is not None:
                feats[cfg.name] = features(trak)
                meta[cfg.name] = (trak.k, p, rows)
            else:
                meta[cfg.name] = (None, p_conv1d, rows)
            del trak
            gc.collect()
    load_end = round(os.getloadavg()[0], 2)

    # Where the time goes: one more run per TRAK configuration, under torch.profiler.
    breakdown: dict[str, dict[str, float]] = {}
    for cfg in configs:
        if cfg.name == "backprop" or not args.breakdown:
            continue
        rows = meta[cfg.name][2]
        breakdown[cfg.name] = shares = profiled_run(
            shape, cfg, data[:rows], args.k, args.batch_size, args.device
        )
        shares["profiler_overhead"] = round(
            shares["profiled_s"] / statistics.median(runs[cfg.name]), 3
        )
        gc.collect()

    # Peak memory, one fresh process per (configuration, batch size).
    memory: dict[tuple[str, int], dict[str, Any]] = {}
    for cfg in configs:
        if args.quick and cfg.label not in ("a", "b"):
            continue  # each process costs seconds of imports: (a) and (b) only
        swept = cfg.label in ("a", "b", "ref")
        sizes = sorted({args.batch_size} | (set(sweep) if swept else set()))
        for b in sizes:
            memory[(cfg.name, b)] = row = measure_memory(args, cfg, b)
            emit({"bench": "lm_memory", **row})

    results: dict[str, dict[str, Any]] = {}
    for cfg in configs:
        k, p, rows = meta[cfg.name]
        seconds = [s * args.n / rows for s in runs[cfg.name]]  # extrapolated to all n rows
        med = statistics.median(seconds)
        mem = memory.get((cfg.name, args.batch_size), {})
        results[cfg.name] = row = {
            "bench": "lm_featurize",
            "config": cfg.name,
            "label": cfg.label,
            "engine": cfg.engine,
            "projector": cfg.projector,
            "attn": cfg.attn,
            "k": k,
            "p": p,
            "model_params": n_params,
            "n": args.n,
            "seq_len": shape.seq_len,
            "real_tokens": tokens,
            "batch_size": args.batch_size,
            "tokens_per_s": round(tokens / med, 2),
            "padded_tokens_per_s": round(padded / med, 2),
            "examples_per_s": round(args.n / med, 3),
            "seconds": round(med, 2),
            "runs_s": [round(s, 2) for s in seconds],
            "timed_rows": rows,
            "extrapolated": rows < args.n,
            "breakdown": breakdown.get(cfg.name),
            "peak_mib": mem.get("peak_mib"),
            "peak_rows": mem.get("rows"),
            "device": args.device,
            "threads": torch.get_num_threads(),
            "loadavg_1min": [load_start, load_end],
        }
        emit(row)
    emit(sanity(feats))

    ratio: dict[str, Any] = {"bench": "lm_ratio", "k": args.k, "batch_size": args.batch_size}
    a, b, c = (results.get(n) for n in ("hooks_factored", "vmap_dense", "hooks_srht"))
    if a and b:
        ratio["throughput_a_over_b"] = round(a["tokens_per_s"] / b["tokens_per_s"], 2)
        if a["peak_mib"] and b["peak_mib"]:
            ratio["memory_a_over_b"] = round(a["peak_mib"] / b["peak_mib"], 4)
        ratio["memory_a_over_b_by_batch"] = {
            bs: round(memory[("hooks_factored", bs)]["peak_mib"] / mb["peak_mib"], 4)
            for (name, bs), mb in memory.items()
            if name == "vmap_dense"
            and mb.get("peak_mib")
            and memory.get(("hooks_factored", bs), {}).get("peak_mib")
        }
    ref = results.get("backprop")
    if a and ref:
        ratio["throughput_a_over_backprop"] = round(a["tokens_per_s"] / ref["tokens_per_s"], 3)
        if a["peak_mib"] and ref["peak_mib"]:
            ratio["memory_a_over_backprop"] = round(a["peak_mib"] / ref["peak_mib"], 3)
    if a and c:
        ratio["throughput_a_over_c"] = round(a["tokens_per_s"] / c["tokens_per_s"], 2)
        if a["peak_mib"] and c["peak_mib"]:
            ratio["memory_a_over_c"] = round(a["peak_mib"] / c["peak_mib"], 4)
    emit(ratio)

    print(f"\nFeaturize, {args.n} sequences, {tokens} real tokens\n", file=sys.stderr)
    table(
        ["config", "engine", "projector", "attn", "k", "p", "tokens/s", "ex/s", "peak MiB", "note"],
        [
            [
                f"({r['label']}) {r['config']}",
                r["engine"],
                r["projector"],
                r["attn"],
                r["k"],
                r["p"],
                r["tokens_per_s"],
                r["examples_per_s"],
                r["peak_mib"],
                f"extrapolated from {r['timed_rows']} rows" if r["extrapolated"] else "",
            ]
            for r in results.values()
        ],
    )
    print("\nPeak memory (MiB) vs batch size\n", file=sys.stderr)
    sizes = sorted({bs for _, bs in memory})
    table(
        ["config"] + [f"B={bs}" for bs in sizes],
        [
            [name] + [memory.get((name, bs), {}).get("peak_mib") for bs in sizes]
            for name in dict.fromkeys(n for n, _ in memory)
        ],
    )


if __name__ == "__main__":
    main()
