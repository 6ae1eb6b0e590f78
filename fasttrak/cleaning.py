"""Data cleaning: rank training examples by how likely their label is wrong.

import fasttrak as ft
ranking = ft.cleaning.suspected_mislabels(trak)   # self-influence, the measured best
ranking.top(50)          # the 50 most suspect training rows, most suspect first

Each component is a per-training-row signal, oriented so that *higher is more suspect*:

- ``self_influence``: the example's score on itself (:meth:`fasttrak.TRAK.self_influence`,
  streamed, never an n × n matrix). High when the models fit the example by memorising it.
- ``total_influence``: *minus* the sum of the example's scores over the targets (streamed
  over :meth:`fasttrak.Scores.chunks`, never the dense matrix). A mislabeled example pulls
  the outputs of correctly labeled targets down. Needs ``scores``.
- ``q``: Q = 1 - p(label) averaged over the stored models (checkpoints): the models' own
  doubt about the label, read from the store (no gradients, no scoring).
- ``loss``: -log(1 - Q) = -log p(label), averaged over the stored models.

``method="combined"`` averages the ranks of :data:`COMBINED`'s components (every component
is first turned into its rank in [0, 1], so that no scale dominates). Measured on
noisy-label benchmarks where the model memorises part of the noise
(``benchmarks/mislabels.py``, numbers in docs/cleaning.md): the components to combine were
chosen on two development cases and checked on two others, and on all four self-influence
*alone* ranked the flipped labels best, ahead of every rank average, of Q and of the final
model's loss; total influence was the weakest. Self-influence already multiplies Q by the
example's leverage φᵀ K⁻¹ φ, so it is the default; ``"combined"`` (self-influence and Q)
came second.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fasttrak.errors import ConfigError, ConfigTypeError, DataError, NumericalError
from fasttrak.estimator import Estimator
from fasttrak.scoring import Scores
from fasttrak.trak import TRAK

METHODS = ("combined", "self_influence", "total_influence", "q", "loss")
"""The rankings :func:`suspected_mislabels` computes."""

COMBINED = ("self_influence", "q")
"""The components whose ranks ``method="combined"`` averages: of every rank average of
self-influence, total influence and Q, the best (mean AUROC) on the development cases of
docs/cleaning.md. Without ``scores``, only those available are combined (``Ranking.combined``
says which)."""

SIGNS = {"self_influence": 1.0, "total_influence": -1.0, "q": 1.0, "loss": 1.0}
"""Orientation of each raw component: suspicion = sign · component (higher = more suspect)."""


@dataclass(frozen=True)
class Ranking:
    """Training rows ranked from the most to the least suspect of being mislabeled.

    order: (n_train,) int64 row indices, most suspect first (ties: lower row first).
    score: (n_train,) float64 suspicion of each row, indexed by row (higher = more suspect):
        the oriented component for a single method, the mean rank in [0, 1] for
        ``"combined"``.
    components: the raw per-row components that were computed, each (n_train,) float64,
        as defined (not oriented): ``self_influence`` (the diagonal of the scores),
        ``total_influence`` (sum of the scores over targets, ``np.asarray(scores).sum(0)``),
        ``q`` (mean Q over models) and ``loss`` (mean -log(1 - Q) over models).
    method: the method that ranked; combined: the components averaged (``"combined"`` only).
    """

    order: np.ndarray
    score: np.ndarray
    components: dict[str, np.ndarray]
    method: str
    combined: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return int(self.order.shape[0])

    def top(self, k: int) -> np.ndarray:
        """The ``k`` most suspect training rows, most suspect first."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(self):
            raise ConfigError(
                f"k must be an integer in [1, {len(self)}] (the number of training rows), got {k!r}"
            )
        return self.order[: int(k)].copy()

    def rank_of(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """The 0-based position of each given row in :attr:`order` (0 = most suspect)."""
        position = np.empty(len(self), dtype=np.int64)
        position[self.order] = np.arange(len(self))
        return position[np.asarray(rows, dtype=np.int64)]


def suspected_mislabels(
    trak: TRAK,
    scores: Scores | np.ndarray | None = None,
    *,
    model_ids: Sequence[int] | None = None,
    method: str = "self_influence",
    estimator: Estimator | None = None,
) -> Ranking:
    """Rank the training rows of ``trak``'s store by how suspect their labels are.

    Args:
        trak: the :class:`~fasttrak.TRAK` whose store holds the (complete) training
            features.
        scores: scores of targets against the same training set, ``trak.score(targets)``
            (an :class:`~fasttrak.Scores`, read chunk by chunk, or an (n_targets, n_train)
            array); best on targets whose labels you trust (a clean held-out set).
            Needed by ``"total_influence"``; ``"combined"`` uses it when :data:`COMBINED`
            names total influence.
        model_ids: the stored models whose self-influence and Q are used (default: all).
        method: ``"self_influence"`` (default: the best measured, docs/cleaning.md),
            ``"combined"`` (rank average of :data:`COMBINED`), ``"total_influence"``,
            ``"q"`` or ``"loss"``.
        estimator: the estimator of the self-influence (default ``trak.estimator``).

    Returns a :class:`Ranking` (``ranking.top(k)``: the k most suspect rows).
    """
    if not isinstance(trak, TRAK):
        raise ConfigTypeError(
            "suspected_mislabels takes the ft.TRAK whose store holds the training features, "
            f"got {type(trak).__name__}; call it as suspected_mislabels(trak, scores)"
        )
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if method == "total_influence" and scores is None:
        raise ConfigError(
            'method="total_influence" needs scores: pass scores=trak.score(targets), '
            "targets whose labels you trust (e.g. a clean held-out set)"
        )
    ids = trak._stored_ids(model_ids)
    n = trak.store.model(ids[0]).num_rows
    wanted = _wanted(method, scores is not None)
    components: dict[str, np.ndarray] = {}
    if "q" in wanted or "loss" in wanted:
        q = np.stack([trak.store.model(m).q().astype(np.float64) for m in ids])
        if "q" in wanted:
            components["q"] = q.mean(axis=0)
        if "loss" in wanted:
            p = np.clip(1.0 - q, np.finfo(np.float32).tiny, 1.0)
            components["loss"] = (-np.log(p)).mean(axis=0)
    if "self_influence" in wanted:
        components["self_influence"] = trak.self_influence(ids, estimator).astype(np.float64)
    if "total_influence" in wanted:
        components["total_influence"] = total_influence(scores, n)
    for name, values in components.items():
        if values.shape != (n,) or not np.isfinite(values).all():
            bad = np.flatnonzero(~np.isfinite(values))[:10].tolist()
            raise NumericalError(
                f"the {name} of training rows {bad} is not finite; check those rows' features "
                "(fasttrak verify STORE) and that the checkpoints have not diverged"
            )
    if method == "combined":
        used = tuple(name for name in COMBINED if name in components)
        score = rank_average({name: components[name] for name in used})
    else:
        used = ()
        score = SIGNS[method] * components[method]
    order = np.argsort(-score, kind="stable").astype(np.int64)
    return Ranking(order, score, components, method, used)


def total_influence(scores: Scores | np.ndarray | Any, n_train: int | None = None) -> np.ndarray:
    """The sum of every training row's scores over the targets: (n_train,) float64.

    An :class:`~fasttrak.Scores` is read one row chunk at a time (:meth:`Scores.chunks`,
    never the dense matrix); an array must be (n_targets, n_train). ``n_train``: the
    expected number of training rows (checked)."""
    if isinstance(scores, Scores):
        n_targets, n = scores.shape
        _check_shape(n_targets, n, n_train)
        total = np.zeros(n, dtype=np.float64)
        for rows, block in scores.chunks():
            total[rows] = block.sum(axis=0, dtype=np.float64)
        return total
    if scores is None or isinstance(scores, (str, bytes, Mapping)):
        raise ConfigTypeError(
            "scores must be ft.Scores (trak.score(targets)) or an (n_targets, n_train) array, "
            f"got {type(scores).__name__}"
        )
    arr = np.asarray(scores)
    if arr.dtype.kind not in "biuf":
        raise ConfigTypeError(
            f"scores must be numeric, (n_targets, n_train), got dtype {arr.dtype}; "
            "pass trak.score(targets)"
        )
    if arr.ndim != 2:
        raise DataError(
            f"scores must be 2-D (n_targets, n_train), got shape {arr.shape}; "
            "pass trak.score(targets) or reshape a single target's scores with [None, :]"
        )
    _check_shape(arr.shape[0], arr.shape[1], n_train)
    return arr.sum(axis=0, dtype=np.float64)


def rank_average(signals: Mapping[str, np.ndarray]) -> np.ndarray:
    """Mean over the named raw components of each row's rank in [0, 1] (1 = most suspect),
    each component first oriented by :data:`SIGNS` (average ranks for ties)."""
    from scipy.stats import rankdata  # scipy.stats takes 0.7 s to import: only when used

    if not signals:
        raise ConfigError("rank_average needs at least one component")
    total: np.ndarray | None = None
    for name, values in signals.items():
        if name not in SIGNS:
            raise ConfigError(f"unknown component {name!r}; known: {sorted(SIGNS)}")
        oriented = SIGNS[name] * np.asarray(values, dtype=np.float64)
        n = oriented.shape[0]
        ranks = (rankdata(oriented) - 1.0) / max(n - 1, 1)
        total = ranks if total is None else total + ranks
    assert total is not None
    return total / len(signals)


def _wanted(method: str, have_scores: bool) -> tuple[str, ...]:
    if method != "combined":
        return (method,)
    return tuple(name for name in COMBINED if have_scores or name != "total_influence")


def _check_shape(n_targets: int, n: int, n_train: int | None) -> None:
    if n_targets == 0:
        raise DataError("scores have no targets; score at least one target: trak.score(targets)")
    if n_train is not None and n != n_train:
        raise DataError(
            f"scores are against {n} training rows but the store holds {n_train}; pass "
            "scores=trak.score(targets) from the same TRAK (the same training set)"
        )
