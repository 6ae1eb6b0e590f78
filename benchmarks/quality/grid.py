"""The grid study: LDS of many estimator settings on every case of the suite.

    python -m benchmarks.quality.grid                                  # the default grid
    python -m benchmarks.quality.grid --cases text_bag --projectors sjlt --ks 1024
    python -m benchmarks.quality.grid --models 1,5,10 --blocks 1,2,4   # extend it
    python -m benchmarks.quality.grid --seed 1 --out benchmarks/quality/seeds.jsonl

Needs the ground truth and checkpoints of ``python -m benchmarks.quality.ground_truth``.
For each case and each (projector, k), one store ``runs/quality/<case>/stores/<proj>_k<k>``
is featurized with the case's first max(--models) checkpoints (one ``trak.featurize`` call
per model, timed); then every estimator ``ft.Estimator(kernel, ridge, kernel_blocks)`` of
the grid scores the targets from that store, one ``trak.score(..., model_ids=[m])`` call
per model (timed), and the ensembles of the first M models are
``ft.Scores.combine(per_model[:M])`` (equal to scoring with ``model_ids=range(M)``). The
LDS is ``ft.evaluate.lds(scores, masks, margins)`` against the first retraining (``lds``,
as in issue 11) and against the mean margins of both retrainings (``lds_avg``: half the
seed noise, so it separates estimators better on noisy cases).

Grid (defaults; each can be narrowed or extended on the command line):

* projector: srht, dense (sjlt with ``--projectors srht,dense,sjlt``), and identity (k = p)
  where p <= ``--identity-max-p``. k in 256, 1024, 2048, 4096, also where k > p
  (``ft.TRAK(model)`` uses k = 2048 whatever p is, so the default must be judged there).
* kernel: plain, gauss_newton (R = Q (1 - Q), weight power 1, as in every line measured
  before 2026-11-30 evening), or ``gauss_newton^γ`` (R = (Q (1 - Q))^γ: the library's
  default since then is ``gauss_newton^0.75``); ridge: "min", 0.001, 0.01, 0.1, 1.0 (relative:
  λ = ridge · trace / min(n, k, p)), or "auto" (``--ridges auto``: the library's spectral
  ridge); kernel_blocks: 1, 4; models M: 1, 5.
* "auto" is the library's ridge for an ensemble of the line's M models (the models are
  scored one at a time with ``ft.Estimator(ensemble_size=M)``); at M = 1 that is the
  single-model scale (since 2026-11-30 evening). Lines "auto c=0.14" at M = 1 are the
  ensemble scale 0.14 used for one model, as "auto" was before then (relabelled); lines
  "auto c=x" other scales (``kernel.AUTO_RIDGE_SCALE`` patched).
* "min" is the paper's ridge: 0 when the Cholesky factor exists for every model, else the
  first of MIN_RIDGES that works (recorded as ``ridge_used``).
* The paper's estimator (``traker``): dense, plain, ridge "min", 1 block.
  The library's current default: ``ft.TRAK``'s projector, ``ft.Estimator()`` at that k
  (read from the code, and added to the grid if missing).

Output: one JSON line per (case, projector, k, kernel, ridge, blocks, M) appended to
``benchmarks/quality/results.jsonl`` (settings whose lines are all there already are
skipped: delete their lines to redo them), with ground-truth-free statistics of the store:
effective rank trace²/‖K‖²_F and condition λ_max/λ_r (r = min(n, k, p)) of model 0's
plain and Gauss-Newton kernels, and Q's spread over the M models (fraction of rows with
Q (1 - Q) < 0.01, mean Q, effective rows of Q (1 - Q) over n).

Projection seed: ``--seed s`` (default 0, ``ft.TRAK``'s default) featurizes with
``ft.TRAK(..., seed=s)``; for s != 0 the stores are ``runs/quality/<case>/stores/<proj>_k<k>_s<s>``
(seed-0 stores untouched) and every line gets ``"seed": s`` (a line without it is seed 0),
which is part of the key of the lines already done.

Runtime: about 2-6 minutes per case and projector on one core (dominated by k = 4096);
the default grid takes about 40 minutes. Kernel factors (k² floats per estimator and
model) are deleted from the store after each model's estimators are scored, and grams
after each store, to bound the disk; the features stay, so reruns skip featurization.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import shutil
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fasttrak as ft
from benchmarks.quality import ground_truth as gt
from benchmarks.quality.cases import Case, select

RESULTS = Path(__file__).with_name("results.jsonl")
PROJECTORS = ("srht", "dense")
KS = (256, 1024, 2048, 4096)
KERNELS = ("plain", "gauss_newton")
RIDGES: tuple[float | str, ...] = ("min", 0.001, 0.01, 0.1, 1.0)
BLOCKS = (1, 4)
MODELS = (1, 5)
MIN_RIDGES = (0.0, 1e-9, 1e-7, 1e-5, 1e-3)
"""The paper's "no ridge": the first of these whose Cholesky factor exists for every model."""
IDENTITY_MAX_P = 6000
BATCH_SIZE = 256
PRECISION = "float32"
COMMIT = subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
).stdout.strip()
"""The library's commit when the grid ran (fasttrak is being changed while it is measured)."""


def kernel_name(est: ft.Estimator) -> str:
    """The grid's name of an estimator's kernel: "plain", "gauss_newton" (weight power 1) or
    "gauss_newton^γ" (another power)."""
    if est.kernel == "gauss_newton" and est.weight_power != 1:
        return f"gauss_newton^{est.weight_power:g}"
    return est.kernel


def default_setting(k: int, n: int, p: int) -> Setting:
    """``ft.Estimator()``'s settings for n training rows of p parameters at dimension k."""
    est = ft.Estimator().for_rows(n, k, p)
    return Setting(kernel_name(est), est.ridge, est.kernel_blocks)


def estimator(
    kernel: str, ridge: float | str, blocks: int, ensemble_size: int | None = None
) -> ft.Estimator:
    """The grid's estimators all build the kernel with float32 products (summed in float64),
    the setting every line of results.jsonl was measured with. ``kernel``: a name of
    :func:`kernel_name` (the weight power is 1 unless it says ``^γ``). ``ensemble_size``: the
    M whose "auto" ridge is used when the models are scored one at a time (None: 1)."""
    name, _, power = kernel.partition("^")
    return ft.Estimator(
        kernel=name,
        ridge=ridge,
        kernel_blocks=blocks,
        precision=PRECISION,
        weight_power=float(power) if power else 1.0,
        ensemble_size=ensemble_size,
    )


def ensemble_sizes(setting: Setting, models: list[int]) -> list[int | None]:
    """The ensemble sizes a setting's per-model scores are solved for: every M for the
    "auto" ridge (a model scored alone gets a larger one, so each M has its own factors),
    one solve (None) for a numeric ridge, which does not depend on M."""
    return list(models) if setting.ridge == "auto" else [None]


def library_default() -> dict[str, Any]:
    """``ft.TRAK(model)``'s projector and proj_dim, and ``ft.Estimator()``'s settings."""
    params = inspect.signature(ft.TRAK).parameters
    default = ft.Estimator()
    return {
        "projector": params["projector"].default,
        "k": params["proj_dim"].default,
        "kernel": kernel_name(default),
        "ridge": default.ridge,
        "blocks": default.kernel_blocks,  # None: decided by for_rows(n, k)
    }


@dataclass(frozen=True)
class Setting:
    kernel: str
    ridge: float | str
    blocks: int


def settings(
    kernels: list[str], ridges: list[float | str], blocks: list[int], k: int, n: int, p: int
) -> list[Setting]:
    """The estimator grid at dimension k, plus the library default's estimator."""
    grid = [Setting(kn, r, b) for kn in kernels for r in ridges for b in blocks if b <= k]
    extra = default_setting(k, n, p)
    if extra not in grid:
        grid.append(extra)
    return grid


def projector_config(name: str, p: int, k: int) -> Any:
    """The projector; dense matrices that fit in 2 GiB are kept (not regenerated per batch)."""
    if name == "dense" and p * k * 4 > 2**30:
        return ft.projection.Dense(cache_bytes=2**31)
    return name


DEFAULT = library_default()
PAPER = Setting("plain", "min", 1)
"""The reference package's estimator (with a dense projection): plain kernel, no ridge."""

# ---------------------------------------------------------------------- statistics


def spectrum_stats(features: np.ndarray, weights: np.ndarray | None, p: int) -> dict[str, float]:
    """Effective rank trace²/‖K‖²_F and condition λ_max/λ_r (r = min(n, k, p)) of
    K = Φᵀ W Φ, from the smaller of the two Gram matrices (same nonzero eigenvalues)."""
    phi = features.astype(np.float64)
    if weights is not None:
        phi = phi * np.sqrt(weights)[:, None]
    small = phi @ phi.T if phi.shape[0] <= phi.shape[1] else phi.T @ phi
    eig = np.sort(np.linalg.eigvalsh(small))[::-1]
    eig = np.clip(eig, 0.0, None)
    r = min(phi.shape[0], phi.shape[1], p)
    trace = float(eig.sum())
    lam_r = float(eig[r - 1])
    return {
        "eff_rank": trace**2 / float((eig**2).sum()),
        "cond": float(eig[0]) / lam_r if lam_r > 0 else math.inf,
        "top_frac": float(eig[0]) / trace,
    }


def q_stats(qs: list[np.ndarray]) -> dict[str, float]:
    """Q's spread, averaged over models: saturated fraction (Q (1 - Q) < 0.01), mean Q,
    effective rows of R = Q (1 - Q) as a fraction of n."""
    sat, mean, eff = [], [], []
    for q in qs:
        q = q.astype(np.float64)
        r = q * (1 - q)
        sat.append(float((r < 0.01).mean()))
        mean.append(float(q.mean()))
        eff.append(float(r.sum() ** 2 / max((r * r).sum(), 1e-300)) / len(q))
    return {
        "q_saturated": float(np.mean(sat)),
        "q_mean": float(np.mean(mean)),
        "r_eff_rows_frac": float(np.mean(eff)),
    }


# ---------------------------------------------------------------------- one store


def done_lines(path: Path) -> set[tuple]:
    """(case, projector, k, kernel, ridge, blocks, M, seed) of every line already in ``path``
    (seed 0 where the line has none)."""
    if not path.exists():
        return set()
    done = set()
    for line in path.read_text().splitlines():
        r = json.loads(line)
        key = (r["case"], r["projector"], r["k_requested"], r["kernel"], str(r["ridge"]))
        done.add((*key, r["blocks"], r["M"], r.get("seed", 0)))
    return done


def min_ridge(trak: ft.TRAK, m: int, setting: Setting) -> float:
    """The smallest of MIN_RIDGES whose kernel factor exists for model m."""
    for ridge in MIN_RIDGES:
        est = estimator(setting.kernel, ridge, setting.blocks)
        try:
            trak.finalize(model_ids=[m], estimator=est)
            return ridge
        except ft.NumericalError:
            continue
    raise RuntimeError(f"no ridge in {MIN_RIDGES} works for {setting}")


def drop_kernels(store: Path, kind: str = "") -> None:
    """Delete the cached kernel artefacts (``kind``: "factor", or "" for all) of every
    model: they are caches, rebuilt from the features when needed."""
    for path in (store / "checkpoints").glob(f"*/kernels/{kind}*"):
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def read_only(store: Path) -> Iterator[None]:
    """Make the store's directory read-only for the block: fasttrak then keeps kernel
    factors in memory instead of writing one (k x k) array per estimator to disk."""
    store.chmod(0o555)
    try:
        yield
    finally:
        store.chmod(0o755)


def run_store(
    case: Case,
    projector: str,
    k: int,
    models: list[int],
    grid_settings: list[Setting],
    seed: int = 0,
) -> Iterator[dict[str, Any]]:
    """Featurize one (case, projector, k) store and yield a result line per setting and M.

    The grams (one per kernel weighting and model) are built once with the writable store;
    every estimator is then scored with the store read-only (factors in memory), one fresh
    TRAK object per (model, kernel weighting) so that its factors are freed after use.
    ``seed``: the projection's seed (stores and lines of seed != 0 are marked with it).
    """
    data = case.data()
    masks, outputs = gt.ground_truth(case)
    _, outputs_b = gt.ground_truth(case, second=True)
    outputs_avg = (outputs + outputs_b) / 2
    m_max = max(models)
    ckpts = gt.checkpoints(case, m_max)
    store = gt.case_dir(case) / "stores" / (f"{projector}_k{k}" + (f"_s{seed}" if seed else ""))

    def make_trak() -> ft.TRAK:
        return ft.TRAK(
            case.model(),
            proj_dim=k,
            projector=projector_config(projector, case.p, k),
            store=store,
            seed=seed,
            batch_size=BATCH_SIZE,
            progress=False,
        )

    trak = make_trak()
    featurize_s = []
    for m in range(m_max):
        start = time.perf_counter()
        trak.featurize(data.train_set(), checkpoints=[ckpts[m]], model_ids=[m])
        featurize_s.append(time.perf_counter() - start)
    stats: dict[str, Any] = {}
    phi0, q0 = trak.store.model(0).features(), trak.store.model(0).q()
    for kind, w in (("plain", None), ("gn", q0.astype(np.float64) * (1 - q0))):
        for name, value in spectrum_stats(phi0, w, case.p).items():
            stats[f"{kind}_{name}"] = value
    qs = [trak.store.model(m).q() for m in range(m_max)]
    kernels = sorted({s.kernel for s in grid_settings})
    gram_s: dict[tuple[int, str], float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ft.SaturationWarning)
        for m in range(m_max):
            for kernel in kernels:
                start = time.perf_counter()
                trak.finalize(model_ids=[m], estimator=estimator(kernel, 1.0, 1))
                gram_s[m, kernel] = time.perf_counter() - start
    drop_kernels(store, "factor")
    targets = data.target_set()
    solves = [(s, size) for s in grid_settings for size in ensemble_sizes(s, models)]
    per_model: dict[tuple[Setting, int | None], list[ft.Scores]] = {key: [] for key in solves}
    score_s: dict[tuple[Setting, int | None], list[float]] = {key: [] for key in solves}
    warned: dict[Setting, bool] = {s: False for s in grid_settings}
    ridge_of: dict[Setting, Any] = {s: s.ridge for s in grid_settings if s.ridge != "min"}
    with read_only(store):
        lowest = [s for s in grid_settings if s.ridge == "min"]
        for kernel in kernels:  # "min": the smallest ridge that works for every model
            for m in range(m_max):
                reader = make_trak()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ft.SaturationWarning)
                    for s in lowest:
                        if s.kernel == kernel:
                            ridge_of[s] = max(ridge_of.get(s, 0.0), min_ridge(reader, m, s))
        for m in range(m_max):
            for kernel in kernels:
                reader = make_trak()
                for s, size in solves:
                    if s.kernel != kernel or (size is not None and m >= size):
                        continue
                    est = estimator(s.kernel, ridge_of[s], s.blocks, size)
                    start = time.perf_counter()
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always", ft.SaturationWarning)
                        scores = reader.score(
                            targets, checkpoints=[ckpts[m]], model_ids=[m], estimator=est
                        )
                        scores.numpy()  # computed here, timed with the score
                    score_s[s, size].append(time.perf_counter() - start + gram_s[m, kernel])
                    warned[s] |= any(issubclass(w.category, ft.SaturationWarning) for w in caught)
                    per_model[s, size].append(scores)
        for s in grid_settings:
            for big_m in models:
                key = (s, big_m if s.ridge == "auto" else None)
                start = time.perf_counter()
                combined = np.asarray(ft.Scores.combine(per_model[key][:big_m]))
                result = ft.evaluate.lds(combined, masks, outputs)
                result_avg = ft.evaluate.lds(combined, masks, outputs_avg)
                seconds = time.perf_counter() - start
                yield {
                    "case": case.name,
                    "n": data.n,
                    "p": case.p,
                    "k": trak.k,
                    "k_requested": k,
                    "projector": projector,
                    "kernel": s.kernel,
                    "ridge": s.ridge,
                    "ridge_used": ridge_of[s],
                    "blocks": s.blocks,
                    "M": big_m,
                    "lds": result.mean,
                    "lds_se": result.stderr,
                    "lds_valid": result.num_valid,
                    "lds_avg": result_avg.mean,
                    "lds_avg_se": result_avg.stderr,
                    "paper": projector == "dense" and s == PAPER,
                    "default": projector == DEFAULT["projector"]
                    and s == default_setting(k, data.n, case.p),
                    "fasttrak_commit": COMMIT,
                    "featurize_seconds": float(sum(featurize_s[:big_m])),
                    "score_seconds": float(sum(score_s[key][:big_m]))
                    + (seconds if big_m > 1 else 0),
                    "saturation_warning": warned[s],
                    "scores_finite": bool(np.isfinite(combined).all()),
                    "score_scale": float(np.abs(combined).mean()),
                    **stats,
                    **q_stats(qs[:big_m]),
                    **({"seed": seed} if seed else {}),
                }
    drop_kernels(store)


# ---------------------------------------------------------------------- main


def parse_list(text: str, kind: type) -> list:
    return [item if item in ("min", "auto") else kind(item) for item in text.split(",") if item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--projectors", default=",".join(PROJECTORS))
    parser.add_argument("--ks", default=",".join(map(str, KS)))
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--ridges", default=",".join(map(str, RIDGES)))
    parser.add_argument("--blocks", default=",".join(map(str, BLOCKS)))
    parser.add_argument("--models", default=",".join(map(str, MODELS)))
    parser.add_argument("--identity-max-p", type=int, default=IDENTITY_MAX_P)
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON lines to append to")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random projections (ft.TRAK(seed=))"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    kernels = parse_list(args.kernels, str)
    ridges = parse_list(args.ridges, float)
    blocks = parse_list(args.blocks, int)
    models = parse_list(args.models, int)
    done = done_lines(args.out)
    for case in select(args.cases):
        plan = [
            (proj, k) for proj in parse_list(args.projectors, str) for k in parse_list(args.ks, int)
        ]
        if case.p <= args.identity_max_p:
            plan.append(("identity", case.p))
        for projector, k in plan:
            ms = [m for m in models if m <= case.num_models]
            grid_settings = [
                s
                for s in settings(kernels, ridges, blocks, k, case.data().n, case.p)
                if any(
                    (case.name, projector, k, s.kernel, str(s.ridge), s.blocks, m, args.seed)
                    not in done
                    for m in ms
                )
            ]
            if not grid_settings:
                continue
            start = time.perf_counter()
            lines = list(run_store(case, projector, k, ms, grid_settings, args.seed))
            with args.out.open("a") as f:
                for line in lines:
                    f.write(json.dumps(line) + "\n")
            best = max(lines, key=lambda r: r["lds"])
            print(
                f"{case.name:18s} {projector:8s} k={k:5d}"
                + (f" seed={args.seed}" if args.seed else "")
                + f" {len(lines):3d} configs in "
                f"{time.perf_counter() - start:6.1f}s; best {best['lds']:.3f} ({best['kernel']}, "
                f"ridge {best['ridge']}, blocks {best['blocks']}, M {best['M']})",
                flush=True,
            )


if __name__ == "__main__":
    main()
