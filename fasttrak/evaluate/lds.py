"""Linear datamodeling score (LDS): rank correlation of predicted vs. true subset outputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from fasttrak.errors import DataError, DataTypeError
from fasttrak.evaluate.common import check_masks

_BLOCK_ELEMENTS = 1 << 24  # float64 mask elements converted at once (128 MiB)


@dataclass(frozen=True)
class LDSResult:
    """LDS summary.

    mean: mean Spearman correlation over valid targets.
    stderr: std(ddof=1) / sqrt(num_valid); NaN when num_valid == 1.
    per_target: (n_targets,) float64 correlation per target, NaN where undefined.
    num_valid: number of targets with a defined correlation.
    """

    mean: float
    stderr: float
    per_target: np.ndarray
    num_valid: int

    def __str__(self) -> str:
        n_targets = self.per_target.shape[0]
        count = (
            f"{self.num_valid} targets"
            if self.num_valid == n_targets
            else f"{self.num_valid} of {n_targets} targets"
        )
        return f"LDS {self.mean:.3f} ± {self.stderr:.3f} ({count})"


def lds(scores: ArrayLike, masks: ArrayLike, outputs: ArrayLike) -> LDSResult:
    """Linear datamodeling score of attribution ``scores``.

    scores: (n_targets, n_train) attribution scores; anything ``np.asarray`` accepts.
    masks: (num_subsets, n_train) bool or 0/1, the training subsets.
    outputs: (num_subsets, n_targets) true outputs of a model retrained on each subset.

    The predicted output for subset s and target t is ``sum(scores[t, i] for i in subset s)``
    (computed in float64). Per target, the Spearman correlation (average ranks for ties) over
    subsets between predicted and true outputs is taken. Targets whose predicted or true column
    is constant or contains a non-finite value get NaN and are left out of the mean.
    """
    scores_arr = _as_float_matrix("scores", scores, "(n_targets, n_train)")
    masks_arr = check_masks(masks)
    outputs_arr = _as_float_matrix("outputs", outputs, "(num_subsets, n_targets)")
    n_targets, n_train = scores_arr.shape
    num_subsets = masks_arr.shape[0]

    if masks_arr.shape[1] != n_train:
        raise DataError(
            f"masks has {masks_arr.shape[1]} columns but scores has {n_train} train examples; "
            "masks must be (num_subsets, n_train) and scores (n_targets, n_train)"
        )
    if outputs_arr.shape[0] != num_subsets:
        raise DataError(
            f"outputs has {outputs_arr.shape[0]} rows but masks has {num_subsets} subsets; "
            "outputs must be (num_subsets, n_targets), one row per mask row"
        )
    if outputs_arr.shape[1] != n_targets:
        raise DataError(
            f"outputs has {outputs_arr.shape[1]} columns but scores has {n_targets} targets; "
            "outputs must be (num_subsets, n_targets) (transpose it if it is the other way round)"
        )
    if num_subsets < 2:
        raise DataError(
            f"LDS needs at least 2 subsets to rank, got {num_subsets}; sample more subsets"
        )

    predicted = _predict(masks_arr, scores_arr)  # (num_subsets, n_targets)
    bad_pred = _undefined_columns(predicted)
    bad_true = _undefined_columns(outputs_arr)
    valid = ~(bad_pred | bad_true)
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise DataError(
            f"LDS is undefined for all {n_targets} targets: {int(bad_pred.sum())} have constant "
            f"or non-finite predicted outputs (check scores for NaN / all-equal rows) and "
            f"{int(bad_true.sum())} have constant or non-finite true outputs (check outputs)"
        )

    per_target = np.full(n_targets, np.nan)
    per_target[valid] = _column_spearman(predicted[:, valid], outputs_arr[:, valid])
    good = per_target[valid]
    mean = float(good.mean())
    stderr = float(good.std(ddof=1) / math.sqrt(num_valid)) if num_valid > 1 else math.nan
    per_target.setflags(write=False)
    return LDSResult(mean=mean, stderr=stderr, per_target=per_target, num_valid=num_valid)


def _as_float_matrix(name: str, value: ArrayLike, expected: str) -> np.ndarray:
    """Return ``value`` as a 2-D float64 array, raising if it is not numeric and 2-D."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise DataTypeError(
            f"{name} must be a real numeric array {expected}, got dtype {arr.dtype}"
        )
    if arr.ndim != 2:
        raise DataError(
            f"{name} must be 2-D {expected}, got shape {arr.shape}"
            + ("; use .reshape(-1, 1) for a single target" if arr.ndim == 1 else "")
        )
    return arr.astype(np.float64, copy=False)


def _predict(masks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(num_subsets, n_targets) float64 ``masks @ scores.T``, in row blocks to bound memory."""
    block = max(1, _BLOCK_ELEMENTS // max(1, masks.shape[1]))
    out = np.empty((masks.shape[0], scores.shape[0]))
    for start in range(0, masks.shape[0], block):
        stop = start + block
        out[start:stop] = masks[start:stop].astype(np.float64) @ scores.T
    return out


def _undefined_columns(x: np.ndarray) -> np.ndarray:
    """(n_cols,) bool: True where column of ``x`` (rows, n_cols) is constant or non-finite."""
    nonfinite = ~np.isfinite(x).all(axis=0)
    constant = np.zeros(x.shape[1], dtype=bool)
    finite_cols = ~nonfinite
    constant[finite_cols] = np.ptp(x[:, finite_cols], axis=0) == 0
    return nonfinite | constant


def _column_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n_cols,) Spearman correlation between matching columns of a, b (rows, n_cols)."""
    from scipy.stats import rankdata  # scipy.stats takes 0.7 s to import: only when used

    ra = rankdata(a, axis=0)
    rb = rankdata(b, axis=0)
    ra -= ra.mean(axis=0)
    rb -= rb.mean(axis=0)
    num = (ra * rb).sum(axis=0)
    den = np.sqrt((ra * ra).sum(axis=0) * (rb * rb).sum(axis=0))
    return np.clip(num / den, -1.0, 1.0)
