"""The counterfactual removal check: retrain without each target's top proponents.

If the scores are right, removing the k training examples that most support a target (its
top-k proponents, the highest scores) lowers that target's output (for classification: its
margin) much more than removing k random examples. :func:`removal` measures both with the
user's training function, paired by training seed, and caches every trained model's outputs
on disk so that an interrupted check resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fasttrak.errors import ConfigError, ConfigTypeError, DataError, DataTypeError
from fasttrak.evaluate.common import check_int, check_manifest, load_cached, read_manifest
from fasttrak.evaluate.retrain import TrainFn, _atomic_write
from fasttrak.scoring import Scores

FORMAT_VERSION = 1
MANIFEST_NAME = "removal.json"


@dataclass(frozen=True)
class RemovalResult:
    """Outputs of models trained with and without each target's top-k proponents.

    k: examples removed per model; targets: (T,) the checked targets (rows of the scores);
    seeds: the training seeds (every configuration is trained with each);
    removed: (T, k) the training rows removed for each target (its top-k proponents);
    full: (S, T) each target's output trained on every example, per seed;
    top: (S, T) each target's output trained without its own top-k proponents;
    random: (R, S, T) the targets' outputs trained without k random examples (R draws);
    trained: models this call trained (0 when everything came from the cache).
    """

    k: int
    targets: np.ndarray
    seeds: tuple[int, ...]
    removed: np.ndarray
    full: np.ndarray
    top: np.ndarray
    random: np.ndarray
    trained: int = 0

    @property
    def top_delta(self) -> np.ndarray:
        """(T,) change of each target's output when its top-k proponents are removed,
        mean over seeds (negative: the proponents supported it)."""
        return (self.top - self.full).mean(axis=0)

    @property
    def random_delta(self) -> np.ndarray:
        """(T,) change of each target's output when k random examples are removed, mean
        over draws and seeds."""
        return (self.random - self.full[None]).mean(axis=(0, 1))

    @property
    def difference(self) -> np.ndarray:
        """(T,) ``top_delta - random_delta``: the effect of removing the top proponents
        beyond that of removing as many random examples."""
        return self.top_delta - self.random_delta

    @property
    def top_mean(self) -> float:
        return float(self.top_delta.mean())

    @property
    def top_se(self) -> float:
        """Standard error of :attr:`top_mean` over targets (NaN for one target)."""
        return _se(self.top_delta)

    @property
    def random_mean(self) -> float:
        return float(self.random_delta.mean())

    @property
    def random_se(self) -> float:
        return _se(self.random_delta)

    @property
    def difference_mean(self) -> float:
        return float(self.difference.mean())

    @property
    def difference_se(self) -> float:
        return _se(self.difference)

    @property
    def fraction_lower(self) -> float:
        """Fraction of targets whose output dropped more without their top proponents than
        without random examples."""
        return float((self.top_delta < self.random_delta).mean())

    def summary(self) -> str:
        """One paragraph: the mean changes ± standard errors over targets."""
        t, s, r = len(self.targets), len(self.seeds), self.random.shape[0]
        return (
            f"removing each target's top-{self.k} proponents changed its output by "
            f"{_pm(self.top_mean, self.top_se)}; removing {self.k} random examples by "
            f"{_pm(self.random_mean, self.random_se)} (difference "
            f"{_pm(self.difference_mean, self.difference_se)}; lower than random for "
            f"{round(self.fraction_lower * t)}/{t} targets). Means ± standard errors over "
            f"{t} targets, {s} training seed(s), {r} random draw(s)."
        )

    def __str__(self) -> str:
        return self.summary()


def removal(
    train_fn: TrainFn,
    scores: Scores | np.ndarray | Any,
    *,
    k: int = 10,
    targets: Sequence[int] | None = None,
    num_random: int = 5,
    seeds: int | Sequence[int] = 3,
    random_seed: int = 0,
    cache_dir: str | Path | None = None,
    key: str = "",
    progress: bool = True,
) -> RemovalResult:
    """Remove each target's top-k proponents, retrain, and compare with random removal.

    Args:
        train_fn: ``train_fn(mask, seed)`` as for :func:`retrain`: trains on the training
            rows where the (n_train,) bool ``mask`` is True with the int ``seed`` and returns
            the output (e.g. the margin) on *every* target of ``scores``, a 1-D
            (n_targets,) array or tensor.
        scores: (n_targets, n_train) attribution scores: an :class:`~fasttrak.Scores` (top-k
            streamed with :meth:`~fasttrak.Scores.topk`) or an array.
        k: training examples removed per model, in [1, n_train - 1].
        targets: the targets checked (row indices of ``scores``; default: all). Each costs
            one model per seed.
        num_random: random k-subsets removed (shared by all targets; one model per draw and
            seed). Draw r is ``np.random.default_rng([random_seed, k, r])``.
        seeds: the training seeds, or how many (``3``: seeds 0, 1, 2). Every model (all
            examples, each target's removal, each random removal) is trained with each seed
            and the changes are paired by seed.
        cache_dir: directory where each trained model's outputs are saved as it finishes
            (keyed by its mask and seed); a rerun, or a call with other targets, k or draws,
            trains only what is missing. ``key`` (e.g. the name of the train_fn's config)
            is stored with it: a cache made with another key, training set size or number
            of targets is refused.
        progress: show a tqdm progress bar.

    Returns a :class:`RemovalResult` (``print(result)`` for a summary). Trains
    len(seeds) × (1 + len(targets) + num_random) models, fewer when masks coincide.
    """
    if not callable(train_fn):
        raise ConfigTypeError(
            f"train_fn must be callable (mask, seed) -> outputs on the targets, got {train_fn!r}"
        )
    n_targets, n_train = _shape(scores)
    if n_train < 2:
        raise DataError(f"scores have {n_train} training example(s); removal needs at least 2")
    k = check_int("k", k, minimum=1)
    if k > n_train - 1:
        raise ConfigError(
            f"k must be in [1, {n_train - 1}] (n_train - 1: removing all {n_train} training "
            f"examples leaves nothing to train on), got {k}"
        )
    chosen = _targets(targets, n_targets)
    num_random = check_int("num_random", num_random, minimum=1)
    seed_list = _seeds(seeds)
    random_seed = check_int("random_seed", random_seed, minimum=0)
    if not isinstance(key, str):
        raise ConfigTypeError(f"key must be a str, got {type(key).__name__}")
    if not isinstance(progress, bool):
        raise ConfigTypeError(f"progress must be True or False, got {progress!r}")

    removed = _top_proponents(scores, chosen, k)
    full_mask = np.ones(n_train, dtype=bool)
    masks: list[np.ndarray] = [full_mask]
    for rows in removed:
        mask = full_mask.copy()
        mask[rows] = False
        masks.append(mask)
    for r in range(num_random):
        rng = np.random.default_rng([random_seed, k, r])
        mask = full_mask.copy()
        mask[rng.choice(n_train, size=k, replace=False)] = False
        masks.append(mask)

    cache = None if cache_dir is None else _RunCache(Path(cache_dir), n_train, n_targets, key)
    runs: dict[str, tuple[np.ndarray, int]] = {}
    for mask in masks:
        for seed in seed_list:
            runs.setdefault(_run_id(mask, seed), (mask, seed))
    outputs: dict[str, np.ndarray] = {}
    if cache is not None:
        for run, _ in runs.items():
            cached = cache.load(run)
            if cached is not None:
                outputs[run] = cached
    todo = [run for run in runs if run not in outputs]
    with tqdm(
        total=len(runs),
        initial=len(runs) - len(todo),
        disable=not progress,
        desc="removal",
        unit="model",
    ) as bar:
        for run in todo:
            mask, seed = runs[run]
            outputs[run] = _as_output(train_fn(mask.copy(), seed), mask, seed, n_targets)
            if cache is not None:
                cache.save(run, outputs[run])
            bar.update(1)

    def table(mask: np.ndarray) -> np.ndarray:  # (S, T): the chosen targets' outputs
        return np.stack([outputs[_run_id(mask, seed)][chosen] for seed in seed_list])

    full = table(full_mask)
    per_target = [table(mask) for mask in masks[1 : 1 + len(chosen)]]
    top = np.stack([out[:, i] for i, out in enumerate(per_target)], axis=1)
    random = np.stack([table(mask) for mask in masks[1 + len(chosen) :]])
    return RemovalResult(
        k, chosen.copy(), tuple(seed_list), removed, full, top, random, trained=len(todo)
    )


# ---------------------------------------------------------------------- inputs


def _shape(scores: Any) -> tuple[int, int]:
    if isinstance(scores, Scores):
        return scores.shape
    if scores is None or isinstance(scores, (str, bytes, dict)):
        raise ConfigTypeError(
            "scores must be ft.Scores (trak.score(targets)) or an (n_targets, n_train) array, "
            f"got {type(scores).__name__}"
        )
    arr = np.asarray(scores)
    if arr.dtype.kind not in "biuf":
        raise DataTypeError(f"scores must be numeric (n_targets, n_train), got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise DataError(
            f"scores must be 2-D (n_targets, n_train), got shape {arr.shape}; "
            "for a single target use scores[None, :]"
        )
    if arr.shape[0] == 0:
        raise DataError("scores have no targets; score at least one target")
    if not np.isfinite(arr).all():
        raise DataError("scores hold NaN or infinite values; the top proponents are undefined")
    return int(arr.shape[0]), int(arr.shape[1])


def _targets(targets: Sequence[int] | None, n_targets: int) -> np.ndarray:
    if targets is None:
        return np.arange(n_targets, dtype=np.int64)
    if isinstance(targets, numbers.Integral):
        raise ConfigTypeError(f"targets= takes a list of target indices: [{targets}]")
    values = list(targets)
    if not values:
        raise ConfigError("targets= is empty; pass at least one target index (or None for all)")
    if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in values):
        raise ConfigTypeError(f"targets= must list integer target indices, got {values}")
    chosen = np.asarray(values, dtype=np.int64)
    if chosen.min() < 0 or chosen.max() >= n_targets or len(set(values)) != len(values):
        raise ConfigError(
            f"targets= must list distinct indices in [0, {n_targets}) (rows of the scores), "
            f"got {values}"
        )
    return chosen


def _seeds(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        return list(range(check_int("seeds", seeds, minimum=1)))
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise ConfigTypeError(
            f"seeds must be a count (3: seeds 0, 1, 2) or a list of int seeds, got {seeds!r}"
        )
    values = [check_int("each seed", s, minimum=0) for s in seeds]
    if not values or len(set(values)) != len(values):
        raise ConfigError(f"seeds must list distinct non-negative ints, got {list(seeds)}")
    return values


def _top_proponents(scores: Any, chosen: np.ndarray, k: int) -> np.ndarray:
    """(T, k) the highest-scoring training rows of each chosen target, highest first."""
    if isinstance(scores, Scores):
        return np.asarray(scores.topk(k).proponents[chosen], dtype=np.int64)
    rows = np.asarray(scores, dtype=np.float64)[chosen]
    return np.argsort(-rows, axis=1, kind="stable")[:, :k].astype(np.int64)


def _as_output(value: Any, mask: np.ndarray, seed: int, n_targets: int) -> np.ndarray:
    """One train_fn result as a finite (n_targets,) float64 array, or an error saying why."""
    where = f"train_fn(mask without {int((~mask).sum())} rows, seed={seed})"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().to(device="cpu", dtype=torch.float64).numpy()
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise DataTypeError(
            f"{where} returned dtype {arr.dtype}; return a numeric array (n_targets,)"
        )
    if arr.shape != (n_targets,):
        raise DataError(
            f"{where} returned shape {arr.shape}; return the output on every target of the "
            f"scores, a 1-D array of {n_targets} (scores are (n_targets, n_train) = "
            f"({n_targets}, {mask.shape[0]}))"
        )
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise DataError(f"{where} returned NaN or infinite outputs; check that training converged")
    return arr


def _run_id(mask: np.ndarray, seed: int) -> str:
    h = hashlib.sha256(np.packbits(mask).tobytes())
    h.update(f"|{mask.shape[0]}|{seed}".encode())
    return h.hexdigest()[:32]


def _se(values: np.ndarray) -> float:
    if values.shape[0] < 2:
        return float("nan")
    return float(values.std(ddof=1) / math.sqrt(values.shape[0]))


def _pm(mean: float, se: float) -> str:
    return f"{mean:+.4g}" if math.isnan(se) else f"{mean:+.4g} ± {se:.2g}"


# ---------------------------------------------------------------------- cache


class _RunCache:
    """One .npy of outputs (n_targets,) per trained (mask, seed), named by their hash, next
    to a manifest of what every run shares (training set size, number of targets, key)."""

    def __init__(self, directory: Path, n_train: int, n_targets: int, key: str) -> None:
        self.dir = directory
        self.n_targets = n_targets
        request = {
            "format_version": FORMAT_VERSION,
            "kind": "removal",
            "n_train": n_train,
            "n_targets": n_targets,
            "key": key,
        }
        if directory.exists() and not directory.is_dir():
            raise ConfigError(f"cache_dir {directory} is a file; pass a directory")
        directory.mkdir(parents=True, exist_ok=True)
        manifest = directory / MANIFEST_NAME
        if manifest.exists():
            check_manifest(read_manifest(manifest, "removal"), request, "removal", directory)
        else:
            if any(directory.glob("run_*.npy")):
                raise DataError(
                    f"removal cache {directory} holds run files but no {MANIFEST_NAME}; "
                    "use another cache_dir or delete it"
                )
            with _atomic_write(manifest) as f:
                f.write(json.dumps(request, indent=2).encode())

    def path(self, run: str) -> Path:
        return self.dir / f"run_{run}.npy"

    def load(self, run: str) -> np.ndarray | None:
        return load_cached(self.path(run), (self.n_targets,))

    def save(self, run: str, arr: np.ndarray) -> None:
        with _atomic_write(self.path(run)) as f:
            np.save(f, arr, allow_pickle=False)
