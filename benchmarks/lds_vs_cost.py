"""LDS against CPU cost: projector x k x number of models x estimator options, MLP and CNN.

On scikit-learn's digits (fasttrak.demo's split: 1000 training images, 300 targets), for the
demo's MLP (64 -> 128 -> 10) and a small CNN, this measures the LDS of TRAK and the CPU
seconds it costs for every configuration of

* projector (dense, sjlt, srht) x k (256, 1024, 4096),
* number of attribution models M (1, 2, 5, 10, 20),
* estimator options: plain, gauss_newton, kernel_blocks=4, gauss_newton + kernel_blocks=4,
* ridge 0.1 (default); 0.03 and 0.3 as well at k <= 1024, and for the best families at 4096.

Cost of a configuration = CPU seconds of training its M attribution models + featurizing
the 1000 training rows for each of them + scoring (the 300 target rows' features, the gram,
the Cholesky factor, the solve and the score product, per model), all on one torch thread.

How the M models are evaluated. Each (model kind, projector, k) gets ONE store holding the
features of the first N attribution models (N = 20, fewer where the grid says so); model m's
features do not depend on how many models are used. The TRAK estimator is additive over
models::

    score(t, i) = mean_{m<M} Q_m,i  *  mean_{m<M} phi_m(t)^T K_m^-1 phi_m(i)  [/ B per block]

so the per-model pieces A_m = Phi_m K_m^-1 phi_m(targets)^T / B and Q_m are computed once per
model with the library's own kernel functions (fasttrak.kernel.gram, block_diagonal_factor,
solve, exactly as TRAK.score chains them) and running sums give the scores of every M <= N
in one pass. TRAK.score needs every checkpoint of its store, so it cannot score a prefix;
re-featurizing one store per M would cost 1+2+5+10+20 = 38 featurizations instead of 20.
The reconstruction is tested: at M = N the scores must equal np.asarray(trak.score(...)) of
the library on the same store (all options at the smallest k, gauss_newton + blocks 4 at
k = 1024), to float32 tolerance; the check is recorded in the JSON.

The target features are featurized into a second store (same projector seed and checkpoint
indices, hence the same projections as TRAK.score computes), which also times them per model.
Per-model featurize seconds come from process_time() at the model boundaries of one
featurize call (store writes included); the target features are charged only their
TRAK._features time, which is what TRAK.score spends on them.
Everything is cached under --out (ground truth, models and their training seconds, stores
and their featurize seconds); scoring is recomputed (and re-timed) on every run.

Also measured per (model kind, projector, k): the ratio of projection time (building the
projector + project() calls) to per-example gradient time (engine.parts), over the training
featurization of all N models.

Usage::

    python benchmarks/lds_vs_cost.py --quiet         # full run: 23 min on 1 shared core
    python benchmarks/lds_vs_cost.py --quick         # ~1 min smoke run
    python benchmarks/lds_vs_cost.py --replot        # tables + plot from an earlier run

Writes one JSON line per configuration to stdout, everything to --json (default
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
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import fasttrak as ft  # noqa: E402
from fasttrak import demo  # noqa: E402
from fasttrak import kernel as kernel_ops  # noqa: E402
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
DEFAULT_RIDGE = kernel_ops.DEFAULT_RIDGE
MAX_MODELS = {("dense", 4096): 5}
"""Per (projector, k): fewer models where the full 20 cost too much (dense at k = 4096:
2.5 s to featurize a model and ~8 s to score it with the four options)."""
FULL_RIDGE_MAX_K = 1024
"""Ridges 0.03 / 0.1 / 0.3 for every option up to this k; above it only 0.1, plus a second
pass for the best families (a 4096 Cholesky factor takes ~2 s)."""
BATCH_SIZE = 250


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


def make_trak(kind: Kind, projector: str, k: int, store: Path | None, **options: Any) -> ft.TRAK:
    return ft.TRAK(
        kind.make(),
        proj_dim=k,
        projector=projector,
        store=store,
        batch_size=BATCH_SIZE,
        vmap_chunk_size=None,
        progress=False,
        **options,
    )


class Instrument:
    """Times, per featurize call, each model (process_time between the store's
    writing calls, store writes included), the feature computation of each model
    alone (TRAK._features) and the gradient / projector-building / projection calls."""

    def __init__(self, trak: ft.TRAK) -> None:
        self.grad = self.build = self.project = 0.0
        self.marks: list[float] = []
        self.features: dict[int, float] = {}
        features = trak._features
        gradient_engine, open_checkpoint, get_projector = (
            trak._gradient_engine,
            trak.store.writing,
            trak._projector,
        )

        def timed_engine(task: Any) -> Any:
            engine = gradient_engine(task)
            parts = engine.parts

            def timed_parts(*args: Any, **kwargs: Any) -> Any:
                start = cpu()
                try:
                    return parts(*args, **kwargs)
                finally:
                    self.grad += cpu() - start

            engine.parts = timed_parts  # type: ignore[method-assign]
            return engine

        def timed_open(*args: Any, **kwargs: Any) -> Any:
            self.marks.append(cpu())
            return open_checkpoint(*args, **kwargs)

        def timed_projector(m: int) -> Any:
            fresh = trak._projector_of is None or trak._projector_of[0] != m
            start = cpu()
            projector = get_projector(m)
            self.build += cpu() - start
            if fresh:
                project = projector.project

                def timed_project(grads: Any) -> Any:
                    t0 = cpu()
                    try:
                        return project(grads)
                    finally:
                        self.project += cpu() - t0

                projector.project = timed_project
            return projector

        def timed_features(*args: Any, **kwargs: Any) -> Any:
            m = args[3]
            start = cpu()
            try:
                return features(*args, **kwargs)
            finally:
                self.features[m] = self.features.get(m, 0.0) + cpu() - start

        trak._features = timed_features  # type: ignore[method-assign]
        trak._gradient_engine = timed_engine  # type: ignore[method-assign]
        trak.store.writing = timed_open  # type: ignore[method-assign]
        trak._projector = timed_projector  # type: ignore[method-assign]

    def per_model(self, start: float, end: float) -> list[float]:
        """Seconds per model; the set-up before the first model is spread evenly."""
        marks = self.marks + [end]
        setup = (marks[0] - start) / max(1, len(self.marks))
        return [b - a + setup for a, b in zip(marks[:-1], marks[1:], strict=True)]


def featurize(
    kind: Kind,
    projector: str,
    k: int,
    rows: tuple[Tensor, Tensor],
    states: list[dict[str, Tensor]],
    path: Path,
) -> tuple[ft.TRAK, dict[str, Any]]:
    """Featurize ``rows`` for every state into the store at ``path``; returns the TRAK and
    its timings (per-model seconds, gradient / build / project seconds), cached in a
    sidecar JSON written when the store is complete."""
    sidecar = path.with_suffix(".timing.json")
    trak = make_trak(kind, projector, k, path)
    if sidecar.exists():
        timing = json.loads(sidecar.read_text())
        if len(timing["per_model"]) == len(states) and len(trak.store.checkpoint_ids()) == len(
            states
        ):
            trak.featurize(rows, checkpoints=states)  # no work: every chunk is done
            return trak, timing
    instrument = Instrument(trak)
    start = cpu()
    trak.featurize(rows, checkpoints=states)
    end = cpu()
    timing = {
        "per_model": instrument.per_model(start, end),
        "grad_s": instrument.grad,
        "build_s": instrument.build,
        "project_s": instrument.project,
        "total_s": end - start,
        "features_per_model": [instrument.features.get(m, 0.0) for m in range(len(states))],
    }
    if len(instrument.marks) != len(states):
        raise RuntimeError(f"{path}: featurized partly before; delete it and rerun")
    sidecar.write_text(json.dumps(timing))
    return trak, timing


# ---------------------------------------------------------------------- the estimator


@dataclass
class Running:
    """Running sums over models of one option: Σ_m Phi_m K_m^-1 phi_m(T)^T / B, seconds."""

    total: Tensor
    seconds: float = 0.0


def sweep_store(
    train_trak: ft.TRAK,
    target_trak: ft.TRAK,
    target_seconds: Sequence[float],
    options: Sequence[Option],
    num_models: Sequence[int],
    on_scores: Callable[[Option, int, np.ndarray, float], None],
) -> None:
    """Reproduce TRAK.score for every option and every M in ``num_models`` in one pass.

    Per model m (in store order): read Phi_m, Q_m and the target features, build the gram
    of each weighting needed, then per option the block-diagonal factor, the solve and the
    product Phi_m @ solved; running sums give the scores of the first M models, handed to
    ``on_scores(option, M, scores (T, n) float32, score_seconds)``. The arithmetic is the
    library's (fasttrak.trak.TRAK.score / _factor / _kernel_rows, fasttrak.scoring.Scores).
    score_seconds of M = Σ_{m<M} (target features of m + its gram + factor/solve/product).
    """
    ids = train_trak.store.checkpoint_ids()
    assert ids == target_trak.store.checkpoint_ids(), "train and target stores differ"
    k, wanted = train_trak.k, sorted(set(num_models))
    n = train_trak.store.num_train
    weightings = sorted({opt.kernel for opt in options})
    running: dict[Option, Running] = {}
    q_sum: np.ndarray | None = None
    for m in ids:
        ck, tk = train_trak.store.checkpoint(m), target_trak.store.checkpoint(m)
        assert ck is not None and tk is not None
        start = cpu()
        phi = np.asarray(ck.features(), dtype=np.float32)
        q = np.asarray(ck.q())
        read_s = cpu() - start
        phi_target = torch.from_numpy(np.asarray(tk.features(), dtype=np.float32))
        grams, gram_s = {}, {}
        for weighting in weightings:
            start = cpu()
            grams[weighting] = kernel_ops.gram(_kernel_rows(ck, phi, q, weighting), k, "float32")
            gram_s[weighting] = cpu() - start + read_s
        phi_t = torch.from_numpy(phi)
        for opt in options:
            start = cpu()
            factor = kernel_ops.block_diagonal_factor(grams[opt.kernel], opt.ridge, n, opt.blocks)
            solved = (kernel_ops.solve(factor, phi_target.T) / opt.blocks).float()
            product = (phi_t @ solved).double()
            seconds = cpu() - start + gram_s[opt.kernel] + target_seconds[m]
            if opt not in running:
                running[opt] = Running(product, seconds)
            else:
                running[opt].total += product
                running[opt].seconds += seconds
        q64 = q.astype(np.float64)
        q_sum = q64 if q_sum is None else q_sum + q64
        count = m + 1
        if count in wanted:
            q_mean = (q_sum / count).astype(np.float32)
            scale = torch.from_numpy(q_mean).double()[:, None] / count
            for opt, run in running.items():
                scores = (run.total * scale).T.float().numpy()
                on_scores(opt, count, scores, run.seconds)


def _kernel_rows(ck: Any, phi: np.ndarray, q: np.ndarray, weighting: str) -> Any:
    """The row blocks TRAK._kernel_rows yields (store chunks of Phi, or of R^1/2 Phi; the
    weights R come from the whole Q, as their guard looks at every row)."""
    weights = np.sqrt(kernel_ops.gauss_newton_weights(q)) if weighting == "gauss_newton" else None
    for c in range(ck.num_chunks):
        rows = ck.chunk_slice(c)
        block = phi[rows]
        if weights is not None:
            block = block * weights[rows].astype(np.float32)[:, None]
        yield block


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
        self.per_target[_key(row)] = result.per_target


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
    """Featurize (or reuse) the stores of (kind, projector, k), score every option for
    every M, record the rows, and compare with TRAK.score at M = N when ``check``."""
    kind, data = run.kind, run.data
    num = grid.max_models(projector, k)
    ms = tuple(m for m in grid.num_models if m <= num)
    name = f"{kind.name}-{projector}-k{k}-n{num}"
    stores = run.out / "stores"
    targets = (data.x_target, data.y_target)
    train_trak, tt = featurize(
        kind, projector, k, (data.x_train, data.y_train), run.states[:num], stores / f"{name}-train"
    )
    target_trak, tg = featurize(
        kind, projector, k, targets, run.states[:num], stores / f"{name}-target"
    )
    ratio = (tt["build_s"] + tt["project_s"]) / tt["grad_s"]
    if check:
        results.ratios.append(
            {
                "model": kind.name,
                "projector": projector,
                "k": k,
                "models": num,
                "grad_s": round(tt["grad_s"], 3),
                "build_s": round(tt["build_s"], 3),
                "project_s": round(tt["project_s"], 3),
                "featurize_s": round(tt["total_s"], 3),
                "proj_over_grad": round(ratio, 4),
                "project_only_over_grad": round(tt["project_s"] / tt["grad_s"], 4),
            }
        )
    log(
        f"{name}: featurized ({sum(tt['per_model']):.1f} + {sum(tg['per_model']):.1f} CPU s), "
        f"projection/gradient {ratio:.3f}"
    )
    last: dict[Option, tuple[np.ndarray, float]] = {}

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
        if count == num:
            last[opt] = (scores, score_s)

    start = time.perf_counter()
    # Target features cost what TRAK.score spends on them: _features calls, not store writes.
    sweep_store(train_trak, target_trak, tg["features_per_model"], options, ms, on_scores)
    log(
        f"{name}: {len(options)} options x {len(ms)} M scored in "
        f"{time.perf_counter() - start:.0f} s wall"
    )
    if check:
        results.checks += library_checks(
            kind, projector, k, train_trak.store.location, run.states[:num], targets, last, grid
        )


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


def _key(row: dict[str, Any]) -> str:
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


def library_checks(
    kind: Kind,
    projector: str,
    k: int,
    store: str | None,
    states: list[dict[str, Tensor]],
    targets: tuple[Tensor, Tensor],
    mine: dict[Option, tuple[np.ndarray, float]],
    grid: Grid,
) -> list[dict]:
    """Compare the reconstructed scores at M = N with np.asarray(trak.score(...))."""
    if k == min(grid.proj_dims):
        chosen = [o for o in mine if o.ridge == DEFAULT_RIDGE]
    elif k == 1024:
        chosen = [
            o for o in mine if (o.kernel, o.blocks, o.ridge) == ("gauss_newton", 4, DEFAULT_RIDGE)
        ]
    else:
        chosen = []
    results = []
    for opt in chosen:
        trak = make_trak(
            kind,
            projector,
            k,
            Path(store) if store else None,
            ridge=opt.ridge,
            kernel=opt.kernel,
            kernel_blocks=opt.blocks,
        )
        start = cpu()
        library = np.asarray(trak.score(targets, checkpoints=states))
        seconds = cpu() - start
        ours, our_seconds = mine[opt]
        diff = float(np.abs(library - ours).max())
        scale = float(np.abs(library).max())
        ok = diff <= 1e-4 * scale
        results.append(
            {
                "model": kind.name,
                "projector": projector,
                "k": k,
                "options": opt.name,
                "ridge": opt.ridge,
                "models": len(states),
                "max_abs_diff": diff,
                "max_abs_score": scale,
                "ok": ok,
                "library_score_cpu_s": round(seconds, 3),
                "reconstructed_score_cpu_s": round(our_seconds, 3),
            }
        )
        log(
            f"check {kind.name}-{projector}-k{k} {opt.name}: max |diff| {diff:.2e} of "
            f"{scale:.2e} -> {'OK' if ok else 'MISMATCH'}"
        )
        if not ok:
            raise AssertionError(f"reconstructed scores differ from TRAK.score: {results[-1]}")
    return results


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
            d, se = paired(per_target, _key(best5), _key(ref_best))
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
                        d, se = paired(per_target, _key(r), other)
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
        "### projection time / per-example gradient time (training featurization)",
        "",
        "| model | projector | k | models | gradient s | build s | project s | "
        "(build+project)/gradient |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["proj_over_grad"]:
        lines.append(
            f"| {r['model']} | {r['projector']} | {r['k']} | {r['models']} | "
            f"{r['grad_s']:.2f} | {r['build_s']:.2f} | {r['project_s']:.2f} | "
            f"{r['proj_over_grad']:.3f} |"
        )
    lines += [
        "",
        "### reconstruction vs TRAK.score (M = N)",
        "",
        "| model | projector | k | options | max abs diff | max abs score | OK | "
        "TRAK.score CPU s | summed per-model score CPU s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["checks"]:
        lines.append(
            f"| {c['model']} | {c['projector']} | {c['k']} | {c['options']} | "
            f"{c['max_abs_diff']:.2e} | {c['max_abs_score']:.2e} | {c['ok']} | "
            f"{c['library_score_cpu_s']:.2f} | {c['reconstructed_score_cpu_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


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
