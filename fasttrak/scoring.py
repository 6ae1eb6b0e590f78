"""Scores: the TRAK estimator evaluated block by block over the training rows.

score(t, i) = mean_m(Q_m,i) · mean_m( φ_m(t)ᵀ K_m⁻¹ φ_m(i) )
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from torch import Tensor

from fasttrak.store import CheckpointStore


@dataclass(frozen=True)
class TopK:
    """Top proponents (highest scores) and opponents (lowest) per target.

    Each array has shape (n_targets, k); indices are training-set row numbers, sorted from
    the most extreme score inwards.
    """

    proponents: np.ndarray
    proponent_scores: np.ndarray
    opponents: np.ndarray
    opponent_scores: np.ndarray


class Scores:
    """Attribution scores of shape (n_targets, n_train), computed lazily in row blocks.

    ``np.asarray(scores)`` gives the dense float32 matrix (cached once computed);
    ``scores.topk(k)`` streams over training rows without building it; ``scores.save(path)``
    writes it to an on-disk zarr array block by block.
    """

    def __init__(
        self, checkpoints: Sequence[CheckpointStore], solved: Sequence[Tensor], block_rows: int
    ) -> None:
        if len(checkpoints) != len(solved) or not checkpoints:
            raise ValueError("need one solved target block per checkpoint, and at least one")
        self._checkpoints = list(checkpoints)
        self._solved = [x.float() for x in solved]  # each (k, n_targets)
        self._block_rows = block_rows
        self._dense: np.ndarray | None = None
        n = self._checkpoints[0].features.shape[0]
        q = np.zeros(n, dtype=np.float64)
        for ck in self._checkpoints:
            q += ck.q[:].astype(np.float64)
        self.q_mean = (q / len(self._checkpoints)).astype(np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self._solved[0].shape[1]), int(self.q_mean.shape[0]))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        n_targets, n_train = self.shape
        return f"Scores(n_targets={n_targets}, n_train={n_train}, models={len(self._solved)})"

    def blocks(self) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield (train row slice, scores (n_targets, rows) float32) over the training set."""
        n = self.shape[1]
        for start in range(0, n, self._block_rows):
            rows = slice(start, min(start + self._block_rows, n))
            total = torch.zeros((rows.stop - rows.start, self.shape[0]), dtype=torch.float64)
            for ck, solved in zip(self._checkpoints, self._solved, strict=True):
                phi = torch.from_numpy(np.asarray(ck.features[rows], dtype=np.float32))
                total += (phi @ solved).double()
            total *= torch.from_numpy(self.q_mean[rows]).double()[:, None] / len(self._solved)
            yield rows, total.T.float().numpy()

    def numpy(self) -> np.ndarray:
        """The dense (n_targets, n_train) float32 matrix."""
        if self._dense is None:
            dense = np.empty(self.shape, dtype=np.float32)
            for rows, block in self.blocks():
                dense[:, rows] = block
            self._dense = dense
        return self._dense

    def __array__(self, dtype: object = None, copy: bool | None = None) -> np.ndarray:
        dense = self.numpy()
        return dense if dtype is None else dense.astype(dtype)

    def topk(self, k: int) -> TopK:
        """The k highest (proponents) and k lowest (opponents) scores of every target."""
        n_targets, n = self.shape
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, {n}] (the number of training examples), got {k}")
        best_s = np.full((n_targets, 0), -np.inf, dtype=np.float32)
        best_i = np.zeros((n_targets, 0), dtype=np.int64)
        worst_s, worst_i = -best_s, best_i.copy()
        source = [(slice(0, n), self._dense)] if self._dense is not None else self.blocks()
        for rows, block in source:
            index = np.broadcast_to(np.arange(rows.start, rows.stop), block.shape)
            best_s, best_i = _keep_top(np.hstack([best_s, block]), np.hstack([best_i, index]), k)
            neg_s, worst_i = _keep_top(
                np.hstack([-worst_s, -block]), np.hstack([worst_i, index]), k
            )
            worst_s = -neg_s
        return TopK(best_i, best_s, worst_i, worst_s)

    def save(self, path: str | Path) -> zarr.Array:
        """Write the dense scores to a new zarr array at ``path`` without holding them in memory."""
        array = zarr.create_array(
            str(path),
            shape=self.shape,
            dtype="float32",
            chunks=(self.shape[0], min(self._block_rows, self.shape[1])),
        )
        for rows, block in self.blocks():
            array[:, rows] = block
        return array


def _keep_top(values: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k largest values (sorted descending) and their indices."""
    k = min(k, values.shape[1])
    part = np.argpartition(-values, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(values, part, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(
        np.take_along_axis(index, part, axis=1), order, axis=1
    )


def soft_threshold(scores: np.ndarray, keep: float) -> np.ndarray:
    """The paper's optional sparsification: per target, shrink scores towards 0 by τ and zero
    those with |score| <= τ, τ being the per-target (1 - keep) quantile of |score|.

    scores: (n_targets, n_train); keep: fraction in (0, 1] of scores left nonzero per target.
    Returns a new float32 array of the same shape.
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep}")
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (n_targets, n_train), got shape {scores.shape}")
    tau = np.quantile(np.abs(scores), 1 - keep, axis=1, keepdims=True) if keep < 1 else 0.0
    return (np.sign(scores) * np.maximum(np.abs(scores) - tau, 0)).astype(np.float32)
