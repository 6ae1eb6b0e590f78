"""LDS against CPU cost: projector x k x number of models x estimator options, MLP and CNN.

On scikit-learn's digits (fasttrak.demo's split: 1000 training images, 300 targets), for the
demo's MLP (64 -> 128 -> 10) and a small CNN, this measures the LDS of TRAK and the CPU
seconds it costs for every configuration of

* projector (dense, sjlt, srht) x k (256, 1024, 4096),
* number of attribution models M (1, 2, 5, 10, 20),
* estimator options (``ft.Estimator``): plain, gauss_newton, kernel_blocks=4,
  gauss_newton + kernel_blocks=4,
* ridge 0.1 (default); 0.03 and 0.3 as well at k <= 1024, and for the best families at 4096.

Only fasttrak's public API is used: the scores are the library's own ``trak.score``.

Cost of a configuration = CPU seconds of training its M attribution models + featurizing
the 1000 training rows for each of them + scoring them, all on one torch thread.

* Featurize: each (model kind, projector, k) gets ONE store holding the first N attribution
  models (N = 20, fewer where the grid says so), featurized one model per
  ``trak.featurize(train, checkpoints=[state_m], model_ids=[m])`` call; model m's seconds
  are that call's process_time (store writes included). Model m's features do not depend
  on how many models are used, so the store serves every M <= N.
* Score: per option and model, ``trak.score(targets, checkpoints=[state_m],
  model_ids=[m], estimator=option)`` (the 300 target features, the gram, the Cholesky
  factor, the solve); the scores of the first M models are
  ``np.asarray(ft.Scores.combine(per_model[:M]))``, which equals
  ``trak.score(..., model_ids=range(M))``. Score seconds of M = the M per-model calls + that
  materialisation. The store caches each model's gram (per kernel weighting) and factor
  (per estimator), so every option is scored on a fresh copy of the featurized store: each
  option pays its own gram and factor, as a user running that option alone would, and
  reruns re-time the scoring instead of reading cached factors.
* Checked: at M = N, ``Scores.combine`` of the per-model scores must equal one
  ``trak.score(targets, checkpoints=all N)`` call on the same store (all options at the
  smallest k, gauss_newton + blocks 4 at k = 1024), to float32 tolerance; the check is
  recorded in the JSON.

Everything is cached under --out (ground truth, models and their training seconds, stores
and their featurize seconds); scoring is recomputed (and re-timed) on every run.

Also measured per (model kind, projector, k): the ratio of projection time (building the
projection, "fasttrak.featurizer", + its calls, "fasttrak.project") to per-example gradient
time ("fasttrak.gradients"), from torch.profiler's totals of the library's
``record_function`` labels over one more, profiled, in-memory featurization of the first
PROFILE_MODELS models (so that profiling inflates no cost); its CPU seconds over those of
the same in-memory featurization unprofiled are recorded as the profiler's overhead.

Usage::

    python benchmarks/lds_vs_cost.py --quiet         # full run: 23+ min on 1 shared core
    python benchmarks/lds_vs_cost.py --quick         # ~2 min smoke run
    python benchmarks/lds_vs_cost.py --replot        # tables + plot from an earlier run

Writes one JSON line per configuration to stdout (LDS, CPU seconds and proj_over_grad, the
projection / gradient ratio measured in this process), everything to --json (default
docs/lds_vs_cost.json), a plot to --plot (docs/lds_vs_cost.png) and markdown tables to
OUT/tables.md; progress goes to stderr. --quick writes to OUT/quick/ instead of docs/.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy / torch load their BLAS
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import fasttrak as ft  # noqa: E402
from fasttrak import demo  # noqa: E402
from fasttrak.demo import (  # noqa: E402
    DigitsData,
    TrainConfig,
    half_masks,
    load_data,
    target_margins,
)
from fasttrak.demo import make_model as make_mlp  # noqa: E402
from fasttrak.demo import train as train_mlp  # noqa: E402
from fasttrak.evaluate import LDSResult, lds  # noqa: E402

PROJECTORS = ("dense", "sjlt", "srht")
PROJ_DIMS = (256, 1024, 4096)
NUM_MODELS = (1, 2, 5, 10, 20)
RIDGES = (0.03, 0.1, 0.3)
DEFAULT_RIDGE = ft.Estimator().ridge
MAX_MODELS = {("dense", 4096): 5}
"""Per (projector, k): fewer models where the full 20 cost too much (dense at k = 4096:
2.5 s to featurize a model and ~8 s to score it with the four options)."""
FULL_RIDGE_MAX_K = 1024
"""Ridges 0.03 / 0.1 / 0.3 for every option up to this k; above it only 0.1, plus a second
pass for the best families (a 4096 Cholesky factor takes ~2 s)."""
BATCH_SIZE = 250
PROFILE_MODELS = 2
"""Models featurized once more under torch.profiler for the projection / gradient ratio."""
STAGES = {
    "grad": "fasttrak.gradients",
    "build": "fasttrak.featurizer",
    "project": "fasttrak.project",
    "write": "fasttrak.write",
}
"""The library's record_function labels of featurize's stages."""


@dataclass(frozen=True)
class Option:
    """An estimator option: kernel weighting, number of diagonal blocks, relative ridge."""

    kernel: str
    blocks: int
    ridge: float

    @property
    def name(self) -> str:
        return {"plain": "plain", "gauss_newton": "gn"}[self.kernel] + (
            f"+b{self.blocks}" if self.blocks > 1 else ""
        )

    @property
    def estimator(self) -> ft.Estimator:
        """ "gn" is the untempered Gauss-Newton kernel (weight power 1), as in every recorded
        line of this study (the library's default power became 0.75 afterwards)."""
        return ft.Estimator(
            kernel=self.kernel, ridge=self.ridge, kernel_blocks=self.blocks, weight_power=1.0
        )


ESTIMATORS = (("plain", 1), ("gauss_newton", 1), ("plain", 4), ("gauss_newton", 4))


# ---------------------------------------------------------------------- models


@dataclass(frozen=True)
class CNNConfig:
    """conv(1->c1, 3, pad 1) -> ReLU -> maxpool 2 -> conv(c1->c2, 3, pad 1) -> ReLU ->
    linear(c2*16 -> 10) on 1x8x8 digits, trained full-batch with Adam."""

    c1: int = 16
    c2: int = 32
    steps: int = 60
    lr: float = 2e-2
    weight_decay: float = 1e-3


def make_cnn(config: CNNConfig = CNNConfig()) -> nn.Module:
    """(B, 64) pixels -> (B, 10) logits (the input is reshaped to 1x8x8 inside)."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, config.c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(config.c1, config.c2, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(config.c2 * 16, 10),
    )


def train_cnn(
    data: DigitsData, mask: np.ndarray, seed: int, config: CNNConfig = CNNConfig()
) -> nn.Module:
    """Like fasttrak.demo.train for the CNN: deterministic full-batch Adam on one thread."""
    mask_t = torch.as_tensor(np.asarray(mask, dtype=bool))
    x, y = data.x_train[mask_t], data.y_train[mask_t]
    with demo.torch_threads(1):
        torch.manual_seed(seed)
        model = make_cnn(config)
        demo.fit(model, x, y, config.steps, config.lr, config.weight_decay)
    return model.eval()


@dataclass(frozen=True)
class Kind:
    """A model kind: architecture, trainer and the config that identifies its caches."""

    name: str
    make: Callable[[], nn.Module]
    train: Callable[[DigitsData, np.ndarray, int], nn.Module]
    config: dict[str, Any]


KINDS = {
    "mlp": Kind("mlp", make_mlp, train_mlp, {"arch": "mlp", **asdict(TrainConfig())}),
    "cnn": Kind("cnn", make_cnn, train_cnn, {"arch": "cnn", **asdict(CNNConfig())}),
}


# ---------------------------------------------------------------------- helpers

_T0 = time.perf_counter()


def log(message: str) -> None:
    elapsed = time.perf_counter() - _T0
    print(
        f"# [{int(elapsed) // 60:3d}:{int(elapsed) % 60:02d}] {message}",
        file=sys.stderr,
        flush=True,
    )


def cpu() -> float:
    """CPU seconds of this process (all threads; torch runs one)."""
    return time.process_time()


def ground_truth(
    kind: Kind, data: DigitsData, num_subsets: int, seeds: int, out: Path, progress: bool
) -> tuple[np.ndarray, np.ndarray, float]:
    """Masks (S, n), mean target margins (S, T) over ``seeds`` retrainings per subset (cached),
    and the CPU seconds spent retraining in this run (0 when cached)."""
    masks = ft.evaluate.sample_subsets(data.num_train, num_subsets, 0.5, seed=0)
    key = json.dumps(
        {"bench": "lds_vs_cost", "targets": data.num_targets, **kind.config}, sort_keys=True
    )
    start = cpu()
    masks, outputs = ft.evaluate.retrain(
        lambda mask, seed: target_margins(kind.train(data, mask, seed), data),
        masks,
        seeds_per_subset=seeds,
        cache_dir=out / "ground_truth" / f"{kind.name}-{num_subsets}x{seeds}",
        key=key,
        progress=progress,
    )
    return masks, outputs, cpu() - start


def attribution_models(
    kind: Kind, data: DigitsData, num_models: int, out: Path
) -> tuple[list[dict[str, Tensor]], list[float]]:
    """State dicts of the first ``num_models`` attribution models (model m: the demo's
    random half m, seed 10_000 + m) and the CPU seconds each took to train (cached)."""
    folder = out / "models" / kind.name
    folder.mkdir(parents=True, exist_ok=True)
    tag = json.dumps(kind.config, sort_keys=True)
    masks = half_masks(data.num_train, num_models, 0)  # a prefix of the same stream for any N
    states, seconds = [], []
    for m in range(num_models):
        path, meta_path = folder / f"model_{m:02d}.pt", folder / f"model_{m:02d}.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        if path.exists() and meta is not None and meta.get("config") == tag:
            state = torch.load(path, map_location="cpu", weights_only=True)
            secs = float(meta["train_s"])
        else:
            start = cpu()
            model = kind.train(data, masks[m], 10_000 + m)
            secs = cpu() - start
            state = {name: t.detach().clone() for name, t in model.state_dict().items()}
            torch.save(state, path)
            meta_path.write_text(json.dumps({"config": tag, "train_s": secs}))
        states.append(state)
        seconds.append(secs)
    return states, seconds


def make_trak(kind: Kind, projector: str, k: int, store: Path | None) -> ft.TRAK:
    return ft.TRAK(
        kind.make(),
        proj_dim=k,
        projector=projector,
        store=store,
        batch_size=BATCH_SIZE,
        vmap_chunk_size=None,
        progress=False,
    )


def stage_seconds(events: Any) -> dict[str, float]:
    """CPU seconds per featurize stage from a profiler's key_averages() (0 when absent)."""
    totals = {event.key: event.cpu_time_total / 1e6 for event in events}
    return {name: totals.get(label, 0.0) for name, label in STAGES.items()}


def profile_stages(
    kind: Kind, projector: str, k: int, rows: tuple[Tensor, Tensor], states: list
) -> tuple[dict[str, float], float, float]:
    """Featurize ``rows`` for ``states`` twice more, in memory: once plain, once under
    torch.profiler. Returns the seconds per stage (the library's record_function labels)
    and the CPU seconds of the plain and of the profiled call."""
    start = cpu()
    make_trak(kind, projector, k, None).featurize(rows, checkpoints=states)
    plain = cpu() - start
    trak = make_trak(kind, projector, k, None)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = cpu()
        trak.featurize(rows, checkpoints=states)
        profiled = cpu() - start
    return stage_seconds(prof.key_averages()), plain, profiled


def featurize(
    kind: Kind,
    projector: str,
    k: int,
    rows: tuple[Tensor, Tensor],
    states: list[dict[str, Tensor]],
    path: Path,
) -> dict[str, Any]:
    """Featurize ``rows`` for every state into the store at ``path``, one
    ``trak.featurize`` call per model, and profile the first PROFILE_MODELS models again;
    returns the timings (per-model seconds, stage seconds of the profiled pass), cached in a
    sidecar JSON written when the store is complete."""
    sidecar = path.with_suffix(".timing.json")
    if sidecar.exists() and path.exists():
        timing = json.loads(sidecar.read_text())
        trak = make_trak(kind, projector, k, path)
        complete = trak.store.model_ids() == list(range(len(states)))
        if "stages_s" in timing and len(timing["per_model"]) == len(states) and complete:
            return timing
    shutil.rmtree(path, ignore_errors=True)  # a partial store would time as free
    sidecar.unlink(missing_ok=True)
    trak = make_trak(kind, projector, k, path)
    per_model = []
    for m, state in enumerate(states):
        start = cpu()
        trak.featurize(rows, checkpoints=[state], model_ids=[m])
        per_model.append(cpu() - start)
    profiled = min(PROFILE_MODELS, len(states))
    stages, plain_s, profiled_s = profile_stages(kind, projector, k, rows, states[:profiled])
    timing = {
        "per_model": per_model,
        "total_s": sum(per_model),
        "profiled_models": profiled,
        "stages_s": stages,
        "profiled_s": profiled_s,
        "profiler_overhead": profiled_s / plain_s,
    }
    sidecar.write_text(json.dumps(timing))
    return timing


# ---------------------------------------------------------------------- scoring


def score_option(
    kind: Kind,
    projector: str,
    k: int,
    store: Path,
    states: list[dict[str, Tensor]],
    targets: tuple[Tensor, Tensor],
    opt: Option,
    num_models: Sequence[int],
    on_scores: Callable[[Option, int, np.ndarray, float], None],
    check: bool,
) -> dict[str, Any] | None:
    """Score ``opt`` with trak.score, one model at a time, on a fresh copy of the store.

    The scores of the first M models (every M in ``num_models``) are ``Scores.combine`` of
    the per-model scores, handed to ``on_scores(option, M, scores (T, n) float32,
    score_seconds)``; score_seconds of M = the first M per-model trak.score calls +
    materialising their combination. With ``check``, the combination of all of them is
    compared with one trak.score call over the same models; returns that comparison.
    """
    scratch = store.with_name(store.name + "-scoring")
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(store, scratch)  # no gram or factor cached yet: this option pays its own
    try:
        trak = make_trak(kind, projector, k, scratch)
        wanted, per_model, seconds = set(num_models), [], 0.0
        count = max(wanted)
        combined = np.zeros(0)
        # The "auto" ridge of a model scored alone is larger than an ensemble's (the library
        # tells one model from several, not 2 from 20): parts are solved for the ensemble
        # and M = 1 is scored as one model on its own.
        ensemble = replace(opt.estimator, ensemble_size=max(count, 2))
        for m, state in enumerate(states[:count]):
            start = cpu()
            per_model.append(
                trak.score(targets, checkpoints=[state], model_ids=[m], estimator=ensemble)
            )
            seconds += cpu() - start
            if m == 0 and 1 in wanted:
                start = cpu()
                alone = trak.score(
                    targets, checkpoints=[state], model_ids=[0], estimator=opt.estimator
                )
                on_scores(opt, 1, np.asarray(alone, dtype=np.float32), cpu() - start)
            elif m + 1 in wanted:
                start = cpu()
                combined = np.asarray(ft.Scores.combine(per_model), dtype=np.float32)
                on_scores(opt, m + 1, combined, seconds + cpu() - start)
        if not check:
            return None
        start = cpu()
        library = np.asarray(
            trak.score(targets, checkpoints=states[:count], estimator=opt.estimator),
            dtype=np.float32,
        )
        one_call_s = cpu() - start
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    diff = float(np.abs(library - combined).max())
    scale = float(np.abs(library).max())
    return {
        "model": kind.name,
        "projector": projector,
        "k": k,
        "options": opt.name,
        "ridge": opt.ridge,
        "models": count,
        "max_abs_diff": diff,
        "max_abs_score": scale,
        "ok": diff <= 1e-4 * scale,
        "one_call_score_cpu_s": round(one_call_s, 3),
        "per_model_score_cpu_s": round(seconds, 3),
    }


# ---------------------------------------------------------------------- the sweep


@dataclass
class Grid:
    projectors: tuple[str, ...]
    proj_dims: tuple[int, ...]
    num_models: tuple[int, ...]
    ridges: tuple[float, ...]
    subsets: int
    seeds: int
    kinds: tuple[str, ...]

    def max_models(self, projector: str, k: int) -> int:
        return min(max(self.num_models), MAX_MODELS.get((projector, k), 10**9))

    def options(self, k: int) -> list[Option]:
        ridges = self.ridges if k <= FULL_RIDGE_MAX_K else (DEFAULT_RIDGE,)
        return [Option(kern, b, r) for kern, b in ESTIMATORS for r in ridges]


@dataclass
class Results:
    """Everything measured: JSON rows, per-target LDS (for paired differences), checks,
    projection / gradient timings and per-kind metadata."""

    rows: list[dict[str, Any]]
    per_target: dict[str, np.ndarray]
    checks: list[dict[str, Any]]
    ratios: list[dict[str, Any]]
    kinds: dict[str, Any]

    def record(
        self,
        kind: str,
        projector: str,
        k: int,
        opt: Option,
        count: int,
        result: LDSResult,
        train_s: list[float],
        feat_s: list[float],
        score_s: float,
        ratio: float,
    ) -> None:
        train, feat = sum(train_s[:count]), sum(feat_s[:count])
        row = {
            "model": kind,
            "projector": projector,
            "k": k,
            "M": count,
            "options": opt.name,
            "kernel": opt.kernel,
            "kernel_blocks": opt.blocks,
            "ridge": opt.ridge,
            "lds": round(result.mean, 4),
            "stderr": round(result.stderr, 4),
            "seconds": {
                "train": round(train, 3),
                "featurize": round(feat, 3),
                "score": round(score_s, 3),
                "total": round(train + feat + score_s, 3),
            },
            "proj_over_grad": round(ratio, 4),
        }
        print(json.dumps(row), flush=True)
        self.rows.append(row)
        self.per_target[row_key(row)] = result.per_target


@dataclass
class KindRun:
    """One model kind's data, ground truth and attribution models."""

    kind: Kind
    data: DigitsData
    masks: np.ndarray
    outputs: np.ndarray
    states: list[dict[str, Tensor]]
    train_s: list[float]
    out: Path


def score_family(
    run: KindRun,
    results: Results,
    grid: Grid,
    projector: str,
    k: int,
    options: Sequence[Option],
    check: bool,
) -> None:
    """Featurize (or reuse) the store of (kind, projector, k), score every option for
    every M with trak.score, record the rows, and compare Scores.combine with one
    trak.score call at M = N when ``check``."""
    kind, data = run.kind, run.data
    num = grid.max_models(projector, k)
    ms = tuple(m for m in grid.num_models if m <= num)
    name = f"{kind.name}-{projector}-k{k}-n{num}"
    store = run.out / "stores" / f"{name}-train"
    targets = (data.x_target, data.y_target)
    tt = featurize(kind, projector, k, (data.x_train, data.y_train), run.states[:num], store)
    stages = tt["stages_s"]
    ratio = (stages["build"] + stages["project"]) / stages["grad"]
    if check:
        results.ratios.append(
            {
                "model": kind.name,
                "projector": projector,
                "k": k,
                "models": tt["profiled_models"],
                "grad_s": round(stages["grad"], 3),
                "build_s": round(stages["build"], 3),
                "project_s": round(stages["project"], 3),
                "write_s": round(stages["write"], 3),
                "profiled_featurize_s": round(tt["profiled_s"], 3),
                "profiler_overhead": round(tt["profiler_overhead"], 3),
                "proj_over_grad": round(ratio, 4),
                "project_only_over_grad": round(stages["project"] / stages["grad"], 4),
            }
        )
    log(
        f"{name}: featurized ({sum(tt['per_model']):.1f} CPU s), projection/gradient "
        f"{ratio:.3f} (profiled / unprofiled seconds {tt['profiler_overhead']:.2f})"
    )

    def on_scores(opt: Option, count: int, scores: np.ndarray, score_s: float) -> None:
        result = lds(scores, run.masks, run.outputs)
        results.record(
            kind.name,
            projector,
            k,
            opt,
            count,
            result,
            run.train_s,
            tt["per_model"],
            score_s,
            ratio,
        )

    start = time.perf_counter()
    for opt in options:
        checked = score_option(
            kind, projector, k, store, run.states[:num], targets, opt, ms, on_scores,
            check and checked_option(opt, k, grid),
        )  # fmt: skip
        if checked is not None:
            results.checks.append(checked)
            log(
                f"check {name} {opt.name}: max |diff| {checked['max_abs_diff']:.2e} of "
                f"{checked['max_abs_score']:.2e} -> {'OK' if checked['ok'] else 'MISMATCH'}"
            )
            if not checked["ok"]:
                raise AssertionError(f"Scores.combine differs from trak.score: {checked}")
    log(
        f"{name}: {len(options)} options x {len(ms)} M scored in "
        f"{time.perf_counter() - start:.0f} s wall"
    )


def checked_option(opt: Option, k: int, grid: Grid) -> bool:
    """Which options are checked at M = N: every one at the default ridge at the smallest
    k, gauss_newton + 4 blocks at k = 1024."""
    if opt.ridge != DEFAULT_RIDGE:
        return False
    if k == min(grid.proj_dims):
        return True
    return k == 1024 and (opt.kernel, opt.blocks) == ("gauss_newton", 4)


def run(args: argparse.Namespace, grid: Grid) -> Results:
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(300, 0)
    results = Results([], {}, [], [], {})
    for kind_name in grid.kinds:
        kind = KINDS[kind_name]
        n_params = sum(p.numel() for p in kind.make().parameters())
        log(
            f"{kind_name}: {n_params} parameters; ground truth {grid.subsets} subsets x "
            f"{grid.seeds} seeds"
        )
        masks, outputs, gt_s = ground_truth(
            kind, data, grid.subsets, grid.seeds, out, not args.quiet
        )
        states, train_s = attribution_models(kind, data, max(grid.num_models), out)
        accuracy = []
        for state in states:
            model = kind.make()
            model.load_state_dict(state)
            with torch.no_grad():
                hits = model(data.x_target).argmax(1) == data.y_target
            accuracy.append(float(hits.float().mean()))
        results.kinds[kind_name] = {
            "params": n_params,
            "config": kind.config,
            "ground_truth_retrain_cpu_s_this_run": round(gt_s, 1),
            "train_s_per_model": round(float(np.mean(train_s)), 3),
            "target_accuracy_mean": round(float(np.mean(accuracy)), 4),
        }
        log(
            f"{kind_name}: {len(states)} attribution models, {np.mean(train_s):.2f} CPU s "
            f"each, target accuracy {np.mean(accuracy):.3f}"
        )
        kind_run = KindRun(kind, data, masks, outputs, states, train_s, out)
        for k in grid.proj_dims:
            for projector in grid.projectors:
                score_family(kind_run, results, grid, projector, k, grid.options(k), True)
        # ridge pass for the best families whose k had only the default ridge
        for (projector, k), pairs in best_families(results.rows, kind_name, grid).items():
            options = [
                Option(kern, b, r) for kern, b in pairs for r in grid.ridges if r != DEFAULT_RIDGE
            ]
            log(
                f"{kind_name}-{projector}-k{k}: ridge pass for "
                f"{sorted(o.name + '@' + str(o.ridge) for o in options)}"
            )
            score_family(kind_run, results, grid, projector, k, options, False)
    np.savez_compressed(out / per_target_name(args.quick), **results.per_target)
    return results


def per_target_name(quick: bool) -> str:
    """Per-target LDS of every row (for paired differences), kept for --replot."""
    return "per_target-quick.npz" if quick else "per_target.npz"


def row_key(row: dict[str, Any]) -> str:
    return (
        f"{row['model']}|{row['projector']}|{row['k']}|{row['options']}|{row['ridge']}|{row['M']}"
    )


def best_families(
    rows: list[dict[str, Any]], kind: str, grid: Grid, top: int = 3
) -> dict[tuple[str, int], list[tuple[str, int]]]:
    """The top families (projector, k, kernel, blocks) of a model kind by default-ridge LDS
    at M = 5 and at the largest M, restricted to k above FULL_RIDGE_MAX_K (the others
    already have every ridge), grouped by (projector, k)."""
    mine = [r for r in rows if r["model"] == kind and r["ridge"] == DEFAULT_RIDGE]
    chosen: set[tuple[str, int, str, int]] = set()
    for count in sorted({5, max(grid.num_models)}):
        at = sorted((r for r in mine if r["M"] == count), key=lambda r: -r["lds"])[:top]
        chosen |= {(r["projector"], r["k"], r["kernel"], r["kernel_blocks"]) for r in at}
    grouped: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for projector, k, kern, b in sorted(chosen):
        if k > FULL_RIDGE_MAX_K and len(grid.ridges) > 1:
            grouped.setdefault((projector, k), []).append((kern, b))
    return grouped


# ---------------------------------------------------------------------- analysis


def pareto(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows not dominated in (lower total seconds, higher LDS), by increasing cost."""
    front, best = [], -math.inf
    for row in sorted(points, key=lambda r: (r["seconds"]["total"], -r["lds"])):
        if row["lds"] > best:
            front.append(row)
            best = row["lds"]
    return front


def label(row: dict[str, Any]) -> str:
    ridge = "" if row["ridge"] == DEFAULT_RIDGE else f" r{row['ridge']:g}"
    return f"{row['projector']} k{row['k']} {row['options']}{ridge} M{row['M']}"


def paired(per_target: dict[str, np.ndarray], a: str, b: str) -> tuple[float, float]:
    diff = per_target[a] - per_target[b]
    diff = diff[np.isfinite(diff)]
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(diff.size))


def tables(result: dict[str, Any], grid: Grid, per_target: dict[str, np.ndarray]) -> str:
    """Markdown tables: best per budget, Pareto front, aim, full grid, projector deltas,
    projection / gradient ratios, checks."""
    rows = result["rows"]
    lines: list[str] = []
    budgets = (1, 2, 5, 10, 20, 50, 100, 200)
    for kind in grid.kinds:
        mine = [r for r in rows if r["model"] == kind]
        lines += [
            f"### {kind}: best LDS per CPU budget",
            "",
            "| budget (CPU s) | best configuration | LDS ± stderr | CPU s (train + "
            "featurize + score) |",
            "|---|---|---|---|",
        ]
        for budget in budgets:
            fit = [r for r in mine if r["seconds"]["total"] <= budget]
            if not fit:
                lines.append(f"| {budget} | — | | |")
                continue
            r = max(fit, key=lambda r: r["lds"])
            s = r["seconds"]
            lines.append(
                f"| {budget} | {label(r)} | {r['lds']:.3f} ± {r['stderr']:.3f} | "
                f"{s['total']:.1f} ({s['train']:.1f} + {s['featurize']:.1f} + "
                f"{s['score']:.1f}) |"
            )
        lines += [
            "",
            f"### {kind}: Pareto front (all ridges)",
            "",
            "| configuration | LDS ± stderr | total CPU s |",
            "|---|---|---|",
        ]
        lines += [
            f"| {label(r)} | {r['lds']:.3f} ± {r['stderr']:.3f} | {r['seconds']['total']:.1f} |"
            for r in pareto(mine)
        ]
        # the aim: 5 models vs plain dense at 20
        default = [r for r in mine if r["ridge"] == DEFAULT_RIDGE]
        ref = [
            r
            for r in default
            if r["projector"] == "dense"
            and r["options"] == "plain"
            and r["M"] == max(grid.num_models)
        ]
        at5 = [r for r in mine if r["M"] == 5]
        if ref and at5:
            ref_best = max(ref, key=lambda r: r["lds"])
            best5 = max(at5, key=lambda r: r["lds"])
            d, se = paired(per_target, row_key(best5), row_key(ref_best))
            lines += [
                "",
                f"Aim ({kind}): best at M=5 = {label(best5)} {best5['lds']:.3f} vs "
                f"plain dense at M={ref_best['M']} = {label(ref_best)} "
                f"{ref_best['lds']:.3f}: paired difference {d:+.3f} ± {se:.3f}",
            ]
        # the full grid at the default ridge: one line per (projector, k, options), M across
        ms = sorted({r["M"] for r in mine})
        lines += [
            "",
            f"### {kind}: LDS at ridge {DEFAULT_RIDGE} (total CPU s in brackets)",
            "",
            "| projector | k | options | " + " | ".join(f"M={m}" for m in ms) + " |",
            "|---|---|---|" + "---|" * len(ms),
        ]
        for projector in grid.projectors:
            for k in grid.proj_dims:
                for kern, b in ESTIMATORS:
                    cells = []
                    for m in ms:
                        hit = [
                            r
                            for r in default
                            if (r["projector"], r["k"], r["kernel"], r["kernel_blocks"], r["M"])
                            == (projector, k, kern, b, m)
                        ]
                        cells.append(
                            f"{hit[0]['lds']:.3f} ({hit[0]['seconds']['total']:.1f})"
                            if hit
                            else "—"
                        )
                    name = Option(kern, b, DEFAULT_RIDGE).name
                    lines.append(f"| {projector} | {k} | {name} | " + " | ".join(cells) + " |")
        # ridge check
        others = sorted({r["ridge"] for r in mine} - {DEFAULT_RIDGE})
        if others:
            lines += [
                "",
                f"### {kind}: ridge check (paired LDS difference to ridge "
                f"{DEFAULT_RIDGE}, at M=5 / M=max)",
                "",
                "| projector | k | options | " + " | ".join(f"ridge {r:g}" for r in others) + " |",
                "|---|---|---|" + "---|" * len(others),
            ]
            fams = sorted(
                {
                    (r["projector"], r["k"], r["options"])
                    for r in mine
                    if r["ridge"] != DEFAULT_RIDGE
                }
            )
            for projector, k, opt in fams:
                top = max(r["M"] for r in mine if (r["projector"], r["k"]) == (projector, k))
                cells = []
                for ridge in others:
                    parts = []
                    for m in (5, top):
                        a = f"{kind}|{projector}|{k}|{opt}|{ridge}|{m}"
                        b = f"{kind}|{projector}|{k}|{opt}|{DEFAULT_RIDGE}|{m}"
                        if a in per_target and b in per_target:
                            d, se = paired(per_target, a, b)
                            parts.append(f"{d:+.3f}±{se:.3f}")
                    cells.append(" / ".join(parts) or "—")
                lines.append(f"| {projector} | {k} | {opt} | " + " | ".join(cells) + " |")
        # structured vs dense at the same k, options, M
        lines += [
            "",
            f"### {kind}: structured projector minus dense, same k / options / M "
            f"(paired, ridge {DEFAULT_RIDGE})",
            "",
            "| projector | k | mean Δ | max abs Δ | worst (options, M): Δ ± se | all within 0.01 |",
            "|---|---|---|---|---|---|",
        ]
        for projector in grid.projectors:
            if projector == "dense":
                continue
            for k in grid.proj_dims:
                deltas = []
                for r in default:
                    if (r["projector"], r["k"]) != (projector, k):
                        continue
                    other = f"{kind}|dense|{k}|{r['options']}|{r['ridge']}|{r['M']}"
                    if other in per_target:
                        d, se = paired(per_target, row_key(r), other)
                        deltas.append((d, se, r["options"], r["M"]))
                if not deltas:
                    continue
                worst = max(deltas, key=lambda t: abs(t[0]))
                lines.append(
                    f"| {projector} | {k} | {np.mean([d[0] for d in deltas]):+.4f} | "
                    f"{abs(worst[0]):.4f} | {worst[2]}, M{worst[3]}: {worst[0]:+.4f} ± "
                    f"{worst[1]:.4f} | {'yes' if abs(worst[0]) <= 0.01 else 'no'} |"
                )
        lines.append("")
    lines += [
        "### projection time / per-example gradient time (profiled training featurization)",
        "",
        "| model | projector | k | models | gradient s | build s | project s | "
        "(build+project)/gradient | profiled / unprofiled s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["proj_over_grad"]:
        lines.append(
            f"| {r['model']} | {r['projector']} | {r['k']} | {r['models']} | "
            f"{r['grad_s']:.2f} | {r['build_s']:.2f} | {r['project_s']:.2f} | "
            f"{r['proj_over_grad']:.3f} | {cell(r.get('profiler_overhead'))} |"
        )
    lines += [
        "",
        "### Scores.combine of per-model trak.score calls vs one trak.score call (M = N)",
        "",
        "| model | projector | k | options | max abs diff | max abs score | OK | "
        "one call CPU s (factors cached) | per-model calls CPU s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["checks"]:
        lines.append(
            f"| {c['model']} | {c['projector']} | {c['k']} | {c['options']} | "
            f"{c['max_abs_diff']:.2e} | {c['max_abs_score']:.2e} | {c['ok']} | "
            f"{cell(c.get('one_call_score_cpu_s'))} | {cell(c.get('per_model_score_cpu_s'))} |"
        )
    return "\n".join(lines) + "\n"


def cell(value: float | None) -> str:
    """A table cell of seconds or a ratio; "—" where an earlier run did not measure it."""
    return "—" if value is None else f"{value:.2f}"


def plot(result: dict[str, Any], grid: Grid, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = result["rows"]
    fig, axes = plt.subplots(
        1, len(grid.kinds), figsize=(7.5 * len(grid.kinds), 6.5), squeeze=False
    )
    styles = {"plain": "-", "gn": "--", "plain+b4": ":", "gn+b4": "-."}
    pairs = [(p, k) for p in grid.projectors for k in grid.proj_dims]
    cmap = plt.get_cmap("tab10")
    colors = {pk: cmap(i % 10) for i, pk in enumerate(pairs)}
    markers = {"dense": "o", "sjlt": "s", "srht": "^"}
    for ax, kind in zip(axes[0], grid.kinds, strict=True):
        mine = [r for r in rows if r["model"] == kind]
        for projector, k in pairs:
            for kern, b in ESTIMATORS:
                name = Option(kern, b, DEFAULT_RIDGE).name
                curve = sorted(
                    (
                        r
                        for r in mine
                        if (r["projector"], r["k"], r["options"], r["ridge"])
                        == (projector, k, name, DEFAULT_RIDGE)
                    ),
                    key=lambda r: r["M"],
                )
                if not curve:
                    continue
                ax.errorbar(
                    [r["seconds"]["total"] for r in curve],
                    [r["lds"] for r in curve],
                    yerr=[r["stderr"] for r in curve],
                    color=colors[(projector, k)],
                    linestyle=styles[name],
                    marker=markers.get(projector, "o"),
                    markersize=3.5,
                    linewidth=1.1,
                    capsize=1.5,
                    alpha=0.85,
                )
        front = pareto(mine)
        ax.plot(
            [r["seconds"]["total"] for r in front],
            [r["lds"] for r in front],
            color="black",
            linewidth=2.2,
            alpha=0.35,
            drawstyle="steps-post",
            label="Pareto front",
        )
        ax.scatter(
            [r["seconds"]["total"] for r in front],
            [r["lds"] for r in front],
            s=9,
            color="black",
            zorder=5,
        )
        ax.set_xscale("log")
        ax.set_xlabel("total CPU seconds (train M models + featurize + score), 1 thread")
        ax.set_ylabel("LDS (300 targets, ± stderr)")
        params = result["kinds"].get(kind, {}).get("params", "?")
        ax.set_title(
            f"{kind.upper()} ({params} parameters)\npoints: M = "
            f"{', '.join(map(str, grid.num_models))}; black dots: Pareto front (all ridges)",
            fontsize=10,
        )
        ax.grid(True, which="both", alpha=0.3)
    handles = [
        Line2D([], [], color=colors[pk], marker=markers.get(pk[0], "o"), label=f"{pk[0]} k={pk[1]}")
        for pk in pairs
    ]
    handles += [Line2D([], [], color="gray", linestyle=s, label=n) for n, s in styles.items()]
    handles.append(Line2D([], [], color="black", linewidth=2.2, alpha=0.35, label="Pareto front"))
    axes[0][-1].legend(handles=handles, fontsize=7.5, loc="lower right", ncol=2)
    fig.suptitle(
        f"TRAK on digits: LDS vs CPU cost (ridge {DEFAULT_RIDGE}; "
        "colour = projector, k; line = kernel options)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/lds_vs_cost", help="cache directory")
    parser.add_argument("--quick", action="store_true", help="< 2 min smoke run")
    parser.add_argument("--json", default=None, help="default docs/lds_vs_cost.json")
    parser.add_argument("--plot", default=None, help="default docs/lds_vs_cost.png")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--replot",
        action="store_true",
        help="redo tables and plot from the JSON and OUT/per_target.npz of an earlier run",
    )
    args = parser.parse_args(argv)
    if args.quick:
        grid = Grid(
            PROJECTORS, (256,), (1, 2, 5), RIDGES, subsets=20, seeds=1, kinds=tuple(args.kinds)
        )
        where = Path(args.out) / "quick"
    else:
        grid = Grid(
            PROJECTORS, PROJ_DIMS, NUM_MODELS, RIDGES, subsets=100, seeds=2, kinds=tuple(args.kinds)
        )
        where = Path(__file__).resolve().parent.parent / "docs"
    where.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else where / "lds_vs_cost.json"
    plot_path = Path(args.plot) if args.plot else where / "lds_vs_cost.png"
    tables_path = Path(args.out) / ("tables-quick.md" if args.quick else "tables.md")
    if args.replot:
        result = json.loads(json_path.read_text())
        per_target = dict(np.load(Path(args.out) / per_target_name(args.quick)))
    else:
        wall0, cpu0 = time.perf_counter(), cpu()
        results = run(args, grid)
        per_target = results.per_target
        result = {
            "meta": {
                "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), torch "
                f"{torch.__version__}, 1 torch thread",
                "grid": asdict(grid),
                "max_models": {f"{p}@{k}": n for (p, k), n in MAX_MODELS.items()},
                "profiled_models": PROFILE_MODELS,
                "scores": "trak.score per model, Scores.combine per M, fresh store copy per option",
                "wall_s": round(time.perf_counter() - wall0, 1),
                "cpu_s": round(cpu() - cpu0, 1),
                "n_train": 1000,
                "n_targets": 300,
            },
            "kinds": results.kinds,
            "checks": results.checks,
            "proj_over_grad": results.ratios,
            "rows": results.rows,
        }
    text = tables(result, grid, per_target)
    tables_path.write_text(text)
    plot(result, grid, plot_path)
    json_path.write_text(dump(result))
    print(text, file=sys.stderr)
    log(f"wrote {json_path}, {plot_path}, {tables_path}")
    if not args.replot:
        meta = result["meta"]
        log(f"done: {meta['wall_s']:.0f} s wall, {meta['cpu_s']:.0f} CPU s")


def dump(result: dict[str, Any]) -> str:
    """JSON with one line per list item (rows, checks, ratios): compact and diff-friendly."""
    parts = []
    order = ["meta", "kinds", "checks", "proj_over_grad", "rows"]
    names = [n for n in order if n in result] + [n for n in result if n not in order]
    for name, value in ((n, result[n]) for n in names):
        if isinstance(value, list):
            items = ",\n  ".join(json.dumps(item) for item in value)
            parts.append(f"{json.dumps(name)}: [\n  {items}\n ]")
        else:
            parts.append(f"{json.dumps(name)}: {json.dumps(value)}")
    return "{\n " + ",\n ".join(parts) + "\n}\n"


if __name__ == "__main__":
    main()
